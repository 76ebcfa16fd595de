"""Decoding one capture into columns: container walk, vectorised layer walk, then the packets and anomalies
tables. This is the pure per-capture function that every front end (API, CLI, process pool) calls.

Memory: `decode_capture` returns the whole packets table (about 300 bytes a packet with the declared nullable
Int64 columns), so its memory grows with the capture; `PacketStream` yields the same table in parts of bounded
size, and `write_packets` streams it to Parquet (`hbonecap decode -f parquet -o`), so a capture set of any size
is decoded in bounded memory. Categorical columns are interned from packed 64-bit keys (`hbonecap.layers.keys`);
the codes are stable across parts.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from hbonecap import tables
from hbonecap.capture.reader import CaptureInfo, CaptureReader, read_secrets, redact_secrets  # noqa: F401
from hbonecap.capture.records import RecordBatch
from hbonecap.config import DEFAULT_CONFIG, LINKTYPE_NAMES, DecodeConfig
from hbonecap.layers import context as K
from hbonecap.layers.context import DecodeContext
from hbonecap.layers.keys import NOT_PACKED, address_keys, encap_keys, factorize
from hbonecap.layers.unwrap import decode_batch

PROTO_NAMES = {K.P_TCP: "tcp", K.P_UDP: "udp", K.P_ICMP: "icmp", K.P_ICMPV6: "icmpv6", K.P_ARP: "arp",
               K.P_LLC: "llc", K.P_NETLINK: "netlink"}
TUNNEL_NAMES = {K.TUN_GENEVE: "geneve", K.TUN_VXLAN: "vxlan"}


class Interner:
    """Maps row keys to category codes that stay stable across batches. A key is a row of bytes (a (n, w) uint8
    array) or an integer; both kinds can share one interner (a bytes key never equals an int key), and keys
    that give the same string share a code."""

    def __init__(self, to_str: Callable[[bytes | int], str | None]) -> None:
        self.to_str = to_str
        self.by_key: dict[bytes | int, int] = {}
        self.by_str: dict[str, int] = {}
        self.values: list[str] = []

    def encode(self, keys: np.ndarray) -> np.ndarray:
        """keys: (n, w) uint8 rows or (n,) integers; returns int32 codes (-1 where to_str gives None).

        Rows are factorised by hashing (pandas.factorize), column word by column word, so the cost is linear in
        the number of packets; only the distinct keys reach Python."""
        if keys.ndim == 1:
            codes, distinct = factorize(keys)
            found = distinct.tolist()
        else:
            codes, first = _row_codes(keys)
            found = [keys[pos].tobytes() for pos in first.tolist()]
        local = np.empty(len(found), dtype=np.int32)
        for j, kb in enumerate(found):
            c = self.by_key.get(kb)
            if c is None:
                s = self.to_str(kb)
                if s is None:
                    c = -1
                else:
                    c = self.by_str.get(s)
                    if c is None:
                        c = len(self.values)
                        self.by_str[s] = c
                        self.values.append(s)
                self.by_key[kb] = c
            local[j] = c
        return local[codes]

    def categorical(self, codes: np.ndarray) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, categories=pd.Index(self.values, dtype=object), validate=False)


def _row_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes numbering the distinct rows (or values) in order of first appearance, and each one's first position."""
    if keys.ndim == 1:
        codes = pd.factorize(keys)[0]
    else:
        n, w = keys.shape
        pad = (-w) % 8
        if pad:
            keys = np.concatenate([keys, np.zeros((n, pad), dtype=keys.dtype)], axis=1)
        words = np.ascontiguousarray(keys).view(np.uint64)
        codes = pd.factorize(words[:, 0])[0].astype(np.int64)
        for j in range(1, words.shape[1]):
            col = words[:, j]
            if not col.any():
                continue
            c2, u2 = pd.factorize(col)
            codes = pd.factorize(codes * len(u2) + c2)[0].astype(np.int64)
    if len(codes) == 0:
        return codes, np.zeros(0, dtype=np.int64)
    cm = np.maximum.accumulate(codes)
    first = np.flatnonzero(np.r_[True, cm[1:] > cm[:-1]])
    return codes, first


def _address(key: bytes | int) -> str | None:
    if isinstance(key, int):        # IPv4 as (4 << 32) | address, see encode_addresses
        return str(ipaddress.IPv4Address(key & 0xFFFFFFFF)) if key >> 32 == 4 else None
    v = key[0]
    if v == 4:
        return str(ipaddress.IPv4Address(key[1:5]))
    if v == 6:
        return str(ipaddress.IPv6Address(key[1:17]))
    return None


def encode_addresses(interner: Interner, ver: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """Codes of an address column: IPv4 (and absent) addresses as one integer each, IPv6 as 17-byte rows."""
    key = address_keys(ver, addr)
    v6 = key == NOT_PACKED
    if not v6.any():
        return interner.encode(key)
    codes = np.empty(len(ver), dtype=np.int32)
    codes[~v6] = interner.encode(key[~v6])
    codes[v6] = interner.encode(_addr_keys(ver[v6], addr[v6]))
    return codes


def _proto(code: int) -> str | None:
    cls, num = code >> 16, code & 0xFFFF
    if cls == K.P_UNKNOWN:
        return "unknown"
    if cls == K.P_IP_OTHER:
        return f"ip:{num}"
    if cls == K.P_ETHERTYPE:
        return f"ethertype:{num:#06x}"
    if cls == K.P_FRAGMENT:
        return f"fragment:{num}"
    return PROTO_NAMES[cls]


def _encap(key: bytes | int) -> str:
    if isinstance(key, int):        # packed form of encode_encaps
        depth = key & 0xF
        levels = [((key >> 4) & 0xF, (key >> 8) & 0xFFFFFF), ((key >> 32) & 0xF, (key >> 36) & 0xFFFFFF)]
    else:
        a = np.frombuffer(key, dtype=np.int64)
        depth = int(a[0])
        levels = [(int(a[1 + 2 * d]), int(a[2 + 2 * d])) for d in range(depth)]
    return "/".join(f"{TUNNEL_NAMES.get(t, '?')}:{v}" for t, v in levels[:depth])


def encode_encaps(interner: Interner, depth: np.ndarray, tun_type: np.ndarray, tun_vni: np.ndarray) -> np.ndarray:
    """Codes of the encap column. Up to two levels with 24-bit VNIs (every Geneve and VXLAN VNI) pack into one
    integer per packet; deeper nesting uses a row of (depth, type, vni, type, vni, ...)."""
    key = encap_keys(depth, tun_type, tun_vni)
    deep = key == NOT_PACKED
    if not deep.any():
        return interner.encode(key)
    codes = np.empty(len(depth), dtype=np.int32)
    codes[~deep] = interner.encode(key[~deep])
    m, d = int(deep.sum()), tun_type.shape[1]
    ek = np.zeros((m, 1 + 2 * d), dtype=np.int64)
    ek[:, 0] = depth[deep]
    ek[:, 1::2] = tun_type[deep]
    ek[:, 2::2] = tun_vni[deep]
    codes[deep] = interner.encode(ek.view(np.uint8).reshape(m, -1))
    return codes


INT_COLUMNS = ("ifindex", "pkttype", "vlan", "vni", "tunnel_options", "outer_sport", "outer_dport", "ip_version",
               "ttl", "ip_id", "sport", "dport", "tcp_flags", "seq", "ack", "win", "mss", "wscale", "sack_blocks",
               "tsval", "tsecr", "icmp_type", "icmp_code", "payload_len", "payload_offset")
_WIDE_FIELD_SEQ = K.WIDE_FIELDS.index("seq")
# The packets table's int64 columns, in the order of their rows in PacketColumns' blocks.
BLOCK_COLUMNS = ("index", "ts", "length", "caplen", "frame_offset") + INT_COLUMNS
_ROW = {c: i for i, c in enumerate(BLOCK_COLUMNS)}
_FIRST_INT = _ROW[INT_COLUMNS[0]]
# Row of each DecodeContext int64 field.
_WIDE_ROWS = tuple(_ROW[{"tun_options": "tunnel_options", "payload_off": "payload_offset"}.get(f, f)]
                   for f in K.WIDE_FIELDS)


@dataclass
class CaptureDecode:
    """Everything decoded from one capture."""

    info: CaptureInfo
    packets: pd.DataFrame
    anomalies: pd.DataFrame
    extra: dict = field(default_factory=dict)


class PacketColumns:
    """Accumulates decoded batches of one capture into the packets table's columns."""

    def __init__(self, name: str, info: CaptureInfo) -> None:
        self.name = name
        self.infos = [info]          # one per file of the capture point (rotated files)
        self.file_no = 0
        self.index_offset = 0        # frame numbers continue across the files of one point
        self.last_index = 0
        self.addr = Interner(_address)
        self.proto = Interner(_proto)
        self.encap = Interner(_encap)
        self.iface = Interner(lambda i: getattr(self._interface(i), "name", None))
        self.link = Interner(self._link_name)
        self.parts: dict[str, list[np.ndarray]] = {}
        self.comments: dict[int, str] = {}
        self.anomalies: list[tuple] = []
        # The BLOCK_COLUMNS are rows of int64 blocks: the layer walk writes the INT_COLUMNS in place (`reserve`),
        # the table's columns are views of them. spans: (block, first row, end row) added since the last table.
        self.block: np.ndarray | None = None
        self.fill = 0
        self.spans: list[list] = []
        self._reserved: list[np.ndarray] | None = None     # the views `reserve` handed out last

    def reserve(self, n: int, capacity: int = 0) -> list[np.ndarray]:
        """Views of the next `n` rows of the BLOCK_COLUMNS storage, one per DecodeContext.WIDE_FIELDS, to decode
        the next batch into (`decode_batch(..., wide=...)`); `add` of that batch takes them as they are. A new
        block holds max(n, capacity) rows: capacity is the caller's estimate of the rows still to come (pages
        of a block never written are never committed, so a generous estimate costs address space only)."""
        if self.block is None or self.fill + n > self.block.shape[1]:
            try:
                self.block = _int_block(len(BLOCK_COLUMNS), max(n, capacity))
            except (OSError, OverflowError):   # the estimate's address space refused: this batch's rows only
                self.block = _int_block(len(BLOCK_COLUMNS), n)
            self.fill = 0
        lo, hi = self.fill, self.fill + n
        self.fill = hi
        self._reserved = [self.block[r, lo:hi] for r in _WIDE_ROWS]
        return self._reserved

    def _rows_of(self, ctx: DecodeContext) -> np.ndarray:
        """The block columns of the batch `ctx` decoded (reserved for it, or filled from it now)."""
        n = ctx.n
        if self._reserved is None or ctx.seq is not self._reserved[_WIDE_FIELD_SEQ]:
            for view, field_name in zip(self.reserve(n), K.WIDE_FIELDS):
                view[:] = getattr(ctx, field_name)
        self._reserved = None
        block, hi = self.block, self.fill
        lo = hi - n
        last = self.spans[-1] if self.spans else None
        if last is not None and last[0] is block and last[2] == lo:
            last[2] = hi
        else:
            self.spans.append([block, lo, hi])
        return block[:, lo:hi]

    def next_file(self, info: CaptureInfo) -> None:
        """The next rotated file of the same capture point."""
        self.infos.append(info)
        self.file_no += 1
        self.index_offset = self.last_index

    def _interface(self, key: int):
        f, i = divmod(key, 1 << 20)
        ifaces = self.infos[f].interfaces if 0 <= f < len(self.infos) else []
        return ifaces[i] if 0 <= i < len(ifaces) else None

    def _link_name(self, key: int) -> str | None:
        iface = self._interface(key)
        if iface is None:
            return None
        return LINKTYPE_NAMES.get(iface.link_type, f"linktype:{iface.link_type}")

    def _add(self, col: str, arr: np.ndarray) -> None:
        self.parts.setdefault(col, []).append(arr)

    def add(self, batch: RecordBatch, ctx: DecodeContext, info: CaptureInfo) -> None:
        n = len(batch)
        if n == 0:
            return
        rows = self._rows_of(ctx)
        numbers = rows[_ROW["index"]]
        np.add(batch.frame_numbers(), self.index_offset, out=numbers)
        self.last_index = max(self.last_index, int(numbers[-1]))
        rows[_ROW["ts"]] = batch.ts_ns
        rows[_ROW["length"]] = batch.origlen
        rows[_ROW["caplen"]] = batch.caplen
        np.add(batch.data_off, batch.file_offset, out=rows[_ROW["frame_offset"]])
        ikey = batch.iface.astype(np.int64) + (self.file_no << 20)
        self._add("interface", self.iface.encode(ikey))
        self._add("link_type", self.link.encode(ikey))
        self._add("src", encode_addresses(self.addr, ctx.ipver, ctx.src))
        self._add("dst", encode_addresses(self.addr, ctx.ipver, ctx.dst))
        self._add("outer_src", encode_addresses(self.addr, ctx.outer_ipver, ctx.outer_src))
        self._add("outer_dst", encode_addresses(self.addr, ctx.outer_ipver, ctx.outer_dst))
        self._add("encap", encode_encaps(self.encap, ctx.depth, ctx.tun_type, ctx.tun_vni))
        self._add("proto", self.proto.encode(ctx.proto))
        vni, ipv = rows[_ROW["vni"]], rows[_ROW["ip_version"]]
        vni.fill(-1)
        tunnelled = ctx.depth > 0
        if tunnelled.any():
            inner = np.take_along_axis(ctx.tun_vni, np.maximum(ctx.depth.astype(np.int64) - 1, 0)[:, None], axis=1)
            np.copyto(vni, inner[:, 0], where=tunnelled)
        ipv.fill(-1)
        np.copyto(ipv, ctx.ipver, where=ctx.ipver > 0)
        self._add("sack_permitted", ctx.sack_permitted)
        for pos, text in batch.comments.items():
            self.comments[int(numbers[pos])] = redact_secrets(text)
        for sel, layer, kind, detail in ctx.anomalies:
            idx = numbers[sel]
            if isinstance(detail, str):
                self.anomalies.extend((int(i), layer, kind, detail) for i in idx)
            else:
                self.anomalies.extend((int(i), layer, kind, str(dt)) for i, dt in zip(idx, detail))

    def packets(self) -> pd.DataFrame:
        """The packets table of every batch added since the last call (all of them for the first call). Its
        int64 columns are views of the block the batches were decoded into (one copy only when they span
        blocks); the category columns' codes are concatenated, stable across calls (one interner per column)."""
        parts, self.parts = self.parts, {}
        if not parts:
            return tables.empty("packets")

        def take(col: str, dtype=None) -> np.ndarray:
            chunks = parts.pop(col)
            if len(chunks) == 1 and (dtype is None or chunks[0].dtype == dtype):
                return chunks[0]
            return np.concatenate(chunks, dtype=dtype)

        spans, self.spans = self.spans, []
        self.block = None                        # the next table's rows start a new block
        block = spans[0][0][:, spans[0][1]:spans[0][2]] if len(spans) == 1 else \
            np.concatenate([b[:, lo:hi] for b, lo, hi in spans], axis=1)
        index = block[_ROW["index"]]
        n = len(index)
        out: dict[str, object] = {}
        out["capture"] = pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[self.name])
        out["index"] = index
        out["ts"] = pd.arrays.DatetimeArray._simple_new(block[_ROW["ts"]].view("M8[ns]"),
                                                        dtype=pd.DatetimeTZDtype("ns", "UTC"))
        for col, interner in (("interface", self.iface), ("link_type", self.link), ("encap", self.encap),
                              ("outer_src", self.addr), ("outer_dst", self.addr), ("src", self.addr),
                              ("dst", self.addr), ("proto", self.proto)):
            out[col] = interner.categorical(take(col))
        absent = block[_FIRST_INT:] < 0
        for j, col in enumerate(INT_COLUMNS):
            out[col] = pd.arrays.IntegerArray(block[_FIRST_INT + j], absent[j])
        sp = take("sack_permitted")
        out["sack_permitted"] = pd.arrays.BooleanArray(sp == 1, sp < 0)
        for col in ("length", "caplen", "frame_offset"):
            out[col] = block[_ROW[col]]
        out["comment"] = self._comment_column(index)
        return pd.DataFrame({c: out.pop(c) for c in tables.columns("packets")}, copy=False)

    def _comment_column(self, index: np.ndarray):
        """The comment column of the rows `index` (NA but where a pcapng packet comment was read)."""
        import pyarrow as pa

        n = len(index)
        if not self.comments:
            return pd.array(pa.chunked_array([pa.nulls(n, pa.large_string())]), dtype="string")
        comment = np.full(n, None, dtype=object)
        numbers = np.fromiter(self.comments, dtype=np.int64, count=len(self.comments))
        pos = np.searchsorted(index, numbers)
        here = (pos < n) & (index[np.minimum(pos, n - 1)] == numbers)
        texts = list(self.comments.values())
        comment[pos[here]] = [texts[i] for i in np.flatnonzero(here)]
        for k in numbers[here].tolist():
            del self.comments[k]
        return pd.array(comment, dtype="string")


def _addr_keys(ver: np.ndarray, addr: np.ndarray) -> np.ndarray:
    return np.concatenate([ver.astype(np.uint8)[:, None], addr], axis=1)


def iter_decoded(path, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None,
                 engine: str = "auto") -> Iterator[tuple[CaptureReader, RecordBatch, DecodeContext]]:
    """Decode a capture batch by batch (bounded memory): yields (reader, batch, decoded context). `path` is a file
    or the rotated files of one point in order; frame numbers continue from file to file as in `PacketStream`
    (`reader.index_offset`)."""
    offset = 0
    for p in [path] if isinstance(path, (str, os.PathLike)) else list(path):
        reader = CaptureReader(p, config, name=name)
        reader.index_offset = offset
        last = offset
        for batch in reader:
            link_types = np.array([i.link_type for i in reader.info.interfaces] or [-1], dtype=np.int64)
            for lo in range(0, len(batch), config.batch_packets):
                part = _slice(batch, lo, lo + config.batch_packets)
                yield reader, part, decode_batch(part, link_types, config, engine=engine)
            if len(batch):
                last = max(last, int(batch.frame_numbers()[-1]) + offset)
        offset = last


def _slice(b: RecordBatch, lo: int, hi: int) -> RecordBatch:
    if lo == 0 and hi >= len(b):
        return b
    numbers = b.frame_numbers()[lo:hi]
    return RecordBatch(b.buf, b.data_off[lo:hi], b.caplen[lo:hi], b.origlen[lo:hi], b.ts_ns[lo:hi], b.iface[lo:hi],
                       int(numbers[0]), b.file_offset,
                       {k - lo: v for k, v in b.comments.items() if lo <= k < hi},
                       {k - lo: v for k, v in b.pkt_flags.items() if lo <= k < hi}, numbers)


class PacketStream:
    """The packets table of one capture point as a sequence of tables of about `rows` rows each, so that memory
    stays bounded whatever the capture's size (streaming form of `decode_capture`):

        stream = PacketStream("big.pcap")
        for part in stream:          # pandas DataFrames with the packets schema, in frame order
            ...
        stream.anomalies, stream.info   # complete once the iteration has finished

    Category codes are stable from part to part (each part's categories are those seen so far). `path` is a file
    or the rotated files of one point in order; `on_batch` as in `decode_capture`."""

    def __init__(self, path, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None,
                 rows: int | None = 1 << 18,
                 on_batch: Callable[[CaptureReader, RecordBatch, DecodeContext], None] | None = None) -> None:
        self.paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.config = config
        self.name = name
        self.rows = rows
        self.on_batch = on_batch
        self.info: CaptureInfo | None = None
        self.anomalies = tables.empty("anomalies")

    def __iter__(self) -> Iterator[pd.DataFrame]:
        config = self.config
        cols = None
        infos: list[CaptureInfo] = []
        rows: list[tuple] = []
        pending = 0
        sizes = [_size(p) for p in self.paths]
        before = 0                 # bytes of the files already read
        seen = 0                   # rows decoded so far
        for file_no, p in enumerate(self.paths):
            reader = CaptureReader(p, config, name=self.name)
            if cols is None:
                cols = PacketColumns(reader.info.name, reader.info)
            else:
                cols.next_file(reader.info)
            reader.index_offset = cols.index_offset
            for batch in reader:
                link_types = np.array([i.link_type for i in reader.info.interfaces] or [-1], dtype=np.int64)
                for lo in range(0, len(batch), config.batch_packets):
                    part = _slice(batch, lo, lo + config.batch_packets)
                    n = len(part)
                    if self.rows is not None:
                        capacity = self.rows + config.batch_packets
                    else:                  # the rows still to come, estimated from the bytes read so far
                        done = before + part.file_offset + int(part.data_off[-1]) + int(part.caplen[-1])
                        capacity = n + config.batch_packets + int(
                            max(sum(sizes) - done, 0) * 1.1 * (seen + n) / max(done, 1))
                    ctx = decode_batch(part, link_types, config, wide=cols.reserve(n, capacity))
                    cols.add(part, ctx, reader.info)
                    seen += n
                    if self.on_batch is not None:
                        self.on_batch(reader, part, ctx)
                    del ctx
                    pending += len(part)
                    if self.rows is not None and pending >= self.rows:
                        pending = 0
                        yield cols.packets()
            info = reader.info
            infos.append(info)
            before += sizes[file_no]
            rows += [(cols.name, None if i is None else i + reader.index_offset, layer, kind, detail)
                     for i, layer, kind, detail in info.anomalies]
        rows += [(cols.name, i, layer, kind, detail) for i, layer, kind, detail in cols.anomalies]
        self.info = _merge_infos(infos, cols.name)
        self.anomalies = anomalies_frame(rows)
        if pending or self.rows is None:
            yield cols.packets()


def _int_block(rows: int, cols: int) -> np.ndarray:
    """An uninitialised (rows, cols) int64 block in its own private anonymous mapping. Only the pages written
    are committed, so a block sized from an estimate costs address space only; they are ordinary pages
    (numpy's allocator asks for transparent huge pages, which would commit up to 2 MB past the rows in use of
    every column: measured, huge pages cut the page faults by 3x but not the time, which goes to zeroing the
    memory)."""
    import mmap

    mm = mmap.mmap(-1, max(rows * cols * 8, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, dtype=np.int64, count=rows * cols).reshape(rows, cols)


def _size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def decode_capture(path, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None,
                   on_batch: Callable[[CaptureReader, RecordBatch, DecodeContext], None] | None = None
                   ) -> CaptureDecode:
    """Decode one capture point completely: a file, or the rotated files of one point in order (frame numbers
    continue from file to file). `on_batch(reader, batch, ctx)` sees every decoded batch while its buffer is
    valid (the stream stages take their TCP segments there); `reader.index_offset` is what to add to the
    batch's frame numbers. The whole packets table is in memory: `PacketStream` is the bounded-memory form."""
    stream = PacketStream(path, config, name=name, rows=None, on_batch=on_batch)
    parts = list(stream)
    return CaptureDecode(info=stream.info, packets=parts[0], anomalies=stream.anomalies)


def write_packets(paths, out: str | os.PathLike, config: DecodeConfig = DEFAULT_CONFIG, jobs: int | None = 1,
                  columns: list[str] | None = None, rows: int = 1 << 18) -> tuple[int, pd.DataFrame]:
    """Stream the packets table of captures to Parquet with bounded memory (`hbonecap decode -f parquet -o`).

    `paths`: files, globs or directories, grouped into capture points as `analyze` does. `out`: one Parquet file
    (the points one after the other, one row group per part), or, when it is a directory (existing, or written
    with a trailing slash), one file per capture point, `DIR/<capture>.parquet`, written by `jobs` processes
    (None: one per core); `pandas.read_parquet(DIR)` reads them back as one table. Returns (rows written, the
    anomalies table). Raises CaptureError for a file that is not a capture (a partial output is removed)."""
    from hbonecap.api import _unique_names, expand_paths, group_rotated
    from hbonecap.errors import HbonecapError

    files = expand_paths(paths)
    if not files:
        raise HbonecapError("no capture files given")
    groups = group_rotated(files)
    names = _unique_names([g[0] for g in groups])
    points = [(members if len(members) > 1 else members[0], names[base]) for base, members in groups]
    target = Path(out)
    if not (target.is_dir() or str(out).endswith(("/", os.sep))):
        return _write_points(points, target, config, columns, rows)
    target.mkdir(parents=True, exist_ok=True)
    jobs = (os.cpu_count() or 1) if jobs is None else max(1, jobs)
    work = [([pt], target / f"{pt[1]}.parquet", config, columns, rows) for pt in points]
    if jobs > 1 and len(work) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(work))) as ex:
            done = [f.result() for f in [ex.submit(_write_points, *w) for w in work]]
    else:
        done = [_write_points(*w) for w in work]
    return sum(n for n, _ in done), tables.concat("anomalies", [a for _, a in done])


def _write_points(points: list[tuple], path: Path, config: DecodeConfig, columns: list[str] | None, rows: int
                  ) -> tuple[int, pd.DataFrame]:
    """The packets of `points` ((path or rotated paths, name) each) into one Parquet file, part by part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    schema = None
    written = 0
    anomalies = []
    try:
        for source, name in points:
            stream = PacketStream(source, config, name=name, rows=rows)
            for part in stream:
                if columns:
                    part = part[columns]
                if schema is None:
                    schema = _parquet_schema(part)
                    writer = pq.ParquetWriter(str(path), schema, use_dictionary=_dictionary_columns(schema))
                if len(part):
                    writer.write_table(pa.Table.from_pandas(part, preserve_index=False).cast(schema))
                    written += len(part)
                del part
            anomalies.append(stream.anomalies)
        if writer is None:                     # no capture point at all: an empty table with the schema
            empty = tables.empty("packets")
            empty = empty[columns] if columns else empty
            schema = _parquet_schema(empty)
            writer = pq.ParquetWriter(str(path), schema, use_dictionary=_dictionary_columns(schema))
    except BaseException:
        if writer is not None:
            writer.close()
        Path(path).unlink(missing_ok=True)
        raise
    writer.close()
    return written, tables.concat("anomalies", anomalies)


def _dictionary_columns(schema) -> list[str]:
    """Parquet dictionary encoding for the categorical columns only: on counters and timestamps it costs a third
    of the write time and saves nothing."""
    import pyarrow as pa

    return [f.name for f in schema if pa.types.is_dictionary(f.type)]


def _parquet_schema(frame: pd.DataFrame):
    """The Arrow schema of a packets part, with every categorical column as dictionary<int32, string> so that parts
    whose categories grew still share one schema."""
    import pyarrow as pa

    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    for i, f in enumerate(schema):
        if pa.types.is_dictionary(f.type):
            schema = schema.set(i, pa.field(f.name, pa.dictionary(pa.int32(), pa.string()), f.nullable))
        elif pa.types.is_large_string(f.type):
            schema = schema.set(i, pa.field(f.name, pa.string(), f.nullable))
    return schema


def _merge_infos(infos: list[CaptureInfo], name: str) -> CaptureInfo:
    if len(infos) == 1:
        return infos[0]
    first = infos[0]
    return CaptureInfo(
        path=";".join(i.path for i in infos), name=name, format=first.format, compressed=first.compressed,
        interfaces=[x for i in infos for x in i.interfaces], comments=[c for i in infos for c in i.comments],
        secrets=[x for i in infos for x in i.secrets], anomalies=[a for i in infos for a in i.anomalies],
        packets=sum(i.packets for i in infos), size=sum(i.size for i in infos),
        sections=sum(i.sections for i in infos))


def anomalies_frame(rows: list[tuple]) -> pd.DataFrame:
    if not rows:
        return tables.empty("anomalies")
    capture, index, layer, kind, detail = zip(*rows)
    return tables.frame("anomalies", {
        "capture": list(capture), "index": pd.array([pd.NA if i is None else i for i in index], dtype="Int64"),
        "layer": list(layer), "kind": list(kind), "detail": list(detail)})


def tcp_segment_rows(ctx: DecodeContext, with_pure_acks: bool = False) -> np.ndarray:
    """Rows of a decoded batch that are TCP segments for the stream stages: TCP with a payload offset, and without
    pure ACKs (no payload, no SYN/FIN/RST) unless asked."""
    tcp = (ctx.proto >> 16) == K.P_TCP
    tcp &= ctx.payload_off >= 0
    if not with_pure_acks:
        tcp &= (ctx.payload_len > 0) | ((ctx.tcp_flags & 0x07) != 0)
    return np.flatnonzero(tcp)


class SegmentText:
    """Encapsulation and address text of some rows of a decoded batch, as the packets table writes them; each
    distinct key is turned into text once. `keys[k]` is row k's encapsulation key (depth, type, vni, ...)."""

    def __init__(self, ctx: DecodeContext, rows: np.ndarray) -> None:
        d = ctx.config.max_tunnel_depth
        self.ctx = ctx
        self.keys = np.zeros((len(rows), 1 + 2 * d), dtype=np.int64)
        self.keys[:, 0] = ctx.depth[rows]
        self.keys[:, 1::2] = ctx.tun_type[rows]
        self.keys[:, 2::2] = ctx.tun_vni[rows]
        self._enc: dict[bytes, str] = {}
        self._addr: dict[bytes, str | None] = {}

    def encap(self, k: int) -> str:
        key = self.keys[k].tobytes()
        enc = self._enc.get(key)
        if enc is None:
            enc = self._enc[key] = _encap(key)
        return enc

    def endpoints(self, i: int) -> tuple[str | None, str | None]:
        """Source and destination address text of batch row i."""
        ctx = self.ctx
        v = bytes([int(ctx.ipver[i])])
        out = []
        for key in (v + ctx.src[i].tobytes(), v + ctx.dst[i].tobytes()):
            if key not in self._addr:
                self._addr[key] = _address(key)
            out.append(self._addr[key])
        return out[0], out[1]


def segments_of_batch(capture: str, batch: RecordBatch, ctx: DecodeContext, with_pure_acks: bool = False,
                      index_offset: int = 0):
    """TcpSegment objects for the TCP packets of one decoded batch (see hbonecap.layers.segments)."""
    from hbonecap.layers.segments import TcpSegment

    idx = tcp_segment_rows(ctx, with_pure_acks)
    if not len(idx):
        return
    text = SegmentText(ctx, idx)
    buf = batch.buf
    numbers = batch.frame_numbers() + index_offset
    for k, i in enumerate(idx.tolist()):
        s, dd = text.endpoints(i)
        start = int(batch.data_off[i] + ctx.payload_off[i])
        plen = int(ctx.payload_len[i])
        end = min(start + plen, int(batch.data_off[i] + batch.caplen[i]))
        yield TcpSegment(capture, int(numbers[i]), int(batch.ts_ns[i]), text.encap(k), s, int(ctx.sport[i]), dd,
                         int(ctx.dport[i]), int(ctx.tcp_flags[i]), int(ctx.seq[i]), int(ctx.ack[i]),
                         buf[start:max(start, end)].tobytes(), plen)

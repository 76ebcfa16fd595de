"""Decoding one capture into columns: container walk, vectorised layer walk, then the packets and anomalies
tables. This is the pure per-capture function that every front end (API, CLI, process pool) calls.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from hbonecap import tables
from hbonecap.capture.reader import CaptureInfo, CaptureReader, read_secrets, redact_secrets  # noqa: F401
from hbonecap.capture.records import RecordBatch
from hbonecap.config import DEFAULT_CONFIG, LINKTYPE_NAMES, DecodeConfig
from hbonecap.layers import context as K
from hbonecap.layers.context import DecodeContext
from hbonecap.layers.unwrap import decode_batch

PROTO_NAMES = {K.P_TCP: "tcp", K.P_UDP: "udp", K.P_ICMP: "icmp", K.P_ICMPV6: "icmpv6", K.P_ARP: "arp",
               K.P_LLC: "llc", K.P_NETLINK: "netlink"}
TUNNEL_NAMES = {K.TUN_GENEVE: "geneve", K.TUN_VXLAN: "vxlan"}


class Interner:
    """Maps row keys (bytes) to category codes that stay stable across batches."""

    def __init__(self, to_str: Callable[[bytes], str | None]) -> None:
        self.to_str = to_str
        self.by_key: dict[bytes, int] = {}
        self.by_str: dict[str, int] = {}
        self.values: list[str] = []

    def encode(self, keys: np.ndarray) -> np.ndarray:
        """keys: (n, w) uint8 rows or (n,) integers; returns int32 codes (-1 where to_str gives None).

        Rows are factorised by hashing (pandas.factorize), column word by column word, so the cost is linear in
        the number of packets; only the distinct keys reach Python."""
        codes, first = _row_codes(keys)
        local = np.empty(len(first), dtype=np.int32)
        for j, pos in enumerate(first.tolist()):
            kb = keys[pos].tobytes() if keys.ndim == 2 else int(keys[pos]).to_bytes(8, "little", signed=True)
            c = self.by_key.get(kb)
            if c is None:
                s = self.to_str(kb if keys.ndim == 2 else int(keys[pos]))
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
        return pd.Categorical.from_codes(codes, categories=pd.Index(self.values, dtype=object))


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


def _address(key: bytes) -> str | None:
    v = key[0]
    if v == 4:
        return str(ipaddress.IPv4Address(key[1:5]))
    if v == 6:
        return str(ipaddress.IPv6Address(key[1:17]))
    return None


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


def _encap(key: bytes) -> str:
    a = np.frombuffer(key, dtype=np.int64)
    depth = int(a[0])
    parts = []
    for d in range(depth):
        parts.append(f"{TUNNEL_NAMES.get(int(a[1 + 2 * d]), '?')}:{int(a[2 + 2 * d])}")
    return "/".join(parts)


INT_COLUMNS = ("ifindex", "pkttype", "vlan", "vni", "tunnel_options", "outer_sport", "outer_dport", "ip_version",
               "ttl", "ip_id", "sport", "dport", "tcp_flags", "seq", "ack", "win", "mss", "wscale", "sack_blocks",
               "tsval", "tsecr", "icmp_type", "icmp_code", "payload_len", "payload_offset")


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
        numbers = batch.frame_numbers() + self.index_offset
        self.last_index = max(self.last_index, int(numbers[-1]))
        self._add("index", numbers)
        self._add("ts", batch.ts_ns)
        ikey = batch.iface.astype(np.int64) + (self.file_no << 20)
        self._add("interface", self.iface.encode(ikey))
        self._add("link_type", self.link.encode(ikey))
        self._add("src", self.addr.encode(_addr_keys(ctx.ipver, ctx.src)))
        self._add("dst", self.addr.encode(_addr_keys(ctx.ipver, ctx.dst)))
        self._add("outer_src", self.addr.encode(_addr_keys(ctx.outer_ipver, ctx.outer_src)))
        self._add("outer_dst", self.addr.encode(_addr_keys(ctx.outer_ipver, ctx.outer_dst)))
        d = ctx.config.max_tunnel_depth
        ek = np.zeros((n, 1 + 2 * d), dtype=np.int64)
        ek[:, 0] = ctx.depth
        ek[:, 1::2] = ctx.tun_type
        ek[:, 2::2] = ctx.tun_vni
        self._add("encap", self.encap.encode(ek.view(np.uint8).reshape(n, -1)))
        self._add("proto", self.proto.encode(ctx.proto))
        inner = np.where(ctx.depth > 0, ctx.tun_vni[np.arange(n), np.maximum(ctx.depth.astype(np.int64) - 1, 0)], -1)
        self._add("vni", inner)
        self._add("ip_version", np.where(ctx.ipver > 0, ctx.ipver, -1))
        for col, arr in (("ifindex", ctx.ifindex), ("pkttype", ctx.pkttype), ("vlan", ctx.vlan),
                         ("tunnel_options", ctx.tun_options), ("outer_sport", ctx.outer_sport),
                         ("outer_dport", ctx.outer_dport), ("ttl", ctx.ttl), ("ip_id", ctx.ip_id),
                         ("sport", ctx.sport), ("dport", ctx.dport), ("tcp_flags", ctx.tcp_flags), ("seq", ctx.seq),
                         ("ack", ctx.ack), ("win", ctx.win), ("mss", ctx.mss), ("wscale", ctx.wscale),
                         ("sack_permitted", ctx.sack_permitted), ("sack_blocks", ctx.sack_blocks),
                         ("tsval", ctx.tsval), ("tsecr", ctx.tsecr), ("icmp_type", ctx.icmp_type),
                         ("icmp_code", ctx.icmp_code), ("payload_len", ctx.payload_len),
                         ("payload_offset", ctx.payload_off)):
            self._add(col, arr)
        self._add("length", batch.origlen)
        self._add("caplen", batch.caplen)
        self._add("frame_offset", batch.data_off + batch.file_offset)
        for pos, text in batch.comments.items():
            self.comments[int(numbers[pos])] = redact_secrets(text)
        for sel, layer, kind, detail in ctx.anomalies:
            idx = numbers[sel]
            if isinstance(detail, str):
                self.anomalies.extend((int(i), layer, kind, detail) for i in idx)
            else:
                self.anomalies.extend((int(i), layer, kind, str(dt)) for i, dt in zip(idx, detail))

    def packets(self) -> pd.DataFrame:
        if not self.parts:
            return tables.empty("packets")
        cat = lambda c: np.concatenate(self.parts[c])  # noqa: E731
        index = cat("index")
        n = len(index)
        out: dict[str, object] = {}
        out["capture"] = pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[self.name])
        out["index"] = index
        ts = cat("ts")
        out["ts"] = pd.Series(ts.view("datetime64[ns]")).dt.tz_localize("UTC")
        for col, interner in (("interface", self.iface), ("link_type", self.link), ("encap", self.encap),
                              ("outer_src", self.addr), ("outer_dst", self.addr), ("src", self.addr),
                              ("dst", self.addr), ("proto", self.proto)):
            out[col] = interner.categorical(cat(col))
        for col in INT_COLUMNS:
            v = cat(col).astype(np.int64)
            out[col] = pd.arrays.IntegerArray(v, v < 0)
        sp = cat("sack_permitted")
        out["sack_permitted"] = pd.arrays.BooleanArray(sp == 1, sp < 0)
        for col in ("length", "caplen", "frame_offset"):
            out[col] = cat(col)
        comment = np.full(n, None, dtype=object)
        if self.comments:
            pos = np.searchsorted(index, np.fromiter(self.comments, dtype=np.int64))
            comment[pos] = list(self.comments.values())
        out["comment"] = pd.array(comment, dtype="string")
        df = pd.DataFrame({c: out[c] for c in tables.columns("packets")})
        return df


def _addr_keys(ver: np.ndarray, addr: np.ndarray) -> np.ndarray:
    return np.concatenate([ver.astype(np.uint8)[:, None], addr], axis=1)


def iter_decoded(path: str | os.PathLike, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None,
                 engine: str = "auto") -> Iterator[tuple[CaptureReader, RecordBatch, DecodeContext]]:
    """Decode a capture batch by batch (bounded memory): yields (reader, batch, decoded context)."""
    reader = CaptureReader(path, config, name=name)
    for batch in reader:
        link_types = np.array([i.link_type for i in reader.info.interfaces] or [-1], dtype=np.int64)
        for lo in range(0, len(batch), config.batch_packets):
            part = _slice(batch, lo, lo + config.batch_packets)
            yield reader, part, decode_batch(part, link_types, config, engine=engine)


def _slice(b: RecordBatch, lo: int, hi: int) -> RecordBatch:
    if lo == 0 and hi >= len(b):
        return b
    numbers = b.frame_numbers()[lo:hi]
    return RecordBatch(b.buf, b.data_off[lo:hi], b.caplen[lo:hi], b.origlen[lo:hi], b.ts_ns[lo:hi], b.iface[lo:hi],
                       int(numbers[0]), b.file_offset,
                       {k - lo: v for k, v in b.comments.items() if lo <= k < hi},
                       {k - lo: v for k, v in b.pkt_flags.items() if lo <= k < hi}, numbers)


def decode_capture(path, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None,
                   on_batch: Callable[[CaptureReader, RecordBatch, DecodeContext], None] | None = None
                   ) -> CaptureDecode:
    """Decode one capture point completely: a file, or the rotated files of one point in order (frame numbers
    continue from file to file). `on_batch(reader, batch, ctx)` sees every decoded batch while its buffer is
    valid (the stream stages take their TCP segments there); `reader.index_offset` is what to add to the
    batch's frame numbers."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    cols = None
    infos: list[CaptureInfo] = []
    rows: list[tuple] = []
    for p in paths:
        reader = CaptureReader(p, config, name=name)
        if cols is None:
            cols = PacketColumns(reader.info.name, reader.info)
        else:
            cols.next_file(reader.info)
        reader.index_offset = cols.index_offset
        for batch in reader:
            link_types = np.array([i.link_type for i in reader.info.interfaces] or [-1], dtype=np.int64)
            for lo in range(0, len(batch), config.batch_packets):
                part = _slice(batch, lo, lo + config.batch_packets)
                ctx = decode_batch(part, link_types, config)
                cols.add(part, ctx, reader.info)
                if on_batch is not None:
                    on_batch(reader, part, ctx)
        info = reader.info
        infos.append(info)
        rows += [(cols.name, None if i is None else i + reader.index_offset, layer, kind, detail)
                 for i, layer, kind, detail in info.anomalies]
    rows += [(cols.name, i, layer, kind, detail) for i, layer, kind, detail in cols.anomalies]
    return CaptureDecode(info=_merge_infos(infos, cols.name), packets=cols.packets(), anomalies=anomalies_frame(rows))


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


def segments_of_batch(capture: str, batch: RecordBatch, ctx: DecodeContext, with_pure_acks: bool = False,
                      index_offset: int = 0):
    """TcpSegment objects for the TCP packets of one decoded batch (see hbonecap.layers.segments)."""
    from hbonecap.layers.segments import TcpSegment

    tcp = (ctx.proto >> 16) == K.P_TCP
    tcp &= ctx.payload_off >= 0
    if not with_pure_acks:
        tcp &= (ctx.payload_len > 0) | ((ctx.tcp_flags & 0x07) != 0)
    idx = np.flatnonzero(tcp)
    if not len(idx):
        return
    n = len(batch)
    d = ctx.config.max_tunnel_depth
    ek = np.zeros((n, 1 + 2 * d), dtype=np.int64)
    ek[:, 0] = ctx.depth
    ek[:, 1::2] = ctx.tun_type
    ek[:, 2::2] = ctx.tun_vni
    enc_cache: dict[bytes, str] = {}
    addr_cache: dict[bytes, str] = {}
    buf = batch.buf
    numbers = batch.frame_numbers() + index_offset
    for i in idx.tolist():
        ekey = ek[i].tobytes()
        enc = enc_cache.get(ekey)
        if enc is None:
            enc = enc_cache[ekey] = _encap(ekey)
        v = int(ctx.ipver[i])
        sk = bytes([v]) + ctx.src[i].tobytes()
        dk = bytes([v]) + ctx.dst[i].tobytes()
        s = addr_cache.get(sk) or addr_cache.setdefault(sk, _address(sk))
        dd = addr_cache.get(dk) or addr_cache.setdefault(dk, _address(dk))
        start = int(batch.data_off[i] + ctx.payload_off[i])
        plen = int(ctx.payload_len[i])
        end = min(start + plen, int(batch.data_off[i] + batch.caplen[i]))
        yield TcpSegment(capture, int(numbers[i]), int(batch.ts_ns[i]), enc, s, int(ctx.sport[i]), dd,
                         int(ctx.dport[i]), int(ctx.tcp_flags[i]), int(ctx.seq[i]), int(ctx.ack[i]),
                         buf[start:max(start, end)].tobytes(), plen)

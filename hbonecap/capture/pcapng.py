"""pcapng files: https://datatracker.ietf.org/doc/draft-ietf-opsawg-pcapng/ (sections 3-4).

Strategy: a sans-I/O block walker. `PcapngWalker.walk(buf, pos, ...)` handles every block that lies wholly in the
buffer: Section Header (byte order, version 1.x; 2.0 and others are rejected), Interface Description
(link type, snaplen, if_name, if_description, if_tsresol, if_tsoffset), Enhanced / Simple / obsolete Packet
blocks (with opt_comment and epb_flags), Decryption Secrets (kept for the TLS stage; never shown), and skips
Name Resolution, Interface Statistics, custom and unknown blocks by length. Several sections and interfaces
with different link types are supported; interface ids are made global across sections.
Runs of Enhanced Packet Blocks that need nothing but their fixed fields and epb_flags (no comment, no malformed
option or length) are read by a compiled loop (`fastwalk.pcapng_epbs`, 5x faster on a 1M-packet file); any other
block, and any EPB it declines, is read here, so anomalies come from one place (tests/test_pcapng_walk.py checks
the two readings against each other).
Limits: a block whose length fields are impossible ends the walk with an anomaly, since pcapng has no
resynchronisation marker inside a section; a truncated last block keeps a packet's captured prefix.
"""
from __future__ import annotations

import struct

import numpy as np

from hbonecap.capture.records import NO_TS, Interface, RecordBatch, empty_batch
from hbonecap.errors import CaptureError

SHB = 0x0A0D0D0A
IDB = 0x00000001
OPB = 0x00000002
SPB = 0x00000003
EPB = 0x00000006
DSB = 0x0000000A
CUSTOM_BLOCKS = (0x00000BAD, 0x40000BAD)  # Wireshark numbers these as frames too
BOM = 0x1A2B3C4D
SECRETS_TLS_KEYLOG = 0x544C534B
MAX_OPTIONS = 4096


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class PcapngWalker:
    """Walks the blocks of one pcapng stream."""

    def __init__(self, name: str, max_record: int) -> None:
        self.name = name
        self.max_record = max_record
        self.format = "pcapng"
        self.interfaces: list[Interface] = []
        self.section_ifaces: list[int] = []     # local interface id -> global index, current section
        self.comments: list[str] = []
        self.secrets: list[bytes] = []
        self.anomalies: list[tuple] = []
        self.next_index = 1
        self.finished = False
        self.sections = 0
        self._e = "<"

    def start(self, buf: bytes) -> int:
        if len(buf) < 12:
            raise CaptureError(self.name, f"truncated pcapng section header ({len(buf)} bytes)")
        return 0

    # -- options ---------------------------------------------------------------------------------------------
    def _options(self, buf, start: int, end: int, index=None):
        e = self._e
        out = []
        p = start
        for _ in range(MAX_OPTIONS):
            if p + 4 > end:
                break
            code, length = struct.unpack_from(e + "HH", buf, p)
            if code == 0:
                break
            if p + 4 + length > end:
                self.anomalies.append((index, "capture", "pcapng_bad_option",
                                       f"option {code} of {length} bytes runs past its block"))
                break
            out.append((code, bytes(buf[p + 4:p + 4 + length])))
            p += 4 + _pad4(length)
        return out

    def _section(self, buf, p: int, blen: int) -> None:
        major, minor = struct.unpack_from(self._e + "HH", buf, p + 12)
        if major != 1:
            if self.sections == 0:
                raise CaptureError(self.name, f"unsupported pcapng version {major}.{minor}")
            self.anomalies.append((None, "capture", "pcapng_bad_version",
                                   f"section {self.sections + 1} has version {major}.{minor}; the rest is not read"))
            self.finished = True
            return
        self.sections += 1
        self.section_ifaces = []
        for code, val in self._options(buf, p + 24, p + blen - 4):
            if code == 1:
                self.comments.append(val.decode("utf-8", "replace"))

    def _interface(self, buf, p: int, blen: int) -> None:
        if blen < 20:
            self.anomalies.append((None, "capture", "pcapng_bad_block", "interface block shorter than 20 bytes"))
            return
        link, _res, snap = struct.unpack_from(self._e + "HHI", buf, p + 8)
        iface = Interface(link_type=link, snaplen=snap)
        for code, val in self._options(buf, p + 16, p + blen - 4):
            if code == 2:
                iface.name = val.decode("utf-8", "replace")
            elif code == 3:
                iface.description = val.decode("utf-8", "replace")
            elif code == 9 and val:
                r = val[0]
                iface.ts_base, iface.ts_exp = (2, r & 0x7F) if r & 0x80 else (10, r)
            elif code == 14 and len(val) == 8:
                (iface.ts_offset_s,) = struct.unpack(self._e + "q", val)
        self.section_ifaces.append(len(self.interfaces))
        self.interfaces.append(iface)

    # -- walk ------------------------------------------------------------------------------------------------
    def walk(self, buf, pos: int, file_offset: int, final: bool, reference: bool = False
             ) -> tuple[int, RecordBatch]:
        """Blocks wholly inside buf[pos:]; returns (new position, batch). Runs of plain Enhanced Packet Blocks
        (the bulk of a capture) are read by the compiled walker (`fastwalk.pcapng_epbs`), every other block and
        every EPB it declines here; `reference=True` reads everything here (the oracle of the tests)."""
        end = len(buf)
        arr = None if reference else np.frombuffer(buf, dtype=np.uint8)
        chunks: list[np.ndarray] = []   # (7, k) int64 runs: offset, caplen, origlen, ts high, ts low, iface, number
        base = 0                        # packets of this batch in chunks (the lists below follow them)
        offs: list[int] = []
        caps: list[int] = []
        origs: list[int] = []
        his: list[int] = []
        los: list[int] = []
        ifs: list[int] = []
        comments: dict[int, str] = {}
        flags: dict[int, int] = {}
        nums: list[int] = []
        self._nums = nums
        p = pos
        u32 = struct.Struct(self._e + "I").unpack_from
        epb = struct.Struct(self._e + "IIIII").unpack_from
        while p + 12 <= end and not self.finished:
            (btype,) = struct.unpack_from("<I", buf, p)
            if btype == SHB:
                (bom,) = struct.unpack_from("<I", buf, p + 8)
                if bom == BOM:
                    self._e = "<"
                elif bom == 0x4D3C2B1A:
                    self._e = ">"
                else:
                    if self.sections == 0:
                        raise CaptureError(self.name, "pcapng section header has no valid byte-order magic")
                    self.anomalies.append((None, "capture", "pcapng_bad_section", "bad byte-order magic"))
                    self.finished = True
                    break
                if offs or base:   # byte order may change: finish this batch first
                    break
                u32 = struct.Struct(self._e + "I").unpack_from
                epb = struct.Struct(self._e + "IIIII").unpack_from
            elif self.sections == 0:
                raise CaptureError(self.name, "not a pcapng file (no section header block first)")
            else:
                (btype,) = u32(buf, p)
                if btype == EPB and arr is not None and self.section_ifaces:
                    run, q = self._epb_run(arr, p, flags, base + len(offs))
                    if q > p:
                        if offs:
                            chunks.append(self._chunk(offs, caps, origs, his, los, ifs, nums))
                            base += len(offs)
                            offs, caps, origs, his, los, ifs = [], [], [], [], [], []
                            nums = self._nums = []
                        chunks.append(run)
                        base += run.shape[1]
                        p = q
                        continue
            (blen,) = u32(buf, p + 4)
            if blen < 12 or blen % 4 or blen > self.max_record + 64:
                if self.sections == 0:
                    raise CaptureError(self.name, f"pcapng section header with impossible length {blen}")
                self.anomalies.append((self.next_index, "capture", "pcapng_bad_block",
                                       f"block at file offset {file_offset + p} has impossible length {blen}; "
                                       "the rest of the file cannot be read"))
                self.finished = True
                break
            if p + blen > end:
                if final:
                    self._truncated(buf, p, end, btype, offs, caps, origs, his, los, ifs, epb)
                break
            (tail,) = u32(buf, p + blen - 4)
            if tail != blen:
                self.anomalies.append((None, "capture", "pcapng_length_mismatch",
                                       f"block at file offset {file_offset + p}: lengths {blen} and {tail} differ"))
            if btype == EPB and blen >= 32:
                iface, hi, lo, cap, orig = epb(buf, p + 8)
                idx = self.next_index
                self.next_index += 1
                if iface >= len(self.section_ifaces):
                    self.anomalies.append((idx, "capture", "pcapng_bad_interface",
                                           f"packet names interface {iface}, the section has {len(self.section_ifaces)}"))
                    p += blen
                    continue
                room = blen - 32
                if cap > room:
                    self.anomalies.append((idx, "capture", "pcapng_bad_block",
                                           f"captured length {cap} exceeds its block ({room})"))
                    cap = room
                optstart = p + 28 + _pad4(cap)
                if optstart < p + blen - 4:
                    for code, val in self._options(buf, optstart, p + blen - 4, idx):
                        if code == 1:
                            comments[base + len(offs)] = val.decode("utf-8", "replace")
                        elif code == 2 and len(val) == 4:
                            flags[base + len(offs)] = struct.unpack(self._e + "I", val)[0]
                nums.append(idx)
                offs.append(p + 28)
                caps.append(cap)
                origs.append(orig)
                his.append(hi)
                los.append(lo)
                ifs.append(self.section_ifaces[iface])
            elif btype in CUSTOM_BLOCKS:
                self.next_index += 1
            elif btype == SHB:
                if blen < 28:
                    raise CaptureError(self.name, "pcapng section header shorter than 28 bytes")
                self._section(buf, p, blen)
            elif btype == IDB:
                self._interface(buf, p, blen)
            elif btype == SPB and blen >= 16:
                idx = self.next_index
                self.next_index += 1
                if not self.section_ifaces:
                    self.anomalies.append((idx, "capture", "pcapng_bad_interface", "simple packet block without interface"))
                else:
                    nums.append(idx)
                    (orig,) = u32(buf, p + 8)
                    g = self.section_ifaces[0]
                    snap = self.interfaces[g].snaplen or orig
                    cap = min(orig, snap, blen - 16)
                    offs.append(p + 12)
                    caps.append(cap)
                    origs.append(orig)
                    his.append(-1)
                    los.append(-1)
                    ifs.append(g)
            elif btype == OPB and blen >= 32:
                iface, _drops = struct.unpack_from(self._e + "HH", buf, p + 8)
                hi, lo, cap, orig = struct.unpack_from(self._e + "IIII", buf, p + 12)
                idx = self.next_index
                self.next_index += 1
                if iface >= len(self.section_ifaces):
                    self.anomalies.append((idx, "capture", "pcapng_bad_interface", f"packet names interface {iface}"))
                else:
                    nums.append(idx)
                    offs.append(p + 28)
                    caps.append(min(cap, blen - 32))
                    origs.append(orig)
                    his.append(hi)
                    los.append(lo)
                    ifs.append(self.section_ifaces[iface])
            elif btype == DSB and blen >= 20:
                stype, slen = struct.unpack_from(self._e + "II", buf, p + 8)
                if stype == SECRETS_TLS_KEYLOG and 16 + slen <= blen - 4:
                    self.secrets.append(bytes(buf[p + 16:p + 16 + slen]))
                else:
                    self.anomalies.append((None, "capture", "pcapng_secrets_unsupported",
                                           f"decryption secrets of type {stype:#x} are not used"))
            p += blen
        if final and not self.finished:
            if p < end and p + 12 > end:
                self.anomalies.append((None, "capture", "capture_trailing_bytes",
                                       f"{end - p} bytes after the last block are not a block header"))
                self.finished = True
            elif p >= end:
                self.finished = True
        if self.finished:
            p = end
        if offs or not chunks:
            chunks.append(self._chunk(offs, caps, origs, his, los, ifs, nums))
        cols = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)
        return p, self._batch(buf, file_offset, cols, comments, flags)

    def _epb_run(self, arr: np.ndarray, p: int, flags: dict, at: int) -> tuple[np.ndarray, int]:
        """The compiled walker's run of plain EPBs from p, as a (7, k) chunk; epb_flags go to `flags`."""
        from hbonecap.capture.fastwalk import pcapng_epbs

        out, q = pcapng_epbs(arr, p, self._e == ">", len(self.section_ifaces), self.max_record + 64, MAX_OPTIONS)
        k = out.shape[1]
        if not k:
            return out, p
        out[5] = np.asarray(self.section_ifaces, dtype=np.int64)[out[5]]
        for i in np.flatnonzero(out[6] >= 0).tolist():
            flags[at + i] = int(out[6, i])
        out[6] = np.arange(self.next_index, self.next_index + k)    # the flags row becomes the frame numbers
        self.next_index += k
        return out, q

    @staticmethod
    def _chunk(offs, caps, origs, his, los, ifs, nums) -> np.ndarray:
        return np.array([offs, caps, origs, his, los, ifs, nums], dtype=np.int64).reshape(7, len(offs))

    def _truncated(self, buf, p, end, btype, offs, caps, origs, his, los, ifs, epb) -> None:
        idx = self.next_index
        if btype == EPB and p + 28 <= end and self.section_ifaces:
            iface, hi, lo, cap, orig = epb(buf, p + 8)
            if iface < len(self.section_ifaces):
                have = end - (p + 28)
                self._nums.append(idx)
                self.next_index += 1
                offs.append(p + 28)
                caps.append(min(cap, have))
                origs.append(orig)
                his.append(hi)
                los.append(lo)
                ifs.append(self.section_ifaces[iface])
                self.anomalies.append((idx, "capture", "capture_truncated_record",
                                       f"last packet block cut short: {min(cap, have)} of {cap} bytes"))
                self.finished = True
                return
        self.anomalies.append((None, "capture", "capture_truncated_record",
                               f"last block (type {btype:#x}) cut short: {end - p} bytes"))
        self.finished = True

    def _batch(self, buf, file_offset, cols: np.ndarray, comments, flags) -> RecordBatch:
        n = cols.shape[1]
        if not n:
            return empty_batch(self.next_index, file_offset)
        offs, caps, origs, hi, lo, ifs, numbers = cols[:7]
        iface = ifs.astype(np.int32)
        ts = np.full(n, NO_TS, dtype=np.int64)
        for g in np.unique(iface):
            m = (iface == g) & (hi >= 0)
            if not m.any():
                continue
            ts[m] = _ticks_to_ns((hi[m].astype(np.uint64) << np.uint64(32)) | lo[m].astype(np.uint64),
                                 self.interfaces[g])
        return RecordBatch(
            buf=np.frombuffer(buf, dtype=np.uint8), data_off=np.ascontiguousarray(offs),
            caplen=np.ascontiguousarray(caps), origlen=np.ascontiguousarray(origs), ts_ns=ts,
            iface=iface, first_index=int(numbers[0]), file_offset=file_offset, comments=comments, pkt_flags=flags,
            numbers=numbers,
        )


def _ticks_to_ns(ticks: np.ndarray, iface: Interface) -> np.ndarray:
    """Timestamp units of an interface (if_tsresol) to integer nanoseconds, without float rounding."""
    off = np.int64(iface.ts_offset_s) * np.int64(1_000_000_000)
    if iface.ts_base == 10:
        e = iface.ts_exp
        if e <= 9:
            return (ticks * np.uint64(10 ** (9 - e))).astype(np.int64) + off
        return (ticks // np.uint64(10 ** (e - 9))).astype(np.int64) + off
    e = iface.ts_exp
    if e >= 64:
        return np.zeros(len(ticks), dtype=np.int64) + off
    whole = (ticks >> np.uint64(e)).astype(np.int64) * np.int64(1_000_000_000)
    frac = ticks & np.uint64((1 << e) - 1)
    if e <= 34:
        part = ((frac * np.uint64(1_000_000_000)) >> np.uint64(e)).astype(np.int64)
    else:
        part = (frac.astype(np.float64) * 1e9 / float(1 << e)).astype(np.int64)
    return whole + part + off

"""Classic libpcap files: https://datatracker.ietf.org/doc/draft-ietf-opsawg-pcap/ (sections 4-5).

Strategy: a sans-I/O walker. `PcapWalker.walk(buf, final)` finds the records that lie wholly in `buf` with a tight
loop that reads only each record's captured length; the other header fields are gathered for all records at
once with numpy. Microsecond and nanosecond magics in both byte orders are accepted, and the Kuznetzov
"modified pcap" variant (24-byte record headers). Limits: a record longer than `max_record_bytes` means the file
is corrupt from there on (there is no way to resynchronise a pcap), so the walk stops with an anomaly; a
truncated last record keeps the bytes that are there.
"""
from __future__ import annotations

import struct

import numpy as np

from hbonecap.capture.records import Interface, RecordBatch, empty_batch
from hbonecap.errors import CaptureError

MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000, 16, "pcap"),
    b"\xa1\xb2\xc3\xd4": (">", 1_000, 16, "pcap"),
    b"\x4d\x3c\xb2\xa1": ("<", 1, 16, "pcap-ns"),
    b"\xa1\xb2\x3c\x4d": (">", 1, 16, "pcap-ns"),
    b"\x34\xcd\xb2\xa1": ("<", 1_000, 24, "pcap-modified"),
    b"\xa1\xb2\xcd\x34": (">", 1_000, 24, "pcap-modified"),
}


class PcapWalker:
    """Walks the records of one pcap stream; call `walk` with growing buffers."""

    def __init__(self, name: str, max_record: int) -> None:
        self.name = name
        self.max_record = max_record
        self.interfaces: list[Interface] = []
        self.format = "pcap"
        self.next_index = 1
        self.anomalies: list[tuple] = []
        self.finished = False
        self._endian = "<"
        self._frac_ns = 1000
        self._hdr = 16

    def start(self, buf: bytes) -> int:
        """Parse the 24-byte file header; returns bytes consumed."""
        if len(buf) < 24:
            raise CaptureError(self.name, f"truncated pcap file header ({len(buf)} of 24 bytes)")
        magic = bytes(buf[:4])
        if magic not in MAGICS:
            raise CaptureError(self.name, "not a pcap file")
        self._endian, self._frac_ns, self._hdr, self.format = MAGICS[magic]
        vmaj, vmin, _zone, _sigfigs, snaplen, network = struct.unpack_from(self._endian + "HHiIII", buf, 4)
        if vmaj != 2:
            raise CaptureError(self.name, f"unsupported pcap version {vmaj}.{vmin}")
        # Upper bits of the link-type field carry FCS information (draft section 4, LinkType and additional info).
        self.interfaces.append(Interface(link_type=network & 0xFFFF, snaplen=snaplen))
        return 24

    def walk(self, buf: bytes, pos: int, file_offset: int, final: bool, reference: bool = False
             ) -> tuple[int, RecordBatch]:
        """Records wholly inside buf[pos:]; returns (new position, batch).

        The record boundaries come from the compiled walker (`fastwalk`); `reference=True` uses the plain
        Python loop instead, which the tests use as the oracle for the compiled one."""
        end = len(buf)
        hdr = self._hdr
        arr = np.frombuffer(buf, dtype=np.uint8)
        if reference:
            offs, p, too_large = self._offsets_reference(buf, pos)
            heads = None
        else:
            from hbonecap.capture.fastwalk import pcap_records

            *heads, p, too_large = pcap_records(arr, pos, hdr, self._endian == ">", self.max_record, self._frac_ns)
            offs = heads[0]
        if too_large:
            (incl,) = struct.unpack_from(self._endian + "I", buf, p + 8)
            self.anomalies.append((self.next_index + len(offs), "capture", "pcap_bad_record",
                                   f"record at file offset {file_offset + p} declares {incl} captured bytes; "
                                   "the rest of the file cannot be read"))
            self.finished = True
            end = p
        incl_at = struct.Struct(self._endian + "I").unpack_from
        partial = None
        if final and not self.finished and p < end:
            if p + hdr <= end:
                (incl,) = incl_at(buf, p + 8)
                partial = (p, end - p - hdr)
                self.anomalies.append((self.next_index + len(offs), "capture", "capture_truncated_record",
                                       f"last record cut short: {end - p - hdr} of {incl} bytes"))
            else:
                self.anomalies.append((None, "capture", "capture_trailing_bytes",
                                       f"{end - p} bytes after the last record are not a record header"))
            self.finished = True
        if final:
            self.finished = True
        n = len(offs) + (1 if partial else 0)
        if n == 0:
            return p if not final else end, empty_batch(self.next_index, file_offset)
        if heads is None or partial:
            # the reference gather of the header fields (also the path for a cut-short last record)
            rec = np.asarray(offs, dtype=np.int64)
            if partial:
                rec = np.append(rec, partial[0])
            h = arr[rec[:, None] + np.arange(16)].view(np.dtype(self._endian + "u4")).reshape(n, 4).astype(np.int64)
            caplen, origlen = h[:, 2].copy(), h[:, 3]
            ts = h[:, 0] * 1_000_000_000 + h[:, 1] * self._frac_ns
            if partial:
                caplen[-1] = partial[1]
                p = end
        else:
            rec, caplen, origlen, ts = heads
        batch = RecordBatch(
            buf=arr, data_off=rec + hdr, caplen=caplen, origlen=origlen, ts_ns=ts,
            iface=np.zeros(n, dtype=np.int32), first_index=self.next_index, file_offset=file_offset,
        )
        self.next_index += n
        return p, batch

    def _offsets_reference(self, buf, pos: int) -> tuple[list[int], int, bool]:
        """The plain-Python record walk (oracle for the compiled one)."""
        end = len(buf)
        hdr = self._hdr
        incl_at = struct.Struct(self._endian + "I").unpack_from
        offs: list[int] = []
        p = pos
        while p + hdr <= end:
            (incl,) = incl_at(buf, p + 8)
            if incl > self.max_record:
                return offs, p, True
            nxt = p + hdr + incl
            if nxt > end:
                break
            offs.append(p)
            p = nxt
        return offs, p, False

"""TLS record layer for one direction of a connection, as an observer.

Follows RFC 8446 section 5.1-5.2 (TLSPlaintext / TLSCiphertext: type, legacy version, 16-bit length; ciphertext
at most 2**14 + 256 bytes) and RFC 5246 section 6.2 (TLS 1.2 allows 2**14 + 2048). SSLv2-compatible hellos are not
recognised.

Strategy
  * `RecordReader.feed(Timed) -> events` buffers at most one record and yields `Record` objects carrying the
    fragment and the capture times of its first and last byte (`ts_first`, `ts_last`). Whole records are taken
    straight out of a piece (times from its marks); only an incomplete tail is buffered, and a record completed
    by the head of the next piece is joined from the buffer and that head in one copy (`TimedBuffer.take_through`).
  * Oversized records and unknown content types are reported (`tls_record_too_large`, `tls_bad_record`) and
    treated as lost sync: the reader then scans for a position where two consecutive plausible record headers
    start (or one record ends exactly where the data ends) and reports how much it skipped (`tls_resync`).
  * Gaps (`gap(n)`) and captures starting mid-connection (`state='lost'`) use the same resynchronisation.

Limits
  * Plausibility accepts content types 20-24 and versions 3.0-3.4 (TLS 1.3 records say 3.3; 3.1 appears in a first
    ClientHello). A run of bytes in a record that looks like two record headers can fool the resync; decryption
    (AEAD tags) catches that downstream.
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from ..anomalies import Anomaly
from ..timeline import Timed, TimedBuffer

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA, HEARTBEAT = 20, 21, 22, 23, 24
CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data", 24: "heartbeat"}
RECORD_HEADER = struct.Struct(">BHH")
MAX_RECORD = (1 << 14) + 2048
RESYNC_WINDOW = 64 * 1024


@dataclass(slots=True)
class Record:
    content_type: int
    version: int
    header: bytes         # the 5 header bytes (additional data of AEAD ciphers)
    fragment: bytes
    ts_first: int
    ts_last: int
    offset: int           # stream offset of the header


@dataclass(slots=True)
class RecordLostSync:
    offset: int
    reason: str


def plausible(buf, pos: int) -> int:
    ctype, version, length = RECORD_HEADER.unpack_from(buf, pos)
    if ctype not in CONTENT_TYPES or version >> 8 != 3 or (version & 0xFF) > 4 or length > MAX_RECORD or not length:
        return -1
    return 5 + length


def _header_candidates(buf, hi: int) -> list[int]:
    """Offsets in [0, hi) whose bytes could start a record header (content type 20-24, version 3.x with x <= 4,
    length 1..MAX_RECORD), found with numpy in one pass rather than a Python call per offset."""
    if hi < 256:
        return list(range(0, max(hi, 0)))
    a = np.frombuffer(buf, dtype=np.uint8, count=hi + 4)
    length = a[3:3 + hi].astype(np.int32) * 256 + a[4:4 + hi]
    ok = (a[:hi] >= 20) & (a[:hi] <= 24) & (a[1:1 + hi] == 3) & (a[2:2 + hi] <= 4) & (length > 0) & \
        (length <= MAX_RECORD)
    out = np.flatnonzero(ok).tolist()
    del a, ok, length              # release the buffer export: a bytearray must stay resizable
    return out


def find_record_start(buf, limit: int = RESYNC_WINDOW) -> int:
    n = len(buf)
    for pos in _header_candidates(buf, min(n - 5 + 1, limit)):
        if buf[pos] not in CONTENT_TYPES:
            continue
        size = plausible(buf, pos)
        if size < 0:
            continue
        nxt = pos + size
        if nxt == n or (nxt + 5 <= n and plausible(buf, nxt) >= 0):
            return pos
    return -1


class RecordReader:
    def __init__(self, state: str = "records") -> None:
        """`state`: 'records' (at a record boundary) or 'lost' (mid-connection: scan for records)."""
        self.buf = TimedBuffer()
        self.state = state
        self.records = 0
        self.need = 0            # buffered bytes needed before the record under way is complete

    def feed(self, piece: Timed) -> list:
        if self.state == "records":
            buf = self.buf
            have = len(buf.buf)
            if not have:
                return self._direct(piece, 0)
            n = len(piece.data)
            if have + n < self.need:
                buf.append_timed(piece)  # the record under way is still incomplete
                return []
            if self.need > have:
                # complete the record under way from the head of the piece, then take the rest directly
                k = self.need - have
                if have >= 5:
                    # the header is buffered (checked when `need` was set): the record is the buffered bytes and
                    # the head of the piece, joined once
                    bb = buf.buf
                    ctype, version, _ = RECORD_HEADER.unpack_from(bb, 0)
                    offset = buf.start
                    ts_first = buf.ts_at(0)
                    header = bytes(bb[:5])
                    fragment = buf.take_through(5, piece, k)
                    self.need = 0
                    self.records += 1
                    out = [Record(ctype, version, header, fragment.data, ts_first, fragment.marks[-1][1], offset)]
                    if k < n:
                        out += self._direct(piece, k)
                    return out
                buf.append_timed(piece.slice(0, k) if k < n else piece)
                out = self._run()
                if k < n:
                    if not len(buf.buf) and self.state == "records":
                        out += self._direct(piece, k)
                    else:
                        buf.append_from(piece, k)
                        out += self._run()
                return out
        self.buf.append_timed(piece)
        return self._run()

    def _direct(self, piece: Timed, start: int) -> list:
        """Fast path: whole records straight out of `piece.data[start:]` (the buffer empty, at a record boundary),
        no buffer copies; the times of a record's first and last byte come from the piece's marks. What is left
        (an incomplete record) is buffered."""
        data, marks = piece.data, piece.marks
        out: list = []
        pos, n = start, len(data)
        base = self.buf.start - start          # stream offset of data[0]
        unpack = RECORD_HEADER.unpack_from
        single = len(marks) == 1
        ts = marks[0][1] if marks else -1
        offs = None if single else [m[0] for m in marks]
        while n - pos >= 5:
            ctype, version, length = unpack(data, pos)
            end = pos + 5 + length
            if ctype not in CONTENT_TYPES or version >> 8 != 3 or length > MAX_RECORD or end > n:
                break
            if single:
                t0 = t1 = ts
            else:
                t0 = marks[bisect_right(offs, pos) - 1][1]
                t1 = marks[bisect_right(offs, end - 1) - 1][1]
            self.records += 1
            out.append(Record(ctype, version, data[pos:pos + 5], data[pos + 5:end], t0, t1, base + pos))
            pos = end
        self.buf.start = base + pos
        if pos < n:
            self.buf.append_from(piece, pos)
            if n - pos >= 5:
                # the usual tail: the head of a record that the next piece completes (what _run would conclude)
                ctype, version, length = unpack(data, pos)
                if ctype in CONTENT_TYPES and version >> 8 == 3 and length <= MAX_RECORD:
                    self.need = 5 + length
                    return out
            out += self._run()
        return out

    def gap(self, length: int) -> list:
        off = self.buf.end
        self.buf.clear()
        self.buf.start = off + length
        if self.state == "lost":
            return []
        self.state = "lost"
        return [RecordLostSync(off, "gap"), Anomaly("tls", "tls_lost_sync", f"{length} bytes missing at offset {off}")]

    def close(self) -> list:
        if len(self.buf) and self.state == "records":
            return [Anomaly("tls", "tls_truncated_record", f"{len(self.buf)} bytes of an unfinished record at the "
                                                           f"end of the stream (offset {self.buf.start})")]
        return []

    def _run(self) -> list:
        out: list = []
        self.need = 0
        buf = self.buf
        for _ in range(1 << 20):
            if self.state == "lost":
                pos = find_record_start(buf.buf)
                if pos < 0:
                    if len(buf) > RESYNC_WINDOW + 5:
                        buf.skip(len(buf) - 5)
                    return out
                if pos:
                    out.append(Anomaly("tls", "tls_resync", f"skipped {pos} bytes to a record start at offset "
                                                             f"{buf.start + pos}"))
                buf.skip(pos)
                self.state = "records"
            if len(buf) < 5:
                return out
            ctype, version, length = RECORD_HEADER.unpack_from(buf.buf, 0)
            if ctype not in CONTENT_TYPES or version >> 8 != 3 or length > MAX_RECORD:
                kind = "tls_record_too_large" if length > MAX_RECORD and ctype in CONTENT_TYPES else "tls_bad_record"
                out.append(Anomaly("tls", kind, f"record header {bytes(buf.buf[:5]).hex()} at offset {buf.start}"))
                out.append(RecordLostSync(buf.start, kind))
                self.state = "lost"
                buf.skip(1)
                continue
            if len(buf) < 5 + length:
                self.need = 5 + length
                return out
            offset = buf.start
            header, ts_first, ts_last = buf.take_bytes(5)
            fragment = b""
            if length:                 # a zero-length record ends with its header
                fragment, _, ts_last = buf.take_bytes(length)
            self.records += 1
            out.append(Record(ctype, version, header, fragment, ts_first, ts_last, offset))
        return out

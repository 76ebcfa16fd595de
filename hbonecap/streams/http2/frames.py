"""HTTP/2 frame layer for one direction of a connection, as an observer.

Follows RFC 9113: section 3.4 (connection preface), 4.1 (frame format), 6.1-6.10 (frame definitions: padding of
DATA/HEADERS/PUSH_PROMISE, the HEADERS priority block, SETTINGS, RST_STREAM, PING, GOAWAY, WINDOW_UPDATE,
CONTINUATION). Unknown frame types are passed through (section 4.1: they must be ignored, we still show them).

Strategy
  * `FrameReader` is sans-I/O: ``feed(Timed) -> events`` and ``gap(n) -> events``; it buffers at most one frame
    plus a header. A complete frame becomes a `Frame` (payload without padding/priority fields, with capture
    times of its bytes), at the time of its last byte. Frames inside one piece are taken straight out of it; a
    frame completed by the head of the next piece is joined from the buffer and that head in one copy.
  * Nothing an endpoint would reject stops the reader: frames above SETTINGS_MAX_FRAME_SIZE, bad stream ids,
    bad padding are passed on and reported (`http2_bad_padding`, `http2_frame_size`...).
  * DATA frames longer than `STREAM_DATA_OVER` are passed on in chunks (`DataChunk`) as their bytes arrive, so a
    1 MiB frame is never buffered whole; a TCP gap inside such a payload is a `DataGap`, not a loss of sync.
  * Lost sync is explicit: after a gap, or when the direction starts mid-connection (no preface where one is
    expected), the reader reports `http2_lost_sync` and scans for a position where consecutive frame headers
    are plausible (`find_frame_start`), reports `http2_resync` with the bytes skipped, and goes on.

Limits
  * A frame declaring more than `max_frame` bytes (default 2**24-1, the protocol maximum) cannot be buffered and
    is treated as lost sync.
  * Resynchronisation scans at most `RESYNC_WINDOW` bytes of buffered data at a time; it needs two consecutive
    plausible frame headers (or one frame ending exactly at the end of the data seen), so a frame-looking run of
    bytes inside a DATA payload can fool it; the next frames usually show it (reported, never silent).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..anomalies import Anomaly
from ..timeline import Timed, TimedBuffer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
               "WINDOW_UPDATE", "CONTINUATION")
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20

ERROR_CODES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
               "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR",
               "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")

HEADER = struct.Struct(">HBBBI")   # 24-bit length as (hi16, lo8), type, flags, stream id
U32 = struct.Struct(">I")
U32x2 = struct.Struct(">II")
SETTING = struct.Struct(">HI")

MAX_FRAME = (1 << 24) - 1
#: DATA frames longer than this are passed on in chunks as their bytes arrive.
STREAM_DATA_OVER = 64 * 1024
RESYNC_WINDOW = 256 * 1024
# Flags each known type may carry (for plausibility when resynchronising).
_VALID_FLAGS = (0x09, 0x2D, 0x00, 0x00, 0x01, 0x0C, 0x01, 0x00, 0x00, 0x04)
_STREAM_ZERO = (False, False, False, False, True, False, True, True, None, False)  # None: either


def error_name(code: int) -> str:
    return ERROR_CODES[code] if 0 <= code < len(ERROR_CODES) else f"0x{code:x}"


@dataclass(slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    length: int              # payload length as declared
    payload: Timed           # payload without padding (and without the HEADERS priority block)
    ts_ns: int               # capture time of the frame's last byte
    offset: int              # stream offset of the frame header in this direction's byte stream

    @property
    def name(self) -> str:
        return FRAME_NAMES[self.type] if self.type < len(FRAME_NAMES) else f"0x{self.type:02x}"


@dataclass(slots=True)
class DataChunk:
    """Part of a large unpadded DATA frame, passed on before the frame is complete (bounded buffering)."""

    stream_id: int
    flags: int               # END_STREAM only on the final chunk
    payload: Timed
    final: bool
    offset: int              # stream offset of the frame header


@dataclass(slots=True)
class DataGap:
    """Bytes missing inside a streamed DATA payload: the tunnelled stream has a hole, the frame layer is in step."""

    stream_id: int
    length: int
    offset: int


@dataclass(slots=True)
class LostSync:
    offset: int
    reason: str


@dataclass(slots=True)
class Resync:
    offset: int
    skipped: int


def parse_header(buf, pos: int = 0) -> tuple[int, int, int, int]:
    hi, lo, ftype, flags, sid = HEADER.unpack_from(buf, pos)
    return (hi << 8) | lo, ftype, flags, sid & 0x7FFFFFFF


def plausible(buf, pos: int, max_frame: int = 1 << 20) -> int:
    """-1 if a frame header at `pos` looks wrong, else the length of the frame (header included)."""
    length, ftype, flags, sid = parse_header(buf, pos)
    if ftype >= 10 or length > max_frame or flags & ~_VALID_FLAGS[ftype] or buf[pos + 5] & 0x80:
        return -1
    zero = _STREAM_ZERO[ftype]
    if zero is not None and zero != (sid == 0):
        return -1
    if (ftype == PING and length != 8) or (ftype in (RST_STREAM, WINDOW_UPDATE) and length != 4) or \
            (ftype == PRIORITY and length != 5) or (ftype == SETTINGS and length % 6) or \
            (ftype == SETTINGS and flags & FLAG_ACK and length) or (ftype == GOAWAY and length < 8):
        return -1
    return 9 + length


_FLAG_MASKS = np.array([~m & 0xFF for m in _VALID_FLAGS] + [0xFF] * 246, dtype=np.uint8)


def _header_candidates(buf, lo: int, hi: int) -> list[int]:
    """Offsets in [lo, hi) that pass the cheap necessary tests of `plausible` (type known, flags valid for it,
    length within 1 MiB, reserved bit clear), found with numpy: a scan of random bytes costs one pass in C
    instead of a Python call per offset."""
    if hi - lo < 256:
        return list(range(lo, hi))
    a = np.frombuffer(buf, dtype=np.uint8, count=hi - lo + 8, offset=lo)
    m = len(a) - 8
    ok = (a[3:3 + m] < 10) & (a[:m] <= 0x10) & ((a[5:5 + m] & 0x80) == 0)
    ok &= (a[4:4 + m] & _FLAG_MASKS[a[3:3 + m]]) == 0
    out = (np.flatnonzero(ok) + lo).tolist()
    del a, ok                      # release the buffer export: a bytearray must stay resizable
    return out


def find_frame_start(buf, limit: int = RESYNC_WINDOW, start: int = 0) -> int:
    """First offset where two consecutive plausible frame headers (or one frame ending at the data's end) begin.

    Returns -1 when none is found among the first `limit` bytes that can be checked.
    """
    return scan_frames(buf, limit, start)[0]


def scan_frames(buf, limit: int = RESYNC_WINDOW, start: int = 0) -> tuple[int, int]:
    """`find_frame_start` plus where a later scan of the same (grown) buffer must start again: the first position
    that more data could still turn into a frame start."""
    n = len(buf)
    undecided = -1
    for pos in _header_candidates(buf, start, min(n - 9 + 1, limit)):
        size = plausible(buf, pos)
        if size < 0:
            continue
        nxt = pos + size
        if nxt == n:
            return pos, pos
        if nxt + 9 <= n:
            if plausible(buf, nxt) >= 0:
                return pos, pos
        elif undecided < 0:
            undecided = pos
    return -1, (undecided if undecided >= 0 else max(start, n - 8))


def strip_padding(frame_type: int, flags: int, payload: Timed) -> tuple[Timed, int, str | None]:
    """Payload without padding and priority fields -> (payload, priority-dependency or -1, error or None)."""
    data = payload.data
    start, end, dep = 0, len(data), -1
    if frame_type in (DATA, HEADERS, PUSH_PROMISE) and flags & FLAG_PADDED:
        if not data:
            return payload, dep, "padded frame without a pad length"
        pad = data[0]
        start = 1
        if pad > end - start:
            return payload.slice(1, end), dep, f"pad length {pad} exceeds the payload"
        end -= pad
    if frame_type == HEADERS and flags & FLAG_PRIORITY:
        if end - start < 5:
            return payload.slice(start, end), dep, "priority block truncated"
        dep = U32.unpack_from(data, start)[0] & 0x7FFFFFFF
        start += 5
    return (payload if start == 0 and end == len(data) else payload.slice(start, end)), dep, None


SETTINGS_NAMES = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS", 4: "INITIAL_WINDOW_SIZE",
                  5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE", 8: "ENABLE_CONNECT_PROTOCOL"}
PRIORITY_FIELDS = struct.Struct(">IB")


def control_fields(frame: "Frame") -> dict:
    """Decoded fields of SETTINGS, PING, WINDOW_UPDATE and PRIORITY frames (RFC 9113 6.3, 6.5, 6.7, 6.9); {} for
    others or when the payload has the wrong size (an observer reports, it does not reject)."""
    data, ft = frame.payload.data, frame.type
    if ft == SETTINGS:
        return {"ack": bool(frame.flags & FLAG_ACK),
                "settings": [(SETTINGS_NAMES.get(k, f"0x{k:x}"), v) for k, v in
                             (SETTING.unpack_from(data, i) for i in range(0, len(data) - 5, 6))]}
    if ft == PING and len(data) == 8:
        return {"ack": bool(frame.flags & FLAG_ACK), "opaque": data.hex()}
    if ft == WINDOW_UPDATE and len(data) == 4:
        return {"increment": U32.unpack(data)[0] & 0x7FFFFFFF}
    if ft == PRIORITY and len(data) == 5:
        dep, weight = PRIORITY_FIELDS.unpack(data)
        return {"depends_on": dep & 0x7FFFFFFF, "exclusive": bool(dep >> 31), "weight": weight + 1}
    return {}


class FrameReader:
    """Frames out of one direction's byte stream (plaintext after TLS, or cleartext h2c)."""

    def __init__(self, state: str = "preface", max_frame: int = MAX_FRAME) -> None:
        """`state`: 'preface' (client side from the start), 'start' (server side from the start: a SETTINGS frame
        comes first), 'frames' (known to be at a frame boundary), 'lost' (mid-connection: scan for frames)."""
        self.buf = TimedBuffer()
        self.max_frame = max_frame
        self.state = state
        self.frames = 0
        self.scan_pos = 0
        self.need = 0            # buffered bytes needed before the frame under way is complete
        self.data_left = 0       # state 'data': payload bytes of the streamed DATA frame still to come
        self.data_frame = (0, 0, 0)

    def feed(self, piece: Timed) -> list:
        buf = self.buf
        if len(piece.marks) == 1 and self.state in ("frames", "data"):
            # fast paths for pieces captured at one time (decrypted TLS records): no buffer round trip
            have = len(buf.buf)
            n = len(piece.data)
            if not have:
                return self._direct(piece, 0)
            if self.state == "frames" and have < self.need <= have + n:
                # complete the frame under way from the head of the piece, then take the rest directly
                k = self.need - have
                if have >= 9:
                    # the header is buffered (checked when `need` was set): the payload is the buffered bytes and
                    # the head of the piece, joined once
                    length, ftype, flags, sid = parse_header(buf.buf, 0)
                    offset = buf.start
                    payload = buf.take_through(9, piece, k)
                    self.need = 0
                    self.frames += 1
                    out = [Frame(ftype, flags, sid, length, payload, payload.marks[-1][1], offset)]
                    if k < n:
                        out += self._direct(piece, k)
                    return out
                buf.append_timed(piece.slice(0, k) if k < n else piece)
                out = self._run()
                if k < n:
                    if not len(buf.buf) and self.state in ("frames", "data"):
                        out += self._direct(piece, k)
                    else:
                        buf.append_from(piece, k)
                        out += self._run()
                return out
        buf.append_timed(piece)
        if self.state == "frames" and len(buf.buf) < self.need:
            return []  # the frame under way is still incomplete
        return self._run()

    def _direct(self, piece: Timed, start: int) -> list:
        """Whole frames straight out of `piece.data[start:]` (one capture time, nothing buffered, at a frame
        boundary or inside a streamed DATA payload); what is left is buffered and parsed as usual."""
        data, ts = piece.data, piece.marks[0][1]
        pos, n = start, len(data)
        base = self.buf.start - start          # stream offset of data[0]
        out: list = []
        if self.state == "data":
            k = min(n - pos, self.data_left)
            self.data_left -= k
            flags, sid, offset = self.data_frame
            final = not self.data_left
            out.append(DataChunk(sid, flags if final else flags & ~FLAG_END_STREAM,
                                 Timed(data[pos:pos + k] if (pos or k < n) else data, ((0, ts),)), final, offset))
            pos += k
            if final:
                self.state = "frames"
        if self.state == "frames":
            while n - pos >= 9:
                length, ftype, flags, sid = parse_header(data, pos)
                end = pos + 9 + length
                if length > self.max_frame or end > n:
                    break
                self.frames += 1
                out.append(Frame(ftype, flags, sid, length, Timed(data[pos + 9:end], ((0, ts),)), ts, base + pos))
                pos = end
        self.buf.start = base + pos
        if pos < n:
            self.buf.append_from(piece, pos)
            if self.state == "frames" and n - pos >= 9:
                # the usual tail: the head of a frame that the next piece completes (what _run would conclude)
                length, ftype, flags, _ = parse_header(data, pos)
                if length <= self.max_frame and not (ftype == DATA and length > STREAM_DATA_OVER and
                                                     not flags & FLAG_PADDED):
                    self.need = 9 + length
                    return out
            out += self._run()
        return out

    def gap(self, length: int) -> list:
        """Bytes were lost: whatever is buffered cannot be trusted to line up any more."""
        off = self.buf.end
        self.buf.clear()
        self.buf.start = off + length
        self.scan_pos = 0
        if self.state == "lost":
            return []
        if self.state == "data" and length and length <= self.data_left and not len(self.buf):
            # the hole is inside a streamed DATA payload: the frame layer stays in step
            self.data_left -= length
            if not self.data_left:
                self.state = "frames"
            return [DataGap(self.data_frame[1], length, off)]
        self.state = "lost"
        return [LostSync(off, "gap"), Anomaly("http2", "http2_lost_sync", f"{length} bytes missing at offset {off}")]

    def close(self) -> list:
        if self.state == "data":
            return [Anomaly("http2", "http2_truncated_frame", f"DATA frame of stream {self.data_frame[1]} ended "
                                                               f"{self.data_left} bytes early (end of the stream)")]
        if len(self.buf) and self.state == "frames":
            return [Anomaly("http2", "http2_truncated_frame", f"{len(self.buf)} bytes of an unfinished frame at the "
                                                               f"end of the stream (offset {self.buf.start})")]
        return []

    def _run(self) -> list:
        out: list = []
        self.need = 0
        buf = self.buf
        for _ in range(1 << 20):  # bound: each pass consumes bytes or returns
            if self.state == "data":
                if not len(buf):
                    return out
                chunk = buf.take(min(len(buf), self.data_left))
                self.data_left -= len(chunk.data)
                flags, sid, offset = self.data_frame
                final = not self.data_left
                out.append(DataChunk(sid, flags if final else flags & ~FLAG_END_STREAM, chunk, final, offset))
                if final:
                    self.state = "frames"
                continue
            if self.state == "preface":
                n = min(len(buf), len(PREFACE))
                if buf.buf[:n] != PREFACE[:n]:
                    self.state = "lost"
                    self.scan_pos = 0
                    out.append(LostSync(buf.start, "no preface"))
                    out.append(Anomaly("http2", "http2_no_preface",
                                       "client direction does not start with the connection preface"))
                    continue
                if n < len(PREFACE):
                    return out
                buf.skip(len(PREFACE))
                self.state = "frames"
                continue
            if self.state == "start":
                # Server direction from the beginning: the first frame must be SETTINGS (RFC 9113 3.4).
                if len(buf) < 9:
                    return out
                if plausible(buf.buf, 0, self.max_frame) < 0:
                    self.state = "lost"
                    self.scan_pos = 0
                    out.append(LostSync(buf.start, "no initial frame"))
                    out.append(Anomaly("http2", "http2_lost_sync", "direction does not start with a frame header"))
                    continue
                self.state = "frames"
            if self.state == "lost":
                pos, self.scan_pos = scan_frames(buf.buf, self.scan_pos + RESYNC_WINDOW, self.scan_pos)
                if pos < 0:
                    if self.scan_pos > RESYNC_WINDOW:
                        buf.skip(self.scan_pos)
                        self.scan_pos = 0
                    return out
                self.scan_pos = 0
                if pos:
                    out.append(Anomaly("http2", "http2_resync", f"skipped {pos} bytes to a frame start at offset "
                                                                 f"{buf.start + pos}"))
                out.append(Resync(buf.start + pos, pos))
                buf.skip(pos)
                self.state = "frames"
            if len(buf) < 9:
                return out
            length, ftype, flags, sid = parse_header(buf.buf, 0)
            if length > self.max_frame:
                self.state = "lost"
                self.scan_pos = 0
                out.append(LostSync(buf.start, "frame too large"))
                out.append(Anomaly("http2", "http2_frame_size", f"frame declares {length} bytes (cap "
                                                                 f"{self.max_frame}) at offset {buf.start}"))
                buf.skip(1)
                continue
            if len(buf) < 9 + length:
                if ftype == DATA and length > STREAM_DATA_OVER and not flags & FLAG_PADDED:
                    # a large DATA frame (ztunnel sends up to 1 MiB): pass its payload on as it arrives
                    self.data_left, self.data_frame = length, (flags, sid, buf.start)
                    buf.skip(9)
                    self.state = "data"
                    self.frames += 1
                    continue
                self.need = 9 + length
                return out
            offset = buf.start
            head = buf.take(9)
            payload = buf.take(length) if length else Timed(b"", ((0, head.ts_last),))
            self.frames += 1
            out.append(Frame(ftype, flags, sid, length, payload, payload.ts_last, offset))
        return out

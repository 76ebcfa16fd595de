"""HTTP/2 connection observer: both directions' frames, header blocks, and the stream events they make.

Follows RFC 9113 sections 3.4 (preface), 4.3 (header blocks: HEADERS/PUSH_PROMISE + CONTINUATION, one HPACK
context per direction), 5.1 (stream ends: END_STREAM, RST_STREAM), 6.8 (GOAWAY) and RFC 7541 via `headers.py`.

Strategy
  * Passive: no SETTINGS are acknowledged, no flow control is enforced, a violation never closes anything
    (contrast `h2.H2Connection`, which acts as an endpoint). Violations become anomalies.
  * ``feed(direction, Timed) -> events``, ``gap(direction, n) -> events``, ``close() -> events``. Events are
    `H2Headers`, `H2Data` (a DATA frame, or part of a large one), `H2DataGap`, `H2LostSync`, `H2Reset`,
    `H2GoAway`, `H2Control` (any other frame) and `Anomaly`.
  * A header block is decoded when its last frame (END_HEADERS) arrives; every block is decoded, in order, so the
    dynamic table stays right. A block interrupted by another frame, or lost in a gap, desynchronises that
    direction's HPACK context (reported; see `headers.py` for the recovery).
  * A connection observed from its middle (`midstream=True`) scans for frames and starts with both HPACK
    contexts marked desynchronised.

Limits
  * Header blocks are capped at `MAX_HEADER_BLOCK` bytes; beyond, the block is dropped and HPACK marked lost.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..anomalies import Anomaly
from ..timeline import Timed
from .frames import (CONTINUATION, DATA, FLAG_END_HEADERS, FLAG_END_STREAM, GOAWAY, HEADERS, PUSH_PROMISE,
                     RST_STREAM, U32, U32x2, DataChunk, DataGap, Frame, FrameReader, LostSync, Resync, error_name,
                     strip_padding)
from .headers import HeaderDecoder

MAX_HEADER_BLOCK = 1 << 20


@dataclass(slots=True)
class H2Headers:
    direction: int
    stream_id: int
    headers: list[tuple[bytes, bytes]] | None   # None: the block could not be decoded
    exact: bool
    end_stream: bool
    ts_ns: int                                  # capture time of the block's last byte
    promised_id: int = 0                        # PUSH_PROMISE: the promised stream
    block: bytes = b""                          # the raw HPACK block


@dataclass(slots=True)
class H2Data:
    direction: int
    stream_id: int
    data: Timed
    end_stream: bool
    ts_ns: int


@dataclass(slots=True)
class H2DataGap:
    """Bytes of a DATA payload missing from the capture (cleartext HTTP/2 only; the frame layer stayed in step)."""

    direction: int
    stream_id: int
    length: int


@dataclass(slots=True)
class H2LostSync:
    """Frames of this direction were lost: any open stream may be missing DATA bytes."""

    direction: int
    reason: str


@dataclass(slots=True)
class H2Reset:
    direction: int
    stream_id: int
    code: int
    ts_ns: int

    @property
    def reason(self) -> str:
        return error_name(self.code)


@dataclass(slots=True)
class H2GoAway:
    direction: int
    last_stream_id: int
    code: int
    ts_ns: int


@dataclass(slots=True)
class H2Control:
    direction: int
    frame: Frame


class Http2Connection:
    def __init__(self, midstream: bool = False, client_preface: bool = True) -> None:
        if midstream:
            states = ("lost", "lost")
        else:
            states = ("preface" if client_preface else "frames", "start")
        self.readers = (FrameReader(states[0]), FrameReader(states[1]))
        self.hpack = (HeaderDecoder(synced=not midstream), HeaderDecoder(synced=not midstream))
        # per direction: [frame_type, stream_id, end_stream, chunks, size, promised_id] of an unfinished block
        self.block: list[list | None] = [None, None]
        self.frames = [0, 0]
        self.midstream = midstream

    def feed(self, direction: int, piece: Timed) -> list:
        return self._frames(direction, self.readers[direction].feed(piece))

    def gap(self, direction: int, length: int) -> list:
        return self._frames(direction, self.readers[direction].gap(length))

    def close(self) -> list:
        out: list = []
        for d in (0, 1):
            out += self.readers[d].close()
            if self.block[d] is not None:
                out.append(Anomaly("http2", "http2_unfinished_header_block",
                                   f"dir {d}: header block of stream {self.block[d][1]} never finished"))
                self.block[d] = None
        return out

    def _lose_block(self, d: int, why: str) -> list:
        self.block[d] = None
        return self.hpack[d].lost(why)

    def _frames(self, d: int, events: list) -> list:
        out: list = []
        for ev in events:
            if isinstance(ev, Frame):
                self.frames[d] += 1
                self._frame(d, ev, out)
            elif isinstance(ev, LostSync):
                out += self._lose_block(d, f"dir {d}: HTTP/2 sync lost at offset {ev.offset} ({ev.reason})")
                out.append(H2LostSync(d, ev.reason))
            elif isinstance(ev, DataChunk):
                if self.block[d] is not None:
                    out.append(Anomaly("http2", "http2_continuation_interrupted",
                                       f"dir {d}: header block of stream {self.block[d][1]} interrupted by DATA"))
                    out += self._lose_block(d, f"dir {d}: header block of stream {self.block[d][1]} lost")
                out.append(H2Data(d, ev.stream_id, ev.payload, bool(ev.final and ev.flags & FLAG_END_STREAM),
                                  ev.payload.ts_last))
            elif isinstance(ev, DataGap):
                out.append(H2DataGap(d, ev.stream_id, ev.length))
            elif isinstance(ev, Resync):
                pass
            else:
                out.append(ev)
        return out

    def _frame(self, d: int, f: Frame, out: list) -> None:
        ft = f.type
        blk = self.block[d]
        if blk is not None and not (ft == CONTINUATION and f.stream_id == blk[1]):
            out.append(Anomaly("http2", "http2_continuation_interrupted",
                               f"dir {d}: header block of stream {blk[1]} interrupted by a {f.name} frame"))
            out += self._lose_block(d, f"dir {d}: header block of stream {blk[1]} lost")
            blk = None
        if ft in (HEADERS, PUSH_PROMISE):
            payload, _, err = strip_padding(ft, f.flags, f.payload)
            if err:
                out.append(Anomaly("http2", "http2_bad_padding", f"dir {d}: {f.name} on stream {f.stream_id}: {err}"))
            data = payload.data
            promised = 0
            if ft == PUSH_PROMISE:
                if len(data) < 4:
                    out.append(Anomaly("http2", "http2_bad_frame", f"dir {d}: PUSH_PROMISE shorter than 4 bytes"))
                    out += self._lose_block(d, f"dir {d}: PUSH_PROMISE header block lost")
                    return
                promised = U32.unpack_from(data, 0)[0] & 0x7FFFFFFF
                data = data[4:]
            self.block[d] = [ft, f.stream_id, bool(ft == HEADERS and f.flags & FLAG_END_STREAM), [data], len(data),
                             promised]
            if f.flags & FLAG_END_HEADERS:
                self._finish_block(d, f.ts_ns, out)
            return
        if ft == CONTINUATION:
            if blk is None:
                out.append(Anomaly("http2", "http2_orphan_continuation",
                                   f"dir {d}: CONTINUATION on stream {f.stream_id} without a header block"))
                out += self.hpack[d].lost(f"dir {d}: fragment of an unseen header block")
                return
            blk[3].append(f.payload.data)
            blk[4] += len(f.payload.data)
            if blk[4] > MAX_HEADER_BLOCK:
                out.append(Anomaly("http2", "http2_header_block_too_large",
                                   f"dir {d}: header block of stream {blk[1]} exceeds {MAX_HEADER_BLOCK} bytes"))
                out += self._lose_block(d, f"dir {d}: oversized header block dropped")
                return
            if f.flags & FLAG_END_HEADERS:
                self._finish_block(d, f.ts_ns, out)
            return
        if ft == DATA:
            payload, _, err = strip_padding(ft, f.flags, f.payload)
            if err:
                out.append(Anomaly("http2", "http2_bad_padding", f"dir {d}: DATA on stream {f.stream_id}: {err}"))
            out.append(H2Data(d, f.stream_id, payload, bool(f.flags & FLAG_END_STREAM), f.ts_ns))
            return
        if ft == RST_STREAM:
            if f.length != 4:
                out.append(Anomaly("http2", "http2_bad_frame", f"dir {d}: RST_STREAM of {f.length} bytes"))
                return
            out.append(H2Reset(d, f.stream_id, U32.unpack_from(f.payload.data, 0)[0], f.ts_ns))
            return
        if ft == GOAWAY:
            if f.length < 8:
                out.append(Anomaly("http2", "http2_bad_frame", f"dir {d}: GOAWAY of {f.length} bytes"))
                return
            last, code = U32x2.unpack_from(f.payload.data, 0)
            out.append(H2GoAway(d, last & 0x7FFFFFFF, code, f.ts_ns))
            return
        out.append(H2Control(d, f))

    def _finish_block(self, d: int, ts: int, out: list) -> None:
        ft, sid, end_stream, chunks, _, promised = self.block[d]
        self.block[d] = None
        block = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        result, anomalies = self.hpack[d].decode(block)
        out += anomalies
        out.append(H2Headers(d, sid, result.headers, result.exact, end_stream, ts, promised, block))

"""The readers' direct paths (frames and records taken straight out of a piece, a unit under way completed from
a piece's head, HTTP/1 bodies counted without buffering) give the same events as the buffered path they bypass,
for every way of cutting the same bytes into pieces with their own capture times."""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbonecap.streams.http2.frames import STREAM_DATA_OVER, FrameReader
from hbonecap.streams.inner.http1 import Http1Connection
from hbonecap.streams.timeline import Timed
from hbonecap.streams.tls.records import RecordReader

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class BufferedFrames(FrameReader):
    def feed(self, piece):                       # the buffered path only (what the reader did before)
        self.buf.append_timed(piece)
        if self.state == "frames" and len(self.buf.buf) < self.need:
            return []
        return self._run()


class BufferedRecords(RecordReader):
    def feed(self, piece):
        self.buf.append_timed(piece)
        return self._run()


def _norm(events):
    out = []
    for e in events:
        d = {k: getattr(e, k) for k in getattr(e, "__slots__", ()) or vars(e)}
        for k, v in list(d.items()):
            if isinstance(v, Timed):
                d[k] = (bytes(v.data), v.marks)
            elif isinstance(v, (bytes, bytearray, memoryview)):
                d[k] = bytes(v)
        out.append((type(e).__name__, sorted(d.items())))
    return out


def _pieces(data: bytes, cuts: list[int], multi: bool) -> list[Timed]:
    """`data` cut at `cuts`; each piece has its own capture time, and with `multi` two time marks inside."""
    bounds = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    out = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        t = 1000 * (i + 1)
        marks = ((0, t), ((b - a) // 2, t + 1)) if multi and b - a > 1 else ((0, t),)
        out.append(Timed(data[a:b], marks))
    return out


def _feed_both(fast, slow, pieces: list[Timed]) -> bool:
    """Feed the same pieces to a reader and to its buffered-path twin: True when every event is the same."""
    a, b = [], []
    for p in pieces:
        a += fast.feed(p)
        b += slow.feed(p)
    a += fast.close()
    b += slow.close()
    assert _norm(a) == _norm(b)
    return True


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">BHBBI", len(payload) >> 16, len(payload) & 0xFFFF, ftype, flags, sid) + payload


frames = st.lists(st.tuples(st.sampled_from([0, 1, 4, 8]), st.integers(0, 1), st.integers(1, 9),
                            st.sampled_from([0, 1, 30, 2000, 16384, STREAM_DATA_OVER + 5000])), min_size=1, max_size=8)


@SETTINGS
@given(frames, st.lists(st.integers(0, 1 << 20), max_size=12), st.booleans(), st.sampled_from(["frames", "preface"]))
def test_frame_reader_direct_equals_buffered(spec, cuts, multi, state):
    data = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if state == "preface" else b"") + b"".join(
        _frame(t, f, s, bytes([s]) * n) for t, f, s, n in spec)
    fast, slow = FrameReader(state), BufferedFrames(state)
    assert _feed_both(fast, slow, _pieces(data, cuts, multi))
    assert fast.buf.start == slow.buf.start and bytes(fast.buf.buf) == bytes(slow.buf.buf)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([20, 21, 22, 23]), st.sampled_from([0, 1, 5, 300, 16384, 16640])),
                min_size=1, max_size=8),
       st.lists(st.integers(0, 1 << 20), max_size=12), st.booleans(), st.binary(max_size=3))
def test_record_reader_direct_equals_buffered(spec, cuts, multi, tail):
    data = b"".join(struct.pack(">BHH", t, 0x0303, n) + bytes([t]) * n for t, n in spec) + tail
    fast, slow = RecordReader(), BufferedRecords()
    assert _feed_both(fast, slow, _pieces(data, cuts, multi))
    assert fast.records == slow.records == len(spec)


@SETTINGS
@given(st.lists(st.sampled_from([0, 1, 7, 5000]), min_size=1, max_size=5), st.booleans(),
       st.lists(st.integers(0, 1 << 16), max_size=10), st.booleans())
def test_http1_body_skip_equals_buffered(sizes, chunked, cuts, multi):
    req = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(len(sizes)))
    rsp = b""
    for n in sizes:
        if chunked:
            rsp += b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (
                (b"%x\r\n" % n + b"a" * n + b"\r\n") if n else b"") + b"0\r\n\r\n"
        else:
            rsp += b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"a" * n

    def run(whole: bool):
        c = Http1Connection()
        out = c.feed(0, Timed(req, ((0, 1),)))
        for p in ([Timed(rsp, ((0, 5),))] if whole else _pieces(rsp, cuts, multi)):
            out += c.feed(1, p)
        return out, c

    got, c = run(False)
    want, _ = run(True)
    assert [(type(e).__name__, getattr(e, "status", None)) for e in got] == \
        [(type(e).__name__, getattr(e, "status", None)) for e in want]
    assert c.responses == len(sizes) and c.dirs[1].state == "head"

"""`TimedBuffer.append_from` and `take_through` (the readers' one-copy paths) give the same bytes, marks and
buffer state as the slice / append / take sequence they replace."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hbonecap.streams.timeline import Timed, TimedBuffer


@st.composite
def timed(draw, min_size=0):
    data = draw(st.binary(min_size=min_size, max_size=60))
    if not data:
        return Timed(data, ((0, draw(st.integers(1, 5))),))
    offs = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))) - {len(data)})
    ts = draw(st.lists(st.integers(1, 5), min_size=len(offs) + 1, max_size=len(offs) + 1))
    return Timed(data, tuple(zip([0] + offs, ts)))


@st.composite
def filled(draw):
    """A buffer after a few appends and takes, as a reader leaves it."""
    buf = TimedBuffer()
    buf.start = draw(st.integers(0, 1000))
    for piece in draw(st.lists(timed(), max_size=4)):
        buf.append_timed(piece)
        if len(buf) and draw(st.booleans()):
            buf.take(draw(st.integers(0, len(buf))))
    return buf


def _copy(buf: TimedBuffer) -> TimedBuffer:
    return TimedBuffer(bytearray(buf.buf), buf.start, type(buf.marks)(buf.marks))


@settings(max_examples=400, deadline=None)
@given(filled(), timed(), st.integers(0, 80))
def test_append_from(buf, piece, start):
    start = min(start, len(piece.data))
    a, b = _copy(buf), _copy(buf)
    a.append_timed(piece.slice(start, len(piece.data)))
    b.append_from(piece, start)
    assert bytes(a.buf) == bytes(b.buf) and a.start == b.start
    assert [a.ts_at(i) for i in range(len(a))] == [b.ts_at(i) for i in range(len(b))]
    assert a.take(len(a)) == b.take(len(b))


@settings(max_examples=400, deadline=None)
@given(filled(), timed(min_size=1), st.integers(1, 80), st.integers(0, 80))
def test_take_through(buf, piece, k, skip):
    k = min(k, len(piece.data))
    skip = min(skip, len(buf))
    a, b = _copy(buf), _copy(buf)
    a.append_timed(piece.slice(0, k) if k < len(piece.data) else piece)
    a.take(skip)
    want = a.take(len(a))
    got = b.take_through(skip, piece, k)
    assert (bytes(got.data), got.marks) == (bytes(want.data), want.marks)
    assert type(got.data) is bytes
    assert len(b) == 0 and b.start == a.start and not b.marks

"""TCP reassembly: in-order delivery, overlaps, gaps, FIN/RST, mid-stream starts, bounds."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from hbonecap.streams.anomalies import Anomaly
from hbonecap.streams.reassembly import ACK, FIN, RST, SYN, StreamData, StreamEnd, StreamGap, TcpReassembler

ISN = 0xFFFFFF00  # wraps the 32-bit sequence space after 255 bytes


def run(segments, close=True, **kw):
    r = TcpReassembler(**kw)
    ev = []
    for i, (d, seq, flags, payload) in enumerate(segments, 1):
        ev += r.feed(d, seq, 0, flags, payload, len(payload), i * 1000, i)
    if close:
        ev += r.close()
    return ev


def stream_bytes(events, d=0):
    out = bytearray()
    for e in events:
        if isinstance(e, StreamData) and e.direction == d:
            assert e.offset == len(out)
            out += e.data
        elif isinstance(e, StreamGap) and e.direction == d:
            out += b"?" * e.length
    return bytes(out)


def chop(data, sizes):
    segs, pos = [], 0
    for n in sizes:
        if pos >= len(data):
            break
        segs.append((0, (ISN + 1 + pos) & 0xFFFFFFFF, 0, data[pos:pos + n]))
        pos += n
    if pos < len(data):
        segs.append((0, (ISN + 1 + pos) & 0xFFFFFFFF, 0, data[pos:]))
    return segs


DATA = bytes(range(256)) * 4


def test_whole_and_byte_by_byte_and_shuffled_give_same_stream():
    syn = [(0, ISN, SYN, b"")]
    whole = run(syn + chop(DATA, [len(DATA)]))
    ones = run(syn + chop(DATA, [1] * len(DATA)))
    segs = chop(DATA, [100] * 20)
    random.Random(1).shuffle(segs)
    shuffled = run(syn + segs)
    for ev in (whole, ones, shuffled):
        assert stream_bytes(ev) == DATA
        assert not any(isinstance(e, (StreamGap, Anomaly)) for e in ev)


def test_retransmission_first_seen_wins_and_conflict_reported():
    segs = [(0, ISN, SYN, b"")] + chop(b"hello world", [5, 6])
    segs.append((0, (ISN + 1) & 0xFFFFFFFF, 0, b"HELLO"))  # conflicting retransmission
    ev = run(segs)
    assert stream_bytes(ev) == b"hello world"
    assert [e.kind for e in ev if isinstance(e, Anomaly)] == ["tcp_overlap_conflict"]


def test_keepalive_probe_is_not_a_conflict():
    segs = [(0, ISN, SYN, b"")] + chop(b"hello", [5]) + [(0, (ISN + 5) & 0xFFFFFFFF, 0, b"\x00")]
    ev = run(segs)
    assert stream_bytes(ev) == b"hello" and not [e for e in ev if isinstance(e, Anomaly)]


def test_out_of_order_overlap_first_seen_wins():
    base = (ISN + 1) & 0xFFFFFFFF
    segs = [(0, ISN, SYN, b""), (0, base + 5, 0, b"XXXXXX"), (0, base + 3, 0, b"defghij"), (0, base, 0, b"abc")]
    ev = run(segs)
    assert stream_bytes(ev) == b"abcdeXXXXXX"
    assert any(isinstance(e, Anomaly) and e.kind == "tcp_overlap_conflict" for e in ev)


def test_gap_is_explicit_never_zero_filled():
    base = ISN + 1
    segs = [(0, ISN, SYN, b""), (0, base, 0, b"abc"), (0, base + 10, FIN, b"xyz")]
    ev = run(segs)
    gaps = [e for e in ev if isinstance(e, StreamGap)]
    assert len(gaps) == 1 and gaps[0].offset == 3 and gaps[0].length == 7
    assert b"\x00" not in b"".join(e.data for e in ev if isinstance(e, StreamData))
    assert any(isinstance(e, StreamEnd) and e.kind == "fin" and e.offset == 13 for e in ev)


def test_ack_beyond_hole_declares_gap_after_patience():
    r = TcpReassembler()
    r.feed(0, 100, 0, SYN, b"", 0, 1, 1)
    r.feed(1, 500, 101, SYN | ACK, b"", 0, 2, 2)
    r.feed(0, 101, 501, ACK, b"abc", 3, 3, 3)
    r.feed(0, 110, 501, ACK, b"xyz", 3, 4, 4)
    assert r.feed(1, 501, 113, ACK, b"", 0, 5, 5) == []
    assert r.feed(1, 501, 113, ACK, b"", 0, 6, 6) == []
    ev = r.feed(1, 501, 113, ACK, b"", 0, 7, 7)
    assert [type(e).__name__ for e in ev] == ["Anomaly", "StreamGap", "StreamData"]


def test_segment_listed_after_its_ack_is_not_a_gap():
    r = TcpReassembler()
    r.feed(0, 100, 0, SYN, b"", 0, 1, 1)
    r.feed(0, 101, 0, ACK, b"abc", 3, 2, 2)
    r.feed(0, 107, 0, ACK, b"ghi", 3, 3, 3)
    r.feed(1, 501, 110, ACK, b"", 0, 4, 4)       # acknowledges d-f before the capture lists them
    ev = r.feed(0, 104, 0, ACK, b"def", 3, 5, 5)
    assert [e.data for e in ev if isinstance(e, StreamData)] == [b"def", b"ghi"]


def test_midstream_start_and_rst():
    ev = run([(1, 5000, 0, b"late"), (1, 5004, 0, b" bytes"), (1, 4990, 0, b"0123456789"), (1, 5010, RST, b"")])
    assert stream_bytes(ev, 1) == b"late bytes"
    assert any(isinstance(e, Anomaly) and e.kind == "tcp_data_before_start" for e in ev)
    assert any(isinstance(e, StreamEnd) and e.kind == "rst" for e in ev)


def test_snaplen_cut_is_a_gap():
    r = TcpReassembler()
    r.feed(0, 1, 0, SYN, b"", 0, 1, 1)
    ev = r.feed(0, 2, 0, 0, b"abc", 10, 2, 2)
    ev += r.feed(0, 12, 0, 0, b"next", 4, 3, 3)
    assert stream_bytes(ev) == b"abc" + b"?" * 7 + b"next"
    assert [e.reason for e in ev if isinstance(e, StreamGap)] == ["snaplen"]
    assert [e.kind for e in ev if isinstance(e, Anomaly)] == ["tcp_snaplen_cut"]


def test_buffer_is_bounded():
    base = 1
    segs = [(0, 0, SYN, b"")] + [(0, base + 10 + i * 100, 0, b"x" * 100) for i in range(100)]
    r = TcpReassembler(max_buffer=1000)
    for i, (d, seq, fl, p) in enumerate(segs, 1):
        r.feed(d, seq, 0, fl, p, len(p), i, i)
        assert r.dirs[0].pending_bytes <= 1000


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=600),
       cuts=st.lists(st.integers(1, 80), min_size=1, max_size=40),
       seed=st.integers(0, 2**32), dup=st.booleans())
def test_any_segmentation_order_and_duplication_rebuilds_the_stream(data, cuts, seed, dup):
    segs = chop(data, cuts)
    rnd = random.Random(seed)
    if dup:
        segs = segs + rnd.sample(segs, k=min(len(segs), 5))
    rnd.shuffle(segs)
    ev = run([(0, ISN, SYN, b"")] + segs)
    assert stream_bytes(ev) == data
    assert not any(isinstance(e, StreamGap) for e in ev)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2**32 - 1), st.integers(0, 0x1FF),
                          st.binary(max_size=50), st.integers(0, 2**32 - 1)), max_size=40))
def test_garbage_segments_never_raise_and_stay_bounded(segs):
    r = TcpReassembler(max_buffer=4096, max_ranges=16)
    for i, (d, seq, flags, payload, ack) in enumerate(segs, 1):
        for e in r.feed(d, seq, ack, flags, payload, len(payload) + (i % 3) * 7, i, i):
            if isinstance(e, StreamData):
                assert e.data
        assert all(x.pending_bytes <= 4096 and len(x.starts) <= 16 for x in r.dirs)
    r.close()

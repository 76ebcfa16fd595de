"""HTTP/2 frames and HPACK: conformance stories, whole / byte-by-byte / junk, mid-connection, fuzzing."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import hpack
import pytest
from hypothesis import given, settings, strategies as st

from hbonecap.streams.anomalies import Anomaly
from hbonecap.streams.http2.connection import H2Data, H2GoAway, H2Headers, H2Reset, Http2Connection
from hbonecap.streams.http2.frames import PREFACE, find_frame_start
from hbonecap.streams.timeline import Timed

CONFORMANCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance"


def frame(ftype, flags, sid, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def headers_frames(sid, block, end_stream=False, split=None):
    """HEADERS (+ CONTINUATION when split) carrying `block`."""
    if not split or split >= len(block):
        return frame(1, 0x4 | (1 if end_stream else 0), sid, block)
    out = frame(1, 1 if end_stream else 0, sid, block[:split])
    rest = block[split:]
    while rest:
        chunk, rest = rest[:split], rest[split:]
        out += frame(9, 0 if rest else 0x4, sid, chunk)
    return out


def feed(conn, d, data, ts=1):
    return conn.feed(d, Timed.at(data, ts)) if data else []


def summary(events):
    out = []
    for e in events:
        if isinstance(e, H2Headers):
            out.append(("H", e.direction, e.stream_id, tuple(e.headers or ()), e.end_stream))
        elif isinstance(e, H2Data):
            out.append(("D", e.direction, e.stream_id, e.data.data, e.end_stream))
        elif isinstance(e, (H2Reset, H2GoAway)):
            out.append((type(e).__name__, e.direction, e.code))
        elif isinstance(e, Anomaly):
            out.append(("A", e.kind))
    # merge consecutive DATA of the same stream (byte-at-a-time delivery splits nothing, but be explicit)
    return out


def sample_connection():
    enc = [hpack.Encoder(), hpack.Encoder()]
    c2s = PREFACE + frame(4, 0, 0, b"") + headers_frames(
        1, enc[0].encode([(":method", "CONNECT"), (":authority", "10.0.0.2:8080"), ("traceparent", "00-ab-cd-01")]),
        split=7)
    c2s += frame(0, 0x8, 1, b"\x03hello" + b"\0\0\0") + frame(0, 1, 1, b"")
    s2c = frame(4, 0, 0, struct.pack(">HI", 1, 4096)) + frame(4, 1, 0, b"")
    s2c += headers_frames(1, enc[1].encode([(":status", "200")])) + frame(0, 0, 1, b"world")
    s2c += frame(3, 0, 3, struct.pack(">I", 8)) + frame(7, 0, 0, struct.pack(">II", 1, 0))
    return c2s, s2c


def run(c2s, s2c, mode):
    conn = Http2Connection()
    ev = []
    for d, data in ((0, c2s), (1, s2c)):
        if mode == "whole":
            ev += feed(conn, d, data)
        else:
            for i in range(len(data)):
                ev += feed(conn, d, data[i:i + 1])
    return ev + conn.close()


def test_whole_byte_by_byte_and_junk_give_the_same_events():
    c2s, s2c = sample_connection()
    whole = summary(run(c2s, s2c, "whole"))
    assert whole == summary(run(c2s, s2c, "bytes"))
    assert ("H", 0, 1, ((b":method", b"CONNECT"), (b":authority", b"10.0.0.2:8080"),
                        (b"traceparent", b"00-ab-cd-01")), False) in whole
    assert ("D", 0, 1, b"hello", False) in whole and ("D", 1, 1, b"world", False) in whole
    assert ("H2Reset", 1, 8) in whole and ("H2GoAway", 1, 0) in whole
    assert not [e for e in whole if e[0] == "A"]
    junk = summary(run(c2s, s2c + b"\x00\x00", "whole"))
    assert junk[:len(whole)] == whole
    assert junk[len(whole):] == [("A", "http2_truncated_frame")]


def test_midstream_finds_frames_and_reports_desync():
    c2s, s2c = sample_connection()
    conn = Http2Connection(midstream=True)
    ev = feed(conn, 1, s2c[5:])  # cut inside the first frame
    kinds = [e.kind for e in ev if isinstance(e, Anomaly)]
    assert "http2_resync" in kinds
    assert any(isinstance(e, H2Headers) and e.headers == [(b":status", b"200")] and not e.exact for e in ev)


def test_gap_marks_hpack_lost():
    c2s, _ = sample_connection()
    conn = Http2Connection()
    ev = feed(conn, 0, c2s[:40]) + conn.gap(0, 100) + feed(conn, 0, frame(0, 0, 1, b"x") + frame(0, 0, 1, b"y"))
    kinds = [e.kind for e in ev if isinstance(e, Anomaly)]
    assert "http2_lost_sync" in kinds and "hpack_desync" in kinds
    assert [e.data.data for e in ev if isinstance(e, H2Data)] == [b"x", b"y"]


def test_control_frames_decoded():
    from hbonecap.streams.http2.connection import H2Control
    from hbonecap.streams.http2.frames import control_fields

    conn = Http2Connection(client_preface=False)
    ev = feed(conn, 0, frame(4, 0, 0, struct.pack(">HIHI", 1, 0, 4, 1 << 22)) + frame(6, 1, 0, b"12345678")
              + frame(8, 0, 0, struct.pack(">I", 1 << 24)) + frame(2, 0, 3, struct.pack(">IB", 0x80000001, 15))
              + frame(0xBB, 0, 0, b"ext"))
    fields = [control_fields(e.frame) for e in ev if isinstance(e, H2Control)]
    assert fields == [{"ack": False, "settings": [("HEADER_TABLE_SIZE", 0), ("INITIAL_WINDOW_SIZE", 1 << 22)]},
                      {"ack": True, "opaque": b"12345678".hex()}, {"increment": 1 << 24},
                      {"depends_on": 1, "exclusive": True, "weight": 16}, {}]


def test_find_frame_start():
    data = frame(4, 0, 0, b"") + frame(8, 0, 0, b"\0\0\0\1")
    assert find_frame_start(b"\xff\xff\xff" + data) == 3


def test_dynamic_table_size_updates_and_large_tables():
    enc = hpack.Encoder()
    conn = Http2Connection()
    feed(conn, 0, PREFACE)
    got = []
    blocks = [[("x-a", "1" * 100)], [("x-a", "1" * 100), ("x-b", "2")]]
    for i, size in enumerate((4096, 64, 0, 65536, 4096)):
        enc.header_table_size = size          # the encoder announces a size update in its next block
        hs = blocks[i % 2]
        ev = feed(conn, 0, frame(1, 5, 2 * i + 1, enc.encode(hs)))
        got += [(e.headers, e.exact) for e in ev if isinstance(e, H2Headers)]
        assert not [e for e in ev if isinstance(e, Anomaly)], ev
    assert [h for h, _ in got] == [[(k.encode(), v.encode()) for k, v in blocks[i % 2]] for i in range(5)]
    assert all(exact for _, exact in got)


def _stories():
    root = CONFORMANCE / "http2jp_hpack-test-case"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/story_*.json"))


@pytest.mark.conformance
def test_hpack_stories_decode_exactly():
    stories = _stories()
    if not stories:
        pytest.skip(f"conformance folder absent: {CONFORMANCE / 'http2jp_hpack-test-case'}")
    n = 0
    for path in stories:
        story = json.loads(path.read_text())
        conn = Http2Connection()
        feed(conn, 0, PREFACE)
        for i, case in enumerate(story["cases"]):
            block = bytes.fromhex(case["wire"])
            # through the frame path: odd cases split into CONTINUATIONs
            ev = feed(conn, 0, headers_frames(2 * i + 1, block, split=(5 if i % 2 else None)))
            hs = [e for e in ev if isinstance(e, H2Headers)]
            assert len(hs) == 1 and hs[0].exact, (path, i, ev)
            want = [(k.encode(), v.encode()) for h in case["headers"] for k, v in h.items()]
            assert hs[0].headers == want, (path, i)
            n += 1
    assert n > 1000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(max_size=64)), max_size=30), st.booleans())
def test_garbage_never_raises(chunks, midstream):
    conn = Http2Connection(midstream=midstream)
    for d, data in chunks:
        feed(conn, d, data)
        assert len(conn.readers[d].buf) <= 2 * 1024 * 1024
    conn.close()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.binary(max_size=20))
def test_truncated_and_junk_valid_stream(cut, junk):
    c2s, s2c = sample_connection()
    conn = Http2Connection()
    feed(conn, 0, c2s[:cut] + junk)
    feed(conn, 1, s2c[cut:])
    conn.close()


def test_large_data_frames_stream_in_chunks_with_same_bytes():
    big = bytes(range(256)) * 1024  # 256 KiB in one DATA frame
    c2s = PREFACE + frame(0, 1, 1, big)
    for step in (len(c2s), 5000, 1):
        if step == 1:
            c2s_small = c2s[:20_000]  # one byte at a time is slow: a prefix is enough to check chunking
            conn = Http2Connection()
            ev = []
            for i in range(len(c2s_small)):
                ev += feed(conn, 0, c2s_small[i:i + 1])
            data = b"".join(e.data.data for e in ev if isinstance(e, H2Data))
            assert data == big[:len(c2s_small) - len(PREFACE) - 9]
            assert len(conn.readers[0].buf) == 0
            continue
        conn = Http2Connection()
        ev = []
        for i in range(0, len(c2s), step):
            ev += feed(conn, 0, c2s[i:i + step])
        datas = [e for e in ev if isinstance(e, H2Data)]
        assert b"".join(e.data.data for e in datas) == big
        assert [e.end_stream for e in datas][-1] and not any(e.end_stream for e in datas[:-1])
        assert len(conn.readers[0].buf) <= step


def test_gap_inside_large_data_frame_keeps_frame_sync():
    from hbonecap.streams.http2.connection import H2DataGap

    big = b"z" * 200_000
    c2s = PREFACE + frame(0, 0, 1, big) + frame(0, 1, 1, b"tail")
    conn = Http2Connection()
    cut = len(PREFACE) + 9 + 50_000
    ev = feed(conn, 0, c2s[:cut]) + conn.gap(0, 1000) + feed(conn, 0, c2s[cut + 1000:])
    assert [e.length for e in ev if isinstance(e, H2DataGap)] == [1000]
    datas = [e for e in ev if isinstance(e, H2Data)]
    assert datas[-1].data.data == b"tail" and datas[-1].end_stream
    assert sum(len(e.data.data) for e in datas) == 200_000 - 1000 + 4
    assert not [e for e in ev if isinstance(e, Anomaly)]

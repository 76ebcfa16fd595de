"""StreamAnalyzer as a whole: connection keying, new ISN, fuzzing with garbage and corrupted HBONE, pickling."""
from __future__ import annotations

import pickle
import random
import tempfile
from dataclasses import replace
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from hbone_builder import hbone_exchange, segments
from hbonecap.layers.segments import TcpSegment
from hbonecap.streams.analyzer import StreamAnalyzer
from hbonecap.streams.tls.keylog import load

_KEYS = Path(tempfile.mkdtemp(prefix="hbone-keys-")) / "keys.log"
_EXCHANGE = hbone_exchange([("10.0.0.2:80", {"forwarded": 'for="10.0.0.1:1"'},
                             [(0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
                              (1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")])], _KEYS)
_SEGMENTS = segments(_EXCHANGE)


def run(segs, keylog=None):
    a = StreamAnalyzer(keylog)
    for s in segs:
        a.feed(s)
    return a.close()


def test_one_byte_segments_same_rows():
    kl = load(_KEYS)
    whole, ones = run(segments(_EXCHANGE), kl), run(segments(_EXCHANGE, mss=1), kl)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("ts") and k not in ("start", "end", "records")}  # noqa
                          for r in rows]
    for name in ("tunnels", "streams", "requests"):
        assert strip(getattr(whole, name)) == strip(getattr(ones, name)), name
    assert whole.streams[0]["status"] == 200 and whole.requests[0]["status"] == 200


def test_new_syn_with_new_isn_starts_a_new_connection():
    first = segments(_EXCHANGE)
    second = [replace(s, seq=(s.seq + 77777) & 0xFFFFFFFF if s.src == "10.0.0.1" else s.seq,
                      ack=(s.ack + 77777) & 0xFFFFFFFF if s.src != "10.0.0.1" else s.ack,
                      ts_ns=s.ts_ns + 10**9, index=s.index + len(first)) for s in first]
    r = run(first + second, load(_KEYS))
    assert sorted(t["tunnel_id"] for t in r.tunnels) == ["c0", "c1"]
    assert [t["conn_id"] for t in r.tunnels] == [0, 1]


def test_results_pickle_and_frames():
    r = run(_SEGMENTS, load(_KEYS))
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.streams == r.streams
    for name in ("tunnels", "streams", "requests", "anomalies"):
        assert list(r.frame(name).columns)  # declared columns even when empty


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 0x1FF), st.binary(max_size=64)), max_size=40))
def test_garbage_segments_never_raise(segs):
    ports = [(15008, 40000), (40000, 15008), (80, 41000), (41000, 80)]
    a = StreamAnalyzer()
    for i, (p, seq, ack, flags, payload) in enumerate(segs, 1):
        sport, dport = ports[p]
        src, dst = ("10.0.0.1", "10.0.0.2") if sport > dport else ("10.0.0.2", "10.0.0.1")
        a.feed(TcpSegment("fuzz", i, i * 1000, "", src, sport, dst, dport, flags, seq, ack, payload, len(payload)))
    a.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31), st.integers(1, 20))
def test_corrupted_hbone_never_raises(seed, flips):
    rnd = random.Random(seed)
    segs = list(_SEGMENTS)
    for _ in range(flips):
        i = rnd.randrange(len(segs))
        s = segs[i]
        if not s.payload:
            continue
        pos = rnd.randrange(len(s.payload))
        payload = s.payload[:pos] + bytes([s.payload[pos] ^ (1 << rnd.randrange(8))]) + s.payload[pos + 1:]
        segs[i] = replace(s, payload=payload)
    if rnd.random() < 0.3:
        del segs[rnd.randrange(3, len(segs))]
    r = run(segs, load(_KEYS))
    assert all(t["tunnel_id"] for t in r.tunnels)


def test_idle_and_closed_connections_are_flushed(monkeypatch):
    import hbonecap.streams.analyzer as analyzer_module

    monkeypatch.setattr(analyzer_module, "FLUSH_EVERY", 4)
    first = segments(_EXCHANGE)
    later = [replace(s, sport=s.sport + 1 if s.sport == 40000 else s.sport,
                     dport=s.dport + 1 if s.dport == 40000 else s.dport, ts_ns=s.ts_ns + 3600 * 10**9)
             for s in first]
    a = StreamAnalyzer(load(_KEYS))
    for s in first:
        a.feed(s)
    assert len(a.conns) == 1
    for s in later[:8]:
        a.feed(s)
    assert len(a.conns) == 1 and a.ctx.results.tunnels  # the first connection was finished and reported
    for s in later[8:]:
        a.feed(s)
    r = a.close()
    assert [t["tunnel_id"] for t in r.tunnels] == ["c0", "c1"] and all(t["decrypted"] for t in r.tunnels)

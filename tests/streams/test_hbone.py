"""End to end over real TLS 1.3 (Python's ssl): HBONE tunnels, CONNECT streams, inner HTTP/1, PROXY v2, double HBONE,
no key, mid-connection capture, gaps, key logs arriving at run time."""
from __future__ import annotations

import random

import pytest

from hbone_builder import hbone_exchange, proxy_v2_header, segments
from hbonecap.streams.analyzer import StreamAnalyzer
from hbonecap.streams.tls.keylog import KeyLog, load
from hbonecap.tables import SCHEMAS

INNER_HTTP = [(0, b"GET /status HTTP/1.1\r\nHost: httpbin:8000\r\n\r\n"),
              (1, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    keylog = tmp_path_factory.mktemp("keys") / "keys.log"
    inner = hbone_exchange([("httpbin.default.svc:8000", {"forwarded": 'for="10.0.0.1:5555"'}, INNER_HTTP)], keylog)
    ex = hbone_exchange([
        ("10.0.0.2:8000", {"forwarded": 'for="10.0.0.1:4444"', "traceparent": TRACEPARENT,
                           "baggage": "k8s.namespace.name=default"}, INNER_HTTP),
        ("10.0.0.3:8000", {"x-envoy-original-dst-host": "10.0.0.9:80"},
         [(0, proxy_v2_header() + INNER_HTTP[0][1]), INNER_HTTP[1]]),
        ("svc:8000", {}, inner),
        ("10.0.0.4:9000", {}, [(0, b"x" * 100_000), (1, b"y" * 5000)]),
    ], keylog)
    return ex, keylog


def run(segs, keylog=None, **kw):
    a = StreamAnalyzer(keylog, **kw)
    for s in segs:
        a.feed(s)
    return a.close()


def _no_ts(rows):
    rows = [{k: v for k, v in r.items() if not k.endswith("ts") and k not in ("start", "end", "records")}
            for r in rows]
    return sorted(rows, key=lambda r: (str(r.get("tunnel_id")), str(r.get("stream_id"))))


def test_tables_and_columns(world):
    ex, keylog = world
    r = run(segments(ex), load(keylog))
    for name in ("tunnels", "streams", "requests", "anomalies"):
        cols = set(SCHEMAS[name][i].name for i in range(len(SCHEMAS[name])))
        for row in getattr(r, name):
            assert set(row) <= cols, (name, set(row) - cols)
        r.frame(name)  # builds with the declared dtypes
    assert not r.anomalies
    outer = [t for t in r.tunnels if t["tunnel_id"] == "c0"][0]
    assert outer["decrypted"] and outer["tls_version"] == "TLS 1.3" and outer["alpn"] == "h2"
    assert outer["client_spiffe"] == "spiffe://cluster.local/ns/default/sa/sleep"
    assert outer["server_spiffe"] == "spiffe://cluster.local/ns/default/sa/httpbin"
    assert outer["streams"] == 4 and outer["sni"] is None
    nested = [t for t in r.tunnels if t["tunnel_id"] == "c0/s5"][0]
    assert nested["decrypted"] and nested["parent_stream_id"] == 5
    streams = {(s["tunnel_id"], s["stream_id"]): s for s in r.streams}
    s1 = streams[("c0", 1)]
    assert s1["authority"] == "10.0.0.2:8000" and s1["original_dst"] == "10.0.0.2:8000"
    assert s1["forwarded_for"] == "10.0.0.1:4444" and s1["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert s1["baggage"] == "k8s.namespace.name=default" and s1["status"] == 200 and s1["inner"] == "http1"
    assert s1["end_reason"] == "end_stream" and s1["bytes_c2s"] == len(INNER_HTTP[0][1])
    assert s1["request_ts"] < s1["response_ts"] < s1["first_data_c2s_ts"] < s1["first_data_s2c_ts"] <= s1["end_ts"]
    s3 = streams[("c0", 3)]
    assert s3["original_dst"] == "10.0.0.9:80" and s3["inner"] == "proxy-v2"
    assert s3["peer_identity"] == "spiffe://cluster.local/ns/a/sa/b" and s3["proxy_src"] == "10.0.0.1:40000"
    assert streams[("c0", 5)]["inner"] == "hbone"
    assert streams[("c0/s5", 1)]["forwarded_for"] == "10.0.0.1:5555"
    assert streams[("c0", 7)]["bytes_c2s"] == 100_000 and streams[("c0", 7)]["inner"] == "opaque"
    reqs = {(q["tunnel_id"], q["stream_id"]): q for q in r.requests}
    assert set(reqs) == {("c0", 1), ("c0", 3), ("c0/s5", 1)}
    assert all(q["method"] == "GET" and q["path"] == "/status" and q["status"] == 200 for q in reqs.values())
    # tunnelled bytes with capture times, bounded
    tb = r.tunnel_bytes[("c0", 7)]
    assert bytes(tb[0].data) == b"x" * 100_000 and tb[0].total == 100_000
    assert tb[0].marks[0][0] == 0 and all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(tb[0].marks, tb[0].marks[1:]))
    assert r.records["c0"] and all(rec[1] <= rec[2] for rec in r.records["c0"])


def test_whole_byte_by_byte_and_junk_same_rows(world):
    ex, keylog = world
    kl = load(keylog)
    whole = run(segments(ex, mss=1 << 20), kl)
    small = run(segments(ex, mss=7), kl)
    for name in ("tunnels", "streams", "requests"):
        assert _no_ts(getattr(whole, name)) == _no_ts(getattr(small, name)), name
    # junk appended by the client after the GOAWAY: same rows, one anomaly-free tail at most
    junk = run(segments(ex + [(0, b"\x17\x03\x03\x00\x20" + bytes(32))]), kl)
    assert _no_ts(junk.streams) == _no_ts(whole.streams)
    # the junk record does not authenticate: reported, and the plaintext after it is marked lost
    assert {a["kind"] for a in junk.anomalies} <= {"tls_decrypt_failed", "tls_records_skipped", "http2_lost_sync",
                                                   "hpack_desync"}


def test_without_keys_tunnel_listed_with_timeline(world):
    ex, _ = world
    r = run(segments(ex))
    (t,) = r.tunnels
    assert t["decrypted"] is False and t["why_not"] == "no key log" and t["evidence"] == "port"
    assert t["tls_version"] == "TLS 1.3" and t["records"] == len(r.records["c0"]) > 10
    assert not r.streams and not r.requests


@pytest.mark.parametrize("side", [0, 1])
def test_one_way_capture_of_either_side(world, side):
    ex, keylog = world
    segs = [s for s in segments(ex) if (s.src == "10.0.0.1") == (side == 0)]
    r = run(segs, load(keylog))
    outer = [t for t in r.tunnels if t["tunnel_id"] == "c0"]
    assert outer and outer[0]["decrypted"] is True
    streams = [s for s in r.streams if s["tunnel_id"] == "c0"]
    if side == 0:
        assert [s["authority"] for s in streams] == ["10.0.0.2:8000", "10.0.0.3:8000", "svc:8000", "10.0.0.4:9000"]
    else:
        assert [s["status"] for s in streams] == [200, 200, 200, 200]
        assert streams[3]["bytes_s2c"] == 5000 and streams[0]["inner"] == "http1"


def test_keys_arriving_as_secrets_block(world):
    ex, keylog = world
    a = StreamAnalyzer()
    a.add_secrets(keylog.read_bytes() + b"CLIENT_RANDOM zz 00\n")
    for s in segments(ex):
        a.feed(s)
    r = a.close()
    assert [t["decrypted"] for t in r.tunnels] == [True, True]
    bad = [x for x in r.anomalies if x["kind"] == "keylog_bad_line"]
    assert len(bad) == 1 and bad[0]["index"] == len(keylog.read_bytes().splitlines()) + 1


def test_capture_starting_mid_connection_finds_keys_and_sequence(world):
    ex, keylog = world
    # start after the handshake and the first two streams: no ClientHello, no HPACK state
    total = sum(len(b) for _, b in ex)
    segs = segments(ex, start_at=total // 3, handshake=False)
    r = run(segs, load(keylog))
    kinds = {a["kind"] for a in r.anomalies}
    assert "tls_midstream_keys" in kinds
    (t,) = [t for t in r.tunnels if t["tunnel_id"] == "c0"]
    assert t["decrypted"] is True
    s7 = [s for s in r.streams if s["tunnel_id"] == "c0" and s["stream_id"] == 7]
    assert s7 and s7[0]["bytes_s2c"] == 5000


def test_lost_segment_is_reported_and_later_streams_survive(world):
    ex, keylog = world
    segs = segments(ex)
    # drop a data segment in the middle of the big stream 7 upload
    big = [i for i, s in enumerate(segs) if s.payload_len == 1400]
    del segs[big[len(big) // 2]]
    r = run(segs, load(keylog))
    kinds = {a["kind"] for a in r.anomalies}
    assert "tcp_gap" in kinds and "tls_lost_sync" in kinds
    assert r.tunnel_bytes[("c0", 7)][0].gaps >= 1  # the stream whose bytes were lost knows it
    streams = {(s["tunnel_id"], s["stream_id"]): s for s in r.streams}
    assert streams[("c0", 1)]["status"] == 200 and streams[("c0", 5)]["inner"] == "hbone"


def test_reordered_segments_give_the_same_rows(world):
    ex, keylog = world
    kl = load(keylog)
    segs = segments(ex)
    head, body = segs[:3], segs[3:-2]
    rnd = random.Random(7)
    # reorder within runs of one direction, as a network does (a segment is never captured after its ACK here)
    i = 0
    while i < len(body):
        j = i
        while j < len(body) and j - i < 5 and body[j].src == body[i].src:
            j += 1
        window = body[i:j]
        rnd.shuffle(window)
        body[i:j] = window
        i = j
    r1, r2 = run(segs, kl), run(head + body + segs[-2:], kl)
    assert _no_ts(r1.streams) == _no_ts(r2.streams)
    assert _no_ts(r1.requests) == _no_ts(r2.requests)


def test_keylog_bad_lines_reported_without_secrets():
    secret = "ab" * 48
    text = (f"# comment\nCLIENT_RANDOM {'00' * 32} {secret}\nCLIENT_RANDOM {'11' * 31} {secret}\n"
            f"SERVER_TRAFFIC_SECRET_0 {'22' * 32} nothex\nBOGUS_LABEL x y\n{secret} a b\n"
            f"CLIENT_TRAFFIC_SECRET_0 {'33' * 32} {'cd' * 32}\n")
    kl = KeyLog.parse(text, "k.log")
    assert [a.index for a in kl.anomalies] == [3, 4, 5, 6]
    assert len(kl) == 2
    assert all(secret not in a.detail and "cd" * 32 not in a.detail for a in kl.anomalies)
    assert secret not in repr(kl)

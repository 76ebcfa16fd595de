"""Inner protocols: HTTP/1.x framing and pairing, PROXY protocol v2, HBONE stream bookkeeping; plain-TCP analysis."""
from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import given, settings, strategies as st

from hbone_builder import frame, proxy_v2_header, segments
from hbonecap.streams.analyzer import StreamAnalyzer
from hbonecap.streams.anomalies import Anomaly
from hbonecap.streams.hbone import HboneObserver, forwarded_for, trace_id
from hbonecap.streams.http2.connection import Http2Connection
from hbonecap.streams.http2.frames import PREFACE
from hbonecap.streams.inner import proxy_v2
from hbonecap.streams.inner.http1 import Http1Connection, Http1Request, Http1Response, Http1Switch
from hbonecap.streams.timeline import Timed

REQS = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"HEAD /c HTTP/1.1\r\nHost: y\r\n\r\n"
        b"PUT /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
RSPS = (b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nwxyz\r\n0\r\nTrailer: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n")


def http1_events(c2s, s2c, step=None):
    conn = Http1Connection()
    ev = []
    for d, data in ((0, c2s), (1, s2c)):
        n = step or max(len(data), 1)
        for i in range(0, len(data), n):
            ev += conn.feed(d, Timed.at(data[i:i + n], 5))
    return ev + conn.close()


def summary(ev):
    out = []
    for e in ev:
        if isinstance(e, Http1Request):
            out.append(("req", e.method, e.target, e.header("host")))
        elif isinstance(e, Http1Response):
            out.append(("rsp", e.status, e.request.method if e.request else None))
        elif isinstance(e, Anomaly):
            out.append(("anomaly", e.kind))
        elif isinstance(e, Http1Switch):
            out.append(("switch", e.protocol, e.leftover[0].data, e.leftover[1].data))
    return out


def test_http1_pipelining_bodies_and_pairing_whole_and_byte_by_byte():
    whole = summary(http1_events(REQS, RSPS))
    assert whole == [("req", "GET", "/a", "x"), ("req", "POST", "/b", "x"), ("req", "HEAD", "/c", "y"),
                     ("req", "PUT", "/d", "x"), ("rsp", 100, "GET"), ("rsp", 200, "GET"), ("rsp", 201, "POST"),
                     ("rsp", 200, "HEAD"), ("rsp", 204, "PUT")]
    assert summary(http1_events(REQS, RSPS, step=1)) == whole
    junk = summary(http1_events(REQS + b"\x00\x01garbage\r\n\r\n", RSPS))
    assert junk[:4] == whole[:4] and ("anomaly", "http1_bad_start_line") in junk


def test_http1_connect_and_h2c_switch():
    ev = summary(http1_events(b"CONNECT abc:443 HTTP/1.1\r\nHost: abc:443\r\n\r\n\x16\x03\x01",
                              b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03"))
    assert ev[-1] == ("switch", "connect", b"\x16\x03\x01", b"\x16\x03\x03")
    ev = summary(http1_events(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                              b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + PREFACE,
                              b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                              + frame(4, 0, 0, b"")))
    assert ev[-1] == ("switch", "h2c", PREFACE, frame(4, 0, 0, b""))


def test_http1_gap_resyncs_at_next_message():
    conn = Http1Connection()
    ev = conn.feed(0, Timed.at(b"GET /a HTTP/1.1\r\nHo", 1))
    ev += conn.gap(0, 100)
    ev += conn.feed(0, Timed.at(b"tail of something\r\nGET /z HTTP/1.1\r\nHost: q\r\n\r\n", 2))
    assert [e.target for e in ev if isinstance(e, Http1Request)] == ["/z"]
    assert {"http1_lost_sync", "http1_resync"} <= {e.kind for e in ev if isinstance(e, Anomaly)}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(max_size=60)), max_size=30))
def test_http1_garbage_never_raises(chunks):
    conn = Http1Connection()
    for d, data in chunks:
        conn.feed(d, Timed.at(data, 1))
        assert all(len(x.buf) <= 16 * 64 * 1024 + 60 for x in conn.dirs)
    conn.close()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(REQS)), st.integers(0, len(RSPS)), st.binary(max_size=20))
def test_http1_truncated_and_spliced_never_raises(a, b, junk):
    http1_events(REQS[:a] + junk + REQS[a:], RSPS[b:])


def test_proxy_v2_parse_and_need_more_at_every_prefix():
    hdr = proxy_v2_header()
    for n in range(len(hdr)):
        assert proxy_v2.parse(hdr[:n]) is None
    p = proxy_v2.parse(hdr + b"GET")
    assert p.length == len(hdr) and p.src == "10.0.0.1" and p.dport == 8080
    assert p.peer_identity == "spiffe://cluster.local/ns/a/sa/b" and p.command == "proxy"
    with pytest.raises(proxy_v2.ProxyV2Error):
        proxy_v2.parse(hdr[:12] + b"\x31" + hdr[13:])
    with pytest.raises(proxy_v2.ProxyV2Error):
        proxy_v2.parse(b"GET / HTTP/1.1\r\n\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_proxy_v2_garbage(data):
    for buf in (data, proxy_v2.SIGNATURE + data):
        try:
            proxy_v2.parse(buf)
        except proxy_v2.ProxyV2Error:
            pass


def test_header_helpers():
    assert forwarded_for('for="10.1.2.3:4567";host=svc.ns.svc.cluster.local') == "10.1.2.3:4567"
    assert forwarded_for('For="[2001:db8::1]:80", for=1.2.3.4') == "[2001:db8::1]:80"
    assert forwarded_for(None) is None and trace_id("garbage") is None


def _h2(c2s, s2c):
    conn, obs = Http2Connection(), HboneObserver()
    for d, data in ((0, c2s), (1, s2c)):
        for e in conn.feed(d, Timed.at(data, 3)):
            obs.feed(e)
    obs.close(99)
    return obs


def test_hbone_end_reasons():
    enc = hpack.Encoder()
    connect = lambda sid, auth: frame(1, 4, sid, enc.encode([(":method", "CONNECT"), (":authority", auth)]))  # noqa
    c2s = PREFACE + connect(1, "a:1") + connect(3, "b:2") + connect(5, "c:3") + connect(7, "d:4")
    c2s += frame(0, 1, 1, b"bye") + frame(3, 0, 3, struct.pack(">I", 8))
    enc2 = hpack.Encoder()
    s2c = frame(4, 0, 0, b"") + frame(1, 4, 1, enc2.encode([(":status", "200")])) + frame(0, 1, 1, b"")
    s2c += frame(1, 4, 5, enc2.encode([(":status", "503")])) + frame(7, 0, 0, struct.pack(">II", 5, 0))
    obs = _h2(c2s, s2c)
    got = {sid: (s.status, s.end_reason) for sid, s in obs.streams.items()}
    assert got == {1: (200, "end_stream"), 3: (None, "rst_stream:CANCEL"), 5: (503, "goaway"), 7: (None, "goaway")}
    assert obs.streams[7].end_ts == 3 and obs.streams[5].end_ts == 99


def test_plain_tcp_http1_and_h2c_prior_knowledge_on_any_port():
    enc = hpack.Encoder()
    h2c = [(0, PREFACE + frame(4, 0, 0, b"") + frame(1, 5, 1, enc.encode([(":method", "GET"), (":path", "/"),
                                                                          (":scheme", "http"),
                                                                          (":authority", "x")]))),
           (1, frame(4, 0, 0, b""))]
    plain = [(0, REQS), (1, RSPS)]
    a = StreamAnalyzer()
    for s in segments(h2c, server=("10.0.0.2", 31337)) + segments(plain, client=("10.0.0.1", 40001),
                                                                   server=("10.0.0.3", 1234)):
        a.feed(s)
    r = a.close()
    assert [h["headers"][0] for h in r.http2_headers] == [(":method", "GET")]
    assert [(q["method"], q["path"], q["status"]) for q in r.requests] == [
        ("GET", "/a", 200), ("POST", "/b", 201), ("HEAD", "/c", 200), ("PUT", "/d", 204)]
    assert not r.tunnels and not r.streams


def test_h2c_connect_tunnel_with_proxy_v2_inside():
    enc, enc2 = hpack.Encoder(), hpack.Encoder()
    inner = proxy_v2_header() + b"GET /in HTTP/1.1\r\nHost: app\r\n\r\n"
    c2s = PREFACE + frame(1, 4, 1, enc.encode([(":method", "CONNECT"), (":authority", "10.9.9.9:80")]))
    c2s += frame(0, 0, 1, inner)
    s2c = frame(4, 0, 0, b"") + frame(1, 4, 1, enc2.encode([(":status", "200")]))
    s2c += frame(0, 1, 1, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    a = StreamAnalyzer()
    for s in segments([(0, c2s), (1, s2c)], server=("10.0.0.2", 15008)):
        a.feed(s)
    r = a.close()
    (t,) = r.tunnels
    assert t["tls_version"] is None and t["evidence"] == "connect" and t["streams"] == 1
    (s,) = r.streams
    assert s["inner"] == "proxy-v2" and s["peer_identity"] == "spiffe://cluster.local/ns/a/sa/b"
    assert s["end_reason"] == "capture_end"
    assert [(q["path"], q["status"], q["tunnel_id"], q["stream_id"]) for q in r.requests] == [("/in", 404, "c0", 1)]

"""TLS stages: records, handshake parsing, key logs, TLS 1.3 suites, KeyUpdate, mid-stream key and sequence search.

Encrypted records are built here with `cryptography`'s own HKDF and AEADs (not with hbonecap's key schedule), so the
decryption path is checked against an independent derivation.
"""
from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings, strategies as st

from hbone_builder import TlsPair
from hbonecap.errors import KeylogError
from hbonecap.streams.anomalies import Anomaly
from hbonecap.streams.tls.handshake import HandshakeError, parse_client_hello, parse_server_hello
from hbonecap.streams.tls.keylog import KeyLog, load
from hbonecap.streams.tls.records import RecordReader
from hbonecap.streams.tls.session import TlsAppData, TlsPlainGap, TlsSession
from hbonecap.streams.timeline import Timed

SUITES = {0x1301: (AESGCM, 16, hashes.SHA256()), 0x1302: (AESGCM, 32, hashes.SHA384()),
          0x1303: (ChaCha20Poly1305, 32, hashes.SHA256())}


def expand_label(secret, label, length, h):
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(h, length, info).derive(secret)


class Protect:
    """Independent TLS 1.3 record protection (RFC 8446 5.2/5.3) for building test records."""

    def __init__(self, suite, secret):
        self.suite, self.secret = suite, secret
        self._keys()

    def _keys(self):
        aead, klen, h = SUITES[self.suite]
        self.aead = aead(expand_label(self.secret, b"key", klen, h))
        self.iv = expand_label(self.secret, b"iv", 12, h)
        self.seq = 0

    def update(self):
        _, _, h = SUITES[self.suite]
        self.secret = expand_label(self.secret, b"traffic upd", h.digest_size, h)
        self._keys()

    def record(self, ctype, data):
        inner = data + bytes([ctype])
        header = struct.pack(">BHH", 23, 0x0303, len(inner) + 16)
        nonce = (int.from_bytes(self.iv, "big") ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return header + self.aead.encrypt(nonce, inner, header)


def hs(mtype, body):
    return bytes([mtype]) + len(body).to_bytes(3, "big") + body


def plain_record(ctype, data):
    return struct.pack(">BHH", ctype, 0x0303, len(data)) + data


def client_hello(random):
    ext = struct.pack(">HHB", 43, 3, 2) + b"\x03\x04"
    ext += struct.pack(">HHH", 16, 5, 3) + b"\x02h2"
    body = b"\x03\x03" + random + b"\x00" + struct.pack(">H", 6) + b"\x13\x01\x13\x02\x13\x03" + b"\x01\x00"
    body += struct.pack(">H", len(ext)) + ext
    return hs(1, body)


def server_hello(random, suite):
    ext = struct.pack(">HHH", 43, 2, 0x0304)
    body = b"\x03\x03" + random + b"\x00" + struct.pack(">HB", suite, 0) + struct.pack(">H", len(ext)) + ext
    return hs(2, body)


def session_bytes(suite, key_update=True):
    """A synthetic TLS 1.3 connection: the wire in capture order [(direction, bytes)], both directions' bytes, its
    key log text and the expected plaintext per direction."""
    h = SUITES[suite][2]
    cr, sr = os.urandom(32), os.urandom(32)
    sec = {n: os.urandom(h.digest_size) for n in ("CHTS", "SHTS", "CATS", "SATS")}
    keylog = "".join(f"{label} {cr.hex()} {sec[n].hex()}\n" for label, n in (
        ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CHTS"), ("SERVER_HANDSHAKE_TRAFFIC_SECRET", "SHTS"),
        ("CLIENT_TRAFFIC_SECRET_0", "CATS"), ("SERVER_TRAFFIC_SECRET_0", "SATS")))
    c_hs, s_hs, c_app, s_app = (Protect(suite, sec[n]) for n in ("CHTS", "SHTS", "CATS", "SATS"))
    wire = [(0, plain_record(22, client_hello(cr))),
            (1, plain_record(22, server_hello(sr, suite)) + plain_record(20, b"\x01")
             + s_hs.record(22, hs(8, struct.pack(">H", 9) + struct.pack(">HHH", 16, 5, 3) + b"\x02h2"))
             + s_hs.record(22, hs(20, os.urandom(h.digest_size)))),
            (0, plain_record(20, b"\x01") + c_hs.record(22, hs(20, os.urandom(h.digest_size)))
             + c_app.record(23, b"hello ")),
            (1, s_app.record(23, b"world "))]
    if key_update:
        wire.append((0, c_app.record(22, hs(24, b"\x01"))))  # update_requested
        c_app.update()
        wire.append((1, s_app.record(22, hs(24, b"\x00"))))
        s_app.update()
    for i in range(5):
        wire.append((0, c_app.record(23, b"c%d " % i)))
        wire.append((1, s_app.record(23, b"s%d " % i)))
    c = b"".join(b for d, b in wire if d == 0)
    s = b"".join(b for d, b in wire if d == 1)
    return wire, c, s, keylog, b"hello c0 c1 c2 c3 c4 ", b"world s0 s1 s2 s3 s4 "


def plaintext(events):
    out = [bytearray(), bytearray()]
    for e in events:
        if isinstance(e, TlsAppData):
            out[e.direction] += e.data.data
    return bytes(out[0]), bytes(out[1])


def feed_all(session, wire, step=None):
    ev = []
    for d, data in wire:
        n = step or len(data)
        for i in range(0, len(data), n):
            ev += session.feed(d, Timed.at(data[i:i + n], 7))
    return ev + session.close()


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_tls13_suites_with_key_update(suite):
    wire, c, s, keylog, want_c, want_s = session_bytes(suite)
    t = TlsSession(KeyLog.parse(keylog))
    ev = feed_all(t, wire)
    assert plaintext(ev) == (want_c, want_s)
    assert t.alpn == "h2" and t.version_name == "TLS 1.3" and t.suite == suite
    assert not [e for e in ev if isinstance(e, Anomaly)]


def test_encrypted_fatal_alert_is_seen():
    from hbonecap.streams.tls.session import TlsAlert

    wire, c, s, keylog, *_ = session_bytes(0x1301, key_update=False)
    # the server's next application-key record (sequence 6) is a fatal bad_certificate alert
    h = SUITES[0x1301][2]
    sats = bytes.fromhex([ln.split()[2] for ln in keylog.splitlines() if ln.startswith("SERVER_TRAFFIC")][0])
    prot = Protect(0x1301, sats)
    prot.seq = 6
    t = TlsSession(KeyLog.parse(keylog))
    ev = feed_all(t, wire + [(1, prot.record(21, b"\x02\x2a"))])
    alerts = [e for e in ev if isinstance(e, TlsAlert)]
    assert [(a.level, a.name) for a in alerts] == [(2, "bad_certificate")] and h


def test_whole_byte_by_byte_and_junk_same_events():
    wire, c, s, keylog, want_c, want_s = session_bytes(0x1302)
    whole = feed_all(TlsSession(KeyLog.parse(keylog)), wire)
    ones = feed_all(TlsSession(KeyLog.parse(keylog)), wire, step=1)
    assert plaintext(whole) == plaintext(ones) == (want_c, want_s)
    assert [type(e) for e in whole] != [] and [e for e in whole if not isinstance(e, TlsAppData)] == \
        [e for e in ones if not isinstance(e, TlsAppData)]
    junk = feed_all(TlsSession(KeyLog.parse(keylog)), wire + [(0, b"\x17\x03")])
    assert plaintext(junk) == (want_c, want_s)
    assert [e.kind for e in junk if isinstance(e, Anomaly)] == ["tls_truncated_record"]


@pytest.mark.parametrize("drop_records", [1, 3])
def test_mid_connection_start_finds_generation_and_sequence(drop_records):
    wire, c, s, keylog, want_c, want_s = session_bytes(0x1303)
    # cut the client side after its KeyUpdate (generation 1) and a few records, mid-record
    reader, recs, pos = RecordReader(), [], 0
    for e in reader.feed(Timed.at(c, 0)):
        recs.append(e.offset)
    cut = recs[-5 + drop_records] + 3
    t = TlsSession(KeyLog.parse(keylog), midstream=True)
    ev = feed_all(t, [(0, c[cut:]), (1, s[len(s) // 2:])])
    got_c, got_s = plaintext(ev)
    assert want_c.endswith(got_c) and got_c and want_s.endswith(got_s) and got_s
    assert "tls_midstream_keys" in [e.kind for e in ev if isinstance(e, Anomaly)]


def test_mid_connection_search_among_many_logged_connections_is_bounded():
    from hbonecap.streams.tls.session import TrialBudget

    wire, c, s, keylog, want_c, _ = session_bytes(0x1302, key_update=False)
    noise = "".join(f"CLIENT_TRAFFIC_SECRET_0 {os.urandom(32).hex()} {os.urandom(48).hex()}\n"
                    f"SERVER_TRAFFIC_SECRET_0 {os.urandom(32).hex()} {os.urandom(48).hex()}\n" for _ in range(60))
    reader_offsets = [e.offset for e in RecordReader().feed(Timed.at(c, 0))]
    cut = reader_offsets[-3]  # mid-connection: the last three client records
    t = TlsSession(KeyLog.parse(noise + keylog), midstream=True)
    ev = feed_all(t, [(0, c[cut:])])
    assert plaintext(ev)[0] == want_c[-9:]  # "c2 c3 c4 "
    # a connection nothing in the key log decrypts costs a bounded number of trials, shared by the analysis
    budget = TrialBudget(left=5000)
    t = TlsSession(KeyLog.parse(noise), midstream=True, shared_budget=budget)
    ev = feed_all(t, [(0, c[cut:])])
    assert plaintext(ev) == (b"", b"") and budget.left == 0
    assert "tls_trials_exhausted" in [e.kind for e in ev if isinstance(e, Anomaly)]


def test_lost_record_found_by_sequence_search():
    wire, c, s, keylog, want_c, _ = session_bytes(0x1301, key_update=False)
    lost = [i for i, (d, _) in enumerate(wire) if d == 0][-2]  # the client record carrying "c3 "
    t = TlsSession(KeyLog.parse(keylog))
    ev = []
    for i, (d, data) in enumerate(wire):
        ev += t.gap(d, len(data)) if i == lost else t.feed(d, Timed.at(data, i))
    assert plaintext(ev)[0] == want_c.replace(b"c3 ", b"")
    kinds = [e.kind for e in ev if isinstance(e, Anomaly)]
    assert "tls_records_skipped" in kinds and any(isinstance(e, TlsPlainGap) for e in ev)


def test_without_key_and_with_wrong_key():
    wire, c, s, keylog, *_ = session_bytes(0x1301)
    t = TlsSession(None)
    ev = feed_all(t, wire)
    n_records = len(RecordReader().feed(Timed.at(c, 0))) + len(RecordReader().feed(Timed.at(s, 0)))
    assert plaintext(ev) == (b"", b"") and t.why_not == "no key log" and len(t.timeline) == n_records
    other = session_bytes(0x1301)[3]
    t = TlsSession(KeyLog.parse(other))
    feed_all(t, wire)
    assert t.why_not == "client random not in the key log"


def test_real_tls13_handshake_facts(tmp_path):
    pair = TlsPair(tmp_path / "k.log")
    pair.send(0, b"ping")
    pair.send(1, b"pong")
    c = b"".join(b for d, b in pair.wire if d == 0)
    t = TlsSession(load(tmp_path / "k.log"))
    ev = feed_all(t, pair.wire)
    assert plaintext(ev) == (b"ping", b"pong")
    assert t.client_hello.sni is None and "h2" in t.client_hello.alpn and t.alpn == "h2"
    assert t.spiffe == ["spiffe://cluster.local/ns/default/sa/sleep", "spiffe://cluster.local/ns/default/sa/httpbin"]
    ch = next(i for i in range(len(c)) if c[i] == 1)  # first handshake message type byte inside the record
    body = c[5 + 4:5 + 4 + int.from_bytes(c[6:9], "big")]
    assert parse_client_hello(body).random == t.client_hello.random and ch


@pytest.mark.parametrize("ciphers,suite", [("ECDHE-ECDSA-AES128-GCM-SHA256", 0xC02B),
                                           ("ECDHE-ECDSA-AES256-GCM-SHA384", 0xC02C),
                                           ("ECDHE-ECDSA-CHACHA20-POLY1305", 0xCCA9)])
def test_real_tls12_aead_suites(tmp_path, ciphers, suite):
    pair = TlsPair(tmp_path / "k.log", tls12_ciphers=ciphers)
    pair.send(0, b"GET / HTTP/1.1\r\n\r\n")
    pair.send(1, b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 40000)
    t = TlsSession(load(tmp_path / "k.log"))
    ev = feed_all(t, pair.wire)
    assert t.version_name == "TLS 1.2" and t.suite == suite and t.alpn == "h2"
    assert plaintext(ev) == (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 40000)
    assert t.spiffe[1] == "spiffe://cluster.local/ns/default/sa/httpbin"  # TLS 1.2 certificates are in clear
    assert not [e for e in ev if isinstance(e, Anomaly)]


@pytest.mark.parametrize("side", [0, 1])
def test_one_way_captures_decrypt(tmp_path, side):
    """Only one direction captured (tunnel devices, asymmetric routes): the other side's hello is missing."""
    pair = TlsPair(tmp_path / "k.log")
    pair.send(0, b"ping")
    pair.send(1, b"pong")
    TlsPair(tmp_path / "k.log")  # another logged connection the trial must skip
    t = TlsSession(load(tmp_path / "k.log"))
    ev = feed_all(t, [(d, b) for d, b in pair.wire if d == side])
    assert plaintext(ev)[side] == (b"ping", b"pong")[side]
    kinds = [e.kind for e in ev if isinstance(e, Anomaly)]
    assert kinds == ["tls_server_hello_missing" if side == 0 else "tls_client_hello_missing"]


def test_client_hello_cut_at_every_offset(tmp_path):
    pair = TlsPair(tmp_path / "k.log")
    c = b"".join(b for d, b in pair.wire if d == 0)
    length = int.from_bytes(c[6:9], "big")
    body = c[9:9 + length]
    for n in range(len(body)):
        try:
            parse_client_hello(body[:n])
        except HandshakeError:
            pass
    sbody = b"".join(b for d, b in pair.wire if d == 1)
    sh = sbody[9:9 + int.from_bytes(sbody[6:9], "big")]
    for n in range(len(sh)):
        try:
            parse_server_hello(sh[:n])
        except HandshakeError:
            pass
    # and the TLS session on the cut connection never raises
    for n in range(0, len(c), 7):
        TlsSession(None).feed(0, Timed.at(c[:n], 1))


def test_keylog_loader_errors(tmp_path):
    with pytest.raises(KeylogError):
        load(tmp_path / "missing.log")
    p = tmp_path / "bad.log"
    p.write_text("nonsense\n")
    with pytest.raises(KeylogError):
        load(p)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_keylog_garbage_never_raises(data):
    kl = KeyLog.parse(data)
    assert all(a.index is not None for a in kl.anomalies)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.binary(max_size=80)), max_size=20), st.booleans())
def test_session_garbage_never_raises_and_stays_bounded(chunks, midstream):
    wire, c, s, keylog, *_ = _SMALL
    t = TlsSession(KeyLog.parse(keylog), midstream=midstream, max_trials=2000)
    for d, data in chunks:
        t.feed(d, Timed.at(data, 1))
        assert all(len(r.buf) <= (1 << 14) + 2048 + 5 + 80 or r.state == "lost" for r in t.readers)
        assert all(len(r.buf) <= 64 * 1024 + 85 for r in t.readers)
    t.close()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 2000), st.binary(max_size=30))
def test_session_truncated_and_spliced_never_raises(cut_c, cut_s, junk):
    wire, c, s, keylog, *_ = _SMALL
    t = TlsSession(KeyLog.parse(keylog), max_trials=2000)
    t.feed(0, Timed.at(c[:cut_c] + junk + c[cut_c:], 1))
    t.feed(1, Timed.at(s[cut_s:], 1))
    t.close()


_SMALL = session_bytes(0x1301)

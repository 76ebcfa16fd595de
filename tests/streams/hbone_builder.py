"""Builds real HBONE byte exchanges for tests: TLS 1.3 (Python's ssl, mutual auth, SPIFFE certificates, ALPN h2,
no SNI) carrying HTTP/2 CONNECT streams, with the key log Python writes. Everything in memory (MemoryBIO), then
cut into TCP segments with a handshake, so the StreamAnalyzer sees what a capture would give it.
"""
from __future__ import annotations

import datetime
import ssl
import struct
import tempfile
from pathlib import Path

import hpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hbonecap.layers.segments import TcpSegment
from hbonecap.streams.http2.frames import PREFACE

_PKI: dict[str, Path] = {}


def _pki() -> dict[str, Path]:
    if _PKI:
        return _PKI
    d = Path(tempfile.mkdtemp(prefix="hbone-pki-"))
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, sa in (("client", "sleep"), ("server", "httpbin")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(2 if role == "client" else 3)
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/default/sa/{sa}")]), critical=True)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _PKI.update({"dir": d, "ca": d / "ca.pem", "client": d / "client.pem", "server": d / "server.pem"})
    return _PKI


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


class TlsPair:
    """A client and a server TLS 1.3 endpoint connected through memory; records every byte each side sends."""

    def __init__(self, keylog: Path, suite: str | None = None, tls12_ciphers: str | None = None) -> None:
        pki = _pki()
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.minimum_version = cctx.maximum_version = ssl.TLSVersion.TLSv1_3
        if tls12_ciphers:
            cctx.minimum_version = cctx.maximum_version = ssl.TLSVersion.TLSv1_2
            cctx.set_ciphers(tls12_ciphers)
        cctx.load_verify_locations(pki["ca"])
        cctx.load_cert_chain(pki["client"])
        cctx.set_alpn_protocols(["h2"])
        cctx.keylog_filename = str(keylog)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12_ciphers else ssl.TLSVersion.TLSv1_3
        sctx.load_cert_chain(pki["server"])
        sctx.load_verify_locations(pki["ca"])
        sctx.verify_mode = ssl.CERT_REQUIRED
        sctx.set_alpn_protocols(["h2"])
        if suite:
            sctx.set_ciphersuites(suite) if hasattr(sctx, "set_ciphersuites") else None
        self.cin, self.cout, self.sin, self.sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        self.c = cctx.wrap_bio(self.cin, self.cout)
        self.s = sctx.wrap_bio(self.sin, self.sout, server_side=True)
        self.wire: list[tuple[int, bytes]] = []
        self._handshake()

    def _pump(self) -> None:
        for _ in range(8):
            moved = False
            data = self.cout.read()
            if data:
                self.wire.append((0, data))
                self.sin.write(data)
                moved = True
            data = self.sout.read()
            if data:
                self.wire.append((1, data))
                self.cin.write(data)
                moved = True
            if not moved:
                return

    def _handshake(self) -> None:
        for _ in range(20):
            done = 0
            for end in (self.c, self.s):
                try:
                    end.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            self._pump()
            if done == 2:
                break
        # let the server's NewSessionTicket go out
        try:
            self.c.read(1)
        except ssl.SSLWantReadError:
            pass
        self._pump()

    def send(self, d: int, data: bytes) -> None:
        (self.c if d == 0 else self.s).write(data)
        self._pump()
        peer = self.s if d == 0 else self.c
        try:
            while peer.pending() or True:
                if not peer.read(1 << 20):
                    break
        except ssl.SSLWantReadError:
            pass


def hbone_exchange(streams: list[tuple[str, dict, list[tuple[int, bytes]]]], keylog: Path,
                   extra_headers_first: bool = True) -> list[tuple[int, bytes]]:
    """A TLS 1.3 + HTTP/2 connection with one CONNECT stream per entry: (authority, extra headers, [(direction,
    tunnelled bytes), ...]). Returns the TCP payload exchange [(direction, bytes)]."""
    t = TlsPair(keylog)
    enc = [hpack.Encoder(), hpack.Encoder()]
    t.send(0, PREFACE + frame(4, 0, 0, b""))
    t.send(1, frame(4, 0, 0, struct.pack(">HI", 4, 4 << 20)) + frame(4, 1, 0, b""))
    t.send(0, frame(4, 1, 0, b""))
    for i, (authority, extra, chunks) in enumerate(streams):
        sid = 2 * i + 1
        hs = [(":method", "CONNECT"), (":authority", authority)] + list(extra.items())
        t.send(0, frame(1, 4, sid, enc[0].encode(hs)))
        t.send(1, frame(1, 4, sid, enc[1].encode([(":status", "200")])))
        for d, data in chunks:
            for pos in range(0, len(data), 16384):
                t.send(d, frame(0, 0, sid, data[pos:pos + 16384]))
        t.send(0, frame(0, 1, sid, b""))
        t.send(1, frame(0, 1, sid, b""))
    t.send(0, frame(7, 0, 0, struct.pack(">II", 2 * len(streams) - 1, 0)))
    return t.wire


def segments(exchange: list[tuple[int, bytes]], client=("10.0.0.1", 40000), server=("10.0.0.2", 15008),
             t0: int = 1_700_000_000 * 10**9, mss: int = 1400, start_at: int = 0, capture: str = "synthetic",
             handshake: bool = True) -> list[TcpSegment]:
    """TCP segments for a payload exchange (one segment per `mss` bytes, 10 us apart).

    `start_at` drops every segment before that byte count of the exchange (a capture starting mid-connection)."""
    out: list[TcpSegment] = []
    seq = [1000, 5000]
    ts = t0
    idx = 0
    ends = (client, server)

    def emit(d, flags, payload=b""):
        nonlocal ts, idx
        idx += 1
        ts += 10_000
        src, dst = ends[d], ends[1 - d]
        out.append(TcpSegment(capture, idx, ts, "", src[0], src[1], dst[0], dst[1], flags, seq[d] & 0xFFFFFFFF,
                              seq[1 - d] & 0xFFFFFFFF, payload, len(payload)))
        seq[d] += len(payload) + (1 if flags & 0x03 else 0)

    if handshake:
        emit(0, 0x02)
        seq[0] -= 1
        out[-1] = out[-1]
        seq[0] += 1
        emit(1, 0x12)
        emit(0, 0x10)
    sent = 0
    for d, data in exchange:
        for pos in range(0, len(data), mss):
            chunk = data[pos:pos + mss]
            if sent >= start_at:
                emit(d, 0x18, chunk)
            else:
                seq[d] += len(chunk)
                ts += 10_000
            sent += len(chunk)
    emit(0, 0x11)
    emit(1, 0x11)
    return out


def proxy_v2_header(src=("10.0.0.1", 40000), dst=("10.0.0.2", 8080), identity=b"spiffe://cluster.local/ns/a/sa/b"):
    import ipaddress

    body = ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed + struct.pack(">HH", src[1],
                                                                                                      dst[1])
    body += struct.pack(">BH", 0xD0, len(identity)) + identity
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", len(body)) + body

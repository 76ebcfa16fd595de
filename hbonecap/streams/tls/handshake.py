"""TLS handshake messages: framing across records and the facts an observer wants from them.

Follows RFC 8446 sections 4 (handshake framing: type, 24-bit length), 4.1.2 (ClientHello), 4.1.3 (ServerHello,
HelloRetryRequest random), 4.2 (extensions: server_name RFC 6066 section 3, ALPN RFC 7301, supported_versions,
early_data), 4.3.1 (EncryptedExtensions), 4.4.2 (Certificate, with per-entry extensions), 4.6.3 (KeyUpdate), and
RFC 5246 section 7.4 (TLS 1.2 ServerHello and Certificate).

Strategy: `HandshakeReader` re-frames handshake messages from the plaintext of handshake records of one direction
(messages may span records or share one). The `parse_*` functions are pure: they return a dataclass or raise
`HandshakeError` (a `ProtocolError`) for malformed bodies; truncation cannot happen because they receive whole
messages. Certificates are parsed with `cryptography.x509`; SPIFFE ids are the ``spiffe://`` URI SANs of the leaf.

Limits: messages longer than `MAX_MESSAGE` are skipped (reported by the caller); at most `MAX_EXTENSIONS`
extensions and `MAX_CERTS` certificates are walked.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from ...errors import ProtocolError

CLIENT_HELLO, SERVER_HELLO, NEW_SESSION_TICKET, END_OF_EARLY_DATA = 1, 2, 4, 5
ENCRYPTED_EXTENSIONS, CERTIFICATE, SERVER_KEY_EXCHANGE, CERTIFICATE_REQUEST = 8, 11, 12, 13
SERVER_HELLO_DONE, CERTIFICATE_VERIFY, CLIENT_KEY_EXCHANGE, FINISHED, KEY_UPDATE = 14, 15, 16, 20, 24

EXT_SERVER_NAME, EXT_ALPN, EXT_EARLY_DATA, EXT_SUPPORTED_VERSIONS = 0, 16, 42, 43
HRR_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()

MAX_MESSAGE = 1 << 20
MAX_EXTENSIONS = 256
MAX_CERTS = 32

U16 = struct.Struct(">H")
HS_HEADER = struct.Struct(">I")   # type (8) + length (24)

VERSION_NAMES = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}


class HandshakeError(ProtocolError):
    """A handshake message body that does not parse."""


class _Cursor:
    __slots__ = ("b", "p", "end")

    def __init__(self, b: bytes, p: int = 0, end: int | None = None) -> None:
        self.b, self.p, self.end = b, p, len(b) if end is None else end

    def take(self, n: int) -> bytes:
        if self.p + n > self.end:
            raise HandshakeError(f"field of {n} bytes runs past the end of its container")
        v = self.b[self.p:self.p + n]
        self.p += n
        return v

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return U16.unpack(self.take(2))[0]

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vec(self, width: int) -> bytes:
        n = int.from_bytes(self.take(width), "big")
        return self.take(n)

    def left(self) -> int:
        return self.end - self.p


def _extensions(c: _Cursor) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    if not c.left():
        return out
    body = _Cursor(c.vec(2))
    for _ in range(MAX_EXTENSIONS):
        if not body.left():
            break
        etype = body.u16()
        out.setdefault(etype, body.vec(2))
    return out


def _alpn_list(data: bytes) -> list[str]:
    c = _Cursor(_Cursor(data).vec(2))
    names = []
    for _ in range(64):
        if not c.left():
            break
        names.append(c.vec(1).decode("ascii", "backslashreplace"))
    return names


def _sni(data: bytes) -> str | None:
    c = _Cursor(_Cursor(data).vec(2))
    for _ in range(16):
        if not c.left():
            break
        kind = c.u8()
        name = c.vec(2)
        if kind == 0:
            return name.decode("ascii", "backslashreplace")
    return None


@dataclass(slots=True)
class ClientHello:
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    sni: str | None
    alpn: tuple[str, ...]
    supported_versions: tuple[int, ...]
    early_data: bool


@dataclass(slots=True)
class ServerHello:
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    version: int            # negotiated: supported_versions if present, else legacy_version
    alpn: str | None        # TLS 1.2 carries ALPN here; TLS 1.3 in EncryptedExtensions
    retry: bool             # HelloRetryRequest


@dataclass(slots=True)
class Certificates:
    chain: list[bytes] = field(default_factory=list)   # DER, leaf first


def parse_client_hello(body: bytes) -> ClientHello:
    c = _Cursor(body)
    version = c.u16()
    random = c.take(32)
    session_id = c.vec(1)
    suites_raw = c.vec(2)
    suites = tuple(U16.unpack_from(suites_raw, i)[0] for i in range(0, len(suites_raw) - 1, 2))
    c.vec(1)  # compression methods
    ext = _extensions(c)
    sv: tuple[int, ...] = ()
    if EXT_SUPPORTED_VERSIONS in ext:
        raw = _Cursor(ext[EXT_SUPPORTED_VERSIONS]).vec(1)
        sv = tuple(U16.unpack_from(raw, i)[0] for i in range(0, len(raw) - 1, 2))
    return ClientHello(version, random, session_id, suites,
                       _sni(ext[EXT_SERVER_NAME]) if ext.get(EXT_SERVER_NAME) else None,
                       tuple(_alpn_list(ext[EXT_ALPN])) if EXT_ALPN in ext else (),
                       sv, EXT_EARLY_DATA in ext)


def parse_server_hello(body: bytes) -> ServerHello:
    c = _Cursor(body)
    version = c.u16()
    random = c.take(32)
    session_id = c.vec(1)
    suite = c.u16()
    c.u8()
    ext = _extensions(c)
    selected = version
    if EXT_SUPPORTED_VERSIONS in ext and len(ext[EXT_SUPPORTED_VERSIONS]) >= 2:
        selected = U16.unpack_from(ext[EXT_SUPPORTED_VERSIONS], 0)[0]
    alpn = None
    if EXT_ALPN in ext:
        names = _alpn_list(ext[EXT_ALPN])
        alpn = names[0] if names else None
    return ServerHello(version, random, session_id, suite, selected, alpn, random == HRR_RANDOM)


def parse_encrypted_extensions(body: bytes) -> str | None:
    """The ALPN protocol selected in a TLS 1.3 EncryptedExtensions message, if any."""
    ext = _extensions(_Cursor(body))
    if EXT_ALPN in ext:
        names = _alpn_list(ext[EXT_ALPN])
        return names[0] if names else None
    return None


def parse_certificate(body: bytes, tls13: bool) -> Certificates:
    c = _Cursor(body)
    if tls13:
        c.vec(1)  # certificate_request_context
    lst = _Cursor(c.vec(3))
    chain = []
    for _ in range(MAX_CERTS):
        if not lst.left():
            break
        chain.append(lst.vec(3))
        if tls13:
            lst.vec(2)  # per-certificate extensions
    return Certificates(chain)


def spiffe_ids(der: bytes) -> list[str]:
    """``spiffe://`` URI SANs of a DER certificate ([] when it has none or does not parse)."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound, TypeError):
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.lower().startswith("spiffe://")]


class HandshakeReader:
    """Handshake messages out of the plaintext of one direction's handshake records."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.skip = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        for _ in range(1 << 16):
            if self.skip:
                n = min(self.skip, len(self.buf))
                del self.buf[:n]
                self.skip -= n
            if len(self.buf) < 4:
                break
            head = HS_HEADER.unpack_from(self.buf, 0)[0]
            mtype, length = head >> 24, head & 0xFFFFFF
            if length > MAX_MESSAGE:
                out.append((-1, bytes([mtype])))  # caller reports an oversized message
                self.skip = 4 + length
                continue
            if len(self.buf) < 4 + length:
                break
            out.append((mtype, bytes(self.buf[4:4 + length])))
            del self.buf[:4 + length]
        return out

    def reset(self) -> None:
        self.buf.clear()
        self.skip = 0

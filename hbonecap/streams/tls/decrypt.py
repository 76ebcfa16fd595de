"""TLS record protection: key derivation and AEAD decryption of records (with `cryptography`).

Follows RFC 8446 sections 5.2-5.3 (TLSInnerPlaintext, per-record nonce = iv XOR sequence number, additional data =
record header), 7.1 (HKDF-Expand-Label), 7.2 (KeyUpdate: application_traffic_secret_N+1), 7.3 (traffic keys:
"key", "iv"); RFC 5246 section 5 (PRF with SHA-256, or the suite's hash) and 6.3 (key block); RFC 5288 section 3
(AES-GCM in TLS 1.2: 4-byte implicit salt + 8-byte explicit nonce, additional data = seq || type || version ||
plaintext length); RFC 7905 section 2 (ChaCha20-Poly1305 in TLS 1.2: iv XOR seq, no explicit nonce).

TLS 1.3 suites: TLS_AES_128_GCM_SHA256 (0x1301), TLS_AES_256_GCM_SHA384 (0x1302), TLS_CHACHA20_POLY1305_SHA256
(0x1303). TLS 1.2 suites: the AES-GCM suites of RFC 5288/5289 (RSA, DHE, ECDHE-RSA, ECDHE-ECDSA) and ECDHE
ChaCha20-Poly1305 (RFC 7905). CBC and CCM suites are not supported (`tls_unsupported_suite`).

Strategy: `RecordKeys` holds one direction's AEAD, IV and sequence number and decrypts whole records in one call
(no per-byte work). An authentication failure is not an exception to callers: `decrypt` returns None and the
session layer decides what to try next (other key, other sequence number).
"""
from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

SEQ = struct.Struct(">Q")
AAD12 = struct.Struct(">QBHH")

# suite -> (name, aead, key length, hash)
TLS13_SUITES = {
    0x1301: ("TLS_AES_128_GCM_SHA256", "aesgcm", 16, "sha256"),
    0x1302: ("TLS_AES_256_GCM_SHA384", "aesgcm", 32, "sha384"),
    0x1303: ("TLS_CHACHA20_POLY1305_SHA256", "chacha", 32, "sha256"),
}
TLS12_SUITES = {
    0x009C: ("TLS_RSA_WITH_AES_128_GCM_SHA256", "aesgcm", 16, "sha256"),
    0x009D: ("TLS_RSA_WITH_AES_256_GCM_SHA384", "aesgcm", 32, "sha384"),
    0x009E: ("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", "aesgcm", 16, "sha256"),
    0x009F: ("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", "aesgcm", 32, "sha384"),
    0xC02B: ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "aesgcm", 16, "sha256"),
    0xC02C: ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "aesgcm", 32, "sha384"),
    0xC02F: ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "aesgcm", 16, "sha256"),
    0xC030: ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "aesgcm", 32, "sha384"),
    0xCCA8: ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", "chacha", 32, "sha256"),
    0xCCA9: ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", "chacha", 32, "sha256"),
}
# Names of other common suites, for the tunnels table only.
OTHER_SUITE_NAMES = {
    0x1304: "TLS_AES_128_CCM_SHA256", 0x1305: "TLS_AES_128_CCM_8_SHA256",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", 0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", 0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA", 0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
}


def suite_name(suite: int | None) -> str | None:
    if suite is None:
        return None
    for table in (TLS13_SUITES, TLS12_SUITES):
        if suite in table:
            return table[suite][0]
    return OTHER_SUITE_NAMES.get(suite, f"0x{suite:04x}")


def _hmac(hash_name: str, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hash_name).digest()


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int, hash_name: str) -> bytes:
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = _hmac(hash_name, secret, block + info + bytes([i]))
        out += block
        i += 1
    return out[:length]


def prf12(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: str) -> bytes:
    """TLS 1.2 PRF: P_hash(secret, label + seed)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = _hmac(hash_name, secret, a)
        out += _hmac(hash_name, secret, a + seed)
    return out[:length]


def _aead(kind: str, key: bytes):
    return AESGCM(key) if kind == "aesgcm" else ChaCha20Poly1305(key)


class RecordKeys:
    """One direction's record protection: AEAD + IV + next sequence number."""

    __slots__ = ("version", "suite", "kind", "aead", "iv", "seq", "secret", "hash_name", "key_len", "generation",
                 "label", "_iv_int")

    def __init__(self, version: int, suite: int, key: bytes, iv: bytes, secret: bytes | None = None,
                 label: str = "") -> None:
        table = TLS13_SUITES if version == 0x0304 else TLS12_SUITES
        _, self.kind, self.key_len, self.hash_name = table[suite]
        self.version, self.suite = version, suite
        self.aead = _aead(self.kind, key)
        self.iv = iv
        self._iv_int = int.from_bytes(iv, "big")
        self.seq = 0
        self.secret = secret
        self.generation = 0
        self.label = label

    @classmethod
    def tls13(cls, suite: int, secret: bytes, label: str = "") -> "RecordKeys":
        _, _, key_len, h = TLS13_SUITES[suite]
        key = hkdf_expand_label(secret, b"key", b"", key_len, h)
        iv = hkdf_expand_label(secret, b"iv", b"", 12, h)
        return cls(0x0304, suite, key, iv, secret, label)

    def next_generation(self) -> "RecordKeys":
        """Keys after a KeyUpdate (TLS 1.3 only)."""
        h = self.hash_name
        secret = hkdf_expand_label(self.secret, b"traffic upd", b"", hashlib.new(h).digest_size, h)
        nxt = RecordKeys.tls13(self.suite, secret, self.label)
        nxt.generation = self.generation + 1
        return nxt

    def _nonce13(self, seq: int) -> bytes:
        return (self._iv_int ^ seq).to_bytes(12, "big")

    def decrypt(self, ctype: int, version: int, header: bytes, fragment: bytes, seq: int | None = None):
        """Decrypt one record at `seq` (default: the next one). Returns (content type, plaintext) or None when the
        tag does not verify. Advances the sequence number only on success and only when `seq` is None."""
        use = self.seq if seq is None else seq
        try:
            if self.version == 0x0304:
                inner = self.aead.decrypt(self._nonce13(use), fragment, header)
                # TLSInnerPlaintext: content || type || zeros (padding is rare: look before copying)
                if inner and inner[-1]:
                    result = (inner[-1], inner[:-1])
                else:
                    end = len(inner.rstrip(b"\0"))
                    if end == 0:
                        return None
                    result = (inner[end - 1], inner[:end - 1])
            elif self.kind == "aesgcm":
                if len(fragment) < 8 + 16:
                    return None
                nonce = self.iv + fragment[:8]
                aad = AAD12.pack(use, ctype, version, len(fragment) - 8 - 16)
                result = (ctype, self.aead.decrypt(nonce, fragment[8:], aad))
            else:
                if len(fragment) < 16:
                    return None
                nonce = (int.from_bytes(self.iv, "big") ^ use).to_bytes(12, "big")
                aad = AAD12.pack(use, ctype, version, len(fragment) - 16)
                result = (ctype, self.aead.decrypt(nonce, fragment, aad))
        except InvalidTag:
            return None
        if seq is None:
            self.seq += 1
        else:
            self.seq = seq + 1
        return result


def tls12_keys(suite: int, master: bytes, client_random: bytes, server_random: bytes) -> tuple[RecordKeys, RecordKeys]:
    """(client_write, server_write) record keys of a TLS 1.2 AEAD suite."""
    _, kind, key_len, h = TLS12_SUITES[suite]
    iv_len = 4 if kind == "aesgcm" else 12
    block = prf12(master, b"key expansion", server_random + client_random, 2 * key_len + 2 * iv_len, h)
    ck, sk = block[:key_len], block[key_len:2 * key_len]
    civ, siv = block[2 * key_len:2 * key_len + iv_len], block[2 * key_len + iv_len:]
    return (RecordKeys(0x0303, suite, ck, civ, label="client"), RecordKeys(0x0303, suite, sk, siv, label="server"))


def candidate_suites(secret_len: int) -> list[int]:
    """TLS 1.3 suites whose hash matches a secret of this length (for captures without a ServerHello)."""
    return [s for s, (_, _, _, h) in TLS13_SUITES.items() if hashlib.new(h).digest_size == secret_len]

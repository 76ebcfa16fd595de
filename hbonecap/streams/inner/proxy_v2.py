"""PROXY protocol version 2 header (HAProxy's proxy-protocol.txt, section 2.2), as Istio's waypoint sends it.

Follows the specification's binary header: 12-byte signature, version/command byte (0x2_: version 2; command 0 LOCAL,
1 PROXY), family/protocol byte (0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x12/0x22 UDP, 0x31/0x32 UNIX), 16-bit length
of the address block and TLVs (section 2.2.7). TLV 0xD0 is Istio's peer identity (the source SPIFFE id, 1.22+).

Strategy: `parse(buf)` is pure with three outcomes: a `ProxyHeader` (with the number of bytes it used), `None` when
more bytes are needed, or `ProxyV2Error` (a `ProtocolError`) when the bytes are not a valid v2 header.

Limits: at most `MAX_TLVS` TLVs are walked; the header is at most 12 + 4 + 65535 bytes by construction.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from ...errors import ProtocolError

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEAD = struct.Struct(">BBH")
TLV_HEAD = struct.Struct(">BH")
PORTS = struct.Struct(">HH")
TLV_ISTIO_PEER_IDENTITY = 0xD0
MAX_TLVS = 64


class ProxyV2Error(ProtocolError):
    """Bytes that start like a PROXY v2 header but are not a valid one."""


@dataclass(slots=True)
class ProxyHeader:
    length: int                     # bytes used, signature included
    command: str                    # 'proxy' or 'local'
    family: int                     # the family/protocol byte
    src: str | None
    dst: str | None
    sport: int | None
    dport: int | None
    tlvs: dict[int, bytes] = field(default_factory=dict)

    @property
    def peer_identity(self) -> str | None:
        v = self.tlvs.get(TLV_ISTIO_PEER_IDENTITY)
        return v.decode("utf-8", "backslashreplace") if v is not None else None


def looks_like(buf: bytes) -> bool:
    """True when the available bytes are a prefix of (or start with) the v2 signature."""
    n = min(len(buf), len(SIGNATURE))
    return n > 0 and buf[:n] == SIGNATURE[:n]


def parse(buf: bytes) -> ProxyHeader | None:
    if len(buf) < 16:
        if buf and not looks_like(buf):
            raise ProxyV2Error("no PROXY v2 signature")
        return None
    if buf[:12] != SIGNATURE:
        raise ProxyV2Error("no PROXY v2 signature")
    ver_cmd, fam, length = HEAD.unpack_from(buf, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyV2Error(f"version {ver_cmd >> 4}, expected 2")
    cmd = ver_cmd & 0xF
    if cmd not in (0, 1):
        raise ProxyV2Error(f"unknown command {cmd}")
    total = 16 + length
    if len(buf) < total:
        return None
    body = buf[16:total]
    src = dst = None
    sport = dport = None
    pos = 0
    af = fam >> 4
    if af == 1 and len(body) >= 12:
        src, dst = str(ipaddress.IPv4Address(body[0:4])), str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = PORTS.unpack_from(body, 8)
        pos = 12
    elif af == 2 and len(body) >= 36:
        src, dst = str(ipaddress.IPv6Address(body[0:16])), str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = PORTS.unpack_from(body, 32)
        pos = 36
    elif af == 3 and len(body) >= 216:
        pos = 216
    elif af != 0 and cmd == 1:
        raise ProxyV2Error(f"address block of {len(body)} bytes too short for family 0x{fam:02x}")
    tlvs: dict[int, bytes] = {}
    for _ in range(MAX_TLVS):
        if pos + 3 > len(body):
            break
        t, n = TLV_HEAD.unpack_from(body, pos)
        if pos + 3 + n > len(body):
            raise ProxyV2Error(f"TLV 0x{t:02x} of {n} bytes runs past the header")
        tlvs.setdefault(t, bytes(body[pos + 3:pos + 3 + n]))
        pos += 3 + n
    return ProxyHeader(total, "proxy" if cmd == 1 else "local", fam, src, dst, sport, dport, tlvs)

"""Byte-level builders for crafted test frames (headers written field by field, checksums left zero)."""
from __future__ import annotations

import ipaddress
import struct

import dpkt


def eth(payload: bytes, etype: int = 0x0800, vlans: tuple[int, ...] = ()) -> bytes:
    head = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    for i, v in enumerate(vlans):
        tpid = 0x88A8 if i == 0 and len(vlans) > 1 else 0x8100
        head += struct.pack("!H", tpid) + b""
        head = head  # tag follows its TPID
        head += struct.pack("!H", v)
    return head + struct.pack("!H", etype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0, options: bytes = b"", total=None,
         ttl: int = 64, ident: int = 1) -> bytes:
    ihl = 5 + len(options) // 4
    tl = 4 * ihl + len(payload) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tl, ident, frag, ttl, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + options + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes, *, plen=None) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload) if plen is None else plen, nh, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def tcp(sport: int, dport: int, payload: bytes = b"", *, flags: int = 0x18, seq: int = 1000, ack: int = 1,
        options: bytes = b"", win: int = 65535) -> bytes:
    off = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, win, 0, 0) + options + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def geneve(vni: int, inner: bytes, proto: int = 0x6558, options: bytes = b"", version: int = 0) -> bytes:
    return struct.pack("!BBHI", (version << 6) | (len(options) // 4), 0, proto, vni << 8) + options + inner


def vxlan(vni: int, inner: bytes, flags: int = 0x08) -> bytes:
    return struct.pack("!BBHI", flags, 0, 0, vni << 8) + inner


def write_pcap(path, frames, linktype: int = 1, t0: float = 1_700_000_000.0, nano: bool = False) -> None:
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=linktype, nano=nano, snaplen=262144)
        for i, fr in enumerate(frames):
            w.writepkt(fr, ts=t0 + i * 0.001)

"""Synthetic capture for the decode benchmark: about 1M packets of what an ambient node sees.

Mix (by packet): 40% plain pod TCP, 40% another pod's TCP inside Geneve (VNI 1001/1000, as on istioout /
a ztunnel's eth0), 20% TCP to port 15008 with TLS-record-shaped payloads (HBONE). Payload sizes vary from 0 to
1400 bytes; about 550 bytes per packet on average. Records are written directly (no per-packet library call).
Usage: python benchmarks/generate.py OUT.pcap [--packets N]
"""
from __future__ import annotations

import argparse
import random
import struct


def _ip(a: int) -> bytes:
    return struct.pack("!I", a)


def ipv4(src: int, dst: int, proto: int, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, _ip(src), _ip(dst)) + payload


def tcp(sport, dport, seq, ack, flags, payload: bytes) -> bytes:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", seq & 0xFFFFFFFF, ack & 0xFFFFFFFF)
    return struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 8 << 4, flags, 502, 0, 0) + opts + payload


def eth(payload: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + payload


def udp(sport, dport, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def geneve(vni: int, inner: bytes) -> bytes:
    return struct.pack("!BBHI", 0, 0, 0x6558, vni << 8) + inner


POD_A, POD_A2, POD_B, SVC = 0x0AF40105, 0x0AF40106, 0x0AF40207, 0x0A600307
NODE_A, NODE_B = 0xAC120002, 0xAC120003


def frames(n: int, seed: int = 1):
    rng = random.Random(seed)
    blob = bytes(rng.getrandbits(8) for _ in range(4096))
    seq = {}
    for i in range(n):
        kind = rng.random()
        size = rng.choice((0, 0, 60, 200, 517, 1000, 1400, 1400))
        conn = rng.randrange(64)
        sport = 40000 + conn
        group = 0 if kind < 0.4 else 1 if kind < 0.8 else 2
        s = seq.get((group, conn), 1000)
        seq[(group, conn)] = s + size
        off = rng.randrange(0, 4096 - 1400)
        payload = blob[off:off + size]
        if kind < 0.4:
            yield eth(ipv4(POD_A, SVC, 6, tcp(sport, 9080, s, 1, 0x18 if size else 0x10, payload)))
        elif kind < 0.8:
            inner = eth(ipv4(POD_A2, SVC, 6, tcp(sport, 9080, s, 1, 0x18 if size else 0x10, payload)))
            vni = 1001 if conn % 2 else 1000
            yield eth(ipv4(NODE_A, NODE_B, 17, udp(20000 + conn, 6081, geneve(vni, inner))))
        else:
            rec = (b"\x17\x03\x03" + struct.pack("!H", max(size - 5, 0)) + payload[5:]) if size >= 5 else payload
            yield eth(ipv4(POD_A, POD_B, 6, tcp(sport, 15008, s, 1, 0x18 if size else 0x10, rec)))


def generate(path: str, packets: int = 1_000_000, seed: int = 1) -> int:
    t0 = 1_795_000_000
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        chunk = []
        for i, fr in enumerate(frames(packets, seed)):
            us = i * 10
            chunk.append(struct.pack("<IIII", t0 + us // 1_000_000, us % 1_000_000, len(fr), len(fr)) + fr)
            if len(chunk) >= 10000:
                data = b"".join(chunk)
                f.write(data)
                written += len(data)
                chunk = []
        data = b"".join(chunk)
        f.write(data)
        written += len(data)
    return written + 24


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--packets", type=int, default=1_000_000)
    a = ap.parse_args()
    size = generate(a.out, a.packets)
    print(f"wrote {a.packets} packets, {size / 1e6:.0f} MB to {a.out}")

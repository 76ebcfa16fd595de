"""The fast path (contiguous segments grouped into `TcpRun`s by array operations, taken by `StreamAnalyzer.feed_run`
at once) against the general path (every segment through `feed`): the same tunnels, streams, requests, header
blocks, TLS record timelines, tunnelled bytes with their capture-time marks and anomalies, on the lab's captures,
the public conformance captures and captures with loss, reordering and retransmissions.

Anomaly rows raised by a stream stage (TLS, HTTP) while a run is being parsed name the last frame of the piece of
the run being delivered (at most RUN_PIECE segments of one connection direction, pure ACKs and other packets may lie
between them), not the frame that completed the offending record: the test allows exactly that."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from hbone_builder import hbone_exchange, segments
from hbonecap.decode import iter_decoded, segments_of_batch
from hbonecap.layers.segments import TcpRun, TcpSegment, tcp_runs_of_batch
from hbonecap.streams.analyzer import RUN_PIECE, StreamAnalyzer
from hbonecap.streams.tls.keylog import load

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
CONFORMANCE = (ROOT / ".." / "shared" / "conformance").resolve()


def _both(batches, keylog):
    out = []
    for fast in (False, True):
        a = StreamAnalyzer(load(keylog) if keylog else None)
        runs = 0
        for reader, batch, ctx in batches:
            if fast:
                for item in tcp_runs_of_batch("cap", batch, ctx, index_offset=reader.index_offset):
                    runs += type(item) is TcpRun
                    a.feed_any(item)
            else:
                for seg in segments_of_batch("cap", batch, ctx, index_offset=reader.index_offset):
                    a.feed(seg)
        out.append((a.close(), runs))
    return out


def _same(slow, fast, last_frame) -> None:
    for name in ("tunnels", "streams", "requests", "http2_headers"):
        assert getattr(slow, name) == getattr(fast, name), name
    assert slow.records == fast.records
    assert slow.tunnel_bytes.keys() == fast.tunnel_bytes.keys()
    for k, (c2s, s2c) in slow.tunnel_bytes.items():
        f = fast.tunnel_bytes[k]
        for x, y in ((c2s, f[0]), (s2c, f[1])):
            assert (bytes(x.data), x.marks, x.total, x.truncated) == (bytes(y.data), y.marks, y.total, y.truncated), k
    assert len(slow.anomalies) == len(fast.anomalies)
    for x, y in zip(slow.anomalies, fast.anomalies):
        assert {k: v for k, v in x.items() if k != "index"} == {k: v for k, v in y.items() if k != "index"}
        if x["index"] != y["index"]:
            assert x["layer"] not in ("tcp", "keylog") and x["index"] < y["index"] <= last_frame(x["index"]), (x, y)


def _piece_end(batches):
    """frame -> the last frame of the run piece it is delivered in (itself when not in a run)."""
    end = {}
    for reader, batch, ctx in batches:
        for item in tcp_runs_of_batch("cap", batch, ctx, index_offset=reader.index_offset):
            if type(item) is TcpRun:
                for k in range(1, len(item.index), RUN_PIECE):
                    piece = item.index[k:k + RUN_PIECE]
                    end.update((i, piece[-1]) for i in piece)
    return lambda frame: end.get(frame, frame)


def _files():
    out = []
    for truth in sorted(SAMPLES.glob("*/truth.json")):
        kl = truth.parent / "keylog.txt"
        for f in sorted(truth.parent.glob("*.pcap*")):
            out.append(pytest.param(f, kl if kl.exists() else None, id=f"{truth.parent.name}/{f.name}"))
    found = sorted(f for f in CONFORMANCE.glob("*/**/*") if "_oracles" not in f.parts and
                   f.suffix in (".pcap", ".pcapng", ".cap")) if CONFORMANCE.exists() else []
    for f in found[:60]:
        kl = next((p for p in (f.with_suffix(".keys"), f.with_suffix(".keylog"), f.parent / "keylog.txt")
                   if p.exists()), None)
        out.append(pytest.param(f, kl, id=f"conformance/{f.name}"))
    return out


@pytest.mark.parametrize("path,keylog", _files())
def test_runs_equal_segments_on_captures(path, keylog):
    batches = list(iter_decoded(path))
    (slow, _), (fast, _) = _both(batches, keylog)
    _same(slow, fast, _piece_end(batches))


def _pcap(segs: list[TcpSegment], path: Path) -> None:
    """Ethernet/IPv4/TCP pcap of segments (ns timestamps), for the decoder to give them back."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for s in segs:
            tcp = struct.pack("!HHIIBBHHH", s.sport, s.dport, s.seq, s.ack, 5 << 4, s.flags, 65535, 0, 0) + s.payload
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                             bytes(map(int, s.src.split("."))), bytes(map(int, s.dst.split(".")))) + tcp
            fr = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip
            f.write(struct.pack("<IIII", s.ts_ns // 10**9, s.ts_ns % 10**9, len(fr), len(fr)) + fr)


@pytest.mark.parametrize("damage", ["none", "loss", "reorder", "retransmit", "mixed"])
def test_runs_equal_segments_with_damage(tmp_path, damage):
    keylog = tmp_path / "keys.log"
    ex = hbone_exchange([("10.0.0.4:9000", {}, [(0, b"q" * 5000), (1, bytes(range(256)) * 2000)]),
                         ("10.0.0.5:9000", {}, [(0, b"r" * 70000), (1, b"s" * 3000)])], keylog)
    segs = segments(ex, mss=1448)
    rng = random.Random(damage)
    body = segs[3:-2]
    if damage in ("loss", "mixed"):
        for _ in range(3):
            body.pop(rng.randrange(10, len(body)))
    if damage in ("reorder", "mixed"):
        for _ in range(4):
            i = rng.randrange(10, len(body) - 1)
            body[i], body[i + 1] = body[i + 1], body[i]
    if damage in ("retransmit", "mixed"):
        for _ in range(4):
            i = rng.randrange(10, len(body))
            body.insert(i + 2, body[i])
    segs = segs[:3] + body + segs[-2:]
    f = tmp_path / "damaged.pcap"
    _pcap(segs, f)
    batches = list(iter_decoded(f))
    (slow, _), (fast, runs) = _both(batches, keylog)
    assert runs > 0
    _same(slow, fast, _piece_end(batches))
    assert slow.tunnels and slow.tunnels[0]["decrypted"]

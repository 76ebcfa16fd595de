"""The pcapng walker's compiled run of Enhanced Packet Blocks against its plain-Python reading (the oracle):
generated files with every block kind, options (comments, epb_flags, malformed ones), bad lengths, unknown
interfaces, both byte orders and several sections, cut anywhere; and the conformance suite's pcapng files."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbonecap.capture.pcapng import PcapngWalker
from tests.conftest import CONFORMANCE


def _block(e: str, btype: int, body: bytes, tail: int | None = None) -> bytes:
    body += bytes(-len(body) % 4)
    n = len(body) + 12
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n if tail is None else tail)


def _options(e: str, opts: list[tuple[int, bytes]], end: bool) -> bytes:
    out = b"".join(struct.pack(e + "HH", c, len(v)) + v + bytes(-len(v) % 4) for c, v in opts)
    return out + (struct.pack(e + "HH", 0, 0) if end and opts else b"")


def _shb(e: str) -> bytes:
    return _block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def _idb(e: str, tsresol: int | None) -> bytes:
    opts = [(9, bytes([tsresol]))] if tsresol is not None else []
    return _block(e, 1, struct.pack(e + "HHI", 1, 0, 65535) + _options(e, opts, True))


option = st.one_of(
    st.tuples(st.just(1), st.binary(max_size=12)),                 # comment: the Python path
    st.tuples(st.just(2), st.binary(min_size=4, max_size=4)),       # epb_flags
    st.tuples(st.just(2), st.binary(max_size=6)),                   # flags of the wrong size: ignored
    st.tuples(st.integers(3, 9), st.binary(max_size=9)),            # others: skipped
)

packet = st.fixed_dictionaries({
    "iface": st.integers(0, 3), "ts": st.integers(0, (1 << 64) - 1), "data": st.binary(max_size=80),
    "orig_extra": st.integers(0, 100), "opts": st.lists(option, max_size=3), "end": st.booleans(),
    "cap_lie": st.sampled_from([0, 0, 0, 0, 8, 400]), "tail_lie": st.sampled_from([None] * 8 + [4]),
    "opt_overrun": st.sampled_from([False] * 6 + [True]),
})

block = st.one_of(
    packet.map(lambda p: ("epb", p)), packet.map(lambda p: ("epb", p)), packet.map(lambda p: ("epb", p)),
    st.tuples(st.just("idb"), st.sampled_from([None, 6, 9, 0x80 | 20])),
    st.tuples(st.just("spb"), st.binary(max_size=40)),
    st.tuples(st.just("custom"), st.binary(max_size=12)),
    st.tuples(st.just("nrb"), st.binary(max_size=12)),
    st.tuples(st.just("shb"), st.just(None)),
    st.tuples(st.just("badlen"), st.just(None)),
)


def _epb(e: str, p: dict) -> bytes:
    data = p["data"]
    cap = len(data) + p["cap_lie"]
    body = struct.pack(e + "IIIII", p["iface"], p["ts"] >> 32, p["ts"] & 0xFFFFFFFF, cap,
                       len(data) + p["orig_extra"]) + data + bytes(-len(data) % 4)
    opts = _options(e, p["opts"], p["end"])
    if p["opt_overrun"] and opts:
        opts = opts[:2] + struct.pack(e + "H", 200) + opts[4:]
    return _block(e, 6, body + opts, p["tail_lie"] and len(body + opts) + 12 + p["tail_lie"])


def _file(e: str, blocks) -> bytes:
    out = [_shb(e), _idb(e, None)]
    for kind, v in blocks:
        if kind == "epb":
            out.append(_epb(e, v))
        elif kind == "idb":
            out.append(_idb(e, v))
        elif kind == "spb":
            out.append(_block(e, 3, struct.pack(e + "I", len(v) + 3) + v))
        elif kind == "custom":
            out.append(_block(e, 0x00000BAD, struct.pack(e + "I", 32473) + v))
        elif kind == "nrb":
            out.append(_block(e, 4, v))
        elif kind == "shb":
            out += [_shb(e), _idb(e, 6)]
        elif kind == "badlen":
            out.append(struct.pack(e + "II", 6, 13) + bytes(8))
    return b"".join(out)


def _walk_all(data: bytes, final: bool, reference: bool, window: int):
    """Walk `data` in windows as the reader does; returns everything the walker produced."""
    w = PcapngWalker("x", 1 << 16)
    pos = w.start(data)
    start, rows = 0, []
    for _ in range(10_000):
        buf = data[start:start + window]
        last = final and start + window >= len(data)
        p, b = w.walk(buf, pos, start, last, reference=reference)
        rows.append((b.data_off + start, b.caplen, b.origlen, b.ts_ns, b.iface, b.numbers if b.numbers is not None
                     else np.zeros(0), dict(b.comments), dict(b.pkt_flags)))
        if w.finished or (p == pos and not len(b)):
            if start + window >= len(data):
                break
            window *= 2                      # a block longer than the window
            continue
        start, pos = start + p, 0
    flat = [np.concatenate([r[i] for r in rows]).tolist() if rows else [] for i in range(6)]
    return flat, [(r[6], r[7]) for r in rows], w.anomalies, w.secrets, w.comments, w.next_index, w.finished, \
        [(i.link_type, i.ts_base, i.ts_exp) for i in w.interfaces]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, max_size=25), big=st.booleans(), cut=st.integers(0, 4000), final=st.booleans(),
       window=st.sampled_from([64, 200, 1 << 20]))
def test_compiled_epb_runs_equal_the_reference(blocks, big, cut, final, window):
    data = _file(">" if big else "<", blocks)
    data = data[:max(40, len(data) - cut)] if cut % 3 == 0 else data
    fast = _walk_all(data, final, False, window)
    ref = _walk_all(data, final, True, window)
    assert fast == ref


def test_compiled_epb_runs_on_plain_packets_carry_flags_and_numbers():
    e = "<"
    pk = {"iface": 0, "ts": 1_700_000_000_000_000, "data": b"x" * 61, "orig_extra": 3, "opts": [(2, b"\1\0\0\0")],
          "end": True, "cap_lie": 0, "tail_lie": None, "opt_overrun": False}
    data = _file(e, [("epb", pk), ("custom", b""), ("epb", dict(pk, opts=[])), ("epb", dict(pk, opts=[(1, b"hi")]))])
    (offs, caps, origs, ts, iface, numbers), batches, anomalies, *_ = _walk_all(data, True, False, 1 << 20)
    assert numbers == [1, 3, 4] and caps == [61] * 3 and origs == [64] * 3      # the custom block is frame 2
    assert ts == [1_700_000_000_000_000_000] * 3 and not anomalies
    assert batches[0] == ({2: "hi"}, {0: 1})


PCAPNG = sorted(p for p in CONFORMANCE.rglob("*") if p.suffix in (".pcapng", ".ntar")) if CONFORMANCE.exists() else []


@pytest.mark.conformance
@pytest.mark.skipif(not PCAPNG, reason="../shared/conformance not present")
def test_compiled_epb_runs_on_conformance_pcapng():
    for path in PCAPNG:
        data = path.read_bytes()
        try:
            fast = _walk_all(data, True, False, 1 << 16)
        except Exception as e:        # a file the walker rejects must be rejected the same way by both
            with pytest.raises(type(e)):
                _walk_all(data, True, True, 1 << 16)
            continue
        assert fast == _walk_all(data, True, True, 1 << 16), path

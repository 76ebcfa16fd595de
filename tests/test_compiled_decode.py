"""The compiled layer walk (hbonecap.layers.compiled) against the vectorised decoders (its specification):
identical DecodeContext columns and identical anomalies, batch by batch, on the conformance captures, the lab
samples, random bytes for every link type and structured frames with random fields, nested tunnels and cuts."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbonecap.capture.reader import CaptureReader
from hbonecap.capture.records import RecordBatch
from hbonecap.config import DEFAULT_CONFIG, DecodeConfig
from hbonecap.errors import CaptureError
from hbonecap.layers.unwrap import decode_batch
from tests.conftest import CONFORMANCE, SAMPLES, conformance_split
from tests.packets import eth, geneve, ipv4, ipv6, tcp, udp, vxlan

pytest.importorskip("numba")

LINK_TYPES = (0, 1, 12, 101, 108, 113, 228, 229, 276, 147)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _flat_anomalies(ctx) -> list[tuple]:
    out = []
    for sel, layer, kind, detail in ctx.anomalies:
        sel = np.asarray(sel).tolist()
        detail = [detail] * len(sel) if isinstance(detail, str) else [str(d) for d in detail]
        out.append((sel, layer, kind, detail))
    return out


def assert_same_decode(batch: RecordBatch, link_types: np.ndarray, config: DecodeConfig = DEFAULT_CONFIG,
                       where: str = "") -> int:
    """Decode `batch` with both engines and compare every array of the two contexts and the anomalies.
    Returns how many packets the compiled walk accepted (not handed back to the vectorised path)."""
    ref = decode_batch(batch, link_types, config, engine="numpy")
    got = decode_batch(batch, link_types, config, engine="compiled")
    names = [k for k, v in vars(ref).items() if isinstance(v, np.ndarray)]
    assert names and set(names) == {k for k, v in vars(got).items() if isinstance(v, np.ndarray)}
    for name in names:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (where, name)
        if not np.array_equal(a, b):
            rows = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1)) if a.ndim else []
            pytest.fail(f"{where}: column {name} differs at packets {list(rows[:10])}: "
                        f"compiled {a[rows[:3]].tolist()} numpy {b[rows[:3]].tolist()}")
    assert _flat_anomalies(got) == _flat_anomalies(ref), where
    anomalous = {i for sel, *_ in _flat_anomalies(ref) for i in sel}
    return ref.n - len(anomalous)


def assert_same_capture(path: Path, config: DecodeConfig = DEFAULT_CONFIG) -> int:
    try:
        reader = CaptureReader(path, config)
        packets = 0
        for batch in reader:
            link_types = np.array([i.link_type for i in reader.info.interfaces] or [-1], dtype=np.int64)
            assert_same_decode(batch, link_types, config, where=str(path))
            packets += len(batch)
    except CaptureError:
        return -1
    return packets


def _batch(frames: list[bytes], origlen: list[int] | None = None, iface: list[int] | None = None) -> RecordBatch:
    """A record batch over frames laid end to end, with 3 junk bytes between frames (a decoder reading past a
    frame's captured length would see them)."""
    sep = b"\xa5\x5a\xff"
    buf = sep + sep.join(frames) + sep
    offs, pos = [], len(sep)
    for f in frames:
        offs.append(pos)
        pos += len(f) + len(sep)
    n = len(frames)
    caplen = np.array([len(f) for f in frames], dtype=np.int64)
    return RecordBatch(np.frombuffer(buf, dtype=np.uint8), np.array(offs, dtype=np.int64), caplen,
                       np.array(origlen if origlen is not None else caplen, dtype=np.int64),
                       np.zeros(n, dtype=np.int64),
                       np.array(iface if iface is not None else [0] * n, dtype=np.int32), 1, 0)


# -- real captures ---------------------------------------------------------------------------------------------

CONFORMANCE_FILES = [p for p, _g, _t in conformance_split()]


@pytest.mark.conformance
@pytest.mark.parametrize("path", CONFORMANCE_FILES or ["<absent>"])
def test_conformance_captures(path):
    if path == "<absent>" or not CONFORMANCE.exists():
        pytest.skip(f"conformance captures not found at {CONFORMANCE}")
    if not (CONFORMANCE / path).exists():
        pytest.skip(f"{path} listed in SPLIT.tsv but absent")
    assert_same_capture(CONFORMANCE / path)


SAMPLE_FILES = sorted(str(p.relative_to(SAMPLES)) for p in SAMPLES.glob("*/*.pcap*"))


@pytest.mark.lab
@pytest.mark.parametrize("path", SAMPLE_FILES or ["<absent>"])
def test_lab_samples(path):
    if path == "<absent>":
        pytest.skip(f"no lab samples in {SAMPLES}")
    assert assert_same_capture(SAMPLES / path) > 0


def _handed_back(monkeypatch) -> list[int]:
    """Sizes of the sub-batches the compiled engine hands to the vectorised path, recorded from now on."""
    from hbonecap.layers import unwrap

    sizes: list[int] = []
    real = unwrap.decode_batch

    def spy(batch, link_types, config, engine="auto"):
        if engine == "numpy":
            sizes.append(len(batch))
        return real(batch, link_types, config, engine)

    monkeypatch.setattr(unwrap, "decode_batch", spy)
    return sizes


def test_benchmark_mix_is_all_compiled(monkeypatch):
    """The synthetic benchmark's traffic is the common case: the compiled walk accepts every packet."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from generate import frames as bench_frames
    finally:
        sys.path.pop(0)
    frames = list(bench_frames(2000, seed=7))
    assert assert_same_decode(_batch(frames), np.array([1])) == len(frames)
    handed_back = _handed_back(monkeypatch)
    decode_batch(_batch(frames), np.array([1]), DEFAULT_CONFIG, engine="compiled")
    assert handed_back == []


# -- crafted frames --------------------------------------------------------------------------------------------

A, B = "10.244.1.5", "10.96.3.7"
A6, B6 = "fd00::1", "fd00:0:0:1::2"


def test_every_anomaly_kind_is_left_to_the_vectorised_path(monkeypatch):
    inner = eth(ipv4(A, B, 6, tcp(40000, 9080, b"x")))
    frames = [
        eth(ipv4(A, B, 6, tcp(1, 2, b"hello", options=bytes([2, 4, 5, 0xB4, 1, 3, 3, 7, 4, 2, 1, 1]))), vlans=(7,)),
        eth(ipv4(A, B, 6, tcp(1, 2))[:30]),                                   # tcp_truncated
        eth(ipv4(A, B, 6, tcp(1, 2), frag=0x2000)),                           # ipv4_fragment (first)
        eth(ipv4(A, B, 17, udp(1, 2, b"abc"), frag=0x0010)),                  # later fragment
        eth(ipv4(A, B, 6, tcp(1, 2, options=bytes([2, 9, 0, 0]))), 0x0800),   # tcp_bad_option
        eth(ipv4(A, B, 6, tcp(1, 2), total=10)),                              # ipv4_bad_total_length
        eth(ipv4(A, B, 6, tcp(1, 2), total=500)),                             # ipv4_length_exceeds_frame
        eth(ipv4(A, B, 17, struct.pack("!HHHH", 1, 2, 5, 0))),               # udp_bad_length
        eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 6081, geneve(5, inner, version=2)))),
        eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 6081, geneve(5, inner, proto=0x1234)))),
        eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 6081, geneve(5, inner, options=b"\x00\x01\x02\x1f" + bytes(4))))),
        eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 4789, vxlan(5, inner, flags=0x0C)))),
        eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 4789, vxlan(5, inner, flags=0x00)))),
        eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 6082, geneve(5, inner)))),  # probe port
        eth(ipv6(A6, B6, 44, bytes([6, 0, 0, 1, 0, 0, 0, 9]) + tcp(1, 2)), 0x86DD),
        eth(ipv6(A6, B6, 0, bytes([60, 0, 1, 4, 0, 0, 0, 0]) + bytes([6, 0, 1, 4, 0, 0, 0, 0]) + tcp(1, 2)), 0x86DD),
        eth(ipv6(A6, B6, 6, tcp(1, 2), plen=900), 0x86DD),                    # ipv6_length_exceeds_frame
        eth(b"\x00\x01", 0x0806), eth(b"", 0x0042), eth(b"", 0x88CC),         # ARP, LLC, other ethertype
        eth(ipv4(A, B, 1, b"\x08\x00\x00\x00")), eth(ipv4(A, B, 47, b"gre")), eth(ipv4(A, B, 1, b"\x08")),
        eth(ipv4(A, B, 6, tcp(1, 2)), vlans=(1, 2, 3, 4, 5)),                 # link_too_many_vlan_tags
        b"\x00" * 13,
    ]
    deep = inner
    for d in range(6):                                                        # tunnel_depth_exceeded
        deep = eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, (6081, 4789, 8472)[d % 3],
                                                       (geneve if d % 3 == 0 else vxlan)(d, deep))))
    frames.append(deep)
    # without anomalies: the first frame, ARP/LLC/other ethertype, ICMP and GRE, the hop-by-hop one, the probe port
    assert assert_same_decode(_batch(frames), np.array([1])) == 1 + 3 + 2 + 1 + 1
    handed_back = _handed_back(monkeypatch)
    decode_batch(_batch(frames), np.array([1]), DEFAULT_CONFIG, engine="compiled")
    assert handed_back == [len(frames) - 7]      # all but the probe port one are compiled


def test_every_link_type():
    v4 = ipv4(A, B, 6, tcp(1, 2, b"data"))
    v6 = ipv6(A6, B6, 17, udp(1, 2, b"data"))
    frames = [
        eth(v4), v4, v6, b"\x02\x00\x00\x00" + v4, b"\x00\x00\x00\x1e" + v6, b"\x00\x00\x00\x02" + v4,
        b"\x00\x04\x00\x01\x00\x06" + bytes(8) + b"\x08\x00" + v4,
        b"\x86\xdd\x00\x00\x00\x00\x00\x03\x00\x01\x04\x06" + bytes(8) + v6,
        b"\x00\x00\x03\x38" + bytes(12) + b"\x08\x00" + v4,                   # SLL netlink
        b"\x70" + v4[1:], b"\x00\x00\x00\x63" + v4,
    ]
    link_types = np.array([1, 101, 229, 0, 108, 108, 113, 276, 113, 101, 0, 147])
    iface = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert_same_decode(_batch(frames, iface=iface), link_types)
    assert_same_decode(_batch(frames * 2, iface=[11] * 22), link_types)


def test_empty_batch():
    assert_same_decode(_batch([]), np.array([1]))


# -- hypothesis ------------------------------------------------------------------------------------------------

@SETTINGS
@given(frames=st.lists(st.binary(max_size=120), max_size=40), linktype=st.sampled_from(LINK_TYPES))
def test_random_bytes_for_every_link_type(frames, linktype):
    assert_same_decode(_batch(frames), np.array([linktype]))


@SETTINGS
@given(frames=st.lists(st.tuples(st.binary(max_size=120), st.integers(0, len(LINK_TYPES) - 1)), max_size=40),
       prefix=st.sampled_from([b"", b"E", b"`", b"\x08\x00E"]))
def test_random_bytes_mixed_link_types(frames, prefix):
    assert_same_decode(_batch([prefix + f for f, _ in frames], iface=[i for _, i in frames]),
                       np.array(LINK_TYPES))


u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)


def mostly(common: list, rare: st.SearchStrategy, one_in: int = 6) -> st.SearchStrategy:
    """One of `common`, or a draw from `rare` about once in `one_in`: most frames stay well-formed."""
    return st.integers(0, one_in - 1).flatmap(lambda r: rare if r == 0 else st.sampled_from(common))

v4addr = st.builds(lambda a: f"10.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}", st.integers(0, 1 << 24))
v6addr = st.builds(lambda a: f"fd00::{a:x}", st.integers(0, 0xFFFF))
TCP_OPTIONS = [b"", b"\x01\x01\x08\x0a" + bytes(range(8)), bytes([2, 4, 5, 0xB4, 4, 2, 8, 10]) + bytes(8) +
               b"\x01\x03\x03\x07", b"\x01\x01\x05\x0a" + bytes(8), b"\x00" * 4, b"\x02\x04\x05", b"\x03\x03\x0e\x00",
               b"\x04\x02\x00\x00", b"\x01" * 40, b"\x08\x0a" + bytes(8) + b"\x05\x12" + bytes(16)]
tcp_options = st.one_of(st.sampled_from(TCP_OPTIONS),
                        st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4)))
transport = st.one_of(
    st.builds(lambda sp, dp, seq, ack, fl, opts, win, pl: (6, tcp(sp, dp, pl, flags=fl, seq=seq, ack=ack,
                                                                  options=opts, win=win)),
              u16, u16, u32, u32, u8, tcp_options, u16, st.binary(max_size=30)),
    st.builds(lambda sp, dp, pl: (17, udp(sp, dp, pl)), u16, st.sampled_from([53, 4789, 6081, 6082, 8472]) | u16,
              st.binary(max_size=30)),
    st.builds(lambda t, c, pl: (1, bytes([t, c, 0, 0]) + pl), u8, u8, st.binary(max_size=8)),
    st.builds(lambda t, c, pl: (58, bytes([t, c, 0, 0]) + pl), u8, u8, st.binary(max_size=8)),
    st.builds(lambda p, pl: (p, pl), u8, st.binary(max_size=12)),
)
ext_header = st.tuples(st.sampled_from([0, 43, 60, 51, 135, 139, 140, 44]), st.integers(0, 2), u16)


def _ipv6_with_ext(src, dst, l4, exts, plen):
    proto, payload = l4
    for t, hl, frag in reversed(exts):
        if t == 44:
            body = bytes([proto, 0]) + struct.pack("!H", frag & 0xFFF9) + bytes(4)
        elif t == 51:
            body = bytes([proto, hl]) + bytes((hl + 2) * 4 - 2)
        else:
            body = bytes([proto, hl]) + bytes((hl + 1) * 8 - 2)
        proto, payload = t, body + payload
    return ipv6(src, dst, proto, payload, plen=plen)


ip_layer = st.one_of(
    st.builds(lambda s, d, l4, ttl, ident, frag, opts, total: ipv4(s, d, l4[0], l4[1], ttl=ttl, ident=ident,
                                                                   frag=frag, options=opts, total=total),
              v4addr, v4addr, transport, u8, u16, mostly([0, 0x4000], st.sampled_from([0x2000, 0x0001, 0x8000]) | u16),
              st.sampled_from([b"", b"", b"\x01\x01\x01\x00", bytes(40)]),
              mostly([None], st.sampled_from([0, 19]) | u16)),
    st.builds(lambda s, d, l4, exts, plen: _ipv6_with_ext(s, d, l4, exts, plen), v6addr, v6addr, transport,
              mostly([[]], st.lists(ext_header, max_size=3) | st.lists(st.just((60, 0, 0)), min_size=7, max_size=10),
                     one_in=2),
              mostly([None], st.sampled_from([0, 1]) | u16)),
)


def _link(ip: bytes, how: int, vlans: tuple[int, ...]) -> bytes:
    etype = 0x86DD if ip[:1] and ip[0] >> 4 == 6 else 0x0800
    return eth(ip, etype, vlans=vlans) if how else ip


@st.composite
def frames_with_tunnels(draw) -> tuple[bytes, int]:
    """Ethernet (interface 0) or raw IP (interface 1), possibly inside up to 6 nested Geneve/VXLAN tunnels with
    random fields."""
    iface = draw(st.integers(0, 1))
    frame = _link(draw(ip_layer), 1 - iface, draw(st.lists(u16, max_size=2).map(tuple)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 1, 2, 2, 3, 4, 6]))):
        odd = draw(st.sampled_from([False] * 5 + [True]))     # mostly well-formed headers, sometimes not
        kind = draw(st.sampled_from(["geneve", "geneve", "geneve-ip", "vxlan"]))
        is_eth = iface == 0
        if kind == "geneve-ip" and frame[12:14] in (b"\x08\x00", b"\x86\xdd"):   # Geneve carrying IP directly
            iface, is_eth, frame = 1, False, frame[14:]
        if kind.startswith("geneve"):
            opts = draw(st.sampled_from([b"", bytes([1, 2, 0x80, 1, 0, 0, 0, 1]), b"\x00\x01\x02\x00"]))
            proto = 0x6558 if is_eth else (0x86DD if frame[:1] and frame[0] >> 4 == 6 else 0x0800)
            version = 0
            if odd:
                opts = draw(st.sampled_from([opts, b"\x00\x01\x02\x05" + bytes(4), bytes(4) * 63]))
                proto = draw(st.sampled_from([proto, 0x6558, 0x0800, 0x86DD, 0x1234]))
                version = draw(st.integers(0, 3))
            wrapped = geneve(draw(st.integers(0, 0xFFFFFF)), frame, proto=proto, options=opts, version=version)
            port = draw(st.sampled_from([6081, 6081, 6081, 6083]))
        else:
            if not is_eth:                      # VXLAN always carries Ethernet
                frame = eth(frame, 0x86DD if frame[:1] and frame[0] >> 4 == 6 else 0x0800)
            flags = draw(st.sampled_from([0x08, 0x0C, 0x00, 0x88, 0xFF])) if odd else 0x08
            wrapped = vxlan(draw(st.integers(0, 0xFFFFFF)), frame, flags=flags)
            port = draw(st.sampled_from([4789, 8472]))
        sport = draw(u16)
        if draw(st.booleans()):
            under = ipv4(draw(v4addr), draw(v4addr), 17, udp(sport, port, wrapped))
        else:
            under = ipv6(draw(v6addr), draw(v6addr), 17, udp(sport, port, wrapped))
        frame = _link(under, 1, draw(st.lists(u16, max_size=1).map(tuple)))
        iface = 0
    return frame, iface


@st.composite
def cut_frames(draw) -> tuple[bytes, int, int]:
    """A structured frame, sometimes cut (snapshot length) or padded; its wire length and interface."""
    f, iface = draw(frames_with_tunnels())
    how = draw(st.sampled_from(["whole", "whole", "cut", "pad", "longer"]))
    if how == "cut":
        return f[:draw(st.integers(0, len(f)))], len(f), iface
    if how == "pad":
        pad = draw(st.integers(1, 20))
        return f + bytes(pad), len(f) + pad, iface
    if how == "longer":
        return f, len(f) + draw(st.integers(1, 3000)), iface
    return f, len(f), iface


configs = st.sampled_from([DEFAULT_CONFIG, DecodeConfig(max_tunnel_depth=1, max_extension_headers=1,
                                                        max_vlan_tags=1),
                           DecodeConfig(max_tunnel_depth=2, geneve_ports=frozenset({6081, 6083}),
                                        geneve_probe_ports=frozenset(), vxlan_ports=frozenset({8472}))])


@SETTINGS
@given(items=st.lists(cut_frames(), max_size=25), config=configs)
def test_structured_frames(items, config):
    batch = _batch([f for f, _, _ in items], origlen=[n for _, n, _ in items], iface=[i for _, _, i in items])
    assert_same_decode(batch, np.array([1, 101]), config)


@SETTINGS
@given(items=st.lists(cut_frames(), min_size=1, max_size=10), flips=st.lists(st.tuples(u16, u8), max_size=4),
       config=configs)
def test_structured_frames_with_flipped_bytes(items, flips, config):
    frames = []
    for f, _, _ in items:
        f = bytearray(f)
        for pos, val in flips:
            if f:
                f[pos % len(f)] = val
        frames.append(bytes(f))
    batch = _batch(frames, origlen=[n for _, n, _ in items], iface=[i for _, _, i in items])
    assert_same_decode(batch, np.array([1, 101]), config)


# -- engine selection and the compiled cache --------------------------------------------------------------------

def test_engine_names():
    with pytest.raises(ValueError, match="engine"):
        decode_batch(_batch([b"x"]), np.array([1]), DEFAULT_CONFIG, engine="fast")


def test_stale_cache_is_not_used(monkeypatch):
    """The constants numba froze into the cached walk are the live ones; when they are not, the walk is compiled
    afresh instead of taken from the cache."""
    from hbonecap.layers import compiled

    assert compiled._frozen_constants() == compiled._frozen_constants.py_func()
    monkeypatch.setattr(compiled, "_walk", None)
    assert compiled._checked_walk() is compiled.walk
    monkeypatch.setattr(compiled, "_walk", None)
    class Stale:
        py_func = staticmethod(compiled._frozen_constants.py_func)

        def __call__(self):
            return (-1,) + self.py_func()[1:]

    monkeypatch.setattr(compiled, "_frozen_constants", Stale())
    monkeypatch.setattr(compiled.numba, "njit", lambda **kw: (lambda f: ("fresh", f, kw)))
    assert compiled._checked_walk() == ("fresh", compiled.walk.py_func, {"nogil": True})


# -- whole captures through the tables ---------------------------------------------------------------------------

def _decode_with(monkeypatch, engine: str, path: Path):
    import functools

    import hbonecap.decode as decode
    from hbonecap.layers import unwrap

    monkeypatch.setattr(decode, "decode_batch", functools.partial(unwrap.decode_batch, engine=engine))
    return decode.decode_capture(path, DecodeConfig(batch_packets=7))     # many small batches


@pytest.mark.conformance
@pytest.mark.parametrize("path", ["the-tcpdump-group_tcpdump/tests/geneve.pcap",
                                  "the-tcpdump-group_tcpdump/tests/vxlan.pcap",
                                  "zeek_zeek/testing/btest/Traces/linux_dlt_sll2.pcap",
                                  "zeek_zeek/testing/btest/Traces/tunnels/geneve-many-options.pcap",
                                  "zeek_zeek/testing/btest/Traces/tcp/reassembly.pcap",           # with anomalies
                                  "ajbanjara_Wireshark-wiki/uploads/__moin_import__/attachments/SampleCaptures/"
                                  "telnet-cooked.pcap"])
def test_packets_and_anomalies_tables_are_identical(monkeypatch, path):
    import pandas as pd

    if not (CONFORMANCE / path).exists():
        pytest.skip(f"{path} not found in {CONFORMANCE}")
    a = _decode_with(monkeypatch, "compiled", CONFORMANCE / path)
    b = _decode_with(monkeypatch, "numpy", CONFORMANCE / path)
    pd.testing.assert_frame_equal(a.packets, b.packets)
    pd.testing.assert_frame_equal(a.anomalies, b.anomalies)

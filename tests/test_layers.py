"""Table-driven, byte-level checks of the per-packet decoders on crafted frames."""
from __future__ import annotations

import pandas as pd
import pytest

from hbonecap.config import DecodeConfig
from hbonecap.decode import decode_capture
from tests.packets import eth, geneve, ipv4, ipv6, tcp, udp, vxlan, write_pcap

A, B = "10.244.1.5", "10.96.3.7"
TCP_SYN_OPTS = bytes([2, 4, 0x05, 0xB4, 4, 2, 8, 10, 0, 0, 0, 7, 0, 0, 0, 0, 1, 3, 3, 7])


def decode(tmp_path, frames, linktype=1, config=None):
    p = tmp_path / "t.pcap"
    write_pcap(p, frames, linktype)
    return decode_capture(p, config or DecodeConfig())


def test_plain_tcp_with_options(tmp_path):
    r = decode(tmp_path, [eth(ipv4(A, B, 6, tcp(40000, 9080, flags=0x02, options=TCP_SYN_OPTS)))])
    p = r.packets.iloc[0]
    assert (p.src, p.dst, p.sport, p.dport, p.proto) == (A, B, 40000, 9080, "tcp")
    assert (p.mss, p.wscale, p.tsval, p.tsecr, bool(p.sack_permitted)) == (1460, 7, 7, 0, True)
    assert p.tcp_flags == 0x02 and p.payload_len == 0 and pd.isna(p.vni) and p.encap == ""


def test_qinq_vlan(tmp_path):
    r = decode(tmp_path, [eth(ipv4(A, B, 17, udp(1, 2, b"x")), vlans=(100, 200))])
    p = r.packets.iloc[0]
    assert p.vlan == 100 and p.proto == "udp" and p.payload_len == 1 and len(r.anomalies) == 0


def test_geneve_istio_outbound_with_options(tmp_path):
    inner = eth(ipv4(A, B, 6, tcp(40000, 9080, b"GET / HTTP/1.1\r\n\r\n")))
    opt = bytes([0x01, 0x02, 0x80, 0x01, 0, 0, 0, 1])  # one 8-byte option
    outer = eth(ipv4("172.18.0.2", "172.18.0.9", 17, udp(55555, 6081, geneve(1001, inner, options=opt))))
    r = decode(tmp_path, [outer])
    p = r.packets.iloc[0]
    assert p.encap == "geneve:1001" and p.vni == 1001 and p.tunnel_options == 1
    assert (p.outer_src, p.outer_dst, p.outer_sport, p.outer_dport) == ("172.18.0.2", "172.18.0.9", 55555, 6081)
    assert (p.src, p.dst, p.sport, p.dport, p.payload_len) == (A, B, 40000, 9080, 18)


def test_geneve_probe_port_needs_agreement(tmp_path):
    inner = eth(ipv4(A, B, 6, tcp(40000, 9080)))
    good = eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(1234, 6082, geneve(1000, inner))))
    other_flow_bad = eth(ipv4("172.18.0.4", "172.18.0.3", 17, udp(1234, 6082, b"\xff" * 30)))
    same_flow_bad = eth(ipv4("172.18.0.5", "172.18.0.3", 17, udp(1234, 6083, geneve(7, inner))))
    same_flow_bad2 = eth(ipv4("172.18.0.5", "172.18.0.3", 17, udp(1234, 6083, b"\xff" * 30)))
    r = decode(tmp_path, [good, other_flow_bad, same_flow_bad, same_flow_bad2])
    enc = list(r.packets["encap"].astype(str))
    assert enc == ["geneve:1000", "", "", ""]


def test_geneve_on_other_port_is_not_taken(tmp_path):
    inner = eth(ipv4(A, B, 6, tcp(40000, 9080)))
    r = decode(tmp_path, [eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1234, 7000, geneve(5, inner))))])
    assert r.packets.iloc[0].encap == "" and r.packets.iloc[0].proto == "udp"


def test_geneve_ipv4_payload_and_bad_version(tmp_path):
    ok = eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 6081, geneve(9, ipv4(A, B, 17, udp(5, 6, b"hi")), proto=0x0800))))
    bad = eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 6081, geneve(9, b"", version=1))))
    r = decode(tmp_path, [ok, bad])
    assert r.packets.iloc[0].src == A and r.packets.iloc[0].dport == 6
    assert list(r.anomalies["kind"]) == ["geneve_bad_version"] and r.anomalies.iloc[0]["index"] == 2


def test_vxlan_nested_geneve(tmp_path):
    innermost = eth(ipv4(A, B, 6, tcp(40000, 15008)))
    mid = eth(ipv4("192.168.127.1", "192.168.127.2", 17, udp(999, 6081, geneve(1001, innermost))))
    outer = eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(888, 8472, vxlan(42, mid))))
    r = decode(tmp_path, [outer])
    p = r.packets.iloc[0]
    assert p.encap == "vxlan:42/geneve:1001" and p.vni == 1001
    assert p.outer_src == "172.18.0.2" and p.src == A and p.dport == 15008


def test_vxlan_gpe_is_not_vxlan(tmp_path):
    inner = eth(ipv4(A, B, 6, tcp(1, 2)))
    r = decode(tmp_path, [eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 4789, vxlan(5, inner, flags=0x0C))))])
    assert r.packets.iloc[0].encap == "" and list(r.anomalies["kind"]) == ["vxlan_gpe"]


def test_tunnel_depth_limit(tmp_path):
    frame = eth(ipv4(A, B, 6, tcp(1, 2)))
    for i in range(6):
        frame = eth(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 4789, vxlan(i, frame))))
    r = decode(tmp_path, [frame], config=DecodeConfig(max_tunnel_depth=3))
    assert r.packets.iloc[0].encap.count("vxlan") == 3
    assert "tunnel_depth_exceeded" in set(r.anomalies["kind"])


def test_ipv4_fragments_reported_not_lost(tmp_path):
    first = eth(ipv4(A, B, 17, udp(5, 6, b"a" * 16), frag=0x2000))
    later = eth(ipv4(A, B, 17, b"b" * 16, frag=3))
    r = decode(tmp_path, [first, later])
    assert len(r.packets) == 2
    assert list(r.packets["proto"].astype(str)) == ["udp", "fragment:17"]
    assert list(r.anomalies["kind"]) == ["ipv4_fragment", "ipv4_fragment"]


def test_ipv6_extension_headers(tmp_path):
    hop = bytes([43, 0, 0, 0, 0, 0, 0, 0])          # hop-by-hop -> routing
    rt = bytes([44, 0, 0, 0, 0, 0, 0, 0])           # routing -> fragment
    fr = bytes([6, 0, 0, 0, 0, 0, 0, 1])            # fragment (offset 0, more) -> TCP
    r = decode(tmp_path, [eth(ipv6("fd00::1", "fd00::2", 0, hop + rt + fr + tcp(1, 2, b"xyz")), 0x86DD)])
    p = r.packets.iloc[0]
    assert (p.src, p.proto, p.sport, p.payload_len) == ("fd00::1", "tcp", 1, 3)
    assert list(r.anomalies["kind"]) == ["ipv6_fragment"]


@pytest.mark.parametrize("cut", [10, 20, 34, 40, 50])
def test_truncated_frames_become_anomalies(tmp_path, cut):
    full = eth(ipv4(A, B, 6, tcp(1, 2, options=TCP_SYN_OPTS)))
    r = decode(tmp_path, [full[:cut]])
    assert len(r.packets) == 1
    kinds = set(r.anomalies["kind"])
    assert any(k.endswith("_truncated") for k in kinds), kinds
    if cut >= 34:   # the IP header is whole and says more bytes were sent than the frame holds
        assert "ipv4_length_exceeds_frame" in kinds


def test_raw_and_null_link_types(tmp_path):
    r = decode(tmp_path, [ipv4(A, B, 6, tcp(1, 2))], linktype=101)
    assert r.packets.iloc[0].src == A
    r = decode(tmp_path, [b"\x02\x00\x00\x00" + ipv4(A, B, 6, tcp(1, 2)),
                          b"\x1e\x00\x00\x00" + ipv6("::1", "::2", 6, tcp(3, 4))], linktype=0)
    assert list(r.packets["src"].astype(str)) == [A, "::1"]


def test_unsupported_link_type_is_reported(tmp_path):
    r = decode(tmp_path, [b"\x00" * 40], linktype=147)
    assert len(r.packets) == 1 and list(r.anomalies["kind"]) == ["link_unsupported"]

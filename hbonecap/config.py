"""Every tunable table of the decoders in one frozen place: ports, ethertypes, depth limits, buffer caps.

Nothing registers itself at import time; a decoder reads the `DecodeConfig` it is handed.
"""
from __future__ import annotations

from dataclasses import dataclass

# Link-layer types (LINKTYPE_* values as stored in pcap / pcapng headers).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
# DLT_RAW as some BSDs write it into pcap headers.
LINKTYPE_RAW_BSD = (12, 14)

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "null",
    LINKTYPE_ETHERNET: "ether",
    LINKTYPE_RAW: "rawip",
    12: "rawip",
    14: "rawip",
    LINKTYPE_LOOP: "loop",
    LINKTYPE_LINUX_SLL: "linux-sll",
    LINKTYPE_IPV4: "ipv4",
    LINKTYPE_IPV6: "ipv6",
    LINKTYPE_LINUX_SLL2: "linux-sll2",
}

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_RARP = 0x8035
ETHERTYPE_VLAN = 0x8100
ETHERTYPE_QINQ = 0x88A8
ETHERTYPE_QINQ_OLD = 0x9100
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_TEB = 0x6558  # transparent Ethernet bridging: Geneve carrying Ethernet

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_MOBILITY = 135
IPPROTO_HIP = 139
IPPROTO_SHIM6 = 140

# Istio ambient tunnel facts (see shared/notes/ambient-wire.md).
ISTIO_VNI_INBOUND = 1000
ISTIO_VNI_OUTBOUND = 1001
HBONE_PORT = 15008


@dataclass(frozen=True)
class DecodeConfig:
    """What the per-packet decoders need to know. Immutable; pass a modified copy to change it."""

    # UDP ports on which a Geneve header is taken as such without further evidence.
    geneve_ports: frozenset[int] = frozenset({6081})
    # Ports where a Geneve header is accepted only when every packet of the UDP flow holds a valid one
    # (istio-cni from 1.19 takes the first free port from 6081 upwards).
    geneve_probe_ports: frozenset[int] = frozenset(range(6082, 6091))
    # VXLAN (RFC 7348): IANA port and the Linux kernel's historical default (flannel, Cilium).
    vxlan_ports: frozenset[int] = frozenset({4789, 8472})
    # How many tunnels may be nested before the rest of the packet is left undecoded.
    max_tunnel_depth: int = 4
    # How many IPv6 extension headers / VLAN tags are walked before giving up.
    max_extension_headers: int = 8
    max_vlan_tags: int = 4
    # Largest record a capture may declare; larger ones mean the file is corrupt from there on.
    max_record_bytes: int = 16 * 1024 * 1024
    # Bytes read from a capture file at a time (bounds the decoder's working memory).
    chunk_bytes: int = 32 * 1024 * 1024
    # Packets decoded per vectorised batch.
    batch_packets: int = 262_144


DEFAULT_CONFIG = DecodeConfig()

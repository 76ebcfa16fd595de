"""Compiled (numba) fast path of the layer walk: every packet of a batch, link layer to innermost transport, in
one pass.

What it decodes is exactly what the vectorised decoders in `link`, `ip`, `transport` and `tunnels` decode
(Ethernet with 802.1Q/802.1ad tags, SLL, SLL2, NULL/LOOP, raw IP; IPv4 with options, IPv6 with extension
headers; TCP with options, UDP, ICMP/ICMPv6; Geneve and VXLAN, nested up to `max_tunnel_depth`); those
decoders are the specification and stay the reference.

Strategy (hybrid): `walk` follows one packet at a time through its layers and writes the `DecodeContext`
columns directly, but only for packets it understands without any anomaly: the common case. A packet that
would raise an anomaly anywhere (truncated or malformed header, fragment, bad option, unknown link type,
tunnel depth exceeded, ...) or that reaches a Geneve probe port (whose decision needs every packet of the
underlay flow in the batch) is flagged instead, and all flagged packets of the batch are decoded again by the
vectorised path as one sub-batch; their columns and anomalies are copied back. The vectorised decoders treat
each packet independently of the others in its batch (probe ports apart, which are never accepted here), so
the result is identical to decoding the whole batch with them: same columns, same anomaly rows in the same
order. `tests/test_compiled_decode.py` checks that differentially.

Speed (measured on benchmarks/generate.py's mix, 2 shared cores): the decode step runs at about 4M packets/s
of CPU time against 0.45M for the vectorised path. What mattered: no helper function taking arrays inside the
loop (numba reference-counts array arguments on every call: 2x), the first layer kind looked up per interface
instead of link.start's sort of the whole batch, and a prefetch of the headers a few packets ahead (the first
header load of each packet was the hottest instruction). The rest is the DecodeContext allocation (~40 ns a
packet) and the loop itself.

Limits: nothing beyond the vectorised decoders' limits; a batch made only of odd packets costs one compiled
pass more than the vectorised path alone. numba compiles `walk` on first use and caches the machine code
(`cache=True`); it freezes the constants imported from other modules into that cache, so `_checked_walk`
compares them with their live values once per process. The module imports numba and llvmlite, so it is only
imported when the compiled engine is used.
"""
from __future__ import annotations

import numba
import numpy as np

from hbonecap import config as C
from hbonecap.capture.prefetch import prefetch as _prefetch
from hbonecap.capture.records import RecordBatch
from hbonecap.config import DecodeConfig
from hbonecap.layers import ip, link, tunnels
from hbonecap.layers.context import (K_DONE, K_ETH, K_GENEVE, K_ICMP, K_ICMPV6, K_IPV4, K_IPV6, K_IPV6_EXT,
                                     K_LOOP, K_NULL, K_RAW, K_SLL, K_SLL2, K_TCP, K_UDP, K_VLAN, K_VXLAN, P_ARP,
                                     P_ETHERTYPE, P_ICMP, P_ICMPV6, P_IP_OTHER, P_LLC, P_NETLINK, P_TCP, P_UDP,
                                     TUN_GENEVE, TUN_VXLAN, DecodeContext)

# Every per-packet column of DecodeContext that the walk writes, in the order `walk` unpacks them. The scratch
# columns (off, ipend, l4next) are included so that the two engines leave identical contexts.
COLUMNS = ("off", "kind", "ipver", "src", "dst", "ttl", "ip_id", "ipend", "l4next", "proto", "sport", "dport",
           "tcp_flags", "seq", "ack", "win", "mss", "wscale", "sack_permitted", "sack_blocks", "tsval", "tsecr",
           "icmp_type", "icmp_code", "payload_len", "payload_off", "vlan", "vlan_tags", "ext_headers", "ifindex",
           "pkttype", "depth", "tun_type", "tun_vni", "tun_options", "outer_ipver", "outer_src", "outer_dst",
           "outer_sport", "outer_dport")

# Per-UDP-port classes (bits), from DecodeConfig.
PORT_GENEVE = 1
PORT_PROBE = 2
PORT_VXLAN = 4

# How many packets ahead `walk` prefetches the headers.
AHEAD = 8

TCPOPT_EOL, TCPOPT_NOP, TCPOPT_MSS, TCPOPT_WSCALE, TCPOPT_SACK_PERM, TCPOPT_SACK, TCPOPT_TS = 0, 1, 2, 3, 4, 5, 8


def _tables() -> tuple[np.ndarray, ...]:
    """Lookup tables built from the vectorised decoders' own constants (one source of truth)."""
    eth_kind = np.zeros(1 << 16, dtype=np.int8)          # ethertype -> next kind (K_DONE: finished here)
    for value, k in ((C.ETHERTYPE_IPV4, K_IPV4), (C.ETHERTYPE_IPV6, K_IPV6), (C.ETHERTYPE_VLAN, K_VLAN),
                     (C.ETHERTYPE_QINQ, K_VLAN), (C.ETHERTYPE_QINQ_OLD, K_VLAN)):
        eth_kind[value] = k
    ip4_kind = np.zeros(256, dtype=np.int8)              # IP protocol -> next kind after IPv4
    for value, k in ((C.IPPROTO_TCP, K_TCP), (C.IPPROTO_UDP, K_UDP), (C.IPPROTO_ICMP, K_ICMP),
                     (C.IPPROTO_ICMPV6, K_ICMPV6)):
        ip4_kind[value] = k
    ip6_kind = ip4_kind.copy()                           # ... after IPv6 or an extension header
    ip6_kind[list(ip.EXTENSION_HEADERS)] = K_IPV6_EXT
    gen_kind = np.zeros(1 << 16, dtype=np.int8)          # Geneve protocol type -> next kind
    for value, k in tunnels.GENEVE_PROTOCOLS.items():
        gen_kind[value] = k
    null_af6 = np.array(link.NULL_AF_INET6, dtype=np.int64)
    return eth_kind, ip4_kind, ip6_kind, gen_kind, null_af6


_TABLES = _tables()
_PORTS: dict[DecodeConfig, np.ndarray] = {}


def _port_classes(config: DecodeConfig) -> np.ndarray:
    t = _PORTS.get(config)
    if t is None:
        t = np.zeros(1 << 16, dtype=np.uint8)
        for ports, bit in ((config.geneve_ports, PORT_GENEVE), (config.geneve_probe_ports, PORT_PROBE),
                           (config.vxlan_ports, PORT_VXLAN)):
            for p in ports:
                if 0 <= p < 1 << 16:
                    t[p] |= bit
        _PORTS[config] = t
    return t


# -- the compiled walk ---------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def walk(buf, base, caplen, origlen, port_class, eth_kind, ip4_kind, ip6_kind, gen_kind, null_af6, limits,
         cols, reject):
    """Decode every packet whose first kind is set in `cols` (kind column); returns the number of packets
    flagged in `reject` (to be decoded by the vectorised path; their columns here are partial)."""
    (off, kind, ipver, src, dst, ttl, ip_id, ipend, l4next, proto, sport, dport, tcp_flags, seq, ack, win, mss,
     wscale, sack_permitted, sack_blocks, tsval, tsecr, icmp_type, icmp_code, payload_len, payload_off, vlan,
     vlan_tags, ext_headers, ifindex, pkttype, depth, tun_type, tun_vni, tun_options, outer_ipver, outer_src,
     outer_dst, outer_sport, outer_dport) = cols
    max_depth = limits[0]
    max_ext = limits[1]
    max_vlan = limits[2]
    max_rounds = limits[3]
    n = base.shape[0]
    rejected = 0
    for i in range(n):
        if i + AHEAD < n:            # the headers of a packet ahead: memory latency, not decoding, is the limit
            w = base[i + AHEAD]
            _prefetch(buf, w)
            _prefetch(buf, w + 64)
        k = np.int64(kind[i])
        p = base[i]
        cap = caplen[i]
        o = np.int64(0)          # cursor, relative to the frame
        ie = np.int64(0)         # ipend
        nxt = np.int64(0)        # l4next
        dep = np.int64(0)
        vtags = np.int64(0)
        exts = np.int64(0)
        steps = 0
        ok = k != K_DONE         # K_DONE at the start: link type not decoded (an anomaly)
        while k != K_DONE:
            steps += 1
            if steps > max_rounds:
                ok = False
                break
            q = p + o
            have = cap - o
            et = np.int64(-1)        # set by the link layers: the ethertype to dispatch on
            if k == K_ETH:
                if have < 14:
                    ok = False
                    break
                et = (np.int64(buf[q + 12]) << 8) | buf[q + 13]
                o += 14
            elif k == K_IPV4:
                if have < 20:
                    ok = False
                    break
                vihl = np.int64(buf[q])
                ihl = (vihl & 0x0F) * 4
                if (vihl >> 4) != 4 or ihl < 20 or have < ihl:
                    ok = False
                    break
                total = (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                frag = (np.int64(buf[q + 6]) << 8) | buf[q + 7]
                if (frag & 0x3FFF) != 0:          # any fragment: ipv4_fragment
                    ok = False
                    break
                wire = origlen[i] - o
                if total == 0:                    # TSO/GSO
                    total = max(wire, ihl)
                elif total < ihl:
                    ok = False
                    break
                if total > wire:
                    ok = False
                    break
                pr = np.int64(buf[q + 9])
                ipver[i] = 4
                ip_id[i] = (np.int64(buf[q + 4]) << 8) | buf[q + 5]
                ttl[i] = buf[q + 8]
                for j in range(4):
                    src[i, j] = buf[q + 12 + j]
                    dst[i, j] = buf[q + 16 + j]
                for j in range(4, 16):
                    src[i, j] = 0
                    dst[i, j] = 0
                ie = o + total
                o += ihl
                nxt = pr
                k = np.int64(ip4_kind[pr])
                if k == K_DONE:
                    proto[i] = (P_IP_OTHER << 16) | pr
            elif k == K_TCP:
                if have < 20:
                    ok = False
                    break
                b12 = np.int64(buf[q + 12])
                doff = (b12 >> 4) * 4
                if doff < 20 or have < doff:
                    ok = False
                    break
                start = o + doff
                plen = ie - start
                if plen < 0:                      # tcp_bad_length
                    ok = False
                    break
                sport[i] = (np.int64(buf[q]) << 8) | buf[q + 1]
                dport[i] = (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                seq[i] = ((np.int64(buf[q + 4]) << 24) | (np.int64(buf[q + 5]) << 16) | (np.int64(buf[q + 6]) << 8)
                          | buf[q + 7])
                ack[i] = ((np.int64(buf[q + 8]) << 24) | (np.int64(buf[q + 9]) << 16) | (np.int64(buf[q + 10]) << 8)
                          | buf[q + 11])
                tcp_flags[i] = np.int64(buf[q + 13]) | ((b12 & 1) << 8)
                win[i] = (np.int64(buf[q + 14]) << 8) | buf[q + 15]
                proto[i] = P_TCP << 16
                if doff > 20:                     # transport._options
                    sack_permitted[i] = 0
                    cur = q + 20
                    end = q + doff
                    for _ in range(40):
                        if cur >= end:
                            break
                        okind = np.int64(buf[cur])
                        if okind == TCPOPT_EOL:
                            break
                        if okind == TCPOPT_NOP:
                            cur += 1
                            continue
                        ln = np.int64(buf[cur + 1]) if cur + 1 < end else np.int64(0)
                        if ln < 2 or cur + ln > end:      # tcp_bad_option
                            ok = False
                            break
                        if okind == TCPOPT_MSS:
                            if ln == 4:
                                mss[i] = (np.int64(buf[cur + 2]) << 8) | buf[cur + 3]
                        elif okind == TCPOPT_WSCALE:
                            if ln == 3:
                                wscale[i] = buf[cur + 2]
                        elif okind == TCPOPT_SACK_PERM:
                            sack_permitted[i] = 1
                        elif okind == TCPOPT_SACK:
                            sack_blocks[i] = (ln - 2) // 8
                        elif okind == TCPOPT_TS:
                            if ln == 10:
                                tsval[i] = ((np.int64(buf[cur + 2]) << 24) | (np.int64(buf[cur + 3]) << 16)
                                            | (np.int64(buf[cur + 4]) << 8) | buf[cur + 5])
                                tsecr[i] = ((np.int64(buf[cur + 6]) << 24) | (np.int64(buf[cur + 7]) << 16)
                                            | (np.int64(buf[cur + 8]) << 8) | buf[cur + 9])
                        cur += ln
                    if not ok:
                        break
                payload_off[i] = start
                payload_len[i] = plen
                o = start
                k = K_DONE
            elif k == K_UDP:
                if have < 8:
                    ok = False
                    break
                sp = (np.int64(buf[q]) << 8) | buf[q + 1]
                dp = (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                ulen = (np.int64(buf[q + 4]) << 8) | buf[q + 5]
                if ulen < 8 and ulen != 0:        # udp_bad_length
                    ok = False
                    break
                pc = np.int64(port_class[dp])
                if pc & PORT_PROBE:               # flow agreement is batch-level: vectorised path
                    ok = False
                    break
                gen = (pc & PORT_GENEVE) != 0
                vx = (pc & PORT_VXLAN) != 0 and not gen
                if (gen or vx) and dep >= max_depth:   # tunnel_depth_exceeded
                    ok = False
                    break
                sport[i] = sp
                dport[i] = dp
                proto[i] = P_UDP << 16
                start = o + 8
                plen = ulen - 8 if ulen >= 8 else max(ie - start, 0)
                payload_off[i] = start
                payload_len[i] = plen
                ie = start + plen
                o = start
                k = K_GENEVE if gen else (K_VXLAN if vx else K_DONE)
            elif k == K_GENEVE or k == K_VXLAN:
                if have < 8:
                    ok = False
                    break
                b0 = np.int64(buf[q])
                if k == K_GENEVE:
                    optlen = (b0 & 0x3F) * 4
                    if (b0 >> 6) != 0 or have < optlen + 8:
                        ok = False
                        break
                    ptype = (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                    nk = np.int64(gen_kind[ptype])
                    if nk == K_DONE:              # geneve_unknown_protocol
                        ok = False
                        break
                    cur = q + 8
                    end = cur + optlen
                    count = 0
                    for _ in range(64):
                        if cur + 4 > end:
                            break
                        ln = 4 + (np.int64(buf[cur + 3]) & 0x1F) * 4
                        if cur + ln > end:
                            break
                        count += 1
                        cur += ln
                    if cur != end:                # geneve_bad_options
                        ok = False
                        break
                    tt = TUN_GENEVE
                    hl = 8 + optlen
                else:
                    if (b0 & 0x04) != 0 or (b0 & 0x08) == 0:   # vxlan_gpe, vxlan_bad_flags
                        ok = False
                        break
                    nk = K_ETH
                    tt = TUN_VXLAN
                    hl = 8
                    count = -1
                # tunnels._enter
                if dep == 0:
                    outer_ipver[i] = ipver[i]
                    for j in range(16):
                        outer_src[i, j] = src[i, j]
                        outer_dst[i, j] = dst[i, j]
                    outer_sport[i] = sport[i]
                    outer_dport[i] = dport[i]
                tun_type[i, dep] = tt
                tun_vni[i, dep] = (np.int64(buf[q + 4]) << 16) | (np.int64(buf[q + 5]) << 8) | buf[q + 6]
                dep += 1
                ipver[i] = 0
                for j in range(16):
                    src[i, j] = 0
                    dst[i, j] = 0
                ttl[i] = -1
                ip_id[i] = -1
                sport[i] = -1
                dport[i] = -1
                payload_len[i] = -1
                payload_off[i] = -1
                proto[i] = 0
                vtags = 0
                if tt == TUN_GENEVE:
                    tun_options[i] = count
                o += hl
                k = nk
            elif k == K_IPV6:
                if have < 40 or (np.int64(buf[q]) >> 4) != 6:
                    ok = False
                    break
                plen = (np.int64(buf[q + 4]) << 8) | buf[q + 5]
                start = o + 40
                wire = max(origlen[i] - start, 0)
                if plen > wire:                   # ipv6_length_exceeds_frame
                    ok = False
                    break
                nh = np.int64(buf[q + 6])
                ipver[i] = 6
                ttl[i] = buf[q + 7]
                ip_id[i] = -1
                for j in range(16):
                    src[i, j] = buf[q + 8 + j]
                    dst[i, j] = buf[q + 24 + j]
                ie = start + (wire if plen == 0 else plen)
                exts = 0
                o += 40
                nxt = nh
                k = np.int64(ip6_kind[nh])
                if k == K_DONE:
                    proto[i] = (P_IP_OTHER << 16) | nh
            elif k == K_VLAN:
                if have < 4 or vtags >= max_vlan:
                    ok = False
                    break
                if vlan[i] < 0:
                    vlan[i] = ((np.int64(buf[q]) << 8) | buf[q + 1]) & 0x0FFF
                et = (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                vtags += 1
                o += 4
            elif k == K_IPV6_EXT:
                if exts >= max_ext or have < 8 or nxt == C.IPPROTO_FRAGMENT:   # fragments: ipv6_fragment
                    ok = False
                    break
                nh = np.int64(buf[q])
                hl = np.int64(buf[q + 1])
                length = (hl + 2) * 4 if nxt == C.IPPROTO_AH else (hl + 1) * 8
                if have < length:
                    ok = False
                    break
                exts += 1
                o += length
                nxt = nh
                k = np.int64(ip6_kind[nh])
                if k == K_DONE:
                    proto[i] = (P_IP_OTHER << 16) | nh
            elif k == K_ICMP or k == K_ICMPV6:
                if have < 4:
                    ok = False
                    break
                proto[i] = (P_ICMP if k == K_ICMP else P_ICMPV6) << 16
                icmp_type[i] = buf[q]
                icmp_code[i] = buf[q + 1]
                start = o + 4
                payload_off[i] = start
                payload_len[i] = max(ie - start, 0)
                k = K_DONE
            elif k == K_SLL or k == K_SLL2:
                if k == K_SLL:
                    if have < 16:
                        ok = False
                        break
                    pkttype[i] = (np.int64(buf[q]) << 8) | buf[q + 1]
                    hatype = (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                    et = (np.int64(buf[q + 14]) << 8) | buf[q + 15]
                    o += 16
                else:
                    if have < 20:
                        ok = False
                        break
                    et = (np.int64(buf[q]) << 8) | buf[q + 1]
                    ifindex[i] = ((np.int64(buf[q + 4]) << 24) | (np.int64(buf[q + 5]) << 16)
                                  | (np.int64(buf[q + 6]) << 8) | buf[q + 7])
                    hatype = (np.int64(buf[q + 8]) << 8) | buf[q + 9]
                    pkttype[i] = buf[q + 10]
                    o += 20
                if hatype == link.ARPHRD_NETLINK:
                    proto[i] = P_NETLINK << 16
                    k = K_DONE
                    et = -1
            elif k == K_NULL or k == K_LOOP:
                if have < 4:
                    ok = False
                    break
                af = (np.int64(buf[q]) << 24) | (np.int64(buf[q + 1]) << 16) | (np.int64(buf[q + 2]) << 8) | buf[q + 3]
                if k == K_NULL:
                    le = ((np.int64(buf[q + 3]) << 24) | (np.int64(buf[q + 2]) << 16) | (np.int64(buf[q + 1]) << 8)
                          | buf[q])
                    if le <= 0xFFFF:
                        af = le
                o += 4
                if af == link.NULL_AF_INET:
                    k = K_IPV4
                else:
                    k = K_DONE
                    for j in range(null_af6.shape[0]):
                        if af == null_af6[j]:
                            k = K_IPV6
                    if k == K_DONE:               # link_unknown_family
                        ok = False
                        break
            elif k == K_RAW:
                if have < 1:
                    ok = False
                    break
                v = np.int64(buf[q]) >> 4
                if v == 4:
                    k = K_IPV4
                elif v == 6:
                    k = K_IPV6
                else:                             # link_bad_ip_version
                    ok = False
                    break
            else:                                 # a kind this walk does not know: leave it to the reference
                ok = False
                break
            if et >= 0:                           # link.dispatch_ethertype
                k = np.int64(eth_kind[et])
                if k == K_DONE:
                    if et == C.ETHERTYPE_ARP:
                        proto[i] = P_ARP << 16
                    elif et < 0x0600:
                        proto[i] = P_LLC << 16
                    else:
                        proto[i] = (P_ETHERTYPE << 16) | et
        if ok:
            off[i] = o
            kind[i] = K_DONE
            ipend[i] = ie
            l4next[i] = nxt
            depth[i] = dep
            vlan_tags[i] = vtags
            ext_headers[i] = exts
        else:
            reject[i] = 1
            rejected += 1
    return rejected


# -- the batch entry point -----------------------------------------------------------------------------------

def _first_kinds(link_types: np.ndarray, config: DecodeConfig) -> np.ndarray:
    """The first layer kind of each interface, as link.start sets it (K_DONE: link type not decoded); per
    interface rather than per packet, which spares link.start's sort of the whole batch."""
    m = len(link_types)
    z = np.zeros(m, dtype=np.int64)
    probe = DecodeContext(np.zeros(0, dtype=np.uint8), z, z, z, config)
    link.start(probe, np.asarray(link_types))
    return probe.kind


@numba.njit(cache=True)
def _frozen_constants():
    return (K_DONE, K_ETH, K_VLAN, K_SLL, K_SLL2, K_NULL, K_LOOP, K_RAW, K_IPV4, K_IPV6, K_IPV6_EXT, K_TCP, K_UDP,
            K_ICMP, K_ICMPV6, K_GENEVE, K_VXLAN, P_ARP, P_LLC, P_ETHERTYPE, P_IP_OTHER, P_NETLINK, P_TCP, P_UDP,
            P_ICMP, P_ICMPV6, TUN_GENEVE, TUN_VXLAN, C.ETHERTYPE_ARP, C.IPPROTO_FRAGMENT, C.IPPROTO_AH,
            link.ARPHRD_NETLINK, link.NULL_AF_INET)


_walk = None


def _checked_walk():
    """`walk`, unless its cache is stale. numba freezes the global constants into the cached machine code and
    revalidates the cache only against this file (documented numba behaviour): compare the constants imported
    from other modules with their live values once per process, and compile afresh, uncached, if they moved."""
    global _walk
    if _walk is None:
        if _frozen_constants() == _frozen_constants.py_func():
            _walk = walk
        else:
            _walk = numba.njit(nogil=True)(walk.py_func)
    return _walk


_INPUTS = ("buf", "base", "caplen", "origlen")


def decode_batch(batch: RecordBatch, link_types: np.ndarray, config: DecodeConfig, wide=None) -> DecodeContext:
    """Same contract and result as `unwrap.decode_batch(..., engine="numpy")`, compiled for the common case."""
    from hbonecap.layers import unwrap

    ctx = DecodeContext(batch.buf, batch.data_off, batch.caplen, batch.origlen, config, wide)
    if ctx.n == 0:
        return ctx
    ctx.kind[:] = _first_kinds(link_types, config)[batch.iface]
    reject = np.zeros(ctx.n, dtype=np.uint8)
    limits = np.array([config.max_tunnel_depth, config.max_extension_headers, config.max_vlan_tags,
                       unwrap.max_rounds(config)], dtype=np.int64)
    cols = tuple(getattr(ctx, name) for name in COLUMNS)
    # One compiled signature for every reader: a read-only buffer, contiguous per-packet inputs.
    buf = ctx.buf.view()
    buf.flags.writeable = False
    base, caplen, origlen = (np.ascontiguousarray(a, dtype=np.int64) for a in (ctx.base, ctx.caplen, ctx.origlen))
    nrej = _checked_walk()(buf, base, caplen, origlen, _port_classes(config), *_TABLES, limits, cols, reject)
    if nrej:
        rej = np.flatnonzero(reject)
        sub = RecordBatch(batch.buf, batch.data_off[rej], batch.caplen[rej], batch.origlen[rej], batch.ts_ns[rej],
                          batch.iface[rej], 1, batch.file_offset)
        ref = unwrap.decode_batch(sub, link_types, config, engine="numpy")
        for name, column in vars(ref).items():      # every per-packet array, also any the walk does not know
            if isinstance(column, np.ndarray) and name not in _INPUTS:
                getattr(ctx, name)[rej] = column
        ctx.anomalies = [(rej[sel], layer, kind, detail) for sel, layer, kind, detail in ref.anomalies]
    return ctx

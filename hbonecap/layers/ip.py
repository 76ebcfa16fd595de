"""IPv4 (RFC 791) and IPv6 (RFC 8200 sections 3-4) headers, vectorised.

IPv4: version, header length with options (skipped by length), total length, identification, fragment
fields, TTL, protocol, addresses. A total length of 0 is taken as TSO/GSO (the capture saw the packet before
segmentation) and the wire length is used instead. Fragments are reported as `ipv4_fragment` /
`ipv6_fragment` anomalies and kept as packets; only a first fragment's transport header is decoded (no
reassembly). IPv6: fixed header, then extension headers (hop-by-hop, routing, fragment, destination options,
AH, mobility, HIP, shim6) walked by length up to `max_extension_headers`; a payload length of 0 (jumbogram or
BIG TCP) also falls back to the wire length.
"""
from __future__ import annotations

import numpy as np

from hbonecap import config as C
from hbonecap.layers import context as K
from hbonecap.layers.context import DecodeContext

EXTENSION_HEADERS = (C.IPPROTO_HOPOPTS, C.IPPROTO_ROUTING, C.IPPROTO_FRAGMENT, C.IPPROTO_DSTOPTS, C.IPPROTO_AH,
                     C.IPPROTO_MOBILITY, C.IPPROTO_HIP, C.IPPROTO_SHIM6)


def dispatch_ipproto(ctx: DecodeContext, sel: np.ndarray, proto: np.ndarray, v6: bool) -> None:
    kind = ctx.kind
    kind[sel] = K.K_DONE
    ctx.l4next[sel] = proto
    handled = np.zeros(len(sel), dtype=bool)
    for value, k in ((C.IPPROTO_TCP, K.K_TCP), (C.IPPROTO_UDP, K.K_UDP), (C.IPPROTO_ICMP, K.K_ICMP),
                     (C.IPPROTO_ICMPV6, K.K_ICMPV6)):
        m = proto == value
        kind[sel[m]] = k
        handled |= m
    if v6:
        m = np.isin(proto, EXTENSION_HEADERS)
        kind[sel[m]] = K.K_IPV6_EXT
        handled |= m
    rest = ~handled
    ctx.finish(sel[rest], K.P_IP_OTHER, proto[rest])


def _addresses(ctx: DecodeContext, sel, rel_src: int, rel_dst: int, width: int) -> None:
    ctx.src[sel] = 0
    ctx.dst[sel] = 0
    ctx.src[sel, :width] = ctx.take(sel, rel_src, width)
    ctx.dst[sel, :width] = ctx.take(sel, rel_dst, width)


def decode_ipv4(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 20, "ip", "IPv4 header")
    vihl = ctx.u8(sel, 0)
    bad = (vihl >> 4) != 4
    ctx.stop(sel[bad], "ip", "ipv4_bad_version", [f"version {int(v >> 4)} in an IPv4 header" for v in vihl[bad]])
    sel, vihl = sel[~bad], vihl[~bad]
    ihl = (vihl & 0x0F) * 4
    bad = ihl < 20
    ctx.stop(sel[bad], "ip", "ipv4_bad_header_length", [f"header length {int(x)} < 20" for x in ihl[bad]])
    sel, ihl = sel[~bad], ihl[~bad]
    sel, ihl = ctx.need_aligned(sel, ihl, "ip", "IPv4 header with options", ihl)
    total = ctx.u16(sel, 2)
    frag = ctx.u16(sel, 6)
    proto = ctx.u8(sel, 9)
    ctx.ipver[sel] = 4
    ctx.ip_id[sel] = ctx.u16(sel, 4)
    ctx.ttl[sel] = ctx.u8(sel, 8)
    _addresses(ctx, sel, 12, 16, 4)
    start = ctx.off[sel]
    wire = ctx.origlen[sel] - start
    tso = total == 0
    short = (total < ihl) & ~tso
    ctx.note(sel[short], "ip", "ipv4_bad_total_length", [f"total length {int(t)} < header length" for t in total[short]])
    total = np.where(tso | short, np.maximum(wire, ihl), total)
    over = total > wire
    ctx.note(sel[over], "ip", "ipv4_length_exceeds_frame",
             [f"total length {int(t)} exceeds the {int(w)} bytes on the wire" for t, w in zip(total[over], wire[over])])
    ctx.ipend[sel] = start + total
    mf = (frag & 0x2000) != 0
    fo = frag & 0x1FFF
    fr = mf | (fo != 0)
    if fr.any():
        ctx.note(sel[fr], "ip", "ipv4_fragment",
                 [f"fragment at offset {int(o) * 8}{', more follow' if m else ', last'} (not reassembled)"
                  for o, m in zip(fo[fr], mf[fr])])
        later = fo != 0
        ctx.finish(sel[later], K.P_FRAGMENT, proto[later])
        sel, ihl, proto = sel[~later], ihl[~later], proto[~later]
    ctx.off[sel] += ihl
    dispatch_ipproto(ctx, sel, proto, v6=False)


def decode_ipv6(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 40, "ip", "IPv6 header")
    v = ctx.u8(sel, 0) >> 4
    bad = v != 6
    ctx.stop(sel[bad], "ip", "ipv6_bad_version", [f"version {int(x)} in an IPv6 header" for x in v[bad]])
    sel = sel[~bad]
    plen = ctx.u16(sel, 4)
    nh = ctx.u8(sel, 6)
    ctx.ipver[sel] = 6
    ctx.ttl[sel] = ctx.u8(sel, 7)
    ctx.ip_id[sel] = -1
    _addresses(ctx, sel, 8, 24, 16)
    start = ctx.off[sel] + 40
    wire = np.maximum(ctx.origlen[sel] - start, 0)
    over = plen > wire
    ctx.note(sel[over], "ip", "ipv6_length_exceeds_frame",
             [f"payload length {int(t)} exceeds the {int(w)} bytes on the wire" for t, w in zip(plen[over], wire[over])])
    ctx.ipend[sel] = start + np.where(plen == 0, wire, plen)
    ctx.ext_headers[sel] = 0
    ctx.off[sel] += 40
    dispatch_ipproto(ctx, sel, nh, v6=True)


def decode_ipv6_ext(ctx: DecodeContext, sel: np.ndarray) -> None:
    over = ctx.ext_headers[sel] >= ctx.config.max_extension_headers
    ctx.stop(sel[over], "ip", "ipv6_too_many_extension_headers",
             f"more than {ctx.config.max_extension_headers} extension headers")
    sel = sel[~over]
    sel = ctx.need(sel, 8, "ip", "IPv6 extension header")
    t = ctx.l4next[sel]
    nh = ctx.u8(sel, 0)
    hl = ctx.u8(sel, 1)
    length = np.where(t == C.IPPROTO_AH, (hl + 2) * 4, np.where(t == C.IPPROTO_FRAGMENT, 8, (hl + 1) * 8))
    sel, t, nh, length = ctx.need_aligned(sel, length, "ip", "IPv6 extension header", t, nh, length)
    ctx.ext_headers[sel] += 1
    fr = t == C.IPPROTO_FRAGMENT
    if fr.any():
        fw = ctx.u16(sel[fr], 2)
        fo, mf = fw >> 3, (fw & 1) != 0
        ctx.note(sel[fr], "ip", "ipv6_fragment",
                 [f"fragment at offset {int(o) * 8}{', more follow' if m else ', last'} (not reassembled)"
                  for o, m in zip(fo, mf)])
        later = np.zeros(len(sel), dtype=bool)
        later[np.flatnonzero(fr)[fo != 0]] = True
        ctx.finish(sel[later], K.P_FRAGMENT, nh[later])
        sel, nh, length = sel[~later], nh[~later], length[~later]
    ctx.off[sel] += length
    dispatch_ipproto(ctx, sel, nh, v6=True)

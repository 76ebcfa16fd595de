"""TCP (RFC 9293 section 3.1, options: MSS, window scale and SACK-permitted (RFC 7323, RFC 2018), SACK blocks,
timestamps), UDP (RFC 768) and an ICMP / ICMPv6 summary (type and code), vectorised.

Payload lengths come from the IP header's lengths, not from the captured length, so Ethernet padding is never
payload and snapshot-length cuts are visible (payload_len > captured payload). TCP options are walked with
one cursor per packet, at most 40 steps. UDP payloads on configured ports are handed to the Geneve and VXLAN
decoders; probe ports (6082-6090 by default) only when every packet of the underlay flow in the batch carries
a valid Geneve header.
"""
from __future__ import annotations

import numpy as np

from hbonecap.layers import context as K
from hbonecap.layers import tunnels
from hbonecap.layers.context import DecodeContext

TCPOPT_EOL, TCPOPT_NOP, TCPOPT_MSS, TCPOPT_WSCALE, TCPOPT_SACK_PERM, TCPOPT_SACK, TCPOPT_TS = 0, 1, 2, 3, 4, 5, 8


def decode_tcp(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 20, "tcp", "TCP header")
    ctx.sport[sel] = ctx.u16(sel, 0)
    ctx.dport[sel] = ctx.u16(sel, 2)
    ctx.seq[sel] = ctx.u32(sel, 4)
    ctx.ack[sel] = ctx.u32(sel, 8)
    b12 = ctx.u8(sel, 12)
    ctx.tcp_flags[sel] = ctx.u8(sel, 13) | ((b12 & 1) << 8)
    ctx.win[sel] = ctx.u16(sel, 14)
    ctx.proto[sel] = K.P_TCP << 16
    doff = (b12 >> 4) * 4
    bad = doff < 20
    ctx.stop(sel[bad], "tcp", "tcp_bad_header_length", [f"data offset {int(d)} < 20" for d in doff[bad]])
    sel, doff = sel[~bad], doff[~bad]
    sel, doff = ctx.need_aligned(sel, doff, "tcp", "TCP header with options", doff)
    has_opts = doff > 20
    if has_opts.any():
        _options(ctx, sel[has_opts], doff[has_opts])
    start = ctx.off[sel] + doff
    plen = ctx.ipend[sel] - start
    neg = plen < 0
    ctx.note(sel[neg], "tcp", "tcp_bad_length", "IP length shorter than the TCP header")
    ctx.payload_off[sel] = start
    ctx.payload_len[sel] = np.maximum(plen, 0)
    ctx.off[sel] = start
    ctx.kind[sel] = K.K_DONE


def _options(ctx: DecodeContext, sel: np.ndarray, doff: np.ndarray) -> None:
    buf = ctx.buf
    base = ctx.base[sel] + ctx.off[sel]
    # Fast path: the layout Linux puts on every segment after the handshake, NOP NOP TS, and nothing else.
    if len(sel) > 64:
        cand = doff == 32
        b = base[cand] + 20
        linux = (buf[b] == TCPOPT_NOP) & (buf[b + 1] == TCPOPT_NOP) & (buf[b + 2] == TCPOPT_TS) & (buf[b + 3] == 10)
        hit = np.flatnonzero(cand)[linux]
        if len(hit):
            hb = base[hit] + 24
            ctx.tsval[sel[hit]] = _be32(buf, hb)
            ctx.tsecr[sel[hit]] = _be32(buf, hb + 4)
            ctx.sack_permitted[sel[hit]] = 0
            rest = np.ones(len(sel), dtype=bool)
            rest[hit] = False
            sel, doff, base = sel[rest], doff[rest], base[rest]
    cur = base + 20
    end = base + doff
    ctx.sack_permitted[sel] = 0
    live = np.ones(len(sel), dtype=bool)
    for _ in range(40):
        live &= cur < end
        if not live.any():
            break
        idx = np.flatnonzero(live)
        kind = buf[cur[idx]].astype(np.int64)
        eol = kind == TCPOPT_EOL
        live[idx[eol]] = False
        nop = kind == TCPOPT_NOP
        cur[idx[nop]] += 1
        rest = idx[~eol & ~nop]
        if not len(rest):
            continue
        kind = kind[~eol & ~nop]
        has_len = cur[rest] + 1 < end[rest]
        ln = np.zeros(len(rest), dtype=np.int64)
        ln[has_len] = buf[cur[rest[has_len]] + 1]
        bad = (ln < 2) | (cur[rest] + ln > end[rest])
        if bad.any():
            ctx.note(sel[rest[bad]], "tcp", "tcp_bad_option", [f"option {int(k)} with length {int(x)}"
                                                               for k, x in zip(kind[bad], ln[bad])])
            live[rest[bad]] = False
        ok = ~bad
        rest, kind, ln = rest[ok], kind[ok], ln[ok]
        c = cur[rest]
        m = (kind == TCPOPT_MSS) & (ln == 4)
        ctx.mss[sel[rest[m]]] = (buf[c[m] + 2].astype(np.int64) << 8) | buf[c[m] + 3]
        m = (kind == TCPOPT_WSCALE) & (ln == 3)
        ctx.wscale[sel[rest[m]]] = buf[c[m] + 2]
        m = kind == TCPOPT_SACK_PERM
        ctx.sack_permitted[sel[rest[m]]] = 1
        m = kind == TCPOPT_SACK
        ctx.sack_blocks[sel[rest[m]]] = (ln[m] - 2) // 8
        m = (kind == TCPOPT_TS) & (ln == 10)
        if m.any():
            cc = c[m]
            ctx.tsval[sel[rest[m]]] = _be32(buf, cc + 2)
            ctx.tsecr[sel[rest[m]]] = _be32(buf, cc + 6)
        cur[rest] += ln


def _be32(buf, i):
    return (buf[i].astype(np.int64) << 24) | (buf[i + 1].astype(np.int64) << 16) | (buf[i + 2].astype(np.int64) << 8) | buf[i + 3]


def decode_udp(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 8, "udp", "UDP header")
    sport = ctx.u16(sel, 0)
    dport = ctx.u16(sel, 2)
    ulen = ctx.u16(sel, 4)
    ctx.sport[sel] = sport
    ctx.dport[sel] = dport
    ctx.proto[sel] = K.P_UDP << 16
    start = ctx.off[sel] + 8
    iplen = ctx.ipend[sel] - start
    bad = (ulen < 8) & (ulen != 0)
    ctx.note(sel[bad], "udp", "udp_bad_length", [f"UDP length {int(x)} < 8" for x in ulen[bad]])
    plen = np.where(ulen >= 8, ulen - 8, np.maximum(iplen, 0))
    ctx.payload_off[sel] = start
    ctx.payload_len[sel] = plen
    ctx.ipend[sel] = start + plen
    ctx.off[sel] = start
    ctx.kind[sel] = K.K_DONE
    tunnels.dispatch_udp(ctx, sel, sport, dport)


def decode_icmp(ctx: DecodeContext, sel: np.ndarray, v6: bool = False) -> None:
    layer = "icmpv6" if v6 else "icmp"
    ctx.proto[sel] = (K.P_ICMPV6 if v6 else K.P_ICMP) << 16
    sel = ctx.need(sel, 4, layer, "ICMP header")
    ctx.icmp_type[sel] = ctx.u8(sel, 0)
    ctx.icmp_code[sel] = ctx.u8(sel, 1)
    start = ctx.off[sel] + 4
    ctx.payload_off[sel] = start
    ctx.payload_len[sel] = np.maximum(ctx.ipend[sel] - start, 0)
    ctx.kind[sel] = K.K_DONE


def decode_icmpv6(ctx: DecodeContext, sel: np.ndarray) -> None:
    decode_icmp(ctx, sel, v6=True)

"""Geneve (RFC 8926 section 3.4) and VXLAN (RFC 7348 section 5) encapsulation over UDP, vectorised.

Geneve: version must be 0; options are skipped by the header's option length and counted by walking their
TLV lengths; protocol type 0x6558 (Ethernet), 0x0800 (IPv4), 0x86DD (IPv6) continue decoding; others are
`geneve_unknown_protocol`. Geneve is taken on `config.geneve_ports`, and on `config.geneve_probe_ports` only
when every packet to that port between the same two underlay addresses in the batch holds a valid header
(istio-cni from 1.19 takes the first free port above 6081). VXLAN: the I flag must be set; a set P flag means
VXLAN-GPE (RFC draft-ietf-nvo3-vxlan-gpe) which is not VXLAN and is left as UDP with an anomaly; the G flag
(group policy) is tolerated. Nesting is bounded by `config.max_tunnel_depth`; entering a tunnel moves the
addresses seen so far to the outer columns (the outermost underlay wins) and resets the inner ones.
"""
from __future__ import annotations

import numpy as np

from hbonecap import config as C
from hbonecap.layers import context as K
from hbonecap.layers.context import DecodeContext

GENEVE_PROTOCOLS = {C.ETHERTYPE_TEB: K.K_ETH, C.ETHERTYPE_IPV4: K.K_IPV4, C.ETHERTYPE_IPV6: K.K_IPV6}


def dispatch_udp(ctx: DecodeContext, sel: np.ndarray, sport: np.ndarray, dport: np.ndarray) -> None:
    cfg = ctx.config
    gen = np.isin(dport, list(cfg.geneve_ports))
    probe = np.isin(dport, list(cfg.geneve_probe_ports))
    if probe.any():
        gen |= _probe_geneve(ctx, sel, dport, probe)
    vx = np.isin(dport, list(cfg.vxlan_ports)) & ~gen
    want = gen | vx
    if not want.any():
        return
    deep = want & (ctx.depth[sel] >= cfg.max_tunnel_depth)
    ctx.note(sel[deep], "tunnel", "tunnel_depth_exceeded",
             f"more than {cfg.max_tunnel_depth} nested tunnels; inner layers not decoded")
    ctx.kind[sel[gen & ~deep]] = K.K_GENEVE
    ctx.kind[sel[vx & ~deep]] = K.K_VXLAN


def _geneve_valid(ctx: DecodeContext, sel: np.ndarray) -> np.ndarray:
    have = ctx.caplen[sel] - ctx.off[sel]
    ok = have >= 8
    idx = sel[ok]
    b0 = ctx.u8(idx, 0)
    ptype = ctx.u16(idx, 2)
    good = ((b0 >> 6) == 0) & np.isin(ptype, list(GENEVE_PROTOCOLS)) & ((b0 & 0x3F) * 4 + 8 <= have[ok])
    res = np.zeros(len(sel), dtype=bool)
    res[np.flatnonzero(ok)[good]] = True
    return res


def _probe_geneve(ctx: DecodeContext, sel, dport, probe) -> np.ndarray:
    """Geneve on a probe port only when the whole underlay flow (addresses + port) agrees."""
    cand = sel[probe]
    valid = _geneve_valid(ctx, cand)
    key = np.concatenate([ctx.src[cand], ctx.dst[cand],
                          dport[probe].astype(">u2").view(np.uint8).reshape(-1, 2)], axis=1)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    bad_groups = np.unique(inv[~valid])
    agree = ~np.isin(inv, bad_groups)
    out = np.zeros(len(sel), dtype=bool)
    out[np.flatnonzero(probe)[agree]] = True
    return out


def _enter(ctx: DecodeContext, sel: np.ndarray, tun_type: int, vni: np.ndarray) -> None:
    first = sel[ctx.depth[sel] == 0]
    ctx.outer_ipver[first] = ctx.ipver[first]
    ctx.outer_src[first] = ctx.src[first]
    ctx.outer_dst[first] = ctx.dst[first]
    ctx.outer_sport[first] = ctx.sport[first]
    ctx.outer_dport[first] = ctx.dport[first]
    d = ctx.depth[sel].astype(np.int64)
    ctx.tun_type[sel, d] = tun_type
    ctx.tun_vni[sel, d] = vni
    ctx.depth[sel] += 1
    ctx.ipver[sel] = 0
    ctx.src[sel] = 0
    ctx.dst[sel] = 0
    for col in (ctx.ttl, ctx.ip_id, ctx.sport, ctx.dport, ctx.payload_len, ctx.payload_off):
        col[sel] = -1
    ctx.proto[sel] = 0
    ctx.vlan_tags[sel] = 0


def _mark_inner(ctx: DecodeContext, sel: np.ndarray, link: np.ndarray | int) -> None:
    """Where each packet's innermost tunnelled frame starts and its link (1 Ethernet, 2 raw IP), for exporters
    (`hbonecap unwrap`). Kept by the vectorised decoders only, outside the compared decode columns."""
    ex = ctx.__dict__.setdefault("tunnel_frames", {})
    if "start" not in ex:
        ex["start"] = [np.full(ctx.n, -1, dtype=np.int64)]
        ex["link"] = [np.zeros(ctx.n, dtype=np.int8)]
    ex["start"][0][sel] = ctx.off[sel]
    ex["link"][0][sel] = link


def decode_geneve(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 8, "geneve", "Geneve header")
    b0 = ctx.u8(sel, 0)
    ver = b0 >> 6
    bad = ver != 0
    ctx.stop(sel[bad], "geneve", "geneve_bad_version", [f"Geneve version {int(v)}" for v in ver[bad]])
    sel, b0 = sel[~bad], b0[~bad]
    optlen = (b0 & 0x3F) * 4
    sel, optlen = ctx.need_aligned(sel, optlen + 8, "geneve", "Geneve header with options", optlen)
    ptype = ctx.u16(sel, 2)
    vni = ctx.u32(sel, 4) >> 8
    count = _count_options(ctx, sel, optlen)
    _enter(ctx, sel, K.TUN_GENEVE, vni)
    ctx.tun_options[sel] = count
    ctx.off[sel] += 8 + optlen
    known = np.isin(ptype, list(GENEVE_PROTOCOLS))
    ctx.stop(sel[~known], "geneve", "geneve_unknown_protocol",
             [f"protocol type {int(p):#06x} not decoded" for p in ptype[~known]])
    for value, k in GENEVE_PROTOCOLS.items():
        ctx.kind[sel[ptype == value]] = k
    _mark_inner(ctx, sel, np.where(ptype == C.ETHERTYPE_TEB, 1, 2))


def _count_options(ctx: DecodeContext, sel: np.ndarray, optlen: np.ndarray) -> np.ndarray:
    count = np.zeros(len(sel), dtype=np.int16)
    cur = ctx.base[sel] + ctx.off[sel] + 8
    end = cur + optlen
    bad = np.zeros(len(sel), dtype=bool)
    for _ in range(64):
        live = (cur + 4 <= end) & ~bad
        if not live.any():
            break
        i = np.flatnonzero(live)
        ln = 4 + (ctx.buf[cur[i] + 3].astype(np.int64) & 0x1F) * 4
        over = cur[i] + ln > end[i]
        bad[i[over]] = True
        count[i[~over]] += 1
        cur[i[~over]] += ln[~over]
    short = ((cur < end) & ~bad) | bad
    ctx.note(sel[short], "geneve", "geneve_bad_options", "option lengths do not add up to the header's option length")
    return count


def decode_vxlan(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 8, "vxlan", "VXLAN header")
    flags = ctx.u8(sel, 0)
    gpe = (flags & 0x04) != 0
    ctx.stop(sel[gpe], "vxlan", "vxlan_gpe", "P flag set: VXLAN-GPE, not VXLAN; left as UDP")
    sel, flags = sel[~gpe], flags[~gpe]
    noi = (flags & 0x08) == 0
    ctx.stop(sel[noi], "vxlan", "vxlan_bad_flags", [f"flags {int(f):#04x} without the I flag; left as UDP" for f in flags[noi]])
    sel = sel[~noi]
    vni = ctx.u32(sel, 4) >> 8
    _enter(ctx, sel, K.TUN_VXLAN, vni)
    ctx.off[sel] += 8
    ctx.kind[sel] = K.K_ETH
    _mark_inner(ctx, sel, 1)

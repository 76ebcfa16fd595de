"""Link layers: Ethernet II with 802.1Q / 802.1ad (QinQ) tags (IEEE 802.3, 802.1Q), Linux cooked capture v1
(SLL, 16-byte header) and v2 (SLL2, 20-byte header with interface index), BSD NULL / OpenBSD LOOP (4-byte
address family, host / network byte order), raw IPv4/IPv6 (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6).

Strategy: one vectorised function per link type; each ends by dispatching on the ethertype (or address
family) to the next layer. Frames shorter than their link header become `link_truncated` anomalies. Limits:
802.3 length-field frames (LLC/SNAP) are recognised as `llc` and not decoded further; 802.1Q tags are walked
up to `max_vlan_tags`; the outermost VLAN id is kept.
"""
from __future__ import annotations

import numpy as np

from hbonecap import config as C
from hbonecap.layers import context as K
from hbonecap.layers.context import DecodeContext

ARPHRD_NETLINK = 824
NULL_AF_INET = 2
NULL_AF_INET6 = (10, 23, 24, 28, 30)   # Linux, Windows, NetBSD/OpenBSD, FreeBSD/DragonFly, Darwin


def start(ctx: DecodeContext, link_type: np.ndarray) -> None:
    """Set the first kind of every packet from its link type."""
    table = {
        C.LINKTYPE_ETHERNET: K.K_ETH, C.LINKTYPE_LINUX_SLL: K.K_SLL, C.LINKTYPE_LINUX_SLL2: K.K_SLL2,
        C.LINKTYPE_NULL: K.K_NULL, C.LINKTYPE_LOOP: K.K_LOOP, C.LINKTYPE_RAW: K.K_RAW, 12: K.K_RAW, 14: K.K_RAW,
        C.LINKTYPE_IPV4: K.K_IPV4, C.LINKTYPE_IPV6: K.K_IPV6,
    }
    ctx.kind[:] = K.K_DONE
    for lt in np.unique(link_type):
        sel = np.flatnonzero(link_type == lt)
        kind = table.get(int(lt))
        if kind is None:
            ctx.stop(sel, "link", "link_unsupported", f"link type {int(lt)} is not decoded")
        else:
            ctx.kind[sel] = kind


def dispatch_ethertype(ctx: DecodeContext, sel: np.ndarray, etype: np.ndarray) -> None:
    kind = ctx.kind
    kind[sel] = K.K_DONE
    for value, k in ((C.ETHERTYPE_IPV4, K.K_IPV4), (C.ETHERTYPE_IPV6, K.K_IPV6), (C.ETHERTYPE_VLAN, K.K_VLAN),
                     (C.ETHERTYPE_QINQ, K.K_VLAN), (C.ETHERTYPE_QINQ_OLD, K.K_VLAN)):
        kind[sel[etype == value]] = k
    arp = sel[etype == C.ETHERTYPE_ARP]
    ctx.finish(arp, K.P_ARP)
    llc = etype < 0x0600
    ctx.finish(sel[llc], K.P_LLC)
    other = ~llc & ~np.isin(etype, (C.ETHERTYPE_IPV4, C.ETHERTYPE_IPV6, C.ETHERTYPE_VLAN, C.ETHERTYPE_QINQ,
                                    C.ETHERTYPE_QINQ_OLD, C.ETHERTYPE_ARP))
    ctx.finish(sel[other], K.P_ETHERTYPE, etype[other])


def decode_ethernet(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 14, "link", "Ethernet header")
    etype = ctx.u16(sel, 12)
    ctx.off[sel] += 14
    dispatch_ethertype(ctx, sel, etype)


def decode_vlan(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 4, "link", "802.1Q tag")
    over = ctx.vlan_tags[sel] >= ctx.config.max_vlan_tags
    ctx.stop(sel[over], "link", "link_too_many_vlan_tags", f"more than {ctx.config.max_vlan_tags} VLAN tags")
    sel = sel[~over]
    tci = ctx.u16(sel, 0)
    etype = ctx.u16(sel, 2)
    first = ctx.vlan[sel] < 0
    ctx.vlan[sel[first]] = tci[first] & 0x0FFF
    ctx.vlan_tags[sel] += 1
    ctx.off[sel] += 4
    dispatch_ethertype(ctx, sel, etype)


def decode_sll(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 16, "link", "Linux cooked (SLL) header")
    ctx.pkttype[sel] = ctx.u16(sel, 0)
    hatype = ctx.u16(sel, 2)
    proto = ctx.u16(sel, 14)
    ctx.off[sel] += 16
    _cooked(ctx, sel, hatype, proto)


def decode_sll2(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 20, "link", "Linux cooked v2 (SLL2) header")
    proto = ctx.u16(sel, 0)
    ctx.ifindex[sel] = ctx.u32(sel, 4)
    hatype = ctx.u16(sel, 8)
    ctx.pkttype[sel] = ctx.u8(sel, 10)
    ctx.off[sel] += 20
    _cooked(ctx, sel, hatype, proto)


def _cooked(ctx: DecodeContext, sel, hatype, proto) -> None:
    netlink = hatype == ARPHRD_NETLINK
    ctx.finish(sel[netlink], K.P_NETLINK)
    sel, proto = sel[~netlink], proto[~netlink]
    # Protocol values below 0x0600 are Linux "pseudo ethertypes" (802.2, 802.3, CAN...): not decoded.
    dispatch_ethertype(ctx, sel, proto)


def decode_null(ctx: DecodeContext, sel: np.ndarray, network_order: bool = False) -> None:
    sel = ctx.need(sel, 4, "link", "NULL/LOOP header")
    b = ctx.take(sel, 0, 4).astype(np.int64)
    be = (b[:, 0] << 24) | (b[:, 1] << 16) | (b[:, 2] << 8) | b[:, 3]
    if network_order:
        af = be
    else:
        le = (b[:, 3] << 24) | (b[:, 2] << 16) | (b[:, 1] << 8) | b[:, 0]
        # Host byte order of the capturing machine: a family number never exceeds 0xFFFF.
        af = np.where(le > 0xFFFF, be, le)
    ctx.off[sel] += 4
    ctx.kind[sel] = K.K_DONE
    ctx.kind[sel[af == NULL_AF_INET]] = K.K_IPV4
    ctx.kind[sel[np.isin(af, NULL_AF_INET6)]] = K.K_IPV6
    bad = ~((af == NULL_AF_INET) | np.isin(af, NULL_AF_INET6))
    ctx.stop(sel[bad], "link", "link_unknown_family", [f"address family {int(a)}" for a in af[bad]])


def decode_loop(ctx: DecodeContext, sel: np.ndarray) -> None:
    decode_null(ctx, sel, network_order=True)


def decode_raw(ctx: DecodeContext, sel: np.ndarray) -> None:
    sel = ctx.need(sel, 1, "link", "raw IP version")
    v = ctx.u8(sel, 0) >> 4
    ctx.kind[sel[v == 4]] = K.K_IPV4
    ctx.kind[sel[v == 6]] = K.K_IPV6
    bad = (v != 4) & (v != 6)
    ctx.stop(sel[bad], "link", "link_bad_ip_version", [f"raw IP packet with version {int(x)}" for x in v[bad]])

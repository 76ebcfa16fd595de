"""Shared state of the vectorised layer walk: one cursor per packet, one output column per field.

Every decoder in `hbonecap.layers` is a function `decode_x(ctx, sel)` that looks at the packets `sel` (an index
array) whose next layer is x, reads their header fields for all of them at once with numpy, writes output
columns, advances their cursor and sets their next layer kind. Packets whose header does not fit or is
malformed get an anomaly row and stop there; they stay in the packets table with what was decoded so far.
"""
from __future__ import annotations

import numpy as np

from hbonecap.config import DecodeConfig

# Next-layer kinds.
K_DONE = 0
K_ETH = 1
K_VLAN = 2
K_SLL = 3
K_SLL2 = 4
K_NULL = 5
K_LOOP = 6
K_RAW = 7
K_IPV4 = 8
K_IPV6 = 9
K_IPV6_EXT = 10
K_TCP = 11
K_UDP = 12
K_ICMP = 13
K_ICMPV6 = 14
K_GENEVE = 15
K_VXLAN = 16
K_ARP = 17

# Protocol classes for the `proto` column (code = class << 16 | number).
P_UNKNOWN = 0
P_TCP = 1
P_UDP = 2
P_ICMP = 3
P_ICMPV6 = 4
P_ARP = 5
P_IP_OTHER = 6
P_ETHERTYPE = 7
P_LLC = 8
P_FRAGMENT = 9
P_NETLINK = 10

TUN_GENEVE = 1
TUN_VXLAN = 2


# The per-packet integer fields kept as int64 (-1: absent), in the order of a `wide` block.
WIDE_FIELDS = ("ifindex", "pkttype", "vlan", "tun_options", "outer_sport", "outer_dport", "ttl", "ip_id", "sport",
               "dport", "tcp_flags", "seq", "ack", "win", "mss", "wscale", "sack_blocks", "tsval", "tsecr",
               "icmp_type", "icmp_code", "payload_len", "payload_off")


class DecodeContext:
    """Cursors and output columns of one batch of frames."""

    def __init__(self, buf: np.ndarray, base: np.ndarray, caplen: np.ndarray, origlen: np.ndarray,
                 config: DecodeConfig, wide=None) -> None:
        n = len(base)
        self.n = n
        self.config = config
        self.buf = buf
        self.base = base
        self.caplen = caplen
        self.origlen = origlen
        self.off = np.zeros(n, dtype=np.int64)
        self.kind = np.zeros(n, dtype=np.int8)
        self.anomalies: list[tuple[np.ndarray, str, str, object]] = []
        # The integer fields that become the packets table's nullable Int64 columns: int64 rows of one block,
        # -1 where absent. The block is the caller's (`wide`: PacketColumns hands out rows of the table's own
        # storage, so the walk writes the final columns and nothing is copied or widened afterwards) or one
        # allocation here.
        if wide is None:
            wide = np.empty((len(WIDE_FIELDS), n), dtype=np.int64)
        if len(wide) != len(WIDE_FIELDS) or any(len(w) != n or w.dtype != np.int64 for w in wide):
            raise ValueError("wide: one int64 array of n rows per field of WIDE_FIELDS")
        for name, column in zip(WIDE_FIELDS, wide):
            column.fill(-1)
            setattr(self, name, column)
        self.ipver = np.zeros(n, dtype=np.int8)
        self.src = np.zeros((n, 16), dtype=np.uint8)
        self.dst = np.zeros((n, 16), dtype=np.uint8)
        self.ipend = np.zeros(n, dtype=np.int64)      # end of the IP payload per the IP header
        self.l4next = np.zeros(n, dtype=np.int32)     # scratch: IP next header
        self.proto = np.zeros(n, dtype=np.int64)      # class << 16 | number
        self.sack_permitted = np.full(n, -1, dtype=np.int8)
        self.vlan_tags = np.zeros(n, dtype=np.int8)
        self.ext_headers = np.zeros(n, dtype=np.int8)
        d = config.max_tunnel_depth
        self.depth = np.zeros(n, dtype=np.int8)
        self.tun_type = np.zeros((n, d), dtype=np.int8)
        self.tun_vni = np.zeros((n, d), dtype=np.int64)
        self.outer_ipver = np.zeros(n, dtype=np.int8)
        self.outer_src = np.zeros((n, 16), dtype=np.uint8)
        self.outer_dst = np.zeros((n, 16), dtype=np.uint8)

    # -- reading ---------------------------------------------------------------------------------------------
    def at(self, sel: np.ndarray, rel) -> np.ndarray:
        """Absolute buffer index of byte `rel` of the current layer of packets `sel`."""
        return self.base[sel] + self.off[sel] + rel

    def u8(self, sel, rel) -> np.ndarray:
        return self.buf[self.at(sel, rel)].astype(np.int64)

    def u16(self, sel, rel) -> np.ndarray:
        i = self.at(sel, rel)
        b = self.buf
        return (b[i].astype(np.int64) << 8) | b[i + 1]

    def u32(self, sel, rel) -> np.ndarray:
        i = self.at(sel, rel)
        b = self.buf
        return (b[i].astype(np.int64) << 24) | (b[i + 1].astype(np.int64) << 16) | (b[i + 2].astype(np.int64) << 8) | b[i + 3]

    def take(self, sel, rel, width: int) -> np.ndarray:
        """(len(sel), width) bytes starting at byte `rel` of the current layer."""
        return self.buf[self.at(sel, rel)[:, None] + np.arange(width)]

    # -- flow control ----------------------------------------------------------------------------------------
    def need(self, sel: np.ndarray, nbytes, layer: str, what: str = "header") -> np.ndarray:
        """Keep the packets with `nbytes` captured after their cursor; the others get `<layer>_truncated`."""
        return sel[self._fits(sel, nbytes, layer, what)]

    def need_aligned(self, sel: np.ndarray, nbytes, layer: str, what: str, *cols: np.ndarray):
        """`need`, also filtering per-packet arrays aligned with `sel`: returns (sel, *cols)."""
        ok = self._fits(sel, nbytes, layer, what)
        if ok.all():
            return (sel, *cols)
        return (sel[ok], *(c[ok] for c in cols))

    def _fits(self, sel: np.ndarray, nbytes, layer: str, what: str) -> np.ndarray:
        have = self.caplen[sel] - self.off[sel]
        ok = have >= nbytes
        if not ok.all():
            need = np.broadcast_to(np.asarray(nbytes), sel.shape)[~ok]
            self.stop(sel[~ok], layer, f"{layer}_truncated",
                      [f"{what} needs {int(a)} bytes, {int(b)} captured" for a, b in zip(need, have[~ok])])
        return ok

    def stop(self, sel: np.ndarray, layer: str, kind: str, detail) -> None:
        """Record an anomaly for `sel` and end their decoding."""
        if len(sel):
            self.anomalies.append((sel, layer, kind, detail))
            self.kind[sel] = K_DONE

    def note(self, sel: np.ndarray, layer: str, kind: str, detail) -> None:
        """Record an anomaly for `sel`; decoding goes on."""
        if len(sel):
            self.anomalies.append((sel, layer, kind, detail))

    def finish(self, sel: np.ndarray, proto_class: int, number=0) -> None:
        self.proto[sel] = (proto_class << 16) | np.asarray(number, dtype=np.int64)
        self.kind[sel] = K_DONE

"""The unwrap loop: from each frame's link layer to its innermost transport header, through nested tunnels.

All packets of a batch advance together, one layer per round: each round groups the packets by the kind of
their next layer and calls that layer's vectorised decoder once. The number of rounds is bounded (link, VLAN
tags, IP, extension headers, transport, tunnel, times the tunnel depth), so hostile nesting cannot loop.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from hbonecap.capture.records import RecordBatch
from hbonecap.config import DecodeConfig
from hbonecap.layers import context as K
from hbonecap.layers import ip, link, transport, tunnels
from hbonecap.layers.context import DecodeContext

DECODERS = {
    K.K_ETH: link.decode_ethernet,
    K.K_VLAN: link.decode_vlan,
    K.K_SLL: link.decode_sll,
    K.K_SLL2: link.decode_sll2,
    K.K_NULL: link.decode_null,
    K.K_LOOP: link.decode_loop,
    K.K_RAW: link.decode_raw,
    K.K_IPV4: ip.decode_ipv4,
    K.K_IPV6: ip.decode_ipv6,
    K.K_IPV6_EXT: ip.decode_ipv6_ext,
    K.K_TCP: transport.decode_tcp,
    K.K_UDP: transport.decode_udp,
    K.K_ICMP: transport.decode_icmp,
    K.K_ICMPV6: transport.decode_icmpv6,
    K.K_GENEVE: tunnels.decode_geneve,
    K.K_VXLAN: tunnels.decode_vxlan,
}


def max_rounds(config: DecodeConfig) -> int:
    per_level = 1 + config.max_vlan_tags + 1 + config.max_extension_headers + 2
    return 2 + per_level * (config.max_tunnel_depth + 1)


ENGINES = ("auto", "compiled", "numpy")
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def decode_batch(batch: RecordBatch, link_types: np.ndarray, config: DecodeConfig, engine: str = "auto",
                 wide=None) -> DecodeContext:
    """Decode every frame of `batch`; `link_types[i]` is the link type of interface i.

    `engine`: "numpy" runs the vectorised decoders below; "compiled" the numba walk of
    `hbonecap.layers.compiled` (same result, the vectorised decoders handle its odd packets); "auto" is
    compiled when numba is installed. `wide`: where the context's int64 fields go (see DecodeContext)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "compiled" or (engine == "auto" and _HAVE_NUMBA):
        from hbonecap.layers import compiled

        return compiled.decode_batch(batch, link_types, config, wide)
    ctx = DecodeContext(batch.buf, batch.data_off, batch.caplen, batch.origlen, config, wide)
    if ctx.n == 0:
        return ctx
    link.start(ctx, link_types[batch.iface])
    for _ in range(max_rounds(config)):
        active = ctx.kind != K.K_DONE
        if not active.any():
            break
        idx = np.flatnonzero(active)
        kinds = ctx.kind[idx]
        for k in np.unique(kinds):
            DECODERS[int(k)](ctx, idx[kinds == k])
    else:
        left = np.flatnonzero(ctx.kind != K.K_DONE)
        ctx.stop(left, "decode", "decode_too_deep", "more layers than the decoder walks")
    return ctx

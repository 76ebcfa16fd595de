"""TCP segments out of a capture, for the stateful stream stages.

The packet decoder produces columns; the stream stages (reassembly, TLS, HTTP/2, HBONE) want one object per
payload-bearing or control TCP segment, in capture order, with the payload bytes. `iter_tcp_segments`
bridges the two without holding the capture in memory.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TcpSegment:
    capture: str        # capture name (file name)
    index: int          # frame number in the capture, from 1
    ts_ns: int          # capture time, ns since the epoch (UTC)
    encap: str          # tunnels around it, '' when none (same format as packets.encap)
    src: str
    sport: int
    dst: str
    dport: int
    flags: int          # TCP flags (FIN=1 SYN=2 RST=4 PSH=8 ACK=0x10 URG=0x20 ECE=0x40 CWR=0x80 NS=0x100)
    seq: int
    ack: int
    payload: bytes      # captured payload bytes (shorter than payload_len when the snapshot length cut it)
    payload_len: int    # payload length per the IP/TCP headers


def iter_tcp_segments(path, config=None, name: str | None = None, with_pure_acks: bool = False):
    """Yield every TCP segment of a capture (innermost TCP, through tunnels) in capture order.

    Pure ACKs (no payload, no SYN/FIN/RST) are left out unless `with_pure_acks`. Memory is bounded by one
    decoded batch; payload bytes are copied out of the batch buffer.
    """
    import numpy as np

    from hbonecap.config import DEFAULT_CONFIG
    from hbonecap.decode import segments_of_batch, iter_decoded

    cfg = config or DEFAULT_CONFIG
    for reader, batch, ctx in iter_decoded(path, cfg, name=name):
        yield from segments_of_batch(reader.info.name, batch, ctx, with_pure_acks)

"""TCP segments out of a capture, for the stateful stream stages.

The packet decoder produces columns; the stream stages (reassembly, TLS, HTTP/2, HBONE) want one object per
payload-bearing or control TCP segment, in capture order, with the payload bytes. `iter_tcp_segments`
bridges the two without holding the capture in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate


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


@dataclass(slots=True)
class TcpRun:
    """Payload segments of one connection and direction that follow one another in capture order, each starting
    where the previous one ended (in sequence space), none with SYN/FIN/RST, none cut by the snapshot length: the
    bulk of any capture. The stream stages take a run at once (one reassembly step, one joined buffer, capture
    times as range marks) when their state allows, and segment by segment (`segments()`) otherwise.

    ends[i]: offset in `payload` where segment i ends; ts/index/ack/flags: per segment."""

    capture: str
    encap: str
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    payload: bytes
    ends: list
    ts: list
    index: list
    ack: list
    flags: list

    def segments(self) -> list[TcpSegment]:
        out = []
        start = 0
        seq = self.seq
        for end, ts, idx, ack, flags in zip(self.ends, self.ts, self.index, self.ack, self.flags):
            out.append(TcpSegment(self.capture, idx, ts, self.encap, self.src, self.sport, self.dst, self.dport,
                                  flags, seq & 0xFFFFFFFF, ack, self.payload[start:end], end - start))
            seq += end - start
            start = end
        return out

    def first(self) -> TcpSegment:
        end = self.ends[0]
        return TcpSegment(self.capture, self.index[0], self.ts[0], self.encap, self.src, self.sport, self.dst,
                          self.dport, self.flags[0], self.seq, self.ack[0], self.payload[:end], end)


def tcp_runs_of_batch(capture: str, batch, ctx, index_offset: int = 0):
    """The TCP segments of one decoded batch (as `hbonecap.decode.segments_of_batch`, pure ACKs left out), with
    every stretch of two or more contiguous payload segments of one connection direction grouped into a `TcpRun`.
    Runs are found with array operations over the whole batch; one Python step per run, not per segment."""
    import numpy as np

    from hbonecap.decode import SegmentText, tcp_segment_rows

    idx = tcp_segment_rows(ctx)
    if not len(idx):
        return
    plen = ctx.payload_len[idx].astype(np.int64)
    data_off = batch.data_off[idx]
    start = (data_off + ctx.payload_off[idx]).astype(np.int64)
    avail = (data_off + batch.caplen[idx]).astype(np.int64)
    whole = start + plen <= avail
    flags = ctx.tcp_flags[idx].astype(np.int64)
    seq = ctx.seq[idx].astype(np.int64)
    plain = (plen > 0) & ((flags & 0x07) == 0) & whole
    # addresses compared as two 64-bit words each
    src, dst = _words(ctx.src)[idx], _words(ctx.dst)[idx]
    ipver, sport, dport = ctx.ipver[idx], ctx.sport[idx], ctx.dport[idx]
    cont = np.zeros(len(idx), dtype=bool)
    if len(idx) > 1:
        same = (src[1:] == src[:-1]).all(axis=1) & (dst[1:] == dst[:-1]).all(axis=1)
        same &= (sport[1:] == sport[:-1]) & (dport[1:] == dport[:-1]) & (ipver[1:] == ipver[:-1])
        depth, tun_type, tun_vni = ctx.depth[idx], ctx.tun_type[idx], ctx.tun_vni[idx]
        same &= (depth[1:] == depth[:-1]) & (tun_type[1:] == tun_type[:-1]).all(axis=1) & \
            (tun_vni[1:] == tun_vni[:-1]).all(axis=1)
        same &= plain[1:] & plain[:-1] & (((seq[:-1] + plen[:-1]) & 0xFFFFFFFF) == seq[1:])
        cont[1:] = same
    run_start = np.flatnonzero(~cont)
    run_end = np.r_[run_start[1:], len(idx)]
    # the text of a run's encapsulation and addresses, made once per distinct (ip version, src, dst, encapsulation)
    text = SegmentText(ctx, idx[run_start])
    key = np.concatenate([ipver[run_start, None].view(np.uint8), src[run_start].view(np.uint8),
                          dst[run_start].view(np.uint8), text.keys.view(np.uint8)], axis=1)
    keys = np.ascontiguousarray(key).view(f"V{key.shape[1]}").ravel().tolist()
    texts: dict = {}
    buf = memoryview(batch.buf)                 # slicing a memoryview is cheaper than slicing the array
    # per segment: what a TcpRun lists; per run: what only its first segment needs
    numbers = (batch.frame_numbers()[idx] + index_offset).tolist()
    ts_l = batch.ts_ns[idx].tolist()
    ack_l = ctx.ack[idx].tolist()
    flags_l = flags.tolist()
    plen_l = plen.tolist()
    start_l = start.tolist()
    first = idx[run_start]
    seq_r = seq[run_start].tolist()
    avail_r = avail[run_start].tolist()
    sport_r = sport[run_start].tolist()
    dport_r = dport[run_start].tolist()
    first_r = first.tolist()
    for k, (a, b) in enumerate(zip(run_start.tolist(), run_end.tolist())):
        t = texts.get(keys[k])
        if t is None:
            t = texts[keys[k]] = (text.encap(k),) + tuple(text.endpoints(first_r[k]))
        enc, s, dd = t
        if b - a == 1:
            st, n = start_l[a], plen_l[a]
            end = min(st + n, avail_r[k])
            yield TcpSegment(capture, numbers[a], ts_l[a], enc, s, sport_r[k], dd, dport_r[k], flags_l[a], seq_r[k],
                             ack_l[a], buf[st:max(st, end)].tobytes(), n)
            continue
        payload = b"".join([buf[st:st + n] for st, n in zip(start_l[a:b], plen_l[a:b])])
        yield TcpRun(capture, enc, s, sport_r[k], dd, dport_r[k], seq_r[k], payload, list(accumulate(plen_l[a:b])),
                     ts_l[a:b], numbers[a:b], ack_l[a:b], flags_l[a:b])


def _words(addr):
    """Address rows (16 bytes each) as two 64-bit words each."""
    import numpy as np

    addr = np.ascontiguousarray(addr)
    return addr.view(np.uint64) if addr.ndim == 2 and addr.shape[1] % 8 == 0 else addr

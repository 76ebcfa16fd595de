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
    text = SegmentText(ctx, idx)
    ek = text.keys
    plen = ctx.payload_len[idx].astype(np.int64)
    start = (batch.data_off[idx] + ctx.payload_off[idx]).astype(np.int64)
    avail = (batch.data_off[idx] + batch.caplen[idx]).astype(np.int64)
    whole = start + plen <= avail
    flags = ctx.tcp_flags[idx].astype(np.int64)
    seq = ctx.seq[idx].astype(np.int64)
    plain = (plen > 0) & ((flags & 0x07) == 0) & whole
    cont = np.zeros(len(idx), dtype=bool)
    src, dst = ctx.src[idx], ctx.dst[idx]
    ipver = ctx.ipver[idx]
    sport, dport = ctx.sport[idx], ctx.dport[idx]
    if len(idx) > 1:
        same = (src[1:] == src[:-1]).all(axis=1) & (dst[1:] == dst[:-1]).all(axis=1)
        same &= (sport[1:] == sport[:-1]) & (dport[1:] == dport[:-1])
        same &= (ipver[1:] == ipver[:-1]) & (ek[1:] == ek[:-1]).all(axis=1)
        same &= plain[1:] & plain[:-1] & (((seq[:-1] + plen[:-1]) & 0xFFFFFFFF) == seq[1:])
        cont[1:] = same
    run_start = np.flatnonzero(~cont)
    run_end = np.r_[run_start[1:], len(idx)]
    # the text of a run's encapsulation and addresses, made once per distinct (ip version, src, dst, encapsulation)
    key = np.concatenate([ipver[run_start, None].view(np.uint8), src[run_start], dst[run_start],
                          np.ascontiguousarray(ek[run_start]).view(np.uint8)], axis=1)
    keys = np.ascontiguousarray(key).view(f"V{key.shape[1]}").ravel().tolist()
    texts: dict = {}
    buf = memoryview(batch.buf)                 # slicing a memoryview is cheaper than slicing the array
    numbers = (batch.frame_numbers()[idx] + index_offset).tolist()
    ts_l = batch.ts_ns[idx].tolist()
    ack_l = ctx.ack[idx].tolist()
    seq_l = seq.tolist()
    flags_l = flags.tolist()
    plen_l = plen.tolist()
    start_l = start.tolist()
    avail_l = avail.tolist()
    sport_l = sport.tolist()
    dport_l = dport.tolist()
    for k, (a, b) in enumerate(zip(run_start.tolist(), run_end.tolist())):
        t = texts.get(keys[k])
        if t is None:
            t = texts[keys[k]] = (text.encap(a),) + tuple(text.endpoints(int(idx[a])))
        enc, s, dd = t
        if b - a == 1:
            st, n = start_l[a], plen_l[a]
            end = min(st + n, avail_l[a])
            yield TcpSegment(capture, numbers[a], ts_l[a], enc, s, sport_l[a], dd, dport_l[a], flags_l[a], seq_l[a],
                             ack_l[a], buf[st:max(st, end)].tobytes(), n)
            continue
        payload = b"".join([buf[st:st + n] for st, n in zip(start_l[a:b], plen_l[a:b])])
        yield TcpRun(capture, enc, s, sport_l[a], dd, dport_l[a], seq_l[a], payload, list(accumulate(plen_l[a:b])),
                     ts_l[a:b], numbers[a:b], ack_l[a:b], flags_l[a:b])

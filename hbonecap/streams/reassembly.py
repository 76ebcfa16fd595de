"""TCP stream reassembly, per connection and direction, for a passive observer.

Follows RFC 9293 sequence-space rules (section 3.4: SYN and FIN each take one sequence number; modulo-2**32
arithmetic) as seen from a tap, not an endpoint: nothing is ever refused because a window or state machine says so.

Strategy
  * Each direction maps raw sequence numbers to *stream offsets* (offset 0 = first byte after the SYN, or the first
    byte seen when the capture starts mid-connection). Offsets are 64-bit: a long stream wraps the 32-bit sequence
    space freely, the offset is unwrapped relative to the next expected byte.
  * In-order bytes are delivered at once as `StreamData` (with the capture time and frame of the segment that
    carried them); out-of-order segments wait in a sorted list of non-overlapping ranges.
  * Overlaps: the first-seen bytes win. Overlapping bytes that differ are reported (`tcp_overlap_conflict`),
    comparing against the pending ranges and a bounded tail of recently delivered chunks (no copies).
  * Gaps are explicit `StreamGap` events, never zero-filled. A hole is declared when the peer has acknowledged beyond
    it while later data is waiting and a few more segments went by without filling it (`HOLE_PATIENCE`), when the out-of-order buffer exceeds its cap, at RST/close, or when the capture's
    snapshot length cut a segment (`reason='snaplen'`; reported once as `tcp_snaplen_cut`, summarised at close).
  * A one-byte segment just below the next expected byte is a keep-alive probe (RFC 9293 3.8.4): counted, never
    compared (its byte is garbage by design).
  * A FIN ends the direction once every byte before it has been delivered (`StreamEnd('fin')`); a RST ends it at once.

Limits
  * Buffered out-of-order bytes and ranges per direction are capped (`max_buffer`, `max_ranges`); past the cap the
    hole is given up as a gap (`tcp_buffer_overflow`).
  * A capture that starts mid-stream cannot know what came before its first segment; bytes arriving later with a
    lower sequence number are reported (`tcp_data_before_start`) and dropped.
  * Window scaling, timestamps (PAWS) and checksums are not used.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

from .anomalies import Anomaly

SEQ_MASK = 0xFFFFFFFF
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

#: Default cap on out-of-order bytes buffered per direction.
MAX_BUFFER = 8 * 1024 * 1024
#: Default cap on out-of-order ranges buffered per direction.
MAX_RANGES = 4096
#: Bytes of recently delivered data kept (as references) to detect conflicting retransmissions.
KEEP_TAIL = 32 * 1024
#: An acknowledgment further than this beyond the next expected byte is taken as nonsense, not as a hole.
MAX_ACK_JUMP = 1 << 30
#: Segments (acknowledgments past a hole, or later data of the direction) to wait before a hole is declared lost.
HOLE_PATIENCE = 3


@dataclass(slots=True)
class StreamData:
    direction: int   # 0 = client to server, 1 = server to client
    offset: int      # stream offset of data[0]
    data: bytes
    ts_ns: int       # capture time of the segment that carried these bytes
    index: int       # its frame number


@dataclass(slots=True)
class StreamGap:
    direction: int
    offset: int
    length: int      # bytes missing (0 when unknown)
    ts_ns: int
    index: int
    reason: str      # 'lost', 'snaplen', 'overflow', 'close'


@dataclass(slots=True)
class StreamEnd:
    direction: int
    kind: str        # 'fin' or 'rst'
    offset: int
    ts_ns: int
    index: int


def _signed32(x: int) -> int:
    x &= SEQ_MASK
    return x - 0x100000000 if x & 0x80000000 else x


class _Direction:
    __slots__ = ("d", "base", "next_off", "starts", "ranges", "pending_bytes", "tail", "tail_bytes",
                 "fin_off", "ended", "syn_seen", "midstream", "retransmissions", "conflicts", "gaps",
                 "max_buffer", "max_ranges", "delivered", "gap_bytes", "hole_acked", "snaplen_cuts",
                 "snaplen_bytes", "keepalives")

    def __init__(self, d: int, max_buffer: int, max_ranges: int) -> None:
        self.d = d
        self.base: int | None = None        # raw sequence number of offset 0
        self.next_off = 0
        self.starts: list[int] = []         # sorted starts of pending ranges
        self.ranges: dict[int, tuple[int, bytes | None, int, int]] = {}  # start -> (end, data|None(hole), ts, idx)
        self.pending_bytes = 0
        self.tail: deque = deque()          # (offset, bytes) recently delivered
        self.tail_bytes = 0
        self.fin_off: int | None = None
        self.ended = False
        self.syn_seen = False
        self.midstream = False
        self.retransmissions = 0
        self.conflicts = 0
        self.gaps = 0
        self.gap_bytes = 0
        self.delivered = 0
        self.max_buffer = max_buffer
        self.max_ranges = max_ranges
        self.hole_acked = 0
        self.snaplen_cuts = 0
        self.snaplen_bytes = 0
        self.keepalives = 0

    # -- helpers -------------------------------------------------------------------------------------------------
    def offset_of(self, seq: int) -> int:
        assert self.base is not None
        return self.next_off + _signed32(seq - ((self.base + self.next_off) & SEQ_MASK))

    def _remember(self, off: int, data: bytes) -> None:
        self.tail.append((off, data))
        self.tail_bytes += len(data)
        while self.tail_bytes > KEEP_TAIL and len(self.tail) > 1:
            _, old = self.tail.popleft()
            self.tail_bytes -= len(old)

    def _compare_delivered(self, off: int, data: bytes) -> bool:
        """True when `data` at `off` (all before next_off) differs from what was delivered there (as far as kept)."""
        end = off + len(data)
        for t_off, t_data in reversed(self.tail):  # newest first: retransmissions are usually recent
            t_end = t_off + len(t_data)
            if t_end <= off:
                break
            if t_off >= end:
                continue
            lo, hi = max(off, t_off), min(end, t_end)
            if data[lo - off:hi - off] != t_data[lo - t_off:hi - t_off]:
                return True
        return False

    def _deliver(self, out: list, off: int, data: bytes | None, length: int, ts: int, idx: int, reason: str) -> None:
        if data is None:
            out.append(StreamGap(self.d, off, length, ts, idx, reason))
            self.gaps += 1
            self.gap_bytes += length
        else:
            out.append(StreamData(self.d, off, data, ts, idx))
            self._remember(off, data)
            self.delivered += length
        self.next_off = off + length

    def _drain(self, out: list) -> None:
        while self.starts and self.starts[0] <= self.next_off:
            s = self.starts.pop(0)
            e, data, ts, idx = self.ranges.pop(s)
            self.pending_bytes -= e - s
            if e <= self.next_off:
                continue
            cut = self.next_off - s
            if data is not None:
                data = data[cut:]
            self._deliver(out, self.next_off, data, e - self.next_off, ts, idx, "snaplen")

    def _check_end(self, out: list, ts: int, idx: int) -> None:
        if self.fin_off is not None and not self.ended and self.next_off >= self.fin_off and not self.starts:
            self.ended = True
            out.append(StreamEnd(self.d, "fin", self.fin_off, ts, idx))

    def _store(self, out: list, anomalies: list, s: int, e: int, data: bytes | None, ts: int, idx: int) -> None:
        """Buffer [s, e) out of order; parts already pending keep their first-seen bytes."""
        pieces: list[tuple[int, int]] = []
        cur = s
        i = bisect_left(self.starts, s)
        if i > 0:
            i -= 1
        conflict = False
        while i < len(self.starts) and cur < e:
            ps = self.starts[i]
            pe, pdata, _, _ = self.ranges[ps]
            if pe <= cur:
                i += 1
                continue
            if ps >= e:
                break
            if ps > cur:
                pieces.append((cur, ps))
            lo, hi = max(cur, ps), min(e, pe)
            if data is not None and pdata is not None and data[lo - s:hi - s] != pdata[lo - ps:hi - ps]:
                conflict = True
            cur = max(cur, pe)
            i += 1
        if cur < e:
            pieces.append((cur, e))
        if conflict:
            self.conflicts += 1
            anomalies.append(Anomaly("tcp", "tcp_overlap_conflict",
                                     f"dir {self.d}: out-of-order overlap at offset {s} differs (first seen kept)", idx))
        elif len(pieces) != 1 or pieces[0] != (s, e):
            self.retransmissions += 1
        for ps, pe in pieces:
            j = bisect_left(self.starts, ps)
            self.starts.insert(j, ps)
            self.ranges[ps] = (pe, None if data is None else data[ps - s:pe - s], ts, idx)
            self.pending_bytes += pe - ps
        while self.starts and (self.pending_bytes > self.max_buffer or len(self.starts) > self.max_ranges):
            first = self.starts[0]
            anomalies.append(Anomaly("tcp", "tcp_buffer_overflow",
                                     f"dir {self.d}: {self.pending_bytes} bytes waiting behind a hole at offset "
                                     f"{self.next_off}; hole of {first - self.next_off} bytes given up", idx))
            self.gap_to(out, anomalies, first, ts, idx, "overflow")

    def _snaplen(self, anomalies: list, off: int, length: int, idx: int) -> None:
        """Segments cut by the snapshot length: the first one is reported, the rest counted (summary at close)."""
        self.snaplen_cuts += 1
        self.snaplen_bytes += length
        if self.snaplen_cuts == 1:
            anomalies.append(Anomaly("tcp", "tcp_snaplen_cut", f"dir {self.d}: {length} bytes cut by the snapshot "
                                                               f"length at offset {off}", idx))

    def gap_to(self, out: list, anomalies: list, off: int, ts: int, idx: int, reason: str) -> None:
        if off <= self.next_off:
            return
        length = off - self.next_off
        anomalies.append(Anomaly("tcp", "tcp_gap", f"dir {self.d}: {length} bytes missing at offset {self.next_off} "
                                                   f"({reason})", idx))
        self._deliver(out, self.next_off, None, length, ts, idx, reason)
        self._drain(out)

    # -- input ---------------------------------------------------------------------------------------------------
    def segment(self, out: list, anomalies: list, seq: int, flags: int, payload: bytes, payload_len: int,
                ts: int, idx: int) -> None:
        if flags & SYN:
            if self.base is None or (not self.delivered and not self.starts):
                self.base = (seq + 1) & SEQ_MASK
                self.syn_seen = True
                self.midstream = False
            seq = (seq + 1) & SEQ_MASK
        if self.base is None:
            if not payload_len and not flags & (FIN | RST):
                return
            self.base = seq
            self.midstream = True
        if self.ended and not flags & RST:
            if payload_len:
                off = self.offset_of(seq)
                if off + payload_len > (self.fin_off or 0):
                    anomalies.append(Anomaly("tcp", "tcp_data_after_fin", f"dir {self.d}: data at offset {off} after "
                                                                          f"the stream ended", idx))
                else:
                    self.retransmissions += 1
            return
        off = self.offset_of(seq)
        plen = payload_len if payload_len > 0 else 0
        cap = len(payload)
        if cap > plen:
            payload, cap = payload[:plen], plen
        end = off + plen
        if plen:
            if end <= self.next_off:
                if off < 0 and self.midstream:
                    anomalies.append(Anomaly("tcp", "tcp_data_before_start",
                                             f"dir {self.d}: {plen} bytes before the first byte captured", idx))
                elif plen == 1 and off == self.next_off - 1:
                    self.keepalives += 1  # TCP keep-alive probe: one garbage byte below the window, not data
                else:
                    self.retransmissions += 1
                    if cap and self._compare_delivered(off, payload[:cap]):
                        self.conflicts += 1
                        anomalies.append(Anomaly("tcp", "tcp_overlap_conflict",
                                                 f"dir {self.d}: retransmission at offset {off} differs from the "
                                                 f"bytes delivered (first seen kept)", idx))
            else:
                if off < self.next_off:
                    cut = self.next_off - off
                    if cap and self._compare_delivered(off, payload[:min(cut, cap)]):
                        self.conflicts += 1
                        anomalies.append(Anomaly("tcp", "tcp_overlap_conflict",
                                                 f"dir {self.d}: overlap at offset {off} differs (first seen kept)", idx))
                    payload = payload[cut:]
                    cap = max(cap - cut, 0)
                    off = self.next_off
                    self.retransmissions += 1
                # captured part [off, off+cap), missing part [off+cap, end)
                if off == self.next_off and not self.starts:
                    if cap:
                        self._deliver(out, off, bytes(payload), cap, ts, idx, "")
                    if end > off + cap:
                        self._snaplen(anomalies, off + cap, end - off - cap, idx)
                        self._deliver(out, off + cap, None, end - off - cap, ts, idx, "snaplen")
                else:
                    if cap:
                        self._store(out, anomalies, off, off + cap, bytes(payload), ts, idx)
                    if end > off + cap:
                        self._snaplen(anomalies, off + cap, end - off - cap, idx)
                        self._store(out, anomalies, off + cap, end, None, ts, idx)
                    self._drain(out)
        if not self.starts:
            self.hole_acked = 0
        elif self.hole_acked:
            self.hole_acked += 1
            self._hole_lost(out, anomalies, ts, idx)
        if flags & FIN:
            if self.fin_off is None or end < self.fin_off:
                self.fin_off = end
        if flags & RST:
            self.flush(out, anomalies, ts, idx, "close")
            if not self.ended:
                self.ended = True
                out.append(StreamEnd(self.d, "rst", self.next_off, ts, idx))
            return
        self._check_end(out, ts, idx)

    def acked(self, out: list, anomalies: list, ack: int, ts: int, idx: int) -> None:
        """The peer acknowledged `ack`: a hole before waiting data that the peer already has is lost for good."""
        if self.base is None or not self.starts or self.ended:
            return
        ack_off = self.offset_of(ack)
        if ack_off <= self.next_off or ack_off - self.next_off > MAX_ACK_JUMP:
            return
        if ack_off >= self.starts[0]:
            self.hole_acked += 1
            self._hole_lost(out, anomalies, ts, idx)

    def _hole_lost(self, out: list, anomalies: list, ts: int, idx: int) -> None:
        """Give the hole up once the peer has acknowledged past it and HOLE_PATIENCE more segments went by
        (a capture may list a segment after the ACK that covers it)."""
        if self.starts and self.hole_acked >= HOLE_PATIENCE:
            self.hole_acked = 0
            self.gap_to(out, anomalies, self.starts[0], ts, idx, "lost")
            self._check_end(out, ts, idx)

    def flush(self, out: list, anomalies: list, ts: int, idx: int, reason: str) -> None:
        while self.starts:
            self.gap_to(out, anomalies, self.starts[0], ts, idx, reason)
        self._check_end(out, ts, idx)


class TcpReassembler:
    """Both directions of one TCP connection. `feed(...)` returns the events the segment caused, in order.

    Events: `StreamData`, `StreamGap`, `StreamEnd` and `Anomaly`. The caller decides which side is the client
    (direction 0) and passes `direction` with each segment.
    """

    def __init__(self, max_buffer: int = MAX_BUFFER, max_ranges: int = MAX_RANGES) -> None:
        self.dirs = (_Direction(0, max_buffer, max_ranges), _Direction(1, max_buffer, max_ranges))
        self.last_ts = -1
        self.last_index = 0

    def feed(self, direction: int, seq: int, ack: int, flags: int, payload: bytes, payload_len: int,
             ts_ns: int, index: int) -> list:
        self.last_ts, self.last_index = ts_ns, index
        dd = self.dirs[direction]
        # Fast path: the next in-order bytes, nothing waiting, no control flags (the bulk of any capture).
        if not flags & 0x07 and payload_len and dd.base is not None and not dd.starts and not dd.ended \
                and len(payload) == payload_len \
                and ((seq - dd.base - dd.next_off) & SEQ_MASK) == 0:
            off = dd.next_off
            dd.next_off = off + payload_len
            dd.delivered += payload_len
            dd._remember(off, payload)
            out = [StreamData(direction, off, payload, ts_ns, index)]
            if flags & ACK and self.dirs[1 - direction].starts:
                anomalies: list = []
                self.dirs[1 - direction].acked(out, anomalies, ack & SEQ_MASK, ts_ns, index)
                return anomalies + out if anomalies else out
            return out
        out = []
        anomalies = []
        self.dirs[direction].segment(out, anomalies, seq & SEQ_MASK, flags, payload, payload_len, ts_ns, index)
        if flags & ACK:
            self.dirs[1 - direction].acked(out, anomalies, ack & SEQ_MASK, ts_ns, index)
        return anomalies + out if anomalies else out

    def close(self) -> list:
        out: list = []
        anomalies: list = []
        for d in self.dirs:
            d.flush(out, anomalies, self.last_ts, self.last_index, "close")
            if d.snaplen_cuts > 1:
                anomalies.append(Anomaly("tcp", "tcp_snaplen_cut", f"dir {d.d}: {d.snaplen_cuts} segments cut by the "
                                                                   f"snapshot length, {d.snaplen_bytes} bytes missing"))
        return anomalies + out if anomalies else out

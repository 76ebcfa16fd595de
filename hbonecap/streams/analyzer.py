"""The stream driver: TCP segments of one capture in, `tunnels` / `streams` / `requests` / anomaly rows out.

`StreamAnalyzer` glues the sans-I/O stages together; it does no I/O itself. Per TCP connection (keyed by capture,
encapsulation types (VNIs aside: Istio uses 1001 one way and 1000 the other) and the 4-tuple; a SYN with a new ISN
after data or a close starts a new connection) it runs a
`TcpReassembler` and a protocol stack chosen from the first bytes, on any port:

* TLS (a handshake record, or for mid-stream captures a plausible record header) -> `TlsSession`; its decrypted
  application bytes go to a nested stack (ALPN ``h2`` selects HTTP/2);
* the HTTP/2 client preface, or plausible frames mid-stream -> `Http2Connection` -> `HboneObserver`; each CONNECT
  stream's tunnelled bytes go to their own nested stack (HTTP/1, PROXY v2, TLS + HTTP/2 for double HBONE...);
* an HTTP/1 request line -> `Http1Connection` (CONNECT and ``Upgrade: h2c`` switch to the next protocol);
* the PROXY v2 signature -> the header is read, the rest analysed again;
* anything else is opaque.

Nesting is bounded (`MAX_DEPTH`), every buffer is bounded (reassembly caps, detection window, retained tunnel bytes
and plaintext per direction), idle and closed connections are flushed as the capture advances.

Results (`StreamResults`): rows keyed by the columns of ``hbonecap.tables.SCHEMAS``; timestamps are int ns since
the epoch or None. Also the tunnelled bytes of each CONNECT stream with their capture times
(`tunnel_bytes[(tunnel_id, stream_id)]`, bounded), the TLS record timeline of every TLS connection
(`records[tunnel_id]`, for keyless analysis), every decoded HTTP/2 header block (`http2_headers`) and, when asked
for, the decrypted TLS plaintext (`plaintext[tunnel_id]`).

Ids: connections are numbered from 0 in order of their first segment (``conn_id``); a tunnel's id is ``c<conn_id>``
for a TLS/h2c connection, ``<tunnel_id>/s<stream_id>`` for a tunnel inside a CONNECT stream (double HBONE).

Shares (one capture on several cores): n analyzers fed the same segments, `StreamAnalyzer(share=(k, n))`, each
follow every connection's lifetime (so ids, idle flushes and row steps agree) and run the stacks only for the
connections `share_of` gives them; `merge_shares` orders their rows by the step (segment or connection finished)
that emitted them, which is one analyzer's order.

Times: TCP bytes carry the capture time of the segment that brought them; decrypted bytes carry the time of the
last byte of their TLS record (when a receiver could first read them); HTTP/2 events the time of their frame's
last byte. `TimedBytes.marks` keep these as ``(offset, ts_ns)`` ranges, never one time per byte.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from ..config import DEFAULT_CONFIG, HBONE_PORT
from ..layers.segments import TcpRun, TcpSegment
from . import hbone as hb
from .anomalies import Anomaly
from .http2.connection import H2Data, H2DataGap, H2GoAway, H2Headers, H2LostSync, H2Reset, Http2Connection
from .http2.frames import PREFACE, find_frame_start
from .http2.frames import plausible as h2_plausible
from .inner import proxy_v2
from .inner.http1 import (Http1Connection, Http1Request, Http1Response, Http1Switch, looks_like_request,
                          looks_like_response)
from .reassembly import ACK, FIN, RST, SYN, StreamData, StreamEnd, StreamGap, TcpReassembler
from .timeline import Timed, TimedBuffer
from .tls.keylog import KeyLog
from .tls.records import find_record_start
from .tls.records import plausible as tls_plausible
from .tls.session import TlsAlert, TlsAppData, TlsPlainGap, TlsSession, TrialBudget

MAX_DEPTH = 4
DETECT_WINDOW = 16 * 1024
TUNNEL_BYTES_CAP = 1 << 20          # retained tunnelled bytes per stream and direction
TUNNEL_BYTES_TOTAL = 256 << 20      # retained tunnelled bytes of all streams together
PLAINTEXT_CAP = 16 << 20            # retained decrypted bytes per TLS connection and direction (keep_plaintext)
TIMELINE_PER_CONN = 200_000         # TLS records kept in the timeline of one connection
TIMELINE_TOTAL = 5_000_000          # ... and of all connections together
MAX_ANOMALIES_PER_KIND = 100        # anomaly rows of one kind per connection; the rest are counted
MAX_HEADER_LOG = 200_000
IDLE_NS = 15 * 60 * 10**9
CLOSED_LINGER_NS = 60 * 10**9
FLUSH_EVERY = 4096
MAX_CONNECTIONS = 200_000
RUN_PIECE = 32                      # segments of a TcpRun delivered at once
SERVER_PORTS = frozenset({HBONE_PORT, 15001, 15006, 15088, 15053, 80, 443, 8080, 8443})


@dataclass(slots=True)
class TimedBytes:
    """Retained bytes of one direction with capture-time marks ``(offset, ts_ns)``; `total` counts every byte seen."""

    data: bytearray = field(default_factory=bytearray)
    marks: list = field(default_factory=list)
    total: int = 0
    truncated: bool = False
    gaps: int = 0

    def add(self, piece: Timed, cap: int) -> None:
        room = cap - len(self.data)
        n = len(piece.data)
        marks = piece.marks
        if len(marks) == 1 and room >= n:      # the common case: one capture time, room for all of it
            if n:
                ts = marks[0][1]
                if not self.marks or self.marks[-1][1] != ts:
                    self.marks.append((len(self.data), ts))
                self.data += piece.data
            self.total += n
            return
        if room > 0:
            base = len(self.data)
            take = min(room, n)
            for off, ts in piece.marks:
                if off >= take:
                    break
                if not self.marks or self.marks[-1][1] != ts:
                    self.marks.append((base + off, ts))
            self.data += piece.data[:take] if take < n else piece.data
        if n > max(room, 0):
            self.truncated = True
        self.total += n

    def ts_at(self, offset: int) -> int | None:
        ts = None
        for off, t in self.marks:
            if off > offset:
                break
            ts = t
        return ts


@dataclass
class StreamResults:
    """What `StreamAnalyzer.close()` returns.

    tunnels, streams, requests, anomalies: rows (dicts keyed by the table's column names).
    tunnel_bytes[(tunnel_id, stream_id)]: (client->server, server->client) `TimedBytes` of a CONNECT stream.
    records[tunnel_id]: TLS record timeline, tuples (direction, ts_first_byte, ts_last_byte, content_type, length).
    http2_headers: every decoded header block: capture, conn_id, tunnel_id, direction, stream_id, ts, exact,
        headers (list of (name, value) str pairs, None when undecodable).
    plaintext[tunnel_id]: decrypted TLS application bytes per direction (only with keep_plaintext=True).
    """

    tunnels: list[dict] = field(default_factory=list)
    streams: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)
    tunnel_bytes: dict[tuple[str, int], tuple[TimedBytes, TimedBytes]] = field(default_factory=dict)
    records: dict[str, list[tuple[int, int, int, int, int]]] = field(default_factory=dict)
    http2_headers: list[dict] = field(default_factory=list)
    plaintext: dict[str, tuple[TimedBytes, TimedBytes]] = field(default_factory=dict)
    kept_tunnel_bytes: bool = True      # False: tunnel_bytes was not kept (StreamAnalyzer(tunnel_bytes=False))
    order: dict | None = None           # a share's emission steps (`merge_shares`); None for a whole capture

    def frame(self, name: str):
        """One of the tables as a DataFrame with the declared dtypes."""
        from ..tables import columns, frame

        rows = getattr(self, name)
        cols = columns(name)
        return frame(name, {c: [r.get(c) for r in rows] for c in cols} if rows else {})


ROW_LISTS = ("tunnels", "streams", "requests", "anomalies", "http2_headers")
KEYED = ("tunnel_bytes", "records", "plaintext")


class _Rows(list):
    """A results list that notes, per row, the analyzer step it was emitted at and whether it belongs to no
    connection (then every share emits it: the first share's copy is kept)."""

    def __init__(self, ctx: "_Ctx") -> None:
        super().__init__()
        self.ctx, self.steps, self.shared = ctx, [], []

    def append(self, row) -> None:
        self.steps.append(self.ctx.step)
        self.shared.append(self.ctx.conn_id is None)
        super().append(row)


class _Keyed(dict):
    """A results dict that notes the step each key was first set at."""

    def __init__(self, ctx: "_Ctx") -> None:
        super().__init__()
        self.ctx, self.steps = ctx, {}

    def __setitem__(self, key, value) -> None:
        if key not in self:
            self.steps[key] = self.ctx.step
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]


class _Ctx:
    """What every stack of one analyzer shares."""

    def __init__(self, keylog: KeyLog | None, keep_plaintext: bool, config, tunnel_bytes: bool = True,
                 ordered: bool = False) -> None:
        self.results = StreamResults()
        self.step = 0                       # advanced per segment and per connection finished (`merge_shares`)
        if ordered:
            for name in ROW_LISTS:
                setattr(self.results, name, _Rows(self))
            for name in KEYED:
                setattr(self.results, name, _Keyed(self))
        self.keylog = keylog
        self.keep_plaintext = keep_plaintext
        self.tunnel_bytes = tunnel_bytes
        self.results.kept_tunnel_bytes = tunnel_bytes
        self.config = config
        self.capture = ""
        self.index: int | None = None
        self.conn_id: int | None = None
        self.header_log_dropped = 0
        self.tunnel_bytes_kept = 0
        self.timeline_kept = 0
        self.counts: dict[int | None, dict[str, int]] = {}
        self.layers: dict[str, str] = {}
        self.trials = TrialBudget()

    def anomaly(self, a: Anomaly) -> None:
        per_conn = self.counts.setdefault(self.conn_id, {})
        n = per_conn[a.kind] = per_conn.get(a.kind, 0) + 1
        if n > MAX_ANOMALIES_PER_KIND:
            self.layers[a.kind] = a.layer
            return
        row = a.row(self.capture)
        if row["index"] is None:
            row["index"] = self.index
        if self.conn_id is not None and a.layer != "keylog":
            row["detail"] = f"c{self.conn_id}: {row['detail']}"
        self.results.anomalies.append(row)

    def conn_done(self, conn_id: int) -> None:
        """Summarise the anomalies of a finished connection that went over the per-kind cap."""
        per_conn = self.counts.pop(conn_id, {})
        for kind, n in per_conn.items():
            if n > MAX_ANOMALIES_PER_KIND:
                self.results.anomalies.append({
                    "capture": self.capture, "index": None, "layer": self.layers.get(kind, ""), "kind": kind,
                    "detail": f"c{conn_id}: {n - MAX_ANOMALIES_PER_KIND} more {kind} anomalies not listed "
                              f"({n} in all)"})


class _Conn:
    __slots__ = ("key", "conn_id", "capture", "encap", "client", "server", "reasm", "stack", "first_ts", "last_ts",
                 "bytes", "syn_isn", "ended", "midstream", "last_index", "closed", "foreign")

    def __init__(self, key, conn_id: int, capture: str, encap: str, client, server, midstream: bool) -> None:
        self.key, self.conn_id, self.capture, self.encap = key, conn_id, capture, encap
        self.client, self.server = client, server
        self.reasm = TcpReassembler()
        self.stack: _Stack | None = None
        self.first_ts = self.last_ts = -1
        self.bytes = [0, 0]
        self.syn_isn: int | None = None
        self.ended = [False, False]
        self.midstream = midstream
        self.last_index = 0
        self.closed = False
        self.foreign = False      # another share's: only its lifetime is followed here

    def end(self, d: int, flags: int) -> None:
        """A FIN or RST from direction d: that direction ends (an RST ends both)."""
        self.ended[d] = True
        if flags & RST:
            self.ended[1 - d] = True


class _Foreign:
    """The stack of a connection another share analyses: nothing to look at (the opaque paths count its bytes)."""

    state = "opaque"

    def close(self, last_ts) -> None:
        pass


FOREIGN = _Foreign()


def share_of(key: tuple, shares: int) -> int:
    """Which of `shares` analyses a connection: a hash of its key without the capture name (stable across
    processes)."""
    return zlib.crc32(repr(key[1:]).encode()) % shares


def _addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _Stack:
    """Protocol detection and dispatch over one bidirectional byte stream (a TCP connection, TLS plaintext, or the
    tunnelled bytes of a CONNECT stream)."""

    def __init__(self, ctx: _Ctx, conn: _Conn, sid: str, depth: int, midstream: bool, hint: str | None = None,
                 owner: tuple[str, int, hb.TunnelStream] | None = None, under_tls: "_Stack | None" = None,
                 server_port: int | None = None) -> None:
        self.ctx, self.conn, self.sid, self.depth = ctx, conn, sid, depth
        self.midstream = midstream
        self.hint = hint
        self.owner = owner                  # (tunnel_id, stream_id, TunnelStream) when inside a CONNECT stream
        self.under_tls = under_tls
        self.server_port = server_port
        self.state = "detect"
        self.pend = (TimedBuffer(), TimedBuffer())
        self.tls: TlsSession | None = None
        self.h2: Http2Connection | None = None
        self.hbone: hb.HboneObserver | None = None
        self.http1: Http1Connection | None = None
        self.child: _Stack | None = None
        self.children: dict[int, _Stack] = {}
        self.proxy: proxy_v2.ProxyHeader | None = None
        self.proxy_buf = bytearray()
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.bytes = [0, 0]
        self.child_gap = [False, False]
        self.closed = False
        if hint == "h2":
            self._start_h2(midstream)

    # -- input ------------------------------------------------------------------------------------------------------
    def data(self, d: int, piece: Timed) -> None:
        if not piece.data:
            return
        if self.first_ts is None:
            self.first_ts = piece.ts_first
        self.last_ts = piece.marks[-1][1]
        self.bytes[d] += len(piece.data)
        st = self.state
        if st == "tls":
            events = self.tls.feed(d, piece)
            if events:
                self._tls_events(events)
        elif st == "detect":
            self.pend[d].append_timed(piece)
            self._detect()
        elif st == "h2":
            events = self.h2.feed(d, piece)
            if events:
                self._h2_events(events)
        elif st == "http1":
            self._http1_events(self.http1.feed(d, piece))
        elif st == "proxy":
            self._proxy(d, piece)
        elif st == "child":
            self.child.data(d, piece)

    def data_raw(self, d: int, data: bytes, ts: int) -> None:
        """`data` for bytes captured at one time. Hot path: while a TLS record is incomplete, bytes go straight
        into the record reader's buffer (nothing else can happen before the record completes)."""
        if self.state == "tls":
            reader = self.tls.readers[d]
            buf = reader.buf
            if reader.state == "records" and buf.buf and len(buf.buf) + len(data) < reader.need and data:
                buf.append(data, ts)
                self.last_ts = ts
                self.bytes[d] += len(data)
                return
        self.data(d, Timed(data, ((0, ts),)))

    def gap(self, d: int, length: int) -> None:
        st = self.state
        if st == "detect":
            self.pend[d].clear()
            self.midstream = True
        elif st == "tls":
            self._tls_events(self.tls.gap(d, length))
        elif st == "h2":
            self._h2_events(self.h2.gap(d, length))
        elif st == "http1":
            self._http1_events(self.http1.gap(d, length))
        elif st in ("child", "proxy") and self.child is not None:
            self.child.gap(d, length)

    def end(self, d: int) -> None:
        if self.state == "child" and self.child is not None:
            self.child.end(d)

    # -- detection --------------------------------------------------------------------------------------------------
    def _detect(self) -> None:
        c, s = self.pend[0].buf, self.pend[1].buf
        choice = None
        if self.depth > MAX_DEPTH:
            choice = "opaque"
        elif not self.midstream:
            if c:
                if c[0] == 0x16 and (len(c) < 2 or c[1] == 3):
                    choice = "tls" if len(c) >= 2 else None
                elif PREFACE.startswith(bytes(c[:24])) or bytes(c[:24]) == PREFACE[:24]:
                    choice = "h2" if len(c) >= len(PREFACE) else None
                elif proxy_v2.looks_like(bytes(c[:12])):
                    choice = "proxy" if len(c) >= 12 else None
                elif looks_like_request(bytes(c[:16])):
                    choice = "http1"
                elif len(c) < 8 and any(m.startswith(bytes(c)) for m in (b"GET", b"POST", b"CONNECT", b"OPTIONS",
                                                                          b"DELETE", b"PATCH", b"HEAD", b"PUT")):
                    choice = None
                else:
                    choice = "opaque"
            elif len(s) >= 5 and s[0] == 0x16 and s[1] == 3:
                choice = "tls"    # server bytes and no client bytes: a one-way capture of the server side
            elif len(s) >= 8 and looks_like_response(bytes(s[:8])):
                choice = "http1"
            elif len(s) > 4096:
                choice = "opaque"
        else:
            for buf in (c, s):
                if len(buf) >= 5 and tls_plausible(buf, 0) > 0:
                    choice = "tls"
                    break
                if looks_like_request(bytes(buf[:16])) or (len(buf) >= 8 and looks_like_response(bytes(buf[:8]))):
                    choice = "http1"
                    break
                if len(buf) >= 9 and h2_plausible(buf, 0) > 0:
                    choice = "h2"
                    break
            if choice is None and self.under_tls is not None and self.conn.server[1] == HBONE_PORT \
                    and self.owner is None:
                choice = "h2"  # HBONE plaintext from its middle: the frame reader finds the frames
            if choice is None:
                # no protocol starts right here: look for a frame / record chain further on
                for buf in (c, s):
                    if len(buf) < 64:
                        continue
                    frames, records = find_frame_start(bytes(buf)), find_record_start(bytes(buf))
                    if frames >= 0 and (self.under_tls is not None or records < 0):
                        choice = "h2"
                        break
                    if records >= 0:
                        choice = "tls"
                        break
            if choice is None and len(c) + len(s) > DETECT_WINDOW:
                choice = "opaque"
        if choice is None:
            if len(c) + len(s) > 4 * DETECT_WINDOW:
                choice = "opaque"
            else:
                return
        self._choose(choice)

    def _choose(self, choice: str) -> None:
        pend = [self.pend[0].take(len(self.pend[0])), self.pend[1].take(len(self.pend[1]))]
        if choice == "tls":
            self.state = "tls"
            self.tls = TlsSession(self.ctx.keylog, midstream=self.midstream, max_timeline=max(
                0, min(TIMELINE_PER_CONN, TIMELINE_TOTAL - self.ctx.timeline_kept)), shared_budget=self.ctx.trials)
        elif choice == "h2":
            self._start_h2(self.midstream)
        elif choice == "http1":
            self.state = "http1"
            self.http1 = Http1Connection(midstream=self.midstream)
        elif choice == "proxy":
            self.state = "proxy"
            self.child = _Stack(self.ctx, self.conn, self.sid, self.depth + 1, False, owner=self.owner,
                                under_tls=self.under_tls)
        else:
            self.state = "opaque"
        self.bytes = [self.bytes[0] - len(pend[0].data), self.bytes[1] - len(pend[1].data)]
        for d in (0, 1):
            if pend[d].data:
                self.data(d, pend[d])

    def _start_h2(self, midstream: bool, client_preface: bool = True) -> None:
        self.state = "h2"
        self.h2 = Http2Connection(midstream=midstream, client_preface=client_preface)
        self.hbone = hb.HboneObserver(midstream=midstream, expect_tunnels=(
            self.conn.server[1] == HBONE_PORT and self.owner is None) or self.owner is not None)

    # -- TLS --------------------------------------------------------------------------------------------------------
    def _tls_events(self, events: list) -> None:
        ctx = self.ctx
        for e in events:
            if isinstance(e, TlsAppData):
                if ctx.keep_plaintext:
                    pt = ctx.results.plaintext.setdefault(self.sid, (TimedBytes(), TimedBytes()))
                    pt[e.direction].add(e.data, PLAINTEXT_CAP)
                if self.child is None:
                    alpn = self.tls.alpn
                    hint = "h2" if alpn == "h2" else None
                    mid = self.tls.midstream or self.child_gap[0] or self.child_gap[1]
                    self.child = _Stack(ctx, self.conn, self.sid, self.depth + 1, mid, hint=hint, owner=self.owner,
                                        under_tls=self)
                self.child.data(e.direction, e.data)
            elif isinstance(e, TlsPlainGap):
                if self.child is not None:
                    self.child.gap(e.direction, 0)
                else:
                    self.child_gap[e.direction] = True
            elif isinstance(e, Anomaly):
                ctx.anomaly(e)
            elif isinstance(e, TlsAlert):
                if e.level == 2 or e.description not in (0, 90):
                    # a fatal alert is evidence (mTLS refused, unknown CA...): keep it
                    ctx.anomaly(Anomaly("tls", "tls_alert", f"dir {e.direction}: "
                                                            f"{'fatal' if e.level == 2 else 'warning'} {e.name}"))

    # -- HTTP/2 and HBONE -------------------------------------------------------------------------------------------
    def _h2_events(self, events: list) -> None:
        ctx = self.ctx
        for e in events:
            if type(e) is H2Data:                   # the bulk: tunnelled bytes
                for t in self.hbone.feed(e):
                    self._tunnel_event(t)
                continue
            if isinstance(e, Anomaly):
                ctx.anomaly(e)
                continue
            if isinstance(e, H2Headers):
                log = ctx.results.http2_headers
                if len(log) < MAX_HEADER_LOG:
                    log.append({"capture": ctx.capture, "conn_id": self.conn.conn_id, "tunnel_id": self.sid,
                                "direction": e.direction, "stream_id": e.stream_id, "ts": e.ts_ns, "exact": e.exact,
                                "headers": None if e.headers is None else
                                [(k.decode("utf-8", "backslashreplace"), v.decode("utf-8", "backslashreplace"))
                                 for k, v in e.headers]})
                else:
                    ctx.header_log_dropped += 1
            if isinstance(e, H2LostSync):
                # every stream still open this way may have lost tunnelled bytes: their analysers must know
                for sid, child in self.children.items():
                    stream = self.hbone.streams.get(sid)
                    if stream is not None and stream.ended[e.direction] is None and stream.end_reason is None:
                        tb = ctx.results.tunnel_bytes.get((self.sid, sid))
                        if tb is not None:
                            tb[e.direction].gaps += 1
                        child.gap(e.direction, 0)
                continue
            if isinstance(e, (H2Headers, H2Data, H2Reset, H2GoAway, H2DataGap)):
                for t in self.hbone.feed(e):
                    self._tunnel_event(t)

    def _tunnel_event(self, t) -> None:
        ctx = self.ctx
        if isinstance(t, hb.TunnelBytes):
            if ctx.tunnel_bytes:
                key = (self.sid, t.stream_id)
                tb = ctx.results.tunnel_bytes.setdefault(key, (TimedBytes(), TimedBytes()))
                kept = tb[t.direction]
                before = len(kept.data)
                kept.add(t.data, min(TUNNEL_BYTES_CAP, before + max(0, TUNNEL_BYTES_TOTAL - ctx.tunnel_bytes_kept)))
                ctx.tunnel_bytes_kept += len(kept.data) - before
            child = self.children.get(t.stream_id)
            if child is None:
                stream = self.hbone.streams[t.stream_id]
                child = self.children[t.stream_id] = _Stack(
                    ctx, self.conn, f"{self.sid}/s{t.stream_id}", self.depth + 1, stream.midstream,
                    owner=(self.sid, t.stream_id, stream))
            child.data(t.direction, t.data)
        elif isinstance(t, hb.TunnelGap):
            tb = ctx.results.tunnel_bytes.get((self.sid, t.stream_id))
            if tb is not None:
                tb[t.direction].gaps += 1
            child = self.children.get(t.stream_id)
            if child is not None:
                child.gap(t.direction, t.length)
        elif isinstance(t, hb.TunnelClosed):
            child = self.children.get(t.stream_id)
            if child is not None:
                for d in ((0, 1) if t.direction < 0 else (t.direction,)):
                    child.end(d)
        elif isinstance(t, Anomaly):
            ctx.anomaly(t)

    # -- HTTP/1 -----------------------------------------------------------------------------------------------------
    def _request_row(self, req: Http1Request | None, rsp: Http1Response | None) -> None:
        owner = self.owner
        self.ctx.results.requests.append({
            "capture": self.ctx.capture, "conn_id": self.conn.conn_id,
            "tunnel_id": owner[0] if owner else None, "stream_id": owner[1] if owner else None,
            "method": req.method if req else None, "host": req.header("host") if req else None,
            "path": req.target if req else None, "status": rsp.status if rsp else None,
            "request_ts": req.ts_first if req else None, "response_ts": rsp.ts_first if rsp else None,
            "client": _addr(*self.conn.client), "server": _addr(*self.conn.server),
        })

    def _http1_events(self, events: list) -> None:
        for e in events:
            if isinstance(e, Http1Response):
                if e.status >= 200 or e.status == 101:
                    self._request_row(e.request, e)
            elif isinstance(e, Anomaly):
                self.ctx.anomaly(e)
            elif isinstance(e, Http1Switch):
                if e.protocol == "h2c":
                    self._start_h2(False, client_preface=True)
                    for d in (0, 1):
                        if e.leftover[d].data:
                            self._h2_events(self.h2.feed(d, e.leftover[d]))
                else:
                    self.state = "child"
                    self.child = _Stack(self.ctx, self.conn, f"{self.sid}/connect", self.depth + 1, False,
                                        owner=self.owner, under_tls=self.under_tls)
                    for d in (0, 1):
                        if e.leftover[d].data:
                            self.child.data(d, e.leftover[d])

    # -- PROXY v2 ---------------------------------------------------------------------------------------------------
    def _proxy(self, d: int, piece: Timed) -> None:
        if d == 1 or self.proxy is not None:
            self.child.data(d, piece)
            return
        before = len(self.proxy_buf)
        self.proxy_buf += piece.data
        try:
            hdr = proxy_v2.parse(bytes(self.proxy_buf[:16 + 65535]))
        except proxy_v2.ProxyV2Error as e:
            self.ctx.anomaly(Anomaly("proxy", "proxy_v2_malformed", str(e)))
            self.proxy = proxy_v2.ProxyHeader(0, "invalid", 0, None, None, None, None)
            self.child.data(0, Timed.at(bytes(self.proxy_buf), piece.ts_last))
            self.proxy_buf.clear()
            return
        if hdr is None:
            if len(self.proxy_buf) > 16 + 65535:
                self.ctx.anomaly(Anomaly("proxy", "proxy_v2_malformed", "header longer than possible"))
                self.state = "opaque"
            return
        self.proxy = hdr
        if self.owner is not None:
            self.owner[2].proxy = hdr
        rest = hdr.length - before
        self.proxy_buf.clear()
        if rest < len(piece.data):
            self.child.data(0, piece.slice(rest, len(piece.data)))

    # -- results ----------------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """What this byte stream turned out to be (for streams.inner)."""
        if self.state == "tls":
            child = self.child.describe() if self.child else None
            return "hbone" if child == "hbone" else "tls"
        if self.state == "h2":
            return "hbone" if self.hbone and self.hbone.connects else "http2"
        if self.state == "http1":
            return "http1"
        if self.state == "proxy":
            return "proxy-v2"
        if self.state == "child":
            return self.child.describe() if self.child else "opaque"
        return "opaque"  # undecided (too few bytes) or nothing recognised

    def _is_tunnel(self) -> tuple[bool, str]:
        if self.state == "tls":
            child = self.child
            if child is not None and child.state == "h2" and child.hbone and child.hbone.connects:
                return True, "connect"
            port = self.server_port
            if port == HBONE_PORT:
                return True, "port"
            t = self.tls
            ch = t.client_hello
            if self.depth > 0 and self.owner is not None:
                # TLS inside a CONNECT stream: double HBONE when it carries h2
                if t.alpn == "h2" or (ch is not None and "h2" in ch.alpn):
                    return True, "nested-tls-h2"
            return False, ""
        if self.state == "h2" and self.hbone is not None and self.hbone.connects and self.under_tls is None:
            return True, "connect"
        return False, ""

    def close(self, last_ts: int | None) -> None:
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        if self.state == "detect" and (len(self.pend[0]) or len(self.pend[1])):
            self._choose("opaque")
        if self.tls is not None:
            self._tls_events(self.tls.close())
            ctx.results.records[self.sid] = self.tls.timeline
            ctx.timeline_kept += len(self.tls.timeline)
        if self.h2 is not None:
            self._h2_events(self.h2.close())
            for t in self.hbone.close(last_ts):
                self._tunnel_event(t)
        if self.http1 is not None:
            self._http1_events(self.http1.close())
            for req in self.http1.pending:
                self._request_row(req, None)
            self.http1.pending.clear()
        if self.child is not None:
            self.child.close(last_ts)
        for child in self.children.values():
            child.close(last_ts)
        if self.hbone is not None:
            hbone_like = self.hbone.connects > 0 or self.conn.server[1] == HBONE_PORT or self.owner is not None
            for s in self.hbone.streams.values():
                if s.method is None and not hbone_like:
                    continue  # DATA of an unseen stream on a connection with no sign of HBONE: not a tunnel
                child = self.children.get(s.stream_id)
                s.inner = child.describe() if child is not None else None
                row = s.row()
                px = s.proxy
                row.update({"capture": ctx.capture, "tunnel_id": self.sid,
                            "proxy_src": _addr(px.src, px.sport) if px and px.src else None,
                            "proxy_dst": _addr(px.dst, px.dport) if px and px.dst else None,
                            "peer_identity": px.peer_identity if px else None})
                ctx.results.streams.append(row)
        is_tunnel, evidence = self._is_tunnel()
        if is_tunnel:
            self._tunnel_row(evidence, last_ts)

    def _tunnel_row(self, evidence: str, last_ts: int | None) -> None:
        conn, ctx = self.conn, self.ctx
        t = self.tls
        h2_stack = self.child if t is not None else self
        hbone = h2_stack.hbone if h2_stack is not None else None
        nested = self.owner is not None
        row = {
            "capture": ctx.capture, "tunnel_id": self.sid, "conn_id": conn.conn_id, "encap": conn.encap,
            "client": _addr(*conn.client), "server": _addr(*conn.server),
            "start": self.first_ts if nested else conn.first_ts, "end": self.last_ts if nested else conn.last_ts,
            "tls_version": t.version_name if t else None, "cipher_suite": t.suite_name if t else None,
            "alpn": t.alpn if t else None, "sni": t.sni if t else None,
            "client_random": (t.client_hello.random.hex() if t.client_hello else
                              t.inferred_client_random.hex() if t.inferred_client_random else None) if t else None,
            "decrypted": bool(t.is_decrypted) if t else None,
            "why_not": (t.why_not if t and not t.is_decrypted else None) if t else "no TLS (cleartext HTTP/2)",
            "client_spiffe": t.spiffe[0] if t else None, "server_spiffe": t.spiffe[1] if t else None,
            "streams": len(hbone.streams) if hbone else 0,
            "bytes_c2s": self.bytes[0] if nested else conn.bytes[0],
            "bytes_s2c": self.bytes[1] if nested else conn.bytes[1],
            "evidence": evidence, "depth": self.depth,
            "parent_tunnel_id": self.owner[0] if nested else None,
            "parent_stream_id": self.owner[1] if nested else None,
            "records": len(t.timeline) if t else None,
        }
        ctx.results.tunnels.append(row)


class StreamAnalyzer:
    """Stateful analysis of every TCP connection of one capture.

    ``feed(seg)`` with the segments of all TCP connections in capture order, ``add_secrets(text)`` whenever key log
    text arrives (pcapng Decryption Secrets Blocks), then ``close()`` for the `StreamResults`.
    """

    def __init__(self, keylog: KeyLog | None = None, config=DEFAULT_CONFIG, keep_plaintext: bool = False,
                 tunnel_bytes: bool = True, share: tuple[int, int] | None = None) -> None:
        """tunnel_bytes: keep the tunnelled bytes of CONNECT streams (`StreamResults.tunnel_bytes`, within
        TUNNEL_BYTES_CAP/TOTAL) for export; False keeps none (the stages still see them all).
        share: (k, n) to analyse only the connections `share_of` gives to k of n analyzers fed the same segments
        (each follows every connection's lifetime, so ids agree); `merge_shares` of the n results is the result of
        one analyzer, up to the global budgets (TIMELINE_TOTAL, TUNNEL_BYTES_TOTAL, MAX_HEADER_LOG), which then
        apply per share."""
        self.share = share if share is not None and share[1] > 1 else None
        self.ctx = _Ctx(keylog, keep_plaintext, config, tunnel_bytes, ordered=self.share is not None)
        self.conns: dict[tuple, _Conn] = {}
        self.next_conn_id = 0
        self.segments = 0
        self.closed = False
        self._last: tuple | None = None
        self._encap_paths: dict[str, str] = {}
        if keylog is not None:
            for a in keylog.anomalies:
                row = a.row(keylog.name)
                self.ctx.results.anomalies.append(row)

    def add_secrets(self, text: bytes | str, name: str = "dsb") -> None:
        """Key log text found at run time (a pcapng DSB payload); bad lines become anomaly rows."""
        if self.ctx.keylog is None:
            self.ctx.keylog = KeyLog(name)
        saved, self.ctx.conn_id = self.ctx.conn_id, None
        self.ctx.step += 1
        for a in self.ctx.keylog.add(text, name):
            self.ctx.anomaly(a)
        self.ctx.conn_id = saved

    def _new_conn(self, seg: TcpSegment, key) -> _Conn:
        a, b = (seg.src, seg.sport), (seg.dst, seg.dport)
        flags = seg.flags
        midstream = not flags & SYN
        if flags & SYN:
            client, server = (a, b) if not flags & ACK else (b, a)
        elif seg.sport in SERVER_PORTS and seg.dport not in SERVER_PORTS or \
                (seg.sport < 1024 <= seg.dport and seg.dport not in SERVER_PORTS):
            client, server = b, a
        else:
            client, server = a, b
        c = _Conn(key, self.next_conn_id, seg.capture, seg.encap, client, server, midstream)
        self.next_conn_id += 1
        c.first_ts = seg.ts_ns
        if self.share is not None and share_of(key, self.share[1]) != self.share[0]:
            c.foreign = True
            c.stack = FOREIGN
        else:
            c.stack = _Stack(self.ctx, c, f"c{c.conn_id}", 0, midstream, server_port=server[1])
        if len(self.conns) >= MAX_CONNECTIONS:
            oldest = min(self.conns.values(), key=lambda x: x.last_ts)
            self._finish(oldest)
        self.conns[key] = c
        return c

    def feed(self, seg: TcpSegment) -> None:
        ctx = self.ctx
        ctx.capture = seg.capture
        ctx.index = seg.index
        ctx.step += 1
        flags = seg.flags
        last = self._last
        if last is not None and not flags & SYN and last[0] == seg.sport and last[1] == seg.dport and \
                last[2] == seg.src and last[3] == seg.dst and last[4] == seg.encap and last[5] == seg.capture:
            # same connection and direction as the previous segment (bulk transfers)
            c, d = last[6], last[7]
            ctx.conn_id = c.conn_id
            if c.closed:
                self._last = None
            elif c.stack.state == "opaque" and (not flags & (FIN | RST) or c.foreign):
                # nothing will look at these bytes: count them, skip reassembly
                c.last_ts = seg.ts_ns
                c.last_index = seg.index
                c.bytes[d] += seg.payload_len
                if flags & (FIN | RST):
                    c.end(d, flags)
                self.segments += 1
                if self.segments % FLUSH_EVERY == 0:
                    self._flush(seg.ts_ns)
                return
            else:
                c.last_ts = seg.ts_ns
                c.last_index = seg.index
                c.bytes[d] += seg.payload_len
                events = c.reasm.feed(d, seg.seq, seg.ack, flags, seg.payload, seg.payload_len, seg.ts_ns, seg.index)
                if len(events) == 1 and type(events[0]) is StreamData:
                    c.stack.data_raw(d, events[0].data, events[0].ts_ns)
                else:
                    for e in events:
                        self._dispatch(c, e)
                if flags & (FIN | RST):
                    c.end(d, flags)
                self.segments += 1
                if self.segments % FLUSH_EVERY == 0:
                    self._flush(seg.ts_ns)
                return
        a, b = (seg.src, seg.sport), (seg.dst, seg.dport)
        encap_path = self._encap_paths.get(seg.encap)
        if encap_path is None:
            # the two directions of a tunnelled connection may use different VNIs (Istio: 1001 out, 1000 in):
            # connections are keyed by the tunnel types, as the connections table does
            encap_path = self._encap_paths[seg.encap] = re.sub(r":\d+", "", seg.encap)
        key = (seg.capture, encap_path) + ((a, b) if a <= b else (b, a))
        c = self.conns.get(key)
        if c is not None and flags & SYN and not flags & ACK and c.syn_isn is not None and c.syn_isn != seg.seq and \
                (c.bytes[0] or c.bytes[1] or c.ended[0] or c.ended[1]):
            self._finish(c)
            c = None
        elif c is not None and flags & SYN and not flags & ACK and c.syn_isn is None and (c.ended[0] or c.ended[1]):
            self._finish(c)
            c = None
        if c is None:
            c = self._new_conn(seg, key)
        ctx.conn_id = c.conn_id
        d = 0 if a == c.client else 1
        self._last = (seg.sport, seg.dport, seg.src, seg.dst, seg.encap, seg.capture, c, d)
        if flags & SYN and not flags & ACK and d == 0:
            c.syn_isn = seg.seq
        c.last_ts = seg.ts_ns
        c.last_index = seg.index
        c.bytes[d] += seg.payload_len
        if (c.stack.state != "opaque" or flags & (FIN | RST)) and not c.foreign:
            for e in c.reasm.feed(d, seg.seq, seg.ack, flags, seg.payload, seg.payload_len, seg.ts_ns, seg.index):
                self._dispatch(c, e)
        if flags & (FIN | RST):
            c.end(d, flags)
        self.segments += 1
        if self.segments % FLUSH_EVERY == 0:
            self._flush(seg.ts_ns)

    def feed_any(self, item) -> None:
        """`feed` for a `TcpSegment`, `feed_run` for a `TcpRun` (what `tcp_runs_of_batch` yields)."""
        if type(item) is TcpRun:
            self.feed_run(item)
        else:
            self.feed(item)

    def feed_run(self, run: TcpRun) -> None:
        """A run of contiguous payload segments of one connection direction: the same results as feeding its
        segments one by one. The first goes through `feed` (connection lookup, every general rule); the rest are
        taken at once when the reassembler's in-order path applies to all of them (nothing waiting either way, the
        direction not ended), as one buffer whose capture times are range marks; otherwise one by one."""
        self.feed(run.first())
        last = self._last
        n = len(run.ends)
        if last is None or n == 1:
            for seg in run.segments()[1:]:
                self.feed(seg)
            return
        c, d = last[6], last[7]
        dd = c.reasm.dirs[d]
        opaque = c.stack.state == "opaque"
        if c.closed or not opaque and (dd.base is None or dd.starts or dd.ended or c.reasm.dirs[1 - d].starts or
                                       ((run.seq + run.ends[0] - dd.base - dd.next_off) & 0xFFFFFFFF) != 0):
            for seg in run.segments()[1:]:
                self.feed(seg)
            return
        # deliver segments 1..n-1 in pieces of RUN_PIECE segments (a parser's buffer then holds few time marks),
        # split where the per-segment path would flush idle connections
        i = 1
        while i < n:
            j = min(n, i + FLUSH_EVERY - self.segments % FLUSH_EVERY, i + RUN_PIECE)
            lo, hi = run.ends[i - 1], run.ends[j - 1]
            ts, index = run.ts[j - 1], run.index[j - 1]
            self.ctx.index = index
            self.ctx.step += j - i          # one step per segment, however they are delivered
            c.last_ts, c.last_index = ts, index
            c.bytes[d] += hi - lo
            if not opaque:
                data = run.payload[lo:hi]
                off = dd.next_off
                dd.next_off = off + len(data)
                dd.delivered += len(data)
                dd._remember(off, data)
                c.reasm.last_ts, c.reasm.last_index = ts, index
                tss = run.ts[i:j]
                if len(set(tss)) == j - i:          # the usual case: every segment has its own capture time
                    marks = list(zip([e - lo for e in run.ends[i - 1:j - 1]], tss))
                else:
                    marks = []
                    prev = None
                    for k in range(i, j):
                        t = run.ts[k]
                        if t != prev:
                            marks.append((run.ends[k - 1] - lo, t))
                            prev = t
                if len(marks) == 1:
                    c.stack.data_raw(d, data, ts)
                else:
                    c.stack.data(d, Timed(data, tuple(marks)))
            self.segments += j - i
            if self.segments % FLUSH_EVERY == 0:
                self._flush(ts)
            i = j
            if c.closed:
                for seg in run.segments()[i:]:
                    self.feed(seg)
                return

    def _dispatch(self, c: _Conn, e) -> None:
        if isinstance(e, StreamData):
            c.stack.data(e.direction, Timed.at(e.data, e.ts_ns))
        elif isinstance(e, StreamGap):
            c.stack.gap(e.direction, e.length)
        elif isinstance(e, StreamEnd):
            c.stack.end(e.direction)
        elif isinstance(e, Anomaly):
            self.ctx.anomaly(e)

    def _finish(self, c: _Conn) -> None:
        c.closed = True
        if self._last is not None and self._last[6] is c:
            self._last = None
        if self.conns.get(c.key) is c:
            del self.conns[c.key]
        ctx = self.ctx
        ctx.step += 1
        if not c.foreign:
            saved = ctx.index, ctx.conn_id
            ctx.index, ctx.conn_id = c.last_index, c.conn_id
            for e in c.reasm.close():
                self._dispatch(c, e)
            c.stack.close(c.last_ts)
            ctx.conn_done(c.conn_id)
            ctx.index, ctx.conn_id = saved
        ctx.step += 1

    def _flush(self, now: int) -> None:
        for c in list(self.conns.values()):
            idle = now - c.last_ts
            if idle > IDLE_NS or (c.ended[0] and c.ended[1] and idle > CLOSED_LINGER_NS):
                self._finish(c)

    def close(self) -> StreamResults:
        r = self.ctx.results
        if not self.closed:
            self.closed = True
            for c in sorted(self.conns.values(), key=lambda x: x.conn_id):
                self._finish(c)
            if self.share is not None:       # plain lists and dicts again, the steps kept beside them
                r.order = {"share": self.share}
                for name in ROW_LISTS:
                    rows = getattr(r, name)
                    r.order[name] = (rows.steps, rows.shared)
                    setattr(r, name, list(rows))
                for name in KEYED:
                    d = getattr(r, name)
                    r.order[name] = d.steps
                    setattr(r, name, dict(d))
        return r


def merge_shares(parts: list[StreamResults]) -> StreamResults:
    """The results of the analyzers of every share of one capture (`StreamAnalyzer(share=(k, n))` for k < n, fed
    the same segments) as one analyzer would have given them: rows and keys in the order of the steps they were
    emitted at (one connection per step, so one share per step); rows of no connection from the lowest share
    only."""
    if len(parts) == 1:         # one analyzer for every connection (shared or not): nothing to merge
        return parts[0]
    parts = sorted(parts, key=lambda r: r.order["share"][0])
    out = StreamResults(kept_tunnel_bytes=parts[0].kept_tunnel_bytes)
    for name in ROW_LISTS:
        keyed = []
        for k, r in enumerate(parts):
            steps, shared = r.order[name]
            keyed += [(st, k, i, row) for i, (row, st, sh) in enumerate(zip(getattr(r, name), steps, shared))
                      if k == 0 or not sh]
        keyed.sort(key=lambda x: x[:3])
        setattr(out, name, [x[3] for x in keyed])
    for name in KEYED:
        keyed = []
        for k, r in enumerate(parts):
            steps = r.order[name]
            keyed += [(steps[key], k, i, key, v) for i, (key, v) in enumerate(getattr(r, name).items())]
        keyed.sort(key=lambda x: x[:3])
        setattr(out, name, {x[3]: x[4] for x in keyed})
    return out

"""HBONE: HTTP/2 CONNECT streams as tunnels (Istio ambient's HTTP-Based Overlay Network Environment).

Follows RFC 9113 section 8.5 (the CONNECT method in HTTP/2: ``:method CONNECT`` and ``:authority`` only; DATA frames
carry the tunnelled bytes; END_STREAM is a half-close, RST_STREAM an abort) and Istio's conventions collected in
``shared/notes/ambient-wire.md`` (x-envoy-original-dst-host, forwarded ``for=``, traceparent, baggage; 200 after the
upstream connect, 4xx/5xx refusals; pooled connections, GOAWAY).

Strategy: `HboneObserver.feed(event) -> events` consumes `Http2Connection` events and keeps one `TunnelStream` per
CONNECT stream (and per stream that carries DATA without a HEADERS we saw, when the capture started mid-connection:
``method`` is then None). It emits `TunnelOpened`, `TunnelBytes` (tunnelled bytes of one direction with capture
times) and `TunnelClosed`; everything needed for a `streams` row stays on the `TunnelStream`. Non-CONNECT requests are
left to the caller (their headers are in the HTTP/2 events).

Limits: at most `MAX_STREAMS` streams are tracked per connection; beyond, new streams are counted, not tracked
(`hbone_too_many_streams`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .anomalies import Anomaly
from .http2.connection import H2Data, H2DataGap, H2GoAway, H2Headers, H2Reset
from .http2.frames import error_name
from .timeline import Timed

MAX_STREAMS = 100_000


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


def header_dict(headers: list[tuple[bytes, bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers or ():
        name, value = _text(k), _text(v)
        out[name] = out[name] + ", " + value if name in out else value
    return out


def forwarded_for(value: str | None) -> str | None:
    """The ``for=`` parameter of the first element of a Forwarded header (RFC 7239), unquoted."""
    if not value:
        return None
    first = value.split(",")[0]
    for part in first.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k.strip().lower() == "for":
            return v.strip().strip('"')
    return None


def trace_id(traceparent: str | None) -> str | None:
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    return parts[1] if len(parts) >= 4 and len(parts[1]) == 32 else None


@dataclass(slots=True)
class TunnelStream:
    stream_id: int
    method: str | None = None
    authority: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    request_ts: int | None = None
    response_ts: int | None = None
    first_data_ts: list = field(default_factory=lambda: [None, None])
    ended: list = field(default_factory=lambda: [None, None])   # END_STREAM time per direction
    end_ts: int | None = None
    end_reason: str | None = None
    bytes: list = field(default_factory=lambda: [0, 0])
    midstream: bool = False
    inner: str | None = None
    exact_headers: bool = True
    proxy: object = None        # inner PROXY v2 header (inner.proxy_v2.ProxyHeader), when one was sent

    @property
    def original_dst(self) -> str | None:
        return self.headers.get("x-envoy-original-dst-host") or self.authority

    def row(self) -> dict:
        h = self.headers
        return {
            "stream_id": self.stream_id, "method": self.method, "authority": self.authority,
            "original_dst": self.original_dst, "forwarded_for": forwarded_for(h.get("forwarded")),
            "traceparent": h.get("traceparent"), "trace_id": trace_id(h.get("traceparent")),
            "baggage": h.get("baggage"), "headers": dict(h), "response_headers": dict(self.response_headers),
            "status": self.status, "request_ts": self.request_ts, "response_ts": self.response_ts,
            "first_data_c2s_ts": self.first_data_ts[0], "first_data_s2c_ts": self.first_data_ts[1],
            "end_ts": self.end_ts, "end_reason": self.end_reason, "bytes_c2s": self.bytes[0],
            "bytes_s2c": self.bytes[1], "inner": self.inner,
        }


@dataclass(slots=True)
class TunnelOpened:
    stream: TunnelStream


@dataclass(slots=True)
class TunnelBytes:
    stream_id: int
    direction: int
    data: Timed


@dataclass(slots=True)
class TunnelGap:
    stream_id: int
    direction: int
    length: int


@dataclass(slots=True)
class TunnelClosed:
    stream_id: int
    direction: int      # the direction that ended (-1: both, e.g. RST_STREAM)
    reason: str


class HboneObserver:
    def __init__(self, midstream: bool = False, expect_tunnels: bool = False) -> None:
        """`expect_tunnels`: the connection is HBONE by other evidence (port 15008, inside a tunnel): streams seen
        only from the server side (one-way captures) or only through DATA are tunnels too."""
        self.streams: dict[int, TunnelStream] = {}
        self.other: set[int] = set()           # non-CONNECT streams (not tunnels)
        self.goaway: tuple[int, int, int] | None = None   # (ts, last_stream_id, code)
        self.midstream = midstream
        self.expect_tunnels = expect_tunnels
        self.untracked = 0
        self.connects = 0

    def _new(self, sid: int, out: list) -> TunnelStream | None:
        if len(self.streams) >= MAX_STREAMS:
            self.untracked += 1
            if self.untracked == 1:
                out.append(Anomaly("hbone", "hbone_too_many_streams", f"more than {MAX_STREAMS} streams"))
            return None
        s = self.streams[sid] = TunnelStream(sid)
        return s

    def feed(self, ev) -> list:
        out: list = []
        if isinstance(ev, H2Headers):
            self._headers(ev, out)
        elif isinstance(ev, H2Data):
            sid = ev.stream_id
            s = self.streams.get(sid)
            if s is None:
                if sid in self.other or sid == 0:
                    return out
                if not (self.midstream or self.connects or self.expect_tunnels):
                    return out
                s = self._new(sid, out)
                if s is None:
                    return out
                s.midstream = True
                out.append(TunnelOpened(s))
            d = ev.direction
            n = len(ev.data.data)
            if n:
                if s.first_data_ts[d] is None:
                    s.first_data_ts[d] = ev.data.ts_first
                s.bytes[d] += n
                out.append(TunnelBytes(sid, d, ev.data))
            if ev.end_stream:
                self._half_close(s, d, ev.ts_ns, out)
        elif isinstance(ev, H2DataGap):
            if ev.stream_id in self.streams:
                out.append(TunnelGap(ev.stream_id, ev.direction, ev.length))
        elif isinstance(ev, H2Reset):
            s = self.streams.get(ev.stream_id)
            if s is not None and s.end_reason is None:
                s.end_reason = f"rst_stream:{error_name(ev.code)}"
                s.end_ts = ev.ts_ns
                out.append(TunnelClosed(s.stream_id, -1, s.end_reason))
        elif isinstance(ev, H2GoAway):
            if self.goaway is None:
                self.goaway = (ev.ts_ns, ev.last_stream_id, ev.code)
        return out

    def _headers(self, ev: H2Headers, out: list) -> None:
        sid = ev.stream_id
        hd = header_dict(ev.headers)
        s = self.streams.get(sid)
        if ev.direction == 0 and s is None and sid not in self.other:
            if hd.get(":method") != "CONNECT":
                if ev.headers is not None:
                    self.other.add(sid)
                    return
                if not (self.connects or self.midstream):
                    return
            s = self._new(sid, out)
            if s is None:
                return
            s.method = hd.get(":method")
            s.authority = hd.get(":authority")
            s.headers = hd
            s.request_ts = ev.ts_ns
            s.exact_headers = ev.exact and ev.headers is not None
            if s.method == "CONNECT":
                self.connects += 1
            out.append(TunnelOpened(s))
            if ev.end_stream:
                self._half_close(s, 0, ev.ts_ns, out)
            return
        if s is None and ev.direction == 1 and sid not in self.other and sid % 2 == 1 and \
                (self.midstream or self.connects or self.expect_tunnels):
            # a response to a request we did not see (one-way capture, or its HEADERS before the capture)
            s = self._new(sid, out)
            if s is None:
                return
            s.midstream = True
            out.append(TunnelOpened(s))
        if s is None:
            return
        if ev.direction == 1:
            if s.status is None or (s.status < 200 and ":status" in hd):
                try:
                    s.status = int(hd.get(":status", ""))
                except ValueError:
                    s.status = None
                s.response_headers = hd
                s.response_ts = ev.ts_ns
            # later HEADERS on a response are trailers: keep the first response head
        if ev.end_stream:
            self._half_close(s, ev.direction, ev.ts_ns, out)

    def _half_close(self, s: TunnelStream, d: int, ts: int, out: list) -> None:
        if s.ended[d] is not None:
            return
        s.ended[d] = ts
        out.append(TunnelClosed(s.stream_id, d, "end_stream"))
        if s.ended[1 - d] is not None and s.end_reason is None:
            s.end_reason = "end_stream"
            s.end_ts = max(s.ended)

    def close(self, last_ts: int | None) -> list:
        """Streams still open at the end of the connection or capture get their end reason."""
        out = []
        for s in self.streams.values():
            if s.end_reason is None:
                if s.ended[1] is not None and s.status is not None and not 200 <= s.status < 300:
                    # a refused CONNECT (4xx/5xx with END_STREAM) ends the stream; the client need not answer
                    s.end_reason, s.end_ts = "end_stream", s.ended[1]
                elif self.goaway is not None and s.stream_id > self.goaway[1]:
                    s.end_reason, s.end_ts = "goaway", self.goaway[0]
                elif self.goaway is not None:
                    s.end_reason, s.end_ts = "goaway", last_ts
                else:
                    s.end_reason, s.end_ts = "capture_end", last_ts
                out.append(TunnelClosed(s.stream_id, -1, s.end_reason))
        return out

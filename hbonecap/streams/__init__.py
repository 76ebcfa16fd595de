"""Stateful, sans-I/O stream stages: TCP reassembly, TLS, HTTP/2 + HPACK, HBONE CONNECT streams, inner protocols.

Stages (each ``feed(...) -> events``, ``close() -> events``; problems are `anomalies.Anomaly` events, never raised):

    reassembly.TcpReassembler      TcpSegment fields -> StreamData / StreamGap / StreamEnd      (per connection)
    tls.session.TlsSession         timed bytes -> TlsAppData / TlsPlainGap / TlsAlert            (records.py,
                                   handshake.py, keylog.py, decrypt.py)
    http2.connection.Http2Connection  timed bytes -> H2Headers / H2Data / H2Reset / H2GoAway / H2Control
                                   (frames.py, headers.py)
    hbone.HboneObserver            HTTP/2 events -> TunnelOpened / TunnelBytes / TunnelClosed
    inner.http1.Http1Connection    timed bytes -> Http1Request / Http1Response / Http1Switch
    inner.proxy_v2.parse           bytes -> ProxyHeader | None (need more) | ProxyV2Error

`analyzer.StreamAnalyzer` drives them for every TCP connection of one capture and returns `StreamResults`
(rows for the `tunnels`, `streams`, `requests` and `anomalies` tables, tunnelled bytes with capture times, TLS
record timelines, decoded HTTP/2 header blocks). `timeline` holds the byte buffers that carry capture times.
"""
from .analyzer import StreamAnalyzer, StreamResults, TimedBytes
from .tls.keylog import KeyLog

__all__ = ["KeyLog", "StreamAnalyzer", "StreamResults", "TimedBytes"]

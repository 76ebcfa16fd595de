"""Every table hbonecap produces: its columns, their dtypes and what they mean, declared once.

Stages produce plain Python/numpy columns; `frame(name, columns)` turns them into a pandas DataFrame with
the declared dtypes, and `empty(name)` gives the frame with no rows. An empty result is always an empty
frame with the declared columns, never ``None``. `describe(name)` returns the documentation as a frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

TS = "datetime64[ns, UTC]"
K8S_NAME = ("what {} was at the time (--k8s): namespace/pod[:port], node/NAME, service.namespace:port for a "
            "Service address, 'a | b' when ambiguous")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    doc: str


def _cols(*specs: tuple[str, str, str]) -> tuple[Column, ...]:
    return tuple(Column(*s) for s in specs)


SCHEMAS: dict[str, tuple[Column, ...]] = {
    "captures": _cols(
        ("capture", "string", "capture name: the file name without directories"),
        ("path", "string", "path as given"),
        ("format", "string", "pcap, pcap-ns, pcapng; '+gzip' when compressed"),
        ("link_types", "string", "comma-separated link types in use (ether, linux-sll2, ...)"),
        ("interfaces", "string", "comma-separated interface names (pcapng if_name), empty when unnamed"),
        ("packets", "Int64", "records read"),
        ("bytes", "Int64", "captured bytes of all records"),
        ("first_ts", TS, "first packet time"),
        ("last_ts", TS, "last packet time"),
        ("snaplen", "Int64", "largest snapshot length declared"),
        ("comment", "string", "section comments, joined"),
        ("secrets", "Int64", "Decryption Secrets Blocks found (contents are never shown)"),
        ("anomalies", "Int64", "anomaly rows for this capture"),
        ("role", "string", "capture-point role guess: pod, node, istioout, istioin, pistioout, pistioin, ztunnel, "
                           "waypoint, loopback, unknown"),
        ("node", "string", "node the capture point belongs to, when known"),
        ("role_reason", "string", "why the role and node were chosen"),
        ("pod", "string", "namespace/pod the capture was taken in, placed from Kubernetes addresses (--k8s)"),
    ),
    "packets": _cols(
        ("capture", "category", "capture name"),
        ("index", "int64", "frame number in the capture, from 1"),
        ("ts", TS, "capture time"),
        ("interface", "category", "interface name (pcapng if_name, SLL2 'ifindex:N'), empty when unknown"),
        ("ifindex", "Int64", "interface index from a Linux cooked v2 (SLL2) header"),
        ("pkttype", "Int64", "Linux cooked packet type: 0 to us, 1 broadcast, 2 multicast, 3 other host, 4 outgoing"),
        ("link_type", "category", "link type of the record"),
        ("vlan", "Int64", "outermost 802.1Q VLAN id"),
        ("encap", "category", "tunnels unwrapped, outermost first: 'geneve:1001', 'vxlan:42/geneve:1000'; empty if none"),
        ("vni", "Int64", "innermost tunnel's VNI"),
        ("tunnel_options", "Int64", "Geneve options in the innermost Geneve header"),
        ("outer_src", "category", "outermost underlay source address when tunnelled"),
        ("outer_dst", "category", "outermost underlay destination address when tunnelled"),
        ("outer_sport", "Int64", "outermost underlay UDP source port when tunnelled"),
        ("outer_dport", "Int64", "outermost underlay UDP destination port when tunnelled"),
        ("src", "category", "innermost IP source address"),
        ("dst", "category", "innermost IP destination address"),
        ("ip_version", "Int64", "4 or 6"),
        ("ttl", "Int64", "IPv4 TTL / IPv6 hop limit"),
        ("ip_id", "Int64", "IPv4 identification"),
        ("proto", "category", "tcp, udp, icmp, icmpv6, arp, ip:N (other IP protocol), ethertype:0xNNNN, unknown"),
        ("sport", "Int64", "TCP/UDP source port"),
        ("dport", "Int64", "TCP/UDP destination port"),
        ("tcp_flags", "Int64", "TCP flags byte plus NS bit (0x100)"),
        ("seq", "Int64", "TCP sequence number (raw)"),
        ("ack", "Int64", "TCP acknowledgment number (raw)"),
        ("win", "Int64", "TCP window field (unscaled)"),
        ("mss", "Int64", "TCP MSS option"),
        ("wscale", "Int64", "TCP window-scale option"),
        ("sack_permitted", "boolean", "TCP SACK-permitted option present"),
        ("sack_blocks", "Int64", "number of TCP SACK blocks"),
        ("tsval", "Int64", "TCP timestamp option value"),
        ("tsecr", "Int64", "TCP timestamp echo reply"),
        ("icmp_type", "Int64", "ICMP / ICMPv6 type"),
        ("icmp_code", "Int64", "ICMP / ICMPv6 code"),
        ("length", "int64", "original length on the wire"),
        ("caplen", "int64", "captured length"),
        ("payload_len", "Int64", "innermost TCP/UDP payload length per the headers (may exceed what was captured)"),
        ("payload_offset", "Int64", "offset of the innermost payload within the captured frame"),
        ("frame_offset", "int64", "offset of the frame's first byte in the (decompressed) capture file"),
        ("comment", "string", "packet comment (pcapng opt_comment)"),
    ),
    "connections": _cols(
        ("capture", "category", "capture name"),
        ("conn_id", "int64", "connection number within the analysis"),
        ("interface", "category", "interface of the first packet"),
        ("ifindex", "Int64", "SLL2 interface index of the first packet"),
        ("encap", "category", "tunnels around the client-to-server packets (else the first packet's)"),
        ("encap_s2c", "category", "tunnels around the server-to-client packets (Istio uses VNI 1001 out, 1000 in)"),
        ("vni", "Int64", "innermost VNI of the client-to-server packets"),
        ("client", "string", "ip:port of the side that sent the SYN (else the first sender)"),
        ("server", "string", "ip:port of the other side"),
        ("client_ip", "string", "client address"),
        ("client_port", "Int64", "client port"),
        ("server_ip", "string", "server address"),
        ("server_port", "Int64", "server port"),
        ("first_ts", TS, "first packet"),
        ("last_ts", TS, "last packet"),
        ("syn_ts", TS, "first SYN"),
        ("synack_ts", TS, "first SYN-ACK"),
        ("ack_ts", TS, "first client ACK after the SYN-ACK"),
        ("fin_ts", TS, "first FIN"),
        ("rst_ts", TS, "first RST"),
        ("first_index", "int64", "frame number of the first packet"),
        ("packets_c2s", "int64", "packets client to server"),
        ("packets_s2c", "int64", "packets server to client"),
        ("bytes_c2s", "int64", "TCP payload bytes client to server (per headers)"),
        ("bytes_s2c", "int64", "TCP payload bytes server to client (per headers)"),
        ("retransmissions", "int64", "data segments that did not advance their direction's highest sequence"),
        ("state", "string", "complete, reset, refused, open, syn-only, midstream"),
        ("handshake_rtt_ms", "float64", "SYN to ACK of SYN-ACK as seen at this capture"),
        ("client_name", "string", K8S_NAME.format("client")),
        ("server_name", "string", K8S_NAME.format("server")),
        ("client_node", "string", "node of the client address (--k8s)"),
        ("server_node", "string", "node of the server address (--k8s)"),
    ),
    "anomalies": _cols(
        ("capture", "string", "capture name (or key log name)"),
        ("index", "Int64", "frame number, or key-log line number; empty when not tied to one"),
        ("layer", "string", "capture, link, ip, tcp, udp, geneve, vxlan, tls, http2, hbone, keylog, ..."),
        ("kind", "string", "<layer>_<condition>, e.g. geneve_truncated, tcp_gap, tls_no_key"),
        ("detail", "string", "what exactly was wrong"),
    ),
    "tunnels": _cols(
        ("capture", "string", "capture name"),
        ("tunnel_id", "string", "capture-scoped id of the HBONE connection"),
        ("conn_id", "Int64", "connections.conn_id of the carrying TCP connection"),
        ("encap", "string", "tunnels around the TCP connection"),
        ("client", "string", "ip:port of the TLS client"),
        ("server", "string", "ip:port of the TLS server (normally :15008)"),
        ("start", TS, "first packet"),
        ("end", TS, "last packet"),
        ("tls_version", "string", "negotiated TLS version"),
        ("cipher_suite", "string", "negotiated suite"),
        ("alpn", "string", "negotiated ALPN"),
        ("sni", "string", "server name, if any"),
        ("decrypted", "boolean", "whether the records could be decrypted"),
        ("why_not", "string", "why not decrypted"),
        ("client_spiffe", "string", "SPIFFE URI SAN in the client certificate"),
        ("server_spiffe", "string", "SPIFFE URI SAN in the server certificate"),
        ("streams", "Int64", "CONNECT streams seen"),
        ("bytes_c2s", "Int64", "TCP payload bytes client to server"),
        ("bytes_s2c", "Int64", "TCP payload bytes server to client"),
        ("evidence", "string", "why the connection is taken as HBONE: connect (a CONNECT stream was seen), port "
                               "(TLS to 15008, not decrypted), nested-tls-h2 (TLS with ALPN h2 inside a CONNECT stream)"),
        ("depth", "Int64", "0 for a tunnel over TCP; 1+ for a tunnel inside another tunnel's stream (double HBONE)"),
        ("parent_tunnel_id", "string", "for a nested tunnel: the tunnel whose CONNECT stream carries it"),
        ("parent_stream_id", "Int64", "for a nested tunnel: that CONNECT stream's id"),
        ("records", "Int64", "TLS records seen (the record timeline is available without keys)"),
        ("client_random", "string", "ClientHello random (hex): the key of key log lines (not a secret)"),
        ("client_name", "string", K8S_NAME.format("client")),
        ("server_name", "string", K8S_NAME.format("server")),
        ("client_expected_spiffe", "string", "SPIFFE id the client's pod should present (--k8s; empty for a "
                                             "ztunnel, which presents the identity of the workload it carries)"),
        ("server_expected_spiffe", "string", "SPIFFE id the server's pod should present (--k8s)"),
        ("identity_check", "string", "ok or mismatch: certificate identities against the pods' service accounts"),
    ),
    "streams": _cols(
        ("capture", "string", "capture name"),
        ("tunnel_id", "string", "tunnels.tunnel_id"),
        ("stream_id", "Int64", "HTTP/2 stream id"),
        ("method", "string", ":method"),
        ("authority", "string", ":authority"),
        ("original_dst", "string", "x-envoy-original-dst-host, else :authority"),
        ("forwarded_for", "string", "the for= address of the forwarded header"),
        ("traceparent", "string", "traceparent header"),
        ("trace_id", "string", "trace id from traceparent"),
        ("baggage", "string", "baggage header"),
        ("headers", "object", "all request headers as a dict (repeated names joined by ', ')"),
        ("response_headers", "object", "all response headers as a dict"),
        ("status", "Int64", ":status of the response"),
        ("request_ts", TS, "request HEADERS"),
        ("response_ts", TS, "response HEADERS"),
        ("first_data_c2s_ts", TS, "first DATA client to server"),
        ("first_data_s2c_ts", TS, "first DATA server to client"),
        ("end_ts", TS, "when the stream ended"),
        ("end_reason", "string", "end_stream, rst_stream:<code>, goaway, capture_end"),
        ("bytes_c2s", "Int64", "tunnelled bytes client to server"),
        ("bytes_s2c", "Int64", "tunnelled bytes server to client"),
        ("inner", "string", "what the tunnelled bytes were: http1, tls, hbone, proxy-v2, opaque"),
        ("proxy_src", "string", "source ip:port of a PROXY v2 header at the start of the tunnelled bytes"),
        ("proxy_dst", "string", "destination ip:port of that PROXY v2 header"),
        ("peer_identity", "string", "PROXY v2 TLV 0xD0: the source SPIFFE id Istio passes to the waypoint"),
        ("original_dst_name", "string", K8S_NAME.format("original_dst")),
    ),
    "requests": _cols(
        ("capture", "string", "capture name"),
        ("conn_id", "Int64", "connections.conn_id for plain TCP"),
        ("tunnel_id", "string", "tunnel when inside one"),
        ("stream_id", "Int64", "stream when inside one"),
        ("method", "string", "request method"),
        ("host", "string", "Host header"),
        ("path", "string", "request target"),
        ("status", "Int64", "response status"),
        ("request_ts", TS, "first byte of the request"),
        ("response_ts", TS, "first byte of the response"),
        ("client", "string", "ip:port of the client of the TCP connection carrying the request (outermost)"),
        ("server", "string", "ip:port of the server of that TCP connection"),
        ("client_name", "string", K8S_NAME.format("client")),
        ("server_name", "string", K8S_NAME.format("server")),
    ),
    "flows": _cols(
        ("flow_id", "Int64", "logical connection number"),
        ("client", "string", "ip:port of the client application (from its TCP connection or forwarded: for=)"),
        ("original_dst", "string", "ip:port the client addressed (e.g. the Service ClusterIP:port)"),
        ("dst_pod", "string", "ip:port of the destination pod when known"),
        ("hops", "Int64", "hops found (see the hops table)"),
        ("path", "string", "the hops, in order: 'pod-a -> ztunnel-a | ztunnel-a -> ztunnel-b | ...'"),
        ("hbone_client", "string", "ip:port of the first HBONE hop's TCP client"),
        ("hbone_server", "string", "ip:port of the first HBONE hop's TCP server (normally :15008)"),
        ("stream_id", "Int64", "CONNECT stream id on the first HBONE hop"),
        ("tunnel_ids", "string", "per HBONE hop (' | '), the capture-scoped tunnel ids 'capture:tunnel_id' (';')"),
        ("stream_ids", "string", "CONNECT stream id per HBONE hop, ';'-separated"),
        ("status", "Int64", ":status of the first hop's CONNECT response"),
        ("trace_id", "string", "trace id of the first hop's traceparent"),
        ("start", TS, "first event of the flow (corrected clock)"),
        ("end", TS, "last event of the flow (corrected clock)"),
        ("bytes_c2s", "Int64", "application bytes client to server"),
        ("bytes_s2c", "Int64", "application bytes server to client"),
        ("outcome", "string", "ok, refused, reset, timeout, incomplete (as the client saw it)"),
        ("last_seen", "string", "the last hop where the flow was seen"),
        ("match", "string", "exact (decrypted headers and tunnelled bytes), inferred (timing and sizes), "
                            "unmatched (a connection tied to nothing)"),
        ("confidence", "float64", "0-1; without keys: from the evidence and the margin over the best alternative "
                                  "(ambiguous matches <= 0.5)"),
        ("match_reason", "string", "how the client connection was tied: forwarded (for= header), content "
                                   "(tunnelled request and sizes), timing; without keys ('keyless: ...') the "
                                   "evidence, the margin or 'ambiguous: ...' naming the competitor, and events "
                                   "whose record another flow's could replace ('time ambiguous: ...')"),
        ("client_name", "string", K8S_NAME.format("client")),
        ("original_dst_name", "string", K8S_NAME.format("original_dst") + ", e.g. productpage.default:9080"),
        ("dst_pod_name", "string", K8S_NAME.format("dst_pod")),
        ("client_node", "string", "node of the client pod (--k8s)"),
        ("dst_node", "string", "node of the destination pod (--k8s)"),
        ("client_identity", "string", "SPIFFE id the client pod should present (--k8s)"),
        ("dst_identity", "string", "SPIFFE id the destination pod should present (--k8s)"),
    ),
    "hops": _cols(
        ("flow_id", "Int64", "flows.flow_id"),
        ("hop", "string", "'pod-a -> ztunnel-a', 'ztunnel-a -> ztunnel-b', 'ztunnel-b -> pod-b', waypoint hops"),
        ("hop_index", "Int64", "position of the hop in the flow, from 0"),
        ("kind", "string", "tcp or hbone"),
        ("connection", "string", "the hop's TCP connection 'client > server'"),
        ("tunnel_ids", "string", "HBONE hops: capture-scoped tunnel ids 'capture:tunnel_id', ';'-separated"),
        ("stream_id", "Int64", "HBONE hops: CONNECT stream id"),
        ("event", "string", "syn, syn_ack, connect, connect_response, first_request_byte, first_response_byte, "
                            "fin (client to server FIN or END_STREAM), fin_s2c"),
        ("direction", "string", "c2s or s2c: which way the event travels over the hop"),
        ("src_capture", "string", "capture at the sending end of the hop for this event"),
        ("src_ts", TS, "time at the sending end (corrected to the reference clock)"),
        ("src_ts_raw", TS, "time at the sending end as captured"),
        ("dst_capture", "string", "capture at the receiving end"),
        ("dst_ts", TS, "time at the receiving end (corrected)"),
        ("dst_ts_raw", TS, "time at the receiving end as captured"),
        ("latency_ms", "float64", "dst_ts - src_ts: time the event took across the hop"),
        ("since_start_ms", "float64", "src_ts relative to the flow's start"),
        ("captures", "Int64", "captures that saw this event"),
        ("connection_names", "string", "the connection with Kubernetes names for its ends (--k8s)"),
        ("inferred", "boolean", "the event's time was inferred without keys from the TLS record that most likely "
                                "carried it (keyless HBONE); false for observed events"),
    ),
    "clock": _cols(
        ("capture", "string", "capture name"),
        ("node", "string", "node (from the capture point, else placed from addresses or shared traffic)"),
        ("node_reason", "string", "why this node"),
        ("clock_group", "string", "captures sharing a clock: the node, else the capture itself"),
        ("reference", "boolean", "whether this is the reference clock"),
        ("offset_ms", "float64", "this clock minus the reference clock (file time = true time + offset)"),
        ("uncertainty_ms", "float64", "half the width of the offset bracket, added along the chain"),
        ("drift_ppm", "float64", "estimated drift of this clock against the last link's (ppm; not corrected; "
                                 "empty when the shared traffic spans under 2 s)"),
        ("via", "string", "chain of clock groups the offset was carried through; 'causal' when bracketed by "
                          "server connections opened between a CONNECT and its response; 'unconnected' if none"),
        ("method", "string", "how it was estimated: connections, packet pairs, captures compared"),
        ("connections", "Int64", "connections seen both ways used for the last link"),
        ("packets", "Int64", "packet pairs used for the last link"),
        ("first_ts_raw", TS, "first packet, as captured"),
        ("last_ts_raw", TS, "last packet, as captured"),
        ("first_ts", TS, "first packet, corrected"),
        ("last_ts", TS, "last packet, corrected"),
    ),
    "latency": _cols(
        ("hop", "string", "hops.hop"),
        ("hop_index", "Int64", "lowest position of the hop in its flows"),
        ("event", "string", "hops.event"),
        ("count", "Int64", "events with a time at both ends"),
        ("p50_ms", "float64", "median latency across the hop"),
        ("p90_ms", "float64", "90th percentile"),
        ("p99_ms", "float64", "99th percentile"),
        ("max_ms", "float64", "maximum"),
        ("mean_ms", "float64", "mean"),
        ("min_ms", "float64", "minimum"),
    ),
    "tunnel_records": _cols(
        ("capture", "string", "capture name"),
        ("tunnel_id", "string", "tunnels.tunnel_id of an HBONE connection that was not decrypted"),
        ("record", "int64", "position in the connection's TLS record timeline"),
        ("direction", "string", "c2s (TLS client to server) or s2c"),
        ("ts_first", TS, "capture time of the record's first byte"),
        ("ts_last", TS, "capture time of the record's last byte"),
        ("content_type", "Int64", "TLS record content type (23 application data, 22 handshake, ...)"),
        ("length", "Int64", "record length without its 5-byte header (TLS 1.3: HTTP/2 bytes + 17)"),
        ("kind", "string", "inferred content: handshake, change_cipher_spec, alert, preface_settings, settings, "
                           "settings_ack, headers (a new stream), response, data, end_stream, control "
                           "(WINDOW_UPDATE or RST_STREAM), ping, ping_ack, goaway"),
        ("payload", "Int64", "HTTP/2 bytes; for data, estimated tunnelled bytes (minus frame headers)"),
        ("stream", "Int64", "inferred stream number (1, 2, ...) of a headers / response record"),
        ("stream_id", "Int64", "inferred HTTP/2 stream id, when the connection was seen from its handshake"),
    ),
}


def columns(name: str) -> list[str]:
    return [c.name for c in SCHEMAS[name]]


def dtypes(name: str) -> dict[str, str]:
    return {c.name: c.dtype for c in SCHEMAS[name]}


_EMPTY: dict = {}
_INTEGER_DTYPES = frozenset({"Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64"})


def empty(name: str):
    """The table with its declared columns and no rows (a copy of one made once per table: building it costs
    ~3 ms, and analyses ask for many)."""
    import pandas as pd

    if name not in _EMPTY:
        _EMPTY[name] = pd.DataFrame({c.name: pd.Series([], dtype=c.dtype) for c in SCHEMAS[name]})
    return _EMPTY[name].copy()


def frame(name: str, data: Mapping[str, Any]):
    """Build table `name` from columns (sequences or numpy arrays); missing columns are all-NA.

    Extra keys not in the schema are rejected: a table holds exactly its declared columns.
    """
    import numpy as np
    import pandas as pd

    schema = SCHEMAS[name]
    extra = set(data) - {c.name for c in schema}
    if extra:
        raise KeyError(f"columns not declared for table {name!r}: {sorted(extra)}")
    n = None
    for v in data.values():
        n = len(v)
        break
    if n is None or n == 0:
        return empty(name)
    out = {}
    for c in schema:
        if c.name in data:
            v = data[c.name]
            if c.dtype == TS:
                kind = getattr(getattr(v, "dtype", None), "kind", "")
                if kind == "M":             # datetime64 with or without a zone: no object round trip
                    out[c.name] = pd.Series(pd.to_datetime(v, utc=True))
                    continue
                arr = np.asarray(v)
                if arr.dtype.kind in "iu":
                    s = pd.Series(pd.to_datetime(arr.astype("int64"), unit="ns", utc=True))
                    s[arr < 0] = pd.NaT
                    out[c.name] = s
                    continue
                out[c.name] = pd.Series(pd.to_datetime(v, utc=True))
                continue
            if isinstance(v, pd.Series):
                out[c.name] = v.astype(c.dtype)
            elif isinstance(v, list) and c.dtype in _INTEGER_DTYPES:
                # as objects: a list of integers with None would become float64 first and lose what is over 2**53
                out[c.name] = pd.Series(v, dtype=object).astype(c.dtype)
            else:
                out[c.name] = pd.Series(v).astype(c.dtype)
        else:
            out[c.name] = pd.Series([pd.NA] * n, dtype=c.dtype if c.dtype != TS else TS)
    df = pd.DataFrame({k: s.reset_index(drop=True) for k, s in out.items()})
    return df


def describe(name: str):
    """Documentation of a table as a DataFrame (column, dtype, meaning)."""
    import pandas as pd

    return pd.DataFrame([(c.name, c.dtype, c.doc) for c in SCHEMAS[name]], columns=["column", "dtype", "meaning"])


def concat(name: str, frames: list):
    """Concatenate frames of table `name`, keeping categorical columns categorical and dtypes as declared."""
    import pandas as pd
    from pandas.api.types import union_categoricals

    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return empty(name)
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    out = {}
    for c in SCHEMAS[name]:
        cols = [f[c.name] for f in frames]
        if c.dtype == "category":
            cats = []
            for s in cols:
                cat = pd.Categorical(s)
                cats.append(pd.Categorical.from_codes(cat.codes, categories=pd.Index(cat.categories, dtype=object)))
            out[c.name] = pd.Series(union_categoricals(cats, ignore_order=True))
        else:
            out[c.name] = pd.concat(cols, ignore_index=True).astype(c.dtype)
    return pd.DataFrame(out)

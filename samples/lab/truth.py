"""Ground truth for one lab scenario: ``truth.json`` (schema in samples/README.md).

Two sources, kept apart and named in the file:

- the *logs* of the parts themselves (client, ztunnel A, waypoint, ztunnel B, server; JSON lines
  written at the moment of each event): which client connection rode which HBONE connection and
  stream id, the CONNECT headers each proxy sent, the statuses, bytes and times;
- the *captures*, read with tshark (with the scenario's key log): the time and frame number of
  key packets of every leg at every capture point where that leg is visible.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import json
import subprocess
from pathlib import Path

SCHEMA = "hbonecap-lab-truth/1"
# tshark decodes VXLAN on 4789 only; the in-pod VXLAN overlay (flannel style) uses 8472.
DECODE_AS = ["-d", "udp.port==8472,vxlan"]


def stamp(ns: int | None) -> dict | None:
    if ns is None:
        return None
    iso = datetime.datetime.fromtimestamp(ns // 10**9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return {"ns": ns, "iso": f"{iso}.{ns % 10**9:09d}Z"}


def epoch_ns(text: str) -> int:
    sec, _, frac = text.partition(".")
    return int(sec) * 10**9 + int((frac + "000000000")[:9])


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- tshark

def tshark_packets(path: Path) -> list[dict]:
    """Every packet's TCP view (innermost IP header, so Geneve-encapsulated packets count too)."""
    fields = ["frame.number", "frame.time_epoch", "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport",
              "tcp.flags", "tcp.len", "geneve.vni"]
    cmd = ["tshark", "-r", str(path), "-n", *DECODE_AS, "-T", "fields", "-E", "separator=\t", "-E", "occurrence=l"]
    for name in fields:
        cmd += ["-e", name]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    packets = []
    for line in out.splitlines():
        cols = line.split("\t")
        if len(cols) < len(fields) or not cols[4]:
            continue
        packets.append({"frame": int(cols[0]), "ns": epoch_ns(cols[1]), "src": f"{cols[2]}:{cols[4]}",
                        "dst": f"{cols[3]}:{cols[5]}", "flags": int(cols[6], 16), "len": int(cols[7] or 0),
                        "vni": int(cols[8], 16) if cols[8] else None})
    return packets


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def tshark_http2(path: Path, keylog: Path) -> list[dict]:
    """Every decrypted HTTP/2 frame: frame number, time, TCP endpoints, stream, type, flags, headers."""
    cmd = ["tshark", "-r", str(path), "-n", *DECODE_AS, "-o", f"tls.keylog_file:{keylog}", "-d", "tcp.port==15008,tls",
           "-Y", "http2", "-T", "json", "--no-duplicate-keys", "-J", "frame ip tcp http2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    frames = []
    for packet in json.loads(out or "[]"):
        layers = packet["_source"]["layers"]
        ip = _as_list(layers.get("ip"))[-1]
        tcp = _as_list(layers.get("tcp"))[-1]
        base = {"frame": int(layers["frame"]["frame.number"]), "ns": epoch_ns(layers["frame"]["frame.time_epoch"]),
                "src": f"{ip['ip.src']}:{tcp['tcp.srcport']}", "dst": f"{ip['ip.dst']}:{tcp['tcp.dstport']}"}
        for layer in _as_list(layers.get("http2")):
            for stream in _as_list(layer.get("http2.stream")):
                if "http2.type" not in stream:
                    continue
                headers = [[h.get("http2.header.name"), h.get("http2.header.value")]
                           for h in _as_list(stream.get("http2.header"))]
                frames.append({**base, "stream_id": int(stream["http2.streamid"]), "type": int(stream["http2.type"]),
                               "flags": int(stream["http2.flags"], 16), "length": int(stream["http2.length"]),
                               "headers": headers})
    return frames


# --------------------------------------------------------------------------- anchors

SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def tcp_anchors(packets: list[dict], client: str, server: str, redirected_to: str | None = None) -> dict:
    """SYN, SYN-ACK, first payload each way, FIN each way, first RST of one TCP connection.

    With redirected_to (nftables REDIRECT seen on the client pod's lo), the client's packets go to
    redirected_to while the replies come from server (the original destination): one-way tuples."""
    anchors: dict = {}
    n_c2s = n_s2c = 0
    to = redirected_to or server

    def put(name: str, pkt: dict) -> None:
        anchors.setdefault(name, {"frame": pkt["frame"], **stamp(pkt["ns"])})

    for pkt in packets:
        if pkt["src"] == client and pkt["dst"] == to:
            c2s = True
        elif pkt["src"] == server and pkt["dst"] == client:
            c2s = False
        else:
            continue
        if c2s:
            n_c2s += 1
        else:
            n_s2c += 1
        flags = pkt["flags"]
        if flags & SYN:
            put("syn" if c2s else "syn_ack", pkt)
        if pkt["len"] > 0:
            put("first_data_c2s" if c2s else "first_data_s2c", pkt)
        if flags & FIN:
            put("fin_c2s" if c2s else "fin_s2c", pkt)
        if flags & RST:
            put("rst_c2s" if c2s else "rst_s2c", pkt)
    if not anchors:
        return {}
    anchors["packets_c2s"] = n_c2s
    anchors["packets_s2c"] = n_s2c
    return anchors


H2_DATA, H2_HEADERS, H2_RST_STREAM = 0, 1, 3
END_STREAM = 0x1


def stream_anchors(frames: list[dict], client: str, server: str, stream_id: int) -> dict:
    """CONNECT HEADERS, response HEADERS, first non-empty DATA each way, END_STREAM each way, RST_STREAM."""
    anchors: dict = {}

    def put(name: str, frame: dict, **extra) -> None:
        anchors.setdefault(name, {"frame": frame["frame"], **stamp(frame["ns"]), **extra})

    for fr in frames:
        if fr["stream_id"] != stream_id:
            continue
        if fr["src"] == client and fr["dst"] == server:
            c2s = True
        elif fr["src"] == server and fr["dst"] == client:
            c2s = False
        else:
            continue
        if fr["type"] == H2_HEADERS:
            if c2s:
                put("connect", fr)
            else:
                put("response", fr)
        if fr["type"] == H2_DATA and fr["length"] > 0:
            put("first_data_c2s" if c2s else "first_data_s2c", fr)
        if fr["type"] in (H2_DATA, H2_HEADERS) and fr["flags"] & END_STREAM:
            put("end_stream_c2s" if c2s else "end_stream_s2c", fr)
        if fr["type"] == H2_RST_STREAM:
            put("rst_stream_c2s" if c2s else "rst_stream_s2c", fr)
    return anchors


# --------------------------------------------------------------------------- build

def trace_id(headers) -> str | None:
    """The W3C trace id of a CONNECT's traceparent (what ztunnel logs as id=), or None."""
    for name, value in headers or []:
        if name == "traceparent":
            parts = value.split("-")
            return parts[1] if len(parts) == 4 else None
    return None


def build(run, points: dict, started: int, ended: int) -> dict:
    logs = run.out / "logs"
    client_log = [r for r in read_jsonl(logs / "client.jsonl") if r["kind"] == "client_conn"]
    zta_log = read_jsonl(logs / "ztunnel-a.jsonl")
    wp_log = read_jsonl(logs / "waypoint.jsonl")
    ztb_log = read_jsonl(logs / "ztunnel-b.jsonl")
    server_log = [r for r in read_jsonl(logs / "server.jsonl") if r["kind"] == "server_conn"]
    zta_conns = {r["client"]: r for r in zta_log if r["kind"] == "client_conn"}
    wp_streams = {(r["hbone"]["remote"], r["stream_id"]): r for r in wp_log if r["kind"] == "stream"}
    ztb_streams = {(r["hbone"]["remote"], r["stream_id"]): r for r in ztb_log if r["kind"] == "stream"}
    servers = {r["peer"]: r for r in server_log}

    keylog = run.out / "keylog.txt"
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        packet_jobs = {name: pool.submit(tshark_packets, run.out / p["file"]) for name, p in points.items()}
        h2_jobs = {name: pool.submit(tshark_http2, run.out / p["file"], keylog) for name, p in points.items()}
        packets = {name: job.result() for name, job in packet_jobs.items()}
        h2frames = {name: job.result() for name, job in h2_jobs.items()}
    for name, p in points.items():
        p["packets"] = len(packets[name])
        p["decrypted_http2_frames"] = len(h2frames[name])

    def tcp_leg(name: str, kind: str, client: str, server: str, logged_by: list[str], **extra) -> dict:
        seen = {pt: a for pt in points
                if (a := tcp_anchors(packets[pt], client, server, extra.get("redirected_to")))}
        return {"name": name, "kind": kind, "client": client, "server": server, "logged_by": logged_by,
                **extra, "packets": seen}

    def hbone_hop(name: str, client: str, server: str, stream_id: int, headers, status, new: bool,
                  logged_by: list[str]) -> dict:
        seen = {}
        for pt in points:
            anchors = stream_anchors(h2frames[pt], client, server, stream_id)
            if anchors:
                seen[pt] = anchors
        return {"name": name, "kind": "hbone", "client": client, "server": server, "stream_id": stream_id,
                "new_hbone_connection": new, "request_headers": headers, "status": status,
                "trace_id": trace_id(headers), "logged_by": logged_by, "packets": seen}

    services = run.services()
    inpod = bool(run.spec.get("inpod"))
    connections = []
    for rec in sorted(client_log, key=lambda r: r["index"]):
        svc = services.get(rec["dst"], {})
        expected_fail = svc.get("name") == "closed"
        conn = {
            "id": f"c{rec['index']}", "step": rec["step"], "client": rec.get("local"),
            "original_dst": rec["dst"], "service": svc.get("name"), "backend": svc.get("backend"),
            "via_waypoint": svc.get("waypoint"), "request": f"GET {rec['path']}",
            "expected_outcome": "reset" if expected_fail else "ok",
            "expected_hbone_status": 503 if expected_fail else 200,
            "outcome": rec["outcome"], "http_status": rec.get("status"),
            "start": stamp(rec["start_ns"]), "connected": stamp(rec.get("connected_ns")),
            "first_response_byte": stamp(rec.get("first_byte_ns")), "end": stamp(rec["end_ns"]),
            "bytes_client_to_server": rec["bytes_sent"], "bytes_server_to_client": rec["bytes_received"],
            "hops": [],
        }
        zta = zta_conns.get(rec.get("local"))
        if zta is None:
            conn["problem"] = "no ztunnel-a record for this client connection"
            connections.append(conn)
            continue
        if inpod:
            conn["hops"].append(tcp_leg(
                "client->ztunnel-a", "tcp", zta["client"], zta["original_dst"], ["client", "ztunnel-a"],
                redirected_to=zta["accepted_on"], note="in-pod nftables REDIRECT inside pod A: the client's "
                "packets go to redirected_to (ztunnel's 127.0.0.1:15001, on pod A's lo), the replies come "
                "from the original destination (ClusterIP)"))
        else:
            conn["hops"].append(tcp_leg("client->ztunnel-a", "tcp", zta["client"], zta["original_dst"],
                                        ["client", "ztunnel-a"], note="TPROXY: the server side is the original "
                                        "destination (ClusterIP), terminated by ztunnel A"))
        hop = hbone_hop("ztunnel-a->" + ("waypoint" if zta.get("via_waypoint") else "ztunnel-b"),
                        zta["hbone"]["local"], zta["hbone"]["remote"], zta["stream_id"], zta["request_headers"],
                        zta.get("status"), zta.get("hbone_new"), ["ztunnel-a"])
        conn["hops"].append(hop)
        last_client, last_stream = zta["hbone"]["local"], zta["stream_id"]
        if zta.get("via_waypoint"):
            wp = wp_streams.get((last_client, last_stream))
            if wp is not None:
                hop["logged_by"].append("waypoint")
                if "upstream_hbone" in wp:
                    conn["hops"].append(hbone_hop(
                        "waypoint->ztunnel-b", wp["upstream_hbone"]["local"], wp["upstream_hbone"]["remote"],
                        wp["upstream_stream_id"], wp["upstream_request_headers"], wp.get("upstream_status"),
                        wp.get("upstream_hbone_new"), ["waypoint"]))
                    last_client, last_stream = wp["upstream_hbone"]["local"], wp["upstream_stream_id"]
        ztb = ztb_streams.get((last_client, last_stream))
        if ztb is not None:
            conn["hops"][-1]["logged_by"].append("ztunnel-b")
            conn["hops"][-1]["status_sent_by_ztunnel_b"] = ztb.get("status")
            if "upstream" in ztb:
                server = servers.get(ztb["upstream"]["local"])
                extra = {"spoofed_source": True, "note": "in-pod ztunnel B -> app over pod B's lo, source "
                         "= the client pod's IP (IP_TRANSPARENT), port chosen by the kernel"} if inpod else {}
                conn["hops"].append(tcp_leg("ztunnel-b->pod-b", "tcp", ztb["upstream"]["local"],
                                            ztb["upstream"]["remote"],
                                            ["ztunnel-b"] + (["server"] if server else []),
                                            server_request=(server or {}).get("request"), **extra))
            elif "upstream_error" in ztb:
                conn["hops"][-1]["upstream_error"] = ztb["upstream_error"]
        conn["hbone_status"] = zta.get("status")
        conn["trace_id"] = trace_id(zta["request_headers"])
        connections.append(conn)

    hbone_connections = []
    for log_name, records in (("ztunnel-a", zta_log), ("waypoint", wp_log)):
        for rec in records:
            if rec["kind"] != "hbone_open" or not rec.get("client_side"):
                continue
            client, server = rec["hbone"]["local"], rec["hbone"]["remote"]
            streams = sorted({h["stream_id"] for c in connections for h in c["hops"]
                              if h["kind"] == "hbone" and h["client"] == client and h["server"] == server})
            closed = next((r["t_ns"] for r in records if r["kind"] == "hbone_close"
                           and r["hbone"] == rec["hbone"]), None)
            seen = {pt: a for pt in points if (a := tcp_anchors(packets[pt], client, server))}
            hbone_connections.append({"client": client, "server": server, "opened_by": log_name,
                                      "tls": rec["tls"], "opened": stamp(rec["t_ns"]), "closed": stamp(closed),
                                      "stream_ids": streams, "packets": seen})

    offsets = {}
    for name, p in points.items():
        if p["clock_offset_ns"]:
            node = offsets.setdefault(p["node"], {"offset_ns": p["clock_offset_ns"],
                                                  "offset_s": p["clock_offset_ns"] / 1e9,
                                                  "applied_with": p["clock_offset_applied_with"],
                                                  "meaning": "file time = true time + offset_ns",
                                                  "capture_points": []})
            node["capture_points"].append(name)

    from lab import IDENTITIES, SERVICES, tool_versions  # noqa: E402 (lab.py is the caller)
    import topology as topo
    topology = {
        "nodes": {"node-a": topo.NODE_A, "node-b": topo.NODE_B},
        "pods": {"pod-a": {"ip": topo.POD_A, "node": "node-a", "identity": IDENTITIES["ztunnel-a"]},
                 "pod-b": {"ip": topo.POD_B, "node": "node-b", "identity": IDENTITIES["ztunnel-b"],
                           "listens": [8080]},
                 "ztunnel-a": {"ip": topo.ZTUNNEL_A, "node": "node-a"},
                 "ztunnel-b": {"ip": topo.ZTUNNEL_B, "node": "node-b"},
                 "waypoint": {"ip": topo.WAYPOINT, "node": "node-b", "identity": IDENTITIES["waypoint"]}},
        "services": SERVICES,
        "tunnels": [
            {"name": "istioout", "vni": topo.VNI_OUT, "udp_port": 6081, "node_end": "node-a istioout "
             "192.168.127.1/30 (outer 10.244.1.1)", "ztunnel_end": "ztunnel-a pistioout 192.168.127.2/30 "
             "(outer 10.244.1.3)"},
            {"name": "istioin", "vni": topo.VNI_IN, "udp_port": 6081, "node_end": "node-b istioin "
             "192.168.126.1/30 (outer 10.244.2.1)", "ztunnel_end": "ztunnel-b pistioin 192.168.126.2/30 "
             "(outer 10.244.2.3)"}],
    }
    if inpod:
        # Era C: no ztunnel pods and no Geneve; the ztunnels' sockets live in the app pods.
        topology["pods"] = {k: v for k, v in topology["pods"].items() if k in ("pod-a", "pod-b")}
        topology["services"] = {k: v for k, v in SERVICES.items() if "waypoint" not in v}
        topology["tunnels"] = []
        topology["ztunnels"] = {
            "ztunnel-a": {"inpod": "pod-a", "ip": topo.POD_A, "node": "node-a", "outbound": "127.0.0.1:15001",
                          "identity": IDENTITIES["ztunnel-a"]},
            "ztunnel-b": {"inpod": "pod-b", "ip": topo.POD_B, "node": "node-b", "inbound": f"{topo.POD_B}:15008",
                          "identity": IDENTITIES["ztunnel-b"]}}
        topology["inpod_rules"] = {"ztunnel_mark": hex(topo.ZTUNNEL_MARK), "conn_mark": hex(topo.CONN_MARK),
                                   "route_table": topo.INPOD_ROUTE_TABLE,
                                   "redirect": "nat output: tcp not marked 0x539, not to 127/8 or the pod "
                                               "itself -> redirect to :15001"}
        if run.spec.get("overlay") == "vxlan":
            topology["overlay"] = {"kind": "vxlan", "device": "vxlan0", "vni": topo.VXLAN_VNI,
                                   "udp_port": topo.VXLAN_PORT, "ends": {"node-a": topo.NODE_A, "node-b": topo.NODE_B},
                                   "device_ips": topo.VXLAN_NODE_IP}
    return {
        "schema": SCHEMA,
        "scenario": run.name,
        "description": run.spec["description"],
        "dialect": run.spec["dialect"],
        "spoof_source": bool(run.spec.get("spoof_source")),
        "generated_by": "samples/lab/lab.py",
        "run": {"start": stamp(started), "end": stamp(ended), "tools": tool_versions()},
        "keylog": "keylog.txt",
        "logs": sorted(f"logs/{p.name}" for p in logs.glob("*.jsonl")),
        "redirection": "inpod" if inpod else "geneve",
        "overlay": run.spec.get("overlay") if inpod else None,
        "topology": topology,
        "capture_points": points,
        "clock_offsets": offsets,
        "connections": connections,
        "hbone_connections": hbone_connections,
    }

"""Check the ambient-lab samples (samples/<scenario>/) against their truth.json, with tshark.

Every expectation comes from the scenario's truth.json (written by samples/lab/lab.py from the
proxies' and apps' own logs); the captures are read independently with tshark, decrypting HBONE
with the scenario's key log. A regenerated lab (``sudo python3 samples/lab/lab.py``) is checked
the same way as the committed samples.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

# HBONECAP_LAB_SAMPLES checks another lab output directory (e.g. `lab.py --out /tmp/x`).
SAMPLES = Path(os.environ.get("HBONECAP_LAB_SAMPLES") or Path(__file__).resolve().parent.parent / "samples")
TRUTH_FILES = sorted(SAMPLES.glob("*/truth.json"))
TSHARK = shutil.which("tshark")

pytestmark = [pytest.mark.lab, pytest.mark.tshark]


def _scenarios():
    if not TRUTH_FILES:
        return [pytest.param(None, id="no-samples")]
    return [pytest.param(path, id=path.parent.name) for path in TRUTH_FILES]


@pytest.fixture(params=_scenarios())
def truth(request):
    if TSHARK is None:
        pytest.skip("tshark is not on PATH: the lab sample checks read the captures with tshark")
    if request.param is None:
        pytest.skip(f"no lab samples: no {SAMPLES}/*/truth.json (run sudo python3 samples/lab/lab.py)")
    data = json.loads(request.param.read_text())
    data["_dir"] = request.param.parent
    return data


# --------------------------------------------------------------------------- tshark helpers

def _tshark(*args: str) -> str:
    # VXLAN on 8472 (the in-pod overlay, flannel style): tshark decodes VXLAN on 4789 only.
    proc = subprocess.run([TSHARK, "-n", "-d", "udp.port==8472,vxlan", *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"tshark {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def _ns(text: str) -> int:
    sec, _, frac = text.partition(".")
    return int(sec) * 10**9 + int((frac + "000000000")[:9])


@functools.lru_cache(maxsize=None)
def packets(path: Path) -> list[dict]:
    """One tshark pass per file: time, innermost IP/TCP view, Geneve fields of every packet."""
    fields = ["frame.number", "frame.time_epoch", "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", "tcp.flags",
              "tcp.len", "ip.id", "tcp.seq_raw", "tcp.ack_raw", "geneve.vni", "udp.dstport", "geneve.proto_type",
              "vxlan.vni"]
    args = ["-r", str(path), "-T", "fields", "-E", "occurrence=l"]
    for name in fields:
        args += ["-e", name]
    rows = []
    for line in _tshark(*args).splitlines():
        c = dict(zip(fields, line.split("\t")))
        rows.append({"frame": int(c["frame.number"]), "ns": _ns(c["frame.time_epoch"]),
                     "tcp": bool(c["tcp.srcport"]),
                     "src": f"{c['ip.src']}:{c['tcp.srcport']}", "dst": f"{c['ip.dst']}:{c['tcp.dstport']}",
                     "flags": int(c["tcp.flags"] or "0", 16), "len": int(c["tcp.len"] or 0),
                     "seq": int(c["tcp.seq_raw"] or 0),
                     "key": (c["ip.src"], c["ip.dst"], c["tcp.srcport"], c["tcp.dstport"], c["ip.id"],
                             c["tcp.seq_raw"], c["tcp.ack_raw"], c["tcp.len"]),
                     "vni": int(c["geneve.vni"], 16) if c["geneve.vni"] else None,
                     "udp_dport": int(c["udp.dstport"]) if c["udp.dstport"] else None,
                     "geneve_proto": c["geneve.proto_type"],
                     "vxlan_vni": int(c["vxlan.vni"]) if c.get("vxlan.vni") else None})
    return rows


def frame_times(path: Path) -> dict[int, int]:
    return {p["frame"]: p["ns"] for p in packets(path)}


def geneve_packets(path: Path) -> list[tuple[int, int, str]]:
    return [(p["vni"], p["udp_dport"], p["geneve_proto"]) for p in packets(path) if p["vni"] is not None]


def tcp_packets(path: Path) -> list[dict]:
    return [p for p in packets(path) if p["tcp"]]


def _as_list(value):
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


@functools.lru_cache(maxsize=None)
def http2_frames(path: Path, keylog: Path) -> list[dict]:
    """Decrypted HTTP/2 HEADERS frames (one dict per frame, several per packet possible)."""
    out = _tshark("-r", str(path), "-o", f"tls.keylog_file:{keylog}", "-d", "tcp.port==15008,tls",
                  "-Y", "http2.type == 1", "-T", "json", "--no-duplicate-keys", "-J", "frame ip tcp http2")
    frames = []
    for packet in json.loads(out or "[]"):
        layers = packet["_source"]["layers"]
        ip = _as_list(layers["ip"])[-1]
        tcp = _as_list(layers["tcp"])[-1]
        for layer in _as_list(layers.get("http2")):
            for stream in _as_list(layer.get("http2.stream")):
                if "http2.type" not in stream:
                    continue
                frames.append({
                    "frame": int(layers["frame"]["frame.number"]),
                    "src": f"{ip['ip.src']}:{tcp['tcp.srcport']}", "dst": f"{ip['ip.dst']}:{tcp['tcp.dstport']}",
                    "stream_id": int(stream["http2.streamid"]), "type": int(stream["http2.type"]),
                    "flags": int(stream["http2.flags"], 16),
                    "headers": [(h["http2.header.name"], h["http2.header.value"])
                                for h in _as_list(stream.get("http2.header"))],
                })
    return frames


def payload_bytes(segments: list[dict]) -> int:
    """Distinct payload bytes of one direction (retransmitted ranges counted once)."""
    data = [p for p in segments if p["len"] > 0]
    if not data:
        return 0
    base = min(p["seq"] for p in data)  # lab transfers are far below 2**31: no wrap handling needed
    intervals = sorted(((p["seq"] - base) % 2**32, (p["seq"] - base) % 2**32 + p["len"]) for p in data)
    total, start, end = 0, *intervals[0]
    for lo, hi in intervals[1:]:
        if lo > end:
            total += end - start
            start, end = lo, hi
        else:
            end = max(end, hi)
    return total + end - start


def _file(truth: dict, point: str) -> Path:
    return truth["_dir"] / truth["capture_points"][point]["file"]


def _keylog(truth: dict) -> Path:
    return truth["_dir"] / truth["keylog"]


def _hbone_hops(truth: dict):
    for conn in truth["connections"]:
        for hop in conn["hops"]:
            if hop["kind"] == "hbone":
                yield conn, hop


# --------------------------------------------------------------------------- tests

def test_files_present(truth):
    assert truth["connections"], "truth lists no client connections"
    assert _keylog(truth).stat().st_size > 0
    for line in _keylog(truth).read_text().splitlines():
        label, client_random, secret = line.split(" ")
        assert label in {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                         "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"}
        assert re.fullmatch(r"[0-9a-f]{64}", client_random) and re.fullmatch(r"[0-9a-f]+", secret)
    for point, meta in truth["capture_points"].items():
        path = _file(truth, point)
        assert path.exists(), f"{point}: {path} missing"
        assert len(frame_times(path)) > 0, f"{point}: empty capture"


def test_interface_names_in_pcapng(truth):
    points = {p: m for p, m in truth["capture_points"].items() if m["format"] == "pcapng"}
    if not points:
        pytest.skip("this scenario has no pcapng captures")
    for point, meta in points.items():
        out = _tshark("-r", str(_file(truth, point)), "-T", "fields", "-e", "frame.interface_name", "-e", "sll.ifindex")
        counts: dict[str, int] = {}
        for line in out.splitlines():
            name, _ = line.split("\t")
            counts[name] = counts.get(name, 0) + 1
        assert counts == meta["interfaces"], point
        assert meta["linktype"] == "LINUX_SLL2"


def test_geneve_vnis(truth):
    for point, meta in truth["capture_points"].items():
        rows = geneve_packets(_file(truth, point))
        vnis = sorted({vni for vni, _, _ in rows})
        assert vnis == sorted(meta["geneve_vnis"]), f"{point}: VNIs {vnis}, truth {meta['geneve_vnis']}"
        tunnels = {t["vni"]: t for t in truth["topology"]["tunnels"]}
        for vni, port, proto in rows:
            assert port == tunnels[vni]["udp_port"], point
            assert proto == "0x6558", f"{point}: Geneve inner protocol {proto} is not Ethernet"


def test_vxlan_vnis(truth):
    """In-pod VXLAN variant: node NICs carry VXLAN (UDP 8472, the truth's VNI); elsewhere no VXLAN at all."""
    for point, meta in truth["capture_points"].items():
        rows = packets(_file(truth, point))
        vnis = sorted({p["vxlan_vni"] for p in rows if p["vxlan_vni"] is not None})
        assert vnis == sorted(meta.get("vxlan_vnis", [])), f"{point}: VXLAN VNIs {vnis}, truth {meta.get('vxlan_vnis')}"
        if vnis:
            assert all(p["udp_dport"] == truth["topology"]["overlay"]["udp_port"] for p in rows if p["vxlan_vni"])
            # Everything between the nodes is inside the overlay: no bare pod TCP on the node NIC.
            assert all(p["vxlan_vni"] is not None for p in rows if p["tcp"]), point


def test_connect_headers_and_status(truth):
    keylog = _keylog(truth)
    decrypted = {p: http2_frames(_file(truth, p), keylog) for p in truth["capture_points"]}
    for conn, hop in _hbone_hops(truth):
        seen_at = []
        for point, frames in decrypted.items():
            requests = [f for f in frames if f["type"] == 1 and f["stream_id"] == hop["stream_id"]
                        and f["src"] == hop["client"] and f["dst"] == hop["server"]]
            responses = [f for f in frames if f["type"] == 1 and f["stream_id"] == hop["stream_id"]
                         and f["src"] == hop["server"] and f["dst"] == hop["client"]]
            if not requests:
                continue
            seen_at.append(point)
            assert [list(h) for h in requests[0]["headers"]] == hop["request_headers"], (conn["id"], point)
            assert responses, f"{conn['id']} {hop['name']}: no response HEADERS at {point}"
            assert dict(responses[0]["headers"])[":status"] == str(hop["status"]), (conn["id"], point)
            anchors = hop["packets"][point]
            assert anchors["connect"]["frame"] == requests[0]["frame"], (conn["id"], point)
            assert anchors["response"]["frame"] == responses[0]["frame"], (conn["id"], point)
        assert seen_at, f"{conn['id']} {hop['name']}: CONNECT stream {hop['stream_id']} not found decrypted anywhere"
        assert sorted(seen_at) == sorted(p for p, a in hop["packets"].items() if "connect" in a)


def test_dialect_headers(truth):
    for conn, hop in _hbone_hops(truth):
        headers = dict(hop["request_headers"])
        assert headers[":method"] == "CONNECT"
        assert ":scheme" not in headers and ":path" not in headers
        if hop["name"].startswith("waypoint->"):
            # Envoy-originated HBONE: no extra headers, :authority is the backend pod address.
            assert set(headers) == {":method", ":authority"}
            assert headers[":authority"] == conn["backend"]
            continue
        expected_authority = conn["original_dst"] if conn["via_waypoint"] else conn["backend"]
        assert headers[":authority"] == expected_authority
        if truth["dialect"] == "envoy":
            assert headers["x-envoy-original-dst-host"] == headers[":authority"]
            assert "forwarded" not in headers and "traceparent" not in headers
        else:
            assert "x-envoy-original-dst-host" not in headers
            assert headers["forwarded"] == f'for="{conn["client"]}"'
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", headers["traceparent"])
            assert "k8s.namespace.name=" in headers["baggage"]


def test_hbone_source_address(truth):
    """Era A: HBONE leaves from the ztunnel pod's IP; era B (spoof_source): from the client pod's IP,
    and the replies come back to ztunnel A inside Geneve (a VNI on ztunnel A's eth0 besides the outbound one)."""
    pods = truth["topology"]["pods"]
    for conn, hop in _hbone_hops(truth):
        if not hop["name"].startswith("ztunnel-a->"):
            continue
        source_ip = hop["client"].rsplit(":", 1)[0]
        if truth.get("redirection") == "inpod":
            # Era C: HBONE leaves the client pod from its own IP to the destination pod IP:15008.
            assert source_ip == conn["client"].rsplit(":", 1)[0] == pods["pod-a"]["ip"], conn["id"]
            assert hop["server"] == f"{pods['pod-b']['ip']}:15008", conn["id"]
        elif truth.get("spoof_source"):
            assert source_ip == conn["client"].rsplit(":", 1)[0], conn["id"]
        else:
            assert source_ip == pods["ztunnel-a"]["ip"], conn["id"]
    if truth.get("spoof_source"):
        hb = truth["hbone_connections"][0]
        inbound_points = [p for p, m in truth["capture_points"].items()
                          if m["namespace"] == "hbl-ztunnel-a" and m["interface"] == "pistioin"]
        assert inbound_points, "era-B scenario without a capture on ztunnel A's pistioin"
        replies = [p for p in tcp_packets(_file(truth, inbound_points[0]))
                   if p["src"] == hb["server"] and p["dst"] == hb["client"]]
        assert replies, "no HBONE replies to the spoofed address inside the istioin tunnel"


def test_outcomes(truth):
    for conn in truth["connections"]:
        assert conn["outcome"] == conn["expected_outcome"], conn["id"]
        assert conn["hbone_status"] == conn["expected_hbone_status"], conn["id"]
        first_hop = next(h for h in conn["hops"] if h["kind"] == "hbone")
        assert first_hop["status"] == conn["expected_hbone_status"], conn["id"]


def test_client_leg_on_pod_a(truth):
    inpod = truth.get("redirection") == "inpod"
    # In-pod: the app's leg exists only on pod A's lo (REDIRECT to the in-pod ztunnel).
    point = next(p for p, m in truth["capture_points"].items() if m["namespace"] == "hbl-pod-a"
                 and (m["interface"] == "lo" or not inpod))
    packets = tcp_packets(_file(truth, point))
    for conn in truth["connections"]:
        client, server = conn["client"], conn["original_dst"]
        to = conn["hops"][0].get("redirected_to") or server
        c2s = [p for p in packets if p["src"] == client and p["dst"] == to]
        s2c = [p for p in packets if p["src"] == server and p["dst"] == client]
        assert any(p["flags"] & 0x02 for p in c2s), f"{conn['id']}: no SYN {client} -> {server} at {point}"
        if truth["capture_points"][point]["format"] == "pcap":  # -i any shows each packet once per interface
            assert payload_bytes(c2s) == conn["bytes_client_to_server"], conn["id"]
            assert payload_bytes(s2c) == conn["bytes_server_to_client"], conn["id"]
        if conn["expected_outcome"] == "reset":
            assert any(p["flags"] & 0x04 for p in s2c), f"{conn['id']}: no RST from {server}"
        else:
            assert any(p["flags"] & 0x01 for p in s2c) and not any(p["flags"] & 0x04 for p in s2c), conn["id"]


def test_pooling(truth):
    """Client connections share HBONE connections: one TCP SYN per HBONE connection, distinct streams."""
    for hb in truth["hbone_connections"]:
        hops = [h for _, h in _hbone_hops(truth) if h["client"] == hb["client"] and h["server"] == hb["server"]]
        assert sorted(h["stream_id"] for h in hops) == hb["stream_ids"]
        assert len(set(hb["stream_ids"])) == len(hb["stream_ids"])
        assert all(s % 2 == 1 for s in hb["stream_ids"])  # client-initiated streams
        for point in hb["packets"]:
            rows = tcp_packets(_file(truth, point))
            c2s = [p for p in rows if p["src"] == hb["client"] and p["dst"] == hb["server"]]
            s2c = [p for p in rows if p["src"] == hb["server"] and p["dst"] == hb["client"]]
            # Tunnel devices carry one direction only: then the handshake packet of that direction.
            assert [p for p in c2s if p["flags"] & 0x02] if c2s else [p for p in s2c if p["flags"] & 0x12 == 0x12], \
                f"HBONE connection {hb['client']} -> {hb['server']}: no handshake at {point}"
            assert (len(c2s), len(s2c)) == (hb["packets"][point]["packets_c2s"], hb["packets"][point]["packets_s2c"])
    opened_by_a = [hb for hb in truth["hbone_connections"] if hb["opened_by"] == "ztunnel-a"]
    # Every client connection of a scenario goes to one destination, so ztunnel A uses one pooled connection.
    assert len(opened_by_a) == 1
    assert len(opened_by_a[0]["stream_ids"]) == len(truth["connections"])


def test_truth_packet_times_match_captures(truth):
    """Every key packet time in truth.json is the time of that frame in the file (after any clock shift)."""
    def check(point, anchors):
        times = frame_times(_file(truth, point))
        for name, anchor in anchors.items():
            if isinstance(anchor, dict):
                assert times[anchor["frame"]] == anchor["ns"], (point, name)

    for conn in truth["connections"]:
        for hop in conn["hops"]:
            for point, anchors in hop["packets"].items():
                check(point, anchors)
    for hb in truth["hbone_connections"]:
        for point, anchors in hb["packets"].items():
            check(point, anchors)


def test_clock_offset(truth):
    if not truth["clock_offsets"]:
        pytest.skip("no clock offset applied in this scenario")
    points = truth["capture_points"]
    for node, offset in truth["clock_offsets"].items():
        shifted = [p for p in offset["capture_points"] if points[p]["interface"] == "eth0"
                   and points[p]["namespace"] == f"hbl-{node}"]
        reference = [p for p, m in points.items() if m["clock_offset_ns"] == 0 and m["interface"] == "eth0"
                     and m["namespace"].startswith("hbl-node-")]
        assert shifted and reference, "need an underlay capture on both sides"
        topo = truth["topology"]
        on_node = {topo["nodes"][node]} | {pod["ip"] for pod in topo["pods"].values() if pod["node"] == node}
        a = {p["key"]: p["ns"] for p in tcp_packets(_file(truth, reference[0]))}
        forward, backward = [], []  # towards the shifted node / away from it
        for p in tcp_packets(_file(truth, shifted[0])):
            if p["key"] in a:
                delta = p["ns"] - a[p["key"]]
                (backward if p["src"].rsplit(":", 1)[0] in on_node else forward).append(delta)
        assert len(forward) > 10 and len(backward) > 10
        # NTP-style: the mean of both directions' delays cancels the (tiny) transit time.
        estimate = (statistics.median(forward) + statistics.median(backward)) / 2
        assert abs(estimate - offset["offset_ns"]) < 200_000, (estimate, offset["offset_ns"])
        assert all(abs(d - offset["offset_ns"]) < 2_000_000 for d in forward + backward)
        # The shift is large compared to the transit, so uncorrected node-B times are visibly wrong.
        assert abs(offset["offset_ns"]) > 1_000_000
    # The proxies' own (unshifted) log times agree with the corrected capture times.
    for conn, hop in _hbone_hops(truth):
        for point, anchors in hop["packets"].items():
            if "connect" in anchors and points[point]["clock_offset_ns"]:
                true_ns = anchors["connect"]["ns"] - points[point]["clock_offset_ns"]
                assert conn["start"]["ns"] < true_ns < conn["end"]["ns"], (conn["id"], point)


# --------------------------------------------------------------------------- era C (in-pod)

def _inpod(truth):
    if truth.get("redirection") != "inpod":
        pytest.skip("not an in-pod (era C) scenario")
    return truth["topology"]


def _point(truth, netns: str, iface: str) -> str:
    return next(p for p, m in truth["capture_points"].items()
                if m["namespace"] == f"hbl-{netns}" and m["interface"] == iface)


def test_inpod_redirect_one_way_tuples(truth):
    """Pod A's lo shows the REDIRECT's one-way tuples: client -> 127.0.0.1:15001, replies from the
    original destination (ClusterIP); pod A's eth0 never shows the app leg, only HBONE."""
    topo = _inpod(truth)
    lo = tcp_packets(_file(truth, _point(truth, "pod-a", "lo")))
    eth0 = tcp_packets(_file(truth, _point(truth, "pod-a", "eth0")))
    outbound = topo["ztunnels"]["ztunnel-a"]["outbound"]
    for conn in truth["connections"]:
        leg = conn["hops"][0]
        assert leg["name"] == "client->ztunnel-a" and leg["redirected_to"] == outbound
        syn = [p for p in lo if p["src"] == conn["client"] and p["dst"] == outbound and p["flags"] & 0x12 == 0x02]
        syn_ack = [p for p in lo if p["src"] == conn["original_dst"] and p["dst"] == conn["client"]
                   and p["flags"] & 0x12 == 0x12]
        assert syn and syn_ack, conn["id"]
        assert leg["packets"]["pod-a-lo"]["syn"]["frame"] == syn[0]["frame"]
        assert leg["packets"]["pod-a-lo"]["syn_ack"]["frame"] == syn_ack[0]["frame"]
        assert not [p for p in lo if p["src"] == outbound and p["dst"] == conn["client"]], conn["id"]
        assert not [p for p in eth0 if conn["client"] in (p["src"], p["dst"])], conn["id"]
    hbone_ports = {"15008"}
    for p in eth0:
        assert hbone_ports & {p["src"].rsplit(":", 1)[1], p["dst"].rsplit(":", 1)[1]}, p


def test_inpod_spoofed_server_leg(truth):
    """Pod B's lo: in-pod ztunnel -> app with the client pod IP as source; the HBONE peer address, the
    forwarded header's IP and the server's peer agree; pod B's eth0 shows HBONE only."""
    topo = _inpod(truth)
    lo = tcp_packets(_file(truth, _point(truth, "pod-b", "lo")))
    eth0 = tcp_packets(_file(truth, _point(truth, "pod-b", "eth0")))
    pod_a, pod_b = topo["pods"]["pod-a"]["ip"], topo["pods"]["pod-b"]["ip"]
    for conn in truth["connections"]:
        hbone = next(h for h in conn["hops"] if h["kind"] == "hbone")
        forwarded = dict(hbone["request_headers"])["forwarded"]
        assert forwarded == f'for="{conn["client"]}"'
        legs = [h for h in conn["hops"] if h["name"] == "ztunnel-b->pod-b"]
        if conn["expected_hbone_status"] != 200:
            assert not legs and "upstream_error" in hbone, conn["id"]
            continue
        (leg,) = legs
        assert leg["spoofed_source"] and leg["client"].rsplit(":", 1)[0] == pod_a, conn["id"]
        assert leg["client"] != conn["client"]  # the kernel picks a new port for the spoofed connection
        assert leg["server"] == f"{pod_b}:8080"
        assert leg["server_request"] == conn["request"] + " HTTP/1.1"
        c2s = [p for p in lo if p["src"] == leg["client"] and p["dst"] == leg["server"]]
        s2c = [p for p in lo if p["src"] == leg["server"] and p["dst"] == leg["client"]]
        assert c2s and s2c and c2s[0]["flags"] & 0x02, conn["id"]
        assert payload_bytes(s2c) == conn["bytes_server_to_client"], conn["id"]
        assert list(leg["packets"]) == ["pod-b-lo"], conn["id"]
    for p in eth0:
        assert "15008" in (p["src"].rsplit(":", 1)[1], p["dst"].rsplit(":", 1)[1]), p


def test_inpod_trace_ids(truth):
    """One fresh traceparent trace id per client connection, recorded as trace_id."""
    _inpod(truth)
    ids = []
    for conn in truth["connections"]:
        hbone = next(h for h in conn["hops"] if h["kind"] == "hbone")
        traceparent = dict(hbone["request_headers"])["traceparent"]
        assert conn["trace_id"] == hbone["trace_id"] == traceparent.split("-")[1], conn["id"]
        ids.append(conn["trace_id"])
    assert len(set(ids)) == len(ids)


def test_inpod_hop_order(truth):
    """Along one connection the key packets appear in path order, on one clock (one VM): client SYN on pod A's
    lo, CONNECT on pod A's eth0, node A, node B, pod B's eth0, then the spoofed SYN on pod B's lo, then the 200
    back at pod A's eth0; the node NIC copies trail the pod NIC copies by less than 1 ms."""
    _inpod(truth)
    for conn in truth["connections"]:
        client_leg, hbone = conn["hops"][0], conn["hops"][1]
        times = [client_leg["packets"]["pod-a-lo"]["syn"]["ns"]]
        times += [hbone["packets"][p]["connect"]["ns"] for p in ("pod-a-eth0", "node-a-eth0", "node-b-eth0", "pod-b-eth0")]
        if len(conn["hops"]) > 2:
            times.append(conn["hops"][2]["packets"]["pod-b-lo"]["syn"]["ns"])
        times.append(hbone["packets"]["pod-a-eth0"]["response"]["ns"])
        assert times == sorted(times), conn["id"]
        assert hbone["packets"]["pod-b-eth0"]["connect"]["ns"] - hbone["packets"]["pod-a-eth0"]["connect"]["ns"] < 1_000_000


def test_inpod_capture_complete(truth):
    """tcpdump lost nothing (the lab runs it in immediate mode since the in-pod scenarios): every packet the
    filter received was written (lo counts each packet twice, outgoing and incoming, and writes it once)."""
    _inpod(truth)
    for point, meta in truth["capture_points"].items():
        stats = " ".join(meta["tcpdump"])
        captured = int(re.search(r"(\d+) packets? captured", stats).group(1))
        received = int(re.search(r"(\d+) packets? received by filter", stats).group(1))
        dropped = int(re.search(r"(\d+) packets? dropped by kernel", stats).group(1))
        assert dropped == 0, point
        assert received == captured * (2 if meta["interface"] == "lo" else 1), (point, captured, received)
        assert captured == len(frame_times(_file(truth, point))), point

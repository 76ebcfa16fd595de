"""The full-analysis benchmark's capture set (benchmarks/mesh.py), small: tshark decrypts it with the generated key
log and sees the CONNECT headers, and hbonecap's correlation ties every generated connection into one exact flow
with its HBONE connection, stream id and trace id, with node B's clock offset recovered."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hbonecap
from hbonecap.analysis.correlation import correlate
from hbonecap.capture.points import parse_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mesh  # noqa: E402


@functools.lru_cache(maxsize=1)
def _set(directory: str):
    return mesh.generate(directory, mb=4, seed=7, streams_per_connection=6, offset_us=2_100,
                         largest=200_000)


@pytest.fixture(scope="module")
def mesh_set(tmp_path_factory):
    return _set(str(tmp_path_factory.mktemp("mesh")))


def test_files_and_truth(mesh_set):
    assert set(mesh_set.files) == set(mesh.CAPTURES)
    truth = json.loads((mesh_set.directory / "mesh.json").read_text())
    assert len(truth["connections"]) >= 6 and len(truth["hbone_connections"]) >= 2
    assert mesh_set.keylog.read_text().count("CLIENT_TRAFFIC_SECRET_0") == len(truth["hbone_connections"])
    # pooled: several streams per HBONE connection, odd client stream ids
    assert all(len(h["streams"]) > 1 and all(s % 2 == 1 for s in h["streams"]) for h in truth["hbone_connections"])


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_decrypts_with_the_key_log(mesh_set):
    truth = mesh_set.truth
    out = subprocess.run(
        ["tshark", "-n", "-o", f"tls.keylog_file:{mesh_set.keylog}", "-r", str(mesh_set.files["node-a-eth0"]),
         "-Y", "http2.type == 1", "-T", "fields", "-E", "separator=|", "-e", "tcp.srcport", "-e", "http2.streamid",
         "-e", "http2.header.name", "-e", "http2.header.value"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    connects = {}
    statuses = 0
    for line in out.splitlines():
        sport, sids, names, values = line.split("|")
        headers = dict(zip(names.split(","), values.split(",")))
        if headers.get(":method") == "CONNECT":
            connects[(int(sport), int(sids.split(",")[0]))] = headers
        elif headers.get(":status") == "200":
            statuses += 1
    assert statuses == len(truth["connections"])
    for c in truth["connections"]:
        h = connects[(int(c["hbone_client"].rsplit(":", 1)[1]), c["stream_id"])]
        assert h[":authority"] == c["backend"]
        assert h["forwarded"] == f'for="{c["client"]}"'
        assert c["trace_id"] in h["traceparent"]
    # the tunnel and both plaintext legs carry the same bytes
    plain = subprocess.run(["tshark", "-n", "-r", str(mesh_set.files["pod-b-eth0"]), "-Y", "http.response.code == 200",
                            "-T", "fields", "-e", "tcp.srcport"], capture_output=True, text=True, timeout=120,
                           check=True).stdout.split()
    assert len(plain) == len(truth["connections"])


def test_correlation_ties_every_flow_exactly(mesh_set):
    d = mesh_set.directory
    points = parse_manifest((d / "points.toml").read_text())
    a = hbonecap.analyze(str(d), keylog=str(mesh_set.keylog), points={k: f"{p.role}@{p.node}" for k, p in points.items()})
    r = correlate(a)
    truth = mesh_set.truth
    tunnels = a.table("tunnels")
    assert len(tunnels) == 2 * len(truth["hbone_connections"]) and tunnels["decrypted"].all()
    flows = r["flows"]
    assert len(flows) == len(truth["connections"])
    for c in truth["connections"]:
        f = flows[flows["client"] == c["client"]]
        assert len(f) == 1, c["client"]
        f = f.iloc[0]
        assert (f["original_dst"], f["dst_pod"], f["hbone_client"], f["hbone_server"], f["stream_id"], f["trace_id"],
                f["match"], f["outcome"], f["hops"]) == \
            (c["original_dst"], c["backend"], c["hbone_client"], c["hbone_server"], c["stream_id"], c["trace_id"],
             "exact", "ok", 3), c["client"]
        assert (f["bytes_c2s"], f["bytes_s2c"]) == (c["bytes_client_to_server"], c["bytes_server_to_client"])
    clock = r["clock"].set_index("capture")["offset_ms"]
    assert abs(clock["node-b-eth0.pcap"] - 2.1) < 0.01 and abs(clock["pod-b-eth0.pcap"] - 2.1) < 0.01
    assert a.table("anomalies").empty


def test_reused_upstream_port_ties_each_connection_to_its_own_stream(tmp_path):
    """The destination ztunnel reuses a source port towards the server pod (two connections with one 4-tuple, told
    apart by their SYNs): each must carry its own request and be tied to its own stream, with full confidence."""
    import collections

    d = tmp_path / "reuse"
    mesh.generate(d, mb=5, seed=5, streams_per_connection=6, offset_us=2_100, largest=3_000)
    truth = json.loads((d / "mesh.json").read_text())
    reused = [u for u, n in collections.Counter(c["upstream"] for c in truth["connections"]).items() if n > 1]
    assert reused, "this set must reuse an upstream port"
    points = parse_manifest((d / "points.toml").read_text())
    a = hbonecap.analyze(str(d), keylog=str(d / "keylog.txt"), points={k: f"{p.role}@{p.node}" for k, p in points.items()})
    flows, hops = a.flows, a.hops
    assert len(flows) == len(truth["connections"])
    at_pod = (hops["dst_capture"].astype(str) == "pod-b-eth0.pcap") | (hops["src_capture"].astype(str) == "pod-b-eth0.pcap")
    upstream_seen = set(hops.loc[at_pod, "flow_id"])
    for c in truth["connections"]:
        f = flows[flows["client"] == c["client"]].iloc[0]
        assert f["match"] == "exact" and f["confidence"] == 1.0, c
        assert f["flow_id"] in upstream_seen, c
        assert (f["bytes_c2s"], f["bytes_s2c"]) == (c["bytes_client_to_server"], c["bytes_server_to_client"])


def test_keyless_ties_every_connection_without_a_ztunnel_capture(mesh_set):
    """No key log, and no capture of either ztunnel (only the node NICs saw HBONE): each client connection is tied
    through the right pooled HBONE connection to its server connection, the client's ztunnel placed on the client's
    node by the pod subnet."""
    d = mesh_set.directory
    points = parse_manifest((d / "points.toml").read_text())
    a = hbonecap.analyze(str(d), points={k: f"{p.role}@{p.node}" for k, p in points.items()}, packets=False)
    flows = a.flows
    truth = mesh_set.truth
    assert not a.tunnels["decrypted"].any()
    assert len(flows) == len(truth["connections"])
    for c in truth["connections"]:
        f = flows[flows["client"] == c["client"]]
        assert len(f) == 1, c["client"]
        f = f.iloc[0]
        assert (f["dst_pod"], f["hbone_client"], f["hbone_server"], f["match"]) == \
            (c["backend"], c["hbone_client"], c["hbone_server"], "inferred"), c["client"]
        assert f["confidence"] >= 0.9, (c["client"], f["match_reason"])


def _flows_keep_their_server_connections(a, truth) -> None:
    flows, hops = a.flows, a.hops
    assert len(flows) == len(truth["connections"])
    for c in truth["connections"]:
        f = flows[flows["client"] == c["client"]].iloc[0]
        assert (f["dst_pod"], f["match"], f["confidence"], f["hops"]) == (c["backend"], "exact", 1.0, 3), c["client"]
        last = hops[(hops["flow_id"] == f["flow_id"]) & (hops["hop_index"] == 2)]
        assert set(last["connection"]) == {f"{c['upstream']} > {c['backend']}"}, c["client"]


def test_without_a_manifest_pods_are_placed_from_the_wire(mesh_set):
    """No capture-point manifest, no Kubernetes inventory. Each pod capture's own address is the one whose packets
    carry an initial TTL (its peer's were routed by the node); pod-b's capture shares no packet with another
    capture, but its address is the server of HBONE connections that cross from node-a to node-b, so it is placed
    on node-b and shares node-b's clock: every flow keeps its three hops with full confidence."""
    d = mesh_set.directory
    a = hbonecap.analyze(str(d), keylog=str(mesh_set.keylog))
    truth = mesh_set.truth
    _flows_keep_their_server_connections(a, truth)
    clock = a.clock.set_index("capture")
    assert clock.loc["pod-b-eth0.pcap", "node"] == "node-b" and clock.loc["pod-a-eth0.pcap", "node"] == "node-a"
    assert "crossed between nodes" in clock.loc["pod-b-eth0.pcap", "node_reason"]
    assert abs(clock.loc["pod-b-eth0.pcap", "offset_ms"] - truth["clock_offsets_ns"]["node-b"] / 1e6) < 0.01
    assert a.anomalies.empty


def test_without_a_manifest_a_bridged_pod_gets_a_causal_clock(tmp_path):
    """As above, but the pods' peers reach them over a bridge (TTL 64 both ways): nothing on the wire tells pod-b's
    own address from its ztunnel's, so its capture gets no node and its clock no shared packet. Its server
    connections are still tied by content (the decrypted request line and byte counts), every flow keeps all three
    hops, and pod-b's clock is bracketed by causality (each server connection opens between its CONNECT and the
    200) around the true offset."""
    m = mesh.generate(tmp_path / "bridged", mb=4, seed=7, streams_per_connection=6, offset_us=2_100,
                      largest=200_000, routed=False)
    a = hbonecap.analyze(str(m.directory), keylog=str(m.keylog))
    truth = m.truth
    _flows_keep_their_server_connections(a, truth)
    pod_b = a.clock.set_index("capture").loc["pod-b-eth0.pcap"]
    true_ms = truth["clock_offsets_ns"]["node-b"] / 1e6
    assert pod_b["via"] == "causal"
    assert abs(pod_b["offset_ms"] - true_ms) <= pod_b["uncertainty_ms"] + 1e-9
    assert pod_b["uncertainty_ms"] < 0.5
    kinds = a.anomalies["kind"].astype(str)
    assert not (kinds == "clock_unconnected").any()
    # nothing tells pod-b's own address from its ztunnel's: said, not hidden
    said = a.anomalies[(kinds == "capture_owner_ambiguous") & (a.anomalies["capture"].astype(str) == "pod-b-eth0.pcap")]
    assert len(said) == 1
    assert "10.244.2.3" in said["detail"].iloc[0] and "10.244.2.5" in said["detail"].iloc[0]

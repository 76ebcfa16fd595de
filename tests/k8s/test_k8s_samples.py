"""Kubernetes names end to end on the lab samples, with kubectl/istioctl fixtures matched to their addresses:
names in flows, hops, requests and tunnels, Service names for ClusterIP:port, capture placement, pod IP reuse,
SPIFFE identity checks, the report and the command line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import hbonecap
from hbonecap.cli import app
from hbonecap.k8s import split_endpoint
from hbonecap.report import build_report
from tests.conftest import SAMPLES

FIXTURES = Path(__file__).parent / "fixtures"
LAB = FIXTURES / "lab"
HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=\"alert(1)\">$\\frac{$"


def sample(name: str) -> Path:
    d = SAMPLES / name
    if not (d / "truth.json").exists():
        pytest.skip(f"lab sample {d} not found")
    return d


def topology(name: str) -> dict:
    return json.loads((sample(name) / "truth.json").read_text())["topology"]


def pods_by_ip() -> dict[str, dict]:
    items = json.loads((LAB / "pods.json").read_text())["items"]
    return {p["status"]["podIP"]: p for p in items}


def pod_name(ip: str) -> str:
    p = pods_by_ip()[ip]
    return f"{p['metadata']['namespace']}/{p['metadata']['name']}"


@pytest.fixture(scope="module")
def sequential():
    d = sample("sequential")
    return hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=LAB)


def test_flows_read_names(sequential):
    a, topo = sequential, topology("sequential")
    assert len(a.flows) == 3
    for r in a.flows.itertuples():
        ip, port = split_endpoint(r.client)
        assert r.client_name == f"{pod_name(ip)}:{port}"
        svc = topo["services"][r.original_dst]
        assert r.original_dst_name == f"{svc['name']}.default:{split_endpoint(r.original_dst)[1]}"
        ip, port = split_endpoint(r.dst_pod)
        assert r.dst_pod_name == f"{pod_name(ip)}:{port}"
        client_pod = next(p for p in topo["pods"].values() if p["ip"] == split_endpoint(r.client)[0])
        server_pod = next(p for p in topo["pods"].values() if p["ip"] == split_endpoint(r.dst_pod)[0])
        assert (r.client_node, r.dst_node) == (client_pod["node"], server_pod["node"])
        assert (r.client_identity, r.dst_identity) == (client_pod["identity"], server_pod["identity"])


def test_hops_requests_connections_and_streams_read_names(sequential):
    a = sequential
    for r in a.hops.dropna(subset=["connection"]).itertuples():
        left, _, right = r.connection.partition(" > ")
        for end in (left, right):
            ip, _ = split_endpoint(end)
            if ip in pods_by_ip():
                assert pod_name(ip) in r.connection_names, (r.connection, r.connection_names)
    assert a.requests["client_name"].notna().all() and a.requests["server_name"].notna().all()
    assert a.connections["client_name"].notna().all()
    ztunnels = a.connections[a.connections["client_ip"] == topology("sequential")["pods"]["ztunnel-b"]["ip"]]
    assert len(ztunnels) and ztunnels["client_name"].str.startswith("istio-system/ztunnel-").all()
    named = a.streams.dropna(subset=["original_dst"])
    assert (named["original_dst_name"] == "default/echo-5b4f7c9d8-q7m2n:8080").all()
    assert not (a.anomalies["layer"] == "k8s").any(), a.anomalies[a.anomalies["layer"] == "k8s"]


def test_certificate_identities_match_the_service_accounts(sequential):
    t = sequential.tunnels
    seen = t[t["server_spiffe"].notna()]
    assert len(seen) and (seen["identity_check"] == "ok").all()
    assert (seen["server_spiffe"] == seen["server_expected_spiffe"]).all()
    # the HBONE client here is ztunnel A, which presents the workload's identity, not its own: not checked
    assert t["client_expected_spiffe"].isna().all()


def test_identity_mismatch_is_a_finding(tmp_path):
    d = sample("refused-503")
    k8s = [LAB / "nodes.json", LAB / "services.json", FIXTURES / "mismatch-pods.json"]
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=k8s)
    t = a.tunnels
    seen = t[t["server_spiffe"].notna()]
    assert len(seen) and (seen["identity_check"] == "mismatch").all()
    assert (seen["server_expected_spiffe"] == "spiffe://cluster.local/ns/default/sa/productpage").all()
    bad = a.anomalies[a.anomalies["kind"] == "k8s_identity_mismatch"]
    assert len(bad) == len(seen)
    assert bad["detail"].str.contains("sa/echo").all()
    html = build_report(a)
    assert "does not match the pod&#x27;s service account" in html or "does not match the pod's service account" in html


def test_service_names_for_cluster_ips_across_scenarios():
    for name in ("waypoint", "refused-503"):
        d = sample(name)
        a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=LAB)
        topo = topology(name)
        assert len(a.flows)
        for r in a.flows.dropna(subset=["original_dst"]).itertuples():
            svc = topo["services"].get(r.original_dst)
            if svc:
                assert r.original_dst_name == f"{svc['name']}.default:{split_endpoint(r.original_dst)[1]}"


def test_capture_point_placed_from_addresses(tmp_path):
    """Captures with names that say nothing: a pod's (one pod's IP in every packet) and a node's (every packet
    between two pods of node B)."""
    d = sample("sequential")
    shutil.copy(d / "pod-a-eth0.pcap", tmp_path / "capture-1.pcap")
    shutil.copy(d / "pod-b-eth0.pcap", tmp_path / "capture-2.pcap")
    plain = hbonecap.analyze(tmp_path, correlate=False)
    assert (plain.captures["role"] == "unknown").all() and plain.captures["node"].isna().all()
    a = hbonecap.analyze(tmp_path, k8s=LAB, correlate=False)
    c = a.captures.set_index("capture")
    topo = topology("sequential")
    assert c.at["capture-1.pcap", "pod"] == pod_name(topo["pods"]["pod-a"]["ip"])
    assert c.at["capture-1.pcap", "role"] == "pod"
    assert c.at["capture-1.pcap", "node"] == topo["pods"]["pod-a"]["node"]
    assert c.at["capture-2.pcap", "node"] == topo["pods"]["pod-b"]["node"]
    assert pd.isna(c.at["capture-2.pcap", "pod"])          # ztunnel B and pod B both in every packet
    assert "k8s" in c.at["capture-2.pcap", "role_reason"]
    # an explicit point is never changed
    b = hbonecap.analyze(tmp_path, k8s=LAB, correlate=False, points={"capture-1.pcap": "node@elsewhere"})
    assert b.captures.set_index("capture").at["capture-1.pcap", "node"] == "elsewhere"


def test_real_node_names_replace_file_name_hosts(tmp_path):
    """Node names from file names (node-a) that are not the cluster's follow the placement, so that every
    capture of one node shares one clock group."""
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    for f in ("pods.json", "nodes.json", "services.json"):
        text = (LAB / f).read_text().replace('"node-a"', '"ambient-worker"').replace('"node-b"', '"ambient-worker2"')
        (k8s / f).write_text(text)
    d = sample("sequential")
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=k8s)
    assert set(a.captures["node"]) == {"ambient-worker", "ambient-worker2"}, a.captures[["capture", "node"]]
    nodes = a.captures.set_index("capture")["node"]
    assert nodes["node-a-eth0.pcap"] == nodes["ztunnel-a-eth0.pcap"] == nodes["pod-a-eth0.pcap"] == "ambient-worker"
    assert set(a.clock["node"]) == {"ambient-worker", "ambient-worker2"}
    assert len(a.flows) == 3 and (a.flows["outcome"] == "ok").all()


def test_pod_ip_reuse_resolved_by_snapshot_times(tmp_path):
    d = sample("sequential")
    k8s = [LAB / "nodes.json", LAB / "services.json", FIXTURES / "reuse-timed"]
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=k8s)
    assert (a.flows["dst_pod_name"] == "default/echo-5b4f7c9d8-q7m2n:8080").all()
    assert (a.flows["dst_identity"] == "spiffe://cluster.local/ns/default/sa/echo").all()
    assert not (a.anomalies["kind"] == "k8s_ambiguous_address").any()


def test_pod_ip_reuse_without_times_is_flagged(tmp_path):
    d = sample("sequential")
    k8s = [LAB / "nodes.json", LAB / "services.json", FIXTURES / "reuse-untimed"]
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=k8s)
    assert (a.flows["dst_pod_name"] ==
            "default/echo-5b4f7c9d8-old9z | default/echo-5b4f7c9d8-q7m2n").all()
    assert a.flows["dst_identity"].isna().all()
    amb = a.anomalies[a.anomalies["kind"] == "k8s_ambiguous_address"]
    assert len(amb) == 1 and amb["detail"].iloc[0].startswith("10.244.2.5 ")
    assert a.tunnels["identity_check"].isna().all()        # no identity expected from an ambiguous owner
    assert "could not be named" in build_report(a)


def test_report_shows_names_with_addresses_and_escapes_hostile_names(tmp_path):
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    for f in ("nodes.json", "services.json"):
        shutil.copy(LAB / f, k8s / f)
    pods = json.loads((LAB / "pods.json").read_text())
    for p in pods["items"]:
        if p["metadata"]["name"].startswith("sleep-"):
            p["metadata"]["name"] = HOSTILE
    (k8s / "pods.json").write_text(json.dumps(pods))
    d = sample("sequential")
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=k8s)
    assert a.flows["client_name"].str.contains("<script>", regex=False).all()
    html = build_report(a)
    assert HOSTILE not in html and "<script>document.title" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=&#x27;PWNED&#x27;&lt;/script&gt;" in html
    assert 'title="10.96.0.10:80">echo.default:80</span>' in html
    first = a.flows.iloc[0]
    assert f'title="{first.client}"' in html


def test_cli_k8s_option(tmp_path):
    runner = CliRunner()
    d = sample("sequential")
    out = tmp_path / "out"
    r = runner.invoke(app, ["correlate", str(d), "--keylog", str(d / "keylog.txt"), "--k8s", str(LAB / "pods.json"),
                            "--k8s", str(LAB / "services.json"), "-o", str(out), "-f", "csv", "-j", "1"])
    assert r.exit_code == 0, r.output
    flows = pd.read_csv(out / "flows.csv")
    assert (flows["original_dst_name"] == "echo.default:80").all()
    r = runner.invoke(app, ["decode", str(d / "pod-a-eth0.pcap"), "-t", "connections", "--k8s", str(LAB),
                            "-f", "csv"])
    assert r.exit_code == 0, r.output
    assert "default/sleep-7d9c8b6f4-x2k9p:" in r.output and "echo.default:80" in r.output
    bad = tmp_path / "pods.txt"
    bad.write_text("NAME READY STATUS\n")
    r = runner.invoke(app, ["correlate", str(d), "--k8s", str(bad), "-j", "1"])
    assert r.exit_code == 2 and "not JSON" in r.output and len(r.output.strip().splitlines()) == 1


def test_inpod_pod_captures_placed_on_their_nodes():
    """In-pod HBONE goes pod A -> pod B: both pods are in every packet of pod-b's captures. The pod that pod-a's
    captures already are is not pod-b's, so each capture gets its own pod and node (and its node's clock)."""
    d = sample("inpod")
    topo = topology("inpod")
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", k8s=LAB)
    c = a.captures.set_index("capture")
    for host in ("pod-a", "pod-b"):
        pod = topo["pods"][host]
        for cap in (f"{host}-eth0.pcap", f"{host}-lo.pcap"):
            assert c.at[cap, "pod"] == pod_name(pod["ip"]), cap
            assert c.at[cap, "node"] == pod["node"], cap
    clock = a.clock.set_index("capture")
    assert clock.at["pod-b-lo.pcap", "node"] == topo["pods"]["pod-b"]["node"]
    assert (a.flows["client_name"].notna()).all() and (a.tunnels["identity_check"] == "ok").all()
    # the HBONE client is the client pod itself here: its certificate is checked too
    assert (a.tunnels["client_expected_spiffe"] == topo["pods"]["pod-a"]["identity"]).all()


def test_placement_uses_the_capture_time_for_reused_ips(tmp_path):
    """An IPAM without per-node pod CIDRs (VPC-style) gave pod B's address to a pod on node A before: the
    capture's time picks the pod that had it then, and with it the node."""
    d = sample("sequential")
    caps = tmp_path / "caps"
    caps.mkdir()
    shutil.copy(d / "pod-b-eth0.pcap", caps / "capture-9.pcap")
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    nodes = json.loads((LAB / "nodes.json").read_text())
    for n in nodes["items"]:
        n["spec"].pop("podCIDR"), n["spec"].pop("podCIDRs")
    (k8s / "nodes.json").write_text(json.dumps(nodes))
    for f in (FIXTURES / "reuse-timed").iterdir():
        pods = json.loads(f.read_text())
        pods["items"] = [p for p in pods["items"] if not p["metadata"]["name"].startswith("ztunnel-")]
        for p in pods["items"]:
            if p["metadata"]["name"] == "echo-5b4f7c9d8-old9z":
                p["spec"]["nodeName"], p["status"]["hostIP"] = "node-a", "172.18.0.2"
        (k8s / f.name).write_text(json.dumps(pods))
    a = hbonecap.analyze(caps, k8s=k8s, correlate=False)
    c = a.captures.set_index("capture")
    assert c.at["capture-9.pcap", "node"] == topology("sequential")["pods"]["pod-b"]["node"]
    assert a.connections["server_name"].str.startswith("default/echo-5b4f7c9d8-q7m2n:").all()
    # the same objects without any time (no time-stamped file names, creation times stripped as some exports
    # do): the address cannot place the capture
    untimed = tmp_path / "untimed"
    untimed.mkdir()
    for i, f in enumerate(sorted(k8s.iterdir())):
        doc = json.loads(f.read_text())
        for item in doc["items"]:
            item["metadata"].pop("creationTimestamp", None)
            item.get("status", {}).pop("startTime", None)
        (untimed / f"snapshot-{i}.json").write_text(json.dumps(doc))
    b = hbonecap.analyze(caps, k8s=untimed, correlate=False)
    assert pd.isna(b.captures.set_index("capture").at["capture-9.pcap", "node"])

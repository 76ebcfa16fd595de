"""The Kubernetes/istioctl inventory on its own: parsing what kubectl and istioctl print (omitted fields, List
wrappers, config dumps), lookups by address, port and time, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbonecap.k8s import Inventory, InventoryError, address_groups, load_inventory, place_captures
from hbonecap.k8s.inventory import snapshot_time
from hbonecap.k8s.enrich import split_endpoint
from hbonecap import tables
from tests.conftest import SAMPLES

FIXTURES = Path(__file__).parent / "fixtures"


def ns(text: str) -> int:
    return int(pd.Timestamp(text).value)


@pytest.fixture(scope="module")
def truth() -> dict:
    f = SAMPLES / "sequential" / "truth.json"
    if not f.exists():
        pytest.skip(f"lab sample {f} not found")
    return json.loads(f.read_text())["topology"]


@pytest.fixture(scope="module")
def lab() -> Inventory:
    return load_inventory(FIXTURES / "lab")


def test_lab_fixtures_name_every_truth_address(lab, truth):
    for label, pod in truth["pods"].items():
        r = lab.resolve_ip(pod["ip"])
        assert r.status == "pod", (label, r)
        assert r.node == pod["node"], label
        if "identity" in pod:
            assert r.owner.identity == pod["identity"], label
    for node, ip in truth["nodes"].items():
        r = lab.resolve_ip(ip)
        assert (r.status, r.name, r.node) == ("node", f"node/{node}", node)
    for vip_port, svc in truth["services"].items():
        ip, port = split_endpoint(vip_port)
        r = lab.resolve_endpoint(ip, port)
        assert (r.status, r.name) == ("service", f"{svc['name']}.default:{port}")
        # the same address on a port the Service does not expose is not the Service
        assert lab.resolve_endpoint(ip, port + 1).status != "service"


def test_roles_ports_and_cidrs(lab):
    assert lab.resolve_ip("10.244.1.3").owner.role == "ztunnel"
    assert lab.resolve_ip("10.244.2.9").owner.role == "waypoint"
    assert lab.resolve_ip("10.244.1.5").owner.role is None
    r = lab.resolve_endpoint("10.244.2.5", 8080)
    assert r.name == "default/echo-5b4f7c9d8-q7m2n:8080" and r.node == "node-b"
    # an address of node B's pod CIDR that no snapshot lists: only the node is known
    r = lab.resolve_ip("10.244.2.77")
    assert (r.status, r.name, r.node) == ("pod-cidr", None, "node-b")
    assert lab.resolve_ip("192.0.2.1").status == "unknown"
    # headless Service (clusterIP None) gives no address; the kubernetes Service does
    assert lab.resolve_endpoint("10.96.0.1", 443).name == "kubernetes.default:443"
    assert not lab.anomalies


def test_istioctl_arrays_and_config_dump_maps():
    workloads = json.loads((FIXTURES / "lab" / "ztunnel-workloads.json").read_text())
    services = json.loads((FIXTURES / "lab" / "ztunnel-services.json").read_text())
    inv = Inventory.build([("w.json", workloads, None), ("s.json", services, None)])
    assert inv.resolve_endpoint("10.96.0.20", 80).name == "echo-wp.default:80"
    assert inv.services[("10.96.0.20", 80, "TCP")][0].waypoint == "default/waypoint.default.svc.cluster.local"
    r = inv.resolve_ip("10.244.1.5")
    assert r.name == "default/sleep-7d9c8b6f4-x2k9p" and r.owner.trust_domain == "cluster.local"
    # `ztunnel-config all -o json`: workloads and services keyed by "network/ip"
    dump = {"workloads": {f"/{w['workloadIps'][0]}": w for w in workloads},
            "services": {s["vips"][0]: s for s in services}, "policies": [], "certificates": []}
    inv2 = Inventory.build([("all.json", dump, None)])
    assert inv2.resolve_ip("10.244.2.3").owner.role == "ztunnel"
    assert inv2.resolve_endpoint("10.96.0.30", 80).name == "closed.default:80"


def test_fields_kubernetes_omits():
    docs = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"}, "status": {"podIP": "10.1.0.4"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pending", "namespace": "x"}, "spec": {}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostnet", "namespace": "kube-system"},
         "spec": {"hostNetwork": True, "nodeName": "n1"}, "status": {"podIP": "192.168.0.10"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "headless", "namespace": "x"},
         "spec": {"clusterIP": "None"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "np", "namespace": "x"},
         "spec": {"clusterIP": "10.96.9.9", "type": "NodePort",
                  "ports": [{"port": 80, "nodePort": 30080, "targetPort": "http"}]}},
    ]
    inv = Inventory.build([("objs.json", {"apiVersion": "v1", "kind": "List", "items": docs}, None)])
    r = inv.resolve_ip("10.1.0.4")
    assert r.name == "default/bare" and r.owner.identity == "spiffe://cluster.local/ns/default/sa/default"
    # a hostNetwork pod shares its node's address: the address is the node's
    assert inv.resolve_ip("192.168.0.10").name == "node/n1"
    assert inv.resolve_endpoint("192.168.0.10", 30080).name == "np.x:80 (NodePort on n1)"
    assert inv.resolve_endpoint("10.96.9.9", 80).name == "np.x:80"
    assert not inv.anomalies


def test_unknown_kinds_and_bad_items_become_anomalies(tmp_path):
    doc = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
        "not an object",
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "no-name"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ok"}, "status": {"podIP": "10.2.0.1"}},
    ]}
    inv = Inventory.build([("mixed.json", doc, None), ("scalar.json", 42, None)])
    kinds = [a[3] for a in inv.anomalies]
    assert kinds.count("k8s_unknown_kind") == 2 and kinds.count("k8s_bad_object") == 2, inv.anomalies
    assert inv.resolve_ip("10.2.0.1").name == "default/ok"
    bad = tmp_path / "pods.json"
    bad.write_text("NAME   READY   STATUS\nsleep  1/1     Running\n")
    with pytest.raises(InventoryError, match="not JSON"):
        load_inventory(bad)
    with pytest.raises(InventoryError, match="no such"):
        load_inventory(tmp_path / "missing.json")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.sampled_from(["kind", "items", "metadata", "spec", "status", "name",
                                                            "podIP", "podIPs", "ports", "workloadIps", "vips",
                                                            "addresses", "workloads", "services", "endpoints"]),
                                           inner, max_size=5), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(doc=json_values)
def test_any_json_is_an_inventory_or_anomalies(doc):
    inv = Inventory.build([("fuzz.json", doc, None)])
    for ip in list(inv.owners)[:5]:
        inv.resolve_ip(ip, 0)


def test_snapshot_times_from_file_names():
    assert snapshot_time("pods-20261122-052700.json") == ns("2026-11-22T05:27:00Z")
    assert snapshot_time("svc-2026-11-22T05:27:00Z.json") == ns("2026-11-22T05:27:00Z")
    assert snapshot_time("pods-1795325259.json") == 1795325259 * 10**9
    assert snapshot_time("pods.json") is None


def test_ip_reuse_resolved_by_time():
    inv = load_inventory(FIXTURES / "reuse-timed")
    before = inv.resolve_ip("10.244.2.5", ns("2026-11-22T05:10:00Z"))
    after = inv.resolve_ip("10.244.2.5", ns("2026-11-22T05:27:41Z"))
    assert before.name == "default/echo-5b4f7c9d8-old9z" and before.owner.service_account == "echo-legacy"
    assert after.name == "default/echo-5b4f7c9d8-q7m2n" and after.owner.service_account == "echo"
    # without a time, two owners: ambiguous
    assert inv.resolve_ip("10.244.2.5").status == "ambiguous"
    # before either pod existed: neither fits, both stay candidates
    assert inv.resolve_ip("10.244.2.5", ns("2026-11-22T03:00:00Z")).status == "ambiguous"


def test_ip_reuse_without_times_is_ambiguous():
    inv = load_inventory(FIXTURES / "reuse-untimed")
    r = inv.resolve_ip("10.244.2.5", ns("2026-11-22T05:27:41Z"))
    assert r.status == "ambiguous"
    assert r.name == "default/echo-5b4f7c9d8-old9z | default/echo-5b4f7c9d8-q7m2n"
    assert inv.resolve_ip("10.244.1.5").name == "default/sleep-7d9c8b6f4-x2k9p"     # listed twice, one pod


def test_deleted_and_finished_pods_end_their_interval():
    def mk(name, ip, meta=None, status=None):
        return {"kind": "Pod", "metadata": {"name": name, "namespace": "d", **(meta or {})},
                "status": {"podIP": ip, **(status or {})}}

    doc = {"kind": "PodList", "items": [
        mk("job-1", "10.3.0.9", meta={"creationTimestamp": "2026-11-22T01:00:00Z"},
           status={"phase": "Succeeded", "containerStatuses": [
               {"name": "c", "state": {"terminated": {"exitCode": 0, "finishedAt": "2026-11-22T01:05:00Z"}}}]}),
        mk("web-1", "10.3.0.8", meta={"creationTimestamp": "2026-11-22T01:00:00Z",
                                      "deletionTimestamp": "2026-11-22T02:00:30Z", "deletionGracePeriodSeconds": 30}),
    ]}
    inv = Inventory.build([("pods.json", doc, None)])
    assert inv.resolve_ip("10.3.0.9", ns("2026-11-22T01:03:00Z")).status == "pod"
    assert inv.resolve_ip("10.3.0.8", ns("2026-11-22T01:59:00Z")).status == "pod"


def test_placement_from_node_addresses_alone():
    """hostNetwork traffic: the node's own address in every packet places the capture on that node."""
    node = {"kind": "Node", "metadata": {"name": "worker-7"},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.9"},
                                     {"type": "Hostname", "address": "worker-7"}]}}
    other = {"kind": "Node", "metadata": {"name": "worker-8"},
             "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.10"}]}}
    inv = Inventory.build([("nodes.json", {"kind": "List", "items": [node, other]}, None)])
    caps = tables.frame("captures", {"capture": ["x.pcap", "y.pcap"], "role": ["unknown", "unknown"],
                                     "node": [None, None], "role_reason": ["no hint", "no hint"]})
    groups = pd.DataFrame({"capture": ["x.pcap", "x.pcap", "y.pcap"],
                           "addresses": [("172.18.0.9", "10.96.0.1"), ("10.96.0.1", "172.18.0.9"),
                                         ("172.18.0.9", "172.18.0.10")],
                           "packets": [40, 38, 10]})
    out, anomalies = place_captures(caps, groups, inv)
    assert out.loc[0, "node"] == "worker-7" and "worker-7" in out.loc[0, "role_reason"]
    assert pd.isna(out.loc[1, "node"])          # between two nodes: cannot tell which end captured
    assert anomalies == []
    assert list(address_groups(None, tables.empty("connections")).columns) == ["capture", "addresses", "packets"]


def test_ip_reuse_between_timed_istioctl_snapshots():
    """ztunnel workload records carry no times; snapshots named with their time bound each owner's lifetime."""
    before = json.loads((FIXTURES / "reuse-untimed" / "workloads-before.json").read_text())
    after = json.loads((FIXTURES / "reuse-untimed" / "workloads-after.json").read_text())
    t1, t2 = ns("2026-11-22T05:00:00Z"), ns("2026-11-22T05:40:00Z")
    inv = Inventory.build([("workloads-20261122-050000.json", before, t1),
                           ("workloads-20261122-054000.json", after, t2)])
    assert inv.resolve_ip("10.244.2.5", t1).name == "default/echo-5b4f7c9d8-old9z"
    assert inv.resolve_ip("10.244.2.5", ns("2026-11-22T04:50:00Z")).name == "default/echo-5b4f7c9d8-old9z"
    assert inv.resolve_ip("10.244.2.5", ns("2026-11-22T05:50:00Z")).name == "default/echo-5b4f7c9d8-q7m2n"
    # between the two snapshots the address changed hands at an unknown moment
    assert inv.resolve_ip("10.244.2.5", ns("2026-11-22T05:27:41Z")).status == "ambiguous"
    assert inv.resolve_ip("10.244.1.5", ns("2026-11-22T05:27:41Z")).name == "default/sleep-7d9c8b6f4-x2k9p"

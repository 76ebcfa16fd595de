"""Kubernetes and ztunnel inventory: who owned an IP address (and an IP:port) when a capture was taken.

Reads, offline, what users bring from a cluster:

* `kubectl get pods -A -o json`, `get svc -A -o json`, `get nodes -o json`, `get endpointslices -A -o json`
  (a `List` with `items`, or a single object; `Endpoints` too);
* `istioctl ztunnel-config workloads -o json` and `ztunnel-config services -o json` (JSON arrays of ztunnel's
  workload / service records: `uid`, `workloadIps`, `name`, `namespace`, `serviceAccount`, `trustDomain`, `node`,
  `waypoint`, `protocol`; services `name`, `namespace`, `hostname`, `vips` as "network/ip", `ports`
  {"service port": target port}, `endpoints`, `waypoint`) and `ztunnel-config all -o json` (an object with
  `workloads` and `services`, as lists or as maps keyed by "network/ip").

Strategy: `parse_documents` turns decoded JSON into `Owner` records and service-port records (pure; `load_inventory`
is the only function that reads files). Kubernetes omits empty fields, so every key is optional. Objects of a kind
that is not understood, and items that are not objects, become anomaly rows (layer `k8s`), never exceptions; a
file that is not JSON raises `InventoryError`.

Validity in time: a pod holds its IP from `metadata.creationTimestamp` (else `status.startTime`) until
`metadata.deletionTimestamp`, or its containers' last `finishedAt` once Succeeded/Failed, or the creation of the
next pod seen with the same IP. A snapshot whose file name carries a time stamp (`pods-20261122-052700.json`,
`pods-2026-11-22T05:27:00Z.json`, epoch seconds) says its objects existed then. An address with several owners is
resolved by the capture time when the intervals decide; otherwise the lookup reports it ambiguous.

Limits: hostNetwork pods share their node's IP (the address is named after the node); IPv6 literal addresses are
compared as text after normalisation by `ipaddress`; Services of type ExternalName have no address.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import pandas as pd

from hbonecap.errors import HbonecapError

DEFAULT_TRUST_DOMAIN = "cluster.local"


class InventoryError(HbonecapError):
    """A Kubernetes/istioctl input file that cannot be read as JSON."""


@dataclass(frozen=True)
class Owner:
    """Something that owns an IP address: a pod (kubectl or ztunnel's workload record) or a node."""

    kind: str                       # "pod" or "node"
    name: str
    namespace: str | None = None
    node: str | None = None
    service_account: str | None = None
    trust_domain: str | None = None
    role: str | None = None         # "ztunnel", "waypoint" or None (an application pod)
    host_network: bool = False
    start: int | None = None        # epoch ns; None: unknown
    end: int | None = None          # epoch ns; None: still there / unknown
    seen: tuple[int, ...] = ()      # snapshot times at which it was listed
    source: str = ""
    not_before: int | None = None   # a snapshot showed another owner of the address then (or later)
    not_after: int | None = None    # ... or then (or earlier)

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}" if self.kind == "pod" else f"node/{self.name}"

    @property
    def identity(self) -> str | None:
        """The SPIFFE identity this workload presents in mesh mTLS (none for nodes)."""
        if self.kind != "pod":
            return None
        return (f"spiffe://{self.trust_domain or DEFAULT_TRUST_DOMAIN}/ns/{self.namespace}/sa/"
                f"{self.service_account or 'default'}")


@dataclass(frozen=True)
class ServicePort:
    """One port of a Service on one of its addresses (ClusterIP, external IP, load balancer IP)."""

    ip: str
    port: int
    protocol: str                   # TCP, UDP, SCTP
    service: str
    namespace: str
    port_name: str | None = None
    target_port: str | None = None
    waypoint: str | None = None
    source: str = ""

    @property
    def display(self) -> str:
        return f"{self.service}.{self.namespace}:{self.port}"


@dataclass
class Resolution:
    """What an address resolved to at a time."""

    name: str | None = None         # "ns/pod", "node/name", "svc.ns:port", or "a | b" when ambiguous
    node: str | None = None
    owner: Owner | None = None
    service: ServicePort | None = None
    status: str = "unknown"         # pod, node, service, pod-cidr, ambiguous, unknown
    candidates: tuple[Owner, ...] = ()


@dataclass
class Inventory:
    """An index of addresses from kubectl/istioctl snapshots. Build it with `Inventory.build(...)` or
    `load_inventory(paths)`; it does no I/O."""

    owners: dict[str, list[Owner]] = field(default_factory=dict)          # ip -> owners over time
    services: dict[tuple[str, int, str], list[ServicePort]] = field(default_factory=dict)
    node_ports: dict[tuple[int, str], list[ServicePort]] = field(default_factory=dict)
    pod_cidrs: list[tuple[ipaddress._BaseNetwork, str]] = field(default_factory=list)
    nodes: dict[str, Owner] = field(default_factory=dict)
    anomalies: list[tuple] = field(default_factory=list)                 # (source, index, layer, kind, detail)
    sources: list[str] = field(default_factory=list)

    # ---- building -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, documents: Iterable[tuple[str, object, int | None]]) -> "Inventory":
        """From (source name, decoded JSON, snapshot time in epoch ns or None) triples."""
        inv = cls()
        pods: dict[tuple, Owner] = {}
        pod_ips: dict[tuple, set[str]] = {}
        for source, doc, snap in documents:
            inv.sources.append(source)
            for kind, obj, idx in _objects(doc, source, inv.anomalies):
                _ingest(inv, pods, pod_ips, kind, obj, source, idx, snap)
        inv._index_pods(pods, pod_ips)
        return inv

    def _index_pods(self, pods: dict[tuple, Owner], pod_ips: dict[tuple, set[str]]) -> None:
        for key, owner in pods.items():
            for ip in pod_ips.get(key, ()):
                if owner.host_network:
                    continue            # the node's address: named after the node
                self.owners.setdefault(ip, []).append(owner)
        for ip, owners in self.owners.items():
            self.owners[ip] = _close_intervals(owners)

    # ---- lookups --------------------------------------------------------------------------------------------
    def owners_of(self, ip: str) -> list[Owner]:
        return self.owners.get(_norm_ip(ip), [])

    def resolve_ip(self, ip: str | None, ts: int | None = None) -> Resolution:
        """The pod or node that had `ip` at `ts` (epoch ns; None: time unknown)."""
        if ip is None or ip == "":
            return Resolution()
        ip = _norm_ip(ip)
        cands = self.owners.get(ip, [])
        if cands:
            chosen = _at_time(cands, ts)
            if len(chosen) == 1:
                o = chosen[0]
                return Resolution(o.display, o.node if o.kind == "pod" else o.name, o, None, o.kind, tuple(cands))
            shown = chosen or cands
            return Resolution(" | ".join(sorted({o.display for o in shown})), None, None, None, "ambiguous",
                              tuple(shown))
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return Resolution()
        for net, node in self.pod_cidrs:
            if addr.version == net.version and addr in net:
                return Resolution(None, node, None, None, "pod-cidr")
        return Resolution()

    def resolve_endpoint(self, ip: str | None, port: int | None, ts: int | None = None,
                         protocol: str = "TCP") -> Resolution:
        """An ip:port: a Service port (ClusterIP, external IP, NodePort on a node address), else the pod/node."""
        if ip is None or ip == "":
            return Resolution()
        ip = _norm_ip(ip)
        if port is not None:
            svc = self.services.get((ip, int(port), protocol.upper()))
            if svc:
                names = sorted({s.display for s in svc})
                if len(names) == 1:
                    return Resolution(names[0], None, None, svc[0], "service")
                return Resolution(" | ".join(names), None, None, None, "ambiguous")
        r = self.resolve_ip(ip, ts)
        if port is not None and r.owner is not None and r.owner.kind == "node":
            np_ = self.node_ports.get((int(port), protocol.upper()))
            if np_ and len({s.display for s in np_}) == 1:
                s = np_[0]
                return Resolution(f"{s.display} (NodePort on {r.owner.name})", r.owner.name, r.owner, s, "service")
        if r.name and port is not None and r.status in ("pod", "node"):
            r = replace(r, name=f"{r.name}:{int(port)}")
        return r

    def __len__(self) -> int:
        return len(self.owners) + len(self.services)


# ---- parsing ----------------------------------------------------------------------------------------------------

def _objects(doc, source: str, anomalies: list) -> Iterable[tuple[str, dict, int | None]]:
    """(kind, object, item index) of every object in a document: kubectl List / single object, istioctl arrays
    and config dumps."""
    if isinstance(doc, dict) and "kind" in doc:
        kind = doc.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
            item_kind = kind[:-4] or None     # PodList -> Pod; List -> per item
            for i, it in enumerate(doc["items"]):
                if not isinstance(it, dict):
                    anomalies.append((source, i + 1, "k8s", "k8s_bad_object", f"item {i + 1} is not an object"))
                    continue
                yield it.get("kind") or item_kind or "", it, i + 1
            return
        yield str(kind), doc, None
        return
    if isinstance(doc, dict) and ("workloads" in doc or "services" in doc):      # ztunnel-config all / config_dump
        for key, kind in (("workloads", "ZtunnelWorkload"), ("services", "ZtunnelService")):
            part = doc.get(key) or []
            items = list(part.values()) if isinstance(part, dict) else part
            if not isinstance(items, list):
                anomalies.append((source, None, "k8s", "k8s_bad_object", f"'{key}' is neither a list nor a map"))
                continue
            for i, it in enumerate(items):
                if isinstance(it, dict):
                    yield kind, it, i + 1
                else:
                    anomalies.append((source, i + 1, "k8s", "k8s_bad_object", f"{key} item {i + 1} is not an object"))
        return
    if isinstance(doc, list):                                                     # istioctl ... -o json
        for i, it in enumerate(doc):
            if not isinstance(it, dict):
                anomalies.append((source, i + 1, "k8s", "k8s_bad_object", f"item {i + 1} is not an object"))
            elif "workloadIps" in it or ("uid" in it and "serviceAccount" in it):
                yield "ZtunnelWorkload", it, i + 1
            elif "vips" in it or "hostname" in it:
                yield "ZtunnelService", it, i + 1
            elif "kind" in it:
                yield str(it["kind"]), it, i + 1
            else:
                anomalies.append((source, i + 1, "k8s", "k8s_unknown_kind",
                                  f"item {i + 1}: neither a Kubernetes object nor a ztunnel workload/service "
                                  f"(keys {', '.join(sorted(map(str, it))[:8])})"))
        return
    anomalies.append((source, None, "k8s", "k8s_unknown_kind",
                      "not a Kubernetes object, List, or istioctl ztunnel-config output"))


def _ingest(inv: Inventory, pods: dict, pod_ips: dict, kind: str, obj: dict, source: str, idx, snap) -> None:
    where = f"{source}#{idx}" if idx else source
    try:
        if kind == "Pod":
            _pod(pods, pod_ips, obj, where, snap)
        elif kind == "Node":
            _node(inv, obj, where, snap)
        elif kind == "Service":
            _service(inv, obj, where)
        elif kind == "EndpointSlice":
            _endpoint_slice(pods, pod_ips, obj, where, snap)
        elif kind == "Endpoints":
            _endpoints(pods, pod_ips, obj, where, snap)
        elif kind == "ZtunnelWorkload":
            _workload(pods, pod_ips, obj, where, snap)
        elif kind == "ZtunnelService":
            _ztunnel_service(inv, obj, where)
        else:
            inv.anomalies.append((source, idx, "k8s", "k8s_unknown_kind",
                                  f"kind {kind or '(none)'!s:.60} is not used (pods, services, nodes, "
                                  "endpointslices, ztunnel workloads/services are)"))
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        inv.anomalies.append((source, idx, "k8s", "k8s_bad_object", f"{kind} not understood: {e!s:.200}"))


def _meta(obj: dict) -> dict:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def _d(obj, key) -> dict:
    v = obj.get(key) if isinstance(obj, dict) else None
    return v if isinstance(v, dict) else {}


def _l(obj, key) -> list:
    v = obj.get(key) if isinstance(obj, dict) else None
    return v if isinstance(v, list) else []


def parse_time(text) -> int | None:
    """RFC 3339 text (as Kubernetes writes it) to epoch ns; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        t = pd.Timestamp(text)
    except (ValueError, TypeError):
        return None
    if t.tzinfo is None:
        t = t.tz_localize("UTC")
    return int(t.value)


def _role_of(namespace: str | None, name: str, labels: dict, service_account: str | None) -> str | None:
    labels = labels or {}
    if labels.get("app") == "ztunnel" or labels.get("app.kubernetes.io/name") == "ztunnel" or \
            (service_account == "ztunnel" and name.startswith("ztunnel")):
        return "ztunnel"
    if "gateway.istio.io/managed" in labels and labels.get("gateway.networking.k8s.io/gateway-class-name",
                                                            "istio-waypoint") == "istio-waypoint":
        return "waypoint"
    if labels.get("gateway.networking.k8s.io/gateway-class-name") == "istio-waypoint" or \
            labels.get("istio.io/gateway-name") and "waypoint" in str(labels.get("istio.io/gateway-name")):
        return "waypoint"
    if "waypoint" in name and (service_account or "").endswith("waypoint"):
        return "waypoint"
    return None


def _merge(pods: dict, pod_ips: dict, new: Owner, ips: Iterable[str]) -> None:
    """One record per pod (namespace, name): snapshots and sources are merged, known fields win over gaps."""
    key = new.key
    ips = {_norm_ip(i) for i in ips if isinstance(i, str) and i}
    old = pods.get(key)
    if old is None:
        pods[key] = new
    else:
        starts = [t for t in (old.start, new.start) if t is not None]
        ends = [t for t in (old.end, new.end) if t is not None]
        pods[key] = replace(
            old, node=old.node or new.node, service_account=old.service_account or new.service_account,
            trust_domain=old.trust_domain or new.trust_domain, role=old.role or new.role,
            host_network=old.host_network or new.host_network, start=min(starts) if starts else None,
            end=max(ends) if ends else None, seen=tuple(sorted(set(old.seen) | set(new.seen))),
            source=old.source if new.source in old.source else f"{old.source}, {new.source}")
    pod_ips.setdefault(key, set()).update(ips)


def _pod(pods, pod_ips, obj, where, snap) -> None:
    meta, spec, status = _meta(obj), _d(obj, "spec"), _d(obj, "status")
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        raise ValueError("Pod without metadata.name")
    ips = [p.get("ip") for p in _l(status, "podIPs") if isinstance(p, dict)] + [status.get("podIP")]
    start = parse_time(meta.get("creationTimestamp")) or parse_time(status.get("startTime"))
    end = parse_time(meta.get("deletionTimestamp"))
    if status.get("phase") in ("Succeeded", "Failed"):
        finished = [parse_time(_d(_d(cs, "state"), "terminated").get("finishedAt"))
                    for cs in _l(status, "containerStatuses") if isinstance(cs, dict)]
        finished = [f for f in finished if f is not None]
        if finished:
            end = min(end, max(finished)) if end is not None else max(finished)
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    labels = _d(meta, "labels")
    _merge(pods, pod_ips, Owner("pod", name, ns, spec.get("nodeName") or None, sa, None,
                                _role_of(ns, name, labels, sa), bool(spec.get("hostNetwork")), start, end,
                                (snap,) if snap else (), where), ips)


def _workload(pods, pod_ips, obj, where, snap) -> None:
    uid = obj.get("uid") or ""
    name, ns = obj.get("name"), obj.get("namespace")
    parts = uid.split("/") if isinstance(uid, str) else []
    if (not name or not ns) and len(parts) >= 5:          # Kubernetes//Pod/<ns>/<name>
        ns, name = ns or parts[-2], name or parts[-1]
    if not isinstance(name, str) or not name:
        raise ValueError("workload without name or uid")
    ips = [i.rpartition("/")[2] for i in _l(obj, "workloadIps") if isinstance(i, str)]
    sa = obj.get("serviceAccount") or "default"
    role = "ztunnel" if obj.get("canonicalName") == "ztunnel" and sa == "ztunnel" else None
    if role is None and "waypoint" in str(obj.get("workloadName") or name) and "waypoint" in sa:
        role = "waypoint"
    _merge(pods, pod_ips, Owner("pod", name, ns or "default", obj.get("node") or None, sa,
                                obj.get("trustDomain") or None, role, False, None, None,
                                (snap,) if snap else (), where), ips)


def _endpoint_owner(pods, pod_ips, ip, ref, node, where, snap) -> None:
    if not isinstance(ref, dict) or ref.get("kind") != "Pod" or not ref.get("name"):
        return
    _merge(pods, pod_ips, Owner("pod", ref["name"], ref.get("namespace") or "default", node or None,
                                seen=(snap,) if snap else (), source=where), [ip])


def _endpoint_slice(pods, pod_ips, obj, where, snap) -> None:
    if obj.get("addressType") not in (None, "IPv4", "IPv6"):
        return                                  # FQDN slices carry names, not addresses
    for ep in _l(obj, "endpoints"):
        if not isinstance(ep, dict):
            continue
        for ip in _l(ep, "addresses"):
            if isinstance(ip, str):
                _endpoint_owner(pods, pod_ips, ip, ep.get("targetRef"), ep.get("nodeName"), where, snap)


def _endpoints(pods, pod_ips, obj, where, snap) -> None:
    for subset in _l(obj, "subsets"):
        for key in ("addresses", "notReadyAddresses"):
            for a in _l(subset, key):
                if isinstance(a, dict) and isinstance(a.get("ip"), str):
                    _endpoint_owner(pods, pod_ips, a["ip"], a.get("targetRef"), a.get("nodeName"), where, snap)


def _node(inv: Inventory, obj, where, snap) -> None:
    meta, spec, status = _meta(obj), _d(obj, "spec"), _d(obj, "status")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("Node without metadata.name")
    owner = Owner("node", name, None, name, start=parse_time(meta.get("creationTimestamp")),
                  end=parse_time(meta.get("deletionTimestamp")), seen=(snap,) if snap else (), source=where)
    inv.nodes.setdefault(name, owner)
    for a in _l(status, "addresses"):
        if isinstance(a, dict) and a.get("type") in ("InternalIP", "ExternalIP") and isinstance(a.get("address"), str):
            ip = _norm_ip(a["address"])
            lst = inv.owners.setdefault(ip, [])
            if not any(o.key == owner.key for o in lst):
                lst.append(owner)
    cidrs = [c for c in _l(spec, "podCIDRs") if isinstance(c, str)] or \
        ([spec["podCIDR"]] if isinstance(spec.get("podCIDR"), str) else [])
    for c in cidrs:
        try:
            net = ipaddress.ip_network(c, strict=False)
        except ValueError:
            inv.anomalies.append((where, None, "k8s", "k8s_bad_object", f"node {name}: podCIDR {c!r:.60} unreadable"))
            continue
        if (net, name) not in inv.pod_cidrs:
            inv.pod_cidrs.append((net, name))


def _add_service_port(inv: Inventory, sp: ServicePort) -> None:
    lst = inv.services.setdefault((sp.ip, sp.port, sp.protocol), [])
    if not any((s.service, s.namespace) == (sp.service, sp.namespace) for s in lst):
        lst.append(sp)


def _service(inv: Inventory, obj, where) -> None:
    meta, spec, status = _meta(obj), _d(obj, "spec"), _d(obj, "status")
    name, ns = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        raise ValueError("Service without metadata.name")
    ips = [i for i in _l(spec, "clusterIPs") if isinstance(i, str)] or \
        ([spec["clusterIP"]] if isinstance(spec.get("clusterIP"), str) else [])
    ips = [i for i in ips if i and i != "None"]
    ips += [i for i in _l(spec, "externalIPs") if isinstance(i, str)]
    ips += [ing["ip"] for ing in _l(_d(status, "loadBalancer"), "ingress") if isinstance(ing, dict) and
            isinstance(ing.get("ip"), str)]
    labels = _d(meta, "labels")
    waypoint = labels.get("istio.io/use-waypoint")
    for p in _l(spec, "ports"):
        if not isinstance(p, dict) or not isinstance(p.get("port"), int):
            continue
        proto = str(p.get("protocol") or "TCP").upper()
        target = p.get("targetPort")
        for ip in ips:
            _add_service_port(inv, ServicePort(_norm_ip(ip), p["port"], proto, name, ns, p.get("name") or None,
                                               None if target is None else str(target), waypoint, where))
        if isinstance(p.get("nodePort"), int):
            sp = ServicePort("", p["port"], proto, name, ns, p.get("name") or None,
                             None if target is None else str(target), waypoint, where)
            lst = inv.node_ports.setdefault((p["nodePort"], proto), [])
            if not any((s.service, s.namespace) == (name, ns) for s in lst):
                lst.append(sp)


def _ztunnel_service(inv: Inventory, obj, where) -> None:
    name, ns = obj.get("name"), obj.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        host = obj.get("hostname")
        if not isinstance(host, str) or not host:
            raise ValueError("service without name or hostname")
        name, _, rest = host.partition(".")
        ns = rest.partition(".")[0] or ns
    ports = _d(obj, "ports")
    wp = _d(obj, "waypoint").get("destination")
    for vip in _l(obj, "vips"):
        if not isinstance(vip, str):
            continue
        ip = vip.rpartition("/")[2]
        for sport, target in ports.items():
            try:
                port = int(sport)
            except ValueError:
                continue
            _add_service_port(inv, ServicePort(_norm_ip(ip), port, "TCP", name, ns, None, str(target),
                                               wp if isinstance(wp, str) else None, where))


# ---- time -------------------------------------------------------------------------------------------------------

def _close_intervals(owners: list[Owner]) -> list[Owner]:
    """Owners of one IP in time order; an owner with no known end ends where the next one starts."""
    nodes = [o for o in owners if o.kind == "node"]
    pods = sorted((o for o in owners if o.kind == "pod"),
                  key=lambda o: (o.start if o.start is not None else (min(o.seen) if o.seen else 0)))
    out = []
    for i, o in enumerate(pods):
        nxt = next((p.start for p in pods[i + 1:] if p.start is not None and p.key != o.key), None)
        if nxt is not None and (o.end is None or o.end > nxt) and (o.start is None or nxt > o.start):
            o = replace(o, end=nxt)
        if o.seen:
            # snapshots in which another pod held the address bound this one's lifetime
            other = [t for p in pods if p.key != o.key for t in p.seen]
            before = [t for t in other if t < min(o.seen)]
            after = [t for t in other if t > max(o.seen)]
            o = replace(o, not_before=max(before) if before else None, not_after=min(after) if after else None)
        out.append(o)
    return nodes + out


def _known_at(o: Owner, ts: int) -> bool | None:
    """True: it held the address at ts; False: it did not; None: its interval is unknown."""
    if o.start is None and o.end is None and not o.seen:
        return None
    if ts in o.seen:
        return True
    if o.start is not None and ts < o.start:
        return False
    if o.end is not None and ts >= o.end:
        return False
    if o.not_before is not None and ts <= o.not_before:
        return False
    if o.not_after is not None and ts >= o.not_after:
        return False
    if o.seen and o.start is None and ts < min(o.seen):
        return None          # listed later, creation unknown: can't say
    if o.seen and o.end is None and o.not_after is not None and ts > max(o.seen):
        return None          # between its last listing and another owner's first: can't say
    return True


def _at_time(cands: list[Owner], ts: int | None) -> list[Owner]:
    """The owners that may have held the address at ts: one means resolved."""
    keys = {o.key for o in cands}
    if len(keys) == 1:
        return cands[:1]
    if ts is None:
        return cands
    return [o for o in cands if _known_at(o, ts) is not False]


# ---- files ------------------------------------------------------------------------------------------------------

SNAPSHOT_TIME = re.compile(r"(?P<a>\d{8}[-_T]?\d{6})|(?P<b>\d{4}-\d{2}-\d{2}[T_ -]\d{2}[:.-]?\d{2}[:.-]?\d{2}Z?)"
                           r"|(?<!\d)(?P<c>1\d{9})(?!\d)")


def snapshot_time(file_name: str) -> int | None:
    """The time stamp in a snapshot's file name (`pods-20261122-052700.json`, `svc-2026-11-22T05:27:00Z.json`,
    `pods-1795325259.json`), as epoch ns (UTC); None when there is none."""
    m = SNAPSHOT_TIME.search(os.path.basename(file_name))
    if not m:
        return None
    try:
        if m.group("c"):
            return int(m.group("c")) * 1_000_000_000
        digits = re.sub(r"\D", "", m.group("a") or m.group("b"))
        return int(pd.Timestamp(f"{digits[:8]}T{digits[8:14]}", tz="UTC").value)
    except (ValueError, TypeError):
        return None


def _files(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".json"))
        elif p.exists():
            out.append(p)
        else:
            raise InventoryError(f"{p}: no such Kubernetes/istioctl JSON file or folder")
    return out


MAX_FILE_BYTES = 512 * 1024 * 1024


def load_inventory(paths) -> Inventory:
    """Read kubectl/istioctl JSON files (or folders of *.json files) into an `Inventory`: the only file I/O of
    this package. Raises InventoryError for a file that is not JSON."""
    docs = []
    for f in _files(paths):
        if f.stat().st_size > MAX_FILE_BYTES:
            raise InventoryError(f"{f}: larger than {MAX_FILE_BYTES >> 20} MiB; not a kubectl snapshot")
        try:
            text = f.read_bytes().decode("utf-8-sig")
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InventoryError(f"{f}: not JSON ({e}); expected kubectl get ... -o json or istioctl "
                                 "ztunnel-config ... -o json output") from e
        docs.append((f.name, doc, snapshot_time(f.name)))
    return Inventory.build(docs)


def as_inventory(k8s) -> Inventory | None:
    """`k8s=` as the API takes it: None, an Inventory, a path, or a list of paths."""
    if k8s is None or isinstance(k8s, Inventory):
        return k8s
    return load_inventory(k8s)


def _norm_ip(ip: str) -> str:
    """An address as the index keys it: brackets dropped, IPv6 in its canonical form."""
    ip = ip.strip().strip("[]")
    if ":" in ip:
        try:
            return str(ipaddress.ip_address(ip))
        except ValueError:
            return ip
    return ip

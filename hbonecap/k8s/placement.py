"""Capture-point placement from Kubernetes addresses: a capture whose packets all carry node A's addresses (its
InternalIP, its pods' IPs, its podCIDR) was taken on node A; one where a single pod's IP is in (nearly) every packet
was taken in that pod.

Strategy: per capture, packets are grouped by their addresses (innermost src/dst, outer tunnel src/dst); each group
touches a set of nodes and a set of pods. A node (or pod) present in at least `SHARE` of the packets that touch any
known one, and the only one to be, owns the capture. Traffic between two nodes' pods seen on either node is
ambiguous and left alone; so are two pods that talk only to each other (both are in every packet).

Only captures without an explicit point (`--point`, `points=`, a manifest) are changed. A node taken from the file
name (`node-a-eth0.pcap`) that is not a node of the inventory is replaced by the placement, and the other captures
named after the same host follow it, so that clock groups use one name per node. Pure: no I/O.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pandas as pd

from hbonecap.capture.points import HOST_RE
from hbonecap.k8s.inventory import Inventory

SHARE = 0.9
EXPLICIT = ("given", "manifest")
POD_ROLES = ("pod", "loopback", "unknown")


def host_of(capture: str) -> str | None:
    """The host a capture file is named after: 'pod-a' for pod-a-eth0.pcap (None for other names)."""
    m = HOST_RE.search(capture.lower())
    return f"{m.group(1)}-{m.group(2)}" if m else None


def address_groups(packets: pd.DataFrame | None, connections: pd.DataFrame | None) -> pd.DataFrame:
    """(capture, addresses tuple, packets) from the packets table, else from the connections table."""
    rows = []
    if packets is not None and hasattr(packets, "groupby") and not hasattr(packets, "to_delayed") and len(packets):
        cols = [c for c in ("src", "dst", "outer_src", "outer_dst") if c in packets.columns]
        g = packets.groupby(["capture"] + cols, observed=True, dropna=False).size()
        for key, n in g.items():
            if n:
                rows.append((str(key[0]), tuple(str(v) for v in key[1:] if isinstance(v, str) and v), int(n)))
    elif connections is not None and len(connections):
        for r in connections.itertuples(index=False):
            n = int(r.packets_c2s) + int(r.packets_s2c)
            rows.append((str(r.capture), tuple(v for v in (r.client_ip, r.server_ip) if isinstance(v, str)), n))
    return pd.DataFrame(rows, columns=["capture", "addresses", "packets"])


def _decide(counter: Counter, total: int) -> tuple[str | None, int]:
    if not total:
        return None, 0
    top = [k for k, n in counter.items() if n >= SHARE * total]
    if len(top) == 1:
        return top[0], counter[top[0]]
    return None, 0


def place_captures(captures: pd.DataFrame, groups: pd.DataFrame, inv: Inventory) -> tuple[pd.DataFrame, list[tuple]]:
    """Captures with `node` (and `pod`, `role` for a pod capture) filled from the inventory; anomaly rows for a
    placement that contradicts a node named in the file name."""
    if not len(captures):
        return captures, []
    caps = captures.copy()
    if "pod" not in caps.columns:
        caps["pod"] = pd.Series([pd.NA] * len(caps), dtype="string")
    anomalies: list[tuple] = []
    cache: dict[object, tuple[str | None, object]] = {}

    # the middle of each capture: the time that decides between owners of a reused pod IP
    mid = {}
    for r in caps.itertuples(index=False):
        f, l_ = getattr(r, "first_ts", pd.NaT), getattr(r, "last_ts", pd.NaT)
        mid[str(r.capture)] = None if pd.isna(f) or pd.isna(l_) else int(f.value + (l_.value - f.value) // 2)

    several: dict[str, bool] = {}

    def owner(ip: str, ts: int | None):
        if ip not in several:
            several[ip] = inv.resolve_ip(ip).status == "ambiguous"
        key = (ip, ts) if several[ip] else ip
        if key not in cache:
            r = inv.resolve_ip(ip, ts)
            pod = r.owner if r.owner is not None and r.owner.kind == "pod" else None
            cache[key] = (r.node if r.status in ("pod", "node", "pod-cidr") else None, pod)
        return cache[key]

    decided: dict[str, tuple] = {}
    candidates: dict[str, list] = {}
    for cap, g in groups.groupby("capture", sort=False):
        nodes, pods = Counter(), Counter()
        n_node = n_pod = 0
        pod_obj = {}
        for addrs, n in zip(g["addresses"], g["packets"]):
            ns, ps = set(), set()
            for ip in addrs:
                node, pod = owner(ip, mid.get(str(cap)))
                if node:
                    ns.add(node)
                if pod is not None:
                    ps.add(pod.display)
                    pod_obj[pod.display] = pod
            if ns:
                n_node += n
                for x in ns:
                    nodes[x] += n
            if ps:
                n_pod += n
                for x in ps:
                    pods[x] += n
        pod, pn = _decide(pods, n_pod)
        node, nn = _decide(nodes, n_node)
        why = []
        if pod is not None:
            po = pod_obj[pod]
            why.append(f"k8s: {pod} in {pn} of {n_pod} packets with pod addresses")
            if po.node:
                if node and node != po.node:
                    why.append(f"(its node {po.node}, not {node})")
                node = po.node
        elif node is not None:
            why.append(f"k8s: node {node}'s addresses in {nn} of {n_node} packets")
        decided[cap] = (node, pod, pod_obj.get(pod), "; ".join(why))
        candidates[cap] = [pod_obj[k] for k, n in pods.items() if n_pod and n >= SHARE * n_pod]

    known_nodes = set(inv.nodes)
    renamed: dict[str, Counter] = defaultdict(Counter)     # file-name node -> k8s nodes placed
    for i, r in caps.iterrows():
        cap = r["capture"]
        if cap not in decided or str(r["role_reason"]) in EXPLICIT:
            continue
        node, pod, po, why = decided[cap]
        role = str(r["role"])
        reason = str(r["role_reason"]) if isinstance(r["role_reason"], str) else ""
        changed = False
        # a pod is the capture's own only where the capture is a pod's (a node or tunnel device sees one pod's
        # traffic too; ztunnel captures see the addresses of the pods they intercept)
        if pod is not None and (role in POD_ROLES or (role in ("ztunnel", "waypoint") and po.role == role)):
            caps.at[i, "pod"] = pod
            if role == "unknown":
                caps.at[i, "role"] = po.role or "pod"
            changed = True
        elif pod is not None:
            node = po.node or node
        old = r["node"] if isinstance(r["node"], str) and r["node"] else None
        if node is not None and old is None:
            caps.at[i, "node"] = node
            changed = True
        elif node is not None and old != node:
            if old in known_nodes:
                anomalies.append((cap, None, "k8s", "k8s_point_conflict",
                                  f"the file name says node {old}; the addresses say {node} ({why})"))
            else:
                renamed[old][node] += 1
                caps.at[i, "node"] = node
                why = f"node {old} is {node} ({why})"
                changed = True
        if changed:
            caps.at[i, "role_reason"] = why if role == "unknown" else f"{reason}; {why}"
    # captures named after the same host as a placed pod capture (pod-a-eth0.pcap, pod-a-lo.pcap): the same pod
    hosts: dict[str, set[str]] = defaultdict(set)
    for i, r in caps.iterrows():
        h = host_of(str(r["capture"]))
        if h and isinstance(r["pod"], str) and str(r["role"]) in POD_ROLES:
            hosts[h].add(r["pod"])
    pod_nodes = {o.display: o.node for owners in inv.owners.values() for o in owners if o.kind == "pod"}
    for i, r in caps.iterrows():
        found = hosts.get(host_of(str(r["capture"])) or "", set())
        if len(found) == 1 and pd.isna(r["pod"]) and str(r["role"]) in POD_ROLES and \
                str(r["role_reason"]) not in EXPLICIT:
            pod = next(iter(found))
            caps.at[i, "pod"] = pod
            why = f"k8s: {pod}, as the other captures of {host_of(str(r['capture']))}"
            if pd.isna(r["node"]) and pod_nodes.get(pod):
                caps.at[i, "node"] = pod_nodes[pod]
            caps.at[i, "role_reason"] = f"{r['role_reason']}; {why}"
    # two pods that talk only to each other are both in every packet of either pod's captures: the pod another
    # host's captures already are is not this one (pod-b-eth0.pcap next to pod-a's, in-pod HBONE)
    claimed = {pod: h for h, pods in hosts.items() if len(pods) == 1 for pod in pods}
    for i, r in caps.iterrows():
        cap, h = str(r["capture"]), host_of(str(r["capture"]))
        if not h or not pd.isna(r["pod"]) or str(r["role"]) not in POD_ROLES or str(r["role_reason"]) in EXPLICIT:
            continue
        left = [o for o in candidates.get(cap, []) if claimed.get(o.display, h) == h]
        if len(left) == 1 and len(candidates[cap]) > 1:
            o = left[0]
            caps.at[i, "pod"] = o.display
            others = ", ".join(sorted(x.display for x in candidates[cap] if x is not o))
            why = f"k8s: {o.display} in every packet ({others} is another capture's pod)"
            if pd.isna(r["node"]) and o.node:
                caps.at[i, "node"] = o.node
            caps.at[i, "role_reason"] = f"{r['role_reason']}; {why}"
    # a ztunnel / waypoint capture on a known node: the one such pod of that node
    proxies: dict[tuple[str, str], set[str]] = defaultdict(set)
    for owners in inv.owners.values():
        for o in owners:
            if o.kind == "pod" and o.role and o.node:
                proxies[(o.role, o.node)].add(o.display)
    for i, r in caps.iterrows():
        role, node = str(r["role"]), r["node"] if isinstance(r["node"], str) else None
        found = proxies.get((role, node or ""), set())
        if role in ("ztunnel", "waypoint") and pd.isna(r["pod"]) and len(found) == 1 and \
                str(r["role_reason"]) not in EXPLICIT:
            caps.at[i, "pod"] = next(iter(found))
            caps.at[i, "role_reason"] = f"{r['role_reason']}; k8s: the {role} pod of {node}"
    # other captures named after a host that was placed: the same node
    mapping = {old: c.most_common(1)[0][0] for old, c in renamed.items() if len(c) == 1}
    for i, r in caps.iterrows():
        old = r["node"] if isinstance(r["node"], str) else None
        if old in mapping and str(r["role_reason"]) not in EXPLICIT:
            caps.at[i, "node"] = mapping[old]
            caps.at[i, "role_reason"] = f"{r['role_reason']}; node {old} is {mapping[old]} (k8s: captures of {old})"
    return caps, anomalies

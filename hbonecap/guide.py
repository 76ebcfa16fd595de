"""The capture guide behind `hbonecap plan`: which commands capture each point of the ambient data path, with
file names that hbonecap recognises (see hbonecap.capture.points), for the user's Istio generation.

Eras (shared/notes/ambient-wire.md): `geneve` = Istio experimental builds and 1.18-1.20 (istioout/istioin on the
node, pistioout/pistioin in the ztunnel pod, VNI 1001 out / 1000 in); `inpod` = Istio 1.21 and later (ztunnel's
sockets inside each pod's network namespace, no Geneve; plaintext legs on the pod's lo).
"""
from __future__ import annotations

import shlex

FILTER_NODE = "udp port 6081 or udp port 6082 or udp port 4789 or udp port 8472 or tcp port 15008"
DEBUG_IMAGE = "nicolaka/netshoot"


def _q(s: str) -> str:
    return shlex.quote(s)


def _pod_capture(ns: str, pod: str, iface: str, fname: str) -> list[str]:
    return [
        f"# {iface} of pod {ns}/{pod}: an ephemeral debug container shares the pod's network namespace",
        f"kubectl debug -q -i -n {_q(ns)} {_q(pod)} --image={DEBUG_IMAGE} --profile=netadmin -- "
        f"tcpdump -U -s 0 -i {iface} -w - > {_q(fname)}",
        "# or, on the pod's node, inside the pod's network namespace:",
        f"#   PID=$(crictl inspect --output go-template --template '{{{{.info.pid}}}}' "
        f"$(crictl ps -q --pod $(crictl pods -q --namespace {_q(ns)} --name {_q(pod)}) | head -1))",
        f"#   nsenter -t $PID -n tcpdump -U -s 0 -i {iface} -w {_q(fname)}",
    ]


def plan(era: str = "inpod", pods: list[tuple[str, str]] | None = None, nodes: list[str] | None = None) -> str:
    """The capture plan as text (shell commands with comments)."""
    if era not in ("geneve", "inpod"):
        raise ValueError("era must be geneve or inpod")
    pods = pods or [("NAMESPACE", "CLIENT-POD"), ("NAMESPACE", "SERVER-POD")]
    nodes = nodes or ["a", "b"]
    out = [f"# hbonecap capture plan for Istio ambient, era: {era}",
           "# Start every capture before reproducing the problem; stop them (Ctrl-C) after it.",
           "# Keep the file names: hbonecap reads the capture point and node from them",
           "# (or pass --point FILE=ROLE@NODE). Clocks may differ between nodes; hbonecap estimates the offsets",
           "# from traffic seen on two nodes, so capture both ends of the node-to-node hop.", ""]
    out.append("## 1. Node NICs (HBONE between nodes, port 15008; CNI overlays)")
    for n in nodes:
        out.append(f"# on node {n} (ssh, or: kubectl debug node/NODE-{n.upper()} -it --image={DEBUG_IMAGE} -- chroot /host)")
        out.append(f"tcpdump -U -s 0 -i any -w node-{n}-any.pcapng '{FILTER_NODE} or host POD-IP'")
        out.append(f"#   one NIC only: tcpdump -U -s 0 -i eth0 -w node-{n}-eth0.pcap ...")
    out.append("")
    if era == "geneve":
        out.append("## 2. Geneve devices on the node (inner frames: the pod's own packets)")
        for n in nodes:
            out.append(f"tcpdump -U -s 0 -i istioout -w node-{n}-istioout.pcap   # on node {n}: outbound, VNI 1001")
            out.append(f"tcpdump -U -s 0 -i istioin -w node-{n}-istioin.pcap     # on node {n}: inbound, VNI 1000")
        out.append("")
        out.append("## 3. The ztunnel pods (pistioout / pistioin inside, eth0 carries the outer Geneve)")
        for n in nodes:
            zt = f"ZTUNNEL-POD-ON-{n.upper()}"
            for iface in ("pistioout", "pistioin", "eth0"):
                out += _pod_capture("istio-system", zt, iface, f"ztunnel-{n}-{iface}.pcap")
        out.append("")
        step = 4
    else:
        step = 2
    out.append(f"## {step}. Application pods: eth0 (HBONE for mesh peers) and lo (the plaintext legs)")
    for ns, pod in pods:
        for iface in ("eth0", "lo"):
            if era == "geneve" and iface == "lo":
                continue
            out += _pod_capture(ns, pod, iface, f"pod-{pod}-{iface}.pcap")
    out.append("")
    out.append(f"## {step + 1}. Waypoints (if the service uses one)")
    out += _pod_capture("NAMESPACE", "WAYPOINT-POD", "eth0", "waypoint-WAYPOINT-eth0.pcap")
    out.append("")
    out.append(f"## {step + 2}. TLS key logs (what can and cannot be decrypted)")
    out += [
        "# ztunnel (Rust, every Istio release since 1.18) never writes TLS key logs: HBONE between ztunnels cannot be",
        "#   decrypted. hbonecap still lists those tunnels, their TLS record timelines and ties flows by timing and sizes",
        "#   (match='inferred' with a confidence).",
        "# Envoy (waypoints, gateways, sidecars, the era-A Envoy ztunnel) can write an NSS key log:",
        "#   CommonTlsContext.key_log {path: /var/run/keylog/keys.txt} in an EnvoyFilter on the HBONE transport socket,",
        "#   then: kubectl cp NAMESPACE/WAYPOINT-POD:/var/run/keylog/keys.txt keylog.txt",
        "# Key logs are secrets: keep them with the captures, never attach them to tickets. Or embed them:",
        "#   editcap --inject-secrets tls,keylog.txt waypoint-eth0.pcap waypoint-eth0.pcapng",
        "",
        f"## {step + 3}. Analyse",
        "hbonecap correlate *.pcap *.pcapng --keylog keylog.txt",
        "hbonecap report *.pcap *.pcapng --keylog keylog.txt -o report.html",
    ]
    return "\n".join(out) + "\n"

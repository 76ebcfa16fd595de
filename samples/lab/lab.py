#!/usr/bin/env python3
"""hbonecap ambient lab: real captures of era A/B (Geneve) and era C (in-pod) ambient data paths, with ground truth.

Run as root on Debian (from the repository root)::

    sudo python3 samples/lab/lab.py                 # every scenario -> samples/<scenario>/
    sudo python3 samples/lab/lab.py sequential bulk # some scenarios
    sudo python3 samples/lab/lab.py --cleanup       # remove what a killed run left behind
    sudo python3 samples/lab/lab.py --check-only    # report missing tools and exit

It checks (and with ``--install`` installs via apt-get / pip) what it needs, builds the
topology of ``topology.py`` in network namespaces ``hbl-*`` (the Geneve one for eras A/B, then,
torn down and rebuilt, ``InpodTopology`` for the in-pod scenarios ``inpod``/``inpod-vxlan``), runs each scenario with fresh
proxies and fresh tcpdump processes at every capture point, writes
``samples/<scenario>/{*.pcap,*.pcapng,keylog.txt,truth.json,logs/}`` and tears everything down:
processes stopped by PID, Open vSwitch stopped by PID, namespaces removed, also after a
failure or Ctrl-C. See samples/README.md for the scenarios and the truth.json schema.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pcapfiles  # noqa: E402
import pki  # noqa: E402
import topology as topo  # noqa: E402
import truth as truthmod  # noqa: E402

REPO = HERE.parent.parent
PYTHON = sys.executable

SERVICES = {
    # ClusterIP:port -> backend pod:port, optional waypoint. Exists only inside the lab.
    "10.96.0.10:80": {"name": "echo", "backend": "10.244.2.5:8080"},
    "10.96.0.20:80": {"name": "echo-wp", "backend": "10.244.2.5:8080", "waypoint": topo.WAYPOINT},
    "10.96.0.30:80": {"name": "closed", "backend": "10.244.2.5:9090"},
}
IDENTITIES = {
    "ztunnel-a": pki.spiffe_id("default", "sleep"),      # ztunnel A impersonates the client workload
    "ztunnel-b": pki.spiffe_id("default", "echo"),       # ztunnel B presents the destination identity
    "waypoint": pki.spiffe_id("default", "waypoint"),
}
BAGGAGE = ("k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,"
           "service.name=sleep,service.version=v1")

# name, namespace, interface, what it sees
CAPTURE_POINTS = [
    ("pod-a-eth0", "pod-a", "eth0", "client pod: plaintext app connection to the ClusterIP"),
    ("node-a-istioout", "node-a", "istioout", "node A Geneve device: inner Ethernet frames of the "
     "pod's outbound packets (VNI 1001)"),
    ("ztunnel-a-pistioout", "ztunnel-a", "pistioout", "ztunnel A Geneve device: inner frames, "
     "TPROXY to 15001"),
    ("ztunnel-a-eth0", "ztunnel-a", "eth0", "ztunnel A pod NIC: outer IPv4/UDP 6081/Geneve VNI 1001, "
     "HBONE to node B, plain replies to the client"),
    ("node-a-eth0", "node-a", "eth0", "node A underlay: HBONE between nodes"),
    ("node-b-eth0", "node-b", "eth0", "node B underlay: HBONE between nodes"),
    ("node-b-istioin", "node-b", "istioin", "node B Geneve device: inner frames to ztunnel B (VNI 1000)"),
    ("ztunnel-b-pistioin", "ztunnel-b", "pistioin", "ztunnel B Geneve device: inner frames, TPROXY "
     "to 15008"),
    ("ztunnel-b-eth0", "ztunnel-b", "eth0", "ztunnel B pod NIC: outer Geneve VNI 1000, HBONE replies, "
     "plaintext to the server pod"),
    ("pod-b-eth0", "pod-b", "eth0", "server pod: plaintext from ztunnel B"),
]
WAYPOINT_POINT = ("waypoint-eth0", "waypoint", "eth0", "waypoint pod: HBONE in (from ztunnel A) and out "
                  "(to pod B via ztunnel B)")
GENEVE_VNIS = {"ztunnel-a-eth0": [topo.VNI_OUT], "ztunnel-b-eth0": [topo.VNI_IN]}
# Era C (in-pod): ztunnel's sockets inside the pods; capture both pods' eth0 and lo, both node NICs.
INPOD_POINTS = [
    ("pod-a-lo", "pod-a", "lo", "client pod loopback: the app's connection after nftables REDIRECT "
     "(client -> 127.0.0.1:15001; replies from the original destination)"),
    ("pod-a-eth0", "pod-a", "eth0", "client pod NIC: HBONE from the pod IP to the destination pod :15008"),
    ("node-a-eth0", "node-a", "eth0", "node A NIC: HBONE between pod IPs (inside VXLAN 8472 in inpod-vxlan)"),
    ("node-b-eth0", "node-b", "eth0", "node B NIC: HBONE between pod IPs (inside VXLAN 8472 in inpod-vxlan)"),
    ("pod-b-eth0", "pod-b", "eth0", "server pod NIC: HBONE to the pod's own :15008 (in-pod ztunnel inbound)"),
    ("pod-b-lo", "pod-b", "lo", "server pod loopback: in-pod ztunnel -> app with the client pod IP as "
     "source (IP_TRANSPARENT)"),
]
ANY_POINTS = [(f"{name}-any", name, "any", f"tcpdump -i any in {name}")
              for name in ("pod-a", "node-a", "ztunnel-a", "node-b", "ztunnel-b", "pod-b")]
ANY_VNIS = {"node-a-any": [topo.VNI_OUT], "ztunnel-a-any": [topo.VNI_OUT],
            "node-b-any": [topo.VNI_IN], "ztunnel-b-any": [topo.VNI_IN]}


def req(dst: str, path: str) -> dict:
    return {"dst": dst, "path": path}


SCENARIOS: dict[str, dict] = {
    "sequential": {
        "description": "three sequential HTTP/1.1 requests, one TCP connection each, pooled on one "
                       "HBONE connection (streams 1, 3, 5); era A Envoy-ztunnel headers",
        "dialect": "envoy",
        "steps": [[req("10.96.0.10:80", "/")], [req("10.96.0.10:80", "/bytes/2000")],
                  [req("10.96.0.10:80", "/bytes/30000")]],
    },
    "concurrent": {
        "description": "ten concurrent client connections multiplexed as ten CONNECT streams on one "
                       "HBONE connection; Rust-ztunnel headers",
        "dialect": "rust",
        "steps": [[req("10.96.0.10:80", f"/bytes/{4000 + 500 * i}?delay=0.3") for i in range(10)]],
    },
    "bulk": {
        "description": "one 5 MiB download through one CONNECT stream (flow control: WINDOW_UPDATEs, "
                       "hundreds of DATA frames); Rust-ztunnel headers; packets after the first 200 "
                       "of each capture are cut to 128 bytes",
        "dialect": "rust",
        "steps": [[req("10.96.0.10:80", f"/bytes/{5 * 1024 * 1024}")]],
        "truncate": {"keep_whole": 200, "snaplen": 128},
    },
    "refused-503": {
        "description": "a connection to a Service whose backend port has no listener: ztunnel B's "
                       "connect is refused, it answers 503, ztunnel A resets the client; one good "
                       "request before and after on the same HBONE connection; era A headers",
        "dialect": "envoy",
        "steps": [[req("10.96.0.10:80", "/")], [req("10.96.0.30:80", "/")], [req("10.96.0.10:80", "/")]],
    },
    "waypoint": {
        "description": "two requests to a Service with a waypoint: ztunnel A -> HBONE -> waypoint "
                       "(terminates, re-originates) -> HBONE -> ztunnel B -> server; Rust-ztunnel "
                       "headers on the first hop, none on the second (Envoy)",
        "dialect": "rust",
        "steps": [[req("10.96.0.20:80", "/")], [req("10.96.0.20:80", "/bytes/5000")]],
        "waypoint": True,
    },
    "era-b-spoof": {
        "description": "era B (Istio 1.18-1.20) cross-node HBONE: ztunnel A's HBONE connection uses the "
                       "client pod's IP as source (IP_TRANSPARENT); node B's replies reach ztunnel A "
                       "through node A's istioin tunnel (VNI 1000); three requests, two concurrent; "
                       "Rust-ztunnel headers",
        "dialect": "rust",
        "spoof_source": True,
        "steps": [[req("10.96.0.10:80", "/bytes/1500")],
                  [req("10.96.0.10:80", "/bytes/2500"), req("10.96.0.10:80", "/bytes/3500")]],
        "extra_points": [
            ("node-a-istioin", "node-a", "istioin", "node A Geneve device istioin: inner frames of the HBONE "
             "replies to the spoofed client-pod address (VNI 1000)"),
            ("ztunnel-a-pistioin", "ztunnel-a", "pistioin", "ztunnel A Geneve device pistioin: the same at "
             "the ztunnel end, delivered to the transparent HBONE socket")],
        "geneve_vnis": {"ztunnel-a-eth0": [topo.VNI_IN, topo.VNI_OUT]},
    },
    "inpod": {
        "description": "era C (Istio 1.21+) in-pod redirection: the client's connections are REDIRECTed "
                       "inside pod A to the in-pod ztunnel's :15001, HBONE goes pod IP -> pod IP:15008 and is "
                       "terminated inside pod B, which connects to the app over lo with the client pod IP as "
                       "source; two sequential, three concurrent, one to a closed port (503); plain node NICs; "
                       "Rust-ztunnel headers",
        "dialect": "rust",
        "inpod": True,
        "overlay": "plain",
        "steps": [[req("10.96.0.10:80", "/")], [req("10.96.0.10:80", "/bytes/3000")],
                  [req("10.96.0.10:80", f"/bytes/{2000 + 1000 * i}?delay=0.1") for i in range(3)],
                  [req("10.96.0.30:80", "/")]],
    },
    "inpod-vxlan": {
        "description": "era C in-pod redirection as in inpod/, with the node-to-node link carrying the pod "
                       "traffic inside the kernel's VXLAN (VNI 42, UDP 8472, as flannel/Cilium): node NIC "
                       "captures show VXLAN/HBONE; one sequential, two concurrent, one to a closed port (503)",
        "dialect": "rust",
        "inpod": True,
        "overlay": "vxlan",
        "steps": [[req("10.96.0.10:80", "/bytes/1500")],
                  [req("10.96.0.10:80", "/bytes/2500?delay=0.1"), req("10.96.0.10:80", "/bytes/3500?delay=0.1")],
                  [req("10.96.0.30:80", "/")]],
    },
    "clock-offset": {
        "description": "four sequential requests; after capture every node-B file (node-b-*, "
                       "ztunnel-b-*, pod-b-*) is shifted with editcap -t by a known offset, as if node "
                       "B's clock ran ahead; era A headers",
        "dialect": "envoy",
        "steps": [[req("10.96.0.10:80", "/bytes/1000")] for _ in range(4)],
        "clock_offset_ns": {"node-b": 3_217_000},
    },
    "any-sll2": {
        "description": "three requests (two sequential, then two concurrent) captured with tcpdump -i any "
                       "in each namespace (LINKTYPE_LINUX_SLL2), written as pcapng with one named "
                       "interface per SLL2 interface index; Rust-ztunnel headers",
        "dialect": "rust",
        "steps": [[req("10.96.0.10:80", "/")], [req("10.96.0.10:80", "/bytes/3000")],
                  [req("10.96.0.10:80", "/bytes/4000"), req("10.96.0.10:80", "/bytes/5000")]],
        "any": True,
    },
}


WARMUP = {"description": "uncaptured warm-up over all Services", "dialect": "rust", "waypoint": True,
          "steps": [[req(vip, "/") for vip in SERVICES]]}


def log(msg: str) -> None:
    print(f"[lab {datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- dependencies

APT_PACKAGES = {"openvswitch-switch": ["ovs-vswitchd", "ovsdb-server", "ovs-vsctl"], "tcpdump": ["tcpdump"],
                "tshark": ["tshark", "editcap"], "nftables": ["nft"], "ethtool": ["ethtool"],
                "iproute2": ["ip"]}


def check_dependencies(install: bool) -> None:
    missing_pkgs = [pkg for pkg, tools in APT_PACKAGES.items() if any(shutil.which(t) is None for t in tools)]
    if missing_pkgs and install:
        log(f"installing with apt-get: {' '.join(missing_pkgs)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing_pkgs], check=False,
                       env=env)
        missing_pkgs = [pkg for pkg, tools in APT_PACKAGES.items()
                        if any(shutil.which(t) is None for t in tools)]
    missing_py = []
    for module, pip_name in (("h2", "h2>=4.1"), ("cryptography", "cryptography")):
        try:
            __import__(module)
        except ImportError:
            missing_py.append(pip_name)
    if missing_py and install:
        log(f"installing with pip: {' '.join(missing_py)}")
        subprocess.run([PYTHON, "-m", "pip", "install", *missing_py], check=False)
        missing_py = [m for m in missing_py if subprocess.run(
            [PYTHON, "-c", f"import {m.split('>')[0]}"], capture_output=True).returncode != 0]
    problems = []
    if missing_pkgs:
        problems.append("missing Debian packages: " + " ".join(missing_pkgs)
                        + "  (apt-get install " + " ".join(missing_pkgs) + ")")
    if missing_py:
        problems.append("missing Python packages: " + " ".join(missing_py)
                        + f"  ({PYTHON} -m pip install " + " ".join(missing_py) + ")")
    if not Path(topo.OVS_SCHEMA).exists():
        problems.append(f"missing {topo.OVS_SCHEMA} (package openvswitch-common)")
    if not Path("/dev/net/tun").exists():
        problems.append("missing /dev/net/tun (Open vSwitch's userspace datapath needs TAP devices)")
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, nftables, tcpdump)")
    if problems:
        for problem in problems:
            log("ERROR: " + problem)
        log("re-run with --install to let the lab install the packages")
        raise SystemExit(2)
    log("dependencies: all present")


@functools.lru_cache(maxsize=None)
def tool_versions() -> dict[str, str]:
    def first_line(*argv: str) -> str:
        try:
            out = subprocess.run(list(argv), capture_output=True, text=True)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            return "unknown"
    import h2
    import ssl
    return {"kernel": os.uname().release, "tcpdump": first_line("tcpdump", "--version"),
            "tshark": first_line("tshark", "--version"), "ovs": first_line("ovs-vswitchd", "--version"),
            "python": sys.version.split()[0], "openssl": ssl.OPENSSL_VERSION, "h2": h2.__version__}


# --------------------------------------------------------------------------- one scenario

class ScenarioRun:
    def __init__(self, name: str, spec: dict, procs: topo.Processes, workdir: Path, pkis: dict,
                 outdir: Path) -> None:
        self.name, self.spec, self.procs = name, spec, procs
        self.work = workdir / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = outdir / name
        self.pkis = pkis
        self.keylog = self.work / "keylog-raw.txt"
        self.keylog.touch()
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)

    def capture_points(self) -> list[tuple[str, str, str, str]]:
        if self.spec.get("any"):
            return ANY_POINTS
        if self.spec.get("inpod"):
            return INPOD_POINTS
        points = list(CAPTURE_POINTS)
        if self.spec.get("waypoint"):
            points.insert(6, WAYPOINT_POINT)
        for i, extra in enumerate(self.spec.get("extra_points", [])):
            points.insert(4 + i, extra)
        return points

    def start_daemon(self, name: str, netns: str, argv: list[str]):
        """Start without waiting; wait_ready() later (daemons start in parallel)."""
        popen = self.procs.start(name, netns, argv, stdout=subprocess.PIPE,
                                 stderr=open(self.logs / f"{name}.stderr", "w"), text=True)
        popen.lab_name = name
        return popen

    def wait_ready(self, *popens) -> None:
        for popen in popens:
            if popen is not None and "READY" not in popen.stdout.readline():
                raise RuntimeError(f"{popen.lab_name} did not start: see {self.logs / (popen.lab_name + '.stderr')}")

    def proxy_config(self, role: str, who: str, **extra) -> Path:
        cfg = {"role": role, "dialect": self.spec["dialect"], "cert": self.pkis[who]["cert"],
               "key": self.pkis[who]["key"], "ca": self.pkis["ca"]["cert"], "keylog": str(self.keylog),
               "log": str(self.logs / f"{who}.jsonl"), "baggage": BAGGAGE, "services": self.services(),
               **extra}
        path = self.work / f"{who}.json"
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def services(self) -> dict:
        out = {}
        for vip, svc in SERVICES.items():
            entry = dict(svc, backend_id=IDENTITIES["ztunnel-b"])
            if "waypoint" in svc:
                entry["waypoint_id"] = IDENTITIES["waypoint"]
            out[vip] = entry
        return out

    def run(self, capture: bool = True) -> dict | None:
        log(f"scenario {self.name}: {self.spec['description']}")
        started = time.time_ns()
        self.t0 = time.monotonic()
        server = self.start_daemon("server", "pod-b", [PYTHON, str(HERE / "apps.py"), "server",
                                                       str(self.logs / "server.jsonl"), "8080"])
        if self.spec.get("inpod"):
            # Era C: the ztunnel roles run inside the app pods' own namespaces.
            zt_b = self.start_daemon("ztunnel-b", "pod-b", [PYTHON, str(HERE / "hbone_proxy.py"), str(
                self.proxy_config("ztunnel-inbound", "ztunnel-b", listen_port=15008, transparent=False,
                                  spoof_upstream_source=True, so_mark=topo.ZTUNNEL_MARK))])
            zt_a = self.start_daemon("ztunnel-a", "pod-a", [PYTHON, str(HERE / "hbone_proxy.py"), str(
                self.proxy_config("ztunnel-outbound", "ztunnel-a", listen_port=15001, transparent=False,
                                  redirect=True, so_mark=topo.ZTUNNEL_MARK))])
            return self._run(started, capture, server, zt_b, None, zt_a)
        zt_b = self.start_daemon("ztunnel-b", "ztunnel-b", [PYTHON, str(HERE / "hbone_proxy.py"), str(
            self.proxy_config("ztunnel-inbound", "ztunnel-b", listen_port=15008, transparent=True))])
        wp = None
        if self.spec.get("waypoint"):
            wp = self.start_daemon("waypoint", "waypoint", [PYTHON, str(HERE / "hbone_proxy.py"), str(
                self.proxy_config("waypoint", "waypoint", listen_port=15008, transparent=False))])
        zt_a = self.start_daemon("ztunnel-a", "ztunnel-a", [PYTHON, str(HERE / "hbone_proxy.py"), str(
            self.proxy_config("ztunnel-outbound", "ztunnel-a", listen_port=15001, transparent=True,
                              spoof_source=bool(self.spec.get("spoof_source"))))])
        return self._run(started, capture, server, zt_b, wp, zt_a)

    def _run(self, started: int, capture: bool, server, zt_b, wp, zt_a) -> dict | None:
        self.wait_ready(server, zt_b, wp, zt_a)
        phases = {"daemons": time.monotonic()}

        # Captures: one tcpdump per capture point, all listening before any traffic.
        dumps = []
        for point, netns, iface, _ in (self.capture_points() if capture else []):
            raw = self.work / f"{point}.raw.pcap"
            argv = ["tcpdump", "-i", iface, "-n", "-U", "-Z", "root", "-s", "262144",
                    "--time-stamp-precision=nano", "-w", str(raw)]
            popen = self.procs.start(f"tcpdump {point}", netns, argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
            dumps.append((point, popen, raw))
        for point, popen, raw in dumps:
            lines = [popen.stderr.readline()]
            while lines[-1] and "listening on" not in lines[-1] and len(lines) < 5:
                lines.append(popen.stderr.readline())  # e.g. "data link type LINUX_SLL2" first
            if "listening on" not in lines[-1]:
                raise RuntimeError(f"tcpdump for {point} failed: {' '.join(lines).strip()}")
        time.sleep(0.3)
        phases["captures"] = time.monotonic()

        plan = self.work / "plan.json"
        plan.write_text(json.dumps({"steps": self.spec["steps"], "pause_s": 0.2}))
        client = self.procs.start("client", "pod-a", [PYTHON, str(HERE / "apps.py"), "client",
                                                      str(self.logs / "client.jsonl"), str(plan)],
                                  stdout=subprocess.DEVNULL, stderr=open(self.logs / "client.stderr", "w"))
        try:
            client.wait(120)
        except subprocess.TimeoutExpired:
            raise RuntimeError("client did not finish in 120 s")
        self.procs.stop(client)
        phases["client"] = time.monotonic()
        time.sleep(0.5)
        # Stop proxies (each closes its pooled HBONE connections gracefully), outbound first.
        for popen in (zt_a, wp, zt_b):
            if popen is not None:
                self.procs.stop(popen, signal.SIGTERM, timeout=10)
        # Packets wait in tcpdump's kernel ring until a block is full or its 1 s timeout retires it;
        # packets still waiting at SIGINT are lost ("received by filter" > "captured"). So wait longer
        # than that timeout. (--immediate-mode would avoid the wait, but with a 256 KiB snaplen its
        # TPACKET_V2 ring has only a few slots and -i any drops packets.)
        time.sleep(1.5)
        stats = {}
        for point, popen, raw in dumps:
            popen.send_signal(signal.SIGINT)
        for point, popen, raw in dumps:
            self.procs.stop(popen, signal.SIGINT, timeout=10)
            stats[point] = popen.stderr.read().strip().splitlines()
        self.procs.stop(server, signal.SIGTERM)
        phases["stopped"] = time.monotonic()
        self.phases = phases
        ended = time.time_ns()
        if not capture:
            return None
        return self.finish(started, ended, stats)

    # ------------------------------------------------------------------ outputs
    def finish(self, started: int, ended: int, stats: dict) -> dict:
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        (self.out / "logs").mkdir()
        # Key log: every line both TLS ends wrote, each secret once (NSS key log format).
        seen, lines = set(), []
        for line in self.keylog.read_text().splitlines():
            if line and not line.startswith("#") and line not in seen:
                seen.add(line)
                lines.append(line)
        (self.out / "keylog.txt").write_text("\n".join(lines) + "\n")
        for path in sorted(self.logs.glob("*.jsonl")):
            shutil.copy(path, self.out / "logs" / path.name)

        points = {}
        offsets = self.spec.get("clock_offset_ns", {})
        for point, netns, iface, sees in self.capture_points():
            raw = self.work / f"{point}.raw.pcap"
            vxlan = self.spec.get("overlay") == "vxlan" and netns.startswith("node-") and iface == "eth0"
            entry = {"namespace": topo.ns(netns), "node": node_of(netns), "interface": iface, "sees": sees,
                     "geneve_vnis": [] if self.spec.get("inpod") else
                     {**(ANY_VNIS if self.spec.get("any") else GENEVE_VNIS),
                      **self.spec.get("geneve_vnis", {})}.get(point, []),
                     "vxlan_vnis": [topo.VXLAN_VNI] if vxlan else [],
                     "clock_offset_ns": 0, "tcpdump": stats.get(point, []), "truncation": None}
            if self.spec.get("any"):
                ifnames = interface_names(netns)
                fname = f"{point}.pcapng"
                counts = pcapfiles.sll2_to_pcapng(raw, self.out / fname, ifnames,
                                                  f"hbonecap lab {self.name}: tcpdump -i any in {topo.ns(netns)}")
                entry.update(format="pcapng", linktype="LINUX_SLL2", interfaces=counts)
            else:
                fname = f"{point}.pcap"
                shutil.copy(raw, self.out / fname)
                entry.update(format="pcap", linktype="EN10MB")
                if "truncate" in self.spec:
                    entry["truncation"] = pcapfiles.truncate_after(self.out / fname, **self.spec["truncate"])
            node = node_of(netns)
            if node in offsets:
                shifted = self.out / (fname + ".tmp")
                seconds = f"{offsets[node] / 1e9:.9f}"
                out_format = "nsecpcap" if entry["format"] == "pcap" else "pcapng"
                subprocess.run(["editcap", "-F", out_format, "-t", seconds, str(self.out / fname), str(shifted)],
                               check=True, capture_output=True)
                shifted.replace(self.out / fname)
                entry["clock_offset_ns"] = offsets[node]
                entry["clock_offset_applied_with"] = f"editcap -t {seconds}"
            entry["file"] = fname
            points[point] = entry
        truth = truthmod.build(self, points, started, ended)
        (self.out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        size = sum(p.stat().st_size for p in self.out.rglob("*") if p.is_file())
        marks = list(self.phases.items()) + [("outputs", time.monotonic())]
        took = ", ".join(f"{name} {marks[i][1] - (marks[i - 1][1] if i else self.t0):.1f}s"
                         for i, (name, _) in enumerate(marks))
        log(f"scenario {self.name}: wrote {self.out} ({size / 1e6:.2f} MB; {took})")
        return truth


def node_of(netns: str) -> str:
    return {"pod-a": "node-a", "node-a": "node-a", "ztunnel-a": "node-a", "node-b": "node-b",
            "ztunnel-b": "node-b", "pod-b": "node-b", "waypoint": "node-b"}[netns]


def interface_names(netns: str) -> dict[int, str]:
    out = json.loads(topo.nsrun(netns, "ip", "-j", "link", "show").stdout)
    return {link["ifindex"]: link["ifname"] for link in out}


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help=f"scenarios to run (default all: {', '.join(SCENARIOS)})")
    parser.add_argument("--out", type=Path, default=REPO / "samples", help="output directory (default samples/)")
    parser.add_argument("--install", action="store_true", help="apt-get/pip install what is missing")
    parser.add_argument("--check-only", action="store_true", help="check dependencies and exit")
    parser.add_argument("--cleanup", action="store_true", help="remove hbl-* namespaces left by a killed run")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    if args.cleanup:
        topo.remove_namespaces(log)
        return 0
    check_dependencies(args.install)
    if args.check_only:
        return 0
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {unknown}")

    procs = topo.Processes()
    workdir = Path(tempfile.mkdtemp(prefix="hbonecap-lab-"))
    geneve_names = [n for n in names if not SCENARIOS[n].get("inpod")]
    inpod_names = [n for n in names if SCENARIOS[n].get("inpod")]
    topology = topo.Topology(workdir, procs, log)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    # Also SIGINT explicitly: a shell starting the lab in the background may have set it to ignore.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    status = 1
    try:
        pkis = pki.make_pki(workdir / "pki", IDENTITIES)
        if geneve_names:
            log("building topology (namespaces hbl-*, Open vSwitch userspace Geneve)")
            topology.build()
            # One uncaptured pass over every Service warms ARP and OVS tunnel neighbour caches, so the
            # scenarios do not start with a lost first SYN (as on a cluster that has been running).
            ScenarioRun("warmup", WARMUP, procs, workdir, pkis, workdir).run(capture=False)
            ScenarioRun("warmup-spoof", dict(WARMUP, spoof_source=True, steps=[[req("10.96.0.10:80", "/")]]),
                        procs, workdir, pkis, workdir).run(capture=False)
            for name in geneve_names:
                ScenarioRun(name, SCENARIOS[name], procs, workdir, pkis, args.out).run()
            topology.teardown()
        if inpod_names:
            # Era C needs another topology (no ztunnel pods, no Geneve): same namespace names, built anew.
            topology = topo.InpodTopology(workdir, procs, log)
            log("building in-pod topology (namespaces hbl-pod-a/-b, hbl-node-a/-b, kernel VXLAN)")
            topology.build()
            for name in inpod_names:
                spec = SCENARIOS[name]
                topology.set_overlay(spec["overlay"])
                warm = {"description": "uncaptured in-pod warm-up", "dialect": "rust", "inpod": True,
                        "overlay": spec["overlay"], "steps": [[req("10.96.0.10:80", "/")]]}
                ScenarioRun(f"warmup-{name}", warm, procs, workdir, pkis, workdir).run(capture=False)
                ScenarioRun(name, spec, procs, workdir, pkis, args.out).run()
        status = 0
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc}); tearing down")
        status = 130
    except Exception as exc:
        log(f"FAILED: {exc!r}; tearing down")
        import traceback
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        procs.stop_all()
        topology.teardown()
        if args.keep_workdir:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        log("teardown complete")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The lab topology: two ambient "nodes" in network namespaces, Geneve by Open vSwitch.

Everything lives in network namespaces named ``hbl-*`` that this module creates; the root
namespace only ever sees ``ip link add ... netns`` calls whose both ends are created directly
inside lab namespaces. Open vSwitch runs as private ``ovsdb-server``/``ovs-vswitchd`` pairs
(one pair per namespace that needs a tunnel endpoint, userspace ``netdev`` datapath, own
database and run directory), stopped by PID.

Addresses (all inside the lab namespaces)::

    pod-a       eth0 10.244.1.5/32  gw 10.244.1.1            client "sleep"
    node-a      eth0 172.18.0.2/16 (underlay), vethpoda 10.244.1.1/32,
                hbl-bz 10.244.1.1/24 (OVS bridge, port vethzta), istioout 192.168.127.1/30,
                istioin 192.168.126.1/30
    ztunnel-a   eth0 (OVS port of bridge hbl-br0 10.244.1.3/24), pistioout 192.168.127.2/30,
                pistioin 192.168.126.2/30
    node-b      eth0 172.18.0.3/16, vethpodb / vethwp 10.244.2.1/32,
                hbl-bz 10.244.2.1/24 (port vethztb), istioin 192.168.126.1/30
    ztunnel-b   eth0 (OVS port of hbl-br0 10.244.2.3/24), pistioin 192.168.126.2/30
    pod-b       eth0 10.244.2.5/32  server "echo" :8080
    waypoint    eth0 10.244.2.9/32  waypoint :15008

Data path (era A/B Geneve redirection, ambient-wire.md)::

    pod-a -> node-a (fwmark 0x100 from vethpoda, table 101: default via 192.168.127.2 dev istioout)
          -> Geneve VNI 1001 10.244.1.1 -> 10.244.1.3:6081 -> ztunnel-a pistioout
          -> nft TPROXY :15001 -> outbound proxy -> HBONE 10.244.1.3 -> <pod>:15008 via node underlay
    node-b (fwmark 0x200 for traffic to ambient pod 10.244.2.5 not coming from ztunnel-b,
            table 102: default via 192.168.126.2 dev istioin)
          -> Geneve VNI 1000 10.244.2.1 -> 10.244.2.3:6081 -> ztunnel-b pistioin
          -> nft TPROXY dport 15008 -> :15008 -> inbound proxy -> 10.244.2.5:8080
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "hbl-"
NAMESPACES = ["pod-a", "node-a", "ztunnel-a", "node-b", "ztunnel-b", "pod-b", "waypoint"]
OVS_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"

POD_A, ZTUNNEL_A, NODE_A_POD_GW = "10.244.1.5", "10.244.1.3", "10.244.1.1"
POD_B, ZTUNNEL_B, NODE_B_POD_GW, WAYPOINT = "10.244.2.5", "10.244.2.3", "10.244.2.1", "10.244.2.9"
NODE_A, NODE_B = "172.18.0.2", "172.18.0.3"
VNI_OUT, VNI_IN = 1001, 1000


def ns(name: str) -> str:
    return PREFIX + name


def run(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr.strip()}")
    return proc


def nsrun(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns(name), *args, check=check)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen


@dataclass
class Processes:
    """Every process the lab starts, so that all of them are stopped by PID."""
    items: list[Process] = field(default_factory=list)

    def start(self, name: str, netns: str, argv: list[str], **kwargs) -> subprocess.Popen:
        popen = subprocess.Popen(["ip", "netns", "exec", ns(netns), *argv], **kwargs)
        self.items.append(Process(name, popen))
        return popen

    def stop(self, popen: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        if popen.poll() is None:
            try:
                popen.send_signal(sig)
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(5)
        self.items = [p for p in self.items if p.popen is not popen]
        return popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.items)):
            self.stop(proc.popen, timeout=3)


class OvsInstance:
    """A private ovsdb-server + ovs-vswitchd inside one namespace."""

    def __init__(self, netns: str, workdir: Path) -> None:
        self.netns = netns
        self.dir = workdir / f"ovs-{netns}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = f"unix:{self.dir}/db.sock"
        self.env = {**os.environ, "OVS_RUNDIR": str(self.dir), "OVS_DBDIR": str(self.dir),
                    "OVS_LOGDIR": str(self.dir), "OVS_SYSCONFDIR": str(self.dir),
                    "OVS_PKGDATADIR": "/usr/share/openvswitch"}
        self.pids: list[int] = []

    def start(self) -> None:
        run("ovsdb-tool", "create", f"{self.dir}/conf.db", OVS_SCHEMA)
        for argv, pidfile in (
            (["ovsdb-server", f"{self.dir}/conf.db", f"--remote=punix:{self.dir}/db.sock",
              f"--unixctl={self.dir}/ovsdb.ctl", f"--log-file={self.dir}/ovsdb.log"], "ovsdb.pid"),
            (["ovs-vswitchd", self.db, f"--unixctl={self.dir}/vswitchd.ctl",
              f"--log-file={self.dir}/vswitchd.log"], "vswitchd.pid"),
        ):
            subprocess.run(["ip", "netns", "exec", ns(self.netns), *argv, f"--pidfile={self.dir}/{pidfile}",
                            "--detach", "--no-chdir"], check=True, env=self.env, capture_output=True)
            self.pids.append(int((self.dir / pidfile).read_text().strip()))
            if argv[0] == "ovsdb-server":
                self.vsctl("--no-wait", "init")

    def vsctl(self, *args: str) -> str:
        return run("ovs-vsctl", "--timeout=10", f"--db={self.db}", *args).stdout

    def appctl(self, *args: str) -> str:
        return run("ovs-appctl", "-t", f"{self.dir}/vswitchd.ctl", *args).stdout



def stop_pids(pids: list[int], timeout: float = 8.0) -> None:
    """SIGTERM all, wait together, SIGKILL what is left (daemons we started, by PID)."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _exists(pid)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of a daemon that detached is reaped by init; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def no_offloads(netns: str, dev: str) -> None:
    """Software checksums and no segmentation offloads, so that every capture point shows
    wire-sized packets with valid checksums (and OVS's af_packet ports see real frames)."""
    nsrun(netns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off",
          "gro", "off", check=False)


class Topology:
    def __init__(self, workdir: Path, procs: Processes, log=print) -> None:
        self.workdir = workdir
        self.procs = procs
        self.log = log
        self.ovs: dict[str, OvsInstance] = {}
        self.created: list[str] = []

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        for name in NAMESPACES:
            if Path(f"/run/netns/{ns(name)}").exists():
                raise RuntimeError(f"namespace {ns(name)} exists: a previous lab run did not clean up; "
                                   f"run `python3 samples/lab/lab.py --cleanup`")
        for name in NAMESPACES:
            run("ip", "netns", "add", ns(name))
            self.created.append(name)
            for cmd in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                        ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
                        ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"],
                        ["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"],
                        ["ip", "link", "set", "lo", "up"]):
                nsrun(name, *cmd)
        for node in ("node-a", "node-b"):
            nsrun(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")

        # veth pairs, created with both ends directly inside lab namespaces.
        self.veth("pod-a", "eth0", "node-a", "vethpoda")
        self.veth("ztunnel-a", "eth0", "node-a", "vethzta", mtu=1600)
        self.veth("node-a", "eth0", "node-b", "eth0")
        self.veth("pod-b", "eth0", "node-b", "vethpodb")
        self.veth("waypoint", "eth0", "node-b", "vethwp")
        self.veth("ztunnel-b", "eth0", "node-b", "vethztb", mtu=1600)

        # Underlay between the nodes.
        self.addr("node-a", "eth0", f"{NODE_A}/16")
        self.addr("node-b", "eth0", f"{NODE_B}/16")
        nsrun("node-a", "ip", "route", "add", "10.244.2.0/24", "via", NODE_B)
        nsrun("node-b", "ip", "route", "add", "10.244.1.0/24", "via", NODE_A)

        # Plain pods (Calico style: pod /32 with an on-link gateway, node side /32 + host route).
        for pod, node, dev, ip, gw in (("pod-a", "node-a", "vethpoda", POD_A, NODE_A_POD_GW),
                                       ("pod-b", "node-b", "vethpodb", POD_B, NODE_B_POD_GW),
                                       ("waypoint", "node-b", "vethwp", WAYPOINT, NODE_B_POD_GW)):
            self.addr(pod, "eth0", f"{ip}/32")
            nsrun(pod, "ip", "route", "add", gw, "dev", "eth0", "scope", "link")
            nsrun(pod, "ip", "route", "add", "default", "via", gw, "dev", "eth0")
            self.addr(node, dev, f"{gw}/32")
            nsrun(node, "ip", "route", "add", f"{ip}/32", "dev", dev)

        # Open vSwitch (userspace datapath) where a Geneve endpoint is needed.
        for name in ("node-a", "ztunnel-a", "node-b", "ztunnel-b"):
            inst = OvsInstance(name, self.workdir)
            self.ovs[name] = inst
            inst.start()
        # Node A has both tunnels (istioin carries the replies of era-B spoofed HBONE back to
        # ztunnel A); node B needs only istioin in these scenarios.
        self.node_ztunnel_link("node-a", "vethzta", NODE_A_POD_GW, "ztunnel-a", ZTUNNEL_A, [
            ("istioout", "192.168.127.1", "pistioout", "192.168.127.2", VNI_OUT),
            ("istioin", "192.168.126.1", "pistioin", "192.168.126.2", VNI_IN)])
        self.node_ztunnel_link("node-b", "vethztb", NODE_B_POD_GW, "ztunnel-b", ZTUNNEL_B, [
            ("istioin", "192.168.126.1", "pistioin", "192.168.126.2", VNI_IN)])

        # Node A: outbound redirection of the ambient pod's traffic into istioout.
        self.nft("node-a", """
table ip hbl_ambient {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname "vethpoda" ip saddr 10.244.1.5 ip daddr != 10.244.1.0/24 meta mark set mark | 0x100
    iifname "eth0" ip daddr 10.244.1.5 meta mark set mark | 0x200
  }
}""")
        nsrun("node-a", "ip", "rule", "add", "fwmark", "0x100/0x100", "lookup", "101", "priority", "100")
        nsrun("node-a", "ip", "route", "add", "default", "via", "192.168.127.2", "dev", "istioout",
              "table", "101")
        nsrun("node-a", "ip", "rule", "add", "fwmark", "0x200/0x200", "lookup", "102", "priority", "101")
        nsrun("node-a", "ip", "route", "add", "default", "via", "192.168.126.2", "dev", "istioin",
              "table", "102")
        # Node B: inbound redirection of traffic to the ambient pod into istioin
        # (not for ztunnel-b's own connections to the pod).
        self.nft("node-b", """
table ip hbl_ambient {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname != "hbl-bz" ip daddr 10.244.2.5 meta mark set mark | 0x200
  }
}""")
        nsrun("node-b", "ip", "rule", "add", "fwmark", "0x200/0x200", "lookup", "102", "priority", "100")
        nsrun("node-b", "ip", "route", "add", "default", "via", "192.168.126.2", "dev", "istioin",
              "table", "102")
        # ztunnels: TPROXY from the tunnel devices to the proxy ports.
        # ztunnel A also hands packets arriving on pistioin to its own transparent sockets
        # (replies to era-B HBONE connections whose source was the client pod's IP).
        for zt, rules in (("ztunnel-a", ['iifname "pistioout" meta l4proto tcp tproxy to :15001',
                                         'iifname "pistioin" meta l4proto tcp socket transparent 1',
                                         'iifname "pistioin" tcp dport 15008 tproxy to :15008']),
                          ("ztunnel-b", ['iifname "pistioin" meta l4proto tcp socket transparent 1',
                                         'iifname "pistioin" tcp dport 15008 tproxy to :15008'])):
            body = "\n".join(f"    {rule} meta mark set 0x400 accept" for rule in rules)
            self.nft(zt, f"""
table ip hbl_tproxy {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
{body}
  }}
}}""")
            nsrun(zt, "ip", "rule", "add", "fwmark", "0x400/0x400", "lookup", "100", "priority", "100")
            nsrun(zt, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")

        # Neighbour entries and the OVS tunnel neighbour cache get warmed by traffic itself.
        for name in NAMESPACES:
            for dev in self.devices(name):
                no_offloads(name, dev)

    def veth(self, ns1: str, dev1: str, ns2: str, dev2: str, mtu: int = 1500) -> None:
        run("ip", "link", "add", dev1, "netns", ns(ns1), "mtu", str(mtu), "type", "veth",
            "peer", "name", dev2, "netns", ns(ns2), "mtu", str(mtu))
        nsrun(ns1, "ip", "link", "set", dev1, "up")
        nsrun(ns2, "ip", "link", "set", dev2, "up")

    def addr(self, netns: str, dev: str, cidr: str) -> None:
        nsrun(netns, "ip", "addr", "add", cidr, "dev", dev)
        nsrun(netns, "ip", "link", "set", dev, "up")

    def nft(self, netns: str, ruleset: str) -> None:
        proc = subprocess.run(["ip", "netns", "exec", ns(netns), "nft", "-f", "-"], input=ruleset,
                              text=True, capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nft in {netns} failed: {proc.stderr}")

    def devices(self, netns: str) -> list[str]:
        out = nsrun(netns, "ip", "-o", "link", "show").stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if line.split(":")[1].strip() not in ("lo", "ovs-netdev")]

    def underlay_bridge(self, owner: str, phys: str, local_ip: str) -> None:
        """OVS bridge holding the namespace's address towards the node/ztunnel link, with the veth
        as uplink: OVS native tunnelling sends outer packets through a bridge like this one."""
        ovs = self.ovs[owner]
        under = "hbl-bz" if owner.startswith("node") else "hbl-br0"
        ip4 = [int(x) for x in local_ip.split(".")]
        ovs.vsctl("add-br", under, "--", "set", "bridge", under, "datapath_type=netdev",
                  "other-config:hwaddr=02:00:%02x:%02x:%02x:%02x" % tuple(ip4),
                  "--", "add-port", under, phys,
                  "--", "set", "interface", under, "mtu_request=1500")
        # The veth enslaved to OVS (af_packet) must not answer ARP for the bridge's address.
        nsrun(owner, "sysctl", "-qw", f"net.ipv4.conf.{phys}.arp_ignore=8")
        self.addr(owner, under, f"{local_ip}/24")

    def tunnel_end(self, owner: str, dev: str, tun_ip: str, remote: str, vni: int, mac_tail: str) -> None:
        """A Geneve device: OVS bridge <dev> (internal port = the device with the /30 address)
        whose only other port is a Geneve tunnel port to <remote> with key <vni>."""
        self.ovs[owner].vsctl(
            "add-br", dev, "--", "set", "bridge", dev, "datapath_type=netdev",
            f"other-config:hwaddr=02:00:{vni >> 8:02x}:{vni & 0xff:02x}:00:{mac_tail}",
            "--", "set", "interface", dev, "mtu_request=1500",
            "--", "add-port", dev, f"{dev}-gnv",
            "--", "set", "interface", f"{dev}-gnv", "type=geneve",
            f"options:remote_ip={remote}", f"options:key={vni}")
        self.addr(owner, dev, f"{tun_ip}/30")

    def node_ztunnel_link(self, node: str, node_port: str, node_ip: str, zt: str, zt_ip: str,
                          tunnels: list[tuple[str, str, str, str, int]]) -> None:
        """node <-> ztunnel pod: underlay bridges on both sides, then each Geneve pair
        (node_dev, node_tun_ip, zt_dev, zt_tun_ip, vni)."""
        self.underlay_bridge(node, node_port, node_ip)
        self.underlay_bridge(zt, "eth0", zt_ip)
        for node_dev, node_tun_ip, zt_dev, zt_tun_ip, vni in tunnels:
            self.tunnel_end(node, node_dev, node_tun_ip, zt_ip, vni, "01")
            self.tunnel_end(zt, zt_dev, zt_tun_ip, node_ip, vni, "02")
        # The node answers ARP for its pods towards the ztunnel (replies from ztunnel's
        # transparent sockets leave through eth0 as plain IP).
        nsrun(node, "sysctl", "-qw", "net.ipv4.conf.hbl-bz.proxy_arp=1")
        nsrun(zt, "ip", "route", "add", "default", "via", node_ip, "dev", "hbl-br0")

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        stop_pids([pid for inst in self.ovs.values() for pid in inst.pids])
        self.ovs.clear()
        remove_namespaces(self.log)


# --------------------------------------------------------------------------- era C (in-pod)

INPOD_NAMESPACES = ["pod-a", "node-a", "node-b", "pod-b"]
ZTUNNEL_MARK = 0x539        # istio-cni in-pod: ztunnel's own sockets (SO_MARK), never redirected
CONN_MARK = 0x111           # istio-cni in-pod: connections ztunnel opened with a spoofed source
INPOD_ROUTE_TABLE = 133     # istio-cni in-pod: "local 0.0.0.0/0 dev lo" for CONN_MARK packets
VXLAN_VNI, VXLAN_PORT = 42, 8472  # flannel's defaults (VNI 1, 8472); 42 so it is not mistaken for 1
VXLAN_NODE_IP = {"node-a": "10.244.1.0", "node-b": "10.244.2.0"}  # flannel: <pod cidr>.0/32 on the device


class InpodTopology(Topology):
    """Era C (Istio 1.21+): no ztunnel pods, no Geneve; ztunnel's sockets live inside each app pod.

    Namespaces ``hbl-pod-a``, ``hbl-node-a``, ``hbl-node-b``, ``hbl-pod-b`` (the same names as the
    Geneve topology, which is torn down before this one is built). Nodes route the other node's pod
    /24 either over the plain underlay or, after ``set_overlay("vxlan")``, over a kernel VXLAN
    device ``vxlan0`` (VNI 42, UDP 8472, point-to-point between the node underlay addresses), as
    flannel/Cilium do. Inside each pod, nftables rules modelled on istio-cni's in-pod rules:

    - nat output: TCP from the app (not marked 0x539, not to loopback or to the pod itself) is
      REDIRECTed to :15001 (the in-pod ztunnel's outbound listener);
    - ztunnel's sockets carry SO_MARK 0x539; its connections with a spoofed (non-pod) source get
      conntrack mark 0x111; the app's replies in those connections get fwmark 0x111 and are routed by
      table 133 (``local 0.0.0.0/0 dev lo``) back to ztunnel over lo.
    """

    def build(self) -> None:
        for name in INPOD_NAMESPACES:
            if Path(f"/run/netns/{ns(name)}").exists():
                raise RuntimeError(f"namespace {ns(name)} exists: a previous lab run did not clean up; "
                                   f"run `python3 samples/lab/lab.py --cleanup`")
        for name in INPOD_NAMESPACES:
            run("ip", "netns", "add", ns(name))
            self.created.append(name)
            for cmd in (["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                        ["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
                        ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"],
                        ["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0"],
                        ["ip", "link", "set", "lo", "up"]):
                nsrun(name, *cmd)
        for node in ("node-a", "node-b"):
            nsrun(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.veth("pod-a", "eth0", "node-a", "vethpoda")
        # Underlay MTU 1600: room for the 50-byte VXLAN header around 1500-byte pod packets.
        self.veth("node-a", "eth0", "node-b", "eth0", mtu=1600)
        self.veth("pod-b", "eth0", "node-b", "vethpodb")
        self.addr("node-a", "eth0", f"{NODE_A}/16")
        self.addr("node-b", "eth0", f"{NODE_B}/16")
        for pod, node, dev, ip, gw in (("pod-a", "node-a", "vethpoda", POD_A, NODE_A_POD_GW),
                                       ("pod-b", "node-b", "vethpodb", POD_B, NODE_B_POD_GW)):
            self.addr(pod, "eth0", f"{ip}/32")
            nsrun(pod, "ip", "route", "add", gw, "dev", "eth0", "scope", "link")
            nsrun(pod, "ip", "route", "add", "default", "via", gw, "dev", "eth0")
            self.addr(node, dev, f"{gw}/32")
            nsrun(node, "ip", "route", "add", f"{ip}/32", "dev", dev)
            self.inpod_rules(pod, ip)
        for node, local, remote in (("node-a", NODE_A, NODE_B), ("node-b", NODE_B, NODE_A)):
            nsrun(node, "ip", "link", "add", "vxlan0", "type", "vxlan", "id", str(VXLAN_VNI), "dstport",
                  str(VXLAN_PORT), "local", local, "remote", remote, "dev", "eth0")
            nsrun(node, "ip", "link", "set", "vxlan0", "mtu", "1500")
            self.addr(node, "vxlan0", f"{VXLAN_NODE_IP[node]}/32")
        self.overlay = None
        self.set_overlay("plain")
        for name in INPOD_NAMESPACES:
            for dev in self.devices(name):
                no_offloads(name, dev)

    def inpod_rules(self, pod: str, pod_ip: str) -> None:
        self.nft(pod, f"""
table ip hbl_inpod {{
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == {ZTUNNEL_MARK:#x} return
    ip daddr 127.0.0.0/8 return
    ip daddr {pod_ip} return
    meta l4proto tcp redirect to :15001
  }}
  chain output {{
    type route hook output priority mangle; policy accept;
    meta mark & 0xfff == {ZTUNNEL_MARK:#x} ip saddr != {pod_ip} ct mark set {CONN_MARK:#x}
    meta mark & 0xfff != {ZTUNNEL_MARK:#x} ct mark {CONN_MARK:#x} meta mark set {CONN_MARK:#x}
  }}
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "lo" ct mark {CONN_MARK:#x} meta mark set {CONN_MARK:#x}
  }}
}}""")
        nsrun(pod, "ip", "rule", "add", "fwmark", f"{CONN_MARK:#x}/0xfff", "lookup", str(INPOD_ROUTE_TABLE),
              "priority", "100")
        nsrun(pod, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(INPOD_ROUTE_TABLE))

    def set_overlay(self, mode: str) -> None:
        """Route the other node's pod /24 over the plain underlay or inside VXLAN."""
        for node, other, remote_pods in (("node-a", "node-b", "10.244.2.0/24"),
                                         ("node-b", "node-a", "10.244.1.0/24")):
            if mode == "vxlan":
                nsrun(node, "ip", "link", "set", "vxlan0", "up")
                nsrun(node, "ip", "route", "replace", remote_pods, "via", VXLAN_NODE_IP[other], "dev", "vxlan0",
                      "onlink")
            else:
                nsrun(node, "ip", "route", "replace", remote_pods, "via",
                      NODE_B if other == "node-b" else NODE_A, "dev", "eth0")
                nsrun(node, "ip", "link", "set", "vxlan0", "down")
        self.overlay = mode

    def teardown(self) -> None:
        remove_namespaces(self.log)


def remove_namespaces(log=print) -> None:
    for name in NAMESPACES:
        path = Path(f"/run/netns/{ns(name)}")
        if not path.exists():
            continue
        # Any process still inside is one the lab started (ovs, proxies, tcpdump): stop by PID.
        pids = run("ip", "netns", "pids", ns(name), check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        if pids:
            time.sleep(0.5)
            for pid in run("ip", "netns", "pids", ns(name), check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        run("ip", "netns", "del", ns(name), check=False)
        log(f"removed namespace {ns(name)}")


def check_tools() -> list[str]:
    missing = []
    for tool in ("ip", "nft", "tcpdump", "tshark", "editcap", "ethtool", "ovs-vswitchd", "ovsdb-server",
                 "ovs-vsctl", "ovsdb-tool", "ovs-appctl"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing

"""Decode benchmark: hbonecap against tshark and a dpkt parse loop on the same synthetic capture, in one run.

    python benchmarks/run.py [--packets 1000000] [--skip-tshark] [--skip-dpkt]

Each contender runs in its own process; the table gives wall time, packets/s, MB/s of capture, peak resident
memory (ru_maxrss of that process) and the ratio of hbonecap's packets/s to each baseline.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

DPKT_LOOP = r"""
import sys, dpkt, socket
n = 0
with open(sys.argv[1], 'rb') as f:
    for ts, buf in dpkt.pcap.Reader(f):
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP):
            l4 = ip.data
            if isinstance(l4, dpkt.udp.UDP) and l4.dport == 6081:
                vni = int.from_bytes(l4.data[4:7], 'big')
                inner = dpkt.ethernet.Ethernet(l4.data[8:])
                ip = inner.data
                l4 = ip.data if isinstance(ip, dpkt.ip.IP) else None
            if isinstance(l4, dpkt.tcp.TCP):
                fields = (ts, socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst), l4.sport, l4.dport)
        n += 1
print(n)
"""

DECODE_INPROC = r"""
import sys
from hbonecap.decode import decode_capture
r = decode_capture(sys.argv[1])
print(len(r.packets))
"""


def run(cmd: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--skip-tshark", action="store_true")
    ap.add_argument("--skip-dpkt", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from generate import generate

    DATA.mkdir(exist_ok=True)
    f = DATA / f"bench-{a.packets}.pcap"
    if not f.exists():
        generate(str(f), a.packets)
    size_mb = f.stat().st_size / 1e6
    hb = shutil.which("hbonecap") or "hbonecap"
    rows = []
    # warm the compiled walker's cache so every contender is timed steady-state
    run([sys.executable, "-c", DECODE_INPROC, str(f)])
    rows.append(("hbonecap decode (API, packets table)",) + run([sys.executable, "-c", DECODE_INPROC, str(f)]))
    out = DATA / "bench-packets.parquet"
    rows.append(("hbonecap decode CLI -> parquet",) + run([hb, "decode", str(f), "-f", "parquet", "-o", str(out)]))
    if not a.skip_tshark and shutil.which("tshark"):
        rows.append(("tshark -T fields",) + run(["tshark", "-r", str(f), "-T", "fields", "-e", "frame.time_epoch",
                                                 "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.srcport", "-e",
                                                 "tcp.dstport", "-e", "geneve.vni"]))
    if not a.skip_dpkt:
        rows.append(("dpkt parse loop",) + run([sys.executable, "-c", DPKT_LOOP, str(f)]))
    base = {name: a.packets / wall for name, wall, _ in rows}
    print(f"# decode benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"# file: {a.packets} packets, {size_mb:.0f} MB\n")
    print("| contender | wall s | packets/s | MB/s | peak RSS MB | x tshark | x dpkt |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, wall, rss in rows:
        pps = a.packets / wall
        xt = pps / base["tshark -T fields"] if "tshark -T fields" in base else float("nan")
        xd = pps / base["dpkt parse loop"] if "dpkt parse loop" in base else float("nan")
        print(f"| {name} | {wall:.2f} | {pps:,.0f} | {size_mb / wall:,.0f} | {rss:,.0f} | {xt:.1f} | {xd:.1f} |")


if __name__ == "__main__":
    main()

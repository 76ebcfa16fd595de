"""Decode benchmark: hbonecap against tshark and a dpkt parse loop on the same synthetic capture, in one run, and
the memory check on a multi-gigabyte capture set.

    python benchmarks/run.py [--packets 1000000] [--tshark-packets N] [--skip-tshark] [--skip-dpkt]
                             [--memory-set GB] [--jobs N]

Each contender runs in its own process. The table gives wall time (interpreter start-up and imports included),
CPU time (user + system of the process and its children), packets per wall second and per CPU second, MB/s of
capture per wall second, peak resident memory (ru_maxrss from wait4: the largest process) and the ratio of
packets per wall second to each baseline. The API row also reports the in-process throughput of
`decode_capture` alone (after imports and after loading the compiled kernels from numba's cache): its first run
(fresh memory, as a CLI process decodes) and the best of three. The capture is read once before each contender
(page cache warm for all: this VM's reclaim otherwise evicts it between rows). `--tshark-packets N` runs tshark
on a capture of N packets of the same mix instead (its packets/s fall with the file's size: ~10k packets/s at
200,000 packets, ~700 at 1,000,000 on this machine); the ratios are then of packets/s measured on different
sizes, which favours tshark.

`--memory-set GB`: a capture set of about GB gigabytes (hard links to the generated file under distinct names:
independent capture points of the same traffic) decoded by `hbonecap decode -f parquet -o DIR/` (streaming, one
Parquet file per capture point, `--jobs` processes) and by the API's streaming form (`PacketStream`), with their
peak RSS; and the in-memory API table (`decode_capture`) of one file, whose RSS grows with the file.
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

# The whole table in memory; prints the in-process decode time (wall and CPU) of the file after a warm-up that
# loads numba's cached kernels.
DECODE_INPROC = r"""
import sys, time
from hbonecap.decode import decode_capture
decode_capture(sys.argv[2])
runs = []
for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 1):
    t, c = time.perf_counter(), time.process_time()
    r = decode_capture(sys.argv[1])
    runs.append((time.perf_counter() - t, time.process_time() - c))
    n = len(r.packets)
    del r
best = min(runs)
print(n, runs[0][0], runs[0][1], best[0], best[1])
"""

# The streaming API over a capture set: parts are dropped as they come.
STREAM_INPROC = r"""
import sys, time
from hbonecap.decode import PacketStream
n = 0
t, c = time.perf_counter(), time.process_time()
for path in sys.argv[1:]:
    for part in PacketStream(path):
        n += len(part)
print(n, time.perf_counter() - t, time.process_time() - c)
"""


def run(cmd: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user + system, children included), peak RSS (MB) and stdout of one command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def warm(path: Path) -> None:
    """Read the file once so that every contender starts with it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def capture(packets: int) -> Path:
    sys.path.insert(0, str(HERE))
    from generate import generate

    DATA.mkdir(exist_ok=True)
    f = DATA / f"bench-{packets}.pcap"
    if not f.exists():
        generate(str(f), packets)
    return f


def decode_table(a) -> None:
    f = capture(a.packets)
    small = capture(20_000)
    size_mb = f.stat().st_size / 1e6
    hb = shutil.which("hbonecap") or "hbonecap"
    rows = []
    run([sys.executable, "-c", DECODE_INPROC, str(small), str(small)])       # numba's cache is filled
    warm(f)
    wall, cpu, rss, out = run([sys.executable, "-c", DECODE_INPROC, str(f), str(small)])
    n, dec_wall, dec_cpu = out.split()[:3]
    rows.append(("hbonecap decode (API, packets table in memory)", wall, cpu, rss))
    warm(f)
    best_wall, best_cpu = run([sys.executable, "-c", DECODE_INPROC, str(f), str(small), "3"])[3].split()[3:]
    ng = None
    if shutil.which("editcap"):                # the same packets as pcapng (Enhanced Packet Blocks)
        fng = f.with_suffix(".pcapng")
        if not fng.exists():
            subprocess.run(["editcap", "-F", "pcapng", str(f), str(fng)], check=True, capture_output=True)
        warm(fng)
        ng = run([sys.executable, "-c", DECODE_INPROC, str(fng), str(small)])[3].split()[1:3]
    out_dir = DATA / "bench-packets"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    warm(f)
    rows.append(("hbonecap decode CLI -> parquet (streaming)",)
                + run([hb, "decode", str(f), "-f", "parquet", "-o", str(out_dir)])[:3])
    counts = {}
    if not a.skip_tshark and shutil.which("tshark"):
        tp = a.tshark_packets or a.packets
        tf = capture(tp)
        warm(tf)
        name = "tshark -T fields" + (f" ({tp:,} packets)" if tp != a.packets else "")
        counts[name] = tp
        rows.append((name,) + run(["tshark", "-r", str(tf), "-T", "fields", "-e", "frame.time_epoch",
                                   "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.srcport", "-e",
                                   "tcp.dstport", "-e", "geneve.vni"])[:3])
    if not a.skip_dpkt:
        warm(f)
        rows.append(("dpkt parse loop",) + run([sys.executable, "-c", DPKT_LOOP, str(f)])[:3])
    help_wall = min(run([hb, "--help"])[0] for _ in range(3))
    base = {("tshark" if name.startswith("tshark") else name): counts.get(name, a.packets) / wall
            for name, wall, _, _ in rows}
    print(f"# decode benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"# file: {a.packets:,} packets, {size_mb:.0f} MB\n")
    print("| contender | wall s | CPU s | packets/s (wall) | packets/CPU-s | MB/s | peak RSS MB | x tshark | x dpkt |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, wall, cpu, rss in rows:
        k = counts.get(name, a.packets)
        pps = k / wall
        xt = pps / base["tshark"] if "tshark" in base else float("nan")
        xd = pps / base["dpkt parse loop"] if "dpkt parse loop" in base else float("nan")
        mb = size_mb * k / a.packets
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {pps:,.0f} | {k / cpu:,.0f} | {mb / wall:,.0f} | "
              f"{rss:,.0f} | {xt:.1f} | {xd:.1f} |")
    n = int(n)
    for label, w, c in (("first run", dec_wall, dec_cpu), ("best of 3", best_wall, best_cpu)):
        w, c = float(w), float(c)
        print(f"\nIn process, `decode_capture` alone (no start-up), {label}: {n:,} packets in {w:.2f} s wall / "
              f"{c:.2f} s CPU: {n / w:,.0f} packets/s wall, {n / c:,.0f} packets per CPU second, "
              f"{size_mb / w:,.0f} MB/s" + (f"; {n / w / base['tshark']:,.0f}x tshark's packets/s" if "tshark" in base
                                            else "") + ".")
    if ng:
        w, c = float(ng[0]), float(ng[1])
        print(f"\nThe same capture as pcapng (editcap -F pcapng), in process, first run: {n:,} packets in {w:.2f} s "
              f"wall / {c:.2f} s CPU: {n / w:,.0f} packets/s wall, {n / c:,.0f} packets per CPU second.")
    print(f"`hbonecap --help`: {help_wall:.2f} s (best of 3).")


def memory_check(a) -> None:
    f = capture(a.packets)
    per = f.stat().st_size
    count = max(1, -(-int(a.memory_set * 1e9) // per))     # at least GB gigabytes
    set_dir = DATA / f"memory-set-{count}x{a.packets}"
    set_dir.mkdir(exist_ok=True)
    files = []
    for i in range(count):
        link = set_dir / f"node{i}.pcap"
        if not link.exists():
            os.link(f, link)
        files.append(str(link))
    total = per * count
    hb = shutil.which("hbonecap") or "hbonecap"
    out_dir = DATA / "memory-set-parquet"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()          # an existing directory: one Parquet file per capture point
    rows = []
    wall, cpu, rss, _ = run([hb, "decode", *files, "-f", "parquet", "-o", str(out_dir), "-j", str(a.jobs)])
    rows.append((f"CLI decode -f parquet -o DIR -j {a.jobs} (streaming)", a.packets * count, wall, cpu, rss))
    written = sum(p.stat().st_size for p in out_dir.iterdir())
    shutil.rmtree(out_dir, ignore_errors=True)
    wall, cpu, rss, out = run([sys.executable, "-c", STREAM_INPROC, *files])
    rows.append(("API PacketStream over the set (1 process)", int(out.split()[0]), wall, cpu, rss))
    for k in (1, 2) if count >= 2 else (1,):
        wall, cpu, rss, _ = run([sys.executable, "-c", STREAM_INPROC, *files[:k]])
        rows.append((f"API PacketStream, {k} file(s)", a.packets * k, wall, cpu, rss))
    wall, cpu, rss, out = run([sys.executable, "-c", DECODE_INPROC, files[0], str(capture(20_000))])
    rows.append(("API decode_capture, 1 file, whole table in memory", a.packets, wall, cpu, rss))
    print(f"\n# memory check: {count} captures of {a.packets:,} packets, {total / 1e9:.2f} GB in all "
          f"(Parquet written: {written / 1e9:.2f} GB)\n")
    print("| run | packets | wall s | CPU s | packets/s (wall) | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, wall, cpu, rss in rows:
        print(f"| {name} | {n:,} | {wall:.1f} | {cpu:.1f} | {n / wall:,.0f} | {rss:,.0f} |")
    if a.cleanup:
        shutil.rmtree(set_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--tshark-packets", type=int, default=0, help="tshark on a capture of N packets (0: --packets)")
    ap.add_argument("--skip-tshark", action="store_true")
    ap.add_argument("--skip-dpkt", action="store_true")
    ap.add_argument("--skip-table", action="store_true", help="only the memory check")
    ap.add_argument("--memory-set", type=float, default=0.0, help="GB of captures for the memory check (0: none)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cleanup", action="store_true", help="remove the memory set's links afterwards")
    a = ap.parse_args()
    if not a.skip_table:
        decode_table(a)
    if a.memory_set:
        memory_check(a)


if __name__ == "__main__":
    main()

"""Scale-out benchmark: the same capture set analysed by a Dask LocalCluster with 1 and with 2 worker processes.

    python benchmarks/scaling.py [--captures 4] [--packets 100000] [--engine pandas|dask]

Prints wall time, seconds per GB of capture and the speed-up. Against an existing cluster, pass
`scheduler="tcp://host:8786"` to `hbonecap.analyze` (or `--scheduler` on the command line) instead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captures", type=int, default=4)
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--engine", choices=("pandas", "dask"), default="pandas",
                    help="dask: the packets table stays on the workers and correlation's joins run there")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from generate import generate

    import hbonecap
    from dask.distributed import Client, LocalCluster

    d = HERE / "data" / f"scaling-{a.captures}x{a.packets}"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(a.captures):
        f = d / f"node-{chr(97 + i)}-eth0.pcap"
        if not f.exists():
            generate(str(f), a.packets, seed=i + 1)
        files.append(f)
    gb = sum(f.stat().st_size for f in files) / 1e9
    rows = []
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            client.run(lambda: __import__("hbonecap.decode"))   # imports outside the timing
            hbonecap.analyze(files[:1], scheduler=client, correlate=False)   # warm the compiled decoders
            t = time.perf_counter()
            r = hbonecap.analyze(files, scheduler=client, engine=a.engine)
            if a.engine == "dask":
                r.packets.persist()      # the table itself, not only what correlation read of it
            rows.append((workers, time.perf_counter() - t))
    print(f"# {a.captures} captures x {a.packets} packets, {gb:.2f} GB, engine {a.engine}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| workers | wall s | s per GB | speed-up |")
    print("|---:|---:|---:|---:|")
    for w, t in rows:
        print(f"| {w} | {t:.1f} | {t / gb:.1f} | {rows[0][1] / t:.2f} |")


if __name__ == "__main__":
    main()

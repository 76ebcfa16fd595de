"""Scale-out: rotated captures as one point, a real Dask LocalCluster (separate worker processes), a worker
killed mid-run, Parquet datasets written and loaded back."""
from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

import hbonecap
from hbonecap.api import group_rotated
from hbonecap.cli import app
from tests.conftest import SAMPLES

SCENARIO = SAMPLES / "concurrent"


def _need_samples():
    if not (SCENARIO / "truth.json").exists():
        pytest.skip(f"lab sample {SCENARIO} not found")


def _assert_same(a, b, tables=hbonecap.Analysis.TABLES):
    for n in tables:
        pd.testing.assert_frame_equal(a.table(n).reset_index(drop=True), b.table(n).reset_index(drop=True),
                                      check_categorical=False, obj=n)


@pytest.fixture(scope="module")
def serial():
    _need_samples()
    return hbonecap.analyze(SCENARIO, keylog=SCENARIO / "keylog.txt")


def test_rotation_names_group_in_order():
    files = ["d/n-eth0.pcap2", "d/n-eth0.pcap", "d/n-eth0.pcap10", "d/n-eth0.pcap1", "d/p.pcap",
             "d/z-20261122-041300.pcap", "d/z-20261122-041200.pcap", "d/solo-20261122-041300.pcapng"]
    groups = dict(group_rotated(files))
    assert groups["d/n-eth0.pcap"] == ["d/n-eth0.pcap", "d/n-eth0.pcap1", "d/n-eth0.pcap2", "d/n-eth0.pcap10"]
    assert groups["d/z.pcap"] == ["d/z-20261122-041200.pcap", "d/z-20261122-041300.pcap"]
    assert groups["d/p.pcap"] == ["d/p.pcap"] and "d/solo-20261122-041300.pcapng" in groups


def test_rotated_files_are_one_capture_point(tmp_path, serial):
    src = SCENARIO / "node-a-eth0.pcap"
    data = src.read_bytes()
    header, pos, records = data[:24], 24, []
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    while pos + 16 <= len(data):
        (incl,) = struct.unpack_from(endian + "I", data, pos + 8)
        records.append(data[pos:pos + 16 + incl])
        pos += 16 + incl
    chunks = [records[i:i + 25] for i in range(0, len(records), 25)]
    assert len(chunks) >= 3
    for i, chunk in enumerate(chunks):          # tcpdump -C names: x.pcap, x.pcap1, x.pcap2 ...
        (tmp_path / f"node-a-eth0.pcap{i or ''}").write_bytes(header + b"".join(chunk))
    rotated = hbonecap.analyze(tmp_path, keylog=SCENARIO / "keylog.txt")
    whole = hbonecap.analyze(src, keylog=SCENARIO / "keylog.txt")
    assert list(rotated.captures["capture"]) == ["node-a-eth0.pcap"]
    assert rotated.captures["path"].iloc[0].count(";") == len(chunks) - 1
    cols = [c for c in whole.packets.columns if c != "frame_offset"]   # offsets are per file
    pd.testing.assert_frame_equal(rotated.packets[cols], whole.packets[cols], check_categorical=False)
    _assert_same(rotated, whole, ("connections", "tunnels", "streams", "requests"))


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("dask.distributed")
    from dask.distributed import Client, LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                     host="127.0.0.1", silence_logs=40)
    client = Client(c)
    yield c, client
    client.close()
    c.close()


def test_dask_cluster_equals_serial(cluster, serial):
    _, client = cluster
    a = hbonecap.analyze(SCENARIO, keylog=SCENARIO / "keylog.txt", scheduler=client)
    assert len(client.scheduler_info()["workers"]) == 2
    _assert_same(a, serial)


def test_dask_engine_keeps_packets_on_the_cluster(cluster, serial, tmp_path):
    _, client = cluster
    a = hbonecap.analyze(SCENARIO, keylog=SCENARIO / "keylog.txt", scheduler=client, engine="dask")
    assert hasattr(a.packets, "npartitions") and a.packets.npartitions == len(serial.captures)
    _assert_same(a, serial, ("captures", "connections", "flows", "hops", "clock", "latency"))
    got = a.packets.compute().sort_values(["capture", "index"]).reset_index(drop=True)
    want = serial.packets.sort_values(["capture", "index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_categorical=False)
    a.save(tmp_path / "out", "parquet")          # written by the workers, partitioned by capture
    back = hbonecap.load(tmp_path / "out")
    assert len(back.packets) == len(serial.packets)


def test_worker_killed_mid_run(cluster, serial):
    c, client = cluster
    result = {}

    def run():
        result["a"] = hbonecap.analyze(SCENARIO, keylog=SCENARIO / "keylog.txt", scheduler=client)

    t = threading.Thread(target=run)
    t.start()
    killed = None
    deadline = time.time() + 60
    while killed is None and time.time() < deadline and t.is_alive():
        busy = [addr for addr, tasks in client.processing().items() if tasks]
        if busy:
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.005)
    t.join(300)
    assert killed is not None, "no task was seen running"
    assert "a" in result
    _assert_same(result["a"], serial)


def test_parquet_dataset_round_trip(serial, tmp_path):
    serial.save(tmp_path / "out", "parquet")
    assert (tmp_path / "out" / "packets").is_dir() and any((tmp_path / "out" / "packets").iterdir())
    back = hbonecap.load(tmp_path / "out")
    _assert_same(back, serial, [n for n in hbonecap.Analysis.TABLES])


def test_scheduler_without_dask_says_how_to_install(monkeypatch, tmp_path):
    _need_samples()
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    r = CliRunner().invoke(app, ["correlate", str(SCENARIO / "pod-a-eth0.pcap"), "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 2 and "pip install 'hbonecap[dask]'" in r.output


def test_unreachable_scheduler_is_a_clear_error():
    _need_samples()
    pytest.importorskip("dask.distributed")
    r = CliRunner().invoke(app, ["correlate", str(SCENARIO / "pod-a-eth0.pcap"), "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 2 and "cannot reach the Dask scheduler" in r.output


def _sorted_tcp(t):
    return t.sort_values(["cap", "ts", "leg", "seq", "ack", "flags"], kind="stable").reset_index(drop=True)


def test_legs_and_packet_join_run_on_the_cluster(cluster, serial):
    """With engine="dask" the per-packet leg work and the cross-capture packet join are tasks on the workers, and
    give what the pandas path gives."""
    from distributed import get_task_stream

    from hbonecap.analysis.clock import packet_deltas
    from hbonecap.analysis.cluster import legs_on_cluster
    from hbonecap.analysis.legs import build_legs

    _, client = cluster
    a = hbonecap.analyze(SCENARIO, keylog=SCENARIO / "keylog.txt", scheduler=client, engine="dask",
                         correlate=False)
    caps = list(serial.captures["capture"])
    local = build_legs(serial.packets)
    with get_task_stream(client) as ts:
        remote = legs_on_cluster(a.packets, caps)
        assert hasattr(remote.tcp, "npartitions")            # the per-packet rows stay on the cluster
        groups = {c: c.split("-")[1] if c.startswith(("node", "ztunnel", "pod")) else c for c in caps}
        gmap_l = {i: groups[c] for i, c in enumerate(local.captures)}
        gmap_r = {i: groups[c] for i, c in enumerate(remote.captures)}
        d_remote = packet_deltas(remote, gmap_r)
    names = {t["key"].split("-")[0] if isinstance(t["key"], str) else str(t["key"][0]) for t in ts.data}
    assert any("legs_of_partition" in n for n in names), names
    assert any(n.startswith(("merge", "hash-join", "hashjoin")) for n in names), names   # a join on the workers
    assert remote.captures == local.captures
    pd.testing.assert_frame_equal(remote.legs.reset_index(drop=True), local.legs.reset_index(drop=True),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(remote.lconns, local.lconns, check_dtype=False)
    pd.testing.assert_frame_equal(_sorted_tcp(remote.tcp.compute()), _sorted_tcp(local.tcp))
    d_local = packet_deltas(local, gmap_l)
    assert len(d_local) > 100                                 # node a and node b share every connection
    pd.testing.assert_frame_equal(d_remote.reset_index(drop=True), d_local.reset_index(drop=True),
                                  check_dtype=False)


def test_a_capture_split_over_partitions_is_shuffled_whole(cluster, serial):
    """A packets table partitioned without regard to captures (here: row blocks) still gives the same legs."""
    import dask.dataframe as dd

    from hbonecap.analysis.cluster import legs_on_cluster
    from hbonecap.analysis.legs import build_legs

    _, client = cluster
    pk = serial.packets
    ddf = dd.from_pandas(pk, npartitions=7, sort=False)
    caps = list(serial.captures["capture"])
    remote = legs_on_cluster(ddf, caps)
    local = build_legs(pk)
    pd.testing.assert_frame_equal(remote.legs.reset_index(drop=True), local.legs.reset_index(drop=True),
                                  check_dtype=False)
    pd.testing.assert_frame_equal(_sorted_tcp(remote.tcp.compute()), _sorted_tcp(local.tcp))


def test_two_analyses_with_the_same_file_names_on_one_cluster(cluster, serial):
    """Lab scenarios share file names (node-a-eth0.pcap ...): an analysis whose packets are still held on the
    cluster must not hand its results to the next analysis of other files with the same names."""
    _, client = cluster
    other = SAMPLES / "sequential"
    first = hbonecap.analyze(other, keylog=other / "keylog.txt", scheduler=client, engine="dask")
    second = hbonecap.analyze(SCENARIO, keylog=SCENARIO / "keylog.txt", scheduler=client, engine="dask")
    assert len(first.flows) != len(second.flows)
    _assert_same(second, serial, ("captures", "connections", "flows", "hops", "clock", "latency", "requests"))
    assert first.packets.npartitions == second.packets.npartitions    # both still held on the cluster

"""One capture's stream stages split by connection over several analyzers (`StreamAnalyzer(share=)`, one big
capture on several cores): merged, the shares' results equal one analyzer's, row for row and in order (tunnels,
streams, requests, anomalies, header blocks, record timelines), on every lab sample and every conformance capture
with its key log; and `analyze(jobs=2)` of a single capture point splits it and gives the tables of `jobs=1`."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

import hbonecap
from conformance_oracles import CONFORMANCE, all_captures, keylog_path
from hbonecap import api
from hbonecap.api import analyze_capture, stream_share
from hbonecap.errors import CaptureError
from hbonecap.streams.tls.keylog import load

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (ROOT / "samples").glob("*/*.pcap*"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _same_as_whole(path, keylog, n: int) -> list:
    """Compare the merged shares with one analyzer; returns the shares' results."""
    kl = load(keylog) if keylog else None
    try:
        whole = analyze_capture(path, keylog=kl, packets=False)
    except CaptureError:
        pytest.skip(f"{path}: not a capture hbonecap reads")
    res = analyze_capture(path, keylog=kl, packets=False, share=(0, n))
    parts = [res.streams_detail] + [stream_share(path, keylog=kl, share=(k, n)) for k in range(1, n)]
    res.add_shares(parts[1:])
    for name in ("tunnels", "streams", "requests", "anomalies", "captures"):
        pd.testing.assert_frame_equal(getattr(whole, name), getattr(res, name), obj=f"{path} {name}")
    a, b = whole.streams_detail, res.streams_detail
    assert a.http2_headers == b.http2_headers
    assert list(a.records) == list(b.records) and a.records == b.records
    assert list(a.tunnel_bytes) == list(b.tunnel_bytes)
    return parts


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_lab_sample_shares_merge_to_one_analyzer(path):
    keylog = path.parent / "keylog.txt"
    _same_as_whole(path, keylog if keylog.exists() else None, 3)


@pytest.mark.conformance
@pytest.mark.parametrize("capture", all_captures() or ["(absent)"])
def test_conformance_shares_merge_to_one_analyzer(capture):
    if capture == "(absent)":
        pytest.skip(f"conformance captures absent: {CONFORMANCE}")
    _same_as_whole(CONFORMANCE / capture, keylog_path(capture), 2)


def test_analyze_splits_one_capture_over_two_processes(tmp_path, monkeypatch):
    """The mesh benchmark's node-a capture alone (one point): with jobs=2 one process builds its tables and one
    runs its stream stages; with jobs=3 two share its connections (each analyses some: the merge is not one
    share's alone); every table equals jobs=1's."""
    import mesh

    m = mesh.generate(tmp_path / "mesh", mb=8, seed=3, streams_per_connection=4, largest=100_000)
    node = m.files["node-a-eth0"]
    monkeypatch.setattr(api, "MIN_SHARE_BYTES", 1 << 10)
    assert api._share_counts([(str(node), [str(node)])], 3) == [3]
    parts = _same_as_whole(node, m.keylog, 2)
    assert all(len(p.tunnels) for p in parts), [len(p.tunnels) for p in parts]
    one = hbonecap.analyze(str(node), keylog=str(m.keylog), jobs=1, packets=False)
    for jobs in (2, 3):
        split = hbonecap.analyze(str(node), keylog=str(m.keylog), jobs=jobs, packets=False)
        for name in ("captures", "connections", "tunnels", "streams", "requests", "anomalies", "flows", "hops",
                     "tunnel_records"):
            pd.testing.assert_frame_equal(getattr(one, name), getattr(split, name), obj=f"jobs={jobs} {name}")
        assert len(split.streams) == len(m.truth["connections"])


def test_share_counts_split_only_points_over_a_fair_share(tmp_path, monkeypatch):
    """Processes per capture point: a point bigger than all bytes / jobs is split (alone, or beside small points),
    points of similar size are not, never under MIN_SHARE_BYTES per process nor over `jobs`."""
    monkeypatch.setattr(api, "MIN_SHARE_BYTES", 1 << 20)

    def points(*mb):
        out = []
        for i, n in enumerate(mb):
            f = tmp_path / f"p{i}-{n}.pcap"
            with open(f, "wb") as fh:
                fh.truncate(int(n * (1 << 20)))
            out.append((str(f), [str(f)]))
        return out

    assert api._share_counts(points(100), 2) == [2]
    assert api._share_counts(points(100), 8) == [8]
    assert api._share_counts(points(100), 200) == [100]      # at least MIN_SHARE_BYTES each
    assert api._share_counts(points(100, 1, 1), 2) == [2, 1, 1]
    assert api._share_counts(points(50, 50, 50, 50), 2) == [1, 1, 1, 1]
    assert api._share_counts(points(1.5), 2) == [1]          # two shares would be under 1 MB
    assert api._share_counts([], 2) == []

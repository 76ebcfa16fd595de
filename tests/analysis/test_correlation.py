"""Correlation across captures, checked against the lab's ground truth (samples/<scenario>/truth.json) and on
the conformance duplicate groups (../shared/conformance/SPLIT.tsv, XCORR:<group>).

Truth files come from the lab's own logs (samples/lab/lab.py), independent of hbonecap.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hbonecap
from hbonecap import tables
from hbonecap.analysis.correlation import correlate

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
CONFORMANCE = (ROOT / ".." / "shared" / "conformance").resolve()
REQUIRED = ("sequential", "concurrent", "bulk", "refused-503", "waypoint", "clock-offset", "any-sll2")
# the required scenarios (skipped visibly when absent) and any other the lab produced
SCENARIOS = tuple(dict.fromkeys(REQUIRED + tuple(sorted(p.parent.name for p in SAMPLES.glob("*/truth.json")))))

# truth event name -> hops.event, per hop kind
TCP_EVENTS = {"syn": "syn", "syn_ack": "syn_ack", "first_data_c2s": "first_request_byte",
              "first_data_s2c": "first_response_byte", "fin_c2s": "fin", "fin_s2c": "fin_s2c"}
HBONE_EVENTS = {"connect": "connect", "response": "connect_response", "first_data_c2s": "first_request_byte",
                "first_data_s2c": "first_response_byte", "end_stream_c2s": "fin", "end_stream_s2c": "fin_s2c"}


@functools.lru_cache(maxsize=None)
def _load(scenario: str):
    d = SAMPLES / scenario
    truth = json.loads((d / "truth.json").read_text())
    keylog = d / truth.get("keylog", "keylog.txt")
    a = hbonecap.analyze(str(d), keylog=str(keylog) if keylog.exists() else None)
    return truth, a, correlate(a)


@pytest.fixture(params=SCENARIOS)
def scenario(request):
    d = SAMPLES / request.param
    if not (d / "truth.json").exists():
        pytest.skip(f"lab scenario {request.param!r} not found at {d} (run samples/lab/lab.py)")
    return _load(request.param)


def _ns(v):
    return v["ns"] if isinstance(v, dict) else v


def _flow_of(flows: pd.DataFrame, client: str) -> pd.DataFrame:
    return flows[flows["client"] == client]


def test_tables_have_declared_schemas(scenario):
    _, _, r = scenario
    for name in ("flows", "hops", "clock", "latency", "anomalies"):
        assert list(r[name].columns) == tables.columns(name), name
        for c, dt in tables.dtypes(name).items():
            assert str(r[name][c].dtype) == str(pd.Series([], dtype=dt).dtype), (name, c)


def test_every_truth_connection_is_one_flow(scenario):
    truth, _, r = scenario
    flows = r["flows"]
    for c in truth["connections"]:
        f = _flow_of(flows, c["client"])
        assert len(f) == 1, f"{c['id']} {c['client']}: {len(f)} flows"
        f = f.iloc[0]
        assert f["original_dst"] == c["original_dst"], c["id"]
        assert f["outcome"] == c["outcome"], (c["id"], f["outcome"], c["outcome"])
        hb = [h for h in c["hops"] if h["kind"] == "hbone"]
        if hb:
            assert f["hbone_client"] == hb[0]["client"], c["id"]
            assert f["hbone_server"] == hb[0]["server"], c["id"]
            assert f["stream_id"] == hb[0]["stream_id"], (c["id"], f["stream_id"], hb[0]["stream_id"])
            assert f["stream_ids"] == ";".join(str(h["stream_id"]) for h in hb), c["id"]
            assert f["status"] == (hb[0].get("status") or c.get("hbone_status")), c["id"]
        assert f["match"] in ("exact", "inferred")
        assert 0 < f["confidence"] <= 1


def test_end_to_end_hops(scenario):
    """Every hop of the truth is a hop of the flow, in order, with its TCP connection or HBONE stream."""
    truth, _, r = scenario
    flows, hops = r["flows"], r["hops"]
    for c in truth["connections"]:
        fid = _flow_of(flows, c["client"])["flow_id"].iloc[0]
        mine = hops[hops["flow_id"] == fid].drop_duplicates("hop_index").sort_values("hop_index")
        assert len(mine) >= len(c["hops"]), (c["id"], list(mine["hop"]))
        for i, h in enumerate(c["hops"]):
            row = mine.iloc[i]
            assert row["kind"] == h["kind"], (c["id"], i)
            assert row["connection"] == f"{h['client']} > {h['server']}", (c["id"], i, row["connection"])
            if h["kind"] == "hbone":
                assert row["stream_id"] == h["stream_id"], (c["id"], i)


def test_waypoint_tied_end_to_end():
    d = SAMPLES / "waypoint"
    if not (d / "truth.json").exists():
        pytest.skip(f"lab scenario 'waypoint' not found at {d}")
    truth, _, r = _load("waypoint")
    flows = r["flows"]
    for c in truth["connections"]:
        f = _flow_of(flows, c["client"]).iloc[0]
        assert f["hops"] == len(c["hops"]) == 4
        assert f["dst_pod"] == c["backend"]
        assert "waypoint" in f["path"]


def test_truth_hop_times_agree(scenario):
    """Times of the same packets: the truth's per-capture times equal a.hops' raw times within 0.1 ms."""
    truth, _, r = scenario
    flows, hops = r["flows"], r["hops"]
    compared = 0
    for c in truth["connections"]:
        fid = _flow_of(flows, c["client"])["flow_id"].iloc[0]
        mine = hops[hops["flow_id"] == fid]
        for i, h in enumerate(c["hops"]):
            names = TCP_EVENTS if h["kind"] == "tcp" else HBONE_EVENTS
            for cap, evs in h["packets"].items():
                for tev, t in evs.items():
                    if tev not in names or not isinstance(t, dict):
                        continue
                    rows = mine[(mine["hop_index"] == i) & (mine["event"] == names[tev])]
                    for end in ("src", "dst"):
                        hit = rows[rows[f"{end}_capture"].str.replace(r"\.pcap(ng)?$", "", regex=True) == cap]
                        for v in hit[f"{end}_ts_raw"]:
                            assert abs(v.value - _ns(t)) <= 100_000, (c["id"], i, cap, tev, end, v.value, _ns(t))
                            compared += 1
    assert compared >= 6 * len(truth["connections"]), compared


def test_corrected_latencies_not_negative(scenario):
    _, _, r = scenario
    hops, clock = r["hops"], r["clock"]
    unc = clock.set_index("capture")["uncertainty_ms"].fillna(0).to_dict()
    bad = hops[hops["latency_ms"] < -hops.apply(lambda h: unc.get(h["src_capture"], 0) + unc.get(h["dst_capture"], 0)
                                                + 0.005, axis=1)]
    assert bad.empty, bad[["flow_id", "hop", "event", "src_capture", "dst_capture", "latency_ms"]]


def test_clock_offset_estimated():
    d = SAMPLES / "clock-offset"
    if not (d / "truth.json").exists():
        pytest.skip(f"lab scenario 'clock-offset' not found at {d}")
    truth, _, r = _load("clock-offset")
    clock = r["clock"].set_index("capture")
    applied = {cp: v["clock_offset_ns"] for cp, v in truth["capture_points"].items()}
    for cp, off in applied.items():
        row = clock.loc[truth["capture_points"][cp]["file"]]
        assert abs(row["offset_ms"] - off / 1e6) <= 0.5, (cp, row["offset_ms"], off)
        assert abs(row["offset_ms"] - off / 1e6) <= 0.05, (cp, row["offset_ms"], off)   # in practice: µs
    assert (r["hops"]["latency_ms"].dropna() >= 0).all()
    # raw and corrected ranges are both kept
    assert (clock["first_ts_raw"] - clock["first_ts"]).dt.total_seconds().mul(1e3).sub(clock["offset_ms"]).abs().max() < 1e-3


def test_same_node_captures_share_clock(scenario):
    _, _, r = scenario
    c = r["clock"].dropna(subset=["node"])
    assert (c.groupby("node")["offset_ms"].nunique() <= 1).all()
    assert c["reference"].any()


# --- conformance duplicate groups ------------------------------------------------------------------------------
def _xcorr_groups() -> dict[str, list[Path]]:
    f = CONFORMANCE / "SPLIT.tsv"
    if not f.exists():
        return {}
    groups: dict[str, list[Path]] = {}
    for line in f.read_text().splitlines()[1:]:
        parts = (line.split("\t") + ["", ""])[:3]
        for tag in parts[2].split():
            if tag.startswith("XCORR:"):
                groups.setdefault(tag.split(":", 1)[1], []).append(CONFORMANCE / parts[0])
    return groups


@pytest.fixture(params=sorted(_xcorr_groups()) or ["none"])
def xcorr_group(request):
    if request.param == "none":
        pytest.skip(f"conformance captures not found at {CONFORMANCE}")
    files = [p for p in _xcorr_groups()[request.param] if p.exists()]
    if len(files) < 2:
        pytest.skip(f"{request.param}: fewer than two of its files present")
    return request.param, files


def test_duplicate_group_offsets_zero_and_connections_matched(xcorr_group):
    name, files = xcorr_group
    a = hbonecap.analyze([str(f) for f in files], on_error="report")
    r = correlate(a)
    clock = r["clock"]
    connected = clock[clock["via"] != "unconnected"]
    if len(connected) < 2:
        pytest.skip(f"{name}: the files share no packet (different connections in each), nothing to tie: "
                    f"{', '.join(clock['capture'])}")
    assert len(connected) == len(clock), clock[["capture", "via"]]
    assert (connected["offset_ms"].abs() < 1e-6).all(), connected[["capture", "offset_ms"]]
    # every TCP connection is seen in every file of the group
    conns = a.connections
    if len(conns):
        per = conns.groupby(["client", "server"])["capture"].nunique()
        assert (per == a.captures["capture"].nunique()).all(), per
        first_hop = r["hops"].drop_duplicates(["flow_id", "hop_index", "event"])
        assert (first_hop["captures"] == len(files)).all() or first_hop.empty


def test_correlate_empty_analysis():
    r = correlate(hbonecap.Analysis())
    for name in ("flows", "hops", "clock", "latency", "anomalies"):
        assert r[name].empty and list(r[name].columns) == tables.columns(name)


# --- without keys ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _load_keyless(scenario: str):
    d = SAMPLES / scenario
    truth = json.loads((d / "truth.json").read_text())
    a = hbonecap.analyze(str(d))
    return truth, a, correlate(a)


@pytest.mark.parametrize("name", ["sequential", "concurrent", "clock-offset", "bulk", "era-b-spoof", "waypoint",
                                  "refused-503", "inpod", "inpod-vxlan", "any-sll2"])
def test_keyless_flows_inferred(name):
    """No key log: the client connection, the HBONE connection and the server connection are still tied, by the
    plaintext request lines, sizes and timing, and say so (match 'inferred', confidence below 1)."""
    if not (SAMPLES / name / "truth.json").exists():
        pytest.skip(f"lab scenario {name!r} not found")
    truth, _, r = _load_keyless(name)
    flows, hops = r["flows"], r["hops"]
    for c in truth["connections"]:
        f = _flow_of(flows, c["client"])
        assert len(f) == 1, c["id"]
        f = f.iloc[0]
        assert f["match"] == "inferred" and 0 < f["confidence"] < 1, c["id"]
        assert f["original_dst"] == c["original_dst"], c["id"]
        hb = [h for h in c["hops"] if h["kind"] == "hbone"]
        assert f["hbone_client"] == hb[0]["client"], c["id"]
        last = c["hops"][-1]
        if last["kind"] == "tcp":
            mine = hops[(hops["flow_id"] == f["flow_id"]) & (hops["kind"] == "tcp")].sort_values("hop_index")
            assert mine["connection"].iloc[-1] == f"{last['client']} > {last['server']}", c["id"]
    assert (hops["latency_ms"].dropna() >= -0.05).all()


def test_correlation_rows_keep_integers_exact():
    """Rows become typed columns without passing integers through floats: a 64-bit count beside a missing one
    (None or NaN) stays exact, strings and times keep their missing values."""
    from hbonecap.analysis.correlation import _frame

    big = 2**60 + 1
    f = _frame("flows", [{"flow_id": 1, "bytes_c2s": big, "client": "10.0.0.1:1", "start": 5},
                         {"flow_id": 2, "bytes_c2s": None, "client": None, "start": None},
                         {"flow_id": 3, "bytes_c2s": float("nan")}])
    assert str(f["bytes_c2s"].dtype) == "Int64" and f["bytes_c2s"].iloc[0] == big
    assert f["bytes_c2s"].isna().tolist() == [False, True, True]
    assert f["client"].isna().tolist() == [False, True, True] and f["client"].iloc[0] == "10.0.0.1:1"
    assert f["start"].isna().tolist() == [False, True, True] and f["start"].iloc[0].value == 5


def test_table_lists_keep_integers_exact():
    """`tables.frame` from Python lists (as the stream stages' rows arrive): an integer column with a missing value
    is not routed through float64."""
    from hbonecap import tables

    big = 2**60 + 1
    f = tables.frame("streams", {"capture": ["a", "b", "c"], "stream_id": [big, None, float("nan")]})
    assert f["stream_id"].iloc[0] == big and f["stream_id"].isna().tolist() == [False, True, True]
    assert str(f["stream_id"].dtype) == "Int64"

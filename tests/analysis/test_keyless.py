"""Keyless HBONE: record-layer inference on the lab's real TLS, and every lab scenario analysed without its key
log compared with its decrypted analysis (the issue's thresholds)."""
from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import pytest

import hbonecap
from hbonecap import tables
from hbonecap.analysis.keyless import RECORD_OVERHEAD, compare, data_payload, infer_records

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SCENARIOS = tuple(sorted(p.parent.name for p in SAMPLES.glob("*/truth.json")))


@functools.lru_cache(maxsize=None)
def _pair(scenario: str):
    d = SAMPLES / scenario
    return hbonecap.analyze(str(d), keylog=str(d / "keylog.txt")), hbonecap.analyze(str(d))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_keyless_matches_decrypted(scenario):
    decrypted, keyless = _pair(scenario)
    assert int(keyless.captures["secrets"].sum()) == 0          # nothing decrypts the keyless run
    assert not keyless.tunnels["decrypted"].fillna(False).any()
    r = compare(decrypted, keyless)
    assert r["flows"] > 0
    assert r["tied_pct"] >= 95.0, r["wrong_rows"]
    assert r["wrong_confident"] == 0, r["wrong_rows"]
    assert r["hbone_events_compared"] >= 0.8 * r["hbone_events_ref"], r
    assert r["worst_latency_ms"] <= 1.0, r["diffs"].sort_values("latency_ms").tail()
    # every HBONE event time within 1 ms of decryption's, concurrent streams on one pooled connection included
    assert r["worst_hbone_time_ms"] <= 1.0, r["diffs"].sort_values("time_ms").tail()
    hb = keyless.hops[keyless.hops["kind"] == "hbone"]
    assert len(hb) and hb["inferred"].all()                     # keyless hop times say they are inferred
    assert not keyless.hops.loc[keyless.hops["kind"] == "tcp", "inferred"].any()


def test_keyless_event_times_of_concurrent_streams():
    """Ten concurrent streams on one pooled HBONE connection: each flow's HBONE events are the records that
    decryption finds for its own stream (same times)."""
    decrypted, keyless = _pair("concurrent")
    r = compare(decrypted, keyless)
    assert r["hbone_events_compared"] == r["hbone_events_ref"] == 50
    assert r["worst_hbone_time_ms"] <= 1.0


def _records(scenario, capture):
    decrypted, keyless = _pair(scenario)
    tun = keyless.tunnels[keyless.tunnels["capture"] == capture].iloc[0]
    return decrypted, keyless, tun, infer_records(keyless.details[capture].records[tun["tunnel_id"]])


def test_inference_on_real_tls_concurrent():
    """The labels agree with what decryption shows on the same connection: the streams it opened, their
    tunnelled bytes each way, the end of every stream each way, and a GOAWAY before close_notify."""
    decrypted, _, tun, recs = _records("concurrent", "ztunnel-a-eth0.pcap")
    streams = decrypted.streams[decrypted.streams["capture"] == "ztunnel-a-eth0.pcap"]
    kinds = [r.kind for r in recs]
    assert kinds[0] == "handshake" and "preface_settings" in kinds and "settings" in kinds
    assert kinds.count("headers") == kinds.count("response") == len(streams)
    assert sorted(2 * r.stream - 1 for r in recs if r.kind == "headers") == sorted(streams["stream_id"])
    for d, col in ((0, "bytes_c2s"), (1, "bytes_s2c")):
        assert sum(r.payload for r in recs if r.kind == "data" and r.direction == d) == int(streams[col].sum())
        assert sum(1 for r in recs if r.kind == "end_stream" and r.direction == d) == len(streams)
    assert [r.kind for r in recs if r.direction == 0][-2:] == ["goaway", "alert"]


def test_inference_bytes_of_split_writes():
    """A response larger than one record (16 KiB DATA frames split over records): the tunnelled bytes still add
    up to what decryption counted."""
    decrypted, _, tun, recs = _records("sequential", "ztunnel-a-eth0.pcap")
    streams = decrypted.streams[decrypted.streams["capture"] == "ztunnel-a-eth0.pcap"]
    assert int(streams["bytes_s2c"].max()) > 16384
    got = sum(r.payload for r in recs if r.kind == "data" and r.direction == 1)
    assert got == int(streams["bytes_s2c"].sum())


def test_inference_whole_and_cut():
    """The same labels for a timeline fed whole or cut at its handshake (mid-connection capture: no
    handshake, so no stream ids), and no crash on junk."""
    _, _, tun, recs = _records("sequential", "ztunnel-a-eth0.pcap")
    decrypted, keyless = _pair("sequential")
    tl = keyless.details["ztunnel-a-eth0.pcap"].records[tun["tunnel_id"]]
    assert [r.kind for r in infer_records(tl)] == [r.kind for r in recs]
    cut = [x for x in tl if x[3] == 23][6:]
    later = infer_records(cut)
    assert not any(r.kind == "handshake" for r in later)
    assert infer_records([]) == []
    junk = infer_records([(7, -1, -1, 99, 0), (1, 5, 4, 23, 3), (0, 1, 1, 23, 10**6)])
    assert [r.kind for r in junk][1:] == ["alert", "preface_settings"]


def test_data_payload():
    assert data_payload(9) == 0
    assert data_payload(128) == 119
    assert data_payload(16384 + 9) == 16384
    assert data_payload(2 * (16384 + 9)) == 2 * 16384
    assert RECORD_OVERHEAD + 5 == 22


def test_tunnel_records_table():
    _, keyless = _pair("waypoint")
    t = keyless.tunnel_records
    assert list(t.columns) == tables.columns("tunnel_records")
    for c, dt in tables.dtypes("tunnel_records").items():
        assert str(t[c].dtype) == str(pd.Series([], dtype=dt).dtype), c
    assert set(t["capture"]) >= {"ztunnel-a-eth0.pcap", "waypoint-eth0.pcap"}
    assert (t["kind"] == "headers").sum() > 0
    decrypted, _ = _pair("waypoint")
    dt = decrypted.tunnel_records                                # only the views decryption could not read
    dec = decrypted.tunnels.set_index(["capture", "tunnel_id"])["decrypted"].fillna(False)
    views = set(zip(dt["capture"], dt["tunnel_id"]))
    assert not any(bool(dec.get((c, t), False)) for c, t in views)
    if dec.all():                                                # (the boolean column's values are numpy booleans:
        assert dt.empty                                          # an `is True` test listed every decrypted view)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_keyless_stream_ids(scenario):
    """The stream ids inferred without keys (CONNECTs counted on connections seen from their handshake) are the ones
    decryption reads, per HBONE hop, wherever they are given; most flows get them."""
    decrypted, keyless = _pair(scenario)
    ref = decrypted.flows[(decrypted.flows["match"] == "exact") & decrypted.flows["client"].notna()]
    known = 0
    for f in ref.itertuples(index=False):
        k = keyless.flows[keyless.flows["client"] == f.client]
        assert len(k) == 1
        got = k.iloc[0]["stream_ids"]
        if pd.isna(got):
            continue
        known += 1
        assert got == f.stream_ids, f.client
        assert k.iloc[0]["stream_id"] == f.stream_id
        hb = keyless.hops[(keyless.hops["flow_id"] == k.iloc[0]["flow_id"]) & (keyless.hops["kind"] == "hbone")]
        assert set(hb["stream_id"].dropna().astype(int)) <= {int(x) for x in f.stream_ids.split(";")}
    assert known >= 0.5 * len(ref)

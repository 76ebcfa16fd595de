"""Clock offsets from packet pairs: min-delay bracket, orientation, choice of capture pair, chaining, drift."""
from __future__ import annotations

import numpy as np
import pandas as pd

from hbonecap.analysis.clock import pair_estimates, solve_offsets


def _deltas(theta_ns, transit_ab, transit_ba, n=200, span_s=10.0, drift_ppm=0.0, lconn=0, c2s_ab=True,
            cap_a="a.pcap", cap_b="b.pcap", seed=0):
    rng = np.random.default_rng(seed)
    ta = np.sort(rng.uniform(0, span_s * 1e9, n)).astype(np.int64) + 10**18
    dirs = rng.integers(0, 2, n)
    ab = (dirs == 0) if c2s_ab else (dirs == 1)
    jitter = rng.exponential(50_000, n)          # queueing: only ever adds delay
    off = theta_ns + drift_ppm * 1e-6 * (ta - ta[0])
    delta = np.where(ab, off + transit_ab + jitter, off - transit_ba - jitter)
    return pd.DataFrame({"ga": "A", "gb": "B", "lconn": lconn, "dir": dirs, "delta": delta.astype(np.int64),
                         "ta": ta, "cap_a": cap_a, "cap_b": cap_b})


def test_offset_bracket_and_orientation():
    for c2s_ab in (True, False):
        (p,) = pair_estimates(_deltas(3_217_000, 40_000, 40_000, c2s_ab=c2s_ab))
        assert abs(p.theta_ns - 3_217_000) < 5_000
        assert p.uncertainty_ns < 45_000 and not p.inconsistent


def test_asymmetry_error_is_bounded_by_uncertainty():
    (p,) = pair_estimates(_deltas(-1_000_000, 20_000, 200_000))
    assert abs(p.theta_ns + 1_000_000) <= p.uncertainty_ns


def test_closest_capture_pair_wins():
    far = _deltas(500_000, 30_000, 300_000, cap_b="far.pcap")
    near = _deltas(500_000, 5_000, 5_000, cap_b="near.pcap", seed=1)
    (p,) = pair_estimates(pd.concat([far, near], ignore_index=True))
    assert p.captures == ("a.pcap", "near.pcap")
    assert abs(p.theta_ns - 500_000) < 3_000


def test_chain_adds_offsets_and_uncertainties():
    ab = pair_estimates(_deltas(1_000_000, 10_000, 10_000))[0]
    bc = pair_estimates(_deltas(-250_000, 10_000, 10_000, seed=2).assign(ga="B", gb="C"))[0]
    off = solve_offsets(["A", "B", "C", "D"], "A", [ab, bc])
    assert abs(off["C"].offset_ns - 750_000) < 5_000
    assert off["C"].uncertainty_ns == ab.uncertainty_ns + bc.uncertainty_ns
    assert off["C"].via == "A -> B -> C"
    assert off["D"].via == "unconnected" and np.isnan(off["D"].offset_ns)


def test_drift_estimated():
    (p,) = pair_estimates(_deltas(0, 30_000, 30_000, n=4000, span_s=60, drift_ppm=20.0))
    assert abs(p.drift_ppm - 20.0) < 2.0
    (q,) = pair_estimates(_deltas(0, 30_000, 30_000, n=100, span_s=1.0))
    assert np.isnan(q.drift_ppm)


# -- the packet pairs: numpy path against the DataFrame path (its specification) -----------------------------------
import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SCENARIOS = tuple(sorted(p.parent.name for p in SAMPLES.glob("*/truth.json")))


@functools.lru_cache(maxsize=None)
def _legs(scenario: str):
    import hbonecap
    from hbonecap.analysis.inputs import correlation_legs

    d = SAMPLES / scenario
    return correlation_legs(hbonecap.analyze(str(d), keylog=str(d / "keylog.txt"), packets=False, correlate=False))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_packet_deltas_arrays_equal_frames(scenario, monkeypatch):
    """Every lab scenario, each capture its own clock group (most pairs) and captures grouped by host name: the
    numpy path gives the DataFrame path's table row for row; with a hash that makes every packet collide it
    falls back to that path, and with one that collides across captures only the column checks keep it exact."""
    from hbonecap.analysis import clock

    legs = _legs(scenario)
    own = {i: c for i, c in enumerate(legs.captures)}
    host = {i: c.split("-")[0] for i, c in enumerate(legs.captures)}
    for gmap in (own, host):
        ref = clock.packet_deltas(legs, gmap, engine="pandas")
        got = clock.packet_deltas(legs, gmap)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), ref.reset_index(drop=True))
    assert len(clock.packet_deltas(legs, own)) > 0
    calls = []
    real = clock._packet_deltas_arrays

    def spy(*a):
        calls.append(out := real(*a))
        return out

    monkeypatch.setattr(clock, "_packet_deltas_arrays", spy)
    monkeypatch.setattr(clock, "_mix", lambda h, x: np.zeros_like(h))       # every key the same hash
    pd.testing.assert_frame_equal(clock.packet_deltas(legs, own).reset_index(drop=True),
                                  clock.packet_deltas(legs, own, engine="pandas").reset_index(drop=True))
    assert calls == [None]                                                    # the DataFrame path decided


def test_packet_deltas_hash_join_checks_columns(monkeypatch):
    """Two different packets of two captures with one hash are not paired: with a hash that adds the columns up,
    (seq 1, ack 2) at one capture and (seq 2, ack 1) at the other collide; only (seq 5, ack 5) is the same packet."""
    from hbonecap.analysis import clock
    from hbonecap.analysis.legs import Legs

    tcp = pd.DataFrame({"cap": np.array([0, 0, 1, 1], np.int16), "ts": np.array([10, 20, 15, 25], np.int64),
                        "leg": np.array([0, 0, 1, 1], np.int32), "lconn": np.zeros(4, np.int32),
                        "dir": np.zeros(4, np.int8), "seq": np.array([1, 5, 2, 5], np.int64),
                        "ack": np.array([2, 5, 1, 5], np.int64), "tsval": np.full(4, -1, np.int64),
                        "flags": np.full(4, 0x18, np.int16), "plen": np.full(4, 100, np.int32)})
    legs = Legs(tcp, pd.DataFrame(), pd.DataFrame(), ["a.pcap", "b.pcap"])
    gmap = {0: "A", 1: "B"}
    monkeypatch.setattr(clock, "_mix", lambda h, x: h + x.astype(np.uint64))
    got = clock.packet_deltas(legs, gmap)
    assert got[["ta", "delta"]].values.tolist() == [[20, 5]]
    pd.testing.assert_frame_equal(got, clock.packet_deltas(legs, gmap, engine="pandas"))

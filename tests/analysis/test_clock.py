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

"""Issue 12 checks on the in-pod (Istio 1.21+) lab scenarios: every connection is one exact flow carrying the
trace id of its HBONE stream, and the pod lo captures are recognised as loopback."""
from __future__ import annotations

import json

import pytest

import hbonecap
from tests.conftest import SAMPLES

INPOD = [s for s in ("inpod", "inpod-vxlan") if (SAMPLES / s / "truth.json").exists()]


@pytest.mark.lab
@pytest.mark.parametrize("scenario", INPOD or ["<none>"])
def test_inpod_connections_are_exact_flows(scenario):
    if scenario == "<none>":
        pytest.skip(f"no in-pod lab scenarios under {SAMPLES}")
    d = SAMPLES / scenario
    truth = json.loads((d / "truth.json").read_text())
    a = hbonecap.analyze(d, keylog=d / "keylog.txt")
    roles = dict(zip(a.captures["capture"], a.captures["role"]))
    assert roles["pod-a-lo.pcap"] == "loopback" and roles["pod-b-lo.pcap"] == "loopback"
    assert len(a.flows) == len(truth["connections"])
    for c in truth["connections"]:
        f = a.flows[a.flows["client"] == c["client"]]
        assert len(f) == 1, c["client"]
        f = f.iloc[0]
        assert f["match"] == "exact", (c["client"], f["match"], f["match_reason"])
        assert f["original_dst"] == c["original_dst"]
        assert f["trace_id"] == c["trace_id"]
    if scenario == "inpod-vxlan":
        enc = set(a.packets.loc[a.packets["capture"].astype(str).str.startswith("node-"), "encap"].astype(str))
        assert enc == {"vxlan:42"}

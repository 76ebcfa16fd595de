"""HBONE unwrapping on the lab's real captures (samples/*), checked against each scenario's truth.json.

For every capture point where the lab says HTTP/2 frames are decryptable, every HBONE connection the lab opened
must appear as a decrypted TLS 1.3 tunnel with the lab's suite, its CONNECT stream ids, the HBONE status of each
stream and (Rust-ztunnel dialect) the application's address in `forwarded`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
pytestmark = pytest.mark.lab


def _points():
    out = []
    for truth in sorted(SAMPLES.glob("*/truth.json")):
        t = json.loads(truth.read_text())
        for name, point in t.get("capture_points", {}).items():
            if point.get("decrypted_http2_frames") and (truth.parent / point["file"]).is_file():
                out.append((truth.parent.name, name))
    return out


POINTS = _points()


def _analyse(scenario: str, point: str):
    from hbonecap.layers.segments import iter_tcp_segments
    from hbonecap.streams.analyzer import StreamAnalyzer
    from hbonecap.streams.tls.keylog import load

    d = SAMPLES / scenario
    truth = json.loads((d / "truth.json").read_text())
    a = StreamAnalyzer(load(d / truth["keylog"]))
    for seg in iter_tcp_segments(d / truth["capture_points"][point]["file"], with_pure_acks=True):
        a.feed(seg)
    return truth, a.close()


@pytest.mark.parametrize("scenario,point", POINTS or [("<none>", "<none>")], ids=lambda x: str(x))
def test_lab_tunnels_and_streams_match_truth(scenario, point):
    if not POINTS:
        pytest.skip(f"no lab samples with decryptable HBONE under {SAMPLES}")
    if not (SAMPLES / scenario / "truth.json").is_file():
        pytest.skip(f"lab sample {scenario} disappeared since collection (being regenerated?)")
    truth, r = _analyse(scenario, point)
    seen = 0
    for h in truth["hbone_connections"]:
        # A one-way route (request inside Geneve, replies as plain IP) shows one connection per encapsulation,
        # as in the connections table: each half is a tunnel row of its own.
        rows = [t for t in r.tunnels if t["depth"] == 0 and (t["client"], t["server"]) == (h["client"], h["server"])]
        if not rows:
            continue  # this capture point is not on that hop
        seen += 1
        streams: dict[int, list[dict]] = {}
        for t in rows:
            assert t["decrypted"] is True, t["why_not"]
            assert t["tls_version"] == "TLS 1.3" and t["cipher_suite"] == h["tls"]["cipher"]
            if t["alpn"] is not None:
                assert t["alpn"] == h["tls"]["alpn"]
            if t["server_spiffe"] is not None:
                assert t["server_spiffe"] in h["tls"]["peer_ids"]
            for s in r.streams:
                if s["tunnel_id"] == t["tunnel_id"]:
                    streams.setdefault(s["stream_id"], []).append(s)
        assert sorted(streams) == sorted(h["stream_ids"])
        assert all(s["method"] in ("CONNECT", None) for ss in streams.values() for s in ss)
        assert all(any(s["method"] == "CONNECT" for s in ss) or any(s["status"] for s in ss)
                   for ss in streams.values())
        for conn in truth["connections"]:
            for hop in conn["hops"]:
                if hop.get("kind") != "hbone" or hop.get("client") != h["client"] or hop.get("server") != h["server"]:
                    continue
                ss = streams[hop["stream_id"]]
                statuses = {s["status"] for s in ss if s["status"] is not None}
                assert statuses <= {conn["hbone_status"]}  # one-way captures of the client side see no response
                if truth.get("dialect") == "rust" and hop["name"].startswith("ztunnel-a"):
                    assert conn["client"] in {s["forwarded_for"] for s in ss}
    assert seen, f"no HBONE connection of the truth found among {list(tunnels)}"
    assert not [a for a in r.anomalies if a["kind"] in ("tls_decrypt_failed", "hpack_error", "hpack_unresolved")
                and truth["capture_points"][point].get("truncation", {}).get("packets_cut", 0) == 0]

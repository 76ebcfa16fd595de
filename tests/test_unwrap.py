"""`hbonecap unwrap`: the unwrapped pcapng checked with tshark on the lab samples."""
from __future__ import annotations

import subprocess

import pytest

import hbonecap
from hbonecap.export.inner import pick_views, unwrap
from tests.conftest import SAMPLES

SCENARIOS = sorted(p.parent.name for p in SAMPLES.glob("*/truth.json") if (p.parent / "keylog.txt").exists())


def _tshark(tshark, *args) -> str:
    r = subprocess.run([tshark, "-n", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _follow(tshark, path, stream: int) -> tuple[str, bytes, bytes]:
    out = _tshark(tshark, "-r", str(path), "-q", "-z", f"follow,tcp,raw,{stream}")
    node0, a, b = None, bytearray(), bytearray()
    for line in out.splitlines():
        if line.startswith("Node 0:"):
            node0 = line.split(":", 1)[1].strip()
        elif line and all(c in "0123456789abcdef\t" for c in line) and line.strip():
            (b if line.startswith("\t") else a).extend(bytes.fromhex(line.strip()))
    return node0, bytes(a), bytes(b)


@pytest.mark.tshark
@pytest.mark.parametrize("scenario", SCENARIOS or ["<none>"])
def test_unwrapped_file_matches_hbonecap(tshark, tmp_path, scenario):
    if scenario == "<none>":
        pytest.skip(f"no lab samples under {SAMPLES}")
    d = SAMPLES / scenario
    a = hbonecap.analyze(d, keylog=d / "keylog.txt")
    out = tmp_path / "inner.pcapng"
    counts = unwrap(a, out)
    views = counts["views"]
    if not counts["packets"]:
        pytest.skip(f"{scenario}: nothing tunnelled was decrypted")
    # no malformed packets, no expert errors
    expert = _tshark(tshark, "-r", str(out), "-q", "-z", "expert,error")
    assert "Malformed" not in expert and "Errors" not in expert, expert
    assert _tshark(tshark, "-r", str(out), "-Y", "_ws.malformed or _ws.expert.severity == error").strip() == ""
    # every CONNECT stream is one TCP conversation whose bytes are the tunnelled bytes
    fields = _tshark(tshark, "-r", str(out), "-Y", "tcp.flags.syn == 1 and tcp.flags.ack == 0 and frame.comment contains \"tunnel=\"",
                     "-T", "fields",
                     "-e", "tcp.stream", "-e", "frame.comment")
    conv = {}
    for line in fields.splitlines():
        stream, comment = line.split("\t", 1)
        conv[comment.split(" CONNECT")[0].replace("SYN ", "")] = int(stream)
    assert len(conv) == len(views)
    for r in views.itertuples(index=False):
        key = f"capture={r.capture} tunnel={r.tunnel_id} stream={int(r.stream_id)}"
        c2s, s2c = a.details[r.capture].tunnel_bytes[(r.tunnel_id, int(r.stream_id))]
        _, sent, received = _follow(tshark, out, conv[key])
        assert sent == bytes(c2s.data) and received == bytes(s2c.data), key
    # HTTP requests that tshark dissects equal hbonecap's requests inside those streams
    req = _tshark(tshark, "-r", str(out), "-Y", "http.request and not frame.interface_name contains \"#inner\"",
                  "-T", "fields", "-e", "frame.comment", "-e", "http.request.method", "-e", "http.host",
                  "-e", "http.request.uri")
    theirs = sorted(tuple(line.split("\t")[1:]) for line in req.splitlines() if line)
    chosen = {(r.capture, r.tunnel_id, int(r.stream_id)) for r in views.itertuples(index=False)}
    q = a.requests[a.requests["tunnel_id"].notna()]
    ours = sorted((r.method, r.host, r.path) for r in q.itertuples(index=False)
                  if (r.capture, r.tunnel_id, int(r.stream_id)) in chosen and isinstance(r.method, str))
    assert theirs == ours


@pytest.mark.tshark
def test_inner_packets_are_tied_to_flows(tshark):
    d = SAMPLES / "concurrent"
    if not (d / "truth.json").exists():
        pytest.skip(f"lab sample {d} not found")
    a = hbonecap.analyze(d, keylog=d / "keylog.txt")
    df = a.inner_packets("http.request")
    assert len(df) and df["flow_id"].notna().all()
    assert set(df["highest_layer"]) == {"HTTP"}
    streams = df[df["tunnel_id"].notna()]
    assert sorted(streams["flow_id"]) == sorted(a.flows["flow_id"])      # one request per flow, each tied


def test_views_pick_one_capture_per_logical_stream():
    d = SAMPLES / "sequential"
    if not (d / "truth.json").exists():
        pytest.skip(f"lab sample {d} not found")
    a = hbonecap.analyze(d, keylog=d / "keylog.txt")
    for det in a.details.values():
        det.tunnels_by_id = {t["tunnel_id"]: t for t in det.tunnels}
    v = pick_views(a.streams, a.details)
    assert len(v) == a.streams["stream_id"].nunique() and v["stream_id"].is_unique

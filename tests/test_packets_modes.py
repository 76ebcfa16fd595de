"""Where the packets table goes: kept in memory, left out, or written to Parquet by each capture's process.
Correlation reads per-capture inputs computed where each capture was decoded (hbonecap/analysis/inputs.py); every
other table must be the same whichever way, and the same as correlating from the packets table itself."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

import hbonecap
from hbonecap.analysis.correlation import correlate
from hbonecap.cli import app
from tests.conftest import SAMPLES

OTHER_TABLES = [t for t in hbonecap.Analysis.TABLES if t != "packets"]
# with and without keys; Geneve + HBONE (sequential), in-pod redirection with lo captures (inpod), a waypoint
CASES = [("sequential", True), ("inpod", False), ("waypoint", True), ("concurrent", False)]


def _need(scenario):
    d = SAMPLES / scenario
    if not (d / "truth.json").exists():
        pytest.skip(f"lab sample {d} not found")
    return d


def _same(a, b, names=OTHER_TABLES):
    for n in names:
        pd.testing.assert_frame_equal(a.table(n).reset_index(drop=True), b.table(n).reset_index(drop=True), obj=n)


def _by_capture(pk: pd.DataFrame) -> pd.DataFrame:
    out = pk.astype({"capture": str}).sort_values(["capture", "index"], kind="stable").reset_index(drop=True)
    return out.astype({"capture": "category"})


@pytest.mark.parametrize("scenario,keys", CASES)
def test_packets_left_out_or_on_disk_give_the_same_analysis(scenario, keys, tmp_path):
    d = _need(scenario)
    kl = d / "keylog.txt" if keys else None
    full = hbonecap.analyze(d, keylog=kl)
    assert len(full.packets) > 100 and len(full.flows) > 0
    lean = hbonecap.analyze(d, keylog=kl, packets=False, jobs=2)
    _same(full, lean)
    assert lean.packets.empty and lean.packets_path is None
    disk = hbonecap.analyze(d, keylog=kl, packets=tmp_path / "pk")
    _same(full, disk)
    assert disk._packets is None                       # correlation never loaded the packets
    back = disk.packets                                # ... read on first access, declared dtypes
    pd.testing.assert_frame_equal(_by_capture(back), _by_capture(full.packets), check_categorical=False)
    assert list(back.dtypes.astype(str)) == list(full.packets.dtypes.astype(str))


@pytest.mark.parametrize("scenario,keys", CASES)
def test_correlation_from_inputs_equals_correlation_from_packets(scenario, keys):
    d = _need(scenario)
    a = hbonecap.analyze(d, keylog=d / "keylog.txt" if keys else None)
    assert set(a.inputs) == set(a.captures["capture"])
    from_inputs = correlate(a)
    a.inputs = {}
    from_packets = correlate(a)
    for name in ("flows", "hops", "clock", "latency", "anomalies"):
        pd.testing.assert_frame_equal(from_inputs[name], from_packets[name], obj=name)
    # one capture's inputs missing: the packets table is used for all
    b = hbonecap.analyze(d, keylog=d / "keylog.txt" if keys else None)
    b.inputs.pop(next(iter(b.inputs)))
    pd.testing.assert_frame_equal(correlate(b)["flows"], from_packets["flows"])


def test_packets_dir_replaces_only_its_captures(tmp_path):
    d = _need("sequential")
    out = tmp_path / "pk"
    (out / "capture=other.pcap").mkdir(parents=True)       # an earlier run's partition of another capture
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", packets=out, correlate=False)
    again = hbonecap.analyze(d, keylog=d / "keylog.txt", packets=out, correlate=False)
    parts = sorted(p.name for p in out.iterdir())
    assert "capture=other.pcap" in parts
    assert len(parts) == len(a.captures) + 1
    assert len(again.packets) == int(a.captures["packets"].sum())   # written twice, read once


def test_cli_correlate_writes_packets_from_the_workers_and_loads_back(tmp_path):
    d = _need("sequential")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["correlate", str(d), "-k", str(d / "keylog.txt"), "-j", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    parts = sorted(p.name for p in (out / "packets").iterdir())
    assert len(parts) == 10 and all(p.startswith("capture=") for p in parts)
    back = hbonecap.load(out)
    full = hbonecap.analyze(d, keylog=d / "keylog.txt")
    pd.testing.assert_frame_equal(_by_capture(back.packets), _by_capture(full.packets), check_categorical=False)
    pd.testing.assert_frame_equal(back.flows.reset_index(drop=True), full.flows.reset_index(drop=True),
                                  check_dtype=False)
    # saving an analysis whose packets are on disk elsewhere copies them, without loading them
    a = hbonecap.analyze(d, keylog=d / "keylog.txt", packets=tmp_path / "pk")
    a.save(tmp_path / "copy")
    assert a._packets is None
    assert len(hbonecap.load(tmp_path / "copy").packets) == len(full.packets)


def test_dask_engine_needs_the_packets_table():
    from hbonecap.errors import HbonecapError

    with pytest.raises(HbonecapError, match="packets must be True"):
        hbonecap.analyze(SAMPLES / "sequential", engine="dask", scheduler="tcp://127.0.0.1:1", packets=False)


def _analyze_both(paths, **kw):
    from hbonecap.errors import CaptureError

    out = []
    for packets in (True, False):
        try:
            out.append(hbonecap.analyze(paths, packets=packets, on_error="report", **kw))
        except CaptureError as e:      # (on_error="report" turns unreadable files into rows; nothing else raises)
            raise AssertionError(e) from e
    return out


def test_hostile_input_lean_equals_full(tmp_path):
    """Truncated and corrupted captures: the lean path (decoded part by part) reports the same rows."""
    import random

    from tests.packets import eth, geneve, ipv4, tcp, udp, write_pcap

    inner = eth(ipv4("10.244.1.5", "10.96.0.10", 6, tcp(40000, 9080, b"GET / HTTP/1.1\r\n\r\n")))
    frames = [eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(5, 6081, geneve(1001, inner))))] * 3 + \
        [eth(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 15008, b"\x16\x03\x01\x00\x05hello")))] * 3
    src = tmp_path / "src.pcap"
    write_pcap(src, frames)
    data = src.read_bytes()
    rng = random.Random(7)
    flagged = 0
    for k in range(12):
        body = bytearray(data[: rng.randrange(24, len(data) + 1)])
        for _ in range(k):                       # a few flipped bytes after the file header
            body[rng.randrange(24, len(body))] ^= 0xFF if len(body) > 24 else 0
        d = tmp_path / f"case{k}"
        d.mkdir()
        (d / "x.pcap").write_bytes(bytes(body))
        (d / "junk.pcap").write_bytes(bytes(rng.randrange(256) for _ in range(200)))
        full, lean = _analyze_both(d)
        _same(full, lean, ["captures", "connections", "anomalies", "tunnels", "requests", "flows"])
        flagged += bool(set(full.anomalies["kind"]) - {"capture_unreadable"})
    assert flagged >= 6          # most cases really are damaged captures, not just unreadable files


@pytest.mark.conformance
def test_conformance_captures_lean_equals_full():
    from tests.conftest import CONFORMANCE

    names = ["the-tcpdump-group_tcpdump/tests/geneve.pcap", "zeek_zeek/testing/btest/Traces/linux_dlt_sll2.pcap",
             "gopacket_gopacket/pcapgo/tests/le/test202.pcapng", "the-tcpdump-group_tcpdump/tests/vxlan.pcap",
             "zeek_zeek/testing/btest/Traces/tunnels/geneve-many-options.pcap", "secdev_scapy/test/pcaps/macos.pcapng.gz"]
    files = [CONFORMANCE / n for n in names if (CONFORMANCE / n).exists()]
    if not files:
        pytest.skip(f"conformance captures not found at {CONFORMANCE}")
    full, lean = _analyze_both(files)
    assert len(full.connections) > 0
    _same(full, lean)


def test_tunnel_bytes_not_kept_same_tables_and_unwrap_says_why(tmp_path):
    from hbonecap.errors import HbonecapError

    d = _need("sequential")
    full = hbonecap.analyze(d, keylog=d / "keylog.txt")
    lean = hbonecap.analyze(d, keylog=d / "keylog.txt", packets=False, tunnel_bytes=False)
    _same(full, lean)
    assert any(det.tunnel_bytes for det in full.details.values() if det is not None)
    assert not any(det.tunnel_bytes for det in lean.details.values() if det is not None)
    with pytest.raises(HbonecapError, match="tunnel_bytes=True"):
        lean.unwrap(tmp_path / "x.pcapng")
    assert full.unwrap(tmp_path / "y.pcapng")["streams"] > 0

"""The command line through typer's CliRunner, and `python -m hbonecap` as a real process."""
from __future__ import annotations

import io
import subprocess
import sys

import pandas as pd
from typer.testing import CliRunner

from hbonecap.cli import app
from tests.packets import eth, geneve, ipv4, tcp, udp, write_pcap

runner = CliRunner()


def _capture(tmp_path):
    inner = eth(ipv4("10.244.1.5", "10.96.3.7", 6, tcp(40000, 9080, b"<script>alert(1)</script>", flags=0x18)))
    frames = [eth(ipv4("10.244.1.5", "10.96.3.7", 6, tcp(40000, 9080, flags=0x02))),
              eth(ipv4("10.96.3.7", "10.244.1.5", 6, tcp(9080, 40000, flags=0x12))),
              eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(3333, 6081, geneve(1001, inner))))]
    p = tmp_path / "node-a-eth0.pcap"
    write_pcap(p, frames)
    return p


def test_decode_prints_a_readable_table(tmp_path):
    p = _capture(tmp_path)
    r = runner.invoke(app, ["decode", str(p)])
    assert r.exit_code == 0, r.output
    assert "geneve:1001" in r.output and "10.244.1.5" in r.output and "SA" in r.output


def test_decode_csv_round_trips_through_pandas(tmp_path):
    p = _capture(tmp_path)
    r = runner.invoke(app, ["decode", str(p), "--format", "csv"])
    assert r.exit_code == 0
    df = pd.read_csv(io.StringIO(r.stdout))
    assert list(df["index"]) == [1, 2, 3]
    assert list(df["vni"].fillna(0).astype(int)) == [0, 0, 1001]
    assert list(df["dport"]) == [9080, 40000, 9080]


def test_decode_tables_and_parquet(tmp_path):
    p = _capture(tmp_path)
    out = tmp_path / "c.parquet"
    r = runner.invoke(app, ["decode", str(p), "-t", "connections", "-f", "parquet", "-o", str(out)])
    assert r.exit_code == 0, r.output
    c = pd.read_parquet(out)
    assert len(c) == 2 and set(c["encap"].astype(str)) == {"", "geneve:1001"}
    r = runner.invoke(app, ["decode", str(p), "--columns", "index,src,nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_decode_parquet_to_a_new_directory_with_a_trailing_slash(tmp_path):
    p = _capture(tmp_path)
    out = tmp_path / "packets"
    r = runner.invoke(app, ["decode", str(p), "-f", "parquet", "-o", str(out) + "/"])
    assert r.exit_code == 0, r.output
    assert [f.name for f in out.iterdir()] == ["node-a-eth0.pcap.parquet"]     # DIR/<capture>.parquet
    assert list(pd.read_parquet(out)["index"]) == [1, 2, 3]


def test_columns_with_csv_and_parquet_write_those_columns(tmp_path):
    p = _capture(tmp_path)
    r = runner.invoke(app, ["decode", str(p), "-f", "csv", "--columns", "index,src"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(io.StringIO(r.stdout))
    assert list(df.columns) == ["index", "src"] and len(df) == 3
    out = tmp_path / "conn.parquet"
    r = runner.invoke(app, ["decode", str(p), "-t", "connections", "-f", "parquet", "-o", str(out),
                            "--columns", "client,server"])
    assert r.exit_code == 0, r.output
    assert list(pd.read_parquet(out).columns) == ["client", "server"]


def test_bad_input_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a capture")
    r = runner.invoke(app, ["decode", str(bad)])
    assert r.exit_code == 2
    assert str(bad) in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["decode", str(tmp_path / "missing.pcap")])
    assert r.exit_code == 2


def test_unusable_key_log_exits_2_and_writes_nothing(tmp_path):
    p = _capture(tmp_path)
    kl = tmp_path / "keylog.txt"
    kl.write_text("CLIENT_RANDOM zz\nnonsense\n")
    out = tmp_path / "out"
    r = runner.invoke(app, ["correlate", str(p), "-k", str(kl), "-o", str(out), "-j", "1"])
    assert r.exit_code == 2 and "no usable key log line" in r.output
    assert not out.exists()          # (the packets dataset folder was made before the key log was read)


def test_correlate_writes_every_table(tmp_path):
    p = _capture(tmp_path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["correlate", str(p), "-o", str(out), "-f", "csv", "-j", "1"])
    assert r.exit_code == 0, r.output
    assert "node-a-eth0.pcap" in r.output and "node" in r.output
    for name in ("captures", "packets", "connections", "anomalies"):
        assert (out / f"{name}.csv").exists()


def test_module_entry_point_and_version():
    r = subprocess.run([sys.executable, "-m", "hbonecap", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("hbonecap ")
    r = subprocess.run([sys.executable, "-m", "hbonecap", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "decode" in r.stdout and "correlate" in r.stdout


def test_report_and_plot_commands(tmp_path):
    from tests.conftest import SAMPLES

    d = SAMPLES / "sequential"
    if not (d / "truth.json").exists():
        import pytest

        pytest.skip(f"lab sample {d} not found")
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["report", str(d), "--keylog", str(d / "keylog.txt"), "-o", str(out), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    plots = tmp_path / "plots"
    r = runner.invoke(app, ["correlate", str(d), "--keylog", str(d / "keylog.txt"), "--plot", str(plots), "-j", "1"])
    assert r.exit_code == 0, r.output
    names = {p.name for p in plots.iterdir()}
    assert {"latency.png", "latency.svg", "timeline.png", "flow-1.svg"} <= names
    r = runner.invoke(app, ["report", str(d), "--keylog", str(tmp_path / "nope.txt"), "-o", str(out)])
    assert r.exit_code == 2 and "key log not found" in r.output


def test_point_overrides_and_manifest(tmp_path):
    p = _capture(tmp_path)
    out = tmp_path / "o1"
    r = runner.invoke(app, ["correlate", str(p), "--point", "node-a-eth0.pcap=pistioout@node-z", "-o", str(out),
                            "-f", "csv", "-j", "1"])
    assert r.exit_code == 0, r.output
    cap = pd.read_csv(out / "captures.csv")
    assert (cap["role"].iloc[0], cap["node"].iloc[0], cap["role_reason"].iloc[0]) == ("pistioout", "node-z", "given")
    m = tmp_path / "points.toml"
    m.write_text('[points]\n"node-a-eth0.pcap" = "waypoint@node-y"\n')
    out = tmp_path / "o2"
    r = runner.invoke(app, ["correlate", str(p), "--manifest", str(m), "-o", str(out), "-f", "csv", "-j", "1"])
    assert r.exit_code == 0, r.output
    cap = pd.read_csv(out / "captures.csv")
    assert (cap["role"].iloc[0], cap["node"].iloc[0]) == ("waypoint", "node-y")
    m.write_text('[points]\n"node-a-eth0.pcap" = "spaceship"\n')
    r = runner.invoke(app, ["correlate", str(p), "--manifest", str(m)])
    assert r.exit_code == 2 and "spaceship" in r.output

"""Plots, the postmortem report (also in a real browser: headless Chromium) and the capture guide."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import hpack
import pytest
from matplotlib.figure import Figure

import hbonecap
from hbonecap.capture.points import guess_point
from hbonecap.guide import plan
from hbonecap.report import build_report, write_report
from tests.conftest import SAMPLES
from tests.packets import eth, ipv4, tcp, write_pcap

HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=\"document.title='PWNED'\">"


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack("!I", sid) + payload


def hostile_capture(path: Path) -> Path:
    """A plaintext HBONE (h2c) CONNECT whose header values and inner HTTP/1 request carry markup and script."""
    c, s = "10.244.1.3", "10.244.2.5"
    enc_c, enc_s = hpack.Encoder(), hpack.Encoder()
    req = enc_c.encode([(":method", "CONNECT"), (":authority", HOSTILE + ":8080"),
                        ("baggage", "k8s.namespace.name=" + HOSTILE), ("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")])
    rsp = enc_s.encode([(":status", "200")])
    inner = f"GET /{HOSTILE} HTTP/1.1\r\nHost: {HOSTILE}\r\n\r\n".encode()
    c2s = [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""), _frame(1, 4, 1, req), _frame(0, 0, 1, inner)]
    s2c = [_frame(4, 0, 0, b"") + _frame(4, 1, 0, b""), _frame(1, 4, 1, rsp),
           _frame(0, 0, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]
    frames = [eth(ipv4(c, s, 6, tcp(40000, 15008, flags=0x02, seq=100, ack=0))),
              eth(ipv4(s, c, 6, tcp(15008, 40000, flags=0x12, seq=500, ack=101))),
              eth(ipv4(c, s, 6, tcp(40000, 15008, flags=0x10, seq=101, ack=501)))]
    cs, ss = 101, 501
    for a, b in zip(c2s, s2c):
        frames.append(eth(ipv4(c, s, 6, tcp(40000, 15008, a, flags=0x18, seq=cs, ack=ss))))
        cs += len(a)
        frames.append(eth(ipv4(s, c, 6, tcp(15008, 40000, b, flags=0x18, seq=ss, ack=cs))))
        ss += len(b)
    write_pcap(path, frames)
    return path


@pytest.fixture(scope="module")
def sample_analysis():
    d = SAMPLES / "concurrent"
    if not (d / "truth.json").exists():
        pytest.skip(f"lab sample {d} not found")
    return hbonecap.analyze(d, keylog=d / "keylog.txt")


def test_plots_return_figures_and_use_the_given_axes(sample_analysis):
    a = sample_analysis
    assert len(a.hops) and len(a.flows)
    for fig in (a.plot_latency(), a.plot_timeline(), a.plot_flow(int(a.flows["flow_id"].iloc[0]))):
        assert isinstance(fig, Figure)
        assert fig.axes and fig.axes[0].has_data() or fig.axes[0].texts
    host = Figure()
    ax = host.add_subplot(1, 1, 1)
    assert a.plot_latency(ax=ax) is host
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "CONNECT" in labels and "SYN" in labels
    with pytest.raises(KeyError):
        a.plot_flow(10_000)


def test_report_sections_and_plots(sample_analysis, tmp_path):
    html = build_report(sample_analysis)
    for section in ("id=analysed", "id=findings", "id=latency", "id=journeys", "id=flows", "id=anomalies"):
        assert section in html
    assert html.count("data:image/png;base64,") >= 3
    assert "http://" not in html and "https://" not in html
    keylog = (SAMPLES / "concurrent" / "keylog.txt").read_text().split()
    secrets = [w for w in keylog if len(w) >= 64]
    assert secrets and not any(s in html for s in secrets)


def test_hostile_header_values_render_as_text(tmp_path):
    a = hbonecap.analyze(hostile_capture(tmp_path / "node-a-eth0.pcap"))
    assert HOSTILE + ":8080" in set(a.streams["authority"])       # the stage really decoded it
    html = build_report(a)
    assert "<script>document.title" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=" in html


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(page: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    net = tmp / "net.json"
    r = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={net}",
                        *extra, page.as_uri()], capture_output=True, text=True, timeout=120)
    d = json.loads(net.read_text())
    # requests made for the page (the browser's own background requests have no origin)
    urls = {e["params"]["url"] for e in d.get("events", []) if "url" in e.get("params", {})
            and e["params"].get("initiator", "not an origin") != "not an origin"}
    return r, urls


def test_report_in_headless_chromium(tmp_path):
    a = hbonecap.analyze(hostile_capture(tmp_path / "node-a-eth0.pcap"))
    page = write_report(a, tmp_path / "report.html", title="hostile capture report")
    shot = tmp_path / "shot.png"
    r, urls = _chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1400,2000")
    assert shot.exists() and shot.stat().st_size > 10_000, r.stderr[-500:]
    assert not [u for u in urls if not u.startswith(("file:", "data:"))]
    r, _ = _chromium(page, tmp_path / "dom", "--dump-dom")
    dom = r.stdout
    assert "<title>hostile capture report</title>" in dom and "PWNED" not in dom.split("<title>")[1].split("</title>")[0]
    for section in ('id="analysed"', 'id="findings"', 'id="latency"', 'id="flows"', 'id="anomalies"'):
        assert section in dom
    assert '<img src="x"' not in dom and "&lt;script&gt;document.title=" in dom


def test_network_check_detects_a_fetch(tmp_path):
    """Control for the check above: a page that loads something from loopback is caught."""
    page = tmp_path / "fetching.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/probe.png"></body></html>')
    _, urls = _chromium(page, tmp_path, "--dump-dom")
    assert any(u.startswith("http://127.0.0.1:9/") for u in urls)


@pytest.mark.parametrize("era", ["geneve", "inpod"])
def test_capture_plan_names_are_recognised(era):
    text = plan(era, [("demo", "sleep-7d9"), ("demo", "echo-5b4")], ["a", "b"])
    names = {w.rstrip(";") for line in text.splitlines() for w in line.split() if w.endswith((".pcap", ".pcapng"))}
    expected = {"node-a-any.pcapng": "node", "pod-sleep-7d9-eth0.pcap": "pod", "waypoint-WAYPOINT-eth0.pcap": "waypoint"}
    if era == "geneve":
        expected |= {"node-a-istioout.pcap": "istioout", "ztunnel-b-pistioin.pcap": "pistioin", "ztunnel-a-eth0.pcap": "ztunnel"}
    else:
        expected |= {"pod-echo-5b4-lo.pcap": "loopback"}
    for name, role in expected.items():
        assert name in names, name
        assert guess_point(name, [], set(), set(), set()).role == role
    assert ("lo.pcap" in text) == (era == "inpod")
    assert "never writes TLS key logs" in text

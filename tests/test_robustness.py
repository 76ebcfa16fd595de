"""Hostile input: random bytes, truncation at every offset, corrupted headers. Only CaptureError may escape,
every record is either a packet row or an anomaly, and nothing hangs."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbonecap.decode import decode_capture
from hbonecap.errors import CaptureError
from tests.conftest import CONFORMANCE
from tests.packets import eth, geneve, ipv4, ipv6, tcp, udp, vxlan, write_pcap

SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _sample_capture(tmp_path) -> bytes:
    inner = eth(ipv4("10.244.1.5", "10.96.0.10", 6, tcp(40000, 9080, b"GET / HTTP/1.1\r\n\r\n")))
    frames = [
        eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(5, 6081, geneve(1001, inner)))),
        eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(5, 4789, vxlan(7, inner)))),
        eth(ipv6("fd00::1", "fd00::2", 6, tcp(1, 15008, b"\x16\x03\x01")), 0x86DD),
        eth(ipv4("10.0.0.1", "10.0.0.2", 1, b"\x08\x00\x00\x00\x00\x01\x00\x01"), vlans=(5,)),
    ]
    p = tmp_path / "sample.pcap"
    write_pcap(p, frames)
    return p.read_bytes()


def _decode_bytes(tmp_path, data: bytes, name: str = "x.pcap"):
    p = tmp_path / name
    p.write_bytes(data)
    try:
        return decode_capture(p)
    except CaptureError as e:
        assert str(p) in str(e)
        return None


def test_truncation_at_every_offset(tmp_path):
    data = _sample_capture(tmp_path)
    full = decode_capture(tmp_path / "sample.pcap")
    for cut in range(len(data) + 1):
        r = _decode_bytes(tmp_path, data[:cut])
        if r is None:
            assert cut < 24
            continue
        assert len(r.packets) <= len(full.packets)
        assert r.packets["index"].is_monotonic_increasing
        boundaries = {24}
        pos = 24
        for caplen in full.packets["caplen"]:
            pos += 16 + int(caplen)
            boundaries.add(pos)
        if cut not in boundaries:   # a cut inside a record must be reported
            assert {"capture_truncated_record", "capture_trailing_bytes"} & set(r.anomalies["kind"]), cut


def test_truncated_last_record_keeps_what_was_read(tmp_path):
    data = _sample_capture(tmp_path)
    r = _decode_bytes(tmp_path, data[:-5])
    assert len(r.packets) == 4
    assert "capture_truncated_record" in set(r.anomalies["kind"])
    assert r.packets.iloc[-1]["caplen"] < r.packets.iloc[-1]["length"]


@SETTINGS
@given(data=st.binary(max_size=3000))
def test_random_bytes(tmp_path, data):
    _decode_bytes(tmp_path, data)


@SETTINGS
@given(body=st.binary(max_size=3000), magic=st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",
                                                             b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a"]))
def test_random_bytes_behind_a_valid_magic(tmp_path, body, magic):
    _decode_bytes(tmp_path, magic + body)


@SETTINGS
@given(frames=st.lists(st.binary(max_size=200), max_size=20),
       linktype=st.sampled_from([0, 1, 101, 108, 113, 228, 229, 276, 147]))
def test_random_frames_for_every_link_type(tmp_path, frames, linktype):
    p = tmp_path / "f.pcap"
    write_pcap(p, frames, linktype)
    r = decode_capture(p)
    assert len(r.packets) == len(frames)


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(min_value=24, max_value=10_000), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_corrupted_headers(tmp_path, flips):
    data = bytearray(_sample_capture(tmp_path))
    for pos, val in flips:
        data[pos % len(data)] = val
    _decode_bytes(tmp_path, bytes(data))


def test_huge_record_length_stops_with_anomaly(tmp_path):
    data = bytearray(_sample_capture(tmp_path))
    struct.pack_into("<I", data, 24 + 8, 0x7FFFFFFF)   # first record claims 2 GiB
    r = _decode_bytes(tmp_path, bytes(data))
    assert len(r.packets) == 0 and list(r.anomalies["kind"]) == ["pcap_bad_record"]


def test_gzip_and_garbage(tmp_path):
    data = _sample_capture(tmp_path)
    r = _decode_bytes(tmp_path, gzip.compress(data), "x.pcap.gz")
    assert len(r.packets) == 4 and r.info.format == "pcap+gzip"
    with pytest.raises(CaptureError):
        decode_capture(_write(tmp_path / "bad.gz", b"\x1f\x8b" + b"\x00" * 50))
    with pytest.raises(CaptureError, match="not a pcap or pcapng"):
        decode_capture(_write(tmp_path / "text.pcap", b"hello world, not a capture"))


def test_pcapng_version_2_is_rejected(tmp_path):
    shb = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 2, 0, -1, 28)
    with pytest.raises(CaptureError, match="version 2.0"):
        decode_capture(_write(tmp_path / "v2.pcapng", shb))


def _write(p, data):
    p.write_bytes(data)
    return p


@pytest.mark.conformance
@settings(max_examples=60, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.floats(min_value=0.0, max_value=1.0), which=st.integers(0, 5))
def test_truncated_conformance_captures(tmp_path, frac, which):
    files = ["the-tcpdump-group_tcpdump/tests/geneve.pcap", "zeek_zeek/testing/btest/Traces/linux_dlt_sll2.pcap",
             "gopacket_gopacket/pcapgo/tests/le/test202.pcapng", "zeek_zeek/testing/btest/Traces/tunnels/geneve-many-options.pcap",
             "the-tcpdump-group_tcpdump/tests/vxlan.pcap", "secdev_scapy/test/pcaps/macos.pcapng.gz"]
    src = CONFORMANCE / files[which]
    if not src.exists():
        pytest.skip(f"conformance captures not found at {CONFORMANCE}")
    data = src.read_bytes()
    if src.suffix == ".gz":
        data = gzip.decompress(data)
    _decode_bytes(tmp_path, data[: int(len(data) * frac)], "cut" + src.suffix.replace(".gz", ".pcapng"))


def test_unreadable_files_in_worker_processes_are_reported(tmp_path, monkeypatch):
    """Files that are not captures, analysed by worker processes (two points, and one point split into stream
    shares): each becomes a capture_unreadable row with its reason (the error crosses the process boundary), the
    readable capture beside them is analysed."""
    import os
    import shutil

    import hbonecap
    from hbonecap import api

    for name in ("a.pcap", "b.pcap"):
        (tmp_path / name).write_bytes(os.urandom(1 << 16))
    good = tmp_path / "good.pcap"
    shutil.copy(Path(__file__).resolve().parents[1] / "samples" / "sequential" / "node-a-eth0.pcap", good)
    a = hbonecap.analyze([str(tmp_path / "a.pcap"), str(tmp_path / "b.pcap"), str(good)], jobs=2, on_error="skip")
    bad = a.anomalies[a.anomalies["kind"].astype(str) == "capture_unreadable"]
    assert sorted(bad["capture"].astype(str)) == ["a.pcap", "b.pcap"]
    assert bad["detail"].str.contains("not a pcap or pcapng").all()
    assert list(a.captures["capture"].astype(str)) == ["good.pcap"] and len(a.connections) > 0
    monkeypatch.setattr(api, "MIN_SHARE_BYTES", 1 << 10)
    a = hbonecap.analyze(str(tmp_path / "a.pcap"), jobs=2, on_error="skip")
    assert list(a.anomalies["kind"].astype(str)) == ["capture_unreadable"]
    with pytest.raises(CaptureError):
        hbonecap.analyze(str(tmp_path / "b.pcap"), jobs=2)

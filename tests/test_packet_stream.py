"""Building the packets table: compiled key factorisation against its numpy/pandas form, interned strings against
`ipaddress`, the mapped reader against the buffered one, and the streaming forms (PacketStream, write_packets,
`decode -f parquet -o`) against the in-memory table."""
from __future__ import annotations

import dataclasses
import gzip
import ipaddress
import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hbonecap.cli import app
from hbonecap.config import DEFAULT_CONFIG
from hbonecap.decode import PacketStream, decode_capture, write_packets
from hbonecap.layers import keys
from tests.packets import eth, geneve, ipv4, ipv6, tcp, udp, vxlan, write_pcap


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=50),
       picks=st.lists(st.integers(0, 10**6), max_size=3000))
def test_factorize_equals_pandas(values, picks):
    k = np.array([values[p % len(values)] for p in picks], dtype=np.int64)
    codes, uniq = keys.factorize(k)
    ref_codes, ref_uniq = keys._factorize_py(k)
    assert codes.tolist() == ref_codes.tolist() and uniq.tolist() == ref_uniq.tolist()


def test_factorize_grows_its_table():
    k = np.random.default_rng(3).integers(-2**62, 2**62, 50_000)[np.random.default_rng(4).integers(0, 50_000, 200_000)]
    codes, uniq = keys.factorize(k)
    assert (uniq[codes] == k).all()
    assert len(uniq) == len(np.unique(k))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), depth_cap=st.integers(1, 4))
def test_packed_keys_equal_numpy(data, n, depth_cap):
    ver = np.array(data.draw(st.lists(st.sampled_from([0, 4, 6]), min_size=n, max_size=n)), dtype=np.int8)
    addr = np.array(data.draw(st.lists(st.binary(min_size=16, max_size=16), min_size=n, max_size=n)) or [b""] * 0,
                    dtype=object)
    addr = np.frombuffer(b"".join(addr), dtype=np.uint8).reshape(n, 16)
    assert keys.address_keys(ver, addr).tolist() == keys._address_keys_py(ver, addr).tolist()
    depth = np.array(data.draw(st.lists(st.integers(0, depth_cap), min_size=n, max_size=n)), dtype=np.int8)
    ttype = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n * depth_cap, max_size=n * depth_cap)),
                     dtype=np.int8).reshape(n, depth_cap)
    vni = np.array(data.draw(st.lists(st.integers(-1, 1 << 25), min_size=n * depth_cap, max_size=n * depth_cap)),
                   dtype=np.int64).reshape(n, depth_cap)
    assert keys.encap_keys(depth, ttype, vni).tolist() == keys._encap_keys_py(depth, ttype, vni).tolist()


def _mixed(count: int, seed: int = 7) -> list[tuple[bytes, str, str]]:
    """(frame, innermost source address, encap) for IPv4 and IPv6, plain, in Geneve, in VXLAN in Geneve, and
    three tunnels deep (past the packed keys)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = f"10.{rng.randrange(4)}.0.{rng.randrange(1, 250)}", f"10.9.0.{rng.randrange(1, 250)}"
        inner = tcp(40000 + i % 50, 80, b"x" * rng.randrange(0, 300), seq=i)
        kind = rng.randrange(5)
        if kind == 0:
            out.append((eth(ipv4(a, b, 6, inner)), a, ""))
        elif kind == 1:
            a6 = f"fd00::{rng.randrange(1, 99):x}"
            out.append((eth(ipv6(a6, "2001:db8::1", 6, inner), etype=0x86DD), a6, ""))
        elif kind == 2:
            g = udp(20000, 6081, geneve(1001, eth(ipv4(a, b, 6, inner))))
            out.append((eth(ipv4("172.18.0.2", "172.18.0.3", 17, g)), a, "geneve:1001"))
        elif kind == 3:
            v = eth(ipv4("192.168.0.1", "192.168.0.2", 17, udp(20001, 4789, vxlan(0xFFFFFF, eth(ipv4(a, b, 6, inner))))))
            out.append((eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(20000, 6081, geneve(1000, v)))), a,
                        "geneve:1000/vxlan:16777215"))
        else:
            v = eth(ipv4("192.168.0.1", "192.168.0.2", 17, udp(20001, 4789, vxlan(42, eth(ipv4(a, b, 6, inner))))))
            g = eth(ipv4("172.18.0.2", "172.18.0.3", 17, udp(20000, 6081, geneve(7, v))))
            out.append((eth(ipv4("172.17.0.2", "172.17.0.3", 17, udp(20002, 4789, vxlan(5, g)))), a,
                        "vxlan:5/geneve:7/vxlan:42"))
    return out


def _mixed_frames(count: int, seed: int = 7) -> list[bytes]:
    return [f for f, _, _ in _mixed(count, seed)]


def test_interned_columns_match_the_frames(tmp_path):
    made = _mixed(600)
    p = tmp_path / "mixed.pcap"
    write_pcap(p, [f for f, _, _ in made])
    pk = decode_capture(p).packets
    assert pk["src"].astype(str).tolist() == [str(ipaddress.ip_address(a)) for _, a, _ in made]
    assert pk["encap"].astype(str).tolist() == [e for _, _, e in made]
    deep = pk[pk["encap"] == "vxlan:5/geneve:7/vxlan:42"]
    assert len(deep) and (deep["outer_src"] == "172.17.0.2").all() and (deep["vni"] == 42).all()
    assert pk.loc[pk["encap"] == "", "outer_src"].isna().all()


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns:
        x, y = a[c].reset_index(drop=True), b[c].reset_index(drop=True)
        if isinstance(x.dtype, pd.CategoricalDtype) or isinstance(y.dtype, pd.CategoricalDtype):
            x, y = x.astype(object), y.astype(object)
        else:
            assert x.dtype == y.dtype, c
        assert x.equals(y), c


def test_mapped_reader_equals_buffered_reader_across_windows(tmp_path):
    """Small windows: records straddle every window edge; the gzip copy of the same file takes the read path."""
    frames = _mixed_frames(3000, seed=11)
    p = tmp_path / "w.pcap"
    write_pcap(p, frames)
    gz = tmp_path / "w.pcap.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    cfg = dataclasses.replace(DEFAULT_CONFIG, chunk_bytes=10_000, max_record_bytes=4_000, batch_packets=333)
    mapped, read = decode_capture(p, cfg), decode_capture(gz, cfg, name="w.pcap")
    _same(mapped.packets, read.packets)
    _same(mapped.packets, decode_capture(p).packets)
    assert mapped.info.packets == len(frames)


def test_packet_stream_parts_equal_the_whole_table(tmp_path):
    p = tmp_path / "s.pcap"
    write_pcap(p, _mixed_frames(2500, seed=5))
    cfg = dataclasses.replace(DEFAULT_CONFIG, chunk_bytes=20_000, max_record_bytes=4_000)
    whole = decode_capture(p, cfg)
    stream = PacketStream(p, cfg, rows=300)
    parts = list(stream)
    assert len(parts) > 3 and all(len(x) for x in parts)
    _same(pd.concat(parts, ignore_index=True), whole.packets)
    _same(stream.anomalies, whole.anomalies)


def test_write_packets_file_and_directory(tmp_path):
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    write_pcap(a, _mixed_frames(900, seed=1))
    write_pcap(b, _mixed_frames(700, seed=2))
    n, _ = write_packets([str(a), str(b)], tmp_path / "one.parquet", rows=100)
    assert n == 1600
    both = pd.concat([decode_capture(a).packets, decode_capture(b).packets], ignore_index=True)
    _same(pd.read_parquet(tmp_path / "one.parquet"), both)
    out = tmp_path / "dir"
    out.mkdir()
    n, _ = write_packets([str(a), str(b)], out, jobs=2, rows=100)
    assert n == 1600 and sorted(f.name for f in out.iterdir()) == ["a.pcap.parquet", "b.pcap.parquet"]
    _same(pd.read_parquet(out / "b.pcap.parquet"), decode_capture(b).packets)


def test_cli_streams_packets_to_parquet(tmp_path):
    a = tmp_path / "a.pcap"
    write_pcap(a, _mixed_frames(300, seed=9))
    out = tmp_path / "out.parquet"
    r = CliRunner().invoke(app, ["decode", str(a), "-f", "parquet", "-o", str(out), "-c", "index,src,encap"])
    assert r.exit_code == 0, r.output
    got = pd.read_parquet(out)
    assert list(got.columns) == ["index", "src", "encap"] and len(got) == 300
    bad = tmp_path / "notes.pcap"
    bad.write_text("not a capture at all")
    r = CliRunner().invoke(app, ["decode", str(a), str(bad), "-f", "parquet", "-o", str(tmp_path / "x.parquet")])
    assert r.exit_code != 0 and "not a pcap" in r.output
    assert not (tmp_path / "x.parquet").exists()


def test_a_refused_block_estimate_falls_back_to_the_batch(tmp_path, monkeypatch):
    """When the address space for the estimated rows is refused, each batch gets its own block: same table."""
    import hbonecap.decode as D

    p = tmp_path / "many.pcap"
    write_pcap(p, [bytes(60 + i % 7) for i in range(3000)])
    want = D.decode_capture(p).packets
    real = D._int_block

    def small_only(rows, cols):
        if cols > 1000:
            raise OSError(12, "Cannot allocate memory")
        return real(rows, cols)

    monkeypatch.setattr(D, "_int_block", small_only)
    cfg = D.DEFAULT_CONFIG.__class__(batch_packets=500)
    got = D.decode_capture(p, cfg).packets
    pd.testing.assert_frame_equal(got, want)


def test_read_ahead_stays_ahead_of_the_walk_and_stops(tmp_path, monkeypatch):
    """A mapped capture is asked from the disk ahead of the walk (POSIX_FADV_WILLNEED), in order, never more
    than the lead past the window being walked, up to the end of the file when walked to the end; abandoning the
    walk half way ends the read-ahead thread."""
    import os
    import threading

    from hbonecap.capture import reader as rd
    from hbonecap.capture.reader import CaptureReader

    p = tmp_path / "r.pcap"
    write_pcap(p, _mixed_frames(3000, seed=3))
    size = p.stat().st_size
    cfg = dataclasses.replace(DEFAULT_CONFIG, chunk_bytes=20_000, max_record_bytes=4_000)
    window = cfg.chunk_bytes + cfg.max_record_bytes + 65536
    monkeypatch.setattr(rd, "READ_AHEAD_STEP", 8192)
    asked, walked = [], []
    real = rd._ReadAhead.reached

    def reached(self, offset):
        walked.append(offset)
        real(self, offset)

    monkeypatch.setattr(rd._ReadAhead, "reached", reached)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: asked.append((off, n, advice, list(walked))))
    batches = list(CaptureReader(p, cfg))
    assert len(batches) > 3 and walked                       # several windows
    assert [a[0] for a in asked] == list(range(0, size, 8192))   # in order, the whole file, once
    assert all(a[2] == os.POSIX_FADV_WILLNEED for a in asked)
    lead = window * rd.READ_AHEAD_WINDOWS
    assert all(off < (w[-1] if w else 0) + lead for off, _, _, w in asked)
    # abandoned after the first batch: the thread is gone once the reader is closed
    it = iter(CaptureReader(p, cfg))
    next(it)
    assert any(t.name == "hbonecap-read-ahead" for t in threading.enumerate())
    it.close()
    assert not any(t.name == "hbonecap-read-ahead" for t in threading.enumerate())

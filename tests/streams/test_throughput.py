"""Throughput of the HBONE unwrap (TCP reassembly + TLS 1.3 decryption + HTTP/2 + CONNECT stream bytes), measured.

The target is ~200 MB/s of tunnel payload; the assertion is a lenient floor so that a loaded CI machine does not
fail it, the measured rate is printed (pytest -s) for the record.
"""
from __future__ import annotations

import time

import pytest

from hbone_builder import hbone_exchange, segments
from hbonecap.streams.analyzer import StreamAnalyzer
from hbonecap.streams.tls.keylog import load

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mss", [1448, 65000])
def test_hbone_unwrap_throughput(tmp_path, mss):
    keylog = tmp_path / "keys.log"
    size = 32 << 20
    ex = hbone_exchange([("10.0.0.4:9000", {}, [(0, b"x" * size), (1, b"y" * (size // 4))])], keylog)
    segs = segments(ex, mss=mss)
    best = float("inf")
    for _ in range(2):
        a = StreamAnalyzer(load(keylog))
        t0 = time.process_time()
        for s in segs:
            a.feed(s)
        r = a.close()
        best = min(best, time.process_time() - t0)
    assert r.streams[0]["bytes_c2s"] == size and r.streams[0]["bytes_s2c"] == size // 4
    rate = size * 1.25 / best / 1e6
    print(f"\nHBONE unwrap, {len(segs)} segments of <= {mss} bytes: {rate:.0f} MB/s of tunnel payload "
          f"({best / len(segs) * 1e6:.1f} us per segment, CPU time)")
    assert rate > 15

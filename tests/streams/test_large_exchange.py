"""A large HBONE exchange (32 MiB one way, 8 MiB back, real TLS 1.3) unwraps to exactly the tunnelled byte counts,
at normal and at GSO-sized segments. Its speed is measured by benchmarks/full.py, not here."""
from __future__ import annotations

import pytest

from hbone_builder import hbone_exchange, segments
from hbonecap.streams.analyzer import StreamAnalyzer
from hbonecap.streams.tls.keylog import load

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mss", [1448, 65000])
def test_large_hbone_exchange_unwraps_whole(tmp_path, mss):
    keylog = tmp_path / "keys.log"
    size = 32 << 20
    ex = hbone_exchange([("10.0.0.4:9000", {}, [(0, b"x" * size), (1, b"y" * (size // 4))])], keylog)
    a = StreamAnalyzer(load(keylog))
    for s in segments(ex, mss=mss):
        a.feed(s)
    r = a.close()
    assert r.streams[0]["bytes_c2s"] == size and r.streams[0]["bytes_s2c"] == size // 4
    assert not [x for x in r.anomalies if "gap" in str(x) or "desync" in str(x)]

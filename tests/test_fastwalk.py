"""The compiled record walker against the plain-Python one (its oracle), on crafted and real captures."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hbonecap.capture.pcap import PcapWalker
from tests.conftest import CONFORMANCE, conformance_split
from tests.packets import write_pcap


def _both(data: bytes, final: bool):
    out = []
    for reference in (False, True):
        w = PcapWalker("x", 1 << 20)
        pos = w.start(data)
        p, batch = w.walk(data, pos, 0, final, reference=reference)
        out.append((p, batch.data_off.tolist(), batch.caplen.tolist(), batch.origlen.tolist(), batch.ts_ns.tolist(),
                    w.anomalies, w.finished))
    return out


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=300), max_size=30), cut=st.integers(0, 20000), final=st.booleans(),
       be=st.booleans())
def test_compiled_walker_equals_reference(tmp_path, frames, cut, final, be):
    p = tmp_path / "w.pcap"
    write_pcap(p, frames)
    data = p.read_bytes()
    if be:   # rewrite as a big-endian file
        import struct

        out = bytearray(struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        pos = 24
        while pos + 16 <= len(data):
            s, us, incl, orig = struct.unpack_from("<IIII", data, pos)
            out += struct.pack(">IIII", s, us, incl, orig) + data[pos + 16:pos + 16 + incl]
            pos += 16 + incl
        data = bytes(out)
    data = data[:max(24, min(cut, len(data)))]
    fast, ref = _both(data, final)
    assert fast == ref


@pytest.mark.conformance
@pytest.mark.parametrize("path", [p for p, _g, _t in conformance_split() if p.endswith(".pcap")] or ["<absent>"])
def test_compiled_walker_on_conformance(conformance, path):
    if path == "<absent>":
        pytest.skip("no conformance captures")
    data = (conformance / path).read_bytes()
    fast, ref = _both(data, True)
    assert fast == ref


_CACHE_PROBE = r"""
import sys
import numba
from hbonecap.decode import decode_capture
decode_capture(sys.argv[1])
from hbonecap.capture import fastwalk
from hbonecap.layers import compiled, keys
dispatchers = list(fastwalk._compiled.values()) + [compiled.walk] + list(keys._kernels().values())
missed = {d.py_func.__qualname__: sum(d.stats.cache_misses.values()) for d in dispatchers if d.signatures}
print(sum(missed.values()), sorted(k for k, v in missed.items() if v), len(missed))
"""


def test_compiled_kernels_come_from_numba_cache(tmp_path):
    """A second process finds every compiled decode kernel in numba's cache: a kernel numba cannot cache (e.g.
    one closing over a variable) is compiled again in every process, about a second each."""
    import subprocess
    import sys

    p = tmp_path / "c.pcap"
    write_pcap(p, [bytes(60)] * 3)
    runs = [subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(p)], capture_output=True, text=True, check=True)
            for _ in range(2)]
    out = runs[1].stdout
    misses, used = int(out.split(" ", 1)[0]), int(out.rsplit(" ", 1)[1])
    assert used >= 4, out              # the record walk, the layer walk and the key kernels ran
    assert misses == 0, f"compiled again in a second process: {out}"

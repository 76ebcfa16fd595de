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

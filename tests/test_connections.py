"""Connections table against tshark's TCP conversations (`-z conv,tcp`) for every conformance capture."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from hbonecap.analysis.connections import connections
from hbonecap.decode import decode_capture
from tests.conftest import CONFORMANCE, conformance_split

CONV_FILES = [p for p, _g, _t in conformance_split()
              if (CONFORMANCE / "_oracles" / (p + ".conv_tcp.txt")).exists()]
LINE = re.compile(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s+(\d+)\s+\d+\s+\S+\s+(\d+)\s+\d+\s+\S+\s+(\d+)\s")


def _conversations(path: str) -> Counter:
    out = Counter()
    for line in (CONFORMANCE / "_oracles" / (path + ".conv_tcp.txt")).read_text().splitlines():
        m = LINE.match(line)
        if m:
            a, ap, b, bp, back, fwd, total = m.groups()
            # "<-" counts frames from B to A, "->" frames from A to B
            out[(frozenset({(a, int(ap)), (b, int(bp))}), int(fwd), int(back))] += 1
    return out


@pytest.mark.conformance
@pytest.mark.parametrize("path", CONV_FILES or ["<absent>"])
def test_connections_equal_tshark_conversations(conformance, path):
    if path == "<absent>":
        pytest.skip("no conformance captures")
    expected = _conversations(path)
    res = decode_capture(conformance / path)
    conns = connections(res.packets)
    assert len(conns) == sum(expected.values())
    ours = Counter()
    for r in conns.itertuples():
        ends = frozenset({(r.client_ip, int(r.client_port)), (r.server_ip, int(r.server_port))})
        # tshark's A is not necessarily our client: accept either orientation of the two counts
        key = (ends, int(r.packets_c2s), int(r.packets_s2c))
        alt = (ends, int(r.packets_s2c), int(r.packets_c2s))
        ours[key if key in expected else alt] += 1
    assert ours == expected


@pytest.mark.parametrize("cardinalities", [(3, 2, 5, 7, 7, 1000, 100_000), (100_000,) * 7, (1,) * 7])
def test_lex_rank_is_the_sorted_group_number(cardinalities):
    """The rank of each row's tuple in lexicographic order, as a sorted group-by numbers its groups; the second
    case's radix product overflows 63 bits and takes the group-by itself."""
    import numpy as np
    import pandas as pd

    from hbonecap.analysis.connections import _lex_rank

    rng = np.random.default_rng(len(cardinalities) + cardinalities[0])
    cols = [rng.integers(-2, k, 50_000) for k in cardinalities]
    ref = pd.DataFrame({i: c for i, c in enumerate(cols)}).groupby(list(range(len(cols))), sort=True).ngroup()
    assert (_lex_rank(cols) == ref.to_numpy()).all()

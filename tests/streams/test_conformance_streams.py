"""Stream stages against tshark on third-party captures (../shared/conformance), through the real pipeline.

* H2+HPACK captures: every HTTP/2 header block equals tshark's decoded header list, per TCP connection, in order.
* TLS1.3-DECRYPT / TLS1.2-DECRYPT captures: the decrypted application bytes of each TLS connection equal
  `tshark -z follow,tls,raw` byte for byte, both directions; connections tshark shows no plaintext for get none.
* Key logs sit next to the captures (the oracle's first line names the one tshark used); pcapng Decryption
  Secrets Blocks are added at run time like the CLI does.
"""
from __future__ import annotations

import pytest

from conformance_oracles import CONFORMANCE, ORACLES, all_captures, follow_raw, header_blocks, keylog_path, tagged

pytestmark = pytest.mark.conformance

H2_CAPTURES = tagged("H2+HPACK")
TLS_CAPTURES = [c for c in tagged("TLS1.3-DECRYPT", "TLS1.2-DECRYPT")
                if (ORACLES / (c + ".tls_follow_raw.txt")).is_file()]


def _need_conformance():
    if not (CONFORMANCE / "SPLIT.tsv").is_file():
        pytest.skip(f"conformance captures absent: {CONFORMANCE} (see shared/conformance/README.md)")


def analyse(capture: str):
    from hbonecap.capture.reader import read_secrets
    from hbonecap.layers.segments import iter_tcp_segments
    from hbonecap.streams.analyzer import StreamAnalyzer
    from hbonecap.streams.tls.keylog import load

    path = CONFORMANCE / capture
    kp = keylog_path(capture)
    analyzer = StreamAnalyzer(load(kp) if kp else None, keep_plaintext=True)
    for secret in read_secrets(path):
        analyzer.add_secrets(secret, name=f"{path.name}:dsb")
    for seg in iter_tcp_segments(path, with_pure_acks=True):
        analyzer.feed(seg)
    return analyzer.close()


@pytest.mark.parametrize("capture", H2_CAPTURES or ["<none>"], ids=lambda c: c.rsplit("/", 1)[-1])
def test_http2_header_lists_equal_tshark(capture):
    _need_conformance()
    want = header_blocks(capture)
    results = analyse(capture)
    got: dict[int, list] = {}
    for h in results.http2_headers:
        got.setdefault(h["conn_id"], []).append(None if h["headers"] is None else [tuple(x) for x in h["headers"]])
    assert sorted(got) == sorted(want)
    for conn, blocks in want.items():
        mine = got[conn]
        assert len(mine) == len(blocks), conn
        for i, (w, g) in enumerate(zip(blocks, mine)):
            if w is None:  # tshark could not decode this block (see conformance_oracles.header_blocks)
                assert g, (conn, i)
                continue
            assert g == w, (conn, i)
    assert not [a for a in results.anomalies if a["kind"].startswith(("hpack", "http2"))]


@pytest.mark.parametrize("capture", TLS_CAPTURES or ["<none>"], ids=lambda c: c.rsplit("/", 1)[-1])
def test_decrypted_plaintext_equals_tshark_follow(capture):
    _need_conformance()
    want = follow_raw(capture)
    results = analyse(capture)
    for conn, (node0, node1) in want.items():
        pt = results.plaintext.get(f"c{conn}")
        got = (bytes(pt[0].data), bytes(pt[1].data)) if pt else (b"", b"")
        # tshark's Node 0 is whichever side it saw first; compare both assignments of client/server
        assert got in ((node0, node1), (node1, node0)), (conn, len(node0), len(node1), len(got[0]), len(got[1]))
    extra = [k for k, v in results.plaintext.items() if int(k[1:].split("/")[0]) not in want
             and (v[0].total or v[1].total)]
    assert not extra
    assert not [a for a in results.anomalies if a["kind"] in ("tls_decrypt_failed", "tls_bad_record")]


ALL_CAPTURES = all_captures()


@pytest.mark.parametrize("capture", ALL_CAPTURES or ["<none>"], ids=lambda c: c.rsplit("/", 1)[-1])
def test_every_capture_analyses_without_error(capture):
    """Stream stages never raise on third-party captures (NEG/malformed ones included); rows keep their schema."""
    _need_conformance()
    from hbonecap.errors import CaptureError
    from hbonecap.tables import columns

    try:
        results = analyse(capture)
    except CaptureError:
        pytest.skip("the capture reader rejects this file (its own tests check that)")
    for name in ("tunnels", "streams", "requests", "anomalies"):
        for row in getattr(results, name):
            assert set(row) <= set(columns(name))


@pytest.mark.parametrize("capture", tagged("H1-CONNECT-tunnel") or ["<none>"], ids=lambda c: c.rsplit("/", 1)[-1])
def test_http1_connect_tunnels(capture):
    _need_conformance()
    results = analyse(capture)
    methods = [r["method"] for r in results.requests]
    assert "CONNECT" in methods
    assert [r["status"] for r in results.requests if r["method"] == "CONNECT"] == [200]

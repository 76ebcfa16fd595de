"""The resynchronisation scanners' numpy prefilters keep every offset the exact per-offset checks accept, so
finding a frame or record start in random bytes gives the same answer as checking each offset in Python."""
from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from hbonecap.streams.http2 import frames
from hbonecap.streams.tls import records


def _start_by_offset(buf: bytes, plausible, header: int) -> int:
    """The first offset where a plausible header is followed by another one or ends the data: every offset tried."""
    n = len(buf)
    for pos in range(0, n - header + 1):
        size = plausible(buf, pos)
        if size >= 0 and (pos + size == n or (pos + size + header <= n and plausible(buf, pos + size) >= 0)):
            return pos
    return -1


def test_candidates_include_every_plausible_offset():
    buf = bytearray(os.urandom(1 << 16))
    for at in range(1000, len(buf) - 100, 4099):       # real headers scattered in the noise
        buf[at:at + 5] = bytes.fromhex("1703030040")
        buf[at + 50:at + 59] = bytes.fromhex("000008060000000000")
    buf = bytes(buf)
    hi_f, hi_r = len(buf) - 9 + 1, len(buf) - 5 + 1
    want_f = [p for p in range(hi_f) if frames.plausible(buf, p) >= 0]
    want_r = [p for p in range(hi_r) if records.plausible(buf, p) >= 0]
    got_f = set(frames._header_candidates(buf, 0, hi_f))
    got_r = set(records._header_candidates(buf, hi_r))
    assert want_f and want_r and set(want_f) <= got_f and set(want_r) <= got_r
    assert len(got_f) < hi_f / 4 and len(got_r) < hi_r / 100       # the prefilter does filter


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.integers(0, 2000))
def test_scanners_equal_the_offset_by_offset_search(noise, cut):
    # noise, then a real frame chain / record chain, so both outcomes occur
    chain_f = bytes.fromhex("000004080000000000") + b"\x00\x00\x10\x00" + bytes.fromhex("000000040100000000")
    chain_r = bytes.fromhex("1703030004") + b"abcd" + bytes.fromhex("1703030002") + b"ef"
    for buf in (noise, noise + chain_f, noise[:cut] + chain_r + noise[cut:]):
        assert frames.find_frame_start(buf) == _start_by_offset(buf, frames.plausible, 9)
        assert records.find_record_start(buf) == _start_by_offset(buf, records.plausible, 5)
        growing = bytearray(buf)
        frames.find_frame_start(growing)
        growing += b"x"                                # the scan released the buffer: it can still grow

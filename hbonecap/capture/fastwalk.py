"""Compiled record walkers (numba): the one inherently sequential step of decoding a capture.

Each record's position depends on the previous record's length, so finding record boundaries cannot be
vectorised; these loops do it at memory speed. They are checked against the pure-Python walkers
(`PcapWalker.walk_reference`) in the test suite. numba compiles them on first use and caches the machine code.
"""
from __future__ import annotations

import numpy as np

_compiled = {}


def _build():
    import numba

    @numba.njit(cache=True, nogil=True)
    def pcap_offsets(buf, pos, hdr, big_endian, max_record, out):
        """Record header offsets from `pos`; returns (count, next position, 1 if a record was too large)."""
        end = buf.shape[0]
        n = 0
        p = pos
        while p + hdr <= end:
            if big_endian:
                incl = (np.int64(buf[p + 8]) << 24) | (np.int64(buf[p + 9]) << 16) | (np.int64(buf[p + 10]) << 8) | np.int64(buf[p + 11])
            else:
                incl = (np.int64(buf[p + 11]) << 24) | (np.int64(buf[p + 10]) << 16) | (np.int64(buf[p + 9]) << 8) | np.int64(buf[p + 8])
            if incl > max_record:
                return n, p, 1
            nxt = p + hdr + incl
            if nxt > end:
                break
            out[n] = p
            n += 1
            p = nxt
        return n, p, 0

    return pcap_offsets


def pcap_offsets(buf: np.ndarray, pos: int, hdr: int, big_endian: bool, max_record: int):
    fn = _compiled.get("pcap")
    if fn is None:
        fn = _compiled["pcap"] = _build()
    out = np.empty(max(1, (len(buf) - pos) // hdr + 1), dtype=np.int64)
    n, p, bad = fn(buf, pos, hdr, big_endian, max_record, out)
    return out[:n], int(p), bool(bad)

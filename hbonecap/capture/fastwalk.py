"""Compiled record walkers (numba): the one inherently sequential step of decoding a capture.

Each record's position depends on the previous record's length, so finding record boundaries cannot be
vectorised; this loop does it at memory speed and, while each record header is in cache, also takes its
timestamp and lengths (one pass over the headers instead of a second gather). It is checked against the
pure-Python walker (`PcapWalker.walk(..., reference=True)`) in the test suite. numba compiles it on first use and
caches the machine code.
"""
from __future__ import annotations

import numpy as np

_compiled = {}


# How far ahead of the record being read the walk asks for the file's bytes (a cache-line pair per record): the
# next record's position depends on this one's length, so without the hint every record header is a cache miss.
AHEAD_BYTES = 4096


prefetch = None       # capture.prefetch.prefetch once _build has imported numba (a global, not a closure variable:
                      # numba does not cache functions that close over variables)


def _build():
    global prefetch
    import numba

    from hbonecap.capture.prefetch import prefetch

    @numba.njit(cache=True, nogil=True)
    def pcap_records(buf, pos, hdr, big_endian, max_record, frac_ns, offs, caplen, origlen, ts_ns):
        """Records from `pos`: header offset, captured and original length, timestamp in ns. Returns
        (count, next position, 1 if a record was too large)."""
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
            prefetch(buf, nxt + AHEAD_BYTES)
            prefetch(buf, nxt + AHEAD_BYTES + 64)
            if big_endian:
                sec = (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16) | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])
                frac = (np.int64(buf[p + 4]) << 24) | (np.int64(buf[p + 5]) << 16) | (np.int64(buf[p + 6]) << 8) | np.int64(buf[p + 7])
                orig = (np.int64(buf[p + 12]) << 24) | (np.int64(buf[p + 13]) << 16) | (np.int64(buf[p + 14]) << 8) | np.int64(buf[p + 15])
            else:
                sec = (np.int64(buf[p + 3]) << 24) | (np.int64(buf[p + 2]) << 16) | (np.int64(buf[p + 1]) << 8) | np.int64(buf[p])
                frac = (np.int64(buf[p + 7]) << 24) | (np.int64(buf[p + 6]) << 16) | (np.int64(buf[p + 5]) << 8) | np.int64(buf[p + 4])
                orig = (np.int64(buf[p + 15]) << 24) | (np.int64(buf[p + 14]) << 16) | (np.int64(buf[p + 13]) << 8) | np.int64(buf[p + 12])
            offs[n] = p
            caplen[n] = incl
            origlen[n] = orig
            ts_ns[n] = sec * 1_000_000_000 + frac * frac_ns
            n += 1
            p = nxt
        return n, p, 0

    return pcap_records


def pcap_records(buf: np.ndarray, pos: int, hdr: int, big_endian: bool, max_record: int, frac_ns: int):
    """(header offsets, caplen, origlen, ts_ns, next position, too large) of the records wholly in buf[pos:]."""
    fn = _compiled.get("pcap")
    if fn is None:
        fn = _compiled["pcap"] = _build()
    cap = max(1, (len(buf) - pos) // hdr + 1)
    out = np.empty((4, cap), dtype=np.int64)     # untouched pages of the upper bound are never committed
    n, p, bad = fn(buf, pos, hdr, big_endian, max_record, frac_ns, out[0], out[1], out[2], out[3])
    if n * 4 < cap:                                # keep what was found, not the upper bound
        out = out[:, :n].copy()
    return out[0, :n], out[1, :n], out[2, :n], out[3, :n], int(p), bool(bad)

"""Compiled record walkers (numba): the one inherently sequential step of decoding a capture.

Each record's position depends on the previous record's length, so finding record boundaries cannot be
vectorised; this loop does it at memory speed and, while each record header is in cache, also takes its
timestamp and lengths (one pass over the headers instead of a second gather). It is checked against the
pure-Python walker (`PcapWalker.walk(..., reference=True)`) in the test suite. The pcapng walker hands it runs of
plain Enhanced Packet Blocks (`pcapng_epbs`), checked against `PcapngWalker.walk(..., reference=True)`. numba compiles it on first use and
caches the machine code.
"""
from __future__ import annotations

import numpy as np

_compiled = {}


# How far ahead of the record being read the walk asks for the file's bytes (a cache-line pair per record): the
# next record's position depends on this one's length, so without the hint every record header is a cache miss.
AHEAD_BYTES = 4096


# capture.prefetch.prefetch and the byte readers once _build has imported numba (globals, not closure variables:
# numba does not cache functions that close over variables)
prefetch = u32 = u16 = None


def _build():
    global prefetch, u32, u16          # globals, not closure variables, for numba's cache
    import numba

    from hbonecap.capture.prefetch import prefetch

    @numba.njit(cache=True, nogil=True)
    def u32(buf, p, big_endian):
        if big_endian:
            return (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16) | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])
        return (np.int64(buf[p + 3]) << 24) | (np.int64(buf[p + 2]) << 16) | (np.int64(buf[p + 1]) << 8) | np.int64(buf[p])

    @numba.njit(cache=True, nogil=True)
    def u16(buf, p, big_endian):
        if big_endian:
            return (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
        return (np.int64(buf[p + 1]) << 8) | np.int64(buf[p])

    @numba.njit(cache=True, nogil=True)
    def pcap_records(buf, pos, hdr, big_endian, max_record, frac_ns, offs, caplen, origlen, ts_ns):
        """Records from `pos`: header offset, captured and original length, timestamp in ns. Returns
        (count, next position, 1 if a record was too large)."""
        end = buf.shape[0]
        n = 0
        p = pos
        while p + hdr <= end:
            incl = u32(buf, p + 8, big_endian)
            if incl > max_record:
                return n, p, 1
            nxt = p + hdr + incl
            if nxt > end:
                break
            prefetch(buf, nxt + AHEAD_BYTES)
            prefetch(buf, nxt + AHEAD_BYTES + 64)
            offs[n] = p
            caplen[n] = incl
            origlen[n] = u32(buf, p + 12, big_endian)
            ts_ns[n] = u32(buf, p, big_endian) * 1_000_000_000 + u32(buf, p + 4, big_endian) * frac_ns
            n += 1
            p = nxt
        return n, p, 0

    @numba.njit(cache=True, nogil=True)
    def pcapng_epbs(buf, pos, big_endian, n_ifaces, max_block, max_options, out):
        """Consecutive plain Enhanced Packet Blocks from `pos` (see `pcapng_epbs` below). Returns (count, next
        position); out rows: data offset, caplen, origlen, timestamp high and low words, local interface id,
        epb_flags (-1: none)."""
        end = buf.shape[0]
        n = 0
        p = pos
        while p + 32 <= end:
            if u32(buf, p, big_endian) != 6:
                break
            blen = u32(buf, p + 4, big_endian)
            if blen < 32 or blen % 4 != 0 or blen > max_block or p + blen > end:
                break
            if u32(buf, p + blen - 4, big_endian) != blen:
                break
            iface = u32(buf, p + 8, big_endian)
            cap = u32(buf, p + 20, big_endian)
            if iface >= n_ifaces or cap > blen - 32:
                break
            opt = p + 28 + ((cap + 3) & ~3)
            opt_end = p + blen - 4
            flags = -1
            plain = True
            for _ in range(max_options):
                if opt + 4 > opt_end:
                    break
                code = u16(buf, opt, big_endian)
                length = u16(buf, opt + 2, big_endian)
                if code == 0:
                    break
                if code == 1 or opt + 4 + length > opt_end:     # a comment, or an option past its block
                    plain = False
                    break
                if code == 2 and length == 4:
                    flags = u32(buf, opt + 4, big_endian)
                opt += 4 + ((length + 3) & ~3)
            if not plain:
                break
            prefetch(buf, p + blen + AHEAD_BYTES)
            out[0, n] = p + 28
            out[1, n] = cap
            out[2, n] = u32(buf, p + 24, big_endian)
            out[3, n] = u32(buf, p + 12, big_endian)
            out[4, n] = u32(buf, p + 16, big_endian)
            out[5, n] = iface
            out[6, n] = flags
            n += 1
            p += blen
        return n, p

    return {"pcap": pcap_records, "pcapng_epbs": pcapng_epbs}


def _kernel(name: str):
    if not _compiled:
        _compiled.update(_build())
    return _compiled[name]


def pcapng_epbs(buf: np.ndarray, pos: int, big_endian: bool, n_ifaces: int, max_block: int, max_options: int):
    """The run of Enhanced Packet Blocks from `pos` that need nothing but their fixed fields: whole in buf,
    length fields valid and equal, a known interface, the captured length within the block, options without a
    comment and within the block (epb_flags taken). The walk stops at any other block, which the caller's
    plain-Python walker then handles with its anomalies. Returns ((7, count) int64 array as in the kernel,
    next position)."""
    fn = _kernel("pcapng_epbs")
    cap = max(1, (len(buf) - pos) // 32 + 1)
    out = np.empty((7, cap), dtype=np.int64)     # untouched pages of the upper bound are never committed
    n, p = fn(buf, pos, big_endian, n_ifaces, max_block, max_options, out)
    return out[:, :n].copy(), int(p)


def pcap_records(buf: np.ndarray, pos: int, hdr: int, big_endian: bool, max_record: int, frac_ns: int):
    """(header offsets, caplen, origlen, ts_ns, next position, too large) of the records wholly in buf[pos:]."""
    fn = _kernel("pcap")
    cap = max(1, (len(buf) - pos) // hdr + 1)
    out = np.empty((4, cap), dtype=np.int64)     # untouched pages of the upper bound are never committed
    n, p, bad = fn(buf, pos, hdr, big_endian, max_record, frac_ns, out[0], out[1], out[2], out[3])
    if n * 4 < cap:                                # keep what was found, not the upper bound
        out = out[:, :n].copy()
    return out[0, :n], out[1, :n], out[2, :n], out[3, :n], int(p), bool(bad)

"""Per-packet keys of the packets table's categorical columns, and their factorisation, compiled (numba).

The packets table stores addresses, tunnel stacks and protocols as categories. Each column is turned into one
64-bit key per packet (IPv4 address with its version; up to two tunnel levels packed with their 24-bit VNIs;
the protocol code) and factorised with an open-addressing hash table that stays small (a capture has few
distinct values), so a batch costs one pass. `hbonecap.decode.Interner` maps the distinct keys to strings.
Keys that do not pack (IPv6 addresses, deeper tunnel stacks) are flagged and take the row path there.
Without numba the same functions run as numpy/pandas code (identical results, slower).
"""
from __future__ import annotations

import numpy as np

import importlib.util

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
_KERNELS: dict = {}

NOT_PACKED = np.int64(-1)     # key of a row that does not pack into 64 bits


def _factorize_py(keys: np.ndarray):
    import pandas as pd

    codes, uniques = pd.factorize(keys)
    return codes.astype(np.int32), np.asarray(uniques, dtype=np.int64)


def _address_keys_py(ver: np.ndarray, addr: np.ndarray) -> np.ndarray:
    v4 = np.ascontiguousarray(addr[:, :4]).view(">u4").ravel().astype(np.int64)
    key = np.where(ver == 4, (np.int64(4) << 32) | v4, 0)
    return np.where(ver == 6, NOT_PACKED, key)


def _encap_keys_py(depth: np.ndarray, tun_type: np.ndarray, tun_vni: np.ndarray) -> np.ndarray:
    d = tun_type.shape[1]
    key = depth.astype(np.int64)
    ok = depth <= 2
    for lvl, shift in ((0, 4), (1, 32))[:d]:
        on = depth > lvl
        vni = tun_vni[:, lvl]
        ok &= ~on | ((vni >= 0) & (vni < 1 << 24))
        key |= np.where(on, (tun_type[:, lvl].astype(np.int64) & 0xF) << shift, 0)
        key |= np.where(on, (vni & 0xFFFFFF) << (shift + 4), 0)
    return np.where(ok, key, NOT_PACKED)


def _kernels() -> dict:
    """The compiled kernels, built (or loaded from numba's cache) on first use: importing numba costs time."""
    if _KERNELS:
        return _KERNELS
    import numba

    @numba.njit(cache=True, nogil=True)
    def _rehash(uniques, m, bits):
        size = 1 << bits
        slots = np.full(size, -1, dtype=np.int64)
        sh = np.uint64(64 - bits)
        for j in range(m):
            t = np.int64((np.uint64(uniques[j]) * np.uint64(0x9E3779B97F4A7C15)) >> sh)
            while slots[t] >= 0:
                t = (t + 1) & (size - 1)
            slots[t] = j
        return slots

    @numba.njit(cache=True, nogil=True)
    def _factorize_run(keys, start, codes, slots, uniques, m, bits):
        """Factorise keys[start:] until the table is half full; returns (next position, distinct keys)."""
        n = keys.shape[0]
        size = slots.shape[0]
        mult = np.uint64(0x9E3779B97F4A7C15)
        sh = np.uint64(64 - bits)
        for i in range(start, n):
            k = keys[i]
            s = np.int64((np.uint64(k) * mult) >> sh)
            u = slots[s]
            while u >= 0 and uniques[u] != k:
                s = (s + 1) & (size - 1)
                u = slots[s]
            if u < 0:
                uniques[m] = k
                slots[s] = m
                u = m
                m += 1
                if 2 * m > size:
                    codes[i] = u
                    return i + 1, m
            codes[i] = u
        return n, m

    @numba.njit(cache=True, nogil=True)
    def _address_keys_nb(ver, addr):
        n = ver.shape[0]
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            v = ver[i]
            if v == 4:
                out[i] = ((np.int64(4) << 32) | (np.int64(addr[i, 0]) << 24) | (np.int64(addr[i, 1]) << 16)
                          | (np.int64(addr[i, 2]) << 8) | np.int64(addr[i, 3]))
            elif v == 6:
                out[i] = -1
            else:
                out[i] = 0
        return out

    @numba.njit(cache=True, nogil=True)
    def _encap_keys_nb(depth, tun_type, tun_vni):
        n, d = tun_type.shape
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            dep = np.int64(depth[i])
            key = dep
            ok = dep <= 2
            for lvl in range(min(dep, d, 2)):
                vni = tun_vni[i, lvl]
                if vni < 0 or vni >= (1 << 24):
                    ok = False
                shift = 4 if lvl == 0 else 32
                key |= (np.int64(tun_type[i, lvl]) & 0xF) << shift
                key |= (vni & 0xFFFFFF) << (shift + 4)
            out[i] = key if ok else -1
        return out

    _KERNELS.update(factorize_run=_factorize_run, rehash=_rehash, address_keys=_address_keys_nb,
                    encap_keys=_encap_keys_nb)
    return _KERNELS


def _factorize_nb(keys):
    k = _kernels()
    n = len(keys)
    bits = 10
    slots = np.full(1 << bits, -1, dtype=np.int64)     # index into uniques, -1 empty
    uniques = np.empty(1 << bits, dtype=np.int64)
    codes = np.empty(n, dtype=np.int32)
    i, m = 0, 0
    while True:
        i, m = k["factorize_run"](keys, i, codes, slots, uniques, m, bits)
        if i >= n:
            return codes, uniques[:m].copy()
        bits += 1                                      # keep the load under one half: twice as large
        uniques = np.concatenate([uniques[:m], np.empty((1 << bits) - m, dtype=np.int64)])
        slots = k["rehash"](uniques, m, bits)


def factorize(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes in order of first appearance, the distinct keys) of an int64 array."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    if not HAVE_NUMBA:
        return _factorize_py(keys)
    return _factorize_nb(keys)


def address_keys(ver: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """One key per packet: (4 << 32) | IPv4 address, 0 when there is no address, NOT_PACKED for IPv6."""
    if not HAVE_NUMBA:
        return _address_keys_py(ver, addr)
    return _kernels()["address_keys"](np.ascontiguousarray(ver), np.ascontiguousarray(addr))


def encap_keys(depth: np.ndarray, tun_type: np.ndarray, tun_vni: np.ndarray) -> np.ndarray:
    """One key per packet: depth | type0 << 4 | vni0 << 8 | type1 << 32 | vni1 << 36 (levels below the depth
    only); NOT_PACKED for more than two levels or a VNI outside 24 bits."""
    if not HAVE_NUMBA:
        return _encap_keys_py(depth, tun_type, tun_vni)
    return _kernels()["encap_keys"](np.ascontiguousarray(depth), np.ascontiguousarray(tun_type), np.ascontiguousarray(tun_vni))

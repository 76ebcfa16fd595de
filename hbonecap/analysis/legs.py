"""TCP connections across captures: per-capture legs and logical connections, from the packets table.

A *leg* is one TCP connection as one capture saw it, whatever the encapsulation of each packet: on a ztunnel's
eth0 the client-to-server packets of the app connection arrive inside Geneve VNI 1001 while the replies leave
as plain IP, and both belong to one leg (the per-encapsulation `connections` table keeps them apart).
A *logical connection* (`lconn`) is the same TCP connection seen by several captures: same unordered endpoint
pair, same initial sequence number where a SYN was seen, overlapping in time.

Strategy: everything per packet is vectorised (factorised endpoint keys, sorts, group-bys); loops run over legs.
Port reuse within a capture is split where a SYN carries a new initial sequence number.
Limits: NAT between capture points is not undone (the lab and Istio's TPROXY keep the 4-tuple); a leg that saw
neither a SYN nor a SYN-ACK is oriented by the port heuristic (15008 and the lower port are the server).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
BIG = np.iinfo(np.int64).max
HBONE_PORT = 15008


@dataclass
class Legs:
    """Result of `build_legs`.

    tcp: one row per TCP packet (capture code `cap`, `ts` ns, `leg`, `lconn`, `dir` 0 client->server / 1 back,
    seq, ack, tsval, flags, plen; narrow integer dtypes, `TCP_DTYPES`).
    legs: one row per (capture, logical connection): times of the TCP events at that capture (ns, -1 if not seen).
    lconns: one row per logical connection: client, server endpoints as "ip:port".
    captures: capture names indexed by `cap`.
    """

    tcp: pd.DataFrame
    legs: pd.DataFrame
    lconns: pd.DataFrame
    captures: list[str]


def endpoint_keys(ips: np.ndarray, ports: np.ndarray) -> np.ndarray:
    """One int64 per (address, port), the same in every process: a 47-bit hash of the address text, then the port
    (pandas' stable array hash; a collision among the addresses of one postmortem is vanishingly unlikely)."""
    h = pd.util.hash_array(np.asarray(ips, dtype=object), categorize=True)
    return ((h >> np.uint64(17)).astype(np.int64) << 16) | np.asarray(ports, dtype=np.int64)


def _column_endpoint_keys(col: pd.Series, ports: np.ndarray, addresses: dict[int, str]) -> np.ndarray:
    """`endpoint_keys` of an address column (hashing a categorical column's categories, not its rows), adding the
    addresses it holds to `addresses` (47-bit hash -> text)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories
        names = np.empty(len(cats) + 1, dtype=object)
        names[:-1] = np.asarray(cats, dtype=object)
        names[-1] = np.nan                                   # code -1 (missing) indexes the last entry
        h = (pd.util.hash_array(names, categorize=False) >> np.uint64(17)).astype(np.int64)
        codes = col.cat.codes.to_numpy(np.int64)
        for c in np.unique(codes).tolist():
            addresses.setdefault(int(h[c]), names[c])
        return (h[codes] << 16) | np.asarray(ports, dtype=np.int64)
    ips = col.astype(object).to_numpy(object)
    keys = endpoint_keys(ips, ports)
    if len(keys):       # one entry per distinct address (np.unique), not one Python step per packet
        hashes, first = np.unique(keys >> 16, return_index=True)
        for k, v in zip(hashes.tolist(), ips[first].tolist()):
            addresses.setdefault(k, v)
    return keys


def _endpoint_names(addr: dict[int, str], keys: np.ndarray) -> np.ndarray:
    out = np.empty(len(keys), dtype=object)
    for i, k in enumerate(np.asarray(keys, dtype=np.int64).tolist()):
        ip, port = addr[k >> 16], k & 0xFFFF
        out[i] = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    return out


SIDE_EVENTS = ("syn", "synack", "data", "fin", "rst", "any")
PACKET_COLUMNS = ["ts", "leg", "from_lo", "seq", "ack", "tsval", "flags", "plen"]
# per-packet columns are as narrow as their values allow: they are the bulk of correlation's memory (tens of bytes
# per TCP packet of the whole set); ts, seq, ack and tsval stay int64 (-1 = absent)
TCP_DTYPES = {"cap": np.int16, "ts": np.int64, "leg": np.int32, "lconn": np.int32, "dir": np.int8, "seq": np.int64,
              "ack": np.int64, "tsval": np.int64, "flags": np.int16, "plen": np.int32}
_NO_PACKETS = pd.DataFrame({"ts": np.zeros(0, np.int64), "leg": np.zeros(0, np.int32), "from_lo": np.zeros(0, bool),
                            "seq": np.zeros(0, np.int64), "ack": np.zeros(0, np.int64), "tsval": np.zeros(0, np.int64),
                            "flags": np.zeros(0, np.int16), "plen": np.zeros(0, np.int32)})


@dataclass
class CaptureLegs:
    """The per-capture half of `build_legs` (`capture_legs`): needs no other capture, so it runs where the capture's
    packets are (a process or a Dask worker). Keys are `endpoint_keys`, leg numbers local to the capture.

    packets: one row per TCP packet (PACKET_COLUMNS; `from_lo`: sent by the leg's lower endpoint key).
    legs: one row per leg: endpoint keys lo/hi, first/last time, SYN facts, and per sending side (lo/hi) the first
    time of each of SIDE_EVENTS, segment and byte counts and whether any packet was tunnelled.
    addresses: endpoint address hash -> address text, for naming."""

    packets: pd.DataFrame
    legs: pd.DataFrame
    addresses: dict[int, str]


def tcp_rows(packets: pd.DataFrame) -> pd.DataFrame:
    m = (packets["proto"] == "tcp") & packets["sport"].notna() & packets["dport"].notna() & packets["src"].notna()
    return packets.loc[m]


def pair_codes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Codes of the (a, b) pairs in order of first appearance, as `pd.factorize` of the tuples gives, without
    building tuples: each side factorised alone, the two codes combined into one integer, that factorised."""
    if not len(a):
        return np.zeros(0, np.int64)
    ca, _ = pd.factorize(a)
    cb, ub = pd.factorize(b)
    return pd.factorize(ca.astype(np.int64) * len(ub) + cb)[0].astype(np.int64)


def capture_legs(pk: pd.DataFrame) -> CaptureLegs:
    """Legs of one capture's TCP packets (`tcp_rows` of its packets table)."""
    n = len(pk)
    addresses: dict[int, str] = {}
    a_key = _column_endpoint_keys(pk["src"], pk["sport"].to_numpy(np.int64), addresses)
    b_key = _column_endpoint_keys(pk["dst"], pk["dport"].to_numpy(np.int64), addresses)
    ts = pk["ts"].to_numpy("datetime64[ns]").view(np.int64)
    flags = pk["tcp_flags"].to_numpy(np.int64, na_value=0)
    seq = pk["seq"].to_numpy(np.int64, na_value=-1)
    ack = pk["ack"].to_numpy(np.int64, na_value=-1)
    tsval = pk["tsval"].to_numpy(np.int64, na_value=-1)
    plen = pk["payload_len"].to_numpy(np.int64, na_value=0)
    b_key, _redirected = _undo_redirects(np.zeros(n, np.int64), a_key, b_key, flags, seq, ack)
    lo, hi = np.minimum(a_key, b_key), np.maximum(a_key, b_key)
    from_lo = a_key == lo

    # legs: unordered pairs, split where a SYN brings a new initial sequence number
    pair_id = pair_codes(lo, hi)
    order = np.lexsort((ts, pair_id))
    pid = pair_id[order]
    syn_only = ((flags & (SYN | ACK)) == SYN)[order]
    syn_seq = pd.Series(np.where(syn_only, seq[order], np.nan))
    prev = syn_seq.groupby(pid).ffill().groupby(pid).shift().to_numpy()
    new = syn_only & ~np.isnan(prev) & (prev != seq[order])
    start = np.r_[True, pid[1:] != pid[:-1]] | new if n else np.zeros(0, bool)
    leg_sorted = np.cumsum(start) - 1
    leg = np.empty(n, dtype=np.int64)
    leg[order] = leg_sorted
    n_legs = int(leg_sorted[-1]) + 1 if n else 0

    def first_by_leg(mask: np.ndarray, values: np.ndarray, fill: int = -1) -> np.ndarray:
        out = np.full(n_legs, fill, dtype=np.int64)
        idx = np.flatnonzero(mask[order])
        if len(idx):
            lg = leg_sorted[idx]
            firsts = np.r_[True, lg[1:] != lg[:-1]]
            out[lg[firsts]] = values[order][idx[firsts]]
        return out

    syn_m = (flags & (SYN | ACK)) == SYN
    synack_m = (flags & (SYN | ACK)) == (SYN | ACK)
    l_first = first_by_leg(np.ones(n, bool), np.arange(n))
    legs = pd.DataFrame({
        "leg": np.arange(n_legs), "lo": lo[l_first], "hi": hi[l_first], "first_ts": ts[l_first],
        "last_ts": pd.Series(ts).groupby(leg).max().reindex(range(n_legs)).to_numpy(np.int64),
        "isn": first_by_leg(syn_m, seq), "syn_src": first_by_leg(syn_m, a_key),
        "synack_dst": first_by_leg(synack_m, b_key)})
    kinds = {"syn": syn_m, "synack": synack_m, "data": plen > 0, "fin": (flags & FIN) != 0,
             "rst": (flags & RST) != 0, "any": np.ones(n, bool)}
    enc = pk["encap"]
    if isinstance(enc.dtype, pd.CategoricalDtype):     # by category code, not one Python object per packet
        lut = np.array([c != "" for c in enc.cat.categories] + [False], dtype=bool)
        tunnelled = lut[enc.cat.codes.to_numpy(np.int64)]
    else:
        tunnelled = enc.astype(object).fillna("").to_numpy(object) != ""
    # a capture on several interfaces ("any") sees one packet several times, and retransmissions repeat
    # segments: count each segment once
    seg = pd.DataFrame({"leg": leg, "side": (~from_lo).astype(np.int64), "plen": plen, "seq": seq,
                        "flags": flags & 0x07})
    seg = seg[~seg.duplicated(["leg", "side", "seq", "plen", "flags"])]
    g = seg.groupby(["leg", "side"])
    cnt = g.size().unstack(fill_value=0).reindex(index=range(n_legs), columns=[0, 1], fill_value=0)
    byt = g["plen"].sum().unstack(fill_value=0).reindex(index=range(n_legs), columns=[0, 1], fill_value=0)
    for side, sent in (("lo", from_lo), ("hi", ~from_lo)):
        for name, mask in kinds.items():
            legs[f"{name}_{side}"] = first_by_leg(sent & mask, ts)
        legs[f"encap_{side}"] = first_by_leg(sent & tunnelled, np.ones(n, np.int64), 0).astype(bool)
    legs["packets_lo"], legs["packets_hi"] = cnt[0].to_numpy(np.int64), cnt[1].to_numpy(np.int64)
    legs["bytes_lo"], legs["bytes_hi"] = byt[0].to_numpy(np.int64), byt[1].to_numpy(np.int64)
    packets = pd.DataFrame({"ts": ts, "leg": leg.astype(np.int32), "from_lo": from_lo, "seq": seq, "ack": ack,
                            "tsval": tsval, "flags": flags.astype(np.int16), "plen": plen.astype(np.int32)},
                           copy=False)
    return CaptureLegs(packets, legs, addresses)


def build_legs(packets: pd.DataFrame, captures: list[str] | None = None) -> Legs:
    """Legs and logical connections of a (pandas) packets table: `capture_legs` per capture, then `join_legs`."""
    pk = tcp_rows(packets)
    if captures is None:
        cap = pk["capture"]
        captures = [str(c) for c in (cap.cat.categories if isinstance(cap.dtype, pd.CategoricalDtype)
                                     else sorted(cap.astype(object).unique()))]
    names = pk["capture"].astype(object).to_numpy(object)
    parts = {}
    if len(pk):
        for c, idx in pd.Series(np.arange(len(pk))).groupby(names).groups.items():
            parts[str(c)] = capture_legs(pk.iloc[np.asarray(idx)])
    return legs_of_parts(captures, parts)


def legs_of_parts(captures: list[str], parts: dict[str, CaptureLegs]) -> Legs:
    """`Legs` from the per-capture halves (`capture_legs` of each capture that has TCP packets), wherever they were
    computed; `captures` gives the capture codes (`cap`) in order."""
    parts = {c: p for c, p in parts.items() if len(p.packets)}
    joined = join_legs(captures, parts)
    # the captures' rows written into preallocated columns (no concatenation copy of the largest table)
    n = sum(len(p.packets) for p in parts.values())
    cols = {c: np.empty(n, dt) for c, dt in TCP_DTYPES.items()}
    pos = 0
    for i, c in enumerate(captures):
        if c in parts:
            k = len(parts[c].packets)
            for col, values in _attached(parts[c].packets, i, joined).items():
                cols[col][pos:pos + k] = values
            pos += k
    return Legs(pd.DataFrame(cols, copy=False), joined.legs, joined.lconns, captures)


@dataclass
class JoinedLegs:
    """`join_legs`'s result: the legs and logical connections, and what `attach_lconns` needs per capture."""

    legs: pd.DataFrame
    lconns: pd.DataFrame
    leg_offset: dict[int, int]           # capture code -> first global leg number
    lconn_of_leg: np.ndarray             # global leg -> lconn
    client_is_lo: np.ndarray             # lconn -> its client is the legs' lower endpoint key


def join_legs(captures: list[str], parts: dict[str, CaptureLegs]) -> JoinedLegs:
    """Logical connections: legs of the same endpoint pair across captures, same ISN, overlapping in time. Runs on
    the per-leg tables only (a few rows per connection and capture), wherever the packets are."""
    frames, offset, addr = [], {}, {}
    n_legs = 0
    for i, c in enumerate(captures):
        p = parts.get(c)
        if p is None or p.legs.empty:
            continue
        f = p.legs.copy()
        f["cap"] = i
        f["leg"] = f["leg"] + n_legs
        offset[i] = n_legs
        n_legs += len(f)
        frames.append(f)
        addr.update(p.addresses)
    if not frames:
        return JoinedLegs(pd.DataFrame(columns=LEG_COLUMNS), pd.DataFrame(columns=LCONN_COLUMNS), {},
                          np.zeros(0, np.int64), np.zeros(0, bool))
    L = pd.concat(frames, ignore_index=True)
    l_lo, l_hi = L["lo"].to_numpy(np.int64), L["hi"].to_numpy(np.int64)
    syn_src, synack_dst = L["syn_src"].to_numpy(np.int64), L["synack_dst"].to_numpy(np.int64)
    # provisional client per leg: the SYN's source, else the SYN-ACK's destination, else by port (15008 and the
    # lower port are the server's)
    port_lo, port_hi = l_lo & 0xFFFF, l_hi & 0xFFFF
    guess = np.where(port_lo == HBONE_PORT, l_hi, np.where(port_hi == HBONE_PORT, l_lo,
                     np.where(port_lo < port_hi, l_hi, l_lo)))
    evidence = (syn_src != -1) | (synack_dst != -1)
    client = np.where(syn_src != -1, syn_src, np.where(synack_dst != -1, synack_dst, guess))
    lg = pd.DataFrame({"lo": l_lo, "hi": l_hi, "first": L["first_ts"].to_numpy(np.int64),
                       "last": L["last_ts"].to_numpy(np.int64), "isn": L["isn"].to_numpy(np.int64),
                       "client": client, "evidence": evidence, "syn": syn_src != -1, "cap": L["cap"].to_numpy()})
    lg = lg.sort_values(["lo", "hi", "first", "cap"], kind="stable")
    lconn_of_leg = np.empty(n_legs, dtype=np.int64)
    rows: list[dict] = []
    open_by_pair: dict[tuple[int, int], list[int]] = {}
    slack = 60 * 10**9
    for i, r in zip(lg.index.to_numpy(), lg.itertuples(index=False)):
        key = (r.lo, r.hi)
        found = None
        for k in open_by_pair.get(key, []):
            c = rows[k]
            if r.first > c["last"] + slack:
                continue
            if r.isn >= 0 and c["isn"] >= 0:
                if r.isn == c["isn"]:
                    found = k
                    break
                continue
            found = k if found is None else found
        if found is None:
            rows.append({"isn": r.isn, "first": r.first, "last": r.last, "client": r.client, "evidence": r.evidence,
                         "syn": r.syn, "lo": r.lo, "hi": r.hi})
            found = len(rows) - 1
            open_by_pair.setdefault(key, []).append(found)
        else:
            c = rows[found]
            c["first"], c["last"] = min(c["first"], r.first), max(c["last"], r.last)
            if c["isn"] < 0:
                c["isn"] = r.isn
            if (r.syn and not c["syn"]) or (r.evidence and not c["evidence"]):
                c["client"], c["evidence"], c["syn"] = r.client, r.evidence, bool(r.syn)
        lconn_of_leg[i] = found
    # number logical connections by first sight (then endpoints): the same whatever the order of the captures
    renum = np.empty(len(rows), dtype=np.int64)
    renum[sorted(range(len(rows)), key=lambda k: (rows[k]["first"], rows[k]["lo"], rows[k]["hi"]))] = \
        np.arange(len(rows))
    rows = [rows[k] for k in np.argsort(renum)]
    lconn_of_leg = renum[lconn_of_leg]
    lc_client = np.array([c["client"] for c in rows], dtype=np.int64)
    lc_lo = np.array([c["lo"] for c in rows], dtype=np.int64)
    lc_server = np.where(lc_client == lc_lo, np.array([c["hi"] for c in rows], dtype=np.int64), lc_lo)
    client_is_lo = lc_client == lc_lo

    # per-leg event times by direction: the client's side sends c2s
    lo_is_client = client_is_lo[lconn_of_leg]
    legs = pd.DataFrame({"leg": L["leg"].to_numpy(), "cap": L["cap"].to_numpy(),
                         "capture": np.asarray(captures, object)[L["cap"].to_numpy()], "lconn": lconn_of_leg,
                         "first_ts": L["first_ts"].to_numpy(np.int64), "last_ts": L["last_ts"].to_numpy(np.int64)})

    def by_dir(col_lo: str, col_hi: str, client_side: bool) -> np.ndarray:
        a, b = L[col_lo].to_numpy(), L[col_hi].to_numpy()
        return np.where(lo_is_client == client_side, a, b)

    for name, kind, client_side in (("syn", "syn", True), ("syn_ack", "synack", False), ("data_c2s", "data", True),
                                    ("data_s2c", "data", False), ("fin_c2s", "fin", True), ("fin_s2c", "fin", False),
                                    ("rst_c2s", "rst", True), ("rst_s2c", "rst", False), ("first_c2s", "any", True),
                                    ("first_s2c", "any", False)):
        legs[name] = by_dir(f"{kind}_lo", f"{kind}_hi", client_side)
    for name, base, client_side in (("packets_c2s", "packets", True), ("packets_s2c", "packets", False),
                                    ("bytes_c2s", "bytes", True), ("bytes_s2c", "bytes", False),
                                    ("encap_c2s", "encap", True)):
        legs[name] = by_dir(f"{base}_lo", f"{base}_hi", client_side)
    legs["encap_c2s"] = legs["encap_c2s"].astype(bool)
    legs = legs[LEG_COLUMNS]
    names_c = _endpoint_names(addr, lc_client)
    names_s = _endpoint_names(addr, lc_server)
    lconns = pd.DataFrame({"lconn": np.arange(len(rows)), "client": names_c, "server": names_s,
                           "client_ip": [x.rsplit(":", 1)[0].strip("[]") for x in names_c],
                           "server_ip": [x.rsplit(":", 1)[0].strip("[]") for x in names_s],
                           "server_port": lc_server & 0xFFFF, "isn": [c["isn"] for c in rows]})
    return JoinedLegs(legs, lconns, offset, lconn_of_leg, client_is_lo)


def attach_lconns(packets: pd.DataFrame, cap: int, joined: JoinedLegs) -> pd.DataFrame:
    """One capture's per-packet rows (`CaptureLegs.packets`) in the global numbering: `Legs.tcp`'s columns."""
    return pd.DataFrame(_attached(packets, cap, joined), copy=False)


def _attached(packets: pd.DataFrame, cap: int, joined: JoinedLegs) -> dict[str, np.ndarray]:
    leg = packets["leg"].to_numpy(np.int64) + joined.leg_offset.get(cap, 0)
    lconn = joined.lconn_of_leg[leg] if len(leg) else np.zeros(0, np.int64)
    from_client = packets["from_lo"].to_numpy(bool) == joined.client_is_lo[lconn] if len(leg) else np.zeros(0, bool)
    out = {"cap": np.full(len(leg), cap), "ts": packets["ts"].to_numpy(), "leg": leg, "lconn": lconn,
           "dir": ~from_client, "seq": packets["seq"].to_numpy(), "ack": packets["ack"].to_numpy(),
           "tsval": packets["tsval"].to_numpy(), "flags": packets["flags"].to_numpy(), "plen": packets["plen"].to_numpy()}
    return {c: np.asarray(v).astype(TCP_DTYPES[c], copy=False) for c, v in out.items()}


def _undo_redirects(cap, a_key, b_key, flags, seq, ack):
    """A capture between a REDIRECT/DNAT and the socket (era C in-pod: the app's packets to the Service go to
    127.0.0.1:15001 on the pod's lo, the replies come from the Service address) sees the two directions under
    different endpoint pairs. Where a SYN from C to T is answered by a SYN-ACK from O to C acknowledging its
    sequence number, and nothing comes from T to C, the client-to-server packets are put under O, the address
    the client used. Returns the new b_key and a boolean mask of the rewritten packets."""
    syn = (flags & (SYN | ACK)) == SYN
    synack = (flags & (SYN | ACK)) == (SYN | ACK)
    if not syn.any() or not synack.any():
        return b_key, np.zeros(len(b_key), bool)
    s = pd.DataFrame({"cap": cap[syn], "c": a_key[syn], "t": b_key[syn], "k": (seq[syn] + 1) % 2**32})
    r = pd.DataFrame({"cap": cap[synack], "c": b_key[synack], "o": a_key[synack], "k": ack[synack]})
    m = s.merge(r, on=["cap", "c", "k"]).drop_duplicates(["cap", "c", "t"])
    m = m[m["t"] != m["o"]]
    if m.empty:
        return b_key, np.zeros(len(b_key), bool)
    seen = pd.MultiIndex.from_arrays([cap, a_key, b_key]).unique()
    back = pd.MultiIndex.from_arrays([m["cap"], m["t"], m["c"]])
    m = m[~back.isin(seen)]
    if m.empty:
        return b_key, np.zeros(len(b_key), bool)
    idx = pd.MultiIndex.from_arrays([m["cap"], m["c"], m["t"]])
    pos = idx.get_indexer(pd.MultiIndex.from_arrays([cap, a_key, b_key]))
    hit = pos >= 0
    out = b_key.copy()
    out[hit] = m["o"].to_numpy(np.int64)[pos[hit]]
    return out, hit


LCONN_COLUMNS = ["lconn", "client", "server", "client_ip", "server_ip", "server_port", "isn"]
LEG_COLUMNS = ["leg", "cap", "capture", "lconn", "first_ts", "last_ts", "syn", "syn_ack", "data_c2s", "data_s2c",
               "fin_c2s", "fin_s2c", "rst_c2s", "rst_s2c", "first_c2s", "first_s2c", "packets_c2s", "packets_s2c",
               "bytes_c2s", "bytes_s2c", "encap_c2s"]


def leg_state(row) -> str:
    """TCP outcome of a leg: ok (data and FIN), refused (SYN answered by RST), reset, timeout (SYN unanswered),
    incomplete."""
    if row["syn"] >= 0 and row["syn_ack"] < 0 and (row["rst_s2c"] >= 0):
        return "refused"
    if row["rst_c2s"] >= 0 or row["rst_s2c"] >= 0:
        return "reset"
    if row["syn"] >= 0 and row["syn_ack"] < 0 and row["packets_s2c"] == 0 and row["data_c2s"] < 0:
        return "timeout"
    if row["fin_c2s"] >= 0 or row["fin_s2c"] >= 0:
        return "ok"
    return "incomplete"

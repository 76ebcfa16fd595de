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
    seq, ack, tsval, flags, plen).
    legs: one row per (capture, logical connection): times of the TCP events at that capture (ns, -1 if not seen).
    lconns: one row per logical connection: client, server endpoints as "ip:port".
    captures: capture names indexed by `cap`.
    """

    tcp: pd.DataFrame
    legs: pd.DataFrame
    lconns: pd.DataFrame
    captures: list[str]


def _endpoint_names(addr: pd.Index, keys: np.ndarray) -> np.ndarray:
    ips = addr.to_numpy(dtype=object)[keys // 65536]
    ports = (keys % 65536).astype(str)
    out = np.empty(len(keys), dtype=object)
    for i, (ip, port) in enumerate(zip(ips, ports)):
        out[i] = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    return out


def build_legs(packets: pd.DataFrame) -> Legs:
    m = (packets["proto"] == "tcp") & packets["sport"].notna() & packets["dport"].notna() & packets["src"].notna()
    pk = packets.loc[m]
    cap_cat = pk["capture"].astype("category")
    captures = [str(c) for c in cap_cat.cat.categories]
    if pk.empty:
        empty_tcp = pd.DataFrame({c: pd.Series([], dtype="int64") for c in
                                  ("cap", "ts", "leg", "lconn", "dir", "seq", "ack", "tsval", "flags", "plen")})
        return Legs(empty_tcp, pd.DataFrame(columns=LEG_COLUMNS), pd.DataFrame(columns=LCONN_COLUMNS),
                    captures)
    src = pk["src"].astype("category")
    dst = pk["dst"].astype("category")
    addr = pd.Index(pd.unique(np.concatenate([src.cat.categories.to_numpy(object), dst.cat.categories.to_numpy(object)])))
    s = addr.get_indexer(src.cat.categories.to_numpy(object))[src.cat.codes.to_numpy()]
    d = addr.get_indexer(dst.cat.categories.to_numpy(object))[dst.cat.codes.to_numpy()]
    sp = pk["sport"].to_numpy(np.int64)
    dp = pk["dport"].to_numpy(np.int64)
    a_key = s.astype(np.int64) * 65536 + sp
    b_key = d.astype(np.int64) * 65536 + dp
    lo, hi = np.minimum(a_key, b_key), np.maximum(a_key, b_key)
    cap = cap_cat.cat.codes.to_numpy(np.int64)
    ts = pk["ts"].to_numpy("datetime64[ns]").view(np.int64)
    flags = pk["tcp_flags"].to_numpy(np.int64, na_value=0)
    seq = pk["seq"].to_numpy(np.int64, na_value=-1)
    ack = pk["ack"].to_numpy(np.int64, na_value=-1)
    tsval = pk["tsval"].to_numpy(np.int64, na_value=-1)
    plen = pk["payload_len"].to_numpy(np.int64, na_value=0)
    n = len(pk)

    b_key, redirected = _undo_redirects(cap, a_key, b_key, flags, seq, ack)
    lo, hi = np.minimum(a_key, b_key), np.maximum(a_key, b_key)

    # --- legs: (capture, unordered pair), split where a SYN brings a new initial sequence number
    pair = pd.MultiIndex.from_arrays([cap, lo, hi])
    pair_id = pd.factorize(pair)[0].astype(np.int64)
    order = np.lexsort((ts, pair_id))
    pid = pair_id[order]
    syn_only = ((flags & (SYN | ACK)) == SYN)[order]
    syn_seq = pd.Series(np.where(syn_only, seq[order], np.nan))
    prev = syn_seq.groupby(pid).ffill().groupby(pid).shift().to_numpy()
    new = syn_only & ~np.isnan(prev) & (prev != seq[order])
    start = np.r_[True, pid[1:] != pid[:-1]] | new
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
    l_syn_src = first_by_leg(syn_m, a_key)
    l_syn_seq = first_by_leg(syn_m, seq)
    l_synack_dst = first_by_leg(synack_m, b_key)
    l_first = first_by_leg(np.ones(n, bool), np.arange(n))
    l_last_ts = pd.Series(ts).groupby(leg).max().reindex(range(n_legs)).to_numpy()
    l_first_ts = ts[l_first]
    l_lo, l_hi, l_cap = lo[l_first], hi[l_first], cap[l_first]
    # provisional client per leg
    port_lo, port_hi = l_lo % 65536, l_hi % 65536
    guess = np.where(port_lo == HBONE_PORT, l_hi, np.where(port_hi == HBONE_PORT, l_lo,
                     np.where(port_lo < port_hi, l_hi, l_lo)))
    evidence = (l_syn_src >= 0) | (l_synack_dst >= 0)
    client = np.where(l_syn_src >= 0, l_syn_src, np.where(l_synack_dst >= 0, l_synack_dst, guess))

    # --- logical connections: legs of the same pair across captures, same ISN, overlapping in time
    lg = pd.DataFrame({"lo": l_lo, "hi": l_hi, "first": l_first_ts, "last": l_last_ts, "isn": l_syn_seq,
                       "client": client, "evidence": evidence, "syn_src": l_syn_src})
    lg = lg.sort_values(["lo", "hi", "first"], kind="stable")
    lconn_of_leg = np.empty(n_legs, dtype=np.int64)
    lconn_rows: list[dict] = []
    open_by_pair: dict[tuple[int, int], list[int]] = {}
    slack = 60 * 10**9
    for i, r in zip(lg.index.to_numpy(), lg.itertuples(index=False)):
        key = (r.lo, r.hi)
        found = None
        for k in open_by_pair.get(key, []):
            c = lconn_rows[k]
            if r.first > c["last"] + slack:
                continue
            if r.isn >= 0 and c["isn"] >= 0:
                if r.isn == c["isn"]:
                    found = k
                    break
                continue
            found = k if found is None else found
        if found is None:
            lconn_rows.append({"isn": r.isn, "last": r.last, "client": r.client, "evidence": r.evidence,
                               "syn": r.syn_src >= 0})
            found = len(lconn_rows) - 1
            open_by_pair.setdefault(key, []).append(found)
        else:
            c = lconn_rows[found]
            c["last"] = max(c["last"], r.last)
            if c["isn"] < 0:
                c["isn"] = r.isn
            if (r.syn_src >= 0 and not c["syn"]) or (r.evidence and not c["evidence"]):
                c["client"], c["evidence"], c["syn"] = r.client, r.evidence, bool(r.syn_src >= 0)
        lconn_of_leg[i] = found
    lc_client = np.array([c["client"] for c in lconn_rows], dtype=np.int64)
    pair_lo = np.zeros(len(lconn_rows), dtype=np.int64)
    pair_hi = np.zeros(len(lconn_rows), dtype=np.int64)
    pair_lo[lconn_of_leg] = l_lo
    pair_hi[lconn_of_leg] = l_hi
    lc_server = np.where(lc_client == pair_lo, pair_hi, pair_lo)
    lconn = lconn_of_leg[leg]
    direction = (a_key != lc_client[lconn]).astype(np.int64)

    tcp = pd.DataFrame({"cap": cap, "ts": ts, "leg": leg, "lconn": lconn, "dir": direction, "seq": seq, "ack": ack,
                        "tsval": tsval, "flags": flags, "plen": plen})

    # --- per-leg event times (ns; -1 = not seen at this capture)
    c2s, s2c = direction == 0, direction == 1
    data = plen > 0
    ev = {
        "syn": c2s & syn_m, "syn_ack": s2c & synack_m,
        "data_c2s": c2s & data, "data_s2c": s2c & data,
        "fin_c2s": c2s & ((flags & FIN) != 0), "fin_s2c": s2c & ((flags & FIN) != 0),
        "rst_c2s": c2s & ((flags & RST) != 0), "rst_s2c": s2c & ((flags & RST) != 0),
        "first_c2s": c2s, "first_s2c": s2c,
    }
    legs = pd.DataFrame({"leg": np.arange(n_legs), "cap": l_cap, "capture": np.asarray(captures, object)[l_cap],
                         "lconn": lconn_of_leg, "first_ts": l_first_ts, "last_ts": l_last_ts})
    for name, mask in ev.items():
        legs[name] = first_by_leg(mask, ts)
    # a capture on several interfaces ("any") sees one packet several times, and retransmissions repeat
    # segments: count each segment once
    seg = pd.DataFrame({"leg": leg, "dir": direction, "plen": plen, "seq": seq, "ack": ack, "flags": flags & 0x07,
                        "tsval": tsval})
    seg = seg[~seg.duplicated(["leg", "dir", "seq", "plen", "flags"])]
    g = seg.groupby(["leg", "dir"])
    cnt = g.size().unstack(fill_value=0).reindex(index=range(n_legs), columns=[0, 1], fill_value=0)
    byt = g["plen"].sum().unstack(fill_value=0).reindex(index=range(n_legs), columns=[0, 1], fill_value=0)
    legs["packets_c2s"], legs["packets_s2c"] = cnt[0].to_numpy(), cnt[1].to_numpy()
    legs["bytes_c2s"], legs["bytes_s2c"] = byt[0].to_numpy(), byt[1].to_numpy()
    tunnelled = pk["encap"].astype(object).fillna("").to_numpy(object) != ""
    legs["encap_c2s"] = first_by_leg(c2s & tunnelled, np.ones(n, np.int64), 0).astype(bool)
    legs = legs[LEG_COLUMNS]

    names_c = _endpoint_names(addr, lc_client)
    names_s = _endpoint_names(addr, lc_server)
    lconns = pd.DataFrame({"lconn": np.arange(len(lconn_rows)), "client": names_c, "server": names_s,
                           "client_ip": [x.rsplit(":", 1)[0].strip("[]") for x in names_c],
                           "server_ip": [x.rsplit(":", 1)[0].strip("[]") for x in names_s],
                           "server_port": lc_server % 65536, "isn": [c["isn"] for c in lconn_rows]})
    return Legs(tcp, legs, lconns, captures)


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

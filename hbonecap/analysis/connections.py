"""TCP connections per capture, derived from the packets table with vectorised group-bys.

A connection is one TCP conversation between two endpoints inside the same encapsulation. Packets are grouped
by the unordered endpoint pair (and encapsulation); a SYN whose initial sequence number differs from the
previous SYN of the same pair starts a new connection (port reuse). The client is the sender of the first SYN,
else the receiver of the first SYN-ACK, else (capture started mid-stream) the endpoint with the higher port.
Retransmissions are data segments whose end does not pass the highest sequence already seen in their direction
(sequence numbers unwrapped relative to the direction's first one, so connections under 4 GiB are exact).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from hbonecap import tables

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
NAT = np.iinfo(np.int64).min


def _first_seen_codes(cols: list[pd.Series], missing=np.nan) -> list[tuple[np.ndarray, np.ndarray]]:
    """Codes of the values of several columns in one numbering, in order of first appearance over the columns
    one after the other (as pd.unique of their concatenation), a missing value counted as `missing`: per column
    (codes, the values numbered). Categorical columns are numbered through their category codes, without
    converting every row to a Python object."""
    def key(v):
        return "\0missing" if v is None or (isinstance(v, float) and np.isnan(v)) else v

    pos: dict = {}
    values: list = []
    out = []
    for col in cols:
        if isinstance(col.dtype, pd.CategoricalDtype):
            codes, cats = col.cat.codes.to_numpy(np.int64), list(col.cat.categories)
        else:
            f, uniq = pd.factorize(col.astype(object).to_numpy(object), use_na_sentinel=True)
            codes, cats = f.astype(np.int64), list(uniq)
        for c in pd.unique(codes):
            v = missing if c < 0 else cats[c]
            if key(v) not in pos:
                pos[key(v)] = len(values)
                values.append(v)
        lut = np.array([pos.get(key(missing), -1)] + [pos.get(key(v), -1) for v in cats], dtype=np.int64)
        out.append(lut[codes + 1])
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return [(o, arr) for o in out]


def _lex_rank(columns: list[np.ndarray]) -> np.ndarray:
    """Per row, the rank of its tuple of values among the distinct tuples in lexicographic order (a sorted
    group-by's group number): each column's values ranked, the ranks composed into one integer in mixed radix
    (which keeps the order), that integer ranked. Column by column through pandas when the radix product would
    not fit in 63 bits."""
    ranks, sizes = [], []
    for col in columns:
        r, u = pd.factorize(col, sort=True)
        ranks.append(r.astype(np.int64))
        sizes.append(max(len(u), 1))
    if float(np.prod(np.asarray(sizes, dtype=np.float64))) >= 2.0 ** 62:
        return pd.DataFrame({i: c for i, c in enumerate(columns)}).groupby(list(range(len(columns))),
                                                                        sort=True).ngroup().to_numpy(np.int64)
    key = ranks[0]
    for r, size in zip(ranks[1:], sizes[1:]):
        key = key * size + r
    return pd.factorize(key, sort=True)[0].astype(np.int64)


def connections(packets: pd.DataFrame, first_conn_id: int = 0) -> pd.DataFrame:
    """The connections table for the packets of one or more captures."""
    keep = ((packets["proto"] == "tcp") & packets["sport"].notna() & packets["src"].notna()).to_numpy(bool)
    tcp = packets if keep.all() else packets[keep]      # (the analysis path passes TCP rows only: no copy)
    if tcp.empty:
        return tables.empty("connections")
    n = len(tcp)
    cap = tcp["capture"].astype("category").cat.codes.to_numpy(np.int64)
    # The two directions of a tunnelled connection may use different VNIs (Istio: 1001 out, 1000 in) and
    # different outer UDP source ports: group by the tunnel types and the unordered outer address pair.
    enc_codes, enc_names = _first_seen_codes([tcp["encap"]], missing="")[0]   # regex once per distinct path
    enc_paths = np.array([re.sub(r":\d+", "", e) for e in enc_names] or [""], dtype=object)
    enc = pd.factorize(enc_paths[enc_codes])[0].astype(np.int64)
    ifx = tcp["ifindex"].to_numpy(np.int64, na_value=-1)
    # addresses numbered in order of first appearance over src, dst, outer_src, outer_dst (missing: one value)
    (s, addr_vals), (d, _), (os_, _), (od_, _) = _first_seen_codes(
        [tcp[c] for c in ("src", "dst", "outer_src", "outer_dst")])
    addr_cats = pd.Index(addr_vals)
    sp = tcp["sport"].to_numpy(np.int64)
    dp = tcp["dport"].to_numpy(np.int64)
    flags = tcp["tcp_flags"].to_numpy(np.int64, na_value=0)
    seq = tcp["seq"].to_numpy(np.int64, na_value=0)
    plen = tcp["payload_len"].to_numpy(np.int64, na_value=0)
    ts = tcp["ts"].to_numpy("datetime64[ns]").view(np.int64)
    index = tcp["index"].to_numpy(np.int64)

    a_key = s * 65536 + sp
    b_key = d * 65536 + dp
    lo = np.minimum(a_key, b_key)
    hi = np.maximum(a_key, b_key)
    # the rank of each row's key in lexicographic order (as np.unique(axis=0) gives, without its slow row sort)
    pair_id = _lex_rank([cap, enc, ifx, np.minimum(os_, od_), np.maximum(os_, od_), lo, hi])
    order = np.lexsort((index, pair_id))
    pid = pair_id[order]
    syn_only = ((flags & (SYN | ACK)) == SYN)[order]
    sseq = seq[order]
    # previous SYN's sequence number within the same pair
    syn_seq = np.where(syn_only, sseq, -1)
    prev = pd.Series(syn_seq).where(syn_only).groupby(pid).ffill().groupby(pid).shift()
    prev = prev.to_numpy(np.float64, na_value=np.nan)
    new_conn = syn_only & ~np.isnan(prev) & (prev != sseq)
    start = np.r_[True, pid[1:] != pid[:-1]] | new_conn
    conn_sorted = np.cumsum(start) - 1
    conn = np.empty(n, dtype=np.int64)
    conn[order] = conn_sorted
    m = int(conn_sorted[-1]) + 1

    def first_where(mask: np.ndarray, values: np.ndarray, fill=NAT) -> np.ndarray:
        out = np.full(m, fill, dtype=np.int64)
        idx = np.flatnonzero(mask[order])
        if len(idx):
            c = conn_sorted[idx]
            firsts = np.r_[True, c[1:] != c[:-1]]
            out[c[firsts]] = values[order][idx[firsts]]
        return out

    syn_pos = first_where((flags & (SYN | ACK)) == SYN, np.arange(n))
    synack_pos = first_where((flags & (SYN | ACK)) == (SYN | ACK), np.arange(n))
    first_pos = first_where(np.ones(n, dtype=bool), np.arange(n))
    client = np.where(syn_pos >= 0, a_key[np.maximum(syn_pos, 0)],
                      np.where(synack_pos >= 0, b_key[np.maximum(synack_pos, 0)], -1))
    mid = client < 0
    fp = first_pos[mid]
    client[mid] = np.where(sp[fp] > dp[fp], a_key[fp], np.where(sp[fp] < dp[fp], b_key[fp], a_key[fp]))
    server = np.where(a_key[first_pos] == client, b_key[first_pos], a_key[first_pos])
    c2s = a_key == client[conn]

    def agg_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(conn, weights=values, minlength=m).astype(np.int64)

    tmin = np.full(m, np.iinfo(np.int64).max)
    np.minimum.at(tmin, conn, ts)
    tmax = np.full(m, np.iinfo(np.int64).min)
    np.maximum.at(tmax, conn, ts)
    syn_ts = first_where((flags & (SYN | ACK)) == SYN, ts)
    synack_ts = first_where((flags & (SYN | ACK)) == (SYN | ACK), ts)
    fin_ts = first_where((flags & FIN) != 0, ts)
    rst_ts = first_where((flags & RST) != 0, ts)
    after_synack = np.zeros(n, dtype=bool)
    has_sa = synack_ts[conn] != NAT
    after_synack[has_sa] = ts[has_sa] >= synack_ts[conn][has_sa]
    ack_ts = first_where(c2s & ((flags & (ACK | SYN)) == ACK) & after_synack, ts)
    first_index = first_where(np.ones(n, dtype=bool), index)

    # retransmissions: per connection and direction, in capture order
    direction = np.where(c2s, 0, 1)
    grp = conn * 2 + direction
    o2 = np.lexsort((index, grp))
    g2 = grp[o2]
    seq0 = pd.Series(seq[o2]).groupby(g2).transform("first").to_numpy(np.int64)
    rel_end = ((seq[o2] - seq0) % (1 << 32)) + plen[o2]
    prev_max = pd.Series(rel_end).groupby(g2).cummax().groupby(g2).shift().to_numpy(np.float64, na_value=-1)
    retx_sorted = (plen[o2] > 0) & (prev_max >= rel_end)
    retx = np.zeros(n, dtype=np.int64)
    retx[o2] = retx_sorted

    fins_c = np.bincount(conn, weights=((flags & FIN) != 0) & c2s, minlength=m) > 0
    fins_s = np.bincount(conn, weights=((flags & FIN) != 0) & ~c2s, minlength=m) > 0
    has_syn = syn_ts != NAT
    has_synack = synack_ts != NAT
    has_rst = rst_ts != NAT
    state = np.where(
        has_rst & has_syn & ~has_synack, "refused",
        np.where(has_rst, "reset",
                 np.where(fins_c & fins_s, "complete",
                          np.where(has_syn & ~has_synack, "syn-only",
                                   np.where(~has_syn & ~has_synack, "midstream", "open")))))

    def endpoint(key: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
        ips = addr_cats.to_numpy()[key // 65536]
        ports = key % 65536
        text = [f"[{ip}]:{p}" if ":" in ip else f"{ip}:{p}" for ip, p in zip(ips, ports)]
        return list(ips), ports, text

    cip, cport, ctext = endpoint(client)
    sip, sport, stext = endpoint(server)
    fp_rows = tcp.iloc[first_pos]
    c2s_pos = first_where(c2s, np.arange(n), fill=-1)
    s2c_pos = first_where(~c2s, np.arange(n), fill=-1)
    enc_all = tcp["encap"].astype(object).to_numpy()
    vni_all = tcp["vni"].to_numpy(np.int64, na_value=-1)
    enc_c = np.where(c2s_pos >= 0, enc_all[np.maximum(c2s_pos, 0)], enc_all[first_pos])
    vni_c = np.where(c2s_pos >= 0, vni_all[np.maximum(c2s_pos, 0)], vni_all[first_pos])
    enc_s = np.where(s2c_pos >= 0, enc_all[np.maximum(s2c_pos, 0)], None)
    rtt = np.where((ack_ts != NAT) & (syn_ts != NAT), (ack_ts - syn_ts) / 1e6, np.nan)
    out = {
        "capture": fp_rows["capture"].astype(object).to_numpy(),
        "conn_id": np.arange(first_conn_id, first_conn_id + m),
        "encap": enc_c, "encap_s2c": enc_s,
        "vni": pd.array(np.where(vni_c >= 0, vni_c, None), dtype="Int64"),
        "interface": fp_rows["interface"].astype(object).to_numpy(),
        "ifindex": fp_rows["ifindex"].to_numpy(),
        "client": ctext, "server": stext, "client_ip": cip, "client_port": cport, "server_ip": sip,
        "server_port": sport,
        "first_ts": tmin, "last_ts": tmax, "syn_ts": syn_ts, "synack_ts": synack_ts, "ack_ts": ack_ts,
        "fin_ts": fin_ts, "rst_ts": rst_ts, "first_index": first_index,
        "packets_c2s": agg_sum(c2s.astype(np.float64)), "packets_s2c": agg_sum((~c2s).astype(np.float64)),
        "bytes_c2s": agg_sum(np.where(c2s, plen, 0).astype(np.float64)),
        "bytes_s2c": agg_sum(np.where(c2s, 0, plen).astype(np.float64)),
        "retransmissions": agg_sum(retx.astype(np.float64)), "state": state, "handshake_rtt_ms": rtt,
    }
    return tables.frame("connections", out)

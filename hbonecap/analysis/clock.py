"""Clock offsets between captures, estimated from the traffic itself.

Captures are grouped by clock (one group per node: captures taken on the same node share its clock; a capture
whose node is unknown is its own group). A TCP connection seen in two groups A and B gives, for every packet seen
at both, the difference ``d = t_B - t_A`` of its capture times. A packet travelling from A to B gives
``d = transit + theta``, one travelling back ``d = theta - transit'`` (theta: B's clock minus A's). Taking the
minimum of the first and the maximum of the second (minimum-delay filtering, as NTP does and as Paxson 1998
recommends) brackets the offset: ``max(d_BA) <= theta <= min(d_AB)``; the estimate is the middle and the
uncertainty half the width (half the smallest round trip between the two points).

Which way a connection's client-to-server packets travel (A to B or B to A) is decided per connection: the
right orientation is the one whose bracket is not inverted.
Pairs of groups are then chained from the reference group along the most certain path (Dijkstra on
uncertainties), so a group seen only through another is still placed, with the uncertainties added.

Packets are matched by (connection, direction, seq, ack, TCP timestamp, SYN/FIN/RST flags): the first
occurrence in each capture, so retransmissions do not pair with their originals. The per-packet work is a join:
on numpy arrays by a 64-bit hash of those columns, every joined pair checked column by column (a table in memory),
or pandas merges (a Dask table on a cluster).
Limits: clock drift is estimated (slope of the per-time-bin delay envelopes, after Moon, Skelly and Towsley 1999)
and reported as `drift_ppm` when the shared traffic spans 2 s or more, but not corrected: offsets are constant.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hbonecap.analysis.legs import Legs

MAX_CAPTURES_PER_GROUP = 3
KEY = ["lconn", "dir", "seq", "ack", "tsval", "fl"]


def packet_class(flags, plen):
    """SYN/FIN/RST bits plus 'carries data': a pure ACK shares seq, ack and TCP timestamp with the data segment
    that follows it, so they must not be taken for the same packet (lengths may differ between capture points
    with GSO/TSO, so the length itself is not compared)."""
    return (np.asarray(flags, dtype=np.int64) & 0x07) | (np.asarray(plen, dtype=np.int64) > 0).astype(np.int64) * 8


@dataclass
class PairEstimate:
    a: str
    b: str
    theta_ns: float            # clock of b minus clock of a
    uncertainty_ns: float
    connections: int
    packets: int
    inconsistent: bool = False
    lconns: list[int] = field(default_factory=list)
    captures: tuple[str, str] = ("", "")
    forward: dict = field(default_factory=dict)      # lconn -> direction (0/1) travelling from a to b
    drift_ppm: float = float("nan")
    span_s: float = 0.0


@dataclass
class GroupOffset:
    group: str
    offset_ns: float           # this group's clock minus the reference's (file time = true time + offset)
    uncertainty_ns: float
    via: str                   # how: reference, path of groups, or unconnected
    connections: int = 0
    packets: int = 0
    method: str = ""
    drift_ppm: float = float("nan")


def packet_deltas(legs: Legs, group_of_cap: dict[int, str], engine: str = "auto") -> pd.DataFrame:
    """For every pair of groups and every connection seen in both: per packet (dir, delta = t_b - t_a, t_a).

    `legs.tcp` may be a Dask DataFrame whose partitions each hold whole captures (`cluster.legs_on_cluster`):
    the reductions and the join then run on the cluster and only the matched pairs come back (pandas
    operations). In memory the same is computed on numpy arrays (`_packet_deltas_arrays`; engine="pandas" takes
    the DataFrame path there too: the two give the same table, row for row)."""
    cols = ["ga", "gb", "lconn", "dir", "delta", "ta", "cap_a", "cap_b"]
    tcp = legs.tcp
    remote = hasattr(tcp, "npartitions")
    if not remote and tcp.empty:
        return pd.DataFrame(columns=cols)
    grp_names = sorted(set(group_of_cap.values()))
    gcode = {g: i for i, g in enumerate(grp_names)}
    cap_to_grp = np.asarray([gcode[group_of_cap[c]] for c in range(len(legs.captures))], dtype=np.int64)
    if not remote and engine != "pandas":
        out = _packet_deltas_arrays(tcp, cap_to_grp, grp_names, legs.captures)
        if out is not None:
            return out if len(out) else pd.DataFrame(columns=cols)

    def prepare(t: pd.DataFrame) -> pd.DataFrame:
        # a new frame (copy-on-write: the selected columns are not copied), narrow added columns
        return t[["cap", "ts", "lconn", "dir", "seq", "ack", "tsval"]].assign(
            fl=packet_class(t["flags"], t["plen"]).astype(np.int8),
            grp=cap_to_grp[t["cap"].to_numpy()].astype(np.int16))

    t = tcp.map_partitions(prepare, meta=prepare(tcp._meta)) if remote else prepare(tcp)
    # up to three captures per (group, lconn), those with the most packets of it: the pair of captures closest
    # to each other (smallest round trip, least path asymmetry) is chosen later
    counts = t.groupby(["grp", "lconn", "cap"]).size()
    counts = (counts.compute() if remote else counts).rename("n").reset_index()
    counts = counts.sort_values(["grp", "lconn", "n"], ascending=[True, True, False])
    counts = counts[counts.groupby(["grp", "lconn"]).cumcount() < MAX_CAPTURES_PER_GROUP]
    multi = counts.groupby("lconn")["grp"].nunique()
    shared = multi[multi >= 2].index
    rep = counts[counts["lconn"].isin(shared)][["grp", "lconn", "cap"]]
    if rep.empty:
        return pd.DataFrame(columns=cols)

    # (a capture's group is fixed, so (lconn, cap) picks the same rows as (grp, lconn, cap))
    rep_keys = np.unique(rep["lconn"].to_numpy(np.int64) * 65536 + rep["cap"].to_numpy(np.int64))

    def first_sight(d: pd.DataFrame) -> pd.DataFrame:   # exact per partition: a capture is in one partition
        keep = pd.Series(d["lconn"].to_numpy(np.int64) * 65536 + d["cap"].to_numpy(np.int64)).isin(rep_keys) \
            .to_numpy(bool)
        return d[keep].sort_values("ts", kind="stable").drop_duplicates(["cap"] + KEY, keep="first")

    t = t.map_partitions(first_sight, meta=first_sight(t._meta)) if remote else first_sight(t)
    out = []
    for ga in range(len(grp_names)):
        lconns_a = rep.loc[rep["grp"] == ga, "lconn"].unique()
        if not len(lconns_a):
            continue
        ta = t[t["grp"] == ga]
        tb_all = t[(t["grp"] > ga) & t["lconn"].isin(lconns_a.tolist())]
        m = ta[KEY + ["ts", "cap"]].merge(tb_all[KEY + ["ts", "cap", "grp"]], on=KEY, suffixes=("_a", "_b"))
        if remote:
            m = m.compute()
        if m.empty:
            continue
        m = m.sort_values(["ts_a", "cap_a", "cap_b", "ts_b"], kind="stable")
        out.append(pd.DataFrame({"ga": grp_names[ga], "gb": np.asarray(grp_names, object)[m["grp"].to_numpy()],
                                 "lconn": m["lconn"].to_numpy(), "dir": m["dir"].to_numpy(),
                                 "delta": (m["ts_b"] - m["ts_a"]).to_numpy(), "ta": m["ts_a"].to_numpy(),
                                 "cap_a": np.asarray(legs.captures, object)[m["cap_a"].to_numpy()],
                                 "cap_b": np.asarray(legs.captures, object)[m["cap_b"].to_numpy()]}))
    if not out:
        return pd.DataFrame(columns=cols)
    return pd.concat(out, ignore_index=True)


def _mix(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One step of a 64-bit hash of several integer columns (multiply-xorshift, as splitmix64 finalises)."""
    h = (h ^ x.astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
    return h ^ (h >> np.uint64(31))


def _packet_deltas_arrays(tcp: pd.DataFrame, cap_to_grp: np.ndarray, grp_names: list[str],
                          captures: list[str]) -> pd.DataFrame | None:
    """`packet_deltas` on numpy arrays: the same choices, order and rows as the DataFrame path, without its
    multi-column group-bys, sorts and merges. Packets are keyed by a 64-bit hash of their columns; every pair the
    hash joins is checked column by column, and if two different packets of one capture ever share a hash the
    DataFrame path is taken instead (returns None)."""
    cap = tcp["cap"].to_numpy()
    lconn = tcp["lconn"].to_numpy()
    # up to MAX_CAPTURES_PER_GROUP captures per (group, lconn), those with the most packets of it
    codes, uniq = pd.factorize(lconn.astype(np.int64) * 65536 + cap)
    n = np.bincount(codes, minlength=len(uniq))
    u_cap, u_lconn = uniq % 65536, uniq // 65536
    u_grp = cap_to_grp[u_cap]
    o = np.lexsort((u_cap, -n, u_lconn, u_grp))        # by group, lconn, most packets first, then capture
    g_s, l_s = u_grp[o], u_lconn[o]
    new = np.ones(len(o), dtype=bool)
    new[1:] = (g_s[1:] != g_s[:-1]) | (l_s[1:] != l_s[:-1])
    start = np.maximum.accumulate(np.where(new, np.arange(len(o)), 0))
    top = o[np.arange(len(o)) - start < MAX_CAPTURES_PER_GROUP]
    groups_of_lconn = pd.Series(u_grp[top]).groupby(u_lconn[top]).nunique()
    shared_l = groups_of_lconn.index.to_numpy()[groups_of_lconn.to_numpy() >= 2]
    rep = top[np.isin(u_lconn[top], shared_l)]
    if not len(rep):
        return pd.DataFrame()
    is_rep = np.zeros(len(uniq), dtype=bool)
    is_rep[rep] = True
    rows = np.flatnonzero(is_rep[codes])
    del codes
    # first sight: per capture and packet key, the earliest row (rows in time order, ties in table order)
    ts = tcp["ts"].to_numpy(np.int64)
    rows = rows[np.argsort(ts[rows], kind="stable")]
    key_cols = [lconn[rows], tcp["dir"].to_numpy()[rows], tcp["seq"].to_numpy()[rows], tcp["ack"].to_numpy()[rows],
                tcp["tsval"].to_numpy()[rows],
                packet_class(tcp["flags"].to_numpy()[rows], tcp["plen"].to_numpy()[rows]).astype(np.int8)]
    hk = np.zeros(len(rows), dtype=np.uint64)
    for x in key_cols:
        hk = _mix(hk, x)
    c = cap[rows]
    hc = _mix(hk, c)
    dup = pd.Series(hc, copy=False).duplicated(keep="first").to_numpy()
    if dup.any():
        p = np.flatnonzero(dup)
        cand = np.flatnonzero(pd.Series(hc, copy=False).isin(hc[p]).to_numpy() & ~dup)     # (a hash set)
        first_of = dict(zip(hc[cand].tolist(), cand.tolist()))
        q = np.fromiter((first_of[h] for h in hc[p].tolist()), dtype=np.int64, count=len(p))
        if (c[p] != c[q]).any() or any((x[p] != x[q]).any() for x in key_cols):
            return None                                    # a hash collision: the DataFrame path decides
    del hc
    keep = ~dup
    rows, c = rows[keep], c[keep]
    kcode, kuniq = pd.factorize(hk[keep])               # dense numbers of the packet keys
    del hk
    key_cols = [x[keep] for x in key_cols]
    g = cap_to_grp[c]
    ts_k = ts[rows]
    str_dtype = pd.Series([""], dtype=str).dtype
    cap_names = pd.array(list(captures), dtype=str_dtype)
    grp_arr = pd.array(list(grp_names), dtype=str_dtype)
    # pairs: each packet of group a with the same packet in a later group (same lconn, so same key columns)
    out = []
    for ga in range(len(grp_names)):
        ia = np.flatnonzero(g == ga)
        if not len(ia):
            continue
        ib = np.flatnonzero(g > ga)
        if not len(ib):
            continue
        ib = ib[np.isin(key_cols[0][ib], np.unique(key_cols[0][ia]))]
        ob = ib[np.argsort(kcode[ib], kind="stable")]      # b's rows by key, each key's rows in time order
        per_key = np.bincount(kcode[ib], minlength=len(kuniq))
        cnt = per_key[kcode[ia]]
        if not cnt.sum():
            continue
        lo = (np.cumsum(per_key) - per_key)[kcode[ia]]
        pa = np.repeat(ia, cnt)
        within = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        pb = ob[np.repeat(lo, cnt) + within]
        same = np.ones(len(pa), dtype=bool)
        for x in key_cols:
            same &= x[pa] == x[pb]
        pa, pb = pa[same], pb[same]
        if not len(pa):
            continue
        # the DataFrame path's order: by time at a, captures, time at b; ties in the merge's order (rows of a in
        # time order, each with its matches in b in time order)
        o = np.lexsort((pb, pa, ts_k[pb], c[pb], c[pa], ts_k[pa]))
        pa, pb = pa[o], pb[o]
        out.append(pd.DataFrame({"ga": grp_arr.take(np.full(len(pa), ga)), "gb": grp_arr.take(g[pb]),
                                 "lconn": key_cols[0][pa].astype(tcp["lconn"].dtype), "dir": key_cols[1][pa].astype(tcp["dir"].dtype),
                                 "delta": ts_k[pb] - ts_k[pa], "ta": ts_k[pa],
                                 "cap_a": cap_names.take(c[pa]), "cap_b": cap_names.take(c[pb])}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def datagram_deltas(packets: pd.DataFrame, captures: list[str], group_of_cap: dict[int, str]) -> pd.DataFrame:
    """The same as `packet_deltas` for IPv4 packets other than TCP (UDP, ICMP): matched by inner addresses,
    protocol, ports, IP identification, lengths and ICMP type, and where that repeats within a capture, by its
    rank (the n-th such packet in one capture is the n-th in the other). Each unordered address pair and protocol
    is one pseudo-connection (negative ids), its direction the address order."""
    cols = ["ga", "gb", "lconn", "dir", "delta", "ta", "cap_a", "cap_b"]
    if packets.empty:
        return pd.DataFrame(columns=cols)
    m = (packets["proto"] != "tcp") & packets["ip_id"].notna() & packets["src"].notna() & packets["dst"].notna()
    pk = packets.loc[m]
    if pk.empty:
        return pd.DataFrame(columns=cols)
    capidx = {c: i for i, c in enumerate(captures)}
    src = pk["src"].astype(object).to_numpy(object)
    dst = pk["dst"].astype(object).to_numpy(object)
    fwd = src.astype(str) <= dst.astype(str)
    lo = np.where(fwd, src, dst)
    hi = np.where(fwd, dst, src)
    d = pd.DataFrame({
        "cap": pk["capture"].astype(object).map(capidx).to_numpy(),
        "ts": pk["ts"].to_numpy("datetime64[ns]").view(np.int64),
        "pair": pd.factorize(pd.MultiIndex.from_arrays([lo, hi, pk["proto"].astype(object).to_numpy(object)]))[0],
        "dir": (~fwd).astype(np.int64),
        "ip_id": pk["ip_id"].to_numpy(np.int64, na_value=-1),
        "sport": pk["sport"].to_numpy(np.int64, na_value=-1), "dport": pk["dport"].to_numpy(np.int64, na_value=-1),
        "plen": pk["payload_len"].to_numpy(np.int64, na_value=-1),
        "icmp": pk["icmp_type"].to_numpy(np.int64, na_value=-1),
    }).dropna(subset=["cap"])
    d["cap"] = d["cap"].astype(np.int64)
    key = ["pair", "dir", "ip_id", "sport", "dport", "plen", "icmp"]
    d = d.sort_values(["cap", "ts"], kind="stable")
    d["rank"] = d.groupby(["cap"] + key).cumcount()
    key = key + ["rank"]
    grp_names = sorted(set(group_of_cap.values()))
    gcode = {g: i for i, g in enumerate(grp_names)}
    d["grp"] = np.asarray([gcode[group_of_cap[c]] for c in range(len(captures))], dtype=np.int64)[d["cap"].to_numpy()]
    # one capture per group: the one with the most such packets
    best = d.groupby(["grp", "cap"]).size().rename("n").reset_index().sort_values("n", ascending=False) \
        .drop_duplicates("grp")
    d = d[d["cap"].isin(best["cap"])]
    out = []
    for ga in sorted(d["grp"].unique()):
        ta = d[d["grp"] == ga]
        tb = d[d["grp"] > ga]
        if tb.empty:
            continue
        mm = ta.merge(tb, on=key, suffixes=("_a", "_b"))
        if mm.empty:
            continue
        out.append(pd.DataFrame({"ga": grp_names[ga], "gb": np.asarray(grp_names, object)[mm["grp_b"].to_numpy()],
                                 "lconn": -1 - mm["pair"].to_numpy(), "dir": mm["dir"].to_numpy(),
                                 "delta": (mm["ts_b"] - mm["ts_a"]).to_numpy(), "ta": mm["ts_a"].to_numpy(),
                                 "cap_a": np.asarray(captures, object)[mm["cap_a"].to_numpy()],
                                 "cap_b": np.asarray(captures, object)[mm["cap_b"].to_numpy()]}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


def pair_estimates(deltas: pd.DataFrame) -> list[PairEstimate]:
    """One offset estimate per pair of groups: for each pair of captures (one per group) the bracket pooled over
    every connection both saw; the narrowest consistent bracket wins."""
    if deltas.empty:
        return []
    agg = deltas.groupby(["ga", "gb", "cap_a", "cap_b", "lconn", "dir"])["delta"].agg(["min", "max", "size"])
    agg = agg.reset_index()
    est = []
    for (ga, gb), sub_g in agg.groupby(["ga", "gb"], sort=True):
        best: PairEstimate | None = None
        for (ca, cb), sub in sub_g.groupby(["cap_a", "cap_b"], sort=True):
            e = _bracket(ga, gb, str(ca), str(cb), sub)
            if best is None or _better(e, best):
                best = e
        if best is not None:
            sel = deltas[(deltas["ga"] == ga) & (deltas["gb"] == gb) & (deltas["cap_a"] == best.captures[0]) &
                         (deltas["cap_b"] == best.captures[1])]
            best.drift_ppm, best.span_s = _drift(sel, best.forward)
            est.append(best)
    return est


def _drift(d: pd.DataFrame, forward: dict, bins: int = 10, min_span_s: float = 2.0) -> tuple[float, float]:
    """Relative clock drift (ppm) between two captures: the slope of the per-time-bin minimum one-way delay one
    way and maximum the other (the lower and upper envelopes of the offset, after Moon, Skelly and Towsley 1999,
    fitted by least squares on bin extremes instead of a linear program). NaN when the span is too short."""
    if d.empty or not forward:
        return float("nan"), 0.0
    ta = d["ta"].to_numpy(np.int64)
    span = (ta.max() - ta.min()) / 1e9
    if span < min_span_s:
        return float("nan"), span
    fwd_dir = d["lconn"].map(forward)
    is_fwd = (d["dir"].to_numpy() == fwd_dir.to_numpy())
    known = fwd_dir.notna().to_numpy()
    b = np.minimum(((ta - ta.min()) / (ta.max() - ta.min()) * bins).astype(np.int64), bins - 1)
    slopes = []
    for mask, agg in ((is_fwd & known, "min"), (~is_fwd & known, "max")):
        if mask.sum() < 3:
            continue
        g = pd.DataFrame({"b": b[mask], "t": ta[mask], "d": d["delta"].to_numpy()[mask]})
        idx = g.groupby("b")["d"].idxmin() if agg == "min" else g.groupby("b")["d"].idxmax()
        pts = g.loc[idx.to_numpy()]
        if len(pts) >= 3:
            slope = np.polyfit((pts["t"] - ta.min()) / 1e9, pts["d"], 1)[0]   # ns per s
            slopes.append(slope / 1e3)                                         # ppm
    return (float(np.mean(slopes)) if slopes else float("nan")), span


def _better(e: PairEstimate, best: PairEstimate) -> bool:
    if e.inconsistent != best.inconsistent:
        return not e.inconsistent
    if e.uncertainty_ns != best.uncertainty_ns:
        return e.uncertainty_ns < best.uncertainty_ns
    return e.packets > best.packets


def _bracket(ga: str, gb: str, ca: str, cb: str, sub: pd.DataFrame) -> PairEstimate:
    """The offset bracket of one pair of captures, pooled over connections (vectorised over connections)."""
    w = sub.pivot_table(index="lconn", columns="dir", values=["min", "max", "size"], aggfunc="first")
    def col(name, d):
        return w[(name, d)].to_numpy(np.float64) if (name, d) in w.columns else np.full(len(w), np.nan)
    min0, max0, min1, max1 = col("min", 0), col("max", 0), col("min", 1), col("max", 1)
    size = np.nansum(np.stack([col("size", 0), col("size", 1)]), axis=0)
    both = ~np.isnan(min0) & ~np.isnan(min1)
    lcs = w.index.to_numpy()
    if not both.any():
        # one direction only: the offset is bounded on one side; the tightest packet is a rough estimate
        lo = float(np.nanmin(np.fmin(min0, min1)))
        hi = float(np.nanmax(np.fmax(max0, max1)))
        return PairEstimate(ga, gb, lo, float(max(hi - lo, abs(lo)) or 0.0), int(len(w)), int(size.sum()), True, [],
                            (ca, cb))
    # orientation per connection: its client->server packets go a->b (gap1) or b->a (gap2)
    gap1 = min0 - max1
    gap2 = min1 - max0
    fwd0 = gap1 >= gap2
    fwd_min = float(np.where(fwd0, min0, min1)[both].min())
    bwd_max = float(np.where(fwd0, max1, max0)[both].max())
    forward = {int(l): (0 if f else 1) for l, f, b in zip(lcs, fwd0, both) if b}
    theta = (fwd_min + bwd_max) / 2
    unc = (fwd_min - bwd_max) / 2
    return PairEstimate(ga, gb, float(theta), float(abs(unc)), int(both.sum()), int(size[both].sum()), bool(unc < 0),
                        [int(l) for l in lcs[both]], (ca, cb), forward)


def solve_offsets(groups: list[str], reference: str, pairs: list[PairEstimate]) -> dict[str, GroupOffset]:
    """Chain pair estimates from the reference along the path of least total uncertainty."""
    adj: dict[str, list[tuple[str, float, float, PairEstimate]]] = {g: [] for g in groups}
    for p in pairs:
        adj.setdefault(p.a, []).append((p.b, p.theta_ns, p.uncertainty_ns, p))
        adj.setdefault(p.b, []).append((p.a, -p.theta_ns, p.uncertainty_ns, p))
    best: dict[str, GroupOffset] = {reference: GroupOffset(reference, 0.0, 0.0, "reference", method="reference")}
    dist = {reference: 0.0}
    heap = [(0.0, reference)]
    while heap:
        dcur, g = heapq.heappop(heap)
        if dcur > dist.get(g, np.inf):
            continue
        for h, theta, unc, p in adj.get(g, []):
            # edge weight: uncertainty plus a small cost per hop so tight direct pairs win
            nd = dcur + unc + 1.0
            if nd < dist.get(h, np.inf):
                dist[h] = nd
                base = best[g]
                via = (base.via + " -> " if base.via != "reference" else f"{g} -> ") + h
                method = (f"min-delay both ways over {p.connections} connection(s), {p.packets} packet pairs "
                          f"({p.captures[0]} vs {p.captures[1]})")
                if p.inconsistent:
                    method += "; inconsistent bracket (drift, asymmetric path or one direction only)"
                drift = p.drift_ppm if h == p.b else -p.drift_ppm
                if np.isfinite(drift):
                    method += f"; drift {drift:+.2f} ppm over {p.span_s:.1f} s (not corrected)"
                best[h] = GroupOffset(h, base.offset_ns + theta, base.uncertainty_ns + unc, via, p.connections,
                                      p.packets, method, drift)
                heapq.heappush(heap, (nd, h))
    for g in groups:
        if g not in best:
            best[g] = GroupOffset(g, float("nan"), float("nan"), "unconnected",
                                  method="no connection shared with the reference's clock group")
    return best

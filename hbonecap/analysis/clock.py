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
occurrence in each capture, so retransmissions do not pair with their originals. All per-packet work is a merge.
Limits: clock drift (Moon, Skelly, Towsley 1999) is not yet fitted; `drift_ppm` is reported from a linear fit of
the per-packet deltas when the span allows, for information only.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hbonecap.analysis.legs import Legs

KEY = ["lconn", "dir", "seq", "ack", "tsval", "fl"]


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


@dataclass
class GroupOffset:
    group: str
    offset_ns: float           # this group's clock minus the reference's (file time = true time + offset)
    uncertainty_ns: float
    via: str                   # how: reference, path of groups, or unconnected
    connections: int = 0
    packets: int = 0
    method: str = ""


def packet_deltas(legs: Legs, group_of_cap: dict[int, str]) -> pd.DataFrame:
    """For every pair of groups and every connection seen in both: per packet (dir, delta = t_b - t_a, t_a)."""
    tcp = legs.tcp
    if tcp.empty:
        return pd.DataFrame(columns=["ga", "gb", "lconn", "dir", "delta", "ta", "cap_a", "cap_b"])
    t = tcp[["cap", "ts", "lconn", "dir", "seq", "ack", "tsval", "flags"]].copy()
    t["fl"] = t["flags"] & 0x07
    grp_names = sorted(set(group_of_cap.values()))
    gcode = {g: i for i, g in enumerate(grp_names)}
    cap_to_grp = np.asarray([gcode[group_of_cap[c]] for c in range(len(legs.captures))], dtype=np.int64)
    t["grp"] = cap_to_grp[t["cap"].to_numpy()]
    # one representative capture per (group, lconn): the one with the most packets of it
    counts = t.groupby(["grp", "lconn", "cap"]).size().rename("n").reset_index()
    counts = counts.sort_values(["grp", "lconn", "n"], ascending=[True, True, False]).drop_duplicates(["grp", "lconn"])
    multi = counts.groupby("lconn")["grp"].nunique()
    shared = multi[multi >= 2].index
    rep = counts[counts["lconn"].isin(shared)][["grp", "lconn", "cap"]]
    t = t.merge(rep, on=["grp", "lconn", "cap"], how="inner")
    t = t.sort_values("ts", kind="stable").drop_duplicates(["cap"] + KEY, keep="first")
    out = []
    for ga in range(len(grp_names)):
        ta = t[t["grp"] == ga]
        if ta.empty:
            continue
        tb_all = t[(t["grp"] > ga) & t["lconn"].isin(ta["lconn"].unique())]
        if tb_all.empty:
            continue
        m = ta[KEY + ["ts", "cap"]].merge(tb_all[KEY + ["ts", "cap", "grp"]], on=KEY, suffixes=("_a", "_b"))
        if m.empty:
            continue
        out.append(pd.DataFrame({"ga": grp_names[ga], "gb": np.asarray(grp_names, object)[m["grp"].to_numpy()],
                                 "lconn": m["lconn"].to_numpy(), "dir": m["dir"].to_numpy(),
                                 "delta": (m["ts_b"] - m["ts_a"]).to_numpy(), "ta": m["ts_a"].to_numpy(),
                                 "cap_a": m["cap_a"].to_numpy(), "cap_b": m["cap_b"].to_numpy()}))
    if not out:
        return pd.DataFrame(columns=["ga", "gb", "lconn", "dir", "delta", "ta", "cap_a", "cap_b"])
    return pd.concat(out, ignore_index=True)


def pair_estimates(deltas: pd.DataFrame, captures: list[str]) -> list[PairEstimate]:
    """One offset estimate per pair of groups, pooling every connection seen by both."""
    if deltas.empty:
        return []
    agg = deltas.groupby(["ga", "gb", "lconn", "dir"])["delta"].agg(["min", "max", "size"]).reset_index()
    est = []
    for (ga, gb), sub in agg.groupby(["ga", "gb"], sort=True):
        fwd_min, bwd_max, n_pk, conns, used = np.inf, -np.inf, 0, 0, []
        one_way: list[tuple[float, float]] = []
        for lc, s in sub.groupby("lconn"):
            d0 = s[s["dir"] == 0]
            d1 = s[s["dir"] == 1]
            if d0.empty or d1.empty:
                one_way.append((s["min"].min(), s["max"].max()))
                continue
            # orientation: client->server packets go a->b (gap1) or b->a (gap2)
            gap1 = d0["min"].iloc[0] - d1["max"].iloc[0]
            gap2 = d1["min"].iloc[0] - d0["max"].iloc[0]
            f, b = (d0, d1) if gap1 >= gap2 else (d1, d0)
            fwd_min = min(fwd_min, f["min"].iloc[0])
            bwd_max = max(bwd_max, b["max"].iloc[0])
            n_pk += int(s["size"].sum())
            conns += 1
            used.append(int(lc))
        caps = deltas[(deltas["ga"] == ga) & (deltas["gb"] == gb)][["cap_a", "cap_b"]].iloc[0]
        capn = (captures[int(caps["cap_a"])], captures[int(caps["cap_b"])])
        if conns == 0:
            # only one direction seen: the offset is bounded on one side only; take the tightest packet as a
            # rough estimate with a large uncertainty
            lo = min(x[0] for x in one_way)
            hi = max(x[1] for x in one_way)
            est.append(PairEstimate(ga, gb, float(lo), float(max(hi - lo, abs(lo)) or 0.0), len(one_way),
                                    int(sub["size"].sum()), True, [], capn))
            continue
        theta = (fwd_min + bwd_max) / 2
        unc = (fwd_min - bwd_max) / 2
        est.append(PairEstimate(ga, gb, float(theta), float(abs(unc)), conns, n_pk, bool(unc < 0), used, capn))
    return est


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
                best[h] = GroupOffset(h, base.offset_ns + theta, base.uncertainty_ns + unc, via, p.connections,
                                      p.packets, method)
                heapq.heappush(heap, (nd, h))
    for g in groups:
        if g not in best:
            best[g] = GroupOffset(g, float("nan"), float("nan"), "unconnected",
                                  method="no connection shared with the reference's clock group")
    return best

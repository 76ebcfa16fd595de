"""Correlation inputs computed where the packets are: on a Dask cluster, with `engine="dask"`.

With `analyze(..., scheduler=..., engine="dask")` the packets table is a Dask DataFrame whose partitions live on
the workers (one per capture point). Correlation needs three things from it, and each is computed there:

- legs (`legs_on_cluster`): `capture_legs` runs on each worker over its own partition; only the per-leg rows
  (a few per connection and capture) travel to the client, where `join_legs` ties them into logical
  connections; the per-packet TCP rows (`Legs.tcp`) stay a Dask DataFrame, numbered globally on the workers.
- clock offsets: `clock.packet_deltas` joins the same packet across capture groups with Dask merges on that
  per-packet table (a shuffle on the cluster); only the matched pairs' time differences come back.
- address counts and datagrams (`address_counts`, `datagram_rows`): per-capture group-bys and the few non-TCP
  rows, reduced on the workers.

Everything here also accepts a pandas DataFrame and then runs in this process, so one code path serves both.
A partitioning that splits one capture over several partitions is shuffled by capture first.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from hbonecap.analysis.legs import (TCP_DTYPES, CaptureLegs, JoinedLegs, Legs, attach_lconns, build_legs,
                                    capture_legs, join_legs, tcp_rows)

TCP_META = pd.DataFrame({c: pd.Series([], dtype=dt) for c, dt in TCP_DTYPES.items()})


def is_dask(df) -> bool:
    return hasattr(df, "npartitions") and hasattr(df, "to_delayed")


def _legs_of_partition(pdf: pd.DataFrame) -> dict[str, CaptureLegs]:
    pk = tcp_rows(pdf)
    out: dict[str, CaptureLegs] = {}
    if len(pk):
        names = pk["capture"].astype(object).to_numpy(object)
        for c, idx in pd.Series(np.arange(len(pk))).groupby(names).groups.items():
            out[str(c)] = capture_legs(pk.iloc[np.asarray(idx)])
    return out


def _summary(parts: dict[str, CaptureLegs]) -> dict[str, CaptureLegs]:
    return {c: CaptureLegs(p.packets.iloc[:0], p.legs, p.addresses) for c, p in parts.items()}


def _attach_partition(parts: dict[str, CaptureLegs], cap_of: dict[str, int], joined: JoinedLegs) -> pd.DataFrame:
    frames = [attach_lconns(p.packets, cap_of[c], joined) for c, p in parts.items()]
    return pd.concat(frames, ignore_index=True) if frames else TCP_META.copy()


def legs_on_cluster(packets, captures: list[str]) -> Legs:
    """`build_legs` for a Dask packets table: the per-packet work on the workers, the join over legs here."""
    if not is_dask(packets):
        return build_legs(packets, captures)
    import dask
    from dask import delayed

    parts = [delayed(_legs_of_partition)(d) for d in packets.to_delayed()]
    parts = list(dask.persist(*parts))
    summaries = dask.compute(*[delayed(_summary)(p) for p in parts])
    seen = [c for s in summaries for c in s]
    if len(seen) != len(set(seen)):           # a capture spread over partitions: put each capture in one
        packets = packets.shuffle("capture", npartitions=max(1, len(set(seen))))
        return legs_on_cluster(packets, captures)
    merged = {c: p for s in summaries for c, p in s.items()}
    captures = [c for c in captures if c in merged] + sorted(c for c in merged if c not in captures)
    joined = join_legs(captures, merged)
    slim = JoinedLegs(joined.legs.iloc[:0], joined.lconns.iloc[:0], joined.leg_offset, joined.lconn_of_leg,
                      joined.client_is_lo)
    cap_of = {c: i for i, c in enumerate(captures)}
    slim_d = delayed(slim, traverse=False)
    import dask.dataframe as dd

    tcp = dd.from_delayed([delayed(_attach_partition)(p, cap_of, slim_d) for p in parts], meta=TCP_META,
                          verify_meta=False)
    return Legs(tcp, joined.legs, joined.lconns, captures)


def tcp_of(legs: Legs, lconns) -> pd.DataFrame:
    """The per-packet TCP rows of some logical connections, as a pandas DataFrame (computed on the cluster)."""
    want = sorted({int(x) for x in lconns})
    t = legs.tcp[legs.tcp["lconn"].isin(want)]
    return t.compute().reset_index(drop=True) if is_dask(t) else t     # (a new frame: copy-on-write)


def tcp_where(legs: Legs, lconns, column: str, values) -> pd.DataFrame:
    """The per-packet TCP rows of some logical connections whose `column` holds one of `values` (a pre-filter
    that keeps a join small: e.g. the packets at given times), as a pandas DataFrame in `Legs.tcp` order."""
    want = np.unique(np.asarray(list(lconns), dtype=np.int64))
    vals = np.unique(np.asarray(list(values), dtype=np.int64))

    def pick(t: pd.DataFrame) -> pd.DataFrame:
        m = t[column].isin(vals).to_numpy(bool) & t["lconn"].isin(want).to_numpy(bool)   # hash sets, not sorts
        return t[m]

    tcp = legs.tcp
    if is_dask(tcp):
        return tcp.map_partitions(pick, meta=tcp._meta).compute().reset_index(drop=True)
    return pick(tcp)


OWNER_COLUMNS = ["capture", "ip", "n"]
INITIAL_TTLS = (64, 128, 255)          # what Linux, Windows and network gear put in the packets they originate


def sum_counts(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-part address counts added up per (capture, address)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=OWNER_COLUMNS)
    f = pd.concat(frames, ignore_index=True)
    return f.groupby(["capture", "ip"], sort=True).sum(numeric_only=True).reset_index()


def _codes(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes, values) of a column: category codes (-1 for NA) or factorised values."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.codes.to_numpy(np.int64), np.asarray(col.cat.categories, dtype=object)
    codes, uniq = pd.factorize(col.astype(object), use_na_sentinel=True)
    return codes.astype(np.int64), np.asarray(uniq, dtype=object)


def _address_counts(pk: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    if pk.empty:
        return pd.DataFrame(columns=OWNER_COLUMNS), pd.DataFrame(columns=OWNER_COLUMNS)
    # counted on category codes, the few distinct combinations turned into text afterwards
    tun = pk["encap"].astype(object).fillna("").to_numpy(object) != "" if not isinstance(
        pk["encap"].dtype, pd.CategoricalDtype) else _nonempty_category(pk["encap"])
    cap, cap_names = _codes(pk["capture"])
    parts = []
    for outer, inner in (("outer_src", "src"), ("outer_dst", "dst")):
        oc, on = _codes(pk[outer])
        ic, inn = _codes(pk[inner])
        combos = pd.DataFrame({"cap": cap, "tun": tun, "o": oc, "i": ic}).value_counts(sort=False).reset_index()
        t = combos["tun"].to_numpy(bool)
        code = np.where(t, combos["o"].to_numpy(), combos["i"].to_numpy())
        names = np.where(t, on[np.maximum(code, 0)] if len(on) else None, inn[np.maximum(code, 0)] if len(inn) else None)
        keep = code >= 0
        parts.append(pd.DataFrame({"capture": cap_names[combos["cap"].to_numpy()[keep]], "ip": names[keep],
                                   "n": combos["count"].to_numpy(np.int64)[keep]}))
    ips = pd.concat(parts, ignore_index=True)
    counts = ips.groupby(["capture", "ip"])["n"].sum().rename("n").reset_index()
    # packets each address sent with one IP header, and how many of them carry an initial TTL: at a host's own
    # interface its packets have crossed no router yet, while its peers' usually have (a pod's eth0 sees the
    # node-routed packets of the node's ztunnel with TTL 63): evidence of which address is the capture's own
    sc, sn = _codes(pk["src"])
    sel = ~tun & (sc >= 0)
    counts["sent"] = 0
    counts["initial_ttl"] = 0
    if sel.any() and "ttl" in pk:
        ttl = pk["ttl"].to_numpy(np.float64, na_value=-1)[sel]
        sent = pd.DataFrame({"cap": cap[sel], "i": sc[sel], "init": np.isin(ttl, INITIAL_TTLS)}) \
            .value_counts(sort=False).reset_index()
        k = sent["count"].to_numpy(np.int64)
        per = pd.DataFrame({"capture": cap_names[sent["cap"].to_numpy()], "ip": sn[sent["i"].to_numpy()], "sent": k,
                            "initial_ttl": np.where(sent["init"].to_numpy(bool), k, 0)})
        per = per.groupby(["capture", "ip"]).sum().reset_index()
        counts = counts.drop(columns=["sent", "initial_ttl"]).merge(per, on=["capture", "ip"], how="left")
        counts[["sent", "initial_ttl"]] = counts[["sent", "initial_ttl"]].fillna(0).astype(np.int64)
    gen = pk["vni"].isin([1000, 1001]).fillna(False).to_numpy(bool) & tun
    od = pd.DataFrame({"capture": cap_names[cap[gen]], "ip": pk["outer_dst"].astype(object).to_numpy(object)[gen]}
                      ).dropna() if gen.any() else pd.DataFrame({"capture": [], "ip": []})
    od = od.groupby(["capture", "ip"]).size().rename("n").reset_index()
    return counts, od


def _nonempty_category(col: pd.Series) -> np.ndarray:
    """Rows whose (categorical) value is present and not the empty string."""
    cats = np.asarray(col.cat.categories, dtype=object)
    ok = np.r_[np.array([c != "" for c in cats], dtype=bool), False]     # code -1 (NA) -> the last entry
    return ok[col.cat.codes.to_numpy(np.int64)]


def address_counts(packets) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per capture and address, how many packets carry it (outer addresses for tunnelled packets; `sent`: how many
    it sent with one IP header, `initial_ttl`: how many of those with TTL 64/128/255), and the same
    for the outer destinations of Istio's Geneve packets (VNI 1000/1001): (counts, geneve_destinations)."""
    if not is_dask(packets):
        return _address_counts(packets)
    import dask
    from dask import delayed

    got = dask.compute(*[delayed(_address_counts)(d) for d in packets.to_delayed()])
    return sum_counts([g[0] for g in got]), sum_counts([g[1] for g in got])


DATAGRAM_COLUMNS = ["capture", "ts", "src", "dst", "proto", "ip_id", "sport", "dport", "payload_len", "icmp_type"]


def datagram_rows(packets) -> pd.DataFrame:
    """The packets other than TCP that carry an IP identification (UDP, ICMP): the rows `datagram_deltas` pairs
    across captures, with only the columns it reads."""
    def pick(pk: pd.DataFrame) -> pd.DataFrame:
        m = (pk["proto"] != "tcp") & pk["ip_id"].notna() & pk["src"].notna() & pk["dst"].notna()
        return pk.loc[m, DATAGRAM_COLUMNS]

    if not is_dask(packets):
        return pick(packets)
    return packets.map_partitions(pick, meta=packets._meta[DATAGRAM_COLUMNS]).compute().reset_index(drop=True)


def first_writes(legs: Legs, n: int) -> pd.DataFrame:
    """Per logical connection and direction, its first `n` data segments (distinct sequence numbers, in time
    order) at the capture that saw its first data segment: rows (lconn, dir, ts, plen). The per-packet filtering
    runs on the workers; only these few rows per connection come back."""
    tcp = legs.tcp
    cols = ["cap", "ts", "lconn", "dir", "seq", "plen"]
    data = tcp[tcp["plen"] > 0][cols]
    firsts = data.groupby(["lconn", "dir", "cap"])["ts"].min()
    firsts = (firsts.compute() if is_dask(data) else firsts).rename("t0").reset_index()
    # the capture that saw the first data segment each way (ties: the first capture, as rows are in capture order)
    firsts = firsts.sort_values(["t0", "cap"], kind="stable").drop_duplicates(["lconn", "dir"])[["lconn", "dir", "cap"]]

    def pick(d: pd.DataFrame) -> pd.DataFrame:       # exact per partition: a capture is in one partition
        d = d.assign(_pos=np.arange(len(d))).merge(firsts, on=["lconn", "dir", "cap"], how="inner")
        d = d.sort_values(["ts", "_pos"], kind="stable")
        d = d.drop_duplicates(["lconn", "dir", "seq"])
        return d.groupby(["lconn", "dir"], sort=False).head(n)[["lconn", "dir", "ts", "plen"]]

    if is_dask(data):
        out = data.map_partitions(pick, meta=pick(data._meta)).compute()
    else:
        out = pick(data)
    return out.sort_values(["lconn", "dir", "ts"], kind="stable").reset_index(drop=True)

"""What correlation needs from one capture's packets, computed where that capture is analysed.

Correlation reads four things from the packets table: the per-capture half of the leg builder
(`legs.capture_legs`: per-leg rows and a slim per-packet TCP table), per-address packet counts (capture-point
identity), the non-TCP datagrams that carry an IP identification (clock offsets between captures with no TCP in
common), and per-address-set packet counts for Kubernetes placement. Each is a function of one capture alone, so
`analyze_capture` computes them in the process that decoded the capture (`CaptureInputs`), and the packets table
itself need not reach the process that correlates: it can stay in memory, go to Parquet from the worker, or be
dropped (`analyze(..., packets=...)`). `correlation_legs` and the other readers below take an `Analysis` and use
its per-capture inputs when it has them for every capture, else derive the same from `a.packets` (an analysis
loaded from disk, a Dask packets table, a table built by hand): both give the same tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from hbonecap.analysis.cluster import (DATAGRAM_COLUMNS, _address_counts, address_counts, datagram_rows, is_dask,
                                       legs_on_cluster, sum_counts)
from hbonecap.analysis.legs import CaptureLegs, Legs, build_legs, capture_legs, legs_of_parts, tcp_rows


@dataclass
class CaptureInputs:
    """Correlation's inputs from one capture (picklable; a few dozen bytes per TCP packet, see `legs`).

    legs: `capture_legs` of the capture's TCP packets.
    counts, geneve_dst: `cluster.address_counts` of the capture (rows capture, ip, n; counts also sent and
        initial_ttl).
    datagrams: `cluster.datagram_rows` of the capture.
    groups: `k8s.placement.address_groups` of the capture (capture, addresses, packets)."""

    legs: CaptureLegs
    counts: pd.DataFrame
    geneve_dst: pd.DataFrame
    datagrams: pd.DataFrame
    groups: pd.DataFrame


def capture_inputs(packets: pd.DataFrame) -> CaptureInputs:
    """The inputs of one capture's packets table."""
    from hbonecap.k8s.placement import address_groups

    counts, od = _address_counts(packets)
    return CaptureInputs(capture_legs(tcp_rows(packets)), counts, od, datagram_rows(packets),
                         address_groups(packets, None))


# the packets table's columns that the per-capture tables read from TCP packets: `connections.connections` and
# `legs.capture_legs` (kept per part by `InputsBuilder`, about a third of a packets row)
TCP_COLUMNS = ["capture", "index", "ts", "interface", "ifindex", "encap", "vni", "outer_src", "outer_dst", "src", "dst",
               "proto", "sport", "dport", "tcp_flags", "seq", "ack", "tsval", "payload_len"]


class InputsBuilder:
    """`capture_inputs` over a capture's packets table given part by part (`decode.PacketStream`, category codes
    stable across parts), without the whole table: per-part address counts, datagrams and placement groups are
    added up as they come; only the TCP rows' `TCP_COLUMNS` are kept, for the connections table and the legs.

    `add(part)` for each part in order, then `tcp()` (the TCP rows, a packets-shaped table with TCP_COLUMNS) and
    `inputs(tcp)`. Also counts what the captures table needs: packets, bytes, first/last time, VNIs, ports."""

    def __init__(self) -> None:
        self._tcp: list[pd.DataFrame] = []
        self._counts: list[pd.DataFrame] = []
        self._od: list[pd.DataFrame] = []
        self._datagrams: list[pd.DataFrame] = []
        self._groups: dict[tuple, int] = {}
        self.packets = 0
        self.bytes = 0
        self.first_ts = None
        self.last_ts = None
        self.vnis: set[int] = set()
        self.ports: set[int] = set()

    def add(self, part: pd.DataFrame) -> None:
        from hbonecap.k8s.placement import address_groups

        if not len(part):
            return
        self.packets += len(part)
        self.bytes += int(part["caplen"].sum())
        ts = part["ts"].dropna()
        if len(ts):
            lo, hi = ts.min(), ts.max()
            self.first_ts = lo if self.first_ts is None else min(self.first_ts, lo)
            self.last_ts = hi if self.last_ts is None else max(self.last_ts, hi)
        self.vnis.update(part["vni"].dropna().astype(int).unique().tolist())
        self.ports.update(part["dport"].dropna().astype(int).unique().tolist())
        m = ((part["proto"] == "tcp") & part["sport"].notna() & part["src"].notna()).to_numpy(bool)
        if m.any():
            self._tcp.append(part.loc[m, TCP_COLUMNS])
        counts, od = _address_counts(part)
        self._counts.append(counts)
        self._od.append(od)
        dg = datagram_rows(part)
        if len(dg):
            self._datagrams.append(dg.astype({c: object for c in ("capture", "src", "dst", "proto")}))
        for cap, addrs, n in address_groups(part, None).itertuples(index=False):
            self._groups[(cap, addrs)] = self._groups.get((cap, addrs), 0) + n

    def tcp(self) -> pd.DataFrame:
        """The TCP rows of every part, one table (categorical columns over the union of the parts' categories)."""
        from pandas.api.types import union_categoricals

        parts, self._tcp = self._tcp, []
        if not parts:
            from hbonecap import tables

            return tables.empty("packets")[TCP_COLUMNS]
        if len(parts) == 1:
            return parts[0].reset_index(drop=True)
        out = {}
        for c in TCP_COLUMNS:
            cols = [p[c] for p in parts]
            if isinstance(cols[0].dtype, pd.CategoricalDtype):
                out[c] = pd.Series(union_categoricals([x.array for x in cols], ignore_order=True))
            else:
                out[c] = pd.concat(cols, ignore_index=True)
            for p in parts:            # release each part's column as soon as it is copied
                del p[c]
        return pd.DataFrame(out, copy=False)

    def inputs(self, tcp: pd.DataFrame) -> CaptureInputs:
        """The capture's `CaptureInputs`, from the parts added and `tcp()`'s table."""
        dg = pd.concat(self._datagrams, ignore_index=True) if self._datagrams else \
            pd.DataFrame({c: pd.Series([], dtype=object) for c in DATAGRAM_COLUMNS})
        groups = pd.DataFrame([(c, a, n) for (c, a), n in self._groups.items()],
                              columns=["capture", "addresses", "packets"])
        return CaptureInputs(capture_legs(tcp_rows(tcp)), sum_counts(self._counts), sum_counts(self._od), dg, groups)


def _complete(a) -> dict[str, CaptureInputs] | None:
    """The analysis's per-capture inputs, when there is one for every capture with packets."""
    inputs = getattr(a, "inputs", None)
    if not inputs:
        return None
    caps = _captures_with_packets(a)
    return inputs if all(c in inputs for c in caps) else None


def _captures_with_packets(a) -> list[str]:
    return [str(c) for c, n in zip(a.captures["capture"], a.captures["packets"]) if n > 0]


def correlation_legs(a) -> Legs:
    """Legs and logical connections of the analysis (`legs.build_legs` of its packets table)."""
    inputs = _complete(a)
    if inputs is not None:
        caps = _captures_with_packets(a)
        return legs_of_parts(caps, {c: inputs[c].legs for c in caps})
    if is_dask(a.packets):
        return legs_on_cluster(a.packets, _captures_with_packets(a))
    return build_legs(a.packets)


def correlation_address_counts(a) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`cluster.address_counts` of the analysis."""
    inputs = _complete(a)
    if inputs is None:
        return address_counts(a.packets)
    return (sum_counts([x.counts for x in inputs.values()]), sum_counts([x.geneve_dst for x in inputs.values()]))


def correlation_datagrams(a) -> pd.DataFrame:
    """`cluster.datagram_rows` of the analysis."""
    inputs = _complete(a)
    if inputs is None:
        return datagram_rows(a.packets)
    frames = [x.datagrams for x in inputs.values() if len(x.datagrams)]
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in DATAGRAM_COLUMNS})
    out = pd.concat([f.astype({c: object for c in ("capture", "src", "dst", "proto")}) for f in frames],
                    ignore_index=True)
    return out


def placement_groups(a) -> pd.DataFrame:
    """`k8s.placement.address_groups` of the analysis."""
    from hbonecap.k8s.placement import address_groups

    inputs = _complete(a)
    if inputs is None:
        return address_groups(a.packets, a.connections)
    frames = [x.groups for x in inputs.values() if len(x.groups)]
    if not frames:
        return address_groups(None, a.connections)
    return pd.concat(frames, ignore_index=True)


__all__ = ["CaptureInputs", "InputsBuilder", "TCP_COLUMNS", "capture_inputs", "correlation_legs", "correlation_address_counts",
           "correlation_datagrams", "placement_groups"]

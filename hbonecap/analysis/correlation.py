"""Correlation across captures: logical flows, their hops, clock offsets and latency per hop.

One client connection to a service shows up in several captures in different forms: plain TCP on the pod, the
same 4-tuple inside Geneve VNI 1001 and on `pistioout`, a CONNECT stream inside a pooled HBONE connection on the
underlays, perhaps a waypoint that terminates and re-originates HBONE, and a new TCP connection from the
destination ztunnel to the server pod. `correlate(a)` ties them together from an `Analysis`'s tables:

1. TCP legs (`legs.py`): every capture's view of every TCP connection, whatever the encapsulation of each
   packet, tied across captures into logical connections (same endpoints, same initial sequence number).
2. Capture points: each pod/ztunnel/waypoint capture's own address (the address in most of its packets; of two
   in as many, the one whose packets left with an initial TTL, not routed); a capture without a node is placed
   on the node whose ztunnel shares its pod subnet, else the node whose local captures share its connections,
   else (once node clocks are known) the node on whose side its address's connections cross the underlay
   (`_place_by_direction`), its pod's other captures with it.
3. Clock offsets (`clock.py`): one clock per node; offsets from packets seen at two nodes, both ways. A clock
   that shares no packet with the others (a pod capture without a node) is bracketed by causality after a
   first match: its server connections open between their stream's CONNECT and the 200 (`_causal_clocks`).
4. Logical HBONE streams: the streams table's rows tied by (carrying TCP connection, stream id). Stream events
   seen in a decrypted capture are carried over to captures of the same TCP connection that could not decrypt
   it, through the TCP sequence number of the packet that carried them.
5. Matching, in order of certainty: the app connection to the stream whose `forwarded: for=` names its client
   (exact); a waypoint's re-originated stream to the stream it serves (addresses, timing, tunnelled request and
   byte counts); the destination ztunnel's connection to the server pod (its server is the stream's
   destination, it starts after the CONNECT and carries the same request and bytes; a different request line
   rules a candidate out, and one seen only under an unconnected clock must agree in content); then the remaining app
   connections by the tunnelled request line, byte counts and timing (`inferred` where nothing was decrypted).
   Without keys (`match_keyless`): client connection -> HBONE connection (-> a waypoint's HBONE connection)
   -> server connection, scored from the plaintext request lines, byte counts, outer addresses and the HBONE
   connection's TLS records in the windows the legs set (keyless.py labels them); confidence from that score and
   the margin over the best alternative, an ambiguous match reported (reason, `keyless_ambiguous` anomaly).
   Each step assigns one to one, best score first.
6. Hops and events (syn, syn_ack, connect, connect_response, first_request_byte, first_response_byte, fin,
   fin_s2c) with the time at each end of the hop, raw and corrected; latency per hop and event.

Eras: A/B (Geneve redirection, spoofed HBONE sources in era B) and C (in-pod: the REDIRECT to 127.0.0.1:15001
seen on the pod's lo is undone in `legs.py`; captures named after one pod share its clock).

Pure: no I/O; the only inputs are the Analysis tables and `a.details`.
Keyless HBONE hop events (`_keyless_events`) are TLS records assigned to the flows' events by minimum cost within
windows bounded on both sides by the plain legs (sizes, labels, order), with stream ids counted from the CONNECTs;
an event that could swap records with another flow's is said to be ambiguous in the flow's reasons.

Limits: double HBONE (nested tunnels) is shown through its outer stream only; keyless HBONE hop times are those of
inferred records (a proxy that coalesces or splits writes differently from the plain legs blurs the DATA sizes);
clock drift is estimated, not corrected; a
pod capture whose own address ties with its only peer's is resolved by subnet closeness to a ztunnel's address.
"""
from __future__ import annotations

import bisect
import ipaddress
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hbonecap import tables
from hbonecap.analysis.keyless import data_payload, infer_records
from hbonecap.analysis.clock import (GroupOffset, datagram_deltas, packet_class, packet_deltas, pair_estimates,
                                    solve_offsets)
from hbonecap.analysis.cluster import first_writes, tcp_of, tcp_where
from hbonecap.analysis.inputs import correlation_address_counts, correlation_datagrams, correlation_legs
from hbonecap.analysis.legs import Legs, leg_state

HOST_RE = re.compile(r"(?:^|[-_.])((?:node|ztunnel|pod|waypoint|worker)[-_]?[a-z0-9]*)(?=[-_.]|$)")
IFACE_RE = re.compile(r"(eth|ens|enp|eno|veth|br|bond|wlan)\w*|any|lo|p?istio(in|out)|cni\w*|geneve\w*|vxlan\w*")
LOCAL_ROLES = {"ztunnel", "istioout", "istioin", "pistioout", "pistioin", "loopback"}
OWNER_ROLES = {"pod", "ztunnel", "waypoint", "loopback"}
MS = 1e6
TOL = 1_000_000            # 1 ms: timing tolerance for "after" constraints
WINDOW = 30 * 10**9        # a downstream connection starts within 30 s of the upstream one
MAX_CANDIDATES = 200       # nearest earlier client connections considered per stream when inferring
KEYLESS_TOL = 50_000       # 50 us: a TLS record follows the plain-leg event it carries (clock error allowance)
SIZE_WINDOW = 20_000_000   # a DATA record of the expected size is preferred to earlier ones within 20 ms
FIRST_WRITES = 8           # running totals of a leg's first data segments a first DATA frame may carry
KEYLESS_OPTIONS = 64       # candidate records per keyless event (bounded work on long-lived pooled connections)
CAUSAL_MIN = 3              # server connections needed to bracket a clock from causality
CAUSAL_TRIM = 0.05          # share of the tightest causal bounds set aside each side (event time errors)
AMBIGUOUS_MARGIN = 1.0     # a keyless match less than this score above its best alternative is ambiguous

# keyless events: (class, direction) -> (record kinds that can carry it, the kind expected)
KEYLESS_KINDS = {("open", 0): ({"headers", "data", "control"}, "headers"),
                 ("open", 1): ({"response", "data", "control"}, "response"),
                 ("data", 0): ({"data", "headers"}, "data"), ("data", 1): ({"data", "response"}, "data"),
                 ("end", 0): ({"end_stream", "control"}, "end_stream"),
                 ("end", 1): ({"end_stream", "control"}, "end_stream")}
# TCP leg events: (legs column, event name, direction 0 = client to server)
TCP_EVENTS = (("syn", "syn", 0), ("syn_ack", "syn_ack", 1), ("data_c2s", "first_request_byte", 0),
              ("data_s2c", "first_response_byte", 1), ("fin_c2s", "fin", 0), ("fin_s2c", "fin_s2c", 1))
# HBONE stream events: (streams column, event name, direction; None: found from the carrying packet)
STREAM_EVENTS = (("request_ts", "connect", 0), ("response_ts", "connect_response", 1),
                 ("first_data_c2s_ts", "first_request_byte", 0), ("first_data_s2c_ts", "first_response_byte", 1),
                 ("end_ts", "fin", None))


NAT_NS = np.iinfo(np.int64).min             # NaT as integer nanoseconds


def correlate(a) -> dict[str, pd.DataFrame]:
    """Flows, hops, clock, latency and extra anomalies for an `Analysis` (keys of the returned dict)."""
    return _Correlator(a).run()


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Stream:
    key: tuple[int, int]                     # (tunnel lconn, stream id)
    stream_id: int
    lconn: int
    client: str                              # tunnel TCP client ip:port
    server: str
    rows: dict[str, dict] = field(default_factory=dict)        # capture -> streams row
    times: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))   # event -> {capture: ns}
    fin_dir: int | None = None
    tunnel_ids: dict[str, str] = field(default_factory=dict)   # capture -> tunnel id
    request: tuple | None = None             # (method, path) of the tunnelled HTTP/1 request
    host: str | None = None

    def info(self, col):
        for r in self.rows.values():
            v = r.get(col)
            if v is not None and not (isinstance(v, float) and np.isnan(v)) and v is not pd.NA and v is not pd.NaT:
                return v
        return None


@dataclass
class _Flow:
    app: int | None = None                   # lconn of the client's connection
    streams: list = field(default_factory=list)
    delivery: int | None = None              # lconn of the destination ztunnel's connection to the server
    tunnel: int | None = None                # lconn of an HBONE connection tied without keys (no stream seen)
    tunnel2: int | None = None               # keyless too: the HBONE connection a waypoint re-originated
    match: str = "exact"
    confidence: float = 1.0
    reasons: list = field(default_factory=list)


@dataclass
class _KeylessCandidate:
    """Client connection a -> HBONE connection t (-> t2, a waypoint's) -> server connection d, without keys."""

    a: int
    t: int
    t2: int | None
    d: int
    score: float
    dt: int                                  # d's first packet after a's (ns)
    why: list


class _Correlator:
    def __init__(self, a) -> None:
        self.a = a
        self._tcp_by_lconn = None
        self.anoms: list[dict] = []

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, pd.DataFrame]:
        a = self.a
        self.L: Legs = correlation_legs(a)
        self.caps = self.L.captures
        self.cap_index = {c: i for i, c in enumerate(self.caps)}
        ci = a.captures.set_index("capture") if len(a.captures) else pd.DataFrame(columns=["role", "node"])
        self.role = {c: (str(ci.at[c, "role"]) if c in ci.index and pd.notna(ci.at[c, "role"]) else "unknown")
                     for c in self.caps}
        self.node = {c: (str(ci.at[c, "node"]) if c in ci.index and pd.notna(ci.at[c, "node"]) else None)
                     for c in self.caps}
        self.node_reason = {c: ("capture point" if self.node[c] else "") for c in self.caps}
        self.owner = self._owner_ips()
        self._place_nodes()
        before = len(self.anoms)
        self._clock()
        if self._place_by_direction():      # new members of a node's clock group: estimate the clocks again
            del self.anoms[before:]
            self._clock()
        self.legs = self.L.legs.set_index("leg")
        self.leg_recs: dict[int, list[dict]] = defaultdict(list)
        for rec in self.L.legs.to_dict("records"):
            self.leg_recs[int(rec["lconn"])].append(rec)
        self.lc = self.L.lconns.set_index("lconn")
        self.lcd: dict[int, dict] = {int(r["lconn"]): r for r in self.L.lconns.to_dict("records")}
        self._leg_times()
        self._streams()
        before = len(self.anoms)
        flows = self._match()
        if self._causal_clocks(flows):      # times of those captures changed: match again with them
            del self.anoms[before:]
            self._leg_times()
            flows = self._match()
        self._flow_pos = {id(f): i for i, f in enumerate(flows)}
        self._keyless_events(flows)
        return self._tables(flows)

    # --- capture points ----------------------------------------------------------------------------------------
    def _owner_ips(self) -> dict[str, str]:
        counts, od = correlation_address_counts(self.a)
        if counts.empty:
            return {}
        owners: dict[str, str] = {}
        # a ztunnel (eras A/B) receives Istio's Geneve packets (VNI 1000/1001) from the node: its address is
        # their outer destination (its replies leave as plain IP, which makes other counts misleading)
        for cap, g in od.groupby("capture"):
            if self.role.get(cap) == "ztunnel":
                owners[cap] = g.sort_values(["n", "ip"], ascending=[False, True], kind="stable")["ip"].iloc[0]
        # proxies first (their address is in nearly every packet), then pods: on a pod capture the peer is in
        # as many packets as the pod itself, so near-ties go to the address that is not another point's, whose
        # packets left with an initial TTL (not routed: sent from this host; a peer's mostly arrive with less),
        # that shares the longest prefix with a proxy's (the node's pod subnet), not a Service address
        for kinds in (("ztunnel", "waypoint"), ("pod", "loopback")):
            anchors = [ipaddress.ip_address(v) for v in owners.values() if _is_ip(v)]
            for cap, g in counts.groupby("capture"):
                if self.role.get(cap) not in kinds or cap in owners:
                    continue
                top = g["n"].max()
                near = g[g["n"] >= 0.9 * top]
                cands = [ip for ip in near["ip"] if ip not in owners.values()] or list(near["ip"])

                def closeness(ip: str) -> int:
                    if not _is_ip(ip) or not anchors:
                        return 0
                    x = ipaddress.ip_address(ip)
                    return max((x.max_prefixlen - (int(x) ^ int(y)).bit_length() for y in anchors
                                if y.version == x.version), default=0)

                def routed(ip: str) -> bool:
                    """Most of its packets here crossed a router (TTL below every initial value)."""
                    row = g.loc[g["ip"] == ip]
                    if "sent" not in row or not len(row):
                        return False
                    sent, initial = int(row["sent"].iloc[0]), int(row["initial_ttl"].iloc[0])
                    return sent > 0 and initial < sent / 2

                def evidence(ip: str) -> tuple:
                    return routed(ip), -closeness(ip)

                cands.sort(key=lambda ip: evidence(ip) + (-int(g.loc[g["ip"] == ip, "n"].iloc[0]),))
                owners[cap] = cands[0]
                tied = [ip for ip in cands[1:] if evidence(ip) == evidence(cands[0])]
                if tied and self.role.get(cap) != "loopback":
                    self._anom(cap, "capture_owner_ambiguous",
                               f"{cap}: its own address is {cands[0]} or {', '.join(tied)} (each in about as many "
                               f"packets; no TTL or subnet evidence tells them apart): took {cands[0]}; a capture-point "
                               f"manifest (-m) still gives the capture its node and clock")
        return owners

    def _place_nodes(self) -> None:
        known = {c: n for c, n in self.node.items() if n}
        anchors = [(c, n, self.owner[c]) for c, n in known.items() if c in self.owner]
        for c in self.caps:
            if self.node[c] or c not in self.owner:
                continue
            try:
                ip = ipaddress.ip_address(self.owner[c])
            except ValueError:
                continue
            best: dict[str, tuple[int, str]] = {}
            for ac, an, aip in anchors:
                try:
                    other = ipaddress.ip_address(aip)
                except ValueError:
                    continue
                if other.version != ip.version:
                    continue
                bits = ip.max_prefixlen - (int(ip) ^ int(other)).bit_length()
                if bits > best.get(an, (-1, ""))[0]:
                    best[an] = (bits, ac)
            ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
            if ranked and ranked[0][1][0] >= 16 and (len(ranked) == 1 or ranked[0][1][0] > ranked[1][1][0]):
                n, (bits, ac) = ranked[0]
                self.node[c] = n
                self.node_reason[c] = f"address {self.owner[c]} shares a /{bits} with {ac} ({self.owner[ac]})"
        # traffic: connections shared with local captures of a known node and not seen crossing the underlay
        L = self.L
        lg = L.legs
        for c in self.caps:
            if self.node[c]:
                continue
            mine = set(lg.loc[lg["capture"] == c, "lconn"])
            votes: dict[str, int] = defaultdict(int)
            for lc_id, g in lg[lg["lconn"].isin(mine)].groupby("lconn"):
                others = [x for x in g["capture"] if x != c]
                if any(self.role.get(x) == "node" for x in others):
                    continue
                for x in others:
                    if self.role.get(x) in LOCAL_ROLES and self.node.get(x):
                        votes[self.node[x]] += 1
            if votes:
                ranked = sorted(votes.items(), key=lambda kv: -kv[1])
                if len(ranked) == 1 or ranked[0][1] > ranked[1][1]:
                    self.node[c] = ranked[0][0]
                    self.node_reason[c] = f"shares {ranked[0][1]} connection(s) with local captures of {ranked[0][0]}"

    def _place_by_direction(self) -> bool:
        """Place a capture still without a node by its own address and the underlay: connections seen at two
        nodes' captures travel one way first (the clock pair's orientation: client-to-server packets reach the
        second node one link delay after the first, whatever the offset), so an address that is the server of
        connections going from node X to node Y lives on Y's side, a client on X's. Two thirds of the votes
        needed. Loopback captures do not vote (their peers' addresses may be spoofed: era C delivers with the
        client's source) but follow a capture of the same pod (pod-b-lo with pod-b-eth0). True if some capture was
        placed."""
        nodes = {n for n in self.node.values() if n}
        unplaced: dict[str, list[str]] = defaultdict(list)
        for c in self.caps:
            if not self.node[c] and c in self.owner and self.role.get(c) in ("pod", "ztunnel", "waypoint"):
                unplaced[self.owner[c]].append(c)
        if not unplaced or len(nodes) < 2:
            return False
        lc = self.L.lconns
        ends = {int(l): (ci, si) for l, ci, si in zip(lc["lconn"], lc["client_ip"], lc["server_ip"])}
        votes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        seen_by: dict[tuple[str, str], tuple[str, str]] = {}
        for p in self.pairs:
            if p.a not in nodes or p.b not in nodes or p.inconsistent:
                continue
            for l, fwd in p.forward.items():       # fwd: the direction whose packets travel from a to b
                if l not in ends:
                    continue
                ci, si = ends[l]
                for ip, side in ((ci, p.a if fwd == 0 else p.b), (si, p.b if fwd == 0 else p.a)):
                    if ip in unplaced:
                        votes[ip][side] += 1
                        seen_by[(ip, side)] = p.captures
        placed = False
        for ip, v in votes.items():
            node, n = max(v.items(), key=lambda kv: (kv[1], kv[0]))
            if 3 * n < 2 * sum(v.values()):
                continue
            ca, cb = seen_by[(ip, node)]
            for c in unplaced[ip]:
                self.node[c] = node
                self.node_reason[c] = (f"address {ip} is on {node}'s side of {n} connection(s) that crossed "
                                       f"between nodes ({ca}, {cb})")
                placed = True
                host = self._host_group(c)
                for x in self.caps:
                    if not self.node[x] and x != c and host != c and self._host_group(x) == host:
                        self.node[x] = node
                        self.node_reason[x] = f"one pod with {c} (placed on {node})"
        return placed

    # --- clocks ------------------------------------------------------------------------------------------------
    def _clock(self) -> None:
        # a capture without a node shares the clock of the captures named after the same host (pod-a-eth0 and
        # pod-a-lo are one pod's network namespace: one kernel, one clock)
        self.group = {c: (self.node[c] or self._host_group(c)) for c in self.caps}
        groups = sorted(set(self.group.values()))
        nodes = sorted({n for n in self.node.values() if n})
        if nodes:
            self.reference = nodes[0]
        elif groups:
            counts = self.L.legs.groupby("capture").size()
            self.reference = self.group[counts.idxmax()] if len(counts) else groups[0]
        else:
            self.reference = ""
        gmap = {i: self.group[c] for i, c in enumerate(self.caps)}
        deltas = packet_deltas(self.L, gmap) if self.caps else pd.DataFrame()
        # captures with no TCP in common may still share other IPv4 packets (UDP, ICMP)
        all_caps = list(dict.fromkeys(list(self.caps) + [str(c) for c in self.a.captures["capture"]]))
        for c in all_caps:
            self.group.setdefault(c, self.node.get(c) or self._host_group(c))
        groups = sorted(set(self.group.values()))
        dg = datagram_deltas(correlation_datagrams(self.a), all_caps, {i: self.group[c] for i, c in enumerate(all_caps)})
        self.pairs = pair_estimates(deltas) if len(deltas) else []
        if len(dg):   # only for pairs of clocks that share no TCP connection: TCP matching is unambiguous
            have = {(p.a, p.b) for p in self.pairs}
            dg = dg[[(x, y) not in have for x, y in zip(dg["ga"], dg["gb"])]]
            if len(dg):
                self.pairs += pair_estimates(dg)
        self.offsets = solve_offsets(groups, self.reference, self.pairs) if groups else {}
        for p in self.pairs:
            if p.inconsistent:
                self._anom(p.captures[1], "clock_inconsistent",
                           f"offset bracket between {p.a} and {p.b} is inverted or one-sided "
                           f"(estimate {p.theta_ns / MS:.3f} ms +- {p.uncertainty_ns / MS:.3f} ms)")
        for g, o in self.offsets.items():
            if o.via == "unconnected":
                self._anom(g, "clock_unconnected", f"clock group {g} shares no packet with the reference "
                                                   f"({self.reference}) through any chain: times left uncorrected")
        self._capture_offsets()

    def _capture_offsets(self) -> None:
        """Each capture's offset (`off`, int ns, 0 when unknown) from its clock group's."""
        self.off = {}
        for c in self.caps:
            o = self.offsets.get(self.group[c])
            self.off[c] = int(round(o.offset_ns)) if o is not None and np.isfinite(o.offset_ns) else 0

    def _causal_clocks(self, flows: list[_Flow]) -> bool:
        """An offset for each clock group that shares no packet with the reference, from causality: the
        destination ztunnel opens its connection to the server after the CONNECT reached it and before it answers,
        so each server connection seen by such a group (first c2s packet at raw time r) tied to a stream whose
        CONNECT was first seen at t0 and its response at t1 (reference time) brackets the offset in
        [r - t1, r - t0]. The brackets of all tied connections are intersected, less the tightest 5% of bounds
        each side (a stream event time carried by a record that other streams' bytes share can be off by a link
        delay); an empty intersection (wrong ties, or a proxy that answers before it connects) leaves the group
        uncorrected, with an anomaly. True if some group got an offset."""
        unclocked = {g for g, o in self.offsets.items() if o.via == "unconnected"}
        if not unclocked:
            return False
        lo: dict[str, list[int]] = defaultdict(list)
        hi: dict[str, list[int]] = defaultdict(list)
        for f in flows:
            if f.delivery is None or not f.streams:
                continue
            t0 = self.stream_time(f.streams[-1], "connect")
            t1 = self.stream_time(f.streams[-1], "connect_response")
            if t0 is None or t1 is None or t1 < t0:
                continue
            for r in self.leg_recs.get(f.delivery, []):
                g = self.group.get(r["capture"])
                if g in unclocked and r["first_c2s"] >= 0:
                    lo[g].append(int(r["first_c2s"]) - t1)
                    hi[g].append(int(r["first_c2s"]) - t0)
        changed = False
        for g in sorted(lo):
            n = len(lo[g])
            k = int(CAUSAL_TRIM * n)
            a, b = sorted(lo[g])[n - 1 - k], sorted(hi[g])[k]
            if n < CAUSAL_MIN or a > b:
                detail = (f"only {n} server connection(s) tied to a stream" if n < CAUSAL_MIN else
                          f"the brackets of {n} server connection(s) do not intersect "
                          f"({a / MS:.3f} ms > {b / MS:.3f} ms)")
                self._anom(g, "clock_causal_failed", f"clock group {g}: no offset from causality: {detail}")
                continue
            self.offsets[g] = GroupOffset(
                g, (a + b) / 2, (b - a) / 2, "causal", connections=n, method=(
                    f"causal: {n} server connection(s) opened between their stream's CONNECT and its response "
                    f"bracket the offset to [{a / MS:.3f}, {b / MS:.3f}] ms"
                    + (f" (the {k} tightest bound(s) each side set aside)" if k else "")
                    + "; no packet shared with another clock"))
            self.anoms = [x for x in self.anoms if not (x["kind"] == "clock_unconnected" and x["capture"] == g)]
            changed = True
        if changed:
            self._capture_offsets()
        return changed

    def _host_group(self, cap: str) -> str:
        label = self._label_of_capture(cap)
        same = [c for c in list(self.caps) + [str(x) for x in self.a.captures["capture"]]
                if self._label_of_capture(c) == label]
        return label if HOST_RE.search(label) and len(set(same)) > 1 else cap

    def corr(self, cap: str, ts: int | None) -> int | None:
        if ts is None or ts < 0:
            return None
        return int(ts) - self.off.get(cap, 0)

    # --- streams -----------------------------------------------------------------------------------------------
    def _lconn_of(self, capture: str, client: str, server: str, t: int | None) -> int | None:
        if not hasattr(self, "_by_pair"):
            self._by_pair: dict[frozenset, list[int]] = defaultdict(list)
            for l, c, sv in zip(self.L.lconns["lconn"], self.L.lconns["client"], self.L.lconns["server"]):
                self._by_pair[frozenset((c, sv))].append(int(l))
        best = None
        for l in self._by_pair.get(frozenset((client, server)), []):
            for r in self.leg_recs.get(l, []):
                if r["capture"] != capture:
                    continue
                if best is None or (t is not None and r["first_ts"] <= t <= r["last_ts"]):
                    best = l
        return best

    def _streams(self) -> None:
        a = self.a
        self.streams: dict[tuple[int, int], _Stream] = {}
        self.tunnel_lconns: set[int] = set()
        self.tunnel_timelines: dict[int, list[tuple[str, str]]] = defaultdict(list)   # lconn -> (capture, tunnel)
        tun = a.tunnels
        tkey = {}
        for r in tun.itertuples(index=False):
            if pd.notna(r.depth) and int(r.depth) > 0:
                continue
            t = int(pd.Timestamp(r.start).value) if pd.notna(r.start) else None
            lc = self._lconn_of(r.capture, r.client, r.server, t)
            if lc is not None:
                tkey[(r.capture, r.tunnel_id)] = (lc, r.client, r.server)
                self.tunnel_lconns.add(lc)
                self.tunnel_timelines[lc].append((r.capture, r.tunnel_id))
        reqs = a.requests
        inner = {}
        for r in reqs.itertuples(index=False):
            if pd.notna(r.tunnel_id) and pd.notna(r.stream_id):
                inner.setdefault((r.capture, r.tunnel_id, int(r.stream_id)), (r.method, r.path, r.host))
        st = a.streams
        # times as integer ns (None: not seen) instead of one Timestamp object per cell
        ts_cols = [col for col in st.columns if st[col].dtype.kind == "M"]
        ts_ns = {col: [None if v == NAT_NS else v for v in st[col].dt.as_unit("ns").array.asi8.tolist()]
                 for col in ts_cols}
        records = st.drop(columns=ts_cols).to_dict("records")
        for col, vals in ts_ns.items():
            for row, v in zip(records, vals):
                row[col] = v
        for row in records:
            k = tkey.get((row["capture"], row["tunnel_id"]))
            if k is None or pd.isna(row["stream_id"]):
                continue
            lc, client, server = k
            sid = int(row["stream_id"])
            key = (lc, sid)
            s = self.streams.get(key)
            if s is None:
                s = self.streams[key] = _Stream(key, sid, lc, client, server)
            cap = row["capture"]
            s.rows[cap] = row
            s.tunnel_ids[cap] = row["tunnel_id"]
            reliable_end = str(row.get("end_reason") or "").startswith(("end_stream", "rst_stream"))
            for col, ev, _ in STREAM_EVENTS:
                v = row.get(col)
                if col == "end_ts" and not reliable_end:
                    continue
                if v is not None:
                    s.times[ev][cap] = v
            q = inner.get((cap, row["tunnel_id"], sid))
            if q is not None and s.request is None:
                s.request, s.host = (q[0], q[1]), q[2]
        for lc in self.tunnel_lconns:
            pass
        self._translate_stream_times()
        # tunnel lconns also include HBONE connections without a decrypted stream (port heuristic)
        hb = self.L.lconns[self.L.lconns["server_port"] == 15008]["lconn"]
        self.tunnel_lconns |= set(int(x) for x in hb)

    def _translate_stream_times(self) -> None:
        """Carry stream events to captures of the same TCP connection that did not decrypt it, via the TCP
        packet that carried each event (same direction, seq, ack, TCP timestamp)."""
        if not self.streams:
            return
        rows = []
        evs = []
        for si, s in enumerate(self.streams.values()):
            for ei, (col, ev, d) in enumerate(STREAM_EVENTS):
                for cap, ts in s.times[ev].items():
                    rows.append((si, ei, self.cap_index[cap], s.lconn, ts))
            evs.append(s)
        if not rows:
            return
        e = pd.DataFrame(rows, columns=["si", "ei", "cap", "lconn", "ts"])
        key = ["lconn", "dir", "seq", "ack", "tsval", "fl"]
        lconns = e["lconn"].unique()
        # only packets that can join: those at the events' times, then those carrying the same segments (the
        # first sight of each per capture, as over all the connections' packets)
        at = tcp_where(self.L, lconns, "ts", e["ts"].unique())
        at = at.assign(fl=packet_class(at["flags"], at["plen"]))
        first = at.sort_values("ts", kind="stable").drop_duplicates(["cap", "lconn", "ts"], keep="first")
        m = e.merge(first[["cap", "lconn", "ts"] + key[1:]], on=["cap", "lconn", "ts"], how="inner")
        same = tcp_where(self.L, lconns, "seq", m["seq"].unique())
        same = same.assign(fl=packet_class(same["flags"], same["plen"]))
        firstocc = same.sort_values("ts", kind="stable").drop_duplicates(["cap"] + key, keep="first")
        m2 = m.drop(columns=["cap", "ts"]).merge(firstocc[["cap", "ts"] + key], on=key, how="inner")
        for r in m.drop_duplicates(["si", "ei"]).itertuples(index=False):
            s = evs[r.si]
            if STREAM_EVENTS[r.ei][1] == "fin":
                s.fin_dir = int(r.dir)
        for r in m2.itertuples(index=False):
            s = evs[r.si]
            ev = STREAM_EVENTS[r.ei][1]
            cap = self.caps[r.cap]
            # a capture on several interfaces sees the packet more than once: its first sight counts
            if cap not in s.times[ev] or int(r.ts) < s.times[ev][cap]:
                s.times[ev][cap] = int(r.ts)

    # --- times -------------------------------------------------------------------------------------------------
    def _leg_times(self) -> None:
        """Earliest corrected time of each TCP event per logical connection, over its captures (vectorised)."""
        lg = self.L.legs
        self._lt: dict[str, dict[int, int]] = {}
        self._lt_last: dict[int, int] = {}
        if lg.empty:
            return
        off = lg["capture"].map(self.off).fillna(0).to_numpy(np.int64)
        for col in ("first_ts", "syn", "syn_ack", "data_c2s", "data_s2c", "fin_c2s", "fin_s2c", "first_c2s",
                    "first_s2c"):
            v = lg[col].to_numpy(np.int64)
            corr = np.where(v >= 0, v - off, np.iinfo(np.int64).max)
            mins = pd.Series(corr).groupby(lg["lconn"].to_numpy()).min()
            mins = mins[mins < np.iinfo(np.int64).max]
            self._lt[col] = {int(k): int(x) for k, x in mins.items()}
        last = pd.Series(lg["last_ts"].to_numpy(np.int64) - off).groupby(lg["lconn"].to_numpy()).max()
        self._lt_last = {int(k): int(x) for k, x in last.items()}

    def leg_time(self, lconn: int, col: str) -> int | None:
        """Earliest corrected time of a TCP event over the captures of a connection."""
        return self._lt.get(col, {}).get(lconn)

    def stream_time(self, s: _Stream, ev: str) -> int | None:
        vals = [self.corr(c, t) for c, t in s.times.get(ev, {}).items()]
        vals = [v for v in vals if v is not None]
        return min(vals) if vals else None

    def leg_bytes(self, lconn: int) -> tuple[int, int]:
        recs = self.leg_recs.get(lconn)
        if not recs:
            return (0, 0)
        return max(int(r["bytes_c2s"]) for r in recs), max(int(r["bytes_s2c"]) for r in recs)

    def leg_request(self, lconn: int):
        """(method, path), host of the first plain HTTP/1 request on a connection, any capture."""
        req = self.a.requests
        if not hasattr(self, "_plain_req"):
            self._plain_req = {}
            lc = self.L.lconns
            # several logical connections may share endpoints (a reused source port): the one whose leg in the
            # request's capture spans the request's time
            key: dict[tuple, list[int]] = defaultdict(list)
            for l, c, s in zip(lc["lconn"], lc["client"], lc["server"]):
                key[(c, s)].append(int(l))
            cn = self.a.connections
            ends = {int(i): (c, s) for i, c, s in zip(cn["conn_id"], cn["client"].astype(object),
                                                      cn["server"].astype(object))} if len(cn) else {}
            for r in req.itertuples(index=False):
                if pd.notna(r.tunnel_id) or pd.isna(r.conn_id) or int(r.conn_id) not in ends:
                    continue
                c, s = ends[int(r.conn_id)]
                ls = key.get((c, s)) or key.get((s, c)) or []
                l = ls[0] if len(ls) == 1 else self._lconn_at(ls, r.capture, r.request_ts)
                if l is not None and l not in self._plain_req:
                    self._plain_req[l] = ((r.method, r.path), r.host)
        return self._plain_req.get(lconn, (None, None))

    def _lconn_at(self, lconns: list[int], capture, ts) -> int | None:
        """Of logical connections with the same endpoints, the one whose leg at `capture` spans `ts` (else the
        one whose leg there starts last before it, else the first)."""
        if not lconns:
            return None
        t = int(pd.Timestamp(ts).value) if ts is not None and pd.notna(ts) else None
        best, best_start = None, None
        for l in lconns:
            for r in self.leg_recs.get(l, []):
                if r["capture"] != capture or t is None:
                    continue
                if r["first_ts"] <= t <= r["last_ts"]:
                    return l
                if r["first_ts"] <= t and (best_start is None or r["first_ts"] > best_start):
                    best, best_start = l, r["first_ts"]
        return best if best is not None else lconns[0]

    # --- matching ----------------------------------------------------------------------------------------------
    def _match(self) -> list[_Flow]:
        lcs = self.L.lconns
        plain = [int(l) for l in lcs["lconn"] if int(l) not in self.tunnel_lconns]
        streams = list(self.streams.values())
        used_plain: set[int] = set()
        app_of: dict[tuple, tuple[int, str, float]] = {}
        # 1. exact: forwarded for= names the app's client
        by_client = defaultdict(list)
        for l in plain:
            by_client[self.lcd[l]["client"]].append(l)
        for s in streams:
            ff = s.info("forwarded_for")
            if not ff:
                continue
            cands = [l for l in by_client.get(ff, []) if l not in used_plain]
            t = self.stream_time(s, "connect")
            if len(cands) > 1 and t is not None:
                cands.sort(key=lambda l: abs((self.leg_time(l, "first_c2s") or t) - t))
            if cands:
                app_of[s.key] = (cands[0], "forwarded", 1.0)
                used_plain.add(cands[0])
        # 2. waypoint: a stream re-originated by the server of another stream
        next_stream: dict[tuple, _Stream] = {}
        prev_stream: dict[tuple, _Stream] = {}
        pairs = []
        by_client_ip: dict[str, list[_Stream]] = defaultdict(list)    # (streams order kept within each list)
        for s2 in streams:
            by_client_ip[s2.client.rsplit(":", 1)[0]].append(s2)
        for s1 in streams:
            sip = s1.server.rsplit(":", 1)[0]
            t1 = self.stream_time(s1, "connect")
            r1 = self.stream_time(s1, "connect_response")
            for s2 in by_client_ip.get(sip, ()):
                if s2 is s1 or s2.lconn == s1.lconn:
                    continue
                t2 = self.stream_time(s2, "connect")
                if t1 is None or t2 is None or t2 < t1 - TOL or t2 > t1 + WINDOW:
                    continue
                if r1 is not None and t2 > r1 + TOL and (s1.info("status") or 0) >= 200:
                    # the waypoint answers after its upstream connect: the new stream precedes the response
                    pass
                score = self._content_score(s1.request, s1.host, self._sbytes(s1), s2.request, s2.host,
                                            self._sbytes(s2))
                pairs.append((score, abs(t2 - t1), s1.key, s2.key))
        for score, dt, k1, k2 in sorted(pairs, key=lambda x: (-x[0], x[1])):
            if k1 in next_stream or k2 in prev_stream:
                continue
            next_stream[k1] = self.streams[k2]
            prev_stream[k2] = self.streams[k1]
        # 3. delivery: the last stream's destination ztunnel connects to the server
        deliv: dict[tuple, tuple[int, float]] = {}
        cand = []
        by_server = defaultdict(list)
        for l in plain:
            if l not in used_plain:
                by_server[self.lcd[l]["server"]].append(l)
        # per server: its connections with a first c2s time, sorted by it (position in by_server kept to visit
        # the window's candidates in the same order as a full scan would). A connection seen only by captures
        # whose clock shares nothing with the reference has no comparable time: it is looked up by its byte
        # counts instead and must agree in content (request line and two of host and byte counts)
        unclocked = self._unclocked_captures()
        timed: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        by_bytes: dict[tuple, list[int]] = defaultdict(list)
        for d, ls in by_server.items():
            rows = []
            for i, l in enumerate(ls):
                syn = self.leg_time(l, "first_c2s")
                if syn is None:
                    continue
                if unclocked and all(c in unclocked for c in self._caps_of(l)):
                    b = self.leg_bytes(l)
                    for k, n in enumerate(b):
                        if n > 0:
                            by_bytes[(d, k, n)].append(l)
                else:
                    rows.append((syn, i, l))
            rows.sort()
            timed[d] = ([r[0] for r in rows], [(r[1], r[2]) for r in rows])
        for s in streams:
            if s.key in next_stream:
                continue
            dsts = {x for x in (s.info("original_dst"), s.info("authority")) if x}
            t = self.stream_time(s, "connect")
            if t is None:
                continue
            resp = self.stream_time(s, "connect_response")
            hi_t = t + WINDOW if resp is None else min(t + WINDOW, resp + TOL)
            sb = self._sbytes(s)
            for d in dsts:
                syns, ids = timed.get(d, ([], []))
                window = sorted(ids[bisect.bisect_left(syns, t - TOL):bisect.bisect_right(syns, hi_t)])
                for _, l in window:
                    syn = self.leg_time(l, "first_c2s")
                    req, host = self.leg_request(l)
                    if self._requests_conflict(s.request, req):
                        continue
                    score = self._content_score(s.request, s.host, sb, req, host, self.leg_bytes(l))
                    cand.append((score, syn - t, s.key, l))
                for l in dict.fromkeys(by_bytes.get((d, 0, sb[0]), []) + by_bytes.get((d, 1, sb[1]), [])):
                    syn = self.leg_time(l, "first_c2s")
                    req, host = self.leg_request(l)
                    if abs(syn - t) > WINDOW or self._requests_conflict(s.request, req):
                        continue
                    score = self._content_score(s.request, s.host, sb, req, host, self.leg_bytes(l))
                    if score >= 4:
                        cand.append((score, abs(syn - t), s.key, l))
        taken: set[int] = set()
        for score, dt, k, l in sorted(cand, key=lambda x: (-x[0], x[1])):
            if k in deliv or l in taken:
                continue
            deliv[k] = (l, score)
            taken.add(l)
        used_plain |= taken
        # 4. inferred app connections for chain heads without one: candidates started before the CONNECT
        heads = [s for s in streams if s.key not in prev_stream]
        cand = []
        starts = sorted((self.leg_time(l, "first_c2s"), l) for l in plain
                        if l not in used_plain and self.lcd[l]["server_port"] != 15008
                        and self.leg_time(l, "first_c2s") is not None)
        start_ts = [x[0] for x in starts]
        for s in heads:
            if s.key in app_of:
                continue
            t = self.stream_time(s, "connect")
            if t is None:
                continue
            chain = self._chain(s, next_stream)
            dsts = {x for st in chain for x in (st.info("authority"), st.info("original_dst")) if x}
            hi = bisect.bisect_right(start_ts, t + TOL)
            lo = max(bisect.bisect_left(start_ts, t - WINDOW), hi - MAX_CANDIDATES)
            for syn, l in starts[lo:hi]:
                if l in used_plain:
                    continue
                req, host = self.leg_request(l)
                score = self._content_score(req, host, self.leg_bytes(l), s.request, s.host, self._sbytes(s))
                if self.lcd[l]["server"] in dsts or (s.host and s.host == self.lcd[l]["server"]):
                    score += 1
                cand.append((score, t - syn, s.key, l))
        for score, dt, k, l in sorted(cand, key=lambda x: (-x[0], x[1])):
            if k in app_of or l in used_plain:
                continue
            app_of[k] = (l, "content" if score >= 3 else "timing", min(0.95, 0.5 + 0.1 * score))
            used_plain.add(l)
        # assemble flows
        flows: list[_Flow] = []
        def ip_of(ipport):
            return ipport.rsplit(":", 1)[0].strip("[]") if ipport else None

        def client_side_captured(s: _Stream) -> bool:
            """Some capture would have seen the client's connection: the HBONE client's own (its ztunnel, or the
            waypoint), or a pod / outbound-tunnel capture on its node."""
            zc = self._owner_capture(ip_of(s.client))
            if zc is not None:
                return True
            fc = self._owner_capture(ip_of(s.info("forwarded_for")))
            return fc is not None

        def server_side_captured(s: _Stream) -> bool:
            """Some capture would have seen the server connection: the destination pod's, or a ztunnel capture
            that saw this HBONE connection away from its client's node."""
            if self._owner_capture(ip_of(s.info("original_dst") or s.info("authority"))) is not None:
                return True
            cnode = self.node.get(self._owner_capture(ip_of(s.client)) or "")
            return any(self.role.get(c) == "ztunnel" and (cnode is None or self.node.get(c) != cnode)
                       for c in self._caps_of(s.lconn))

        for s in heads:
            f = _Flow()
            chain = self._chain(s, next_stream)
            f.streams = chain
            if s.key in app_of:
                l, how, conf = app_of[s.key]
                f.app = l
                f.reasons.append(how)
                f.confidence = min(f.confidence, conf)
            last = chain[-1]
            if last.key in deliv:
                f.delivery, sc = deliv[last.key]
                f.confidence = min(f.confidence, 1.0 if sc >= 4 else 0.6 + 0.1 * sc)
            if len(chain) > 1:
                f.confidence = min(f.confidence, 0.95)
            decrypted = all(st.rows for st in chain)
            exact = decrypted and (f.app is None or app_of[s.key][1] in ("forwarded", "content"))
            f.match = "exact" if exact else "inferred"
            if not exact:
                f.confidence = min(f.confidence, 0.7)
            flows.append(f)
            where = next(iter(s.rows), "")
            desc = f"stream {s.stream_id} of {s.client} > {s.server}"
            if f.app is None and client_side_captured(s):
                ff = s.info("forwarded_for")
                self._anom(where, "correlation_no_client_connection",
                           f"{desc}{f' (for={ff})' if ff else ''}: no client connection found in the captures")
            status = last.info("status")
            if f.delivery is None and server_side_captured(last) and status is not None and 200 <= int(status) < 300:
                self._anom(next(iter(last.rows), ""), "correlation_no_server_connection",
                           f"stream {last.stream_id} of {last.client} > {last.server} to "
                           f"{last.info('original_dst') or last.info('authority')} answered {int(status)}, "
                           f"but no server connection was found in the captures")
        # 5. without keys: client connection -> HBONE connection -> server connection, by timing and content
        streamed = {st.lconn for st in streams}
        for a_l, t_l, t2_l, d_l, conf, why, ambiguity in self.match_keyless(
                [l for l in plain if l not in used_plain], sorted(self.tunnel_lconns - streamed)):
            used_plain |= {a_l, d_l}
            flows.append(_Flow(app=a_l, delivery=d_l, tunnel=t_l, tunnel2=t2_l, match="inferred", confidence=conf,
                               reasons=list(why)))
            if ambiguity:
                self._anom(self._caps_of(a_l)[0] if self._caps_of(a_l) else "", "keyless_ambiguous",
                           f"{self.lcd[a_l]['client']} > {self.lcd[a_l]['server']} tied without keys to "
                           f"{self.lcd[t_l]['client']} > {self.lcd[t_l]['server']} and "
                           f"{self.lcd[d_l]['client']} > {self.lcd[d_l]['server']} (confidence {conf:g}), "
                           f"{ambiguity}")
        redirected = {"ztunnel", "istioout", "pistioout", "istioin", "pistioin"}
        for l in plain:
            if l in used_plain:
                continue
            flows.append(_Flow(app=l, match="unmatched", confidence=0.0))
            seen = self._caps_of(l)
            if any(self.role.get(c) in redirected for c in seen):
                self._anom(seen[0], "correlation_unmatched_connection",
                           f"{self.lcd[l]['client']} > {self.lcd[l]['server']} reached a ztunnel "
                           f"({', '.join(c for c in seen if self.role.get(c) in redirected)}) but was tied to no "
                           f"HBONE stream or other connection")
        # a flow with no app connection starts at its stream; keep flows in time order
        flows.sort(key=lambda f: self._flow_start(f) or 0)
        return flows

    def match_keyless(self, plain: list[int], tunnels: list[int]) -> list[tuple]:
        """Tie client connections to server connections through an HBONE connection that could not be decrypted.

        Candidates: a client connection A (seen by a ztunnel whose address, or A's own when spoofed, is the HBONE
        client), an HBONE connection T open at the time, and a connection D to T's server address (or, through a
        waypoint, to the server address of an HBONE connection T2 that T's server opened) that starts after A and
        before A ends. Each candidate is scored from its evidence (`_keyless_evidence`: request line, host, bytes
        each way, outer addresses, TLS records of T in the right windows); pairs are assigned one to one, best
        score first. Confidence combines the evidence with the margin over the best alternative that could take
        the same client or server connection instead (another server connection, another client whose own match
        is no better, another HBONE connection): a margin under `AMBIGUOUS_MARGIN` is ambiguous, reported with low
        confidence and the competitor named, never a silent guess.
        Returns (A, T, T2 or None, D, confidence, reasons, ambiguity or None).
        """
        if not tunnels or len(plain) < 2:
            return []
        by_client_ip: dict[str, list[int]] = defaultdict(list)
        for t in tunnels:
            by_client_ip[self.lcd[t]["client_ip"]].append(t)
        by_server_ip: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for d in plain:
            td = self.leg_time(d, "first_c2s")
            if td is not None:
                by_server_ip[self.lcd[d]["server_ip"]].append((td, d))
        for v in by_server_ip.values():
            v.sort()
        server_keys = {ip: [x[0] for x in v] for ip, v in by_server_ip.items()}
        cand: list[_KeylessCandidate] = []
        for a_l in plain:
            ta = self.leg_time(a_l, "first_c2s")
            if ta is None:
                continue
            a_end = self._lt_last.get(a_l)
            src_ips = {self.lcd[a_l]["client_ip"]} | {self.owner[c] for c in self._caps_of(a_l)
                                                          if self.role.get(c) == "ztunnel" and c in self.owner}
            if len(src_ips) == 1:
                # no capture of the client's ztunnel: the HBONE clients placed on the client connection's node
                # (no capture owns them; placed by the pod subnet they share with the node's captured pods)
                src_ips |= self._node_hbone_clients(a_l, by_client_ip)
            for ip in sorted(src_ips):
                for t in by_client_ip.get(ip, []):
                    # no server connection can fall in the window below when T itself opens too late or closed
                    # before A started (a route through a waypoint only narrows it): skip T's routes at once
                    f1, l1 = self.leg_time(t, "first_ts"), self._lt_last.get(t)
                    if f1 is None:
                        continue
                    upper = min(x for x in (ta + WINDOW, None if l1 is None else l1 + TOL,
                                            None if a_end is None else a_end + TOL) if x is not None)
                    if max(ta, f1) - TOL > upper:
                        continue
                    # direct, or through a waypoint: T's server re-originates HBONE (T2) to the destination
                    routes = [(t, None)] + [(t, t2) for t2 in by_client_ip.get(self.lcd[t]["server_ip"], [])
                                            if t2 != t]
                    for t1, t2 in routes:
                        last_t = t2 if t2 is not None else t1
                        spans = [(self.leg_time(x, "first_ts"), self._lt_last.get(x)) for x in (t1, t2) if x is not None]
                        lst = by_server_ip.get(self.lcd[last_t]["server_ip"], [])
                        keys = server_keys.get(self.lcd[last_t]["server_ip"], [])
                        lo = bisect.bisect_left(keys, ta - TOL)
                        hi = min(bisect.bisect_right(keys, ta + WINDOW), lo + MAX_CANDIDATES)
                        if any(f0 is None for f0, _ in spans):
                            continue
                        # within that window, only server connections that open while every HBONE connection of
                        # the route is open and the client is connected (bisected, not scanned)
                        lo = max(lo, bisect.bisect_left(keys, max(f0 for f0, _ in spans) - TOL))
                        ends = [l0 + TOL for _, l0 in spans if l0 is not None] + \
                            ([a_end + TOL] if a_end is not None else [])
                        if ends:
                            hi = min(hi, bisect.bisect_right(keys, min(ends)))
                        for td, d in lst[lo:hi]:
                            if d == a_l:
                                continue
                            score, why = self._keyless_evidence(a_l, t1, t2, d)
                            cand.append(_KeylessCandidate(a_l, t1, t2, d, score, td - ta, why))
        cand.sort(key=lambda c: (-c.score, c.dt, c.a, c.d))
        chosen: dict[int, _KeylessCandidate] = {}
        by_d: dict[int, _KeylessCandidate] = {}
        for c in cand:
            if c.a in chosen or c.d in by_d or c.a in by_d or c.d in chosen:
                continue
            chosen[c.a] = by_d[c.d] = c
        by_a_cands: dict[int, list] = defaultdict(list)
        by_d_cands: dict[int, list] = defaultdict(list)
        for o in cand:
            by_a_cands[o.a].append(o)
            by_d_cands[o.d].append(o)
        out = []
        for c in sorted(chosen.values(), key=lambda c: (-c.score, c.dt)):
            # the best alternative: the same client with another server connection (free, or whose own match is
            # no better), the same server connection from another client (likewise), or another HBONE route
            rival = None
            for o in by_a_cands[c.a] + [o for o in by_d_cands[c.d] if o.a != c.a]:
                if o is c:
                    continue
                if o.a == c.a and o.d == c.d:
                    pass                                   # another HBONE connection between the same legs
                elif o.a == c.a:
                    other = by_d.get(o.d)
                    if other is not None and other.score > o.score:
                        continue
                else:
                    other = chosen.get(o.a)
                    if other is not None and other.score > o.score:
                        continue
                if rival is None or o.score > rival.score:
                    rival = o
            margin = c.score - rival.score if rival is not None else None
            base = 1.0 - 0.5 * np.exp(-max(c.score, 0.0) / 3.0)
            separation = 1.0 if margin is None else float(np.clip(0.5 + 0.125 * margin, 0.3, 1.0))
            conf = min(0.99, base * separation)
            reasons = ["keyless: " + ", ".join(c.why)]
            ambiguity = None
            if margin is not None and margin < AMBIGUOUS_MARGIN:
                conf = min(conf, 0.5)
                what = (f"HBONE connection {self.lcd[rival.t]['client']} > {self.lcd[rival.t]['server']}"
                        if rival.a == c.a and rival.d == c.d else
                        f"server connection {self.lcd[rival.d]['client']} > {self.lcd[rival.d]['server']}"
                        if rival.a == c.a else f"client connection {self.lcd[rival.a]['client']} > "
                                               f"{self.lcd[rival.a]['server']}")
                ambiguity = (f"ambiguous: {what} fits as well (score {rival.score:g} vs {c.score:g}; "
                             f"{', '.join(rival.why)})")
                reasons.append(ambiguity)
            elif margin is not None:
                reasons.append(f"margin {margin:g} over the next candidate")
            out.append((c.a, c.t, c.t2, c.d, round(conf, 3), reasons, ambiguity))
        return out

    def _node_hbone_clients(self, a_l: int, by_client_ip: dict) -> set[str]:
        """HBONE client addresses that no capture owns, placed on the node of a local capture of connection a_l
        (pod, loopback or Geneve device) by the longest address prefix shared with the owners of captures on a
        known node (at least /16 and better than any other node's): the client's ztunnel in eras A/B when only
        the node's NIC saw the HBONE connection."""
        nodes = {self.node.get(c) for c in self._caps_of(a_l)
                 if self.role.get(c) in LOCAL_ROLES | {"pod"} and self.node.get(c)}
        if len(nodes) != 1:
            return set()
        node = next(iter(nodes))
        cache = self.__dict__.setdefault("_ip_node_cache", {})
        owned = set(self.owner.values())
        out = set()
        for ip in by_client_ip:
            if ip in owned:
                continue
            if ip not in cache:
                cache[ip] = self._node_of_address(ip)
            if cache[ip] == node:
                out.add(ip)
        return out

    def _node_of_address(self, ip: str) -> str | None:
        try:
            x = ipaddress.ip_address(ip)
        except ValueError:
            return None
        best: dict[str, int] = {}
        for c, o in self.owner.items():
            n = self.node.get(c)
            try:
                y = ipaddress.ip_address(o)
            except ValueError:
                continue
            if not n or y.version != x.version:
                continue
            bits = x.max_prefixlen - (int(x) ^ int(y)).bit_length()
            best[n] = max(best.get(n, -1), bits)
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        if ranked and ranked[0][1] >= 16 and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
            return ranked[0][0]
        return None

    def _keyless_evidence(self, a: int, t1: int, t2: int | None, d: int) -> tuple[float, list[str]]:
        """Score of the candidate client A -> HBONE T1 (-> T2) -> server D, and what it rests on: the plaintext
        request line (+2, -3 when different) and host (+1), bytes each way (+-1.5), the HBONE connection leaving
        from the client pod's own address (+0.5), and T1's TLS records: a client record between A's and D's
        first packets (a new stream: +1, none at all: -2), a DATA record of A's first write between A's and D's
        first data (+1), one of D's first answer between D's and A's first data back (+1)."""
        score, why = 0.0, []
        ra, ha = self.leg_request(a)
        rd, hd = self.leg_request(d)
        clean = [_known_request(ra), _known_request(rd)]
        if clean[0] and clean[1]:
            if clean[0] == clean[1]:
                score += 2
                why.append("same request line")
            else:
                score -= 3
                why.append("request lines differ")
        if ha is not None and hd is not None and pd.notna(ha) and pd.notna(hd) and str(ha) == str(hd):
            score += 1
            why.append("same host")
        ba, bd = self.leg_bytes(a), self.leg_bytes(d)
        for k, name in ((0, "c2s"), (1, "s2c")):
            if ba[k] > 0 and bd[k] > 0:
                if ba[k] == bd[k]:
                    score += 1.5
                    why.append(f"same bytes {name} ({ba[k]})")
                else:
                    score -= 1.5
                    why.append(f"bytes {name} differ ({ba[k]} vs {bd[k]})")
        if self.lcd[t1]["client_ip"] == self.lcd[a]["client_ip"]:
            score += 0.5
            why.append("HBONE from the client pod's address")
        lt = self.leg_time
        first = self._records_between(t1, 0, lt(a, "first_c2s"), lt(d, "first_c2s"))
        if first is None:
            pass
        elif first:
            score += 1
            why.append("a new-stream record in time")
        else:
            score -= 2
            why.append("no HBONE record between the two connections' starts")
        last_t = t2 if t2 is not None else t1
        lo = lt(a, "data_c2s")
        size = self._write_sizes(a, 0)
        if size and self._records_between(t1, 0, lo, lt(d, "data_c2s"), size):
            score += 1
            why.append("request DATA record of the client's first write")
        size = self._write_sizes(d, 1)
        if size and self._records_between(last_t, 1, lt(d, "data_s2c"), lt(a, "data_s2c"), size):
            score += 1
            why.append("response DATA record of the server's first write")
        return score, why

    def _records_between(self, t: int, d: int, lo: int | None, hi: int | None, size: int | None = None):
        """Records of HBONE connection t in direction d between two corrected times (with the clock allowance),
        of a tunnelled payload `size` when given; None when the times or the records are unknown."""
        if lo is None or hi is None:
            return None
        recs = self._tunnel_records(t, d, [])
        if not recs:
            return None
        times = self._record_times(recs)
        j0 = bisect.bisect_left(times, lo - KEYLESS_TOL)
        j1 = bisect.bisect_right(times, hi + KEYLESS_TOL)
        out = [x[3] for x in recs[j0:j1] if x[3].kind not in ("handshake", "change_cipher_spec", "alert")]
        if size is not None:
            out = [r for r in out if r.payload in size or data_payload(r.h2_bytes) in size]
        return out

    @staticmethod
    def _chain(s: _Stream, next_stream) -> list[_Stream]:
        chain = [s]
        seen = {s.key}
        while chain[-1].key in next_stream and next_stream[chain[-1].key].key not in seen:
            chain.append(next_stream[chain[-1].key])
            seen.add(chain[-1].key)
        return chain

    def _sbytes(self, s: _Stream) -> tuple[int, int]:
        c2s = max((int(r["bytes_c2s"]) for r in s.rows.values() if pd.notna(r.get("bytes_c2s"))), default=-1)
        s2c = max((int(r["bytes_s2c"]) for r in s.rows.values() if pd.notna(r.get("bytes_s2c"))), default=-1)
        return c2s, s2c

    @staticmethod
    def _content_score(req1, host1, bytes1, req2, host2, bytes2) -> int:
        score = 0
        r1, r2 = _known_request(req1), _known_request(req2)
        if r1 and r2:
            score += 2 if r1 == r2 else -2
        host1, host2 = _text(host1), _text(host2)
        if host1 and host2:
            score += 1 if host1 == host2 else 0
        if bytes1[0] > 0 and bytes2[0] > 0:
            score += 1 if bytes1[0] == bytes2[0] else 0
        if bytes1[1] > 0 and bytes2[1] > 0:
            score += 1 if bytes1[1] == bytes2[1] else 0
        return score

    @staticmethod
    def _requests_conflict(req1, req2) -> bool:
        """Both request lines known and different: not the same request."""
        k1, k2 = _known_request(req1), _known_request(req2)
        return bool(k1) and bool(k2) and k1 != k2

    def _unclocked_captures(self) -> set[str]:
        """Captures whose clock group shares no packet with the reference's (times uncorrected)."""
        return {c for c in self.caps if (o := self.offsets.get(self.group.get(c, c))) is not None
                and o.via == "unconnected"}

    def _flow_start(self, f: _Flow) -> int | None:
        if f.app is not None:
            return self.leg_time(f.app, "first_ts")
        if f.streams:
            return self.stream_time(f.streams[0], "connect")
        if f.delivery is not None:
            return self.leg_time(f.delivery, "first_ts")
        return None

    # --- naming ------------------------------------------------------------------------------------------------
    def _label_of_capture(self, cap: str) -> str:
        """'pod-a-eth0.pcap' -> 'pod-a', 'waypoint-eth0.pcap' -> 'waypoint', 'ztunnel-b-any.pcapng' -> 'ztunnel-b'."""
        stem = re.sub(r"\.(pcapng|pcap|cap)(\d*)(\.gz)?$", "", cap.lower().rsplit("/", 1)[-1])
        tokens = re.split(r"[-_.]", stem)
        while len(tokens) > 1 and IFACE_RE.fullmatch(tokens[-1]):
            tokens.pop()
        return "-".join(tokens)

    def _owner_capture(self, ip: str, roles=OWNER_ROLES) -> str | None:
        for c, o in self.owner.items():
            if o == ip and self.role.get(c) in roles:
                return c
        return None

    def _proxy_capture(self, ip: str, lconn: int | None = None) -> str | None:
        """The capture of the proxy (ztunnel or waypoint) that uses `ip` as a connection's source. A pod address
        there is spoofed (era B: IP_TRANSPARENT): the proxy is the ztunnel of that pod's node."""
        c = self._owner_capture(ip)
        if c is None:
            return None
        if self.role.get(c) in ("ztunnel", "waypoint"):
            return c
        node = self.node.get(c)
        return self._ztunnel_of_node(node, lconn) or self._ztunnel_of_node(node)

    def _ztunnel_of_node(self, node: str | None, lconn: int | None = None) -> str | None:
        if not node:
            return None
        for c in self.caps:
            if self.role.get(c) == "ztunnel" and self.node.get(c) == node:
                if lconn is None or c in self._caps_of(lconn):
                    return c
        return None

    def _caps_of(self, lconn: int) -> list[str]:
        return [r["capture"] for r in self.leg_recs.get(lconn, [])]

    def _ztunnel_label(self, node: str | None, pod_cap: str | None = None) -> str:
        z = self._ztunnel_of_node(node)
        if z:
            return self._label_of_capture(z)
        if node:
            return f"ztunnel@{node}"
        if pod_cap:       # era C: the ztunnel's sockets live in the pod's network namespace
            return f"ztunnel@{self._label_of_capture(pod_cap)}"
        return "ztunnel"

    def _endpoint_label(self, ipport: str, hbone: bool = False) -> tuple[str, str | None]:
        """Label of the process behind an address, and its node."""
        ip = ipport.rsplit(":", 1)[0].strip("[]")
        c = self._owner_capture(ip)
        if c is None:
            return ipport, None
        role = self.role[c]
        if hbone and role == "pod":       # HBONE to a pod address ends in that node's (or that pod's) ztunnel
            return self._ztunnel_label(self.node.get(c), c), self.node.get(c)
        return self._label_of_capture(c), self.node.get(c)

    # --- ends of a hop -----------------------------------------------------------------------------------------
    def _end_lists(self, lconn: int, client_pref: list, server_pref: list) -> tuple[list[str], list[str]]:
        recs = self.leg_recs.get(lconn)
        if not recs:
            return [], []
        caps = [r["capture"] for r in recs]
        first = {r["capture"]: self.corr(r["capture"], r["first_c2s"]) for r in recs if r["first_c2s"] >= 0}
        order = sorted(first, key=lambda c: first[c])
        rest = [c for c in caps if c not in first]
        cl = [c for c in client_pref if c in caps] + order + rest
        sv = [c for c in server_pref if c in caps] + order[::-1] + rest
        return list(dict.fromkeys(cl)), list(dict.fromkeys(sv))

    # --- tables ------------------------------------------------------------------------------------------------
    def _tables(self, flows: list[_Flow]) -> dict[str, pd.DataFrame]:
        frows, hrows = [], []
        for i, f in enumerate(flows):
            fid = i + 1
            hops = self._hops(f)
            frows.append(self._flow_row(fid, f, hops))
            for h in hops:
                start = frows[-1]["start"]
                for ev in h["events"]:
                    hrows.append({"flow_id": fid, **{k: h[k] for k in ("hop", "hop_index", "kind", "connection",
                                                                        "tunnel_ids", "stream_id")}, **ev,
                                  "since_start_ms": (ev["src_ts"] - start) / MS if ev.get("src_ts") is not None
                                  and start is not None else np.nan})
        flows_df = _frame("flows", frows)
        hops_df = _frame("hops", hrows)
        clock_df = self._clock_table()
        latency_df = _latency(hops_df)
        return {"flows": flows_df, "hops": hops_df, "clock": clock_df, "latency": latency_df,
                "anomalies": tables.frame("anomalies", {k: [r[k] for r in self.anoms] for k in
                                                        ("capture", "index", "layer", "kind", "detail")})
                if self.anoms else tables.empty("anomalies")}

    def _hops(self, f: _Flow) -> list[dict]:
        hops = []
        client_node = None
        src_z_label = None
        if f.app is not None:
            cl = self.lcd[f.app]["client"]
            cl_label, client_node = self._endpoint_label(cl)
            if f.streams:
                tcl = f.streams[0].client.rsplit(":", 1)[0]
                zc = self._proxy_capture(tcl, f.streams[0].lconn)
                if zc is not None:
                    src_z_label = self._label_of_capture(zc)
                    client_node = client_node or self.node.get(zc)
                else:
                    src_z_label = self._ztunnel_label(client_node, self._owner_capture(tcl))
                server_label = src_z_label
                zpref = [zc] if zc else []
                zn = self._ztunnel_of_node(client_node, f.app)
                zpref += [zn] if zn else []
            elif f.tunnel is not None:
                zc = self._proxy_capture(self.lcd[f.tunnel]["client_ip"], f.tunnel)
                src_z_label = self._label_of_capture(zc) if zc else self._ztunnel_label(
                    client_node, self._owner_capture(self.lcd[f.tunnel]["client_ip"]))
                server_label = src_z_label
                zpref = [zc] if zc else []
            else:
                server_label = self.lcd[f.app]["server"]
                zpref = []
            ccap = self._owner_capture(self.lcd[f.app]["client_ip"])
            cl_list, sv_list = self._end_lists(f.app, [ccap] if ccap else [], zpref)
            hops.append(self._tcp_hop(f.app, f"{cl_label} -> {server_label}", 0, cl_list, sv_list))
        prev_label = src_z_label
        if f.tunnel is not None:
            hops.append(self._keyless_hop(f, len(hops), f.tunnel, first=True, last=f.tunnel2 is None))
        if f.tunnel2 is not None:
            hops.append(self._keyless_hop(f, len(hops), f.tunnel2, first=False, last=True))
        for j, s in enumerate(f.streams):
            cip = s.client.rsplit(":", 1)[0]
            if j == 0 and prev_label is None:
                pc = self._proxy_capture(cip, s.lconn)
                prev_label = self._label_of_capture(pc) if pc else self._endpoint_label(s.client)[0]
            elif j > 0:
                prev_label = hops[-1]["server_label"]
            slabel, snode = self._endpoint_label(s.server, hbone=True)
            ccap = self._proxy_capture(cip, s.lconn)
            sip = s.server.rsplit(":", 1)[0]
            scap = self._owner_capture(sip)
            spref = []
            if scap is not None and self.role[scap] != "pod":
                spref.append(scap)
            z = self._ztunnel_of_node(snode, s.lconn)
            if z:
                spref.append(z)
            if f.delivery is not None and j == len(f.streams) - 1:
                dn = self._endpoint_label(self.lcd[f.delivery]["server"])[1]
                z = self._ztunnel_of_node(dn, s.lconn)
                if z:
                    spref.append(z)
            cl_list, sv_list = self._end_lists(s.lconn, [ccap] if ccap else [], spref)
            hops.append(self._stream_hop(s, f"{prev_label} -> {slabel}", len(hops), cl_list, sv_list, slabel))
        if f.delivery is not None:
            d = f.delivery
            sv = self.lcd[d]["server"]
            slabel, snode = self._endpoint_label(sv)
            clabel = hops[-1]["server_label"] if hops else self._endpoint_label(self.lcd[d]["client"])[0]
            cpref = []
            if hops and hops[-1].get("server_capture"):
                cpref.append(hops[-1]["server_capture"])
            z = self._ztunnel_of_node(snode, d)
            if z:
                cpref.append(z)
            scap = self._owner_capture(sv.rsplit(":", 1)[0])
            cl_list, sv_list = self._end_lists(d, cpref, [scap] if scap else [])
            hops.append(self._tcp_hop(d, f"{clabel} -> {slabel}", len(hops), cl_list, sv_list))
        return hops

    # --- keyless HBONE hop events from TLS records --------------------------------------------------------------
    def _tunnel_records(self, t: int, d: int, prefer: list[str]) -> list[tuple]:
        """Records of direction d of HBONE connection t, labelled (keyless.infer_records), from one view of it (a
        capture's timeline of that TLS connection; a capture on several interfaces can hold two): the first of
        `prefer` (then any) whose view has the most records that way. Tuples (corrected ts_last, capture, raw
        ts_last, record), in time order."""
        key = (t, d, tuple(prefer))
        cache = self.__dict__.setdefault("_rec_cache", {})
        if key in cache:
            return cache[key]
        details = getattr(self.a, "details", None) or {}
        order = {c: i for i, c in enumerate(prefer)}
        views = sorted(self.tunnel_timelines.get(t, []), key=lambda ct: order.get(ct[0], len(order)))
        labels = self.__dict__.setdefault("_label_cache", {})
        best, best_n = None, 0
        for cap, tid in views:
            if (cap, tid) not in labels:
                det = details.get(cap)
                tl = getattr(det, "records", {}).get(tid) if det is not None else None
                labels[(cap, tid)] = infer_records(tl) if tl else []
            n = sum(1 for r in labels[(cap, tid)] if r.direction == d)
            if n > best_n:
                best, best_n = (cap, tid), n
        out = []
        if best is not None:
            cap = best[0]
            out = sorted(((self.corr(cap, r.ts_last), cap, r.ts_last, r) for r in labels[best] if r.direction == d),
                         key=lambda x: x[0])
        cache[key] = out
        self.__dict__.setdefault("_rec_times", {})[id(out)] = [x[0] for x in out]
        return out

    def _record_times(self, recs: list[tuple]) -> list[int]:
        """The corrected times of a `_tunnel_records` list (kept with it: bisected on every lookup)."""
        times = self.__dict__.setdefault("_rec_times", {}).get(id(recs))
        return times if times is not None else [x[0] for x in recs]

    def _write_sizes(self, lconn: int | None, d: int) -> frozenset:
        """What the first DATA frame of a tunnelled direction can carry: the running totals of the plain leg's first
        `FIRST_WRITES` data segments that way, at the capture that saw the first one (a proxy reads what has
        arrived: one segment or several)."""
        if lconn is None:
            return frozenset()
        if not hasattr(self, "_writes"):
            data = first_writes(self.L, FIRST_WRITES)
            self._writes = {}
            for (l, x), g in data.groupby(["lconn", "dir"], sort=False):
                self._writes[(int(l), int(x))] = frozenset(int(v) for v in np.cumsum(g["plen"].to_numpy(np.int64)))
        return self._writes.get((lconn, d), frozenset())

    def _keyless_events(self, flows: list[_Flow]) -> None:
        """Hop events of the flows tied without keys, from the TLS records of their HBONE connections.

        Every event of an HBONE hop lies between two known ones, one on each side: the CONNECT (a new stream's
        HEADERS) after the client's SYN and before the server connection's SYN, the 200 after the server
        connection's SYN-ACK, the first DATA each way after the first bytes of the plain leg it comes from (the
        client's only after the 200) and before those of the leg it goes to, END_STREAM between the two legs'
        FINs. Client-to-server events run down the chain (client, HBONE, waypoint's HBONE), server-to-client
        ones up it. On each HBONE connection the events of its flows are assigned to distinct records at once
        (minimum cost assignment, `_assign_records`): a record outside an event's window, of another tunnelled
        size than the leg's first write (DATA) or of another label costs more; among equals the records follow
        the order of the events (a proxy forwards first in, first out). An event that could swap records with
        another flow's at the same cost is marked ambiguous. Times are those of the record's last byte, as
        decryption would give."""
        self._kl: dict[tuple[int, int], dict[str, tuple]] = {}
        self._kl_ambiguous: dict[tuple[int, int], list[str]] = defaultdict(list)
        chains = [(i, f, [x for x in (f.tunnel, f.tunnel2) if x is not None]) for i, f in enumerate(flows)
                  if f.match == "inferred" and f.tunnel is not None]
        if not chains:
            return
        used: dict[tuple[int, int], set[int]] = defaultdict(set)
        lists: dict[tuple[int, int], list] = {}                       # (tunnel, direction) -> its records
        taken: dict[tuple[int, int], dict[int, tuple]] = defaultdict(dict)   # record index -> (event, (flow, level))
        # event -> (direction, leg column of the side it comes from, of the side it goes to, class)
        spec = {"connect": (0, "syn", "syn", "open"), "connect_response": (1, "syn_ack", None, "open"),
                "first_request_byte": (0, "data_c2s", "data_c2s", "data"),
                "first_response_byte": (1, "data_s2c", "data_s2c", "data"),
                "end_c2s": (0, "fin_c2s", "fin_c2s", "end"), "end_s2c": (1, "fin_s2c", "fin_s2c", "end")}
        # the 200 first (the client's first DATA waits for it), then everything client to server, then back
        phases = (("connect_response",), ("connect", "first_request_byte", "end_c2s"),
                  ("first_response_byte", "end_s2c"))
        depth = max(len(c) for _, _, c in chains)
        for phase in phases:
            d = spec[phase[0]][0]
            for level in (range(depth) if d == 0 else range(depth - 1, -1, -1)):
                per_tunnel: dict[int, list] = defaultdict(list)
                for i, f, chain in chains:
                    if level >= len(chain):
                        continue
                    t = chain[level]
                    for ev in phase:
                        _, from_col, to_col, cls = spec[ev]
                        if d == 0:
                            prev = self._kl.get((i, level - 1), {}).get(ev) if level > 0 else None
                            low = prev[3] if prev else (self.leg_time(f.app, from_col) if level == 0 else None)
                            if ev == "first_request_byte":
                                resp = self._kl.get((i, level), {}).get("connect_response")
                                if low is not None and resp is not None:
                                    low = max(low, resp[3])
                            high = self.leg_time(f.delivery, to_col) if to_col and f.delivery is not None \
                                and level == len(chain) - 1 else None
                            size = self._write_sizes(f.app, 0)
                        else:
                            nxt = self._kl.get((i, level + 1), {}).get(ev) if level + 1 < len(chain) else None
                            low = nxt[3] if nxt else (self.leg_time(f.delivery, from_col) if level == len(chain) - 1
                                                      and f.delivery is not None else None)
                            high = self.leg_time(f.app, to_col) if to_col and level == 0 else None
                            size = self._write_sizes(f.delivery, 1)
                        if low is not None:
                            per_tunnel[t].append((low, high, i, ev, cls, size if cls == "data" else None))
                for t, rows in per_tunnel.items():
                    cl_list, sv_list = self._end_lists(t, [], [])
                    zc = self._proxy_capture(self.lcd[t]["client_ip"], t)
                    prefer = ([zc] if zc else []) + cl_list if d == 0 else sv_list
                    recs = self._tunnel_records(t, d, prefer)
                    if not recs:
                        continue
                    rows.sort(key=lambda r: (r[0], r[2]))
                    lists[(t, d)] = recs
                    for row, j, ambiguous_with in self._assign_records(rows, recs, d, used[(t, d)]):
                        low, high, i, ev, cls, size = row
                        corr_ts, cap, raw, r = recs[j]
                        used[(t, d)].add(r.index)
                        taken[(t, d)][r.index] = (ev, (i, level))
                        self._kl.setdefault((i, level), {})[ev] = (d, cap, raw, corr_ts, r, bool(ambiguous_with))
                        for other_i, dt_ms in ambiguous_with:
                            self._kl_ambiguous[(i, level)].append(
                                f"{ev} on {self.lcd[t]['client']} > {self.lcd[t]['server']}: the record of flow "
                                f"{other_i} fits as well (times {dt_ms:.3f} ms apart)")
        # the stream's end: the later END_STREAM of the two directions (as a decrypted stream's end_ts)
        for key, evs in self._kl.items():
            a, b = evs.pop("end_c2s", None), evs.pop("end_s2c", None)
            if a is not None and b is not None:
                evs["fin" if a[3] >= b[3] else "fin_s2c"] = a if a[3] >= b[3] else b
        self._keyless_stream_ids(lists, taken)

    def _assign_records(self, rows: list[tuple], recs: list[tuple], d: int, used: set[int]):
        """Records for events of one HBONE connection and direction: rows (low, high, flow, event, class, size),
        sorted by low; recs (corrected ts, capture, raw ts, InferredRecord) in time order. A minimum cost
        assignment (scipy's Hungarian method; greedy only for groups over 250,000 cells) per group of rows whose
        candidate records overlap. Yields (row, record position, [(other flow, ms apart)] when a swap with
        another row's record costs the same)."""
        times = self._record_times(recs)
        options: list[dict[int, float]] = []
        for low, high, i, ev, cls, size in rows:
            ok, preferred = KEYLESS_KINDS[(cls, d)]
            j0 = bisect.bisect_left(times, low - KEYLESS_TOL)
            j1 = bisect.bisect_right(times, high + KEYLESS_TOL) if high is not None else len(recs)
            opts: dict[int, float] = {}
            for relaxed, (a, b) in enumerate(((j0, j1), (j1, len(recs)))):
                for j in range(a, b):
                    r = recs[j][3]
                    if r.index in used or r.kind not in ok:
                        continue
                    primary = 4.0 * relaxed + (0.0 if r.kind == preferred else 0.25)
                    if size:
                        primary += 0.0 if (r.payload in size or data_payload(r.h2_bytes) in size) else 2.0
                    gap_ms = min(max(times[j] - low, 0) / MS, 999.0)
                    opts[j] = primary * 1e7 + gap_ms * gap_ms
                    if len(opts) >= KEYLESS_OPTIONS:
                        break
                if opts:
                    break        # records past the upper bound only when none fits inside it
            options.append(opts)
        # groups of rows that compete for records (overlapping ranges of candidate positions)
        order = sorted(range(len(rows)), key=lambda k: min(options[k], default=-1))
        groups, cur, reach = [], [], -1
        for k in order:
            if not options[k]:
                continue
            lo_j, hi_j = min(options[k]), max(options[k])
            if cur and lo_j > reach:
                groups.append(cur)
                cur, reach = [], -1
            cur.append(k)
            reach = max(reach, hi_j)
        if cur:
            groups.append(cur)
        for g in groups:
            cols = sorted({j for k in g for j in options[k]})
            pick = _min_cost_assignment([[options[k].get(j, np.inf) for j in cols] for k in g])
            chosen = {g[a]: cols[b] for a, b in pick}
            row_of = {j: k for k, j in chosen.items()}
            for k, j in chosen.items():
                swaps = []
                for j2 in options[k]:
                    k2 = row_of.get(j2)
                    if k2 is None or k2 == k or rows[k2][3] != rows[k][3] or j not in options[k2]:
                        continue
                    if int(options[k][j2] // 1e7) == int(options[k][j] // 1e7) and \
                            int(options[k2][j] // 1e7) == int(options[k2][j2] // 1e7) and options[k][j] < 4e7:
                        swaps.append((rows[k2][2] + 1, abs(times[j] - times[j2]) / MS))
                yield rows[k], j, swaps

    def _keyless_stream_ids(self, lists: dict, taken: dict) -> None:
        """HTTP/2 stream ids of the keyless HBONE hops: on each connection seen from its handshake, the records
        assigned to CONNECTs and the records labelled HEADERS that no other event took are the streams it opened,
        numbered in order (client streams are odd and increase: the n-th is 2n-1)."""
        self._kl_stream: dict[tuple[int, int], int] = {}
        for (t, d), recs in lists.items():
            if d != 0 or not any(x[3].kind == "handshake" for x in recs):
                continue
            mine = taken.get((t, d), {})
            n = 0
            for x in sorted(recs, key=lambda x: x[3].index):
                r = x[3]
                ev = mine.get(r.index)
                if (ev is not None and ev[0] == "connect") or (ev is None and r.kind == "headers"):
                    n += 1
                    if ev is not None:
                        self._kl_stream[ev[1]] = 2 * n - 1

    def _keyless_hop(self, f: _Flow, idx: int, t: int, first: bool = True, last: bool = True) -> dict:
        """The HBONE hop of a flow tied without keys. Its events are the TCP segments of the HBONE connection
        that first follow the matching events of the plain legs: connect (first client-to-server data after the
        client's SYN), connect_response (first data back after the server connection's SYN-ACK),
        first_request_byte and first_response_byte likewise. Inferred; concurrent streams can blur them."""
        lc = self.lcd[t]
        zc = self._proxy_capture(lc["client_ip"], t)
        clabel = self._label_of_capture(zc) if zc else self._ztunnel_label(
            self._endpoint_label(self.lcd[f.app]["client"])[1], self._owner_capture(lc["client_ip"]))
        slabel, snode = self._endpoint_label(lc["server"], hbone=True)
        dnode = self._endpoint_label(self.lcd[f.delivery]["server"])[1] if f.delivery is not None else None
        spref = [z for z in (self._ztunnel_of_node(snode, t), self._ztunnel_of_node(dnode, t)) if z]
        cl_list, sv_list = self._end_lists(t, [zc] if zc else [], spref)
        if self._tcp_by_lconn is None:
            self._tcp_by_lconn = _TunnelPackets.split(tcp_of(self.L, self.tunnel_lconns))
        pk = self._tcp_by_lconn.get(t)
        events = []
        level = 0 if first else 1
        fi = getattr(self, "_flow_pos", {}).get(id(f))
        recorded = self._kl.get((fi, level)) if fi is not None and getattr(self, "_kl", None) else None
        if recorded and pk is not None and cl_list and sv_list:
            order = ("connect", "connect_response", "first_request_byte", "first_response_byte", "fin", "fin_s2c")
            for ev in sorted(recorded, key=order.index):
                d, cap, raw, _, rec, ambiguous = recorded[ev]
                hit = pk.payload_at(self.cap_index[cap], d, raw)
                if hit is None:
                    times = {cap: int(raw)}
                else:
                    times = {self.caps[c]: ts for c, ts in pk.same_packet(hit)}
                row = self._event_row(ev, d, times, cl_list, sv_list)
                if row:
                    row["inferred"] = True
                    events.append(row)
            for why in dict.fromkeys(self._kl_ambiguous.get((fi, level), [])):
                f.reasons.append(f"time ambiguous: {why}")
            return {"hop": f"{clabel} -> {slabel}", "hop_index": idx, "kind": "hbone",
                    "connection": f"{lc['client']} > {lc['server']}", "tunnel_ids": None,
                    "stream_id": self._kl_stream.get((fi, level)),
                    "events": events, "lconn": t, "server_label": slabel,
                    "server_capture": sv_list[0] if sv_list else None,
                    "client_capture": cl_list[0] if cl_list else None}
        # a new HBONE connection opened for this client starts with the TLS handshake: its first segments are
        # not the CONNECT, so connect is left unknown then; app bytes are tunnelled only after the 200
        new_tunnel = (self.leg_time(t, "first_c2s") or 0) >= (self.leg_time(f.app, "syn") or 0) - TOL
        anchors = (("connect", 0, f.app, "syn"), ("connect_response", 1, f.delivery, "syn_ack"),
                   ("first_request_byte", 0, f.app, "data_c2s"), ("first_response_byte", 1, f.delivery, "data_s2c"))
        if pk is not None and cl_list and sv_list:
            response_at_client = None
            for ev, d, leg, col in anchors:
                if (ev == "connect" and (new_tunnel or not first)) or (ev == "connect_response" and not last):
                    continue
                after = self.leg_time(leg, col) if leg is not None else None
                if after is None:
                    continue
                if ev == "first_request_byte" and response_at_client is not None:
                    after = max(after, response_at_client)
                src_list = cl_list if d == 0 else sv_list
                src = src_list[0]
                sc = self.cap_index[src]
                first = pk.first_payload_after(sc, d, after, self.off.get(src, 0))
                if first is None:
                    continue
                times = {self.caps[c]: ts for c, ts in pk.same_packet(first)}
                row = self._event_row(ev, d, times, cl_list, sv_list)
                if row:
                    row["inferred"] = True
                    events.append(row)
                    if ev == "connect_response" and row.get("dst_ts") is not None:
                        response_at_client = row["dst_ts"]
        return {"hop": f"{clabel} -> {slabel}", "hop_index": idx, "kind": "hbone",
                "connection": f"{lc['client']} > {lc['server']}", "tunnel_ids": None, "stream_id": None,
                "events": events, "lconn": t, "server_label": slabel,
                "server_capture": sv_list[0] if sv_list else None, "client_capture": cl_list[0] if cl_list else None}

    def _pick(self, times: dict[str, int], src_list, dst_list):
        src = next((c for c in src_list if c in times), None)
        dst = next((c for c in dst_list if c in times and c != src), None)
        return src, dst

    def _event_row(self, ev: str, direction: int, times: dict[str, int], cl_list, sv_list) -> dict | None:
        if not times:
            return None
        src_list, dst_list = (cl_list, sv_list) if direction == 0 else (sv_list, cl_list)
        src, dst = self._pick(times, src_list, dst_list)
        if src is None:
            return None
        row = {"event": ev, "direction": "c2s" if direction == 0 else "s2c", "src_capture": src,
               "src_ts_raw": times[src], "src_ts": self.corr(src, times[src]), "dst_capture": dst,
               "dst_ts_raw": times[dst] if dst else None, "dst_ts": self.corr(dst, times[dst]) if dst else None,
               "captures": len(times), "inferred": False}
        row["latency_ms"] = (row["dst_ts"] - row["src_ts"]) / MS if dst else np.nan
        return row

    def _tcp_hop(self, lconn: int, name: str, idx: int, cl_list, sv_list) -> dict:
        recs = self.leg_recs[lconn]
        events = []
        for col, ev, d in TCP_EVENTS:
            times = {r["capture"]: int(r[col]) for r in recs if r[col] >= 0}
            row = self._event_row(ev, d, times, cl_list, sv_list)
            if row:
                events.append(row)
        lc = self.lcd[lconn]
        return {"hop": name, "hop_index": idx, "kind": "tcp", "connection": f"{lc['client']} > {lc['server']}",
                "tunnel_ids": None, "stream_id": None, "events": events, "lconn": lconn,
                "server_label": name.split(" -> ")[-1], "server_capture": sv_list[0] if sv_list else None,
                "client_capture": cl_list[0] if cl_list else None}

    def _stream_hop(self, s: _Stream, name: str, idx: int, cl_list, sv_list, slabel) -> dict:
        events = []
        for col, ev, d in STREAM_EVENTS:
            direction = d if d is not None else (s.fin_dir if s.fin_dir is not None else 0)
            evname = ev if not (ev == "fin" and direction == 1) else "fin_s2c"
            row = self._event_row(evname, direction, dict(s.times.get(ev, {})), cl_list, sv_list)
            if row:
                events.append(row)
        tids = ";".join(f"{c}:{t}" for c, t in sorted(s.tunnel_ids.items()))
        return {"hop": name, "hop_index": idx, "kind": "hbone", "connection": f"{s.client} > {s.server}",
                "tunnel_ids": tids, "stream_id": s.stream_id, "events": events, "lconn": s.lconn,
                "server_label": slabel, "server_capture": sv_list[0] if sv_list else None,
                "client_capture": cl_list[0] if cl_list else None, "stream": s}

    def _flow_row(self, fid: int, f: _Flow, hops: list[dict]) -> dict:
        first_s = f.streams[0] if f.streams else None
        last_s = f.streams[-1] if f.streams else None
        client = self.lcd[f.app]["client"] if f.app is not None else (first_s.info("forwarded_for") if first_s
                                                                          else None)
        original_dst = self.lcd[f.app]["server"] if f.app is not None else \
            (first_s.info("original_dst") if first_s else None)
        dst_pod = None
        if f.delivery is not None:
            dst_pod = self.lcd[f.delivery]["server"]
        elif last_s is not None:
            dst_pod = last_s.info("original_dst") or last_s.info("authority")
        times = [e[k] for h in hops for e in h["events"] for k in ("src_ts", "dst_ts") if e.get(k) is not None]
        start = min(times) if times else self._flow_start(f)
        end = max(times) if times else None
        if f.app is not None:
            b_c2s, b_s2c = self.leg_bytes(f.app)
        elif first_s is not None:
            b_c2s, b_s2c = self._sbytes(first_s)
        else:
            b_c2s = b_s2c = None
        outcome = self._outcome(f)
        last_seen = None
        for h in hops:
            if h["events"]:
                last_seen = h["hop"]
        status = first_s.info("status") if first_s else None
        hb = [h for h in hops if h["kind"] == "hbone"]
        return {
            "flow_id": fid, "client": client, "original_dst": original_dst, "dst_pod": dst_pod,
            "hops": len(hops), "path": " | ".join(h["hop"] for h in hops),
            "hbone_client": first_s.client if first_s else (self.lcd[f.tunnel]["client"] if f.tunnel is not None
                                                             else None),
            "hbone_server": first_s.server if first_s else (self.lcd[f.tunnel]["server"] if f.tunnel is not None
                                                             else None),
            "stream_id": first_s.stream_id if first_s else (hb[0]["stream_id"] if hb else None),
            "tunnel_ids": " | ".join(h["tunnel_ids"] or "" for h in hb) or None,
            "stream_ids": ";".join("" if h["stream_id"] is None else str(h["stream_id"]) for h in hb).strip(";")
            or None,
            "status": int(status) if status is not None and pd.notna(status) else None,
            "trace_id": first_s.info("trace_id") if first_s else None,
            "start": start, "end": end, "bytes_c2s": b_c2s, "bytes_s2c": b_s2c,
            "outcome": outcome, "last_seen": last_seen, "match": f.match, "confidence": round(f.confidence, 3),
            "match_reason": ", ".join(f.reasons) or None,
        }

    def _outcome(self, f: _Flow) -> str:
        """The client's view: its own capture's leg, else the capture that saw most of both directions."""
        if f.app is None:
            return "incomplete"
        recs = self.leg_recs[f.app]
        cap = self._owner_capture(self.lcd[f.app]["client_ip"])
        mine = [r for r in recs if r["capture"] == cap]
        if mine:
            client_end = mine[0]
        else:
            client_end = max(recs, key=lambda r: (min(r["packets_c2s"], 1) + min(r["packets_s2c"], 1),
                                                  r["packets_s2c"]))
        st = leg_state(client_end)
        return st if st in ("ok", "reset", "refused", "timeout") else "incomplete"

    def _clock_table(self) -> pd.DataFrame:
        ci = self.a.captures
        rows = []
        names = list(ci["capture"]) if len(ci) else list(self.caps)
        for c in names:
            grp = self.group.get(c, c)
            o = self.offsets.get(grp)
            row = ci[ci["capture"] == c].iloc[0] if len(ci) else None
            first = int(pd.Timestamp(row["first_ts"]).value) if row is not None and pd.notna(row["first_ts"]) else None
            last = int(pd.Timestamp(row["last_ts"]).value) if row is not None and pd.notna(row["last_ts"]) else None
            off = self.off.get(c, 0)
            rows.append({
                "capture": c, "node": self.node.get(c),
                "node_reason": self.node_reason.get(c) or (f"node unknown; one clock with the other '{grp}' captures"
                                                           if grp != c else None),
                "clock_group": grp, "reference": grp == self.reference,
                "offset_ms": o.offset_ns / MS if o is not None else np.nan,
                "uncertainty_ms": o.uncertainty_ns / MS if o is not None else np.nan,
                "drift_ppm": o.drift_ppm if o is not None else np.nan,
                "via": o.via if o is not None else "no TCP packets",
                "method": o.method if o is not None else None,
                "connections": o.connections if o is not None else 0,
                "packets": o.packets if o is not None else 0,
                "first_ts_raw": first, "last_ts_raw": last,
                "first_ts": first - off if first is not None else None,
                "last_ts": last - off if last is not None else None,
            })
        return _frame("clock", rows)

    def _anom(self, capture, kind, detail) -> None:
        self.anoms.append({"capture": capture, "index": None, "layer": "correlation", "kind": kind, "detail": detail})


class _TunnelPackets:
    """One HBONE connection's TCP packets across all captures, in time order (ties in `Legs.tcp` order), with the
    lookups the keyless hops make: a capture's payload packet at a time or first after one, and the same packet
    (direction, seq, ack, TCP timestamp, class) at every other capture. Sorted arrays and binary search: a pooled
    connection can carry many flows and each asks a few questions."""

    def __init__(self, cap, direction, seq, ack, tsval, fl, ts, plen):
        self.cap, self.dir, self.seq, self.ack, self.tsval, self.fl, self.ts = cap, direction, seq, ack, tsval, fl, ts
        by_seq = np.argsort(seq, kind="stable")
        self._by_seq, self._seq_sorted = by_seq, seq[by_seq]
        pay = np.flatnonzero(plen > 0)
        self._payload: dict[tuple[int, int], np.ndarray] = {}        # (cap, dir) -> positions, time order
        if len(pay):
            k = cap[pay] * 2 + direction[pay]
            o = np.argsort(k, kind="stable")
            ks, rows = k[o], pay[o]
            cuts = np.flatnonzero(np.diff(ks)) + 1
            for part in np.split(rows, cuts):
                self._payload[(int(cap[part[0]]), int(direction[part[0]]))] = part
        self._shifted: dict[tuple[int, int, float], np.ndarray] = {}

    @classmethod
    def split(cls, tcp: pd.DataFrame) -> dict[int, "_TunnelPackets"]:
        lconn = tcp["lconn"].to_numpy(np.int64)
        ts = tcp["ts"].to_numpy(np.int64)
        order = np.lexsort((ts, lconn))
        col = {c: tcp[c].to_numpy(np.int64)[order] for c in ("cap", "dir", "seq", "ack", "tsval", "flags", "plen")}
        fl = packet_class(col["flags"], col["plen"])
        lc, ts = lconn[order], ts[order]
        starts = np.flatnonzero(np.r_[True, lc[1:] != lc[:-1]]) if len(lc) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(lc)]
        return {int(lc[a]): cls(col["cap"][a:b], col["dir"][a:b], col["seq"][a:b], col["ack"][a:b],
                                col["tsval"][a:b], fl[a:b], ts[a:b], col["plen"][a:b])
                for a, b in zip(starts, ends)}

    def payload_at(self, cap: int, direction: int, ts) -> int | None:
        """The first of the capture's payload packets in that direction at exactly `ts`."""
        rows = self._payload.get((cap, direction))
        if rows is None:
            return None
        t = self.ts[rows]
        i = int(np.searchsorted(t, ts, side="left"))
        return int(rows[i]) if i < len(rows) and t[i] == ts else None

    def first_payload_after(self, cap: int, direction: int, after, offset=0) -> int | None:
        """The capture's first payload packet in that direction whose time less `offset` is at or after `after`."""
        rows = self._payload.get((cap, direction))
        if rows is None:
            return None
        key = (cap, direction, offset)
        t = self._shifted.get(key)
        if t is None:
            t = self._shifted[key] = self.ts[rows] - offset
        i = int(np.searchsorted(t, after, side="left"))
        return int(rows[i]) if i < len(rows) else None

    def same_packet(self, i: int) -> list[tuple[int, int]]:
        """(capture code, time) of the packet at position `i` at each capture that saw it, first sighting each."""
        lo = np.searchsorted(self._seq_sorted, self.seq[i], side="left")
        hi = np.searchsorted(self._seq_sorted, self.seq[i], side="right")
        cand = self._by_seq[lo:hi]
        cand = cand[(self.dir[cand] == self.dir[i]) & (self.ack[cand] == self.ack[i])
                    & (self.tsval[cand] == self.tsval[i]) & (self.fl[cand] == self.fl[i])]
        seen: dict[int, int] = {}
        for j in np.sort(cand):
            seen.setdefault(int(self.cap[j]), int(self.ts[j]))
        return list(seen.items())


def _text(v) -> str | None:
    """A table value as text; None for a missing one (None, NA, NaN)."""
    return None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v)


def _known_request(req) -> tuple | None:
    """A (method, path) request line as text when every part of it is known, else None."""
    if req is None:
        return None
    t = tuple(_text(v) for v in req)
    return None if None in t else t


def _min_cost_assignment(cost: list[list[float]]) -> list[tuple[int, int]]:
    """(row, column) pairs of a minimum cost one-to-one assignment; np.inf marks forbidden pairs. scipy's
    Hungarian method (a dependency); above 250,000 cells, greedy cheapest-first to bound the time."""
    if not cost or not cost[0]:
        return []
    m = np.asarray(cost, dtype=np.float64)
    finite = np.isfinite(m)
    if m.size <= 250_000:
        from scipy.optimize import linear_sum_assignment

        big = (np.max(m[finite]) + 1.0) * (m.shape[0] + 1) if finite.any() else 1.0
        r, c = linear_sum_assignment(np.where(finite, m, big))
        return [(int(a), int(b)) for a, b in zip(r, c) if finite[a, b]]
    out, rows, cols = [], set(), set()
    for a, b in sorted(zip(*np.nonzero(finite)), key=lambda ab: (m[ab[0], ab[1]], ab[0])):
        if a not in rows and b not in cols:
            rows.add(a)
            cols.add(b)
            out.append((int(a), int(b)))
    return out


def _is_ip(v) -> bool:
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


def _frame(name: str, rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return tables.empty(name)
    data = {}
    for c, dtype in tables.dtypes(name).items():
        vals = [r.get(c) for r in rows]
        if dtype == tables.TS:
            vals = np.array([-1 if v is None else v for v in vals], dtype=np.int64)     # (negative: NaT)
        elif dtype == "float64":
            vals = np.array([np.nan if v is None or v is pd.NA else v for v in vals], dtype=np.float64)
        else:       # straight into the declared type (None and NaN missing; integers never pass through floats)
            vals = pd.array(vals, dtype=dtype)
        data[c] = vals
    return tables.frame(name, data)


def _latency(hops: pd.DataFrame) -> pd.DataFrame:
    h = hops.dropna(subset=["latency_ms"])
    if h.empty:
        return tables.empty("latency")
    g = h.groupby(["hop", "event"], sort=False)["latency_ms"]
    q = g.quantile([0.5, 0.9, 0.99]).unstack()
    out = pd.DataFrame({"count": g.size(), "p50_ms": q[0.5], "p90_ms": q[0.9], "p99_ms": q[0.99], "max_ms": g.max(),
                        "mean_ms": g.mean(), "min_ms": g.min()}).reset_index()
    order = h.groupby(["hop", "event"], sort=False)["hop_index"].min().rename("hop_index").reset_index()
    out = out.merge(order, on=["hop", "event"]).sort_values(["hop_index"], kind="stable")
    return tables.frame("latency", {c: out[c].to_numpy() for c in tables.columns("latency")})

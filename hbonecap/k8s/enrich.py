"""Names next to addresses: a post-pass over an analysis' tables with an `Inventory`.

Every address column keeps its value; a `*_name` column beside it says what the address was at the row's time:
`default/pod-a` (namespace/pod, with `:port`), `node/node-a`, `echo.default:80` (Service name.namespace:port for a
ClusterIP:port), or `default/a | default/b` when several owners fit and neither the snapshots' times nor the
capture time decide (an anomaly `k8s_ambiguous_address` says so). Pod rows add the node, flows and tunnels the
SPIFFE identity the workload should present (`spiffe://<trust domain>/ns/<ns>/sa/<service account>`); a decrypted
certificate that shows another identity is an anomaly `k8s_identity_mismatch`.

The correlation code is not involved: this runs on finished tables and only adds the columns declared in
`hbonecap.tables`. Pure: no I/O.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from hbonecap.k8s.inventory import Inventory, Owner, Resolution
from hbonecap.k8s.inventory import _norm_ip as norm_ip

NAT = np.iinfo(np.int64).min
UNTIMED = "\0untimed"      # marks a lookup made only to find which values depend on the time


def split_endpoint(text) -> tuple[str | None, int | None]:
    """'10.0.0.1:80' / '[fd00::1]:80' / '10.0.0.1' -> (ip, port)."""
    if text is None or (not isinstance(text, str) and pd.isna(text)):
        return None, None
    text = str(text).strip()
    if not text:
        return None, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port.isdigit() else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port) if port.isdigit() else None
    return text, None


def _ns(series: pd.Series | None, n: int) -> np.ndarray:
    """A time column as epoch ns (NAT where missing)."""
    if series is None:
        return np.full(n, NAT, dtype=np.int64)
    s = pd.to_datetime(series, utc=True)
    return s.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").view(np.int64)


class Resolver:
    """Cached lookups of one inventory; collects ambiguous addresses for anomaly rows."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self.cache: dict[object, Resolution] = {}                # ip, or (ip, port) for Service ports
        self.split_cache: dict[str, tuple[str | None, int | None]] = {}
        self.ambiguous: dict[str, tuple[str, str]] = {}     # ip -> (capture, detail)

    def endpoint(self, text, ts: int, capture: str | None = None, ip_only: bool = False) -> Resolution:
        parsed = self.split_cache.get(text)
        if parsed is None:
            parsed = self.split_cache[text] = split_endpoint(text) if isinstance(text, str) else (None, None)
        ip, port = parsed
        if ip is None:
            return Resolution()
        if ip_only:
            port = None
        r = self.cache.get(ip)
        if r is None:
            r = self.cache[ip] = self.inv.resolve_ip(ip, None)
        if port is not None and ((r.status == "node" and (port, "TCP") in self.inv.node_ports) or
                                 (norm_ip(ip), port, "TCP") in self.inv.services):
            key = (ip, port)          # a Service port, or a NodePort on a node: resolved with its port
            full = self.cache.get(key)
            if full is None:
                full = self.cache[key] = self.inv.resolve_endpoint(ip, port, None)
            if full.status == "service":
                return full
        if r.status == "ambiguous" and len({o.key for o in r.candidates}) > 1:
            timed = self.inv.resolve_endpoint(ip, port, None if ts == NAT else int(ts))
            if timed.status == "ambiguous" and ip not in self.ambiguous and capture != UNTIMED:
                why = "the capture time is unknown" if ts == NAT else \
                    "the snapshots carry no times that decide" if any(
                        o.start is None and o.end is None and not o.seen for o in r.candidates) else \
                    "several owners' lifetimes cover the capture time"
                self.ambiguous[ip] = (capture or "k8s", f"{ip} belonged to {r.name} ({why})")
            return timed
        if port is not None and r.name and r.status in ("pod", "node"):
            return Resolution(f"{r.name}:{port}", r.node, r.owner, None, r.status, r.candidates)
        return r

    def column(self, df: pd.DataFrame, col: str, ts: np.ndarray, ip_only: bool = False) -> list[Resolution]:
        """Resolutions of one address column: each distinct value once, unless its owner depends on the time."""
        caps = df["capture"].astype(object).tolist() if "capture" in df.columns else [None] * len(df)
        codes, uniques = pd.factorize(df[col].astype(object), use_na_sentinel=True)
        untimed = [self.endpoint(u, NAT, UNTIMED, ip_only) for u in uniques]
        timed = [r.status == "ambiguous" and len({o.key for o in r.candidates}) > 1 for r in untimed]
        out = []
        empty = Resolution()
        for k, (code, t, c) in enumerate(zip(codes.tolist(), ts.tolist(), caps)):
            if code < 0:
                out.append(empty)
            elif timed[code]:
                out.append(self.endpoint(uniques[code], int(t), c, ip_only))
            else:
                out.append(untimed[code])
        return out


    def names(self, df: pd.DataFrame, col: str, ts: np.ndarray) -> tuple[pd.Series, pd.Series]:
        """Names and nodes of a large address column: each distinct value is resolved once, only values whose
        address had several owners look at the row's time."""
        codes, uniques = pd.factorize(df[col].astype(object), use_na_sentinel=True)
        k = len(uniques)
        names_u = np.empty(k + 1, dtype=object)      # the last slot serves missing values (code -1)
        nodes_u = np.empty(k + 1, dtype=object)
        timed_u = np.zeros(k + 1, dtype=bool)
        for n, text in enumerate(uniques):
            r = self.endpoint(text, NAT, UNTIMED)
            names_u[n], nodes_u[n] = r.name, r.node
            timed_u[n] = r.status == "ambiguous" and len({o.key for o in r.candidates}) > 1
        names, nodes = names_u[codes], nodes_u[codes]
        rows = np.flatnonzero(timed_u[codes])
        if len(rows):
            caps = df["capture"].astype(object).to_numpy() if "capture" in df.columns else np.full(len(df), None)
            for row in rows:
                r = self.endpoint(uniques[codes[row]], int(ts[row]), caps[row])
                names[row], nodes[row] = r.name, r.node
        return pd.Series(names, dtype="string"), pd.Series(nodes, dtype="string")

def _names(res: list[Resolution]) -> pd.Series:
    return pd.Series([r.name for r in res], dtype="string")


def _nodes(res: list[Resolution]) -> pd.Series:
    return pd.Series([r.node for r in res], dtype="string")


def _workload(r: Resolution) -> Owner | None:
    """The pod behind an address, unless it is a ztunnel (which presents the identity of the workload it carries)."""
    o = r.owner
    if o is None or o.kind != "pod" or o.role == "ztunnel":
        return None
    return o


def expected_identity(o: Owner | None, seen: str | None = None) -> str | None:
    """The pod's SPIFFE id; without a trust domain in the inventory, the one of the identity seen is used."""
    if o is None:
        return None
    ident = o.identity
    if o.trust_domain is None and isinstance(seen, str) and seen.startswith("spiffe://"):
        domain = seen[len("spiffe://"):].partition("/")[0]
        ident = f"spiffe://{domain}/ns/{o.namespace}/sa/{o.service_account or 'default'}"
    return ident


def _seen(v) -> str | None:
    return v if isinstance(v, str) and v else None


def enrich(a, inv: Inventory) -> list[tuple]:
    """Add the name columns to `a`'s tables in place; returns anomaly rows (capture, index, layer, kind, detail)."""
    rv = Resolver(inv)
    anomalies: list[tuple] = []

    c = a.connections
    if len(c):
        ts = _ns(c["first_ts"], len(c))
        (cn, cnode), (sn, snode) = rv.names(c, "client", ts), rv.names(c, "server", ts)
        a.connections = c.assign(client_name=cn.values, server_name=sn.values, client_node=cnode.values,
                                 server_node=snode.values)

    q = a.requests
    if len(q):
        ts = _ns(q["request_ts"].fillna(q["response_ts"]), len(q))
        a.requests = q.assign(client_name=rv.names(q, "client", ts)[0].values,
                              server_name=rv.names(q, "server", ts)[0].values)

    s = a.streams
    if len(s):
        ts = _ns(s["request_ts"], len(s))
        a.streams = s.assign(original_dst_name=rv.names(s, "original_dst", ts)[0].values)

    t = a.tunnels
    if len(t):
        ts = _ns(t["start"], len(t))
        cl, sv = rv.column(t, "client", ts), rv.column(t, "server", ts)
        exp_c, exp_s, check = [], [], []
        for row, rc, rs in zip(t.itertuples(index=False), cl, sv):
            ec = expected_identity(_workload(rc), _seen(row.client_spiffe))
            es = expected_identity(_workload(rs), _seen(row.server_spiffe))
            exp_c.append(ec)
            exp_s.append(es)
            verdicts = []
            for side, exp, seen, r, addr in (("client", ec, _seen(row.client_spiffe), rc, row.client),
                                             ("server", es, _seen(row.server_spiffe), rs, row.server)):
                if exp is None or seen is None:
                    continue
                if exp == seen:
                    verdicts.append("ok")
                else:
                    verdicts.append("mismatch")
                    anomalies.append((row.capture, None, "k8s", "k8s_identity_mismatch",
                                      f"tunnel {row.tunnel_id}: {side} {addr} ({r.name}) presented {seen}; "
                                      f"its service account says {exp}"))
            check.append("mismatch" if "mismatch" in verdicts else ("ok" if verdicts else None))
        a.tunnels = t.assign(client_name=_names(cl).values, server_name=_names(sv).values,
                             client_expected_spiffe=pd.Series(exp_c, dtype="string").values,
                             server_expected_spiffe=pd.Series(exp_s, dtype="string").values,
                             identity_check=pd.Series(check, dtype="string").values)

    f = a.flows
    if len(f):
        ts = _ns(f["start"], len(f))
        cl = rv.column(f, "client", ts)
        od = rv.column(f, "original_dst", ts)
        dp = rv.column(f, "dst_pod", ts)
        ident = lambda rs: pd.Series([expected_identity(_workload(r)) for r in rs], dtype="string").values  # noqa: E731
        a.flows = f.assign(client_name=_names(cl).values, original_dst_name=_names(od).values,
                           dst_pod_name=_names(dp).values, client_node=_nodes(cl).values,
                           dst_node=_nodes(dp).values, client_identity=ident(cl), dst_identity=ident(dp))

    h = a.hops
    if len(h):
        ts = _ns(h["src_ts_raw"], len(h))
        names = []
        for conn, t_ in zip(h["connection"].tolist(), ts):
            if not isinstance(conn, str) or " > " not in conn:
                names.append(None)
                continue
            left, _, right = conn.partition(" > ")
            ln, rn = rv.endpoint(left, int(t_)).name, rv.endpoint(right, int(t_)).name
            names.append(f"{ln or left} > {rn or right}" if (ln or rn) else None)
        a.hops = h.assign(connection_names=pd.Series(names, dtype="string").values)

    for ip, (cap, detail) in sorted(rv.ambiguous.items()):
        anomalies.append((cap, None, "k8s", "k8s_ambiguous_address", detail))
    return anomalies

"""The public Python API: `analyze(paths, keylog=None)` returns an `Analysis` holding every table.

Analysing one capture is a pure function (`analyze_capture`) of its path and settings, so captures can be
processed one per process (`jobs=`); the cross-capture work runs afterwards on the tables.
"""
from __future__ import annotations

import glob
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from hbonecap import tables
from hbonecap.capture.points import Point, guess_point
from hbonecap.capture.reader import redact_secrets
from hbonecap.config import DEFAULT_CONFIG, LINKTYPE_NAMES, DecodeConfig
from hbonecap.decode import anomalies_frame, decode_capture
from hbonecap.errors import CaptureError, HbonecapError

CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap", ".pcap.gz", ".pcapng.gz", ".dmp")


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Files, globs and directories (their capture files) to a sorted, de-duplicated list of files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).iterdir() if f.is_file() and _looks_like_capture(f.name))
            if not found:
                raise HbonecapError(f"{p}: no capture files in this directory")
            out.extend(found)
        elif any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise HbonecapError(f"{p}: no file matches")
            out.extend(found)
        else:
            out.append(p)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _looks_like_capture(name: str) -> bool:
    low = name.lower()
    return low.endswith(CAPTURE_SUFFIXES) or any(low.rsplit(".", 1)[-1].startswith(s.strip(".")) and
                                                 low.rsplit(".", 1)[-1][len(s) - 1:].isdigit()
                                                 for s in (".pcap", ".pcapng"))


@dataclass
class CaptureResult:
    """Tables of one capture (picklable)."""

    captures: pd.DataFrame
    packets: pd.DataFrame
    connections: pd.DataFrame
    anomalies: pd.DataFrame
    tunnels: pd.DataFrame
    streams: pd.DataFrame
    requests: pd.DataFrame
    secrets: int = 0
    streams_detail: object = field(default=None, repr=False)   # StreamResults (tunnel bytes, record timelines)


def analyze_capture(path: str, config: DecodeConfig = DEFAULT_CONFIG, point: Point | None = None,
                    name: str | None = None, keylog=None, streams: bool = True) -> CaptureResult:
    """Decode one capture and derive its per-capture tables. Raises CaptureError for a file that is not one.

    keylog: a `KeyLog` (not modified); TLS secrets embedded in the capture (pcapng DSBs) are added to a copy.
    streams: run the stream stages (TCP reassembly, TLS, HTTP/2, HBONE) over the TCP segments.
    """
    import copy

    from hbonecap.analysis.connections import connections
    from hbonecap.decode import segments_of_batch
    from hbonecap.streams.analyzer import StreamAnalyzer

    analyzer = None
    if streams:
        kl = None
        if keylog is not None:
            kl = copy.deepcopy(keylog)
            kl.anomalies = []      # reported once for the whole analysis, not per capture
        analyzer = StreamAnalyzer(kl, config)
    used_secrets = 0

    def feed(reader, batch, ctx) -> None:
        nonlocal used_secrets
        found = getattr(reader.walker, "secrets", [])
        while used_secrets < len(found):
            analyzer.add_secrets(found[used_secrets], name=f"{reader.info.name}#secrets{used_secrets + 1}")
            used_secrets += 1
        for seg in segments_of_batch(reader.info.name, batch, ctx):
            analyzer.feed(seg)

    dec = decode_capture(path, config, name=name, on_batch=feed if analyzer is not None else None)
    info = dec.info
    pk = dec.packets
    conns = connections(pk)
    detail = analyzer.close() if analyzer is not None else None
    tun = detail.frame("tunnels") if detail else tables.empty("tunnels")
    strm = detail.frame("streams") if detail else tables.empty("streams")
    reqs = detail.frame("requests") if detail else tables.empty("requests")
    anomalies = tables.concat("anomalies", [dec.anomalies, detail.frame("anomalies") if detail else None])
    tun, reqs = _link_connections(conns, tun, reqs)
    link_types = sorted({LINKTYPE_NAMES.get(i.link_type, f"linktype:{i.link_type}") for i in info.interfaces})
    ifnames = [i.name for i in info.interfaces if i.name]
    if point is None:
        vnis = set(pk["vni"].dropna().astype(int).unique().tolist()) if len(pk) else set()
        ports = set(pk["dport"].dropna().astype(int).unique().tolist()) if len(pk) else set()
        point = guess_point(info.name, ifnames, vnis, set(), ports)
    ts = pk["ts"].dropna() if len(pk) else pd.Series([], dtype=tables.TS)
    row = {
        "capture": [info.name], "path": [str(path)], "format": [info.format], "link_types": [",".join(link_types)],
        "interfaces": [",".join(ifnames)], "packets": [len(pk)], "bytes": [int(pk["caplen"].sum()) if len(pk) else 0],
        "first_ts": [ts.min() if len(ts) else pd.NaT], "last_ts": [ts.max() if len(ts) else pd.NaT],
        "snaplen": [max((i.snaplen for i in info.interfaces), default=0)],
        "comment": [redact_secrets(" | ".join(info.comments))], "secrets": [len(info.secrets)], "anomalies": [len(anomalies)],
        "role": [point.role], "node": [point.node], "role_reason": [point.reason],
    }
    return CaptureResult(tables.frame("captures", row), pk, conns, anomalies, tun, strm, reqs, len(info.secrets),
                         detail)


def _link_connections(conns: pd.DataFrame, tun: pd.DataFrame, reqs: pd.DataFrame):
    """Point tunnels and plain-TCP requests at connections.conn_id: same endpoints, overlapping in time."""
    if not len(conns):
        return tun, reqs
    key = conns[["client", "server", "conn_id", "first_ts", "last_ts"]]

    def link(df: pd.DataFrame, ts_col: str, ends: tuple[str, str] | None) -> pd.DataFrame:
        if not len(df) or ends is None:
            return df
        df = df.copy()
        ids = []
        for row in df.itertuples(index=False):
            a, b = getattr(row, ends[0]), getattr(row, ends[1])
            t = getattr(row, ts_col)
            m = key[((key["client"] == a) & (key["server"] == b)) | ((key["client"] == b) & (key["server"] == a))]
            if len(m) > 1 and not pd.isna(t):
                m = m[(m["first_ts"] <= t) & (m["last_ts"] >= t)]
            ids.append(int(m["conn_id"].iloc[0]) if len(m) else pd.NA)
        df["conn_id"] = pd.array(ids, dtype="Int64")
        return df

    tun = link(tun, "start", ("client", "server"))
    if len(reqs) and {"client", "server"} <= set(reqs.columns):
        reqs = link(reqs, "request_ts", ("client", "server"))
    return tun, reqs


class Analysis:
    """Everything hbonecap found in a set of captures. Tables are pandas DataFrames with declared dtypes
    (see `hbonecap.tables` and `Analysis.describe(name)`)."""

    TABLES = ("captures", "packets", "connections", "anomalies", "tunnels", "streams", "requests", "flows", "hops",
              "clock", "latency")

    def __init__(self, **frames: pd.DataFrame) -> None:
        for name in self.TABLES:
            setattr(self, name, frames.get(name, tables.empty(name)))
        # per capture: the stream stages' detail (tunnelled bytes with times, TLS record timelines)
        self.details: dict[str, object] = {}

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.TABLES:
            raise KeyError(f"no table {name!r}; tables: {', '.join(self.TABLES)}")
        return getattr(self, name)

    @staticmethod
    def describe(name: str) -> pd.DataFrame:
        return tables.describe(name)

    def save(self, directory: str | os.PathLike, format: str = "parquet") -> list[Path]:
        """Write every table to `directory` as Parquet or CSV; returns the files written."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = []
        for name in self.TABLES:
            df = self.table(name)
            f = d / f"{name}.{'parquet' if format == 'parquet' else 'csv'}"
            write_table(df, f, format)
            written.append(f)
        return written

    def plot_latency(self, ax=None, **kw):
        """Latency per hop and event (box plots with points); returns the Figure."""
        from hbonecap.plots import plot_latency

        return plot_latency(self, ax=ax, **kw)

    def plot_flow(self, flow_id: int, ax=None):
        """One flow's journey across the capture points; returns the Figure."""
        from hbonecap.plots import plot_flow

        return plot_flow(self, flow_id, ax=ax)

    def plot_timeline(self, ax=None, **kw):
        """Latency per hop over time; returns the Figure."""
        from hbonecap.plots import plot_timeline

        return plot_timeline(self, ax=ax, **kw)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={len(self.table(n))}" for n in self.TABLES)
        return f"<hbonecap.Analysis {parts}>"


def write_table(df: pd.DataFrame, path: Path, format: str) -> None:
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:   # dict columns (headers) as JSON text
            import json

            out[c] = out[c].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    if format == "parquet":
        out.to_parquet(path, index=False)
    elif format == "csv":
        out.to_csv(path, index=False)
    else:
        raise HbonecapError(f"unknown format {format!r} (parquet or csv)")


def analyze(paths, keylog: str | os.PathLike | None = None, *, points: Mapping[str, str] | None = None,
            config: DecodeConfig = DEFAULT_CONFIG, jobs: int | None = 1, on_error: str = "raise",
            streams: bool = True, correlate: bool = True,
            progress: Callable[[str, int, int], None] | None = None) -> Analysis:
    """Analyse captures.

    paths: files, globs or directories. keylog: an NSS key log file (TLS secrets embedded in pcapng files are
    used too). points: {file name: "ROLE[@NODE]"} overrides the capture-point guess. jobs: processes to use
    (None: one per core). on_error: "raise" (a file that is not a capture raises CaptureError) or "report"
    (it becomes an anomaly row and the others are analysed). streams: run TCP reassembly, TLS, HTTP/2 and HBONE
    (False: packets and connections only). correlate: tie connections across captures into flows, hops,
    clock offsets and latency (needs streams).
    """
    from hbonecap.capture.points import parse_point

    files = expand_paths(paths)
    if not files:
        raise HbonecapError("no capture files given")
    kl = None
    keylog_anomalies: list[tuple] = []
    if keylog is not None:
        from hbonecap.streams.tls.keylog import load

        kl = load(keylog)
        keylog_anomalies = [tuple(a.row(kl.name)[c] for c in ("capture", "index", "layer", "kind", "detail"))
                            for a in kl.anomalies]
    assigned: dict[str, Point] = {}
    for k, v in (points or {}).items():
        name, pt = parse_point(f"{k}={v}")
        assigned[os.path.basename(name)] = pt
    results: list[CaptureResult] = []
    errors: list[tuple] = []
    jobs = os.cpu_count() or 1 if jobs is None else max(1, jobs)
    names = _unique_names(files)
    args = [(f, config, assigned.get(os.path.basename(f)) or assigned.get(f), names[f], kl, streams) for f in files]
    if jobs > 1 and len(files) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(files))) as ex:
            futures = [ex.submit(_safe_analyze, *a) for a in args]
            for i, fut in enumerate(futures):
                res, err = fut.result()
                _collect(res, err, results, errors, on_error)
                if progress:
                    progress(files[i], i + 1, len(files))
    else:
        for i, a in enumerate(args):
            res, err = _safe_analyze(*a)
            _collect(res, err, results, errors, on_error)
            if progress:
                progress(files[i], i + 1, len(files))
    a = _assemble(results, errors + keylog_anomalies)
    if streams and correlate:
        from hbonecap.analysis.correlation import correlate as correlate_captures

        found = correlate_captures(a)
        for name in ("flows", "hops", "clock", "latency"):
            setattr(a, name, found.get(name, tables.empty(name)))
        if len(found.get("anomalies", ())):
            a.anomalies = tables.concat("anomalies", [a.anomalies, found["anomalies"]])
    return a


def _unique_names(files: list[str]) -> dict[str, str]:
    """Capture names are file names; where two files share one, the parent folder is prefixed."""
    base = [os.path.basename(f) for f in files]
    out = {}
    for f, b in zip(files, base):
        out[f] = b if base.count(b) == 1 else os.path.join(os.path.basename(os.path.dirname(f)), b)
    return out


def _safe_analyze(path, config, point, name, keylog, streams):
    try:
        return analyze_capture(path, config, point, name, keylog, streams), None
    except CaptureError as e:
        return None, e


def _collect(res, err, results, errors, on_error):
    if err is not None:
        if on_error == "raise":
            raise err
        errors.append((os.path.basename(err.path), None, "capture", "capture_unreadable", err.reason))
    else:
        results.append(res)


def _assemble(results: list[CaptureResult], errors: list[tuple]) -> Analysis:
    conns, tuns, reqs = [], [], []
    next_id = 0
    for r in results:
        c, t, q = r.connections, r.tunnels, r.requests
        if len(c):
            shift = next_id - int(c["conn_id"].min())
            c = c.copy()
            c["conn_id"] = c["conn_id"] + shift
            next_id += len(c)
            if len(t) and "conn_id" in t:
                t = t.copy()
                t["conn_id"] = t["conn_id"] + shift
            if len(q) and "conn_id" in q:
                q = q.copy()
                q["conn_id"] = q["conn_id"] + shift
        conns.append(c)
        tuns.append(t)
        reqs.append(q)
    anomalies = tables.concat("anomalies", [r.anomalies for r in results] + [anomalies_frame(errors)])
    a = Analysis(
        captures=tables.concat("captures", [r.captures for r in results]),
        packets=tables.concat("packets", [r.packets for r in results]),
        connections=tables.concat("connections", conns),
        anomalies=anomalies,
        tunnels=tables.concat("tunnels", tuns),
        streams=tables.concat("streams", [r.streams for r in results]),
        requests=tables.concat("requests", reqs),
    )
    a.details = {r.captures["capture"].iloc[0]: r.streams_detail for r in results}
    return a

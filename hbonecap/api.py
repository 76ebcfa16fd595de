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
    secrets: list[bytes] = field(default_factory=list, repr=False)


def analyze_capture(path: str, config: DecodeConfig = DEFAULT_CONFIG, point: Point | None = None,
                    name: str | None = None) -> CaptureResult:
    """Decode one capture and derive its per-capture tables. Raises CaptureError for a file that is not one."""
    from hbonecap.analysis.connections import connections

    dec = decode_capture(path, config, name=name)
    info = dec.info
    pk = dec.packets
    conns = connections(pk)
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
        "comment": [" | ".join(info.comments)], "secrets": [len(info.secrets)], "anomalies": [len(dec.anomalies)],
        "role": [point.role], "node": [point.node], "role_reason": [point.reason],
    }
    return CaptureResult(tables.frame("captures", row), pk, conns, dec.anomalies, info.secrets)


class Analysis:
    """Everything hbonecap found in a set of captures. Tables are pandas DataFrames with declared dtypes
    (see `hbonecap.tables` and `Analysis.describe(name)`)."""

    TABLES = ("captures", "packets", "connections", "anomalies", "tunnels", "streams", "requests")

    def __init__(self, **frames: pd.DataFrame) -> None:
        for name in self.TABLES:
            setattr(self, name, frames.get(name, tables.empty(name)))

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
            progress: Callable[[str, int, int], None] | None = None) -> Analysis:
    """Analyse captures.

    paths: files, globs or directories. keylog: an NSS key log file (TLS secrets embedded in pcapng files are
    used too). points: {file name: "ROLE[@NODE]"} overrides the capture-point guess. jobs: processes to use
    (None: one per core). on_error: "raise" (a file that is not a capture raises CaptureError) or "report"
    (it becomes an anomaly row and the others are analysed).
    """
    from hbonecap.capture.points import parse_point

    files = expand_paths(paths)
    if not files:
        raise HbonecapError("no capture files given")
    assigned: dict[str, Point] = {}
    for k, v in (points or {}).items():
        name, pt = parse_point(f"{k}={v}")
        assigned[os.path.basename(name)] = pt
    results: list[CaptureResult] = []
    errors: list[tuple] = []
    jobs = os.cpu_count() or 1 if jobs is None else max(1, jobs)
    names = _unique_names(files)
    args = [(f, config, assigned.get(os.path.basename(f)) or assigned.get(f), names[f]) for f in files]
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
    return _assemble(results, errors, keylog)


def _unique_names(files: list[str]) -> dict[str, str]:
    """Capture names are file names; where two files share one, the parent folder is prefixed."""
    base = [os.path.basename(f) for f in files]
    out = {}
    for f, b in zip(files, base):
        out[f] = b if base.count(b) == 1 else os.path.join(os.path.basename(os.path.dirname(f)), b)
    return out


def _safe_analyze(path, config, point, name):
    try:
        return analyze_capture(path, config, point, name), None
    except CaptureError as e:
        return None, e


def _collect(res, err, results, errors, on_error):
    if err is not None:
        if on_error == "raise":
            raise err
        errors.append((os.path.basename(err.path), None, "capture", "capture_unreadable", err.reason))
    else:
        results.append(res)


def _assemble(results: list[CaptureResult], errors: list[tuple], keylog) -> Analysis:
    conns = []
    next_id = 0
    for r in results:
        c = r.connections
        if len(c):
            c = c.copy()
            c["conn_id"] = np.arange(next_id, next_id + len(c))
            next_id += len(c)
        conns.append(c)
    anomalies = tables.concat("anomalies", [r.anomalies for r in results] + [anomalies_frame(errors)])
    return Analysis(
        captures=tables.concat("captures", [r.captures for r in results]),
        packets=tables.concat("packets", [r.packets for r in results]),
        connections=tables.concat("connections", conns),
        anomalies=anomalies,
    )

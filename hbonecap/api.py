"""The public Python API: `analyze(paths, keylog=None)` returns an `Analysis` holding every table.

Analysing one capture is a pure function (`analyze_capture`) of its path and settings, so captures can be
processed one per process (`jobs=`); the cross-capture work runs afterwards on the tables.
"""
from __future__ import annotations

import glob
import os
import re
import uuid
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


CAPTURE_NAME = re.compile(r"\.(pcapng|pcap|cap|dmp)(\d+)?(\.gz)?$", re.I)


def _looks_like_capture(name: str) -> bool:
    """Capture files in a directory: *.pcap, *.pcapng, *.cap, rotated *.pcap1 ..., and their .gz forms."""
    return bool(CAPTURE_NAME.search(name))


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
    inputs: object = field(default=None, repr=False)           # analysis.inputs.CaptureInputs (correlation's)
    decode_anomalies: object = field(default=None, repr=False)  # the decoder's rows (to redo the stream tables)

    def add_shares(self, others: list) -> None:
        """Merge the `StreamResults` of the shares of this capture's connections (`stream_share`) with this
        result's own (none when it was analysed with streams=False) and derive the stream tables again."""
        from hbonecap.streams.analyzer import merge_shares

        _stream_tables(self, merge_shares([p for p in [self.streams_detail] + list(others) if p is not None]))


def analyze_capture(path, config: DecodeConfig = DEFAULT_CONFIG, point: Point | None = None,
                    name: str | None = None, keylog=None, streams: bool = True,
                    embedded_keys: bool = True, inputs: bool = False, packets=True,
                    tunnel_bytes: bool = True, share: tuple[int, int] | None = None) -> CaptureResult:
    """Decode one capture point (a file, or its rotated files in order) and derive its per-capture tables.
    Raises CaptureError for a file that is not a capture.

    keylog: a `KeyLog` (not modified); TLS secrets embedded in the capture (pcapng DSBs) are added to a copy.
    streams: run the stream stages (TCP reassembly, TLS, HTTP/2, HBONE) over the TCP segments.
    embedded_keys: use the TLS secrets of pcapng Decryption Secrets Blocks (False: counted, not used).
    inputs: also compute what correlation needs from the packets (`analysis.inputs.CaptureInputs`).
    packets: True to return the packets table; False to leave it out (an empty table); a directory to write it
    there as this capture's partition of a Parquet dataset (`DIR/capture=NAME/`) and leave it out.
    tunnel_bytes: keep the CONNECT streams' tunnelled bytes (for `Analysis.unwrap`; up to 256 MB per capture).
    share: (0, n): the stream stages analyse only share 0 of n of the TCP connections; `stream_share` gives the
    other shares' results and `CaptureResult.add_shares` merges them (one big capture on several cores; `analyze`
    instead runs this with streams=False and every share with `stream_share`).
    """
    from hbonecap.analysis.connections import connections

    analyzer, on_batch = _stream_feed(config, name, keylog, embedded_keys, tunnel_bytes, share) if streams \
        else (None, None)
    if packets is True:
        dec = decode_capture(path, config, name=name, on_batch=on_batch)
        info, pk, decode_anomalies = dec.info, dec.packets, dec.anomalies
        conns = connections(pk)
        found = None
        if inputs:
            from hbonecap.analysis.inputs import capture_inputs

            found = capture_inputs(pk)
        ts = pk["ts"].dropna() if len(pk) else pd.Series([], dtype=tables.TS)
        n_packets, n_bytes = len(pk), int(pk["caplen"].sum()) if len(pk) else 0
        first_ts, last_ts = (ts.min(), ts.max()) if len(ts) else (pd.NaT, pd.NaT)
        vnis = set(pk["vni"].dropna().astype(int).unique().tolist()) if len(pk) else set()
        ports = set(pk["dport"].dropna().astype(int).unique().tolist()) if len(pk) else set()
    else:
        # the packets table is not returned: decode it part by part (written to Parquet if asked) and keep only
        # what the per-capture tables and correlation read from it, so memory follows the TCP rows' few columns
        info, decode_anomalies, b, tcp = _decode_lean(path, config, name, on_batch,
                                                      None if packets is False or packets is None else Path(packets))
        conns = connections(tcp)
        found = b.inputs(tcp) if inputs else None
        del tcp
        pk = tables.empty("packets")
        n_packets, n_bytes = b.packets, b.bytes
        first_ts = b.first_ts if b.first_ts is not None else pd.NaT
        last_ts = b.last_ts if b.last_ts is not None else pd.NaT
        vnis, ports = b.vnis, b.ports
    detail = analyzer.close() if analyzer is not None else None
    link_types = sorted({LINKTYPE_NAMES.get(i.link_type, f"linktype:{i.link_type}") for i in info.interfaces})
    ifnames = [i.name for i in info.interfaces if i.name]
    if point is None:
        point = guess_point(info.name, ifnames, vnis, set(), ports)
    row = {
        "capture": [info.name], "path": [info.path], "format": [info.format], "link_types": [",".join(link_types)],
        "interfaces": [",".join(ifnames)], "packets": [n_packets], "bytes": [n_bytes],
        "first_ts": [first_ts], "last_ts": [last_ts],
        "snaplen": [max((i.snaplen for i in info.interfaces), default=0)],
        "comment": [redact_secrets(" | ".join(info.comments))], "secrets": [len(info.secrets)], "anomalies": [0],
        "role": [point.role], "node": [point.node], "role_reason": [point.reason],
    }
    captures = tables.frame("captures", row)
    res = CaptureResult(captures, pk, conns, None, None, None, None, len(info.secrets), detail, found,
                        decode_anomalies)
    _stream_tables(res, detail)
    return res


def _stream_tables(res: CaptureResult, detail) -> None:
    """The stream tables of a capture from its `StreamResults` (None: no stream stages), its anomalies (the
    decoder's and the stages') and their count in the captures row."""
    res.streams_detail = detail
    tun = detail.frame("tunnels") if detail else tables.empty("tunnels")
    strm = detail.frame("streams") if detail else tables.empty("streams")
    reqs = detail.frame("requests") if detail else tables.empty("requests")
    res.anomalies = tables.concat("anomalies", [res.decode_anomalies, detail.frame("anomalies") if detail else None])
    res.tunnels, res.requests = _link_connections(res.connections, tun, reqs)
    res.streams = strm
    res.captures["anomalies"] = pd.array([len(res.anomalies)], dtype=res.captures["anomalies"].dtype)


def _stream_feed(config, name, keylog, embedded_keys: bool, tunnel_bytes: bool, share):
    """A `StreamAnalyzer` (for a share of the connections, if given) and the batch callback that feeds it."""
    import copy

    from hbonecap.layers.segments import tcp_runs_of_batch
    from hbonecap.streams.analyzer import StreamAnalyzer

    kl = None
    if keylog is not None:
        kl = copy.deepcopy(keylog)
        kl.anomalies = []      # reported once for the whole analysis, not per capture
    analyzer = StreamAnalyzer(kl, config, tunnel_bytes=tunnel_bytes, share=share)
    used_secrets = 0

    def feed(reader, batch, ctx) -> None:
        nonlocal used_secrets
        found = getattr(reader.walker, "secrets", []) if embedded_keys else ()
        while used_secrets < len(found):
            analyzer.add_secrets(found[used_secrets], name=f"{reader.info.name}#secrets{used_secrets + 1}")
            used_secrets += 1
        for item in tcp_runs_of_batch(name or reader.info.name, batch, ctx, index_offset=reader.index_offset):
            analyzer.feed_any(item)     # a TcpSegment, or a TcpRun of contiguous segments taken at once

    return analyzer, feed


def stream_share(path, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None, keylog=None,
                 embedded_keys: bool = True, tunnel_bytes: bool = True, share: tuple[int, int] = (1, 2)):
    """The stream stages of one capture point for share k of n of its TCP connections (`StreamAnalyzer(share=)`;
    (0, 1): all of them): every packet is decoded (each share follows every connection's lifetime) but no table is
    built. Returns the share's `StreamResults`, for `CaptureResult.add_shares`."""
    from hbonecap.decode import iter_decoded

    analyzer, feed = _stream_feed(config, name, keylog, embedded_keys, tunnel_bytes, share)
    for reader, batch, ctx in iter_decoded(path, config, name=name):
        feed(reader, batch, ctx)
    return analyzer.close()


def _decode_lean(path, config: DecodeConfig, name: str | None, on_batch, out: Path | None):
    """Decode one capture point part by part (`PacketStream`): each part goes to the capture's Parquet partition
    under `out` (if given) and into an `InputsBuilder`, then is dropped. Returns (info, decode anomalies, the
    builder, the TCP rows' table)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hbonecap.analysis.inputs import InputsBuilder
    from hbonecap.decode import PacketStream, _dictionary_columns, _parquet_schema

    builder = InputsBuilder()
    stream = PacketStream(path, config, name=name, on_batch=on_batch)
    writer = target = None
    try:
        for part in stream:
            if out is not None and writer is None:
                d = partition_dir(out, str(part["capture"].iloc[0]) if len(part) else (name or Path(str(path)).name))
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
                target = d / "part-0.parquet"
                schema = _parquet_schema(part.drop(columns=["capture"]))
                writer = pq.ParquetWriter(str(target), schema, use_dictionary=_dictionary_columns(schema))
            if writer is not None and len(part):
                writer.write_table(pa.Table.from_pandas(part.drop(columns=["capture"]), preserve_index=False)
                                   .cast(writer.schema))
            builder.add(part)
            del part
    except BaseException:
        if writer is not None:
            writer.close()
            target.unlink(missing_ok=True)
        raise
    if writer is not None:
        writer.close()
    elif out is not None:           # no packets at all: the partition holds an empty table
        write_packets_partition(tables.empty("packets"), out, stream.info.name)
    return stream.info, stream.anomalies, builder, builder.tcp()


def partition_dir(root: Path, capture: str) -> Path:
    """The folder of one capture in a packets dataset (hive style, the name URI-encoded as pyarrow reads it)."""
    from urllib.parse import quote

    return Path(root) / f"capture={quote(str(capture), safe='')}"


def write_packets_partition(pk: pd.DataFrame, root: Path, capture: str) -> Path:
    """One capture's packets table as its partition of the Parquet dataset at `root` (replacing an earlier one)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    d = partition_dir(root, capture)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    f = d / "part-0.parquet"
    pq.write_table(pa.Table.from_pandas(pk.drop(columns=["capture"]), preserve_index=False), f)
    return f


def _link_connections(conns: pd.DataFrame, tun: pd.DataFrame, reqs: pd.DataFrame):
    """Point tunnels and plain-TCP requests at connections.conn_id: same endpoints (either way round); among several
    such connections, the first one whose time span holds the row's time. One merge, not one scan per row."""
    if not len(conns):
        return tun, reqs

    def pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first = np.array([x <= y for x, y in zip(a.tolist(), b.tolist())], dtype=bool)
        return np.where(first, a, b), np.where(first, b, a)

    lo, hi = pair(conns["client"].to_numpy(object), conns["server"].to_numpy(object))
    key = pd.DataFrame({"lo": lo, "hi": hi, "conn_id": conns["conn_id"].to_numpy(), "first_ts": conns["first_ts"],
                        "last_ts": conns["last_ts"], "pos": np.arange(len(conns))}).reset_index(drop=True)

    def link(df: pd.DataFrame, ts_col: str, ends: tuple[str, str] | None) -> pd.DataFrame:
        if not len(df) or ends is None:
            return df
        df = df.copy()
        ok = (df[ends[0]].notna() & df[ends[1]].notna()).to_numpy(bool)
        a, b = pair(df[ends[0]].to_numpy(object)[ok], df[ends[1]].to_numpy(object)[ok])
        idx = np.flatnonzero(ok)
        rows = pd.DataFrame({"row": idx, "lo": a, "hi": b, "t": df[ts_col].iloc[idx].reset_index(drop=True)})
        m = rows.merge(key, on=["lo", "hi"])
        many = m.groupby("row")["pos"].transform("size").to_numpy() > 1
        t = pd.Series(m["t"])
        inside = ((m["first_ts"] <= t) & (m["last_ts"] >= t)).fillna(False).to_numpy(bool)
        m = m[~many | t.isna().to_numpy() | inside].sort_values(["row", "pos"]).drop_duplicates("row")
        ids = np.full(len(df), None, dtype=object)
        ids[m["row"].to_numpy()] = m["conn_id"].to_numpy(object)
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
              "clock", "latency", "tunnel_records")

    def __init__(self, packets_path: str | os.PathLike | None = None, **frames: pd.DataFrame) -> None:
        self._packets = None
        # where the packets table is when it was written to disk instead of kept (`analyze(packets=DIR)`)
        self.packets_path = Path(packets_path) if packets_path is not None else None
        for name in self.TABLES:
            if name == "packets" and "packets" not in frames and self.packets_path is not None:
                continue
            setattr(self, name, frames.get(name, tables.empty(name)))
        # per capture: the stream stages' detail (tunnelled bytes with times, TLS record timelines)
        self.details: dict[str, object] = {}
        # per capture: what correlation needs from its packets (analysis.inputs.CaptureInputs)
        self.inputs: dict[str, object] = {}

    @property
    def packets(self):
        """One row per packet. With `analyze(packets=DIR)` the table is on disk (a Parquet dataset partitioned by
        capture) and is read on first access: all of it in memory then; `pandas.read_parquet(DIR, filters=...)`
        reads a part."""
        if self._packets is None:
            self._packets = read_packets(self.packets_path) if self.packets_path is not None else \
                tables.empty("packets")
        return self._packets

    @packets.setter
    def packets(self, value) -> None:
        self._packets = value

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.TABLES:
            raise KeyError(f"no table {name!r}; tables: {', '.join(self.TABLES)}")
        return getattr(self, name)

    @staticmethod
    def describe(name: str) -> pd.DataFrame:
        return tables.describe(name)

    def save(self, directory: str | os.PathLike, format: str = "parquet") -> list[Path]:
        """Write every table to `directory`: Parquet (the packets table as a dataset partitioned by capture) or
        CSV, plus `hbonecap.json` describing them; `hbonecap.load(directory)` reads it back."""
        import json

        import hbonecap

        if format not in ("parquet", "csv"):
            raise HbonecapError(f"unknown format {format!r} (parquet or csv)")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = []
        for name in self.TABLES:
            df = self._packets if name == "packets" else self.table(name)
            if name == "packets" and format == "parquet":
                import shutil

                f = d / "packets"
                on_disk = self._packets is None and self.packets_path is not None
                if on_disk and f.resolve() == self.packets_path.resolve():
                    written.append(f)       # already there: the workers wrote it (analyze(packets=DIR))
                    continue
                if f.exists():
                    shutil.rmtree(f)
                if on_disk:
                    shutil.copytree(self.packets_path, f)
                else:
                    _write_partitioned(df, f)
            else:
                f = d / f"{name}.{format}"
                write_table(self.table(name), f, format)
            written.append(f)
        manifest = {"hbonecap": hbonecap.__version__, "format": format, "tables": list(self.TABLES)}
        (d / "hbonecap.json").write_text(json.dumps(manifest, indent=1))
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

    def unwrap(self, path: str | os.PathLike, geneve: bool = True) -> dict:
        """Write every tunnelled conversation (CONNECT streams, Geneve/VXLAN inner frames) as plain TCP to a
        pcapng for Wireshark; returns counts. See `hbonecap.export.inner`."""
        from hbonecap.export.inner import unwrap

        if len(self.streams) and any(d is not None and not getattr(d, "kept_tunnel_bytes", True)
                                     for d in self.details.values()):
            raise HbonecapError("this analysis did not keep the tunnelled bytes (analyze(..., tunnel_bytes=False), "
                                "as `hbonecap correlate` and `report` run it): analyse with tunnel_bytes=True, or "
                                "use `hbonecap unwrap`")
        out = unwrap(self, path, geneve=geneve)
        out.pop("views", None)
        return out

    def inner_packets(self, display_filter: str | None = None, path: str | os.PathLike | None = None):
        """Wireshark's dissectors on the tunnelled traffic: the unwrapped conversations read by tshark through
        pyshark, one row per packet (with the pyshark packet) and the flow it belongs to."""
        import tempfile

        from hbonecap.export.inner import read_inner

        if path is None:
            path = Path(tempfile.mkdtemp(prefix="hbonecap-")) / "inner.pcapng"
        self.unwrap(path)
        return read_inner(path, display_filter, self.flows)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={len(self.table(n))}" for n in self.TABLES)
        return f"<hbonecap.Analysis {parts}>"


def _write_partitioned(df, path: Path) -> None:
    """The packets table as a Parquet dataset partitioned by capture (a Dask DataFrame is written by its workers)."""
    if hasattr(df, "to_delayed"):      # dask.dataframe: categories differ per partition, write them as strings
        cats = [c.name for c in tables.SCHEMAS["packets"] if c.dtype == "category"]
        as_text = df.map_partitions(lambda p: p.astype({c: "string" for c in cats}),
                                    meta=tables.empty("packets").astype({c: "string" for c in cats}))
        as_text.to_parquet(str(path), partition_on=["capture"], write_index=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = df.copy()
    out["capture"] = out["capture"].astype(str)
    pq.write_to_dataset(pa.Table.from_pandas(out, preserve_index=False), root_path=str(path),
                        partition_cols=["capture"])


def load(directory: str | os.PathLike) -> "Analysis":
    """Read an analysis written by `Analysis.save` (or `hbonecap correlate -o DIR`) without decoding again."""
    import json

    d = Path(directory)
    mf = d / "hbonecap.json"
    if not mf.exists():
        raise HbonecapError(f"{d}: no hbonecap.json here (write one with Analysis.save or correlate -o)")
    manifest = json.loads(mf.read_text())
    fmt = manifest.get("format", "parquet")
    frames = {}
    for name in manifest.get("tables", Analysis.TABLES):
        if name not in tables.SCHEMAS:
            continue
        f = d / (name if (name == "packets" and fmt == "parquet") else f"{name}.{fmt}")
        if not f.exists():
            frames[name] = tables.empty(name)
            continue
        if name == "packets" and fmt == "parquet":
            frames[name] = read_packets(f)
            continue
        df = pd.read_parquet(f) if fmt == "parquet" else pd.read_csv(f, keep_default_na=True)
        frames[name] = _restore(name, df)
    return Analysis(**frames)


def read_packets(path: str | os.PathLike) -> pd.DataFrame:
    """A packets table written as a Parquet dataset partitioned by capture (`Analysis.save`, `analyze(packets=DIR)`),
    with the declared dtypes, in capture and packet order."""
    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return tables.empty("packets")
    return _restore("packets", pd.read_parquet(p))


def _restore(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Declared dtypes (and dict columns from JSON text) for a table read back from disk."""
    import json

    if not len(df):
        return tables.empty(name)
    data = {}
    for c in tables.SCHEMAS[name]:
        if c.name not in df.columns:
            continue
        v = df[c.name]
        if c.dtype == "object":
            v = v.map(lambda x: json.loads(x) if isinstance(x, str) and x[:1] in "{[" else x)
        elif c.dtype == tables.TS:
            v = pd.to_datetime(v, utc=True, format="ISO8601") if v.dtype == object or str(v.dtype).startswith(("str", "string")) else v
        elif c.dtype == "category":
            v = v.astype(object).where(v.notna(), None)
        data[c.name] = v.reset_index(drop=True)
    out = tables.frame(name, data)
    if name == "packets":
        out = out.sort_values(["capture", "index"], kind="stable").reset_index(drop=True)
    return out


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
            config: DecodeConfig = DEFAULT_CONFIG, jobs: int | None = 1, scheduler=None, engine: str = "pandas",
            on_error: str = "raise", streams: bool = True, correlate: bool = True,
            progress: Callable[[str, int, int], None] | None = None, k8s=None,
            embedded_keys: bool = True, packets: bool | str | os.PathLike = True,
            tunnel_bytes: bool = True) -> Analysis:
    """Analyse captures.

    paths: files, globs or directories; rotated files of one capture point (`tcpdump -C`: x.pcap, x.pcap1...;
    `tcpdump -G`: time-stamped names) are one capture, read in order. keylog: an NSS key log file (TLS secrets
    embedded in pcapng files are used too). points: {file name: "ROLE[@NODE]"}, or the path of a TOML/YAML
    manifest, overrides the capture-point guess. embedded_keys: use TLS secrets embedded in pcapng files (False:
    ignore them, e.g. to see what a keyless analysis of those captures gives).
    jobs: local processes, one capture point each (None: one per core). scheduler: a Dask scheduler address
    ("tcp://host:8786") or a `dask.distributed.Client`: one task per capture point on the cluster (retried if a
    worker dies). engine: "pandas", or "dask" to keep the packets table as a Dask DataFrame on the cluster
    (correlation's per-packet work and joins then run there: hbonecap/analysis/cluster.py).
    on_error: "raise" (a file that is not a capture raises CaptureError) or "report" (it becomes an anomaly row and
    the others are analysed). streams: run TCP reassembly, TLS, HTTP/2 and HBONE (False: packets and
    connections only). correlate: tie connections across captures into flows, hops, clock offsets and latency.
    k8s: kubectl/istioctl JSON (a file, a folder, a list of them, or a `hbonecap.k8s.Inventory`): captures without
    an explicit point are placed from their addresses, and tables gain names next to addresses (see hbonecap.k8s).
    packets: keep the packets table in memory (True, `a.packets`); leave it out (False: correlation does not need
    it, each capture's process hands over only what correlation reads from it, so memory does not grow with the
    packet count of the set); or a directory: each capture's process writes its packets there (a Parquet dataset
    partitioned by capture, replacing those captures' earlier partitions) and `a.packets` reads it on first access.
    tunnel_bytes: keep the tunnelled bytes of CONNECT streams (up to 1 MB per stream and direction, 256 MB per
    capture) for `a.unwrap()`; False when they are not wanted saves that memory (correlation does not need them).
    """
    from hbonecap.capture.points import parse_point

    if engine not in ("pandas", "dask"):
        raise HbonecapError(f"engine must be pandas or dask, not {engine!r}")
    if engine == "dask" and scheduler is None:
        raise HbonecapError("engine='dask' needs a scheduler (a Dask scheduler address or Client)")
    if engine == "dask" and packets is not True:
        raise HbonecapError("engine='dask' keeps the packets table on the cluster: packets must be True")
    if packets is not True and packets is not False:
        packets = str(Path(packets).resolve())
    files = expand_paths(paths)
    from hbonecap.k8s import as_inventory

    inventory = as_inventory(k8s)
    if not files:
        raise HbonecapError("no capture files given")
    kl = None
    keylog_anomalies: list[tuple] = []
    if keylog is not None:
        from hbonecap.streams.tls.keylog import load as load_keylog

        kl = load_keylog(keylog)
        keylog_anomalies = [tuple(a.row(kl.name)[c] for c in ("capture", "index", "layer", "kind", "detail"))
                            for a in kl.anomalies]
    assigned: dict[str, Point] = {}
    if isinstance(points, (str, os.PathLike)):
        from hbonecap.capture.points import load_manifest

        points = {k: v for k, v in load_manifest(points).items()}
    for k, v in (points or {}).items():
        if isinstance(v, Point):
            assigned[os.path.basename(k)] = v
            continue
        name, pt = parse_point(f"{k}={v}")
        assigned[os.path.basename(name)] = pt
    if packets is not True and packets is not False:      # (made once every argument has been checked)
        Path(packets).mkdir(parents=True, exist_ok=True)
    groups = group_rotated(files)
    names = _unique_names([g[0] for g in groups])
    args = []
    for base, members in groups:
        pt = assigned.get(os.path.basename(base)) or assigned.get(base) or \
            next((assigned[os.path.basename(m)] for m in members if os.path.basename(m) in assigned), None)
        args.append((members if len(members) > 1 else members[0], config, pt, names[base], kl, streams,
                     embedded_keys, engine != "dask", packets, tunnel_bytes))
    results: list[CaptureResult] = []
    errors: list[tuple] = []
    labels = [g[0] for g in groups]
    remote_packets = None
    if scheduler is not None:
        outcomes, remote_packets = _run_dask(scheduler, args, labels, progress, keep_packets=engine == "dask")
    elif (jobs := (os.cpu_count() or 1) if jobs is None else max(1, jobs)) > 1 and \
            (len(args) > 1 or (streams and max(_share_counts(groups, jobs), default=1) > 1)):
        # one process per capture point; with fewer points than jobs, a big point gets n processes: one builds
        # its tables without the stream stages, n - 1 run the stream stages for a share of its connections each
        # (every one decodes the whole capture)
        shares = _share_counts(groups, jobs) if streams else [1] * len(args)
        outcomes = []
        with ProcessPoolExecutor(max_workers=min(jobs, sum(shares))) as ex:
            futures: list = [None] * len(args)
            from hbonecap.decode import _size

            sizes = [sum(_size(m) for m in members) for _, members in groups]
            # split points first, then the largest first: the pool hands each process the next when it is free,
            # so the last to start is a small one (longest processing time first)
            for i in sorted(range(len(args)), key=lambda k: (-shares[k], -sizes[k])):
                x, n = args[i], shares[i]
                futures[i] = (ex.submit(_safe_analyze, *x) if n == 1 else
                              ex.submit(_safe_analyze, *x[:5], False, *x[6:]),
                              [ex.submit(_safe_share, x, (k, n - 1)) for k in range(n - 1)] if n > 1 else [])
            for i, (main, extra) in enumerate(futures):
                res, err = main.result()
                others = [f.result() for f in extra]
                if res is not None and others:
                    if any(o is None for o in others):     # a share could not read what share 0 read: redo whole
                        res, err = _safe_analyze(*args[i])
                    else:
                        res.add_shares(others)
                outcomes.append((res, err))
                if progress:
                    progress(labels[i], i + 1, len(args))
    else:
        outcomes = []
        for i, x in enumerate(args):
            outcomes.append(_safe_analyze(*x))
            if progress:
                progress(labels[i], i + 1, len(args))
    for res, err in outcomes:
        _collect(res, err, results, errors, on_error)
    a = _assemble(results, errors + keylog_anomalies, packets)
    if inventory is not None:
        from hbonecap.analysis.inputs import placement_groups
        from hbonecap.k8s import place_captures

        a.captures, placed = place_captures(a.captures, placement_groups(a), inventory)
        a.anomalies = tables.concat("anomalies", [a.anomalies, anomalies_frame(inventory.anomalies + placed)])
    if remote_packets is not None:
        # the packets stay on the cluster: correlation's per-packet work and joins run there (analysis/cluster.py)
        a.packets = remote_packets
    if streams and correlate:
        from hbonecap.analysis.correlation import correlate as correlate_captures

        found = correlate_captures(a)
        for name in ("flows", "hops", "clock", "latency"):
            setattr(a, name, found.get(name, tables.empty(name)))
        if len(found.get("anomalies", ())):
            a.anomalies = tables.concat("anomalies", [a.anomalies, found["anomalies"]])
    if streams:   # HBONE connections that were not decrypted: their TLS records, labelled (keyless)
        from hbonecap.analysis.keyless import records_table

        a.tunnel_records = records_table(a)
    if inventory is not None:
        from hbonecap.k8s import enrich

        a.anomalies = tables.concat("anomalies", [a.anomalies, anomalies_frame(enrich(a, inventory))])
    return a


ROTATED_C = re.compile(r"^(?P<base>.+\.(?:pcapng|pcap|cap))(?P<n>\d+)(?P<gz>\.gz)?$", re.I)
ROTATED_G = re.compile(r"^(?P<base>.+?)[-_.](?P<ts>\d{8}[-_T]?\d{4,6}|\d{4}-\d{2}-\d{2}[T_-]\d{2}[:.-]?\d{2}"
                       r"(?:[:.-]?\d{2})?|\d{10})(?P<ext>\.(?:pcapng|pcap|cap)(?:\.gz)?)$", re.I)


def group_rotated(files: list[str]) -> list[tuple[str, list[str]]]:
    """Group the rotated files of one capture point: (point path, files in order), in first-seen order.

    `tcpdump -C` writes x.pcap, x.pcap1, x.pcap2 ... (numbered in order); `tcpdump -G` with a strftime pattern
    writes time-stamped names (x-20261122-041300.pcap, x.2026-11-22_04:13:00.pcap, x-1795320782.pcap), ordered by
    their time stamps. A lone time-stamped file keeps its own name."""
    keyed: dict[str, list[tuple[tuple, str]]] = {}
    order: list[str] = []
    for f in files:
        d, n = os.path.split(f)
        m = ROTATED_C.match(n)
        if m:
            base, key = os.path.join(d, m.group("base") + (m.group("gz") or "")), (int(m.group("n")),)
        elif (m := ROTATED_G.match(n)) is not None:
            base, key = os.path.join(d, m.group("base") + m.group("ext")), (0, re.sub(r"\D", "", m.group("ts")))
        else:
            base, key = f, (-1,)
        if base not in keyed:
            keyed[base] = []
            order.append(base)
        keyed[base].append((key, f))
    out = []
    for base in order:
        members = [f for _, f in sorted(keyed[base], key=lambda kv: (kv[0][0], kv[0][1:]))]
        if len(members) == 1 and members[0] != base and not ROTATED_C.match(os.path.basename(members[0])):
            base = members[0]          # a lone time-stamped file is its own point
        out.append((base, members))
    return out


def _client(scheduler):
    try:
        from dask.distributed import Client
    except ImportError as e:
        raise HbonecapError("a Dask scheduler needs the dask extra: pip install 'hbonecap[dask]'") from e
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(scheduler, timeout="8s"), True
    except (OSError, TimeoutError) as e:
        raise HbonecapError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from e


def _run_dask(scheduler, args: list[tuple], labels: list[str], progress, keep_packets: bool = False):
    """One task per capture point on a Dask cluster; a task whose worker dies is retried by Dask.

    With keep_packets, each capture's packets table stays in the cluster's memory (a Dask DataFrame with one
    partition per capture point is returned beside the results); only the other tables travel back."""
    client, owned = _client(scheduler)
    from dask.distributed import as_completed

    try:
        # keys name the file for the dashboard and are unique per run: a key still held by an earlier analysis
        # (engine="dask" keeps its packets) would otherwise hand back that analysis's result
        run = uuid.uuid4().hex[:12]
        futures = [client.submit(_safe_analyze, *x, key=f"hbonecap-capture-{i}-{os.path.basename(labels[i])}-{run}",
                                 pure=False, retries=3) for i, x in enumerate(args)]
        remote = None
        if keep_packets:
            import dask.dataframe as dd

            parts = [client.submit(_packets_of, f, pure=False, retries=3) for f in futures]
            futures = [client.submit(_without_packets, f, pure=False, retries=3) for f in futures]
            remote = dd.from_delayed(parts, meta=tables.empty("packets"), verify_meta=False)
        done = 0
        for _ in as_completed(futures):
            done += 1
            if progress:
                progress(labels[min(done, len(labels)) - 1], done, len(futures))
        return client.gather(futures), remote
    finally:
        if owned and not keep_packets:
            client.close()


def _packets_of(outcome):
    res, _err = outcome
    return res.packets if res is not None else tables.empty("packets")


def _without_packets(outcome):
    import dataclasses

    res, err = outcome     # never mutate: _packets_of may read the same object on the same worker
    return (dataclasses.replace(res, packets=tables.empty("packets")) if res is not None else None), err


def _unique_names(files: list[str]) -> dict[str, str]:
    """Capture names are file names; where two files share one, the parent folder is prefixed."""
    base = [os.path.basename(f) for f in files]
    out = {}
    for f, b in zip(files, base):
        out[f] = b if base.count(b) == 1 else os.path.join(os.path.basename(os.path.dirname(f)), b)
    return out


def _safe_analyze(path, config, point, name, keylog, streams, embedded_keys=True, inputs=False, packets=True,
                  tunnel_bytes=True, share=None):
    try:
        return analyze_capture(path, config, point, name, keylog, streams, embedded_keys, inputs, packets,
                               tunnel_bytes, share), None
    except CaptureError as e:
        return None, e


def _safe_share(args: tuple, share: tuple[int, int]):
    """`stream_share` for the arguments of a `_safe_analyze` task; None if the capture cannot be read (share 0's
    task reports that)."""
    path, config, _point, name, keylog, _streams, embedded_keys, _inputs, _packets, tunnel_bytes = args
    try:
        return stream_share(path, config, name, keylog, embedded_keys, tunnel_bytes, share)
    except CaptureError:
        return None


MIN_SHARE_BYTES = 64 << 20     # a capture point's stream stages are split only into shares of at least this size


def _share_counts(groups: list[tuple[str, list[str]]], jobs: int) -> list[int]:
    """How many processes analyse each capture point: one each, and one more for the point with the most bytes
    per process while that is over a fair share (all bytes / jobs: one 5 GB capture beside small ones is split
    too), each process keeping at least MIN_SHARE_BYTES (each decodes the whole capture), at most `jobs`."""
    from hbonecap.decode import _size

    sizes = [sum(_size(m) for m in members) for _, members in groups]
    counts = [1] * len(groups)
    fair = sum(sizes) / max(jobs, 1)
    while groups:
        i = max(range(len(groups)), key=lambda k: sizes[k] / counts[k])
        if sizes[i] / counts[i] <= fair or sizes[i] / (counts[i] + 1) < MIN_SHARE_BYTES or counts[i] >= jobs:
            break
        counts[i] += 1
    return counts


def _collect(res, err, results, errors, on_error):
    if err is not None:
        if on_error == "raise":
            raise err
        errors.append((os.path.basename(err.path), None, "capture", "capture_unreadable", err.reason))
    else:
        results.append(res)


def _assemble(results: list[CaptureResult], errors: list[tuple], packets=True) -> Analysis:
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
    kept = {"packets": tables.concat("packets", [r.packets for r in results])} if packets is True else {}
    a = Analysis(
        packets_path=packets if packets is not True and packets is not False else None, **kept,
        captures=tables.concat("captures", [r.captures for r in results]),
        connections=tables.concat("connections", conns),
        anomalies=anomalies,
        tunnels=tables.concat("tunnels", tuns),
        streams=tables.concat("streams", [r.streams for r in results]),
        requests=tables.concat("requests", reqs),
    )
    a.details = {r.captures["capture"].iloc[0]: r.streams_detail for r in results}
    a.inputs = {r.captures["capture"].iloc[0]: r.inputs for r in results if r.inputs is not None}
    return a

"""The `hbonecap` command line: a thin typer layer over `hbonecap.api`.

Errors a user can fix (a file that is not a capture, a bad option) print one line on stderr and exit with 2.
Heavy modules are imported inside the commands so that `hbonecap --help` starts fast.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Packet-capture forensics for Istio ambient mesh (Geneve, HBONE, latency per hop).")


class TableName(str, Enum):
    captures = "captures"
    packets = "packets"
    flows = "flows"
    hops = "hops"
    clock = "clock"
    latency = "latency"
    connections = "connections"
    anomalies = "anomalies"
    tunnels = "tunnels"
    streams = "streams"
    requests = "requests"


class OutFormat(str, Enum):
    table = "table"
    csv = "csv"
    parquet = "parquet"


def _fail(message: str) -> None:
    typer.echo(f"hbonecap: {message}", err=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        from hbonecap import __version__

        typer.echo(f"hbonecap {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """hbonecap reads pcap/pcapng captures taken across an Istio ambient mesh."""


def _run_analysis(files: List[str], keylog: Optional[Path], points: Optional[List[str]], jobs: Optional[int],
                  quiet: bool = False, streams: bool = True, scheduler: Optional[str] = None, engine: str = "pandas",
                  manifest: Optional[Path] = None, k8s: Optional[List[Path]] = None, embedded_keys: bool = True,
                  packets=True, tunnel_bytes: bool = False):
    import hbonecap
    from hbonecap.errors import HbonecapError

    mapping = {}
    if manifest is not None:
        from hbonecap.capture.points import load_manifest

        try:
            mapping.update(load_manifest(manifest))
        except (HbonecapError, OSError) as e:
            _fail(f"{manifest}: {e}")
    for spec in points or []:
        name, _, rhs = spec.rpartition("=")
        if not name:
            _fail(f"--point {spec!r}: expected FILE=ROLE[@NODE]")
        mapping[name] = rhs
    try:
        if quiet or not sys.stderr.isatty():
            return hbonecap.analyze(files, keylog=keylog, points=mapping, jobs=jobs, streams=streams,
                                    scheduler=scheduler, engine=engine, k8s=k8s or None, embedded_keys=embedded_keys,
                                    packets=packets, tunnel_bytes=tunnel_bytes)
        from rich.progress import Progress

        with Progress(transient=True) as prog:
            task = prog.add_task("reading captures", total=None)

            def step(path, done, total):
                prog.update(task, total=total, completed=done, description=f"read {Path(path).name}")

            return hbonecap.analyze(files, keylog=keylog, points=mapping, jobs=jobs, streams=streams,
                                    scheduler=scheduler, engine=engine, progress=step, k8s=k8s or None,
                                    embedded_keys=embedded_keys, packets=packets,
                                    tunnel_bytes=tunnel_bytes)
    except HbonecapError as e:
        _fail(str(e))


def _emit(df, fmt: OutFormat, output: Optional[Path], limit: int, title: str, columns: Optional[str]) -> None:
    from hbonecap.api import write_table

    wanted = [c.strip() for c in columns.split(",")] if columns and columns != "all" else None
    if wanted:
        unknown = [c for c in wanted if c not in df.columns]
        if unknown:
            _fail(f"--columns: no column {', '.join(unknown)} in {title}")
    if fmt is OutFormat.table:
        if output is not None:
            _fail("--format table prints to the terminal; use csv or parquet with -o")
        show = wanted or (None if columns == "all" else DISPLAY_COLUMNS.get(title))
        print_table(df, title, limit, show)
        return
    if wanted:
        df = df[wanted]
    if fmt is OutFormat.parquet and output is None:
        _fail("--format parquet needs -o PATH")
    if output is None:
        import io

        buf = io.StringIO()
        df2 = df.copy()
        df2.to_csv(buf, index=False)
        sys.stdout.write(buf.getvalue())
        return
    write_table(df, output, fmt.value)
    typer.echo(f"wrote {len(df)} rows to {output}", err=True)


DISPLAY_COLUMNS = {
    "packets": ["index", "ts", "interface", "encap", "outer_src", "outer_dst", "src", "sport", "dst", "dport", "proto",
                "tcp_flags", "payload_len"],
    "connections": ["capture", "conn_id", "encap", "client", "client_name", "server", "server_name", "first_ts", "packets_c2s", "packets_s2c",
                    "bytes_c2s", "bytes_s2c", "retransmissions", "state", "handshake_rtt_ms"],
    "anomalies": ["capture", "index", "layer", "kind", "detail"],
    "clock": ["capture", "node", "offset_ms", "uncertainty_ms", "method"],
    "flows": ["flow_id", "client", "client_name", "original_dst", "original_dst_name", "dst_pod", "dst_pod_name", "start", "outcome", "match", "confidence", "last_seen",
              "bytes_c2s", "bytes_s2c"],
    "tunnels": ["capture", "tunnel_id", "client", "client_name", "server", "server_name", "tls_version", "decrypted",
                "why_not", "client_spiffe", "server_spiffe", "identity_check", "streams"],
}
K8S_COLUMNS = {"client_name", "server_name", "original_dst_name", "dst_pod_name", "identity_check", "pod"}
IGNORE_KEYS_HELP = ("Do not use TLS secrets embedded in pcapng files (Decryption Secrets Blocks): analyse their "
                    "HBONE without keys, as production captures are.")
K8S_HELP = ("kubectl get pods/svc/nodes/endpointslices -o json, or istioctl ztunnel-config workloads/services "
            "-o json: a file or a folder of them (repeat). Adds names next to addresses.")
TCP_FLAG_LETTERS = "FSRPAUEC"


def tcp_flags_text(v) -> str:
    if _isna(v):
        return ""
    v = int(v)
    return "".join(ch for i, ch in enumerate(TCP_FLAG_LETTERS) if v & (1 << i)) + ("N" if v & 0x100 else "")


def print_table(df, title: str, limit: int = 50, columns: list[str] | None = None) -> None:
    """Render a DataFrame as a rich table; values are shown as text (rich markup is not interpreted)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if columns:
        df = df[[c for c in columns if c in df.columns]]
        # Kubernetes name columns only when a --k8s inventory filled them
        empty = [c for c in df.columns if c in K8S_COLUMNS and not df[c].notna().any()]
        df = df.drop(columns=empty)
    if "tcp_flags" in df.columns:
        df = df.assign(tcp_flags=df["tcp_flags"].map(tcp_flags_text))
    console = Console(width=None if sys.stdout.isatty() else 200)
    t = Table(title=f"{title} ({len(df)} rows{', first ' + str(limit) if len(df) > limit else ''})")
    for c in df.columns:
        t.add_column(str(c), overflow="fold")
    for row in df.head(limit).itertuples(index=False):
        t.add_row(*[Text(_cell(v)) for v in row])
    console.print(t)


def _cell(v) -> str:
    if _isna(v):
        return ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _isna(v) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


@app.command()
def decode(
    files: List[str] = typer.Argument(..., help="Capture files, globs or directories."),
    table: TableName = typer.Option(TableName.packets, "--table", "-t", help="Which table to show."),
    fmt: OutFormat = typer.Option(OutFormat.table, "--format", "-f", help="table (terminal), csv or parquet."),
    # a str, not a Path: a trailing slash ("-o out/") asks for a directory and Path would drop it
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Write to this file (parquet: or a directory, existing or written "
                                              "with a trailing slash, one file per capture)."),
    limit: int = typer.Option(50, "--limit", help="Rows shown with --format table."),
    columns: Optional[str] = typer.Option(None, "--columns", "-c",
                                          help="Comma-separated columns, or 'all' (the terminal shows a summary set)."),
    keylog: Optional[Path] = typer.Option(None, "--keylog", "-k", help="NSS key log, for the tunnels/streams tables."),
    jobs: Optional[int] = typer.Option(1, "--jobs", "-j", help="Processes (one capture each)."),
    k8s: Optional[List[Path]] = typer.Option(None, "--k8s", help=K8S_HELP),
) -> None:
    """Decode captures (through Geneve and VXLAN) into the packets, connections or anomalies table."""
    if table is TableName.packets and fmt is OutFormat.parquet and output is not None:
        _stream_packets(files, output, jobs, columns)   # bounded memory, whatever the captures' size
        return
    needs_streams = table in (TableName.tunnels, TableName.streams, TableName.requests)
    a = _run_analysis(files, keylog, None, jobs, quiet=fmt is not OutFormat.table, streams=needs_streams, k8s=k8s)
    _emit(a.table(table.value), fmt, None if output is None else Path(output), limit, table.value, columns)


def _stream_packets(files: List[str], output: str, jobs: Optional[int], columns: Optional[str]) -> None:
    from hbonecap import tables
    from hbonecap.decode import write_packets
    from hbonecap.errors import HbonecapError

    wanted = [c.strip() for c in columns.split(",")] if columns and columns != "all" else None
    unknown = [c for c in wanted or [] if c not in tables.columns("packets")]
    if unknown:
        _fail(f"--columns: no column {', '.join(unknown)} in packets")
    try:
        rows, _ = write_packets(files, output, jobs=jobs, columns=wanted)
    except HbonecapError as e:
        _fail(str(e))
    typer.echo(f"wrote {rows} rows to {output}", err=True)


@app.command()
def correlate(
    files: List[str] = typer.Argument(..., help="Capture files, globs or directories."),
    keylog: Optional[Path] = typer.Option(None, "--keylog", "-k", help="NSS key log (SSLKEYLOGFILE) for TLS."),
    point: Optional[List[str]] = typer.Option(None, "--point", "-p", help="FILE=ROLE[@NODE] capture-point override."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", "-m", help="TOML/YAML file of capture points."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory to write every table to."),
    fmt: OutFormat = typer.Option(OutFormat.parquet, "--format", "-f", help="parquet or csv for -o."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Directory to write latency plots to (PNG and SVG)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Processes (default: one per core)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler, e.g. tcp://host:8786 "
                                            "(needs pip install 'hbonecap[dask]')."),
    engine: str = typer.Option("pandas", "--engine", help="pandas, or dask: keep the packets table on the cluster."),
    k8s: Optional[List[Path]] = typer.Option(None, "--k8s", help=K8S_HELP),
    ignore_embedded_keys: bool = typer.Option(False, "--ignore-embedded-keys", help=IGNORE_KEYS_HELP),
) -> None:
    """Analyse a capture set: capture points, clock offsets, flows, latency per hop, HBONE tunnels, anomalies."""
    if keylog is not None and not keylog.exists():
        _fail(f"{keylog}: key log not found")
    # the packets table is not shown here: with -o (Parquet) each capture's process writes it to OUTPUT/packets,
    # else it is not kept (memory then does not grow with the packet count); -f csv keeps it to write packets.csv
    packets: object = False
    if output is not None and fmt is OutFormat.parquet and engine != "dask":
        packets = output / "packets"
    elif output is not None or engine == "dask":
        packets = True
    a = _run_analysis(files, keylog, point, jobs, scheduler=scheduler, engine=engine, manifest=manifest, k8s=k8s,
                      embedded_keys=not ignore_embedded_keys, packets=packets)
    cap = a.captures[["capture", "format", "role", "node", "pod", "packets", "first_ts", "last_ts", "anomalies",
                      "role_reason"]]
    if not cap["pod"].notna().any():
        cap = cap.drop(columns=["pod"])
    if len(a.captures) and a.captures["path"].str.contains(";", regex=False).any():
        cap = cap.assign(files=a.captures["path"].str.count(";") + 1)
    print_table(cap, "captures and roles")
    if len(a.clock):
        print_table(a.clock, "clock offsets", 50, DISPLAY_COLUMNS["clock"])
    if len(a.flows):
        print_table(a.flows, "flows", 30, DISPLAY_COLUMNS["flows"])
        summary = a.flows.groupby(["outcome", "match"], observed=True).size().reset_index(name="flows")
        print_table(summary, "flows by outcome")
    if len(a.latency):
        print_table(a.latency, "latency per hop (ms)", 100)
    if len(a.tunnels):
        print_table(a.tunnels, "HBONE tunnels", 30, DISPLAY_COLUMNS["tunnels"])
    if len(a.anomalies):
        s = a.anomalies.groupby(["capture", "kind"]).size().reset_index(name="count")
        print_table(s, "anomalies")
    if output is not None:
        if fmt is OutFormat.table:
            _fail("-o writes parquet or csv")
        written = a.save(output, fmt.value)
        typer.echo(f"wrote {len(written)} tables to {output}", err=True)
    if plot is not None:
        plot.mkdir(parents=True, exist_ok=True)
        figures = {"latency": a.plot_latency(), "timeline": a.plot_timeline()}
        for fid in a.flows["flow_id"].head(20).tolist() if len(a.flows) else []:
            figures[f"flow-{fid}"] = a.plot_flow(int(fid))
        for name, fig in figures.items():
            for ext in ("png", "svg"):
                fig.savefig(plot / f"{name}.{ext}")
        typer.echo(f"wrote {2 * len(figures)} plots to {plot}", err=True)


@app.command()
def report(
    files: List[str] = typer.Argument(..., help="Capture files, globs or directories."),
    output: Path = typer.Option(..., "--output", "-o", help="HTML file to write."),
    keylog: Optional[Path] = typer.Option(None, "--keylog", "-k", help="NSS key log (SSLKEYLOGFILE) for TLS."),
    point: Optional[List[str]] = typer.Option(None, "--point", "-p", help="FILE=ROLE[@NODE] capture-point override."),
    title: str = typer.Option("hbonecap postmortem report", "--title", help="Report title."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Processes (default: one per core)."),
    k8s: Optional[List[Path]] = typer.Option(None, "--k8s", help=K8S_HELP),
    ignore_embedded_keys: bool = typer.Option(False, "--ignore-embedded-keys", help=IGNORE_KEYS_HELP),
) -> None:
    """Write the postmortem report: one self-contained HTML file."""
    if keylog is not None and not keylog.exists():
        _fail(f"{keylog}: key log not found")
    a = _run_analysis(files, keylog, point, jobs, k8s=k8s, embedded_keys=not ignore_embedded_keys, packets=False)
    from hbonecap.report import write_report

    write_report(a, output, title)
    typer.echo(f"wrote {output}", err=True)


@app.command()
def unwrap(
    files: List[str] = typer.Argument(..., help="Capture files, globs or directories."),
    output: Path = typer.Option(..., "--output", "-o", help="pcapng file to write."),
    keylog: Optional[Path] = typer.Option(None, "--keylog", "-k", help="NSS key log (SSLKEYLOGFILE) for TLS."),
    no_geneve: bool = typer.Option(False, "--no-geneve", help="Leave out Geneve/VXLAN inner frames."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Processes (default: one per core)."),
) -> None:
    """Write the tunnelled conversations as plain TCP to a pcapng that Wireshark dissects."""
    if keylog is not None and not keylog.exists():
        _fail(f"{keylog}: key log not found")
    a = _run_analysis(files, keylog, None, jobs, tunnel_bytes=True)
    counts = a.unwrap(output, geneve=not no_geneve)
    typer.echo(f"wrote {counts['packets']} packets ({counts['streams']} CONNECT streams, {counts['inner_frames']} "
               f"tunnel inner frames) to {output}", err=True)


class Era(str, Enum):
    geneve = "geneve"
    inpod = "inpod"


@app.command()
def plan(
    era: Era = typer.Option(Era.inpod, "--era", help="geneve (Istio 1.18-1.20 and earlier) or inpod (1.21+)."),
    namespace: Optional[List[str]] = typer.Option(None, "--namespace", "-n", help="Namespace of each --pod."),
    pod: Optional[List[str]] = typer.Option(None, "--pod", help="Pods to capture (repeat)."),
    node: Optional[List[str]] = typer.Option(None, "--node", help="Node names (repeat)."),
) -> None:
    """Print the commands to capture every point of the data path, with file names hbonecap recognises."""
    from hbonecap.guide import plan as make_plan

    pods = None
    if pod:
        nss = list(namespace or [])
        if nss and len(nss) not in (1, len(pod)):
            _fail("give one --namespace, or one per --pod")
        pods = [(nss[i] if len(nss) == len(pod) else (nss[0] if nss else "default"), p) for i, p in enumerate(pod)]
    typer.echo(make_plan(era.value, pods, node), nl=False)


@app.command()
def schema(table: Optional[TableName] = typer.Argument(None, help="Table to describe (all when omitted).")) -> None:
    """Describe the columns of the tables hbonecap produces."""
    from hbonecap import tables

    for name in ([table.value] if table else list(tables.SCHEMAS)):
        print_table(tables.describe(name), name, 200)


def main() -> None:
    app(prog_name="hbonecap")


if __name__ == "__main__":
    main()

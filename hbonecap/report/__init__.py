"""The postmortem report: one self-contained HTML file (no network needed to view it).

Order: what was analysed (captures, roles, nodes, time ranges, clock offsets with uncertainty); headline findings
(failed CONNECTs, resets, flows that vanish between two hops, slowest hops, tunnels that could not be decrypted
and why, retransmissions and gaps); latency per hop (table and plots); the slowest and the failed flows with
their journey plots; the flows; the anomalies.

With a Kubernetes inventory (`--k8s`), addresses are shown as names (pod, service, node) with the address in the
cell's title (hover), and identity mismatches and ambiguous addresses are findings.

Safety: every value that comes from a capture or a Kubernetes file is HTML-escaped (tables through pandas'
escaping or `html.escape`, title attributes quoted and escaped); plots are embedded as PNG data, never as markup; a Content-Security-Policy allows only the
report's own script (by hash), inline styles and data: images, so even a missed escape could not run a
capture's script or fetch anything. Key log contents never appear.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
from pathlib import Path

import pandas as pd

SORT_SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('thead th').forEach(function (th, col) {
    th.title = 'sort';
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-sort') !== 'asc';
      table.querySelectorAll('thead th').forEach(function (h) { h.removeAttribute('data-sort'); });
      th.setAttribute('data-sort', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].textContent, y = b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var r = (!isNaN(nx) && !isNaN(ny) && String(nx) === x.trim() && String(ny) === y.trim())
          ? nx - ny : x.localeCompare(y);
        return asc ? r : -r;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
""".strip()

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0; }
th, td { border: 1px solid #ccd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eef; cursor: pointer; position: sticky; top: 0; }
th[data-sort=asc]::after { content: ' \\25B2'; } th[data-sort=desc]::after { content: ' \\25BC'; }
.finding { margin: 0.3em 0; padding: 0.4em 0.8em; border-left: 4px solid #c60; background: #fff8f0; }
.finding.ok { border-color: #393; background: #f3fbf3; }
.meta { color: #666; font-size: 13px; } img { max-width: 100%; border: 1px solid #eee; }
.scroll { max-height: 480px; overflow: auto; }
""".strip()

MAX_TABLE_ROWS = 2000
MAX_FLOW_PLOTS = 6


# address column -> the Kubernetes name column beside it (filled by --k8s / analyze(k8s=...))
NAMED = {"client": "client_name", "server": "server_name", "original_dst": "original_dst_name",
         "dst_pod": "dst_pod_name", "connection": "connection_names"}
K8S_ONLY = ("pod", "client_node", "dst_node", "server_expected_spiffe", "identity_check")


def _named_cell(name, addr) -> str:
    """A name with its address on hover, or the address alone; both escaped."""
    if _e(name):
        return f'<span title="{_e(addr)}">{_e(name)}</span>'
    return _e(addr)


def _table(df: pd.DataFrame, columns: list[str] | None = None, limit: int = MAX_TABLE_ROWS) -> str:
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    df = df.drop(columns=[c for c in K8S_ONLY if c in df.columns and not df[c].notna().any()])
    named = {a: n for a, n in NAMED.items() if a in df.columns and n in df.columns and df[n].notna().any()}
    if named and len(df):
        return _html_table(df.drop(columns=list(named.values())), df, named, limit)
    df = df.drop(columns=[c for c in NAMED.values() if c in df.columns])
    df = df.drop(columns=[c for c in ("headers", "response_headers") if c in df.columns])
    note = ""
    if len(df) > limit:
        note = f"<p class=meta>first {limit} of {len(df)} rows</p>"
        df = df.head(limit)
    if not len(df):
        return "<p class=meta>none</p>"
    df = df.copy()
    for c in df.columns:
        if df[c].dtype.kind == "f":
            df[c] = df[c].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    return note + "<div class=scroll>" + df.to_html(index=False, escape=True, na_rep="", classes="sortable",
                                                   border=0) + "</div>"


def _html_table(shown: pd.DataFrame, full: pd.DataFrame, named: dict[str, str], limit: int) -> str:
    """Like `_table`, with names in the address columns and the address as the cell's title (hover)."""
    shown = shown.drop(columns=[c for c in ("headers", "response_headers") if c in shown.columns])
    note = f"<p class=meta>first {limit} of {len(shown)} rows</p>" if len(shown) > limit else ""
    shown, full = shown.head(limit), full.head(limit)
    head = "".join(f"<th>{_e(c)}{' (name)' if c in named else ''}</th>" for c in shown.columns)
    rows = []
    for i in range(len(shown)):
        cells = []
        for c in shown.columns:
            v = shown[c].iloc[i]
            if c in named:
                cells.append(f"<td>{_named_cell(full[named[c]].iloc[i], v)}</td>")
            elif isinstance(v, float):
                cells.append(f"<td>{'' if pd.isna(v) else f'{v:.3f}'}</td>")
            else:
                cells.append(f"<td>{_e(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (note + "<div class=scroll><table class=sortable><thead><tr>" + head + "</tr></thead><tbody>"
            + "\n".join(rows) + "</tbody></table></div>")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _e(v) -> str:
    return html.escape("" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v), quote=True)


def _who(row, addr: str) -> str:
    """A row's address as its Kubernetes name (address on hover) when known."""
    return _named_cell(getattr(row, NAMED[addr], None), getattr(row, addr, None))


def findings(a) -> list[tuple[str, bool]]:
    """Headline findings as (escaped HTML text, is_problem)."""
    out: list[tuple[str, bool]] = []
    s = a.streams
    if len(s):
        failed = s[s["status"].notna() & (s["status"] != 200)]
        if len(failed):
            parts = ", ".join(f"{_e(r.authority)} &rarr; {_e(r.status)}" for r in failed.head(10).itertuples())
            out.append((f"{len(failed)} CONNECT request(s) failed: {parts}", True))
    f = a.flows
    if len(f):
        for outcome in ("refused", "reset", "timeout"):
            bad = f[f["outcome"] == outcome]
            if len(bad):
                who = ", ".join(f"{_who(r, 'client')} &rarr; {_who(r, 'original_dst')}" for r in bad.head(8).itertuples())
                out.append((f"{len(bad)} flow(s) {outcome}: {who}", True))
        lost = f[f["outcome"] == "incomplete"]
        if len(lost):
            where = lost.groupby(lost["last_seen"].fillna("?")).size()
            txt = "; ".join(f"{n} last seen at {_e(k)}" for k, n in where.items())
            out.append((f"{len(lost)} flow(s) vanish before reaching the server: {txt}", True))
        unmatched = f[f["match"] == "unmatched"] if "match" in f else f.iloc[0:0]
        if len(unmatched):
            out.append((f"{len(unmatched)} connection(s) could not be tied to a flow", True))
        ok = f[f["outcome"] == "ok"]
        out.append((f"{len(ok)} of {len(f)} flow(s) completed normally "
                    f"({(f['match'] == 'exact').sum()} tied exactly, {(f['match'] == 'inferred').sum()} inferred)",
                    False))
    lat = a.latency
    if len(lat):
        top = lat.dropna(subset=["p99_ms"]).sort_values("p99_ms", ascending=False).head(3)
        txt = "; ".join(f"{_e(r.hop)} {_e(r.event)}: p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms, max {r.max_ms:.3f} ms"
                        for r in top.itertuples())
        out.append((f"Slowest hops: {txt}", False))
    t = a.tunnels
    if len(t) and "identity_check" in t.columns:
        bad = t[t["identity_check"] == "mismatch"]
        if len(bad):
            txt = "; ".join(f"{_who(r, 'server')}: presented {_e(r.server_spiffe)}, expected "
                            f"{_e(r.server_expected_spiffe)}" for r in bad.head(5).itertuples())
            out.append((f"{len(bad)} HBONE tunnel view(s) with a certificate identity that does not match the "
                        f"pod's service account: {txt}", True))
    if len(a.anomalies):
        amb = a.anomalies[a.anomalies["kind"] == "k8s_ambiguous_address"]
        if len(amb):
            out.append((f"{len(amb)} address(es) had several owners in the Kubernetes snapshots and could not be "
                        f"named: " + "; ".join(_e(d) for d in amb["detail"].head(5)), True))
    if len(t):
        nd = t[t["decrypted"] == False]  # noqa: E712
        if len(nd):
            why = nd.groupby(nd["why_not"].fillna("unknown")).size()
            txt = "; ".join(f"{n} &times; {_e(k)}" for k, n in why.items())
            out.append((f"{len(nd)} of {len(t)} HBONE tunnel view(s) not decrypted: {txt}", True))
    c = a.connections
    if len(c) and c["retransmissions"].sum():
        by = c.groupby("capture", observed=True)["retransmissions"].sum()
        by = by[by > 0].sort_values(ascending=False).head(5)
        out.append(("Retransmissions: " + "; ".join(f"{_e(k)}: {int(v)}" for k, v in by.items()), True))
    an = a.anomalies
    if len(an):
        gaps = an[an["kind"].str.contains("gap", na=False)]
        if len(gaps):
            out.append((f"{len(gaps)} TCP/stream gap(s) (bytes missing from a capture)", True))
        out.append((f"{len(an)} anomaly row(s) of {an['kind'].nunique()} kind(s) (see the last section)", True))
    if not out:
        out.append(("Nothing unusual found.", False))
    return out


def build_report(a, title: str = "hbonecap postmortem report") -> str:
    """The report as one HTML string."""
    import hbonecap
    from hbonecap import plots

    parts: list[str] = []
    caps = a.captures
    parts.append("<h2 id=analysed>What was analysed</h2>")
    if len(caps):
        span = f"{_e(caps['first_ts'].min())} &ndash; {_e(caps['last_ts'].max())}"
        parts.append(f"<p>{len(caps)} capture(s), {int(caps['packets'].sum())} packets, {span}.</p>")
    parts.append(_table(caps, ["capture", "role", "node", "pod", "role_reason", "format", "link_types", "interfaces",
                               "packets", "first_ts", "last_ts", "secrets", "anomalies"]))
    parts.append("<h3>Clock offsets</h3>")
    parts.append(_table(a.clock, ["capture", "node", "reference", "offset_ms", "uncertainty_ms", "method",
                                  "first_ts_raw", "first_ts", "last_ts_raw", "last_ts"]))
    parts.append("<h2 id=findings>Headline findings</h2>")
    for text, bad in findings(a):
        parts.append(f"<div class='finding{'' if bad else ' ok'}'>{text}</div>")
    parts.append("<h2 id=latency>Latency per hop</h2>")
    parts.append(_table(a.latency))
    if len(a.hops):
        parts.append(_png(plots.plot_latency(a)))
        parts.append(_png(plots.plot_timeline(a)))
    parts.append("<h2 id=journeys>Slowest and failed flows</h2>")
    f = a.flows
    if len(f):
        failed = f[f["outcome"] != "ok"].head(MAX_FLOW_PLOTS)
        dur = (f["end"] - f["start"]).dt.total_seconds()
        slow = f.assign(_d=dur)[f["outcome"] == "ok"].sort_values("_d", ascending=False).head(MAX_FLOW_PLOTS // 2)
        for label, group in (("Failed", failed), ("Slowest", slow)):
            for r in group.itertuples():
                parts.append(f"<h3>{label}: flow {_e(r.flow_id)} {_who(r, 'client')} &rarr; "
                             f"{_who(r, 'original_dst')} ({_e(r.outcome)})</h3>")
                parts.append(_png(plots.plot_flow(a, int(r.flow_id))))
    else:
        parts.append("<p class=meta>no flows</p>")
    parts.append("<h2 id=flows>Flows</h2>")
    parts.append(_table(f, ["flow_id", "client", "client_name", "original_dst", "original_dst_name", "dst_pod",
                            "dst_pod_name", "client_node", "dst_node", "path", "status", "trace_id", "start",
                            "end", "bytes_c2s", "bytes_s2c", "outcome", "last_seen", "match", "confidence",
                            "match_reason"]))
    parts.append("<h2 id=tunnels>HBONE tunnels and streams</h2>")
    parts.append(_table(a.tunnels, ["capture", "tunnel_id", "client", "client_name", "server", "server_name",
                                    "tls_version", "cipher_suite", "alpn", "decrypted", "why_not", "client_spiffe",
                                    "server_spiffe", "server_expected_spiffe", "identity_check", "streams"]))
    parts.append(_table(a.streams, ["capture", "tunnel_id", "stream_id", "authority", "original_dst",
                                    "original_dst_name", "forwarded_for",
                                    "trace_id", "baggage", "status", "request_ts", "response_ts", "end_reason",
                                    "bytes_c2s", "bytes_s2c", "inner"]))
    parts.append("<h2 id=anomalies>Anomalies</h2>")
    if len(a.anomalies):
        summary = a.anomalies.groupby(["layer", "kind"]).size().reset_index(name="count")
        parts.append(_table(summary))
    parts.append(_table(a.anomalies))
    script_hash = base64.b64encode(hashlib.sha256(SORT_SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; "
           "base-uri 'none'; form-action 'none'")
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=meta>generated {generated} by hbonecap {hbonecap.__version__}</p>"
        + "\n".join(parts)
        + f"<script>{SORT_SCRIPT}</script></body></html>\n"
    )


def write_report(a, path: str | Path, title: str = "hbonecap postmortem report") -> Path:
    p = Path(path)
    p.write_text(build_report(a, title), encoding="utf-8")
    return p

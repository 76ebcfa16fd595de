"""Plots of an analysis (matplotlib). Every function takes `ax=None`, returns the Figure and never shows it.

* `plot_latency`: latency per hop and event, box plots with the individual events as points, hops ordered along
  the path;
* `plot_flow`: one flow's journey as a sequence diagram, one lane per capture point, an arrow per event
  (SYN, CONNECT, 200, first bytes, FIN) from the time it left one end of a hop to the time it reached the other,
  with the hop latency written on it;
* `plot_timeline`: latency over time per hop, to see when it went bad.

With Kubernetes names (`analyze(k8s=...)`), flow titles read pod and Service names and the lanes of the journey
carry the pod of their end under the capture-point label.
"""
from __future__ import annotations

import pandas as pd

EVENT_ORDER = ("syn", "syn_ack", "connect", "connect_response", "first_request_byte", "first_response_byte", "fin",
               "fin_s2c")
EVENT_LABELS = {"syn": "SYN", "syn_ack": "SYN-ACK", "connect": "CONNECT", "connect_response": "CONNECT response",
                "first_request_byte": "first request byte", "first_response_byte": "first response byte",
                "fin": "FIN / END_STREAM", "fin_s2c": "FIN (server)"}


def _figure(ax, size=(10, 5)):
    # matplotlib.figure.Figure needs no GUI backend and is never shown: safe in servers, tests and notebooks
    # (a notebook displays a returned Figure itself).
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _empty(ax, text: str):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _hop_order(hops: pd.DataFrame) -> list[str]:
    order = hops.groupby("hop")["hop_index"].min().sort_values()
    return list(order.index)


def plot_latency(a, ax=None, events: tuple[str, ...] | None = None):
    """Distribution of latency per hop and event."""
    fig, ax = _figure(ax, (11, 5))
    hops = a.hops.dropna(subset=["latency_ms"]) if len(a.hops) else a.hops
    if events:
        hops = hops[hops["event"].isin(events)]
    if not len(hops):
        _empty(ax, "no hop latencies (no flow was seen at two capture points)")
        return fig
    order = _hop_order(hops)
    evs = [e for e in EVENT_ORDER if e in set(hops["event"])] + sorted(set(hops["event"]) - set(EVENT_ORDER))
    data, labels, positions = [], [], []
    pos = 0
    ticks = []
    for h in order:
        start = pos
        for e in evs:
            v = hops[(hops["hop"] == h) & (hops["event"] == e)]["latency_ms"].astype(float)
            if len(v):
                data.append(v.to_numpy())
                labels.append(EVENT_LABELS.get(e, e))
                positions.append(pos)
                pos += 1
        ticks.append(((start + pos - 1) / 2, h))
        pos += 1
    ax.boxplot(data, positions=positions, widths=0.6, showfliers=False)
    import numpy as np

    rng = np.random.default_rng(0)
    for p, d in zip(positions, data):
        ax.scatter(p + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6, color="tab:blue")
    ax.set_xticks(positions, labels, rotation=60, ha="right", fontsize=8)
    for x, h in ticks:
        ax.annotate(h, (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=9,
                    fontweight="bold")
    ax.set_ylabel("latency across the hop (ms)")
    ax.set_title("Latency per hop and event", pad=20)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _lanes(flow_hops: pd.DataFrame) -> list[str]:
    lanes: list[str] = []
    for h in flow_hops.sort_values("hop_index")["hop"].drop_duplicates():
        for end in (p.strip() for p in str(h).split("->")):
            if end not in lanes:
                lanes.append(end)
    return lanes


def _plain(text: str) -> str:
    """Text from a capture or a Kubernetes file shown as is: '$' would start matplotlib mathtext."""
    return str(text).replace("$", r"\$")


def _short(name) -> str | None:
    """'default/sleep-7d9:37162' -> 'default/sleep-7d9' (a lane is a process, not a port)."""
    if not isinstance(name, str) or not name:
        return None
    head, sep, tail = name.rpartition(":")
    return head if sep and tail.isdigit() else name


def _name_or(row, name_col: str, addr_col: str) -> str:
    v = row.get(name_col) if hasattr(row, "get") else None
    return str(v) if isinstance(v, str) and v else str(row[addr_col])


def lane_names(a, flow, lanes: list[str]) -> dict[str, str]:
    """Kubernetes names for a flow's lanes: the client's pod on the first lane, the destination pod on the last,
    and the pod placed on the captures named after a lane (captures.pod)."""
    out: dict[str, str] = {}
    caps = a.captures if "pod" in a.captures.columns else None
    for lane in lanes:
        if caps is not None and len(caps):
            m = caps[caps["capture"].astype(str).str.startswith(lane + "-") & caps["pod"].notna()]
            if len(m["pod"].unique()) == 1:
                out[lane] = str(m["pod"].iloc[0])
    if lanes:
        first = _short(flow.get("client_name"))
        if first:
            out[lanes[0]] = first
        last = _short(flow.get("dst_pod_name"))
        if last and len(lanes) > 1:
            out[lanes[-1]] = last
    return out


def plot_flow(a, flow_id: int, ax=None):
    """Sequence diagram of one flow across its capture points."""
    fig, ax = _figure(ax, (11, 6))
    fh = a.hops[a.hops["flow_id"] == flow_id] if len(a.hops) else a.hops
    flow = a.flows[a.flows["flow_id"] == flow_id] if len(a.flows) else a.flows
    if not len(flow):
        raise KeyError(f"no flow {flow_id}")
    f = flow.iloc[0]
    title = _plain(f"flow {flow_id}: {_name_or(f, 'client_name', 'client')} -> "
                   f"{_name_or(f, 'original_dst_name', 'original_dst')} ({f['outcome']}, {f['match']})")
    ev = fh.dropna(subset=["src_ts", "dst_ts"])
    if not len(ev):
        _empty(ax, title + "\nno event seen at both ends of a hop")
        return fig
    lanes = _lanes(fh)
    x = {name: i for i, name in enumerate(lanes)}
    t0 = min(ev["src_ts"].min(), ev["dst_ts"].min())
    ev = ev.sort_values(["src_ts", "hop_index"]).reset_index(drop=True)
    for i in range(len(lanes)):
        ax.axvline(i, color="0.7", lw=1)
    # one row per event, in time order (a sequence diagram); the real times are written at the right
    for row, r in enumerate(ev.itertuples(index=False)):
        left, right = (p.strip() for p in str(r.hop).split("->"))
        a_, b_ = (left, right) if r.direction == "c2s" else (right, left)
        color = "tab:blue" if r.direction == "c2s" else "tab:orange"
        ax.annotate("", xy=(x[b_], row + 0.6), xytext=(x[a_], row),
                    arrowprops=dict(arrowstyle="->", color=color, lw=1.3))
        ax.text((x[a_] + x[b_]) / 2, row + 0.3, f"{EVENT_LABELS.get(r.event, r.event)}  {r.latency_ms:.3f} ms",
                fontsize=7, ha="center", va="bottom", color=color,
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
        since = (r.src_ts - t0).total_seconds() * 1000
        ax.text(len(lanes) - 0.45, row, f"+{since:.3f} ms", fontsize=7, va="center", color="0.3")
    names = lane_names(a, f, lanes)
    ax.set_xticks(range(len(lanes)), [_plain(f"{lane}\n{names[lane]}" if lane in names else lane) for lane in lanes],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_ylim(len(ev), -1)
    ax.set_yticks([])
    ax.set_ylabel(f"events in time order (t0 = {t0.strftime('%H:%M:%S.%f')} UTC, corrected clocks)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.5, len(lanes) + 0.2)
    for side in ("right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    return fig


def plot_timeline(a, ax=None, event: str | None = None):
    """Latency over time per hop (one line per hop and event, or only `event`)."""
    fig, ax = _figure(ax, (11, 4.5))
    hops = a.hops.dropna(subset=["latency_ms", "src_ts"]) if len(a.hops) else a.hops
    if event:
        hops = hops[hops["event"] == event]
    if not len(hops):
        _empty(ax, "no hop latencies to plot over time")
        return fig
    for (h, e), g in hops.sort_values("src_ts").groupby(["hop", "event"], sort=False):
        ax.plot(g["src_ts"].dt.tz_convert(None), g["latency_ms"].astype(float), marker=".", lw=1,
                label=f"{h}: {EVENT_LABELS.get(e, e)}")
    ax.set_ylabel("latency across the hop (ms)")
    ax.set_xlabel("time (UTC, corrected)")
    ax.set_title("Latency per hop over time")
    ax.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return fig

"""Keyless HBONE: HTTP/2-over-TLS structure inferred from the TLS record layer alone.

Production ztunnel writes no key log, so most HBONE captures cannot be decrypted. What stays readable is the TLS
record layer (RFC 8446 section 5): per record its direction, content type, length and the capture times of its
first and last byte (`StreamResults.records`, built by `streams/tls/session.py`). This module reads HTTP/2
(RFC 9113) structure out of those sizes:

* handshake: plaintext handshake / ChangeCipherSpec records, and in TLS 1.3 the encrypted records sent in the same
  burst as a direction's last plaintext handshake record (EncryptedExtensions .. Finished; the client's
  Certificate, CertificateVerify, Finished after its ChangeCipherSpec);
* the first application record of the client is the connection preface + SETTINGS, the server's first is its
  SETTINGS; the first empty frame (9 bytes of frame header, no payload) after the peer's SETTINGS is its ACK;
* 9-byte payloads later are empty frames: END_STREAM DATA (the end of a tunnelled direction);
* 17-byte payloads (8-byte frames) are PING when answered by one of the same size the other way within
  `PING_PAIR_NS`, GOAWAY when nothing but alerts follow them in that direction;
* 13-byte payloads (4-byte frames) are WINDOW_UPDATE or RST_STREAM (`control`); payloads under 9 are encrypted
  alerts (close_notify);
* other records: a client record answered, first-in first-out, by a small server record (<= `RESPONSE_MAX`
  bytes: `:status` in HPACK) is a new stream's HEADERS (`headers`, numbered in order: stream id 2n-1 when the
  connection was seen from its handshake) and the answer its `response`; anything else is `data`, whose tunnelled
  payload is estimated as the record's plaintext minus one 9-byte frame header per started 16 KiB frame.

Sizes: a TLS 1.3 record costs 22 bytes on the wire (5-byte header, 1-byte inner content type, 16-byte AEAD tag);
the timeline's length excludes the 5-byte header, so a record carries `length - 17` bytes of HTTP/2.
`compare(decrypted, keyless)` measures a keyless analysis against the decrypted analysis of the same captures.

Limits: records can carry several frames and frames can span records, so every label is an inference (a HEADERS
small enough to look like a WINDOW_UPDATE, a DATA record answered by a small one, a preface written in the same
burst as the client's Finished are misread); TLS 1.2 and TLS 1.3 without middlebox-compatibility
ChangeCipherSpec have their encrypted handshake records labelled as application records. Pure: no I/O.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pandas as pd

HANDSHAKE, CHANGE_CIPHER_SPEC, ALERT, APPLICATION_DATA = 22, 20, 21, 23
RECORD_OVERHEAD = 17          # inner content type + AEAD tag, inside the record length (22 with the 5-byte header)
FRAME_HEADER = 9
MAX_FRAME = 16384             # default SETTINGS_MAX_FRAME_SIZE
PREFACE = 24                  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RESPONSE_MAX = 64 + FRAME_HEADER
PING_PAIR_NS = 1_000_000_000  # a PING is answered within a second
CONTINUATION_NS = 1_000_000   # a record right after a full one (within 1 ms) continues the same write


@dataclass(slots=True)
class InferredRecord:
    """One TLS record with what it most likely carries."""

    index: int                # position in the connection's record timeline
    direction: int            # 0 client to server, 1 back
    ts_first: int
    ts_last: int
    content_type: int
    length: int               # record length (without the 5-byte header)
    kind: str                 # handshake, change_cipher_spec, alert, preface_settings, settings, settings_ack,
                              # headers, response, data, end_stream, control, ping, ping_ack, goaway
    payload: int              # HTTP/2 bytes for application records; estimated tunnelled bytes for data
    stream: int | None = None  # inferred stream number (1, 2, ...) of headers / response records

    @property
    def h2_bytes(self) -> int:
        return max(self.length - RECORD_OVERHEAD, 0)


def data_payload(h2_bytes: int) -> int:
    """Tunnelled bytes in a DATA record: its HTTP/2 bytes minus one frame header per started frame."""
    if h2_bytes <= FRAME_HEADER:
        return 0
    frames = -(-h2_bytes // (MAX_FRAME + FRAME_HEADER))
    return max(h2_bytes - FRAME_HEADER * frames, 0)


def infer_records(timeline) -> list[InferredRecord]:
    """Label every record of one TLS connection's timeline ((direction, ts_first, ts_last, type, length) tuples,
    in capture order)."""
    out: list[InferredRecord] = []
    last_plain = [-1, -1]          # index of each direction's last plaintext handshake / CCS record
    for i, (d, t0, t1, ct, ln) in enumerate(timeline):
        d = int(d) & 1
        kind = {HANDSHAKE: "handshake", CHANGE_CIPHER_SPEC: "change_cipher_spec", ALERT: "alert"}.get(int(ct), "app")
        if kind in ("handshake", "change_cipher_spec"):
            last_plain[d] = i
        out.append(InferredRecord(i, d, int(t0), int(t1), int(ct), int(ln), kind, 0))
    # TLS 1.3: encrypted handshake records follow a direction's last plaintext one in the same burst
    for d in (0, 1):
        j = last_plain[d]
        if j < 0:
            continue
        prev_end = out[j].ts_last
        for r in out[j + 1:]:
            if r.direction != d:
                continue
            if r.kind != "app" or r.ts_first > prev_end:
                break
            r.kind = "handshake"
            prev_end = r.ts_last
    seen_app = [False, False]
    settings_unacked = [False, False]     # a SETTINGS sent by direction d waits for the peer's ACK
    pending: deque[InferredRecord] = deque()   # client records that may open a stream, waiting for an answer
    answered = 0                          # streams answered whose first client DATA is still to come
    streams = 0
    write: list[InferredRecord | None] = [None, None]   # a write split into full records, per direction
    for r in out:
        if r.kind != "app":
            continue
        d, n = r.direction, r.h2_bytes
        r.payload = n
        head = write[d]
        write[d] = None
        if head is not None and r.ts_first <= head.ts_last + CONTINUATION_NS:
            # the rest of a write that filled whole records: the same frames go on
            r.kind, r.payload = "data", 0
            head.payload += n
            if n >= MAX_FRAME:
                write[d] = head
            continue
        if n < FRAME_HEADER:
            r.kind = "alert"
        elif not seen_app[d] and (d == 1 or n >= PREFACE + FRAME_HEADER):
            r.kind = "preface_settings" if d == 0 else "settings"
            settings_unacked[d] = True
        elif n == FRAME_HEADER:
            if settings_unacked[1 - d]:
                r.kind = "settings_ack"
                settings_unacked[1 - d] = False
            else:
                r.kind = "end_stream"
            r.payload = 0
        elif n == FRAME_HEADER + 8:
            r.kind = "ping"
        elif n == FRAME_HEADER + 4:
            r.kind = "control"
        elif d == 0:
            r.kind = "data"
            if answered > 0:          # a stream's client DATA follows its answer (ztunnel waits for the 200)
                answered -= 1
            else:
                pending.append(r)
        elif n <= RESPONSE_MAX and pending:
            req = pending.popleft()
            streams += 1
            req.kind, req.stream = "headers", streams
            r.kind, r.stream = "response", streams
            answered += 1
        else:
            r.kind = "data"
        if r.kind == "data" and n >= MAX_FRAME:
            write[d] = r
        seen_app[d] = True
    for r in out:
        if r.kind == "data" and r.payload:
            r.payload = data_payload(r.payload)
    _pings_and_goaways(out)
    return out


def _pings_and_goaways(out: list[InferredRecord]) -> None:
    eight = [r for r in out if r.kind == "ping"]
    for r in eight:
        if r.kind != "ping":
            continue
        answer = next((x for x in out[r.index + 1:] if x.kind == "ping" and x.direction != r.direction
                       and x.ts_first - r.ts_last <= PING_PAIR_NS), None)
        if answer is not None and answer.ts_first - r.ts_last <= PING_PAIR_NS:
            answer.kind = "ping_ack"
            continue
        later = [x for x in out[r.index + 1:] if x.direction == r.direction]
        if all(x.kind == "alert" for x in later):
            r.kind = "goaway"


def stream_ids(records: list[InferredRecord]) -> dict[int, int]:
    """Inferred stream number -> HTTP/2 stream id, when the connection was seen from its handshake (client
    streams are odd and opened in increasing order); empty otherwise."""
    if not any(r.kind == "handshake" for r in records):
        return {}
    return {r.stream: 2 * r.stream - 1 for r in records if r.kind == "headers" and r.stream}


def records_table(a):
    """The `tunnel_records` table: every record of every HBONE connection that was not decrypted, labelled."""
    from hbonecap import tables

    tun = a.tunnels
    if tun.empty or not getattr(a, "details", None):
        return tables.empty("tunnel_records")
    cols: dict[str, list] = {c: [] for c in tables.columns("tunnel_records")}
    for r in tun.itertuples(index=False):
        if r.decrypted is True or (pd.notna(r.depth) and int(r.depth) > 0):
            continue
        detail = a.details.get(r.capture)
        timeline = getattr(detail, "records", {}).get(r.tunnel_id) if detail is not None else None
        if not timeline:
            continue
        recs = infer_records(timeline)
        ids = stream_ids(recs)
        for x in recs:
            cols["capture"].append(r.capture)
            cols["tunnel_id"].append(r.tunnel_id)
            cols["record"].append(x.index)
            cols["direction"].append("c2s" if x.direction == 0 else "s2c")
            cols["ts_first"].append(x.ts_first)
            cols["ts_last"].append(x.ts_last)
            cols["content_type"].append(x.content_type)
            cols["length"].append(x.length)
            cols["kind"].append(x.kind)
            cols["payload"].append(x.payload if x.kind not in ("handshake", "change_cipher_spec") else None)
            cols["stream"].append(x.stream)
            cols["stream_id"].append(ids.get(x.stream) if x.stream else None)
    if not cols["capture"]:
        return tables.empty("tunnel_records")
    for c in ("ts_first", "ts_last"):
        cols[c] = pd.to_datetime(np.asarray(cols[c], dtype=np.int64), utc=True)
    return tables.frame("tunnel_records", cols)


# --- evaluation --------------------------------------------------------------------------------------------------
def compare(decrypted, keyless) -> dict:
    """A keyless analysis against the decrypted analysis of the same captures.

    Reference flows: the decrypted analysis's exact flows with a client connection. A keyless flow of the same
    client connection is tied right when its HBONE connection (client and server), its destination and its hop
    connections equal the reference's. Hop events present in both (same flow, hop, event) are compared: corrected
    time of the event and latency of the hop. Returns figures and the per-event differences."""
    ref = decrypted.flows
    ref = ref[(ref["match"] == "exact") & ref["client"].notna()]
    kf = keyless.flows
    kl_by_client = {c: g for c, g in kf.groupby("client")} if len(kf) else {}
    tied = wrong = wrong_confident = 0
    wrong_rows, diffs = [], []
    for f in ref.itertuples(index=False):
        g = kl_by_client.get(f.client)
        if g is None or len(g) != 1:
            wrong += 1
            wrong_rows.append((f.client, "no single keyless flow", None))
            continue
        k = g.iloc[0]
        ok = (k["hbone_client"] == f.hbone_client and k["hbone_server"] == f.hbone_server
              and k["dst_pod"] == f.dst_pod and k["match"] == "inferred")
        rh = _hop_connections(decrypted.hops, f.flow_id)
        kh = _hop_connections(keyless.hops, k["flow_id"])
        ok = ok and rh == kh
        if ok:
            tied += 1
        else:
            wrong += 1
            wrong_rows.append((f.client, f"{k['hbone_client']} > {k['hbone_server']} to {k['dst_pod']}",
                               float(k["confidence"])))
            if k["match"] == "inferred" and float(k["confidence"]) > 0.9:
                wrong_confident += 1
        if not ok:
            continue
        rhop = decrypted.hops[decrypted.hops["flow_id"] == f.flow_id]
        khop = keyless.hops[keyless.hops["flow_id"] == k["flow_id"]]
        m = rhop.merge(khop, on=["hop_index", "event"], suffixes=("_ref", "_kl"))
        for r in m.itertuples(index=False):
            dt = (r.src_ts_kl - r.src_ts_ref).value / 1e6 if pd.notna(r.src_ts_kl) and pd.notna(r.src_ts_ref) \
                else np.nan
            dl = abs(r.latency_ms_kl - r.latency_ms_ref) if pd.notna(r.latency_ms_kl) and \
                pd.notna(r.latency_ms_ref) else np.nan
            diffs.append({"client": f.client, "hop_index": r.hop_index, "kind": r.kind_ref, "event": r.event,
                          "time_ms": dt, "latency_ms": dl})
    d = pd.DataFrame(diffs, columns=["client", "hop_index", "kind", "event", "time_ms", "latency_ms"])
    hb = d[d["kind"] == "hbone"]
    ref_hbone = decrypted.hops[decrypted.hops["kind"] == "hbone"]
    ref_hbone = ref_hbone[ref_hbone["flow_id"].isin(ref["flow_id"])]
    n = len(ref)
    return {
        "flows": n, "tied": tied, "tied_pct": 100.0 * tied / n if n else float("nan"),
        "wrong": wrong, "wrong_confident": wrong_confident, "wrong_rows": wrong_rows,
        "hbone_events_ref": int(len(ref_hbone.drop_duplicates(["flow_id", "hop_index", "event"]))),
        "hbone_events_compared": int(len(hb)),
        "worst_latency_ms": float(d["latency_ms"].max()) if d["latency_ms"].notna().any() else float("nan"),
        "worst_hbone_time_ms": float(hb["time_ms"].abs().max()) if hb["time_ms"].notna().any() else float("nan"),
        "min_confidence": float(kf.loc[kf["match"] == "inferred", "confidence"].min()) if len(kf) else float("nan"),
        "diffs": d,
    }


def _hop_connections(hops: pd.DataFrame, flow_id) -> list[tuple]:
    h = hops[hops["flow_id"] == flow_id].drop_duplicates("hop_index").sort_values("hop_index")
    return list(zip(h["kind"], h["connection"]))

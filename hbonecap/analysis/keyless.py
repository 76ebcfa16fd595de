"""Keyless HBONE: HTTP/2-over-TLS structure inferred from the TLS record layer alone.

Production ztunnel writes no key log, so most HBONE captures cannot be decrypted. What stays readable is the TLS
record layer (RFC 8446 section 5; RFC 5246 section 6.2 for TLS 1.2): per record its direction, content type,
length and the capture times of its first and last byte (`StreamResults.records`, built by
`streams/tls/session.py`). This module reads HTTP/2 (RFC 9113) structure out of those sizes:

* version: a handshake record after a direction's ChangeCipherSpec is a TLS 1.2 encrypted Finished (TLS 1.3 sends
  none); TLS 1.2 application records are all application data, with the overhead (explicit nonce, tag) measured as
  the Finished record's length minus its 16-byte message;
* TLS 1.3 handshake: the server's encrypted records in the burst of its last plaintext one (ServerHello or the
  compatibility CCS) are EncryptedExtensions .. Finished; the client's first encrypted records after that, in one
  burst, are (Certificate, CertificateVerify,) Finished, ending at the first record of a Finished's size (53 or 69
  bytes: SHA-256 / SHA-384), with or without a compatibility CCS; server records larger than a server preface
  before its first SETTINGS-sized one are NewSessionTickets;
* the first application record of the client is the connection preface + SETTINGS, the server's first is its
  SETTINGS; the first empty frame (9 bytes of frame header, no payload) after the peer's SETTINGS is its ACK;
* 9-byte payloads later are empty frames: END_STREAM DATA (the end of a tunnelled direction);
* 17-byte payloads (8-byte frames) are PING when answered by one of the same size the other way within
  `PING_PAIR_NS`, GOAWAY when nothing but alerts follow them in that direction;
* 13-byte payloads (4-byte frames) are WINDOW_UPDATE or RST_STREAM (`control`); payloads under 9 are encrypted
  alerts (close_notify);
* other records: a client record answered, first-in first-out, by a small server record (<= `RESPONSE_MAX`
  bytes: `:status` in HPACK) is a new stream's HEADERS (`headers`, numbered in order: stream id 2n-1 when the
  connection was seen from its handshake) and the answer its `response`. After an answer of the connection's
  most common response size (':status 200') the client's next record is the stream's DATA, unless it has the size
  of the CONNECTs before it (HPACK-indexed, within `HEADERS_SIZE_SLACK`): then it opens another stream; after an
  answer of another size (a 503 ends the stream) no DATA is expected. Anything else is `data`, whose tunnelled
  payload is estimated as the record's plaintext minus one 9-byte frame header per started 16 KiB frame.

Sizes: a TLS 1.3 record costs 22 bytes on the wire (5-byte header, 1-byte inner content type, 16-byte AEAD tag);
the timeline's length excludes the 5-byte header, so a record carries `length - 17` bytes of HTTP/2.
`compare(decrypted, keyless)` measures a keyless analysis against the decrypted analysis of the same captures;
`record_truth` / `label_accuracy` measure the labels against the frames decryption finds in each record
(`decrypted_views` reads a capture for them: evaluation only).

Limits: records can carry several frames and frames can span records, so every label is an inference (a HEADERS
small enough to look like a WINDOW_UPDATE, a DATA record answered by a small one, a plain HTTP/2 GET whose HEADERS
follow an answer, a response larger than `RESPONSE_MAX` are misread); TLS 1.2 CBC suites' overhead varies per
record; TLS 1.3 record padding is not modelled. Pure apart from `decrypted_views`: no I/O.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np
import pandas as pd

HANDSHAKE, CHANGE_CIPHER_SPEC, ALERT, APPLICATION_DATA = 22, 20, 21, 23
RECORD_OVERHEAD = 17          # inner content type + AEAD tag, inside the record length (22 with the 5-byte header)
TLS13_FINISHED = (4 + 32 + RECORD_OVERHEAD, 4 + 48 + RECORD_OVERHEAD)   # Finished record with SHA-256 / SHA-384
TLS12_FINISHED = 16           # TLS 1.2 Finished message: 4-byte header + 12-byte verify_data
SERVER_PREFACE_MAX = 96       # HTTP/2 bytes of a server's first SETTINGS (+ WINDOW_UPDATE) record, generously
FRAME_HEADER = 9
MAX_FRAME = 16384             # default SETTINGS_MAX_FRAME_SIZE
PREFACE = 24                  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
RESPONSE_MAX = 64 + FRAME_HEADER
PING_PAIR_NS = 1_000_000_000  # a PING is answered within a second
HEADERS_SIZE_SLACK = 2        # a CONNECT's HEADERS differ from the previous ones by a few bytes (HPACK-indexed)
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
    overhead: int = RECORD_OVERHEAD   # record bytes that are not HTTP/2 (TLS 1.3 AEAD, or TLS 1.2's, measured)

    @property
    def h2_bytes(self) -> int:
        return max(self.length - self.overhead, 0)


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
    ccs_at = [-1, -1]
    tls12_finished = [-1, -1]      # TLS 1.2: a handshake record after the direction's CCS is its encrypted Finished
    for i, (d, t0, t1, ct, ln) in enumerate(timeline):
        d = int(d) & 1
        kind = {HANDSHAKE: "handshake", CHANGE_CIPHER_SPEC: "change_cipher_spec", ALERT: "alert"}.get(int(ct), "app")
        if kind in ("handshake", "change_cipher_spec"):
            last_plain[d] = i
        if kind == "change_cipher_spec" and ccs_at[d] < 0:
            ccs_at[d] = i
        elif kind == "handshake" and ccs_at[d] >= 0 and tls12_finished[d] < 0:
            tls12_finished[d] = i
        out.append(InferredRecord(i, d, int(t0), int(t1), int(ct), int(ln), kind, 0))
    tls12 = max(tls12_finished) >= 0
    if tls12:
        # TLS 1.2 encrypts with the record type in clear: every application record is application data. Its
        # overhead (explicit nonce, tag, MAC) is the Finished record's length minus the 16-byte Finished message
        f = out[tls12_finished[0] if tls12_finished[0] >= 0 else tls12_finished[1]]
        overhead = min(max(f.length - TLS12_FINISHED, 0), 64)
        for r in out:
            r.overhead = overhead
    else:
        _tls13_handshake(out, last_plain)
    app = [r for r in out if r.kind == "app"]
    # two passes: the first finds the size of the answers that open a tunnel (the most common response size:
    # ':status 200'), the second takes answers of another size (a 503 ends its stream) as expecting no DATA
    hello = next((r for r in out if r.direction == 0 and r.kind == "handshake"), None)
    flight = next((r for r in out if r.direction == 0 and hello is not None and r.index > hello.index
                   and r.kind in ("handshake", "change_cipher_spec")), None)
    rtt = flight.ts_first - hello.ts_last if flight is not None else 0   # ClientHello to the client's next flight
    sizes = _label_application(app, None, rtt)
    for r in app:
        r.kind, r.stream, r.payload = "app", None, 0
    _label_application(app, max(set(sizes), key=lambda s: (sizes.count(s), -s)) if sizes else None, rtt)
    for r in out:
        if r.kind == "data" and r.payload:
            r.payload = data_payload(r.payload)
    _pings_and_goaways(out)
    return out


def _label_application(app: list[InferredRecord], open_size: int | None, rtt: int = 0) -> list[int]:
    """Label the application records (in place); returns the HTTP/2 sizes of the records taken as responses.
    open_size: the response size after which the client's DATA follows (None: after every response). rtt: the
    handshake's round trip (ns, 0 unknown): in a client-only view a stream's DATA cannot follow its HEADERS
    sooner than a quarter of it (the 200 has to come back first; the handshake round trip includes
    its cryptography)."""
    seen_app = [False, False]
    # a view of the client's side only (the answers travel another path): the server's SETTINGS is implied, and
    # a client record opens a stream when none is open or when it has the size of the CONNECTs before it
    client_only = bool(app) and not any(r.direction == 1 for r in app)
    server_only = bool(app) and not any(r.direction == 0 for r in app)   # likewise, answers only: small = 200
    settings_unacked = [server_only, client_only]     # a SETTINGS sent by direction d waits for the peer's ACK
    open_streams = 0
    waiting: deque[int] = deque()         # client-only: times of the HEADERS whose stream has no DATA yet
    pending: deque[InferredRecord] = deque()   # client records that may open a stream, waiting for an answer
    answered = 0                          # streams answered whose first client DATA is still to come
    streams = 0
    headers_sizes: list[int] = []         # HTTP/2 sizes of the HEADERS after the first (HPACK-indexed CONNECTs)
    responses: list[int] = []
    write: list[InferredRecord | None] = [None, None]   # a write split into full records, per direction
    for r in app:
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
        elif not seen_app[d] and (d == 1 or n >= PREFACE):
            r.kind = "preface_settings" if d == 0 else "settings"
            settings_unacked[d] = True
        elif n == FRAME_HEADER:
            if settings_unacked[1 - d]:
                r.kind = "settings_ack"
                settings_unacked[1 - d] = False
            else:
                r.kind = "end_stream"
                open_streams = max(open_streams - 1, 0)
            r.payload = 0
        elif n == FRAME_HEADER + 8:
            r.kind = "ping"
        elif n == FRAME_HEADER + 4:
            r.kind = "control"
        elif d == 0:
            r.kind = "data"
            # a stream's client DATA follows its answer (ztunnel waits for the 200), unless the record has the
            # size of the CONNECTs seen so far (HPACK-indexed: within HEADERS_SIZE_SLACK bytes): a new stream
            like_headers = bool(headers_sizes) and \
                abs(n - sorted(headers_sizes)[len(headers_sizes) // 2]) <= HEADERS_SIZE_SLACK
            if client_only:
                if like_headers or open_streams == 0 or (waiting and r.ts_first - waiting[0] < rtt // 4):
                    streams += 1
                    r.kind, r.stream = "headers", streams
                    open_streams += 1
                    waiting.append(r.ts_last)
                    if streams > 1:
                        headers_sizes.append(n)
                elif waiting:
                    waiting.popleft()
            elif answered > 0 and not like_headers:
                answered -= 1
            else:
                pending.append(r)
        elif n <= RESPONSE_MAX and server_only:
            streams += 1
            r.kind, r.stream = "response", streams
        elif n <= RESPONSE_MAX and pending:
            req = pending.popleft()
            streams += 1
            req.kind, req.stream = "headers", streams
            r.kind, r.stream = "response", streams
            if streams > 1:
                headers_sizes.append(req.h2_bytes)
            responses.append(n)
            if open_size is None or n == open_size:
                answered += 1
        else:
            r.kind = "data"
        if r.kind == "data" and n >= MAX_FRAME:
            write[d] = r
        seen_app[d] = True
    return responses


def _tls13_handshake(out: list[InferredRecord], last_plain: list[int]) -> None:
    """TLS 1.3 encrypted handshake records, labelled in place.

    Server: the records sent in the same burst as its last plaintext one (ServerHello, or the compatibility CCS)
    are EncryptedExtensions .. Finished; later, records bigger than a server preface before its first
    preface-sized one are NewSessionTickets. Client: its first encrypted records after the server's flight, in
    one burst (after its CCS when it sends one), are (Certificate, CertificateVerify,) Finished: they end at the
    first record of a Finished's size, so a preface written in the same burst stays application data."""
    server_end = -1
    j = last_plain[1]
    if j >= 0:
        prev_end = out[j].ts_last
        for r in out[j + 1:]:
            if r.direction != 1:
                continue
            if r.kind != "app" or r.ts_first > prev_end:
                break
            r.kind = "handshake"
            prev_end = r.ts_last
            server_end = r.index
    j = last_plain[0]
    if server_end >= 0:
        client = [r for r in out[server_end + 1:] if r.direction == 0 and r.kind == "app"]
        client = client if client and client[0].index > j else []
    elif j >= 0 and out[j].kind == "change_cipher_spec":
        # the server's side is not in this view: the client's encrypted flight follows its compatibility CCS
        client = [r for r in out[j + 1:] if r.direction == 0]
        client = client if client and client[0].kind == "app" and client[0].ts_first <= out[j].ts_last else []
    else:
        return                      # nothing says where the handshake ends
    if client:
        burst = [client[0]]
        for r in client[1:]:
            if r.kind != "app" or r.ts_first > burst[-1].ts_last:
                break
            burst.append(r)
        ends = [k for k, r in enumerate(burst) if r.length in TLS13_FINISHED]
        for r in burst[:ends[0] + 1] if ends else burst:
            r.kind = "handshake"
        client_end = (burst[ends[0]] if ends else burst[-1]).index
        later = [r for r in out[client_end + 1:] if r.direction == 1 and r.kind == "app"] if server_end >= 0 else []
        tickets = []
        for r in later:
            if r.h2_bytes <= SERVER_PREFACE_MAX:
                break
            tickets.append(r)
        if tickets and len(tickets) < len(later):
            for r in tickets:
                r.kind = "handshake"


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
        # (the nullable boolean column gives numpy booleans here: by value, not by identity with True)
        if (pd.notna(r.decrypted) and bool(r.decrypted)) or (pd.notna(r.depth) and int(r.depth) > 0):
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
        cols[c] = np.asarray(cols[c], dtype=np.int64)
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
        if g is None or not len(g):
            wrong += 1
            wrong_rows.append((f.client, "no keyless flow", None))
            continue
        if len(g) > 1 and pd.notna(f.start):   # one client address twice (captures of two runs): nearest start
            g = g.iloc[[int(np.argmin([abs((s - f.start).value) if pd.notna(s) else np.iinfo(np.int64).max
                                       for s in g["start"]]))]]
        k = g.iloc[0]
        ok = (_same(k["hbone_client"], f.hbone_client) and _same(k["hbone_server"], f.hbone_server)
              and _same(k["dst_pod"], f.dst_pod) and k["match"] == "inferred")
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
        "ambiguous": int((keyless.anomalies["kind"] == "keyless_ambiguous").sum()) if len(keyless.anomalies) else 0,
        "worst_event_time_ms": float(d["time_ms"].abs().max()) if d["time_ms"].notna().any() else float("nan"),
        "diffs": d,
    }


def _same(a, b) -> bool:
    return not (pd.isna(a) or pd.isna(b)) and a == b


def _hop_connections(hops: pd.DataFrame, flow_id) -> list[tuple]:
    h = hops[hops["flow_id"] == flow_id].drop_duplicates("hop_index").sort_values("hop_index")
    return list(zip(h["kind"], h["connection"]))


# --- ground truth from decryption --------------------------------------------------------------------------------
H2_DATA, H2_HEADERS, H2_SETTINGS, H2_PUSH_PROMISE, H2_PING, H2_GOAWAY, H2_CONTINUATION = 0, 1, 4, 5, 6, 7, 9
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
OVERHEADS = (17, 24, 16)   # TLS 1.3 AEAD (type + tag); TLS 1.2 AES-GCM (explicit nonce + tag); TLS 1.2 ChaCha20


def _frame_kinds(d: int, ftype: int, flags: int, length: int, with_preface: bool) -> set[str]:
    if ftype == H2_DATA:
        return ({"data"} if length else set()) | ({"end_stream"} if flags & 1 else set()) or {"data"}
    if ftype in (H2_HEADERS, H2_CONTINUATION, H2_PUSH_PROMISE):
        return {"headers" if d == 0 else "response"}
    if ftype == H2_SETTINGS:
        if flags & 1:
            return {"settings_ack"}
        return {"preface_settings" if d == 0 and with_preface else "settings"}
    if ftype == H2_PING:
        return {"ping_ack" if flags & 1 else "ping"}
    if ftype == H2_GOAWAY:
        return {"goaway"}
    return {"control"}


def record_truth(timeline, plaintext) -> list[set[str] | None]:
    """What each record of a decrypted TLS connection really carried, as sets of `InferredRecord.kind` names.

    timeline: the connection's record timeline; plaintext: its decrypted application bytes per direction
    (`StreamResults.plaintext[tunnel_id]`: `.data`, `.marks` (offset, ts), `.truncated`). Application records are
    found by walking each direction's records with a per-record overhead (TLS 1.3, or TLS 1.2 AES-GCM / ChaCha20)
    that consumes the plaintext exactly, a record counting as application data when the plaintext at the walk's
    position was captured at its last byte's time (encrypted handshake messages and alerts are not in the
    plaintext); the HTTP/2 frames starting in a record give its kinds, a record inside one frame that frame's.
    None for a record that cannot be placed (a direction whose walk fails, plaintext beyond the retention cap)."""
    out: list[set[str] | None] = [None] * len(timeline)
    for d in (0, 1):
        pt = plaintext[d] if plaintext is not None else None
        idx = [i for i, x in enumerate(timeline) if (int(x[0]) & 1) == d]
        for i in idx:
            ct = int(timeline[i][3])
            if ct in (HANDSHAKE, CHANGE_CIPHER_SPEC, ALERT):
                out[i] = {"handshake" if ct == HANDSHAKE else "change_cipher_spec" if ct == CHANGE_CIPHER_SPEC
                          else "alert"}
        if pt is None or pt.truncated:
            continue
        data, marks = bytes(pt.data), list(pt.marks)
        app = [i for i in idx if int(timeline[i][3]) == APPLICATION_DATA]
        placed = None
        for ov in OVERHEADS:
            p, got, mi = 0, [], 0
            for i in app:
                n = int(timeline[i][4]) - ov
                while mi + 1 < len(marks) and marks[mi + 1][0] <= p:
                    mi += 1
                if n >= 0 and p + n <= len(data) and marks and marks[mi][1] == int(timeline[i][2]) and \
                        (n > 0 or p < len(data)):
                    got.append((i, p, p + n))
                    p += n
                else:
                    got.append((i, None, None))
            if p == len(data):
                placed = got
                break
        if placed is None:
            continue
        frames = _frames(data, d)
        starts = [f[0] for f in frames]
        seen_app = False
        for i, a, b in placed:
            if a is None:
                # encrypted, not application data: an alert, handshake messages (TLS 1.3: the handshake flight,
                # later a KeyUpdate or NewSessionTickets), or a record that did not decrypt (unknown)
                n = int(timeline[i][4]) - OVERHEADS[0]
                out[i] = {"alert"} if n <= 2 else {"handshake"} if not seen_app or n == 5 or n >= 40 else None
                continue
            seen_app = True
            k = bisect.bisect_left(starts, a)
            kinds: set[str] = set()
            with_preface = d == 0 and a == 0 and data.startswith(H2_PREFACE)
            for off, ftype, flags, length in frames[k:]:
                if off >= b:
                    break
                kinds |= _frame_kinds(d, ftype, flags, length, with_preface)
            if not kinds and k > 0:     # inside one frame started in an earlier record
                off, ftype, flags, length = frames[k - 1]
                kinds = _frame_kinds(d, ftype, flags & ~1, length, False)
            if with_preface and not kinds:
                kinds = {"preface_settings"}
            out[i] = kinds or None
    return out


def _frames(data: bytes, d: int) -> list[tuple[int, int, int, int]]:
    """(offset, type, flags, length) of the HTTP/2 frames of one direction's plaintext (bounded by its size)."""
    p = len(H2_PREFACE) if d == 0 and data.startswith(H2_PREFACE) else 0
    out = []
    while p + FRAME_HEADER <= len(data):
        length = int.from_bytes(data[p:p + 3], "big")
        out.append((p, data[p + 3], data[p + 4], length))
        p += FRAME_HEADER + length
    return out


def label_accuracy(timeline, plaintext) -> tuple[int, int, list[tuple]]:
    """(records whose keyless label is one of their true kinds, records with a known truth, the misses as
    (record, keyless kind, true kinds))."""
    truth = record_truth(timeline, plaintext)
    good = known = 0
    misses = []
    for r, t in zip(infer_records(timeline), truth):
        if t is None:
            continue
        known += 1
        if r.kind in t:
            good += 1
        else:
            misses.append((r.index, r.kind, sorted(t)))
    return good, known, misses


def decrypted_views(path, keylog=None, name: str | None = None) -> dict:
    """Every TLS connection of one capture that decrypts with `keylog` (a path or `KeyLog`) or its embedded
    secrets: {tunnel_id: (record timeline, plaintext per direction)}. For evaluation: reads the capture."""
    from hbonecap.decode import decode_capture, segments_of_batch
    from hbonecap.streams.analyzer import StreamAnalyzer
    from hbonecap.streams.tls.keylog import KeyLog, load

    kl = load(keylog) if keylog is not None and not isinstance(keylog, KeyLog) else keylog
    analyzer = StreamAnalyzer(kl, keep_plaintext=True)
    used = 0

    def feed(reader, batch, ctx) -> None:
        nonlocal used
        found = getattr(reader.walker, "secrets", [])
        while used < len(found):
            analyzer.add_secrets(found[used], name=f"{reader.info.name}#secrets{used + 1}")
            used += 1
        for seg in segments_of_batch(name or reader.info.name, batch, ctx, index_offset=reader.index_offset):
            analyzer.feed(seg)

    decode_capture(path, name=name, on_batch=feed)
    res = analyzer.close()
    return {tid: (tl, res.plaintext[tid]) for tid, tl in res.records.items() if tid in res.plaintext and tl}

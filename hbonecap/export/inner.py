"""`hbonecap unwrap`: the tunnelled conversations as a plain pcapng, as if no mesh were there.

Follows pcapng (draft-ietf-opsawg-pcapng sections 4.1-4.3: SHB, IDB with if_name / if_tsresol = 9 / if_description,
EPB with opt_comment) and builds IPv4/IPv6 (RFC 791 / RFC 8200) and TCP (RFC 9293) headers with valid checksums.

* Every CONNECT stream (nested ones too: the inner streams of a double HBONE) becomes one TCP connection between
  the original client ip:port (`forwarded: for=`, else the correlated flow's client, else the tunnel's client with
  a port derived from the stream id) and the original destination (`x-envoy-original-dst-host`, else
  `:authority`; a name instead of an address is kept in the comment and the tunnel's server address is used).
  It opens with a synthetic handshake at the CONNECT time, carries the tunnelled bytes in segments cut where the
  capture saw them arrive (at most 16 KiB), with sequence and acknowledgment numbers that follow the bytes, and
  ends with FIN (END_STREAM) or RST (RST_STREAM / refused) at the stream's end time.
* Every Geneve / VXLAN packet contributes its innermost frame (Ethernet or raw IP, per the tunnel's protocol type),
  unchanged, at its capture time.
* One interface per source capture (and per inner link type); every packet carries a comment naming the capture,
  tunnel and stream (or frame) it came from.

Limits: bytes the stream stages did not retain (past the per-stream cap) are not written; the comment of the
FIN says how many were left out. Time order is kept per source; the file is sorted by time overall.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SEGMENT = 16 * 1024
LINKTYPE_ETHERNET, LINKTYPE_RAW = 1, 101
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = int(np.frombuffer(data, dtype=">u2").sum(dtype=np.uint64))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def tcp_packet(src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
               ident: int = 0) -> bytes:
    """An IPv4 or IPv6 packet carrying one TCP segment, checksums filled in."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    opts = b"\x02\x04\x05\xb4" if flags & SYN else b""
    hlen = 20 + len(opts)
    tcp_wo = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hlen // 4) << 4, flags,
                         65535, 0, 0) + opts + payload
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 6, len(tcp_wo))
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", len(tcp_wo), 6)
    csum = _checksum(pseudo + tcp_wo)
    tcp_seg = tcp_wo[:16] + struct.pack("!H", csum) + tcp_wo[18:]
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp_seg), ident & 0xFFFF, 0x4000, 64, 6, 0, s.packed,
                          d.packed)
        hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
        return hdr + tcp_seg
    return struct.pack("!IHBB16s16s", 0x60000000, len(tcp_seg), 6, 64, s.packed, d.packed) + tcp_seg


@dataclass
class Packet:
    ts_ns: int
    iface: int
    data: bytes
    comment: str
    orig_len: int | None = None    # length on the wire when the capture cut the frame short


def _endpoint(text, default_port: int | None = None) -> tuple[str | None, int | None, str | None]:
    """'ip:port', '[v6]:port', 'name:port' -> (ip or None, port, name or None)."""
    if not isinstance(text, str) or not text:
        return None, default_port, None
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:]+):(\d+)$", text)
    host, port = (m.group(1), int(m.group(2))) if m else (text, default_port)
    try:
        return str(ipaddress.ip_address(host)), port, None
    except ValueError:
        return None, port, host


def _mark_cuts(tb, limit: int = SEGMENT) -> list[tuple[int, int, int]]:
    """(start, end, ts) pieces of a TimedBytes: cut where the capture saw bytes arrive, at most `limit` long."""
    n = len(tb.data)
    marks = [m for m in tb.marks if m[0] < n] or ([(0, None)] if n else [])
    out = []
    for i, (off, ts) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else n
        for a in range(off, end, limit):
            out.append((a, min(a + limit, end), ts))
    return out


def pick_views(rows: pd.DataFrame, details) -> pd.DataFrame:
    """One view of each logical CONNECT stream: the same stream seen in several captures (same HBONE client,
    server and stream id, same nesting) is written once, from the capture that retained the most of its bytes."""
    if not len(rows):
        return rows
    keys, sizes = [], []
    for r in rows.itertuples(index=False):
        det = details.get(r.capture)
        tun = det.tunnels_by_id.get(r.tunnel_id, {}) if det is not None else {}
        tb = det.tunnel_bytes.get((r.tunnel_id, int(r.stream_id))) if det is not None else None
        parent = tun.get("parent_stream_id")
        keys.append((tun.get("client"), tun.get("server"), int(r.stream_id), tun.get("depth"),
                     None if parent is None or pd.isna(parent) else int(parent)))
        sizes.append(len(tb[0].data) + len(tb[1].data) if tb else -1)
    v = rows.assign(_key=[str(k) for k in keys], _size=sizes)
    v = v[v["_size"] >= 0].sort_values(["_key", "_size", "capture"], ascending=[True, False, True])
    return v.drop_duplicates("_key").drop(columns=["_key", "_size"])


def stream_conversation(rows, details, flows: pd.DataFrame, iface_of) -> list[Packet]:
    """Packets of the CONNECT streams in `rows`."""
    client_by_stream = {}
    if len(flows) and "tunnel_ids" in flows:
        for f in flows.itertuples(index=False):
            tids = str(f.tunnel_ids or "").split("|")[0].split(";")
            sids = str(f.stream_ids or "").split(";")
            for tid in tids:
                if tid and sids and sids[0]:
                    client_by_stream[(tid.strip(), int(sids[0]))] = f.client
    out: list[Packet] = []
    for r in rows.itertuples(index=False):
        det = details.get(r.capture)
        if det is None or (r.tunnel_id, int(r.stream_id)) not in det.tunnel_bytes:
            continue
        c2s, s2c = det.tunnel_bytes[(r.tunnel_id, int(r.stream_id))]
        tun = det.tunnels_by_id.get(r.tunnel_id, {}) if hasattr(det, "tunnels_by_id") else {}
        t_client = _endpoint(tun.get("client"))
        t_server = _endpoint(tun.get("server"))
        cip, cport, _ = _endpoint(r.forwarded_for)
        source = "forwarded"
        if cip is None:
            cip, cport, _ = _endpoint(client_by_stream.get((f"{r.capture}:{r.tunnel_id}", int(r.stream_id))))
            source = "flow"
        if cip is None:
            cip, cport, source = t_client[0] or "192.0.2.1", 49152 + int(r.stream_id) % 16000, "tunnel client"
        dip, dport, dname = _endpoint(r.original_dst if isinstance(r.original_dst, str) else r.authority, 80)
        if dip is None:
            dip = t_server[0] or "192.0.2.2"
        if ipaddress.ip_address(cip).version != ipaddress.ip_address(dip).version:
            dip = "::ffff:" + dip if ":" not in dip else dip
            cip = "::ffff:" + cip if ":" not in cip else cip
        where = (f"capture={r.capture} tunnel={r.tunnel_id} stream={int(r.stream_id)} "
                 f"CONNECT {r.authority}" + (f" (destination name {dname})" if dname else "")
                 + f" client from {source}")
        iface = iface_of(r.capture)
        t0 = _ns(r.request_ts) or (c2s.marks[0][1] if c2s.marks else None)
        if t0 is None:
            continue
        iss_c, iss_s = 1_000_000 + int(r.stream_id) * 7919, 2_000_000 + int(r.stream_id) * 104729
        seq_c, seq_s = iss_c + 1, iss_s + 1
        pk = []
        pk.append((t0, 0, tcp_packet(cip, cport, dip, dport, iss_c, 0, SYN), "SYN " + where))
        t_ack = _ns(r.response_ts) or t0
        pk.append((t_ack, 1, tcp_packet(dip, dport, cip, cport, iss_s, seq_c, SYN | ACK), "SYN-ACK " + where))
        pk.append((t_ack, 2, tcp_packet(cip, cport, dip, dport, seq_c, seq_s, ACK), "ACK " + where))
        pieces = [(ts or t_ack, 0, a, b) for a, b, ts in _mark_cuts(c2s)] + \
                 [(ts or t_ack, 1, a, b) for a, b, ts in _mark_cuts(s2c)]
        pieces.sort(key=lambda p: (p[0], p[2]))
        order = 3
        last_ts = t_ack
        for ts, d, a, b in pieces:
            ts = max(ts, t_ack)
            last_ts = max(last_ts, ts)
            if d == 0:
                data = bytes(c2s.data[a:b])
                pk.append((ts, order, tcp_packet(cip, cport, dip, dport, seq_c, seq_s, PSH | ACK, data), where))
                seq_c += len(data)
            else:
                data = bytes(s2c.data[a:b])
                pk.append((ts, order, tcp_packet(dip, dport, cip, cport, seq_s, seq_c, PSH | ACK, data), where))
                seq_s += len(data)
            order += 1
        end = max(_ns(r.end_ts) or last_ts, last_ts)
        lost = (c2s.total - len(c2s.data)) + (s2c.total - len(s2c.data))
        tail = where + (f"; {lost} tunnelled bytes not retained" if lost else "")
        reason = str(r.end_reason or "")
        if reason.startswith("rst_stream") or (not pd.isna(r.status) and int(r.status) >= 300):
            pk.append((end, order, tcp_packet(dip, dport, cip, cport, seq_s, seq_c, RST | ACK), f"RST ({reason}) " + tail))
        elif reason == "end_stream":
            pk.append((end, order, tcp_packet(cip, cport, dip, dport, seq_c, seq_s, FIN | ACK), "FIN " + tail))
            pk.append((end, order + 1, tcp_packet(dip, dport, cip, cport, seq_s, seq_c + 1, FIN | ACK), "FIN " + tail))
            pk.append((end, order + 2, tcp_packet(cip, cport, dip, dport, seq_c + 1, seq_s + 1, ACK), "ACK " + tail))
        pk.sort(key=lambda p: (p[0], p[1]))
        out += [Packet(ts, iface, data, comment) for ts, _o, data, comment in pk]
    return out


def _ns(v) -> int | None:
    if v is None or (not isinstance(v, (int, np.integer)) and pd.isna(v)):
        return None
    return int(pd.Timestamp(v).value) if not isinstance(v, (int, np.integer)) else int(v)


def inner_frames(path: str, capture: str, iface_of) -> list[Packet]:
    """The innermost frame of every Geneve / VXLAN packet of one capture, with its capture time."""
    from hbonecap.decode import iter_decoded
    from hbonecap.layers import context as K

    out: list[Packet] = []
    for reader, batch, ctx in iter_decoded(path, engine="numpy"):   # the vectorised decoders keep frame starts
        idx = np.flatnonzero(ctx.depth > 0)
        numbers = batch.frame_numbers()
        frames = ctx.__dict__.get("tunnel_frames")
        if frames is None:
            continue
        starts, links = frames["start"][0], frames["link"][0]
        for i in idx.tolist():
            start = int(starts[i])
            if start < 0:
                continue
            base = int(batch.data_off[i])
            frame = batch.buf[base + start: base + int(batch.caplen[i])].tobytes()
            orig = int(batch.origlen[i]) - start
            lt = LINKTYPE_ETHERNET if links[i] == 1 else LINKTYPE_RAW
            d = int(ctx.depth[i])
            enc = "/".join(f"{'geneve' if ctx.tun_type[i, j] == K.TUN_GENEVE else 'vxlan'}:{int(ctx.tun_vni[i, j])}"
                           for j in range(d))
            out.append(Packet(int(batch.ts_ns[i]), iface_of(capture, lt), frame,
                              f"capture={capture} frame={int(numbers[i])} unwrapped from {enc}", max(orig, len(frame))))
    return out


def write_pcapng(path: str | Path, interfaces: list[tuple[str, int, str]], packets: list[Packet]) -> int:
    """Write `packets` (sorted by time) to a pcapng file with nanosecond time stamps; returns packets written."""
    import dpkt.pcapng as ng

    def opt(code, data: bytes):
        return ng.PcapngOptionLE(code=code, data=data)

    shb = ng.SectionHeaderBlockLE(opts=[opt(4, b"hbonecap unwrap"), ng.PcapngOptionLE(code=0)])
    idbs = [ng.InterfaceDescriptionBlockLE(snaplen=262144, linktype=lt,
                                           opts=[opt(2, name.encode()), opt(3, desc.encode()), opt(9, b"\x09"),
                                                 ng.PcapngOptionLE(code=0)])
            for name, lt, desc in interfaces]
    packets = sorted(packets, key=lambda p: p.ts_ns)
    with open(path, "wb") as f:
        ng.Writer(f, shb=shb, idb=idbs or [ng.InterfaceDescriptionBlockLE(snaplen=262144, linktype=1)])
        for p in packets:
            # Enhanced Packet Blocks are packed here: dpkt's always sets the original length to the captured one,
            # and a frame the source capture cut short must keep its length on the wire.
            f.write(_epb(p.iface, p.ts_ns, p.data, p.orig_len or len(p.data), p.comment))
    return len(packets)


def _epb(iface: int, ts_ns: int, data: bytes, orig_len: int, comment: str) -> bytes:
    """One Enhanced Packet Block (pcapng section 4.3), little-endian, with an opt_comment."""
    text = comment.encode("utf-8", "replace")[:65000]
    opts = struct.pack("<HH", 1, len(text)) + text + b"\0" * (-len(text) % 4) + struct.pack("<HH", 0, 0)
    body = struct.pack("<IIIII", iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), orig_len) + data + \
        b"\0" * (-len(data) % 4) + opts
    total = 12 + len(body)
    return struct.pack("<II", 6, total) + body + struct.pack("<I", total)


def unwrap(a, path: str | Path, geneve: bool = True) -> dict:
    """Write the unwrapped conversations of analysis `a` to `path`; returns counts."""
    interfaces: list[tuple[str, int, str]] = []
    index: dict[tuple[str, int], int] = {}

    def iface_of(capture: str, lt: int = LINKTYPE_RAW) -> int:
        key = (capture, lt)
        if key not in index:
            index[key] = len(interfaces)
            kind = "CONNECT streams" if lt == LINKTYPE_RAW else "Geneve/VXLAN inner frames"
            interfaces.append((f"{capture}" + ("" if lt == LINKTYPE_RAW else "#inner"), lt,
                               f"{kind} unwrapped by hbonecap from {capture}"))
        return index[key]

    details = {}
    for cap, det in a.details.items():
        if det is None:
            continue
        det.tunnels_by_id = {t["tunnel_id"]: t for t in det.tunnels}
        details[cap] = det
    views = pick_views(a.streams, details) if len(a.streams) else a.streams
    packets = stream_conversation(views, details, a.flows, iface_of) if len(views) else []
    frames: list[Packet] = []
    seen: set[bytes] = set()
    if geneve and len(a.captures):
        pk = a.packets     # (without a packets table every capture is read for inner frames)
        tunnelled = set(pk.loc[pk["vni"].notna(), "capture"].astype(str)) if len(pk) else set(a.captures["capture"])
        for r in a.captures.itertuples(index=False):
            if r.capture in tunnelled:
                for p in str(r.path).split(";"):
                    for fr in inner_frames(p, r.capture, iface_of):
                        if fr.data not in seen:          # the same inner packet seen at two capture points
                            seen.add(fr.data)
                            frames.append(fr)
    n = write_pcapng(path, interfaces, packets + frames)
    return {"packets": n, "streams": len(views), "inner_frames": len(frames), "interfaces": len(interfaces),
            "views": views}


COMMENT = re.compile(r"capture=(?P<capture>\S+) (?:tunnel=(?P<tunnel>\S+) stream=(?P<stream>\d+)|frame=(?P<frame>\d+))")


def flow_lookup(flows: pd.DataFrame):
    """(capture, tunnel_id, stream_id) and client ip:port -> flow_id."""
    by_stream, by_client = {}, {}
    for f in flows.itertuples(index=False) if len(flows) else []:
        tids = [t.strip() for part in str(f.tunnel_ids or "").split("|") for t in part.split(";") if t.strip()]
        sids = [s.strip() for s in str(f.stream_ids or "").split(";") if s.strip().isdigit()]
        for t in tids:
            for sid in sids:
                by_stream.setdefault((t, int(sid)), int(f.flow_id))
        if isinstance(f.client, str):
            by_client.setdefault(f.client, int(f.flow_id))
    return by_stream, by_client


def read_inner(path: str | Path, display_filter: str | None, flows: pd.DataFrame) -> pd.DataFrame:
    """Dissect an unwrapped file with tshark (through pyshark) and tie every packet to its flow."""
    import pyshark

    by_stream, by_client = flow_lookup(flows)
    rows = []
    cap = pyshark.FileCapture(str(path), display_filter=display_filter, keep_packets=False)
    try:
        for p in cap:
            comment = str(getattr(p.frame_info, "frame_comment", "") or "")
            m = COMMENT.search(comment)
            capture = tunnel = stream = frame = None
            flow = None
            if m:
                capture, tunnel, frame = m.group("capture"), m.group("tunnel"), m.group("frame")
                stream = int(m.group("stream")) if m.group("stream") else None
                if tunnel is not None:
                    flow = by_stream.get((f"{capture}:{tunnel}", stream))
            if flow is None and hasattr(p, "tcp") and hasattr(p, "ip"):
                flow = by_client.get(f"{p.ip.src}:{p.tcp.srcport}") or by_client.get(f"{p.ip.dst}:{p.tcp.dstport}")
            rows.append({"number": int(p.number), "ts": pd.Timestamp(float(p.sniff_timestamp), unit="s", tz="UTC"),
                         "capture": capture, "tunnel_id": tunnel, "stream_id": stream,
                         "frame": int(frame) if frame else None, "flow_id": flow, "highest_layer": p.highest_layer,
                         "layers": ",".join(layer.layer_name for layer in p.layers), "packet": p})
    finally:
        cap.close()
    df = pd.DataFrame(rows, columns=["number", "ts", "capture", "tunnel_id", "stream_id", "frame", "flow_id",
                                     "highest_layer", "layers", "packet"])
    for c in ("stream_id", "frame", "flow_id"):
        df[c] = df[c].astype("Int64")
    return df

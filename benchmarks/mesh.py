"""A realistic capture set for the full-analysis benchmark: the same ambient-mesh traffic seen at five points.

Topology (era B, Geneve redirection, Rust-ztunnel headers; addresses as in the lab, samples/README.md):
client pod A 10.244.1.5 on node A calls Service 10.96.0.10:80 (backend pod B 10.244.2.5:8080 on node B).
ztunnel A (10.244.1.3) terminates the pod's connection and opens one HTTP/2 CONNECT stream per connection on a
pooled HBONE connection to 10.244.2.5:15008; ztunnel B (10.244.2.3) answers 200 after it connected to the pod.

Captures (file name -> what it sees):
  pod-a-eth0.pcap       the client pod's plaintext connection to the ClusterIP, both directions;
  node-a-istioout.pcap  node A's end of the istioout tunnel on the underlay (outer IPv4/UDP 6081/Geneve VNI 1001,
                        10.244.1.1 -> 10.244.1.3): the pod's outbound packets only (replies come back as plain IP);
  node-a-eth0.pcap      the HBONE connections (TLS 1.3 on 15008) leaving node A;
  node-b-eth0.pcap      the same HBONE packets arriving at node B (one-way link delay, node B's clock);
  pod-b-eth0.pcap       ztunnel B's plaintext connections to the server pod, node B's clock.

Everything on the wire is genuine: TLS 1.3 from Python's ssl over MemoryBIO (mutual auth, SPIFFE URI SAN
certificates from `cryptography`, ALPN h2, no SNI) with the key log OpenSSL writes (keylog.txt); HTTP/2 from the
`h2` library on both ends (ztunnel's settings: 4 MiB stream window, 16 MiB connection window, 1 MiB max frame),
CONNECT with :authority, forwarded, traceparent and baggage, many streams per pooled connection, several at a time.
A small discrete-event simulation gives every byte a time: SYN/SYN-ACK/ACK, MSS-sized segments 1.2 us apart,
delayed ACKs every second segment, TCP timestamps, FIN both ways; the HBONE server side sends the 200 only after
its connection to the pod is up, the client side forwards app bytes only after the 200 (as ztunnel does).
Node B's clock is offset (`--offset-us`); pods share their node's clock. A pod's eth0 sees its own packets with
TTL 64 and the node-routed ones of its ztunnel with 63.

Also written: points.toml, the capture-point manifest (`hbonecap correlate -m`: which node each capture was taken
on; the pod captures' names do not say), and mesh.json, the ground truth (every app connection: client, original destination, HBONE connection,
stream id, trace id, bytes each way) and the clock offsets applied.

Limits: one client pod, one backend; HBONE connections of the pool follow one another in time (streams overlap
within a connection, connections do not); no loss or retransmission (the general reassembly path is exercised
by the stream tests, not here); IPv4 only; checksums are zero.

Usage: python benchmarks/mesh.py OUTDIR [--mb 300] [--seed 1]
"""
from __future__ import annotations

import argparse
import datetime
import heapq
import json
import os
import random
import ssl
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

POD_A, POD_B, SVC = "10.244.1.5", "10.244.2.5", "10.96.0.10"
ZT_A, ZT_B = "10.244.1.3", "10.244.2.3"
ISTIOOUT_NODE, ISTIOOUT_ZT = "10.244.1.1", "10.244.1.3"
APP_PORT, SVC_PORT, HBONE_PORT = 8080, 80, 15008
T0 = 1_795_400_000 * 10**9
US = 1_000
LINK_NS = 150 * US          # one-way delay node A <-> node B
LOCAL_NS = 8 * US           # one-way delay within a node (pod <-> ztunnel)
WIRE_NS = 1_200             # one 1448-byte segment at ~10 Gb/s
ROLE_OF = {"pod-a-eth0": "pod", "node-a-istioout": "istioout", "node-a-eth0": "node", "node-b-eth0": "node",
           "pod-b-eth0": "pod"}
CAPTURES = ("pod-a-eth0", "node-a-istioout", "node-a-eth0", "node-b-eth0", "pod-b-eth0")
NODE_OF = {"pod-a-eth0": "node-a", "node-a-istioout": "node-a", "node-a-eth0": "node-a", "node-b-eth0": "node-b",
           "pod-b-eth0": "node-b"}


# -- certificates --------------------------------------------------------------------------------------------------
def make_pki(directory: Path) -> dict[str, Path]:
    """A mesh CA and two workload certificates (SPIFFE URI SANs, empty subject, as Istio issues them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": directory / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, sa, serial in (("client", "sleep", 2), ("server", "echo", 3)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/default/sa/{sa}")]), critical=True)
                .sign(ca_key, hashes.SHA256()))
        out[role] = directory / f"{role}.pem"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


def tls_contexts(pki: dict[str, Path], keylog: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.minimum_version = cctx.maximum_version = ssl.TLSVersion.TLSv1_3
    cctx.load_verify_locations(pki["ca"])
    cctx.load_cert_chain(pki["client"])
    cctx.set_alpn_protocols(["h2"])
    cctx.keylog_filename = str(keylog)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = sctx.maximum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(pki["server"])
    sctx.load_verify_locations(pki["ca"])
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.set_alpn_protocols(["h2"])
    sctx.num_tickets = 0        # ztunnel: no session resumption
    return cctx, sctx


# -- frames ----------------------------------------------------------------------------------------------------------
def _ip4(a: str) -> bytes:
    return bytes(int(x) for x in a.split("."))


def _mac(ip: str) -> bytes:
    return b"\x0a\x58" + _ip4(ip)


_ETH_IP = struct.Struct("!6s6sHBBHHHBBH4s4s")
_TCP_TS = struct.Struct("!HHIIBBHHHBBBBII")
_UDP = struct.Struct("!HHHH")
_GENEVE = struct.Struct("!BBHI")


class TcpFlow:
    """One TCP connection's packets as Ethernet frames with sender-side times.

    `emit`, `handshake`, `send` and `fin` record packets (data cut into MSS segments paced at WIRE_NS, a delayed
    ACK from the other side `delay` ns after every second segment); `frames()` builds them in time order, so that
    sequence numbers, acknowledgements (only of what the sender has received: sent at least `delay` ns earlier)
    and timestamp options are consistent whatever order the simulation recorded them in."""

    def __init__(self, client: tuple[str, int], server: tuple[str, int], delay: int, rng: random.Random,
                 mss: int = 1448) -> None:
        self.ends = (client, server)
        self.macs = (_mac(client[0]), _mac(server[0]))
        self.ips = (_ip4(client[0]), _ip4(server[0]))
        self.isn = (rng.getrandbits(32), rng.getrandbits(32))
        self.ipid = [rng.getrandbits(16), rng.getrandbits(16)]
        self.ts_base = (rng.getrandbits(31), rng.getrandbits(31))
        self.last = [0, 0]                  # time of the last data or control packet, per direction
        self.unacked = [0, 0]
        self.delay = delay
        self.mss = mss
        self.events: list[tuple[int, int, int, int, bytes]] = []

    def emit(self, t: int, d: int, flags: int, payload: bytes = b"") -> int:
        if flags == 0x10 and not payload:
            t = max(t, self.last[d])        # a pure ACK does not hold up the data behind it
        else:
            t = max(t, self.last[d] + 1_000)
            self.last[d] = t
        self.events.append((t, len(self.events), d, flags, payload))
        return t

    def handshake(self, t: int) -> int:
        """SYN at t, SYN-ACK and ACK after the one-way delays; returns when the client may send."""
        t = self.emit(t, 0, 0x02)
        t = self.emit(t + self.delay, 1, 0x12)
        return self.emit(t + self.delay, 0, 0x10)

    def send(self, t: int, d: int, data: bytes | memoryview) -> int:
        """Data from direction d starting at t; returns the time of the last segment."""
        mv = memoryview(data)
        mss = self.mss
        for pos in range(0, len(mv), mss):
            t = self.emit(max(t, self.last[d] + WIRE_NS), d, 0x18 if pos + mss >= len(mv) else 0x10,
                          bytes(mv[pos:pos + mss]))
            self.unacked[d] += 1
            if self.unacked[d] >= 2 or pos + mss >= len(mv):
                self.unacked[d] = 0
                self.emit(t + self.delay, 1 - d, 0x10)
        return t

    def fin(self, t: int, d: int) -> int:
        t = self.emit(t, d, 0x11)
        self.emit(t + self.delay, 1 - d, 0x10)
        return t

    def frames(self) -> list[tuple[int, int, bytes]]:
        """(time, direction, Ethernet frame) of every packet, in time order."""
        seq = list(self.isn)
        sent: list[list[tuple[int, int, int]]] = [[], []]    # per direction: (time, seq after, tsval)
        seen = [0, 0]                                         # per direction: how many of the peer's are received
        acked = [None, None]
        tsecr = [0, 0]
        e, out = self.ends, []
        for t, _, d, flags, payload in sorted(self.events):
            peer = sent[1 - d]
            i = seen[d]
            while i < len(peer) and peer[i][0] + self.delay <= t:
                acked[d], tsecr[d] = peer[i][1], peer[i][2]
                i += 1
            seen[d] = i
            tsval = (self.ts_base[d] + t // 1_000_000) & 0xFFFFFFFF
            ack = acked[d] if flags & 0x10 and acked[d] is not None else 0
            self.ipid[d] = (self.ipid[d] + 1) & 0xFFFF
            frame = _ETH_IP.pack(self.macs[1 - d], self.macs[d], 0x0800, 0x45, 0, 20 + 32 + len(payload),
                                 self.ipid[d], 0x4000, 64, 6, 0, self.ips[d], self.ips[1 - d]) + \
                _TCP_TS.pack(e[d][1], e[1 - d][1], seq[d] & 0xFFFFFFFF, ack & 0xFFFFFFFF, 8 << 4, flags, 64240, 0,
                             0, 1, 1, 8, 10, tsval, tsecr[d] if flags != 0x02 else 0) + payload
            out.append((t, d, frame))
            seq[d] += len(payload) + (1 if flags & 0x03 else 0)
            sent[d].append((t, seq[d], tsval))
        return out


def routed_frame(frame: bytes) -> bytes:
    """An Ethernet/IPv4 frame as a pod's eth0 receives it from the node's ztunnel: routed once (TTL 64 -> 63; the
    generator leaves IP checksums zero)."""
    return frame[:22] + bytes([frame[22] - 1]) + frame[23:]


def geneve_frame(inner: bytes, vni: int, sport: int) -> bytes:
    udp_len = 8 + 8 + len(inner)
    return _ETH_IP.pack(_mac(ISTIOOUT_ZT), _mac(ISTIOOUT_NODE), 0x0800, 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                        _ip4(ISTIOOUT_NODE), _ip4(ISTIOOUT_ZT)) + \
        _UDP.pack(sport, 6081, udp_len, 0) + _GENEVE.pack(0, 0, 0x6558, vni << 8) + inner


class PcapWriter:
    """Classic pcap, nanosecond timestamps, Ethernet."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        self.packets = 0
        self.bytes = 24

    def write(self, records: list[tuple[int, bytes]]) -> None:
        records.sort(key=lambda r: r[0])
        hdr = struct.Struct("<IIII").pack
        chunk = b"".join(hdr(t // 10**9, t % 10**9, len(fr), len(fr)) + fr for t, fr in records)
        self.f.write(chunk)
        self.packets += len(records)
        self.bytes += len(chunk)

    def close(self) -> None:
        self.f.close()


# -- the HBONE simulation --------------------------------------------------------------------------------------------
@dataclass
class AppConnection:
    """One client connection and its CONNECT stream."""

    client_port: int
    request: bytes
    response: bytes
    start: int
    trace_id: str
    stream_id: int | None = None
    pod_a: TcpFlow | None = None
    pod_b: TcpFlow | None = None
    pending_c2s: bytearray = field(default_factory=bytearray)
    got_200: bool = False
    delivered: int = 0          # request bytes ztunnel B has written to the pod


class HboneConnection:
    """ztunnel A (h2 client) and ztunnel B (h2 server) over one TLS 1.3 connection, driven by timed events."""

    def __init__(self, cctx: ssl.SSLContext, sctx: ssl.SSLContext, client_port: int, rng: random.Random) -> None:
        import h2.config
        import h2.connection

        self.rng = rng
        self.flow = TcpFlow((ZT_A, client_port), (POD_B, HBONE_PORT), LINK_NS, rng)
        self.bios = [ssl.MemoryBIO() for _ in range(4)]     # client in/out, server in/out
        self.tls = (cctx.wrap_bio(self.bios[0], self.bios[1]),
                    sctx.wrap_bio(self.bios[2], self.bios[3], server_side=True))
        self.h2 = (h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8")),
                   h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8")))
        self.queue: list = []
        self.order = 0
        self.by_stream: dict[int, AppConnection] = {}
        self.blocked: list[tuple[int, int, bytes, bool]] = []

    # event queue
    def at(self, t: int, fn, *args) -> None:
        self.order += 1
        heapq.heappush(self.queue, (t, self.order, fn, args))

    def run(self) -> int:
        t = 0
        while self.queue:
            t, _, fn, args = heapq.heappop(self.queue)
            fn(t, *args)
        return t

    # wire: TLS bytes out of one end, cut into segments, delivered to the other end after the link delay
    def _flush(self, t: int, d: int) -> None:
        h = self.h2[d]
        data = h.data_to_send()
        if data:
            self.tls[d].write(data)
        wire = self.bios[1 if d == 0 else 3].read()
        if wire:
            t_last = self.flow.send(t, d, wire)
            self.at(t_last + LINK_NS, self._deliver, 1 - d, wire)

    def _deliver(self, t: int, d: int, wire: bytes) -> None:
        self.bios[0 if d == 0 else 2].write(wire)
        end = self.tls[d]
        if not end.server_side and self.state != "open" or end.server_side and self.server_state != "open":
            self._handshake_step(t, d)
            return
        self._read_plaintext(t, d)
        self._flush(t, d)

    def _read_plaintext(self, t: int, d: int) -> None:
        """Everything TLS endpoint d can decrypt now, handed to its HTTP/2 connection."""
        end = self.tls[d]
        chunks = []
        try:
            while True:
                piece = end.read(1 << 20)
                if not piece:
                    break
                chunks.append(piece)
        except ssl.SSLWantReadError:
            pass
        if chunks:
            self._h2_events(t, d, self.h2[d].receive_data(b"".join(chunks)))

    # handshake
    def open(self, t: int, on_open) -> None:
        self.state = self.server_state = "handshake"
        self.on_open = on_open
        t = self.flow.handshake(t)
        self._handshake_step(t, 0)

    def _handshake_step(self, t: int, d: int) -> None:
        end = self.tls[d]
        try:
            end.do_handshake()
            if d == 0:
                self.state = "open"
                self.h2[0].initiate_connection()
                self.h2[0].update_settings({0x4: 4 << 20, 0x5: 1 << 20, 0x3: 100})
                self.h2[0].increment_flow_control_window((16 << 20) - 65535)
                self._flush(t, 0)
                self.at(t, self.on_open)
            else:
                self.server_state = "open"
                self.h2[1].initiate_connection()
                self.h2[1].update_settings({0x4: 4 << 20, 0x5: 1 << 20, 0x3: 100})
                self.h2[1].increment_flow_control_window((16 << 20) - 65535)
                # data that arrived with the client's Finished (the preface) is read by the next delivery
                self._deliver_pending(t, 1)
        except ssl.SSLWantReadError:
            pass
        wire = self.bios[1 if d == 0 else 3].read()
        if wire:
            t_last = self.flow.send(t, d, wire)
            self.at(t_last + LINK_NS, self._deliver, 1 - d, wire)

    def _deliver_pending(self, t: int, d: int) -> None:
        self._read_plaintext(t, d)
        h = self.h2[d]
        data = h.data_to_send()
        if data:
            self.tls[d].write(data)

    # HTTP/2 events at each end
    def _h2_events(self, t: int, d: int, events) -> None:
        import h2.events as ev

        h = self.h2[d]
        for e in events:
            if isinstance(e, ev.RequestReceived):            # ztunnel B: connect to the pod, then 200
                app = self.by_stream[e.stream_id]
                app.pod_b = TcpFlow((ZT_B, 40000 + self.rng.randrange(20000)), (POD_B, APP_PORT), LOCAL_NS,
                                    self.rng)
                up = app.pod_b.handshake(t + 20 * US)
                self.at(up + 10 * US, self._respond_200, e.stream_id)
            elif isinstance(e, ev.ResponseReceived):         # ztunnel A: the 200; forward what the app sent
                app = self.by_stream[e.stream_id]
                app.got_200 = True
                if app.pending_c2s:
                    self._send_data(t + 10 * US, 0, e.stream_id, bytes(app.pending_c2s), False)
                    app.pending_c2s.clear()
            elif isinstance(e, ev.DataReceived):
                if e.flow_controlled_length:
                    h.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                app = self.by_stream[e.stream_id]
                if e.data:
                    if d == 1:
                        t_in = app.pod_b.send(t + 15 * US, 0, e.data)
                        app.delivered += len(e.data)
                        if app.delivered == len(app.request):
                            self.at(t_in + 200 * US, self._server_reply, e.stream_id)
                    else:
                        app.pod_a.send(t + 15 * US, 1, e.data)
            elif isinstance(e, ev.StreamEnded):
                app = self.by_stream[e.stream_id]
                if d == 0:                                   # response ended: FIN to the client, which closes
                    t_fin = app.pod_a.fin(t + 15 * US, 1)
                    self.at(t_fin + 2 * LOCAL_NS, self._client_fin, e.stream_id)
                else:                                        # request side ended: FIN to the pod
                    app.pod_b.fin(t + 15 * US, 0)
            elif isinstance(e, ev.WindowUpdated) and self.blocked:
                blocked, self.blocked = self.blocked, []
                for dd, sid, data, end in blocked:
                    self._send_data(t, dd, sid, data, end)
        self._flush(t, d)

    def _respond_200(self, t: int, sid: int) -> None:
        self.h2[1].send_headers(sid, [(":status", "200")])
        self._flush(t, 1)

    def _send_data(self, t: int, d: int, sid: int, data: bytes, end: bool) -> None:
        """DATA frames of at most 16 KiB (ztunnel's read size), as the flow-control windows allow."""
        h = self.h2[d]
        for i, (bd, bsid, bdata, bend) in enumerate(self.blocked):
            if bd == d and bsid == sid:          # keep the stream's bytes in order behind what is waiting
                self.blocked[i] = (bd, bsid, bdata + data, bend or end)
                return
        pos = 0
        while pos < len(data):
            room = min(h.local_flow_control_window(sid), 16384)
            if room <= 0:
                self.blocked.append((d, sid, data[pos:], end))
                self._flush(t, d)
                return
            h.send_data(sid, data[pos:pos + room])
            pos += room
        if end:
            h.end_stream(sid)
        self._flush(t, d)

    def _server_reply(self, t: int, sid: int) -> None:
        """The pod answers; ztunnel B relays each 16 KiB it reads, then the pod's FIN as END_STREAM."""
        app = self.by_stream[sid]
        resp = app.response
        for pos in range(0, len(resp), 16384):
            piece = resp[pos:pos + 16384]
            t = app.pod_b.send(t, 1, piece)
            self.at(t + 10 * US, self._send_data, 1, sid, piece, False)
        t = app.pod_b.fin(t + 5 * US, 1)
        self.at(t + 10 * US, self._end, 1, sid)

    def _end(self, t: int, d: int, sid: int, tries: int = 0) -> None:
        h = self.h2[d]
        if any(b[1] == sid and b[0] == d for b in self.blocked):
            if tries > 10_000:
                raise RuntimeError(f"stream {sid}: flow-control window never reopened")
            self.at(t + LINK_NS, self._end, d, sid, tries + 1)
            return
        h.end_stream(sid)
        self._flush(t, d)

    def _client_fin(self, t: int, sid: int) -> None:
        app = self.by_stream[sid]
        app.pod_a.fin(t, 0)
        self.at(t + 10 * US, self._end, 0, sid)

    # one app connection on this HBONE connection
    def app_connection(self, t: int, app: AppConnection) -> None:
        app.pod_a = TcpFlow((POD_A, app.client_port), (SVC, SVC_PORT), LOCAL_NS, self.rng)
        t_up = app.pod_a.handshake(t)
        h = self.h2[0]
        sid = h.get_next_available_stream_id()
        app.stream_id = sid
        self.by_stream[sid] = app
        h.send_headers(sid, [(":method", "CONNECT"), (":authority", f"{POD_B}:{APP_PORT}"),
                             ("forwarded", f'for="{POD_A}:{app.client_port}"'),
                             ("traceparent", f"00-{app.trace_id}-{self.rng.getrandbits(64):016x}-01"),
                             ("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,"
                                         "k8s.deployment.name=sleep,service.name=sleep,service.version=v1")])
        self._flush(t_up + 5 * US, 0)
        t_req = app.pod_a.send(t_up + 20 * US, 0, app.request)
        self.at(t_req + LOCAL_NS, self._client_bytes, sid)

    def _client_bytes(self, t: int, sid: int) -> None:
        app = self.by_stream[sid]
        if app.got_200:
            self._send_data(t, 0, sid, app.request, False)
        else:
            app.pending_c2s += app.request

    def close(self, t: int) -> int:
        self.h2[0].close_connection()
        self._flush(t, 0)
        t = self.run()
        t = self.flow.fin(t + 100 * US, 0)
        return self.flow.fin(t + LINK_NS + 10 * US, 1)


# -- the capture set -------------------------------------------------------------------------------------------------
@dataclass
class MeshSet:
    directory: Path
    files: dict[str, Path]
    keylog: Path
    truth: dict
    packets: int
    bytes: int
    tunnel_payload: int        # TLS bytes of the HBONE connections as one capture carries them


def _sizes(rng: random.Random, largest: int) -> tuple[int, int]:
    """(request body, response body): mostly GETs of 1 KB..`largest` (log-uniform), one in five a POST upload."""
    import math

    resp = int(10 ** rng.uniform(3, math.log10(largest)))
    body = int(10 ** rng.uniform(3, 5.5)) if rng.random() < 0.2 else 0
    return body, resp


def generate(directory: str | os.PathLike, mb: float = 300, seed: int = 1, streams_per_connection: int = 40,
             concurrency: int = 4, offset_us: int = 1_300, largest: int = 2_000_000, routed: bool = True) -> MeshSet:
    """Write the five captures, keylog.txt, points.toml and mesh.json to `directory`; total capture size about `mb`
    MB (at least one HBONE connection); responses up to `largest` bytes. `routed=False`: the pods' peers reach them
    with TTL 64 (a bridge, as some CNIs have: no TTL tells a pod's own packets from its peer's)."""
    hop = routed_frame if routed else (lambda fr: fr)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    keylog = out / "keylog.txt"
    keylog.write_text("")
    pki_dir = Path(tempfile.mkdtemp(prefix="mesh-pki-"))
    cctx, sctx = tls_contexts(make_pki(pki_dir), keylog)
    blob = rng.randbytes(1 << 21)
    offsets = {"node-a": 0, "node-b": offset_us * US}
    writers = {name: PcapWriter(out / f"{name}.pcap") for name in CAPTURES}
    budget = mb * 1e6
    truth_conns: list[dict] = []
    hbone_conns: list[dict] = []
    t = T0
    port = 33000
    tunnel_payload = 0
    while sum(w.bytes for w in writers.values()) < budget:
        hb = HboneConnection(cctx, sctx, 50000 + len(hbone_conns), rng)
        apps: list[AppConnection] = []
        n_streams = max(1, min(streams_per_connection, int(rng.uniform(0.5, 1.5) * streams_per_connection)))

        def opened(t_open: int) -> None:
            start = t_open + 50 * US
            for i in range(n_streams):
                nonlocal port
                body, resp = _sizes(rng, largest)
                port += 1
                req = (f"POST /upload HTTP/1.1\r\nHost: echo\r\nContent-Length: {body}\r\n\r\n".encode() +
                       blob[:body]) if body else b"GET /bytes/%d HTTP/1.1\r\nHost: echo\r\nUser-Agent: curl/8.5\r\n" \
                                                  b"Accept: */*\r\n\r\n" % resp
                off = rng.randrange(len(blob) - resp) if resp < len(blob) else 0
                response = (f"HTTP/1.1 200 OK\r\nContent-Length: {resp}\r\nConnection: close\r\n\r\n".encode()
                            + blob[off:off + resp])
                app = AppConnection(port, req, response, 0, f"{rng.getrandbits(128):032x}")
                apps.append(app)
                # `concurrency` connections at a time: the next one starts as an earlier one is expected to finish
                gap = int((len(response) * 1.5 + 2_000_000) / concurrency)
                hb.at(start, hb.app_connection, app)
                start += gap

        hb.open(t, opened)
        t_end = hb.close(hb.run())
        recs = {name: [] for name in CAPTURES}
        for ts, d, fr in hb.flow.frames():
            recs["node-a-eth0"].append((ts + (0 if d == 0 else LINK_NS), fr))
            recs["node-b-eth0"].append((ts + (LINK_NS if d == 0 else 0) + offsets["node-b"], fr))
            tunnel_payload += len(fr) - 66
        for app in apps:
            for ts, d, fr in app.pod_a.frames():
                recs["pod-a-eth0"].append((ts, fr if d == 0 else hop(fr)))
                if d == 0:
                    recs["node-a-istioout"].append((ts + 3 * US, geneve_frame(fr, 1001, 49152 + app.client_port % 16384)))
            for ts, d, fr in app.pod_b.frames():
                recs["pod-b-eth0"].append((ts + offsets["node-b"], hop(fr) if d == 0 else fr))
            truth_conns.append({
                "client": f"{POD_A}:{app.client_port}", "original_dst": f"{SVC}:{SVC_PORT}",
                "backend": f"{POD_B}:{APP_PORT}", "hbone_client": f"{ZT_A}:{hb.flow.ends[0][1]}",
                "hbone_server": f"{POD_B}:{HBONE_PORT}", "stream_id": app.stream_id, "trace_id": app.trace_id,
                "upstream": f"{ZT_B}:{app.pod_b.ends[0][1]}",
                "bytes_client_to_server": len(app.request), "bytes_server_to_client": len(app.response)})
        hbone_conns.append({"client": f"{ZT_A}:{hb.flow.ends[0][1]}", "server": f"{POD_B}:{HBONE_PORT}",
                            "streams": [a.stream_id for a in apps]})
        for name, w in writers.items():
            w.write(recs[name])
        t = t_end + 5_000 * US
    for w in writers.values():
        w.close()
    truth = {"generated_by": "benchmarks/mesh.py", "seed": seed, "clock_offsets_ns": offsets,
             "tunnel_payload_bytes": tunnel_payload,     # TCP payload of the HBONE connections in one capture
             "captures": {name: {"file": f"{name}.pcap", "node": NODE_OF[name], "packets": w.packets,
                                 "bytes": w.bytes} for name, w in writers.items()},
             "connections": truth_conns, "hbone_connections": hbone_conns}
    (out / "mesh.json").write_text(json.dumps(truth, indent=1))
    # where each capture was taken, as whoever collected them would note it (pod captures name no node)
    (out / "points.toml").write_text("[points]\n" + "".join(f'"{name}.pcap" = "{ROLE_OF[name]}@{NODE_OF[name]}"\n'
                                                            for name in CAPTURES))
    return MeshSet(out, {n: out / f"{n}.pcap" for n in CAPTURES}, keylog, truth,
                   sum(w.packets for w in writers.values()), sum(w.bytes for w in writers.values()), tunnel_payload)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--mb", type=float, default=300, help="total size of the five captures (MB)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--streams", type=int, default=40, help="CONNECT streams per pooled HBONE connection (mean)")
    ap.add_argument("--offset-us", type=int, default=1_300, help="node B's clock offset")
    a = ap.parse_args()
    m = generate(a.out, a.mb, a.seed, a.streams, offset_us=a.offset_us)
    print(f"wrote {len(m.files)} captures, {m.packets} packets, {m.bytes / 1e6:.0f} MB, "
          f"{len(m.truth['connections'])} connections on {len(m.truth['hbone_connections'])} HBONE connections "
          f"to {m.directory}")

#!/usr/bin/env python3
"""HBONE proxies for the ambient lab: ztunnel outbound, ztunnel inbound and a waypoint.

Real parts only: Python's ``ssl`` (OpenSSL, TLS 1.3 only, ALPN h2, mutual TLS with SPIFFE
URI SAN certificates, no SNI, no session tickets) and the ``h2`` HTTP/2 stack, over
ordinary kernel sockets. One process per role, started by ``lab.py`` inside a network
namespace with a JSON configuration file::

    python3 hbone_proxy.py CONFIG.json

Roles:

``ztunnel-outbound``
    Accepts TPROXY-redirected client connections on 15001 (IP_TRANSPARENT listener: the
    accepted socket's local address is the original destination, e.g. a Service ClusterIP),
    maps the destination with the service table, and opens an HTTP/2 CONNECT stream on a
    pooled HBONE connection to ``<pod or waypoint IP>:15008``. On a non-200 answer it resets
    the client connection (SO_LINGER 0).
``ztunnel-inbound``
    Accepts HBONE on 15008 (TPROXY from ``pistioin``), connects to the requested pod address
    and answers 200, or 503 when the connect fails, then relays bytes both ways.
In-pod mode (era C, Istio 1.21+): the same two roles run inside the app pods' namespaces.
``redirect`` (outbound): the listener is ordinary, fed by nftables REDIRECT, and the original
destination comes from ``SO_ORIGINAL_DST``. ``so_mark`` (both): every socket the proxy opens
carries that SO_MARK (0x539), which the pod's rules exempt from redirection.
``spoof_upstream_source`` (inbound): the connection to the app uses the HBONE peer's IP (the
client pod's) as source, IP_TRANSPARENT, over lo.
``waypoint``
    Terminates HBONE on 15008 (no redirect: the waypoint pod is addressed directly), resolves
    the Service address in ``:authority`` and re-originates HBONE to the backend pod, Envoy
    style (no ``forwarded``/``traceparent``: the header chain breaks at a waypoint).

Header dialects (``dialect`` in the config) follow ``/work/shared/notes/ambient-wire.md``:
``envoy`` (era A ztunnel: ``:authority`` + ``x-envoy-original-dst-host``) and ``rust``
(``:authority``, ``forwarded: for="ip:port"``, ``traceparent``, ``baggage``).

Every TLS session's secrets go to ``keylog`` (NSS key log format). Every connection and
stream is written as one JSON line to ``log`` (the lab's ground truth for stream ids and
HBONE connections). Differences from the real ztunnel are listed in samples/README.md.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

IP_TRANSPARENT = 19  # linux/in.h
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (SOL_IP)
SO_MARK = 36  # asm-generic/socket.h
HBONE_PORT = 15008
# ztunnel's HTTP/2 settings (ambient-wire.md): stream window 4 MiB, connection window 16 MiB,
# max frame 1 MiB, up to 100 streams per pooled connection.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100
READ_CHUNK = 16384
CONNECT_TIMEOUT_S = 3.0


def now_ns() -> int:
    return time.time_ns()


class JsonLog:
    def __init__(self, path: str, role: str) -> None:
        self._f = open(path, "a", buffering=1)
        self._role = role

    def write(self, kind: str, **record) -> None:
        record = {"role": self._role, "kind": kind, "t_ns": now_ns(), **record}
        self._f.write(json.dumps(record, sort_keys=True) + "\n")


def addr(pair) -> str:
    return f"{pair[0]}:{pair[1]}"


# --------------------------------------------------------------------------- TLS contexts

def _base_context(server: bool, cfg: dict) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    ctx.load_verify_locations(cfg["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS both ways
    ctx.check_hostname = False           # identities are SPIFFE URIs, checked below
    ctx.set_alpn_protocols(["h2"])
    ctx.keylog_filename = cfg["keylog"]
    if server:
        ctx.num_tickets = 0              # ztunnel does not resume sessions
    return ctx


def peer_spiffe_ids(ssl_object: ssl.SSLObject) -> list[str]:
    cert = ssl_object.getpeercert() or {}
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


# --------------------------------------------------------------------------- HTTP/2 side

class StreamClosed(Exception):
    pass


@dataclass
class Stream:
    stream_id: int
    inbound: asyncio.Queue = field(default_factory=asyncio.Queue)  # bytes, None (EOF) or Exception
    response: asyncio.Future | None = None
    reset: bool = False
    bytes_in: int = 0
    bytes_out: int = 0


class H2Tunnel:
    """One HBONE connection (TLS 1.3 + HTTP/2), client or server side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 client_side: bool, log: JsonLog, on_request=None) -> None:
        self.reader, self.writer = reader, writer
        self.client_side = client_side
        self.log = log
        self.on_request = on_request
        set_nodelay(writer)
        self.local = addr(writer.get_extra_info("sockname"))
        self.remote = addr(writer.get_extra_info("peername"))
        sslobj = writer.get_extra_info("ssl_object")
        self.tls = {"version": sslobj.version(), "cipher": sslobj.cipher()[0],
                    "alpn": sslobj.selected_alpn_protocol(), "peer_ids": peer_spiffe_ids(sslobj)}
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        initial = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                   h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                   h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS}
        if client_side:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self.conn.local_settings = h2.settings.Settings(client=client_side, initial_values=initial)
        self.streams: dict[int, Stream] = {}
        self.window_cond = asyncio.Condition()
        self.closed = False
        self.active = 0
        self.tasks: set[asyncio.Task] = set()

    @property
    def key(self) -> dict:
        return {"local": self.local, "remote": self.remote}

    async def start(self) -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        await self.flush()
        self.log.write("hbone_open", hbone=self.key, client_side=self.client_side, tls=self.tls)
        self.reader_task = asyncio.create_task(self._read_loop())

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            await self.writer.drain()

    def has_capacity(self) -> bool:
        return not self.closed and self.active < MAX_STREAMS

    # -- client side
    async def open_stream(self, headers: list[tuple[str, str]]) -> tuple[Stream, list]:
        sid = self.conn.get_next_available_stream_id()
        stream = Stream(sid, response=asyncio.get_running_loop().create_future())
        self.streams[sid] = stream
        self.active += 1
        self.conn.send_headers(sid, headers)
        await self.flush()
        resp = await stream.response
        return stream, resp

    # -- both sides
    async def send_data(self, stream: Stream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while True:
                if stream.reset or self.closed:
                    raise StreamClosed(stream.stream_id)
                window = min(self.conn.local_flow_control_window(stream.stream_id),
                             self.conn.max_outbound_frame_size)
                if window > 0:
                    break
                async with self.window_cond:
                    await self.window_cond.wait()
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream.stream_id, bytes(chunk))
            stream.bytes_out += len(chunk)
            await self.flush()

    async def end_stream(self, stream: Stream) -> None:
        if not stream.reset and not self.closed:
            try:
                self.conn.end_stream(stream.stream_id)
            except h2.exceptions.StreamClosedError:
                return
            await self.flush()

    async def reset_stream(self, stream: Stream) -> None:
        if not stream.reset and not self.closed:
            try:
                self.conn.reset_stream(stream.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
            stream.reset = True
            await self.flush()

    async def consumed(self, stream: Stream, n: int) -> None:
        if n and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, stream.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
            await self.flush()

    def stream_done(self, stream: Stream) -> None:
        self.active = max(0, self.active - 1)

    async def close(self) -> None:
        """Graceful close: GOAWAY, TLS close_notify, TCP FIN."""
        if self.closed:
            return
        try:
            self.conn.close_connection()
            await self.flush()
        except Exception:
            pass
        self.closed = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except Exception:
            pass
        self.log.write("hbone_close", hbone=self.key)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                events = self.conn.receive_data(data)
                for event in events:
                    await self._dispatch(event)
                await self.flush()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError) as exc:
            self.log.write("hbone_error", hbone=self.key, error=repr(exc))
        finally:
            self.closed = True
            for stream in self.streams.values():
                stream.inbound.put_nowait(StreamClosed(stream.stream_id))
                if stream.response and not stream.response.done():
                    stream.response.set_exception(StreamClosed(stream.stream_id))
            async with self.window_cond:
                self.window_cond.notify_all()
            if not self.writer.is_closing():
                self.writer.close()

    async def _dispatch(self, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            stream = Stream(event.stream_id)
            self.streams[event.stream_id] = stream
            self.active += 1
            task = asyncio.create_task(self.on_request(self, stream, list(event.headers)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream and not stream.response.done():
                stream.response.set_result(list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.bytes_in += len(event.data)
                stream.inbound.put_nowait((event.data, event.flow_controlled_length))
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.inbound.put_nowait(None)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset = True
                stream.inbound.put_nowait(StreamClosed(event.stream_id))
                if stream.response and not stream.response.done():
                    stream.response.set_exception(StreamClosed(event.stream_id))
            async with self.window_cond:
                self.window_cond.notify_all()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            async with self.window_cond:
                self.window_cond.notify_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True


# --------------------------------------------------------------------------- relaying

async def pump_socket_to_stream(reader: asyncio.StreamReader, tunnel: H2Tunnel, stream: Stream,
                                marks: dict, prefix: str) -> None:
    try:
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                break
            marks.setdefault(f"{prefix}_first_byte_ns", now_ns())
            await tunnel.send_data(stream, data)
        marks[f"{prefix}_eof_ns"] = now_ns()
        await tunnel.end_stream(stream)
    except (ConnectionError, StreamClosed):
        marks[f"{prefix}_error_ns"] = now_ns()
        await tunnel.reset_stream(stream)


async def pump_stream_to_socket(tunnel: H2Tunnel, stream: Stream, writer: asyncio.StreamWriter,
                                marks: dict, prefix: str) -> None:
    try:
        while True:
            item = await stream.inbound.get()
            if item is None:
                break
            if isinstance(item, Exception):
                raise item
            data, flow_len = item
            marks.setdefault(f"{prefix}_first_byte_ns", now_ns())
            writer.write(data)
            await writer.drain()
            await tunnel.consumed(stream, flow_len)
        marks[f"{prefix}_eof_ns"] = now_ns()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, StreamClosed):
        marks[f"{prefix}_error_ns"] = now_ns()
        abort_with_rst(writer)


async def pump_stream_to_stream(src_tunnel: H2Tunnel, src: Stream, dst_tunnel: H2Tunnel, dst: Stream,
                                marks: dict, prefix: str) -> None:
    try:
        while True:
            item = await src.inbound.get()
            if item is None:
                break
            if isinstance(item, Exception):
                raise item
            data, flow_len = item
            marks.setdefault(f"{prefix}_first_byte_ns", now_ns())
            await dst_tunnel.send_data(dst, data)
            await src_tunnel.consumed(src, flow_len)
        marks[f"{prefix}_eof_ns"] = now_ns()
        await dst_tunnel.end_stream(dst)
    except StreamClosed:
        marks[f"{prefix}_error_ns"] = now_ns()
        await dst_tunnel.reset_stream(dst)
        await src_tunnel.reset_stream(src)


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """ztunnel sets TCP_NODELAY on every socket; without it Nagle + delayed ACK add ~40 ms steps."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def header_value(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- sockets

async def open_tcp(host: str, port: int, *, source_ip: str | None = None, mark: int | None = None,
                   ssl_ctx: ssl.SSLContext | None = None):
    """A TCP connection; with source_ip the socket is IP_TRANSPARENT and bound to that (foreign)
    address, port chosen by the kernel; with mark the socket carries SO_MARK (in-pod ztunnel: 0x539,
    so that the pod's nftables rules neither redirect it nor treat it as app traffic)."""
    if source_ip is None and mark is None:
        return await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None), CONNECT_TIMEOUT_S)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source_ip is not None:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((source_ip, 0))
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    # server_hostname is the IP literal: OpenSSL sends no SNI for it (as ztunnel).
    return await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None), CONNECT_TIMEOUT_S)


def original_dst(writer: asyncio.StreamWriter) -> str:
    """The destination before nftables REDIRECT (SO_ORIGINAL_DST, a struct sockaddr_in)."""
    raw = writer.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return f"{socket.inet_ntoa(raw[4:8])}:{port}"


# --------------------------------------------------------------------------- pool

class Pool:
    """HBONE connection pool: one connection per destination, up to MAX_STREAMS streams."""

    def __init__(self, cfg: dict, log: JsonLog) -> None:
        self.ctx = _base_context(False, cfg)
        self.mark = cfg.get("so_mark")
        self.log = log
        self.conns: dict[str, list[H2Tunnel]] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def get(self, target: str, expected_id: str | None,
                  source_ip: str | None = None) -> tuple[H2Tunnel, bool]:
        """A pooled connection to target; with source_ip (era B) the connection's source address is
        the client pod's IP (IP_TRANSPARENT) and the pool is per source workload."""
        key = f"{source_ip}->{target}" if source_ip else target
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            for tunnel in self.conns.get(key, []):
                if tunnel.has_capacity():
                    return tunnel, False
            host, port = split_hostport(target)
            reader, writer = await open_tcp(host, port, source_ip=source_ip, mark=self.mark, ssl_ctx=self.ctx)
            tunnel = H2Tunnel(reader, writer, client_side=True, log=self.log)
            if expected_id and expected_id not in tunnel.tls["peer_ids"]:
                writer.close()
                raise ssl.SSLError(f"peer identity {tunnel.tls['peer_ids']} is not {expected_id}")
            await tunnel.start()
            self.conns.setdefault(key, []).append(tunnel)
            return tunnel, True

    async def close_all(self) -> None:
        for tunnels in self.conns.values():
            for tunnel in tunnels:
                await tunnel.close()


# --------------------------------------------------------------------------- roles

def connect_headers(cfg: dict, authority: str, client: tuple[str, int] | None, to_waypoint: bool,
                    role: str) -> list[tuple[str, str]]:
    headers = [(":method", "CONNECT"), (":authority", authority)]
    if role == "waypoint":
        return headers  # Envoy originating HBONE: no extra headers
    if cfg["dialect"] == "envoy":
        headers.append(("x-envoy-original-dst-host", authority))
        if to_waypoint:
            headers.append(("baggage", cfg["baggage"]))
    else:
        headers.append(("forwarded", f'for="{client[0]}:{client[1]}"'))
        headers.append(("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"))
        headers.append(("baggage", cfg["baggage"]))
    return headers


class Proxy:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.role = cfg["role"]
        self.log = JsonLog(cfg["log"], self.role)
        self.pool = Pool(cfg, self.log) if self.role in ("ztunnel-outbound", "waypoint") else None
        self.inbound_tunnels: set[H2Tunnel] = set()
        self.client_tasks: set[asyncio.Task] = set()
        self.server_ctx = _base_context(True, cfg) if self.role != "ztunnel-outbound" else None

    # ---- outbound (ztunnel A)
    async def handle_client(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.client_tasks.add(task)
        try:
            await self._handle_client(reader, writer)
        finally:
            self.client_tasks.discard(task)

    async def _handle_client(self, reader, writer) -> None:
        accepted = now_ns()
        set_nodelay(writer)
        client = writer.get_extra_info("peername")
        # TPROXY (eras A/B): the accepted socket's local address is the original destination;
        # nftables REDIRECT (era C, in-pod): it is 127.0.0.1:15001, the original is SO_ORIGINAL_DST.
        orig = original_dst(writer) if self.cfg.get("redirect") else addr(writer.get_extra_info("sockname"))
        svc = self.cfg["services"].get(orig)
        backend = svc["backend"] if svc else orig
        waypoint = svc.get("waypoint") if svc else None
        if waypoint:
            target, authority, expected = f"{waypoint}:{HBONE_PORT}", orig, svc.get("waypoint_id")
        else:
            target, authority, expected = f"{split_hostport(backend)[0]}:{HBONE_PORT}", backend, \
                (svc or {}).get("backend_id")
        headers = connect_headers(self.cfg, authority, client, bool(waypoint), self.role)
        rec = {"client": addr(client), "original_dst": orig, "backend": backend, "hbone_target": target,
               "via_waypoint": waypoint, "request_headers": headers, "accepted_ns": accepted,
               "accepted_on": addr(writer.get_extra_info("sockname"))}
        try:
            tunnel, new = await self.pool.get(target, expected,
                                              client[0] if self.cfg.get("spoof_source") else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            rec.update(outcome="hbone_connect_failed", error=repr(exc), end_ns=now_ns())
            self.log.write("client_conn", **rec)
            abort_with_rst(writer)
            return
        rec.update(hbone=tunnel.key, hbone_new=new, connect_sent_ns=now_ns())
        try:
            stream, response = await tunnel.open_stream(headers)
        except StreamClosed as exc:
            rec.update(outcome="stream_reset", error=repr(exc), end_ns=now_ns(), stream_id=exc.args[0])
            self.log.write("client_conn", **rec)
            abort_with_rst(writer)
            return
        status = header_value(response, ":status")
        rec.update(stream_id=stream.stream_id, response_headers=response, status=int(status),
                   response_ns=now_ns())
        if status != "200":
            abort_with_rst(writer)
            tunnel.stream_done(stream)
            rec.update(outcome="reset_client", end_ns=now_ns())
            self.log.write("client_conn", **rec)
            return
        marks: dict = {}
        await asyncio.gather(pump_socket_to_stream(reader, tunnel, stream, marks, "client_to_hbone"),
                             pump_stream_to_socket(tunnel, stream, writer, marks, "hbone_to_client"))
        writer.close()
        tunnel.stream_done(stream)
        rec.update(outcome="relayed", end_ns=now_ns(), bytes_client_to_server=stream.bytes_out,
                   bytes_server_to_client=stream.bytes_in, marks=marks)
        self.log.write("client_conn", **rec)

    # ---- inbound (ztunnel B, waypoint)
    async def handle_hbone(self, reader, writer) -> None:
        tunnel = H2Tunnel(reader, writer, client_side=False, log=self.log, on_request=self.handle_stream)
        self.inbound_tunnels.add(tunnel)
        await tunnel.start()
        await tunnel.reader_task
        if tunnel.tasks:
            await asyncio.gather(*list(tunnel.tasks), return_exceptions=True)
        if not writer.is_closing():
            writer.close()
        self.log.write("hbone_close", hbone=tunnel.key)
        self.inbound_tunnels.discard(tunnel)

    async def handle_stream(self, tunnel: H2Tunnel, stream: Stream, headers: list) -> None:
        rec = {"hbone": tunnel.key, "stream_id": stream.stream_id, "request_headers": headers,
               "request_ns": now_ns(), "peer_ids": tunnel.tls["peer_ids"]}
        method = header_value(headers, ":method")
        authority = header_value(headers, ":authority")
        if method != "CONNECT" or not authority:
            await self._respond(tunnel, stream, 400, rec)
            return
        if self.role == "waypoint":
            await self._waypoint_stream(tunnel, stream, authority, rec)
        else:
            await self._ztunnel_stream(tunnel, stream, headers, authority, rec)

    async def _respond(self, tunnel, stream, status: int, rec: dict, end: bool = True) -> None:
        tunnel.conn.send_headers(stream.stream_id, [(":status", str(status))], end_stream=end)
        await tunnel.flush()
        rec.update(status=status, response_ns=now_ns())
        if end:
            tunnel.stream_done(stream)
            rec.update(outcome=f"answered_{status}", end_ns=now_ns())
            self.log.write("stream", **rec)

    async def _ztunnel_stream(self, tunnel, stream, headers, authority, rec) -> None:
        # Era A (Envoy ztunnel) chose its upstream from x-envoy-original-dst-host.
        target = header_value(headers, "x-envoy-original-dst-host") or authority
        host, port = split_hostport(target)
        rec["upstream_target"] = target
        rec["upstream_connect_ns"] = now_ns()
        # In-pod inbound (era C): connect to the app from the HBONE peer's IP (the client pod's),
        # IP_TRANSPARENT, marked so the pod's rules route the app's replies back over lo.
        source_ip = split_hostport(tunnel.remote)[0] if self.cfg.get("spoof_upstream_source") else None
        try:
            up_reader, up_writer = await open_tcp(host, port, source_ip=source_ip, mark=self.cfg.get("so_mark"))
        except (OSError, asyncio.TimeoutError) as exc:
            rec["upstream_error"] = repr(exc)
            await self._respond(tunnel, stream, 503, rec)
            return
        set_nodelay(up_writer)
        rec["upstream"] = {"local": addr(up_writer.get_extra_info("sockname")),
                           "remote": addr(up_writer.get_extra_info("peername"))}
        rec["upstream_connected_ns"] = now_ns()
        await self._respond(tunnel, stream, 200, rec, end=False)
        marks: dict = {}
        await asyncio.gather(pump_stream_to_socket(tunnel, stream, up_writer, marks, "hbone_to_upstream"),
                             pump_socket_to_stream(up_reader, tunnel, stream, marks, "upstream_to_hbone"))
        up_writer.close()
        tunnel.stream_done(stream)
        rec.update(outcome="relayed", end_ns=now_ns(), bytes_client_to_server=stream.bytes_in,
                   bytes_server_to_client=stream.bytes_out, marks=marks)
        self.log.write("stream", **rec)

    async def _waypoint_stream(self, tunnel, stream, authority, rec) -> None:
        svc = self.cfg["services"].get(authority)
        backend = svc["backend"] if svc else authority
        target = f"{split_hostport(backend)[0]}:{HBONE_PORT}"
        headers = connect_headers(self.cfg, backend, None, False, self.role)
        rec.update(upstream_target=target, upstream_request_headers=headers)
        try:
            up_tunnel, new = await self.pool.get(target, (svc or {}).get("backend_id"))
            rec.update(upstream_hbone=up_tunnel.key, upstream_hbone_new=new, upstream_connect_ns=now_ns())
            up_stream, response = await up_tunnel.open_stream(headers)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, StreamClosed) as exc:
            rec["upstream_error"] = repr(exc)
            await self._respond(tunnel, stream, 503, rec)
            return
        status = int(header_value(response, ":status"))
        rec.update(upstream_stream_id=up_stream.stream_id, upstream_status=status,
                   upstream_response_ns=now_ns())
        if status != 200:
            up_tunnel.stream_done(up_stream)
            await self._respond(tunnel, stream, status, rec)  # Envoy: 503 on upstream failure
            return
        await self._respond(tunnel, stream, 200, rec, end=False)
        marks: dict = {}
        await asyncio.gather(
            pump_stream_to_stream(tunnel, stream, up_tunnel, up_stream, marks, "downstream_to_upstream"),
            pump_stream_to_stream(up_tunnel, up_stream, tunnel, stream, marks, "upstream_to_downstream"))
        tunnel.stream_done(stream)
        up_tunnel.stream_done(up_stream)
        rec.update(outcome="relayed", end_ns=now_ns(), bytes_client_to_server=stream.bytes_in,
                   bytes_server_to_client=stream.bytes_out, marks=marks)
        self.log.write("stream", **rec)

    # ---- lifecycle
    def listening_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.cfg.get("transparent"):
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((self.cfg.get("listen_ip", "0.0.0.0"), self.cfg["listen_port"]))
        sock.listen(512)
        sock.setblocking(False)
        return sock

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.role == "ztunnel-outbound":
            server = await asyncio.start_server(self.handle_client, sock=self.listening_socket())
        else:
            server = await asyncio.start_server(self.handle_hbone, sock=self.listening_socket(),
                                                ssl=self.server_ctx)
        self.log.write("ready", listen=self.cfg["listen_port"], pid=os.getpid())
        print("READY", flush=True)
        await stop.wait()
        server.close()
        # Pooled connections are closed at the end of a scenario (GOAWAY + close_notify + FIN);
        # the real ztunnel closes them after 5 idle minutes.
        if self.client_tasks:
            await asyncio.wait(list(self.client_tasks), timeout=2)
        if self.pool:
            await self.pool.close_all()
        for tunnel in list(self.inbound_tunnels):
            await tunnel.close()
        self.log.write("stopped")


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    asyncio.run(Proxy(cfg).run())


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Client and server applications for the ambient lab (plain HTTP/1.1 over kernel TCP).

``python3 apps.py server LOG PORT``
    asyncio HTTP/1.1 server. ``GET /bytes/N`` answers N bytes, ``?delay=S`` waits S seconds
    before answering, anything else answers a short text. One request per connection
    (``Connection: close``). Logs every connection as a JSON line.
``python3 apps.py client LOG PLAN.json``
    Runs a plan: a list of steps, each a list of requests started concurrently
    (``{"dst": "10.96.0.10:80", "path": "/bytes/100"}``); steps run one after another.
    Logs every connection (local/remote address, times, bytes each way, outcome).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

BODY_CHUNK = 65536


def now_ns() -> int:
    return time.time_ns()


def addr(pair) -> str:
    return f"{pair[0]}:{pair[1]}"


class JsonLog:
    def __init__(self, path: str, role: str) -> None:
        self._f = open(path, "a", buffering=1)
        self._role = role

    def write(self, kind: str, **record) -> None:
        self._f.write(json.dumps({"role": self._role, "kind": kind, "t_ns": now_ns(), **record},
                                 sort_keys=True) + "\n")


# --------------------------------------------------------------------------- server

async def serve(log_path: str, port: int) -> None:
    log = JsonLog(log_path, "server")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = {"peer": addr(writer.get_extra_info("peername")),
               "local": addr(writer.get_extra_info("sockname")), "start_ns": now_ns()}
        received = 0
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            received += len(head)
            request_line = head.split(b"\r\n", 1)[0].decode()
            method, target, _ = request_line.split(" ", 2)
            path, _, query = target.partition("?")
            params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
            if "delay" in params:
                await asyncio.sleep(float(params["delay"]))
            if path.startswith("/bytes/"):
                size = int(path.rsplit("/", 1)[1])
                pattern = b"hbonecap-lab-" * 6000
                body_source = (pattern[i % 13:(i % 13) + min(BODY_CHUNK, size - i)]
                               for i in range(0, size, BODY_CHUNK))
                content_type = "application/octet-stream"
            else:
                size = len(b"hello from echo\n")
                body_source = iter([b"hello from echo\n"])
                content_type = "text/plain"
            header = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {size}\r\n"
                      f"Connection: close\r\n\r\n").encode()
            writer.write(header)
            sent = len(header)
            for chunk in body_source:
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
            await writer.drain()
            rec.update(request=request_line, status=200, bytes_in=received, bytes_out=sent)
            writer.write_eof()
            # Wait for the client's FIN (it closes after reading the whole body).
            while await reader.read(65536):
                pass
            rec["outcome"] = "ok"
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            rec.update(outcome="error", error=repr(exc), bytes_in=received)
        finally:
            writer.close()
            rec["end_ns"] = now_ns()
            log.write("server_conn", **rec)

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=512)
    log.write("ready", port=port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------- client

async def one_request(log: JsonLog, index: int, step: int, req: dict) -> None:
    host, _, port = req["dst"].rpartition(":")
    rec = {"index": index, "step": step, "dst": req["dst"], "path": req["path"], "start_ns": now_ns()}
    sent = received = 0
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
        rec.update(connected_ns=now_ns(), local=addr(writer.get_extra_info("sockname")))
        request = (f"GET {req['path']} HTTP/1.1\r\nHost: {req.get('host', req['dst'])}\r\n"
                   f"User-Agent: hbonecap-lab/1\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode()
        writer.write(request)
        await writer.drain()
        sent = len(request)
        head = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), 15)
            if not data:
                break
            if not received:
                rec["first_byte_ns"] = now_ns()
            received += len(data)
            if len(head) < 64:
                head += data[:64]
        rec["status"] = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
        rec["outcome"] = "ok" if rec["status"] == 200 else "bad_response"
    except ConnectionResetError as exc:
        rec.update(outcome="reset", error=repr(exc))
    except (OSError, asyncio.TimeoutError) as exc:
        rec.update(outcome="error", error=repr(exc))
    finally:
        if writer is not None:
            writer.close()
        rec.update(end_ns=now_ns(), bytes_sent=sent, bytes_received=received)
        log.write("client_conn", **rec)


async def run_plan(log_path: str, plan_path: str) -> None:
    log = JsonLog(log_path, "client")
    with open(plan_path) as f:
        plan = json.load(f)
    index = 0
    for step, requests in enumerate(plan["steps"]):
        tasks = []
        for req in requests:
            tasks.append(one_request(log, index, step, req))
            index += 1
        await asyncio.gather(*tasks)
        await asyncio.sleep(plan.get("pause_s", 0.2))
    log.write("done")


def main() -> None:
    if sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1] == "client":
        asyncio.run(run_plan(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()

"""HTTP/1.x message framing for both directions of a byte stream, as an observer.

Follows RFC 9112: sections 2-4 (start lines), 5 (field lines), 6.1-6.3 (message body length: Transfer-Encoding
chunked, Content-Length, read-until-close; responses to HEAD, 1xx, 204 and 304 have no body), 7.1 (chunked coding,
trailers), 9.3 (persistence, pipelining: responses answer requests in order); RFC 9110 section 9.3.6 (CONNECT: a 2xx
response turns the connection into a tunnel) and 7.8 (Upgrade / 101 Switching Protocols, e.g. h2c).

Strategy
  * ``feed(direction, Timed) -> events``, ``gap(direction, n)``, ``close()``. Events: `Http1Request`,
    `Http1Response` (carrying the request it answers), `Http1Switch` (the bytes after this point belong to
    another protocol: CONNECT tunnel or Upgrade), `Anomaly`.
  * Heads are buffered (bounded); bodies are skipped by counting, never copied.
  * Tolerant: bare LF line ends, obs-fold, duplicate headers, a response without request; problems are reported.
  * After a gap the direction looks for the next start line (`http1_resync`).

Limits: heads larger than `MAX_HEAD` bytes, more than `MAX_HEADERS` fields, chunk-size lines longer than 1 KiB
are reported and the direction stops being parsed until a resync.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from ..anomalies import Anomaly
from ..timeline import Timed, TimedBuffer

MAX_HEAD = 64 * 1024
MAX_HEADERS = 256
METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
           b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT", b"SEARCH")
REQUEST_LINE = re.compile(rb"([A-Z][A-Z_-]{1,19}) +(\S+)((?: +\S+)*?) +HTTP/(1\.[01])\r?$")
STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) (\d{3})(?: (.*))?\r?$")
_RESYNC_REQ = re.compile(rb"(?:^|\n)(?:" + b"|".join(METHODS) + rb") \S+ HTTP/1\.[01]\r?\n")
_RESYNC_RSP = re.compile(rb"(?:^|\n)HTTP/1\.[01] \d{3}")


def looks_like_request(buf: bytes) -> bool:
    """True when `buf` starts like an HTTP/1 request line (a known method followed by a space)."""
    sp = buf.find(b" ", 0, 12)
    return sp > 0 and buf[:sp] in METHODS and buf[:sp] != b"PRI"


def looks_like_response(buf: bytes) -> bool:
    return buf[:7] == b"HTTP/1."[:min(7, len(buf))] and len(buf) >= 5


@dataclass(slots=True)
class Http1Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    ts_first: int
    ts_head: int                       # capture time of the end of the head

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass(slots=True)
class Http1Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    ts_first: int
    ts_head: int
    request: Http1Request | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass(slots=True)
class Http1Switch:
    protocol: str                      # 'connect' or the Upgrade token (lower case), e.g. 'h2c'
    leftover: tuple[Timed, Timed] = field(default=(Timed(b"", ()), Timed(b"", ())))


def _parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in lines[:MAX_HEADERS]:
        if line[:1] in (b" ", b"\t") and out:  # obs-fold
            k, v = out[-1]
            out[-1] = (k, v + " " + line.strip().decode("latin-1"))
            continue
        k, sep, v = line.partition(b":")
        if not sep:
            continue
        out.append((k.strip().decode("latin-1"), v.strip().decode("latin-1")))
    return out


class _Dir:
    __slots__ = ("buf", "state", "remaining", "ts_first")

    def __init__(self) -> None:
        self.buf = TimedBuffer()
        self.state = "head"      # head, body, chunk_*, trailers, until_close, hold, lost, switched
        self.remaining = 0
        self.ts_first = -1


class Http1Connection:
    def __init__(self, midstream: bool = False) -> None:
        self.dirs = (_Dir(), _Dir())
        if midstream:
            self.dirs[0].state = self.dirs[1].state = "lost"
        self.pending: deque[Http1Request] = deque()
        self.switch_pending: str | None = None   # protocol a request asked to switch to
        self.switched = False
        self.requests = 0
        self.responses = 0

    def feed(self, d: int, piece: Timed) -> list:
        dd = self.dirs[d]
        if dd.state == "switched":
            return []
        if not len(dd.buf) and dd.state in ("body", "chunk_data", "until_close"):
            # body bytes are only counted: skip them without buffering, buffer what follows the body
            n = len(piece.data) if dd.state == "until_close" else min(dd.remaining, len(piece.data))
            if dd.state != "until_close":
                dd.remaining -= n
                if not dd.remaining:
                    dd.state = "head" if dd.state == "body" else "chunk_crlf"
            dd.buf.start += n
            if n == len(piece.data):
                return self._after(d, [])
            piece = piece.slice(n, len(piece.data))
        dd.buf.append_timed(piece)
        return self._after(d, self._run(d))

    def _after(self, d: int, out: list) -> list:
        if d == 1 and self.dirs[0].state == "head" and len(self.dirs[0].buf):
            out += self._run(0)
        return out

    def gap(self, d: int, length: int) -> list:
        dd = self.dirs[d]
        if dd.state in ("switched", "until_close"):
            return []
        if dd.state in ("body", "chunk_data") and dd.remaining >= length and length and not len(dd.buf):
            dd.remaining -= length  # the hole is inside a body we skip anyway
            return []
        dd.buf.clear()
        dd.state = "lost"
        return [Anomaly("http1", "http1_lost_sync", f"dir {d}: {length} bytes missing")]

    def close(self) -> list:
        return []

    # -- parsing -----------------------------------------------------------------------------------------------------
    def _run(self, d: int) -> list:
        out: list = []
        dd = self.dirs[d]
        buf = dd.buf
        for _ in range(1 << 16):
            st = dd.state
            if not len(buf):
                return out
            if st == "lost":
                data = bytes(buf.buf)
                m = (_RESYNC_REQ if d == 0 else _RESYNC_RSP).search(data)
                if m is None:
                    if len(buf) > MAX_HEAD:
                        buf.skip(len(buf) - 64)
                    return out
                start = m.start() + (1 if data[m.start():m.start() + 1] == b"\n" else 0)
                if start:
                    out.append(Anomaly("http1", "http1_resync", f"dir {d}: skipped {start} bytes to a start line"))
                buf.skip(start)
                dd.state = "head"
                continue
            if st == "head":
                data = buf.buf
                # tolerate leading CRLFs between messages (RFC 9112 2.2)
                lead = 0
                while lead < len(data) and data[lead] in (13, 10) and lead < 8:
                    lead += 1
                if lead:
                    buf.skip(lead)
                    continue
                end = data.find(b"\r\n\r\n")
                sep = 4
                alt = data.find(b"\n\n")
                if alt >= 0 and (end < 0 or alt < end):
                    end, sep = alt, 2
                if end < 0:
                    if len(data) > MAX_HEAD:
                        out.append(Anomaly("http1", "http1_head_too_large", f"dir {d}: no end of head in {MAX_HEAD} "
                                                                            f"bytes"))
                        buf.clear()
                        dd.state = "lost"
                    return out
                ts_first = buf.ts_at(0)
                head = buf.take(end + sep)
                self._head(d, head, ts_first, out)
                if dd.state == "switched":
                    return out
                continue
            if st == "body":
                n = min(dd.remaining, len(buf))
                buf.skip(n)
                dd.remaining -= n
                if not dd.remaining:
                    dd.state = "head"
                continue
            if st == "hold":
                if len(buf) > MAX_HEAD * 16:
                    out.append(Anomaly("http1", "http1_lost_sync", f"dir {d}: too many bytes waiting for a switch"))
                    buf.clear()
                    dd.state = "lost"
                return out
            if st == "until_close":
                buf.skip(len(buf))
                return out
            if st == "chunk_size":
                nl = buf.buf.find(b"\n")
                if nl < 0:
                    if len(buf) > 1024:
                        out.append(Anomaly("http1", "http1_bad_chunk", f"dir {d}: chunk-size line too long"))
                        buf.clear()
                        dd.state = "lost"
                    return out
                line = bytes(buf.buf[:nl]).split(b";")[0].strip()
                buf.skip(nl + 1)
                try:
                    size = int(line, 16)
                except ValueError:
                    out.append(Anomaly("http1", "http1_bad_chunk", f"dir {d}: chunk size {line[:20]!r}"))
                    dd.state = "lost"
                    continue
                if size == 0:
                    dd.state = "trailers"
                else:
                    dd.remaining, dd.state = size, "chunk_data"
                continue
            if st == "chunk_data":
                n = min(dd.remaining, len(buf))
                buf.skip(n)
                dd.remaining -= n
                if not dd.remaining:
                    dd.state = "chunk_crlf"
                continue
            if st == "chunk_crlf":
                data = buf.buf
                if data[:1] == b"\n":
                    buf.skip(1)
                elif data[:2] == b"\r\n":
                    buf.skip(2)
                elif len(data) < 2 and data[:1] == b"\r":
                    return out
                else:
                    out.append(Anomaly("http1", "http1_bad_chunk", f"dir {d}: no CRLF after chunk data"))
                dd.state = "chunk_size"
                continue
            if st == "trailers":
                data = buf.buf
                if data[:2] == b"\r\n":
                    buf.skip(2)
                    dd.state = "head"
                    continue
                if data[:1] == b"\n":
                    buf.skip(1)
                    dd.state = "head"
                    continue
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        buf.clear()
                        dd.state = "lost"
                    return out
                buf.skip(end + 4)
                dd.state = "head"
                continue
        return out

    def _head(self, d: int, head: Timed, ts_first: int, out: list) -> None:
        dd = self.dirs[d]
        lines = head.data.replace(b"\r\n", b"\n").split(b"\n")
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            return
        start = lines[0]
        headers = _parse_headers(lines[1:])
        if len(lines) - 1 > MAX_HEADERS:
            out.append(Anomaly("http1", "http1_too_many_headers", f"dir {d}: {len(lines) - 1} header lines"))
        hmap = {k.lower(): v for k, v in headers}
        if d == 0:
            m = REQUEST_LINE.match(start)
            if not m:
                out.append(Anomaly("http1", "http1_bad_start_line", f"dir 0: {start[:60]!r}"))
                dd.state = "lost"
                return
            if m.group(3) or b"  " in start:
                out.append(Anomaly("http1", "http1_odd_start_line", f"dir 0: extra spaces or tokens in "
                                                                    f"{start[:60]!r} (first target kept)"))
            req = Http1Request(m.group(1).decode("latin-1"), m.group(2).decode("latin-1"), m.group(4).decode(),
                               headers, ts_first, head.ts_last)
            self.requests += 1
            self.pending.append(req)
            out.append(req)
            if req.method == "CONNECT":
                self.switch_pending = "connect"
            elif "upgrade" in hmap and "upgrade" in hmap.get("connection", "").lower():
                self.switch_pending = hmap["upgrade"].split(",")[0].strip().lower()
            self._body(d, hmap, out, is_request=True)
            if self.switch_pending is not None and dd.state == "head":
                dd.state = "hold"  # client bytes after CONNECT / Upgrade wait for the response
            return
        m = STATUS_LINE.match(start)
        if not m:
            out.append(Anomaly("http1", "http1_bad_start_line", f"dir 1: {start[:60]!r}"))
            dd.state = "lost"
            return
        status = int(m.group(2))
        req = None
        if status >= 200 or status == 101:
            req = self.pending.popleft() if self.pending else None
        elif self.pending:
            req = self.pending[0]
        rsp = Http1Response(status, (m.group(3) or b"").decode("latin-1"), m.group(1).decode(), headers, ts_first,
                            head.ts_last, req)
        self.responses += 1
        if req is None and status >= 200:
            out.append(Anomaly("http1", "http1_unmatched_response", f"response {status} without a request"))
        out.append(rsp)
        if req is not None and ((req.method == "CONNECT" and 200 <= status < 300) or
                                (status == 101 and self.switch_pending not in (None, "connect"))):
            proto = "connect" if req.method == "CONNECT" else self.switch_pending
            self._switch(proto, out)
            return
        if req is not None and status >= 200 and self.switch_pending is not None:
            self.switch_pending = None  # refused: the client goes on with HTTP/1
            if self.dirs[0].state == "hold":
                self.dirs[0].state = "head"
        if status == 101 or status < 200 or status in (204, 304) or (req is not None and req.method == "HEAD"):
            dd.state = "head"
            return
        self._body(d, hmap, out, is_request=False)

    def _body(self, d: int, hmap: dict, out: list, is_request: bool) -> None:
        dd = self.dirs[d]
        te = hmap.get("transfer-encoding", "").lower()
        if "chunked" in te:
            dd.state = "chunk_size"
            return
        cl = hmap.get("content-length")
        if cl is not None:
            try:
                n = int(cl.split(",")[0].strip())
                if n < 0:
                    raise ValueError
            except ValueError:
                out.append(Anomaly("http1", "http1_bad_content_length", f"dir {d}: {cl[:30]!r}"))
                dd.state = "lost"
                return
            dd.remaining = n
            dd.state = "body" if n else "head"
            return
        dd.state = "head" if is_request else "until_close"

    def _switch(self, proto: str, out: list) -> None:
        leftovers = []
        for dd in self.dirs:
            leftovers.append(dd.buf.take(len(dd.buf)))
            dd.state = "switched"
        self.switched = True
        out.append(Http1Switch(proto, (leftovers[0], leftovers[1])))

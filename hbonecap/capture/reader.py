"""Opening capture files: the only module that reads packet data from disk.

`CaptureReader(path)` recognises pcap (all magics), pcapng and gzip-compressed forms of both by their first
bytes, never by the file name, and yields `RecordBatch`es of at most `config.chunk_bytes` of file data, so memory
stays bounded whatever the file size. What is not a capture raises `CaptureError` naming the file.
"""
from __future__ import annotations

import gzip
import mmap
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from hbonecap.capture.pcap import MAGICS as PCAP_MAGICS, PcapWalker
from hbonecap.capture.pcapng import PcapngWalker
from hbonecap.capture.records import Interface, RecordBatch
from hbonecap.config import DEFAULT_CONFIG, DecodeConfig
from hbonecap.errors import CaptureError

GZIP_MAGIC = b"\x1f\x8b"
PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


@dataclass
class CaptureInfo:
    """What a capture says about itself, filled in while it is read."""

    path: str
    name: str
    format: str = ""
    compressed: bool = False
    interfaces: list[Interface] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)
    anomalies: list[tuple] = field(default_factory=list)   # (index|None, layer, kind, detail)
    packets: int = 0
    size: int = 0
    sections: int = 1

    def __repr__(self) -> str:  # never print secrets
        return (f"CaptureInfo(name={self.name!r}, format={self.format!r}, interfaces={len(self.interfaces)}, "
                f"packets={self.packets}, secrets={len(self.secrets)})")


class _NotMappable(Exception):
    """The file cannot be memory-mapped (a pipe, a special file): read it instead."""


KEY_LOG_LINE = re.compile(r"^\s*(CLIENT_RANDOM|RSA|CLIENT_EARLY_TRAFFIC_SECRET|CLIENT_HANDSHAKE_TRAFFIC_SECRET|"
                          r"SERVER_HANDSHAKE_TRAFFIC_SECRET|CLIENT_TRAFFIC_SECRET_\d+|SERVER_TRAFFIC_SECRET_\d+|"
                          r"EARLY_EXPORTER_SECRET|EXPORTER_SECRET)\s+[0-9A-Fa-f]+\s+[0-9A-Fa-f]+\s*$", re.M)


def redact_secrets(text: str) -> str:
    """Comments sometimes carry TLS key log lines (nghttp2 samples do); they never reach an output."""
    return KEY_LOG_LINE.sub(lambda m: f"[{m.group(1)} key log line redacted]", text)


def capture_name(path: str) -> str:
    return os.path.basename(str(path))


class CaptureReader:
    """Iterate over the record batches of one capture file."""

    def __init__(self, path: str | os.PathLike, config: DecodeConfig = DEFAULT_CONFIG, name: str | None = None):
        self.path = str(path)
        self.config = config
        self.index_offset = 0   # frame numbers of this file continue a previous rotated file's
        self.info = CaptureInfo(path=self.path, name=name or capture_name(self.path))
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise CaptureError(self.path, e.strerror or str(e)) from e
        if os.path.isdir(self.path):
            raise CaptureError(self.path, "is a directory")
        self.info.size = os.path.getsize(self.path)
        if head[:2] == GZIP_MAGIC:
            self.info.compressed = True
            try:
                with gzip.open(self.path, "rb") as g:
                    head = g.read(4)
            except (OSError, EOFError, zlib.error) as e:
                raise CaptureError(self.path, f"unreadable gzip data: {e}") from e
        if len(head) < 4:
            raise CaptureError(self.path, "empty or too short to be a capture")
        if head == PCAPNG_MAGIC:
            self.walker = PcapngWalker(self.path, config.max_record_bytes)
        elif head in PCAP_MAGICS:
            self.walker = PcapWalker(self.path, config.max_record_bytes)
        else:
            raise CaptureError(self.path, f"not a pcap or pcapng capture (starts with {head.hex()})")

    def _open(self):
        return gzip.open(self.path, "rb") if self.info.compressed else open(self.path, "rb")

    def __iter__(self) -> Iterator[RecordBatch]:
        """Record batches in file order. A batch's buffer is reused two batches later: consume (or copy) what
        you need from a batch before asking for the one after next.

        An uncompressed file is mapped (mmap) a window at a time instead of read: no copy of the packet bytes,
        and only the current windows are resident; a compressed one is read into two alternating buffers."""
        if not self.info.compressed and self.info.size > 0:
            try:
                yield from self._iter_mapped()
                return
            except _NotMappable:
                pass
        yield from self._iter_read()

    def _iter_mapped(self) -> Iterator[RecordBatch]:
        cfg = self.config
        w = self.walker
        info = self.info
        window = cfg.chunk_bytes + cfg.max_record_bytes + 65536
        grain = mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                mm = self._map(f, 0, min(window, size))
            except (OSError, ValueError) as e:
                raise _NotMappable() from e
            view = memoryview(mm)
            pos = w.start(view)
            start = 0              # file offset of the window's first byte
            length = len(mm)
            ahead = _ReadAhead(f.fileno(), size, window * READ_AHEAD_WINDOWS)
            try:
                while True:
                    final = start + length >= size
                    new_pos, batch = w.walk(view, pos, start, final)
                    info.interfaces = w.interfaces
                    if len(batch):
                        info.packets += len(batch)
                        yield batch
                    if w.finished:
                        break
                    if final:
                        if new_pos == pos and not len(batch):
                            break
                        pos = new_pos
                        continue
                    # the next window starts at the granule holding the first unfinished byte; a walk that could
                    # not advance (a record longer than the window) gets a larger window
                    nxt = start + new_pos
                    length = window if new_pos > pos or len(batch) else length * 2
                    start = nxt - nxt % grain
                    pos = nxt - start
                    del view, batch
                    mm = self._map(f, start, min(length, size - start))   # the old window unmaps when unused
                    view = memoryview(mm)
                    length = len(mm)
                    ahead.reached(start)
            finally:
                ahead.stop()
                self._finish_info()

    @staticmethod
    def _map(f, offset: int, length: int):
        mm = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=offset)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        return mm

    def _finish_info(self) -> None:
        w = self.walker
        info = self.info
        info.format = w.format + ("+gzip" if info.compressed else "")
        info.interfaces = w.interfaces
        info.comments = list(getattr(w, "comments", []))
        info.secrets = list(getattr(w, "secrets", []))
        info.anomalies = list(w.anomalies)
        info.sections = getattr(w, "sections", 1)

    def _iter_read(self) -> Iterator[RecordBatch]:
        cfg = self.config
        w = self.walker
        info = self.info
        size = cfg.chunk_bytes + cfg.max_record_bytes + 65536
        if not info.compressed:   # small files get small buffers
            size = min(size, info.size + 1)
        buffers = [bytearray(size), bytearray(0)]
        which = 0
        with self._open() as f:
            buf = buffers[which]
            first = min(cfg.chunk_bytes, len(buf))
            filled = self._fill(f, buf, 0, first)
            final = filled < first or (not info.compressed and filled >= info.size)
            view = memoryview(buf)[:filled]
            pos = w.start(view)
            base = 0           # file offset of buf[0]
            try:
                while True:
                    new_pos, batch = w.walk(view, pos, base, final)
                    info.interfaces = w.interfaces
                    if len(batch):
                        info.packets += len(batch)
                        yield batch
                    if w.finished:
                        break
                    if final:
                        if new_pos == pos and not len(batch):
                            break
                        pos = new_pos
                        continue
                    # carry the unfinished tail into the other buffer and read the next chunk after it
                    rest = filled - new_pos
                    which ^= 1
                    nbuf = buffers[which]
                    if rest + cfg.chunk_bytes > len(nbuf):
                        nbuf = buffers[which] = bytearray(max(rest + cfg.chunk_bytes, len(buffers[which ^ 1])))
                    nbuf[:rest] = view[new_pos:filled]
                    view.release()
                    got = self._fill(f, nbuf, rest, cfg.chunk_bytes)
                    final = got < cfg.chunk_bytes
                    base += new_pos
                    buf, filled = nbuf, rest + got
                    view = memoryview(buf)[:filled]
                    pos = 0
            finally:
                self._finish_info()

    def _fill(self, f, buf: bytearray, start: int, n: int) -> int:
        """Read up to n bytes into buf[start:]; returns how many were read (short only at end of file)."""
        mv = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = f.readinto(mv[start + got:start + n])
                if not k:
                    break
                got += k
        except (OSError, EOFError, zlib.error) as e:
            self.walker.anomalies.append((None, "capture", "capture_unreadable", f"read failed after {got} bytes: {e}"))
        finally:
            mv.release()
        return got

    def _read(self, f, n: int) -> bytes:
        try:
            return f.read(n)
        except (OSError, EOFError, zlib.error) as e:
            self.walker.anomalies.append((None, "capture", "capture_unreadable", f"read failed: {e}"))
            return b""


def read_secrets(path: str | os.PathLike, config: DecodeConfig = DEFAULT_CONFIG) -> list[bytes]:
    """TLS key log texts embedded in a pcapng file (Decryption Secrets Blocks), in file order."""
    r = CaptureReader(path, config)
    for _ in r:
        pass
    return r.info.secrets


READ_AHEAD_WINDOWS = 3      # how far ahead of the walk a mapped file is read from disk, in windows
READ_AHEAD_STEP = 4 << 20


class _ReadAhead:
    """Reads a mapped capture from disk ahead of the walk: a thread asks the kernel for the file a few MB at a
    time (POSIX_FADV_WILLNEED), staying at most `lead` bytes ahead of the window being walked. A capture that is
    not in the page cache is then read while the windows before it are decoded, instead of page fault by page
    fault when the walk reaches it. A hint only: without posix_fadvise nothing is done."""

    def __init__(self, fd: int, size: int, lead: int) -> None:
        import threading

        self.fd, self.size, self.lead = fd, size, lead
        self.walked = 0
        self.cond = threading.Condition()
        self.done = False
        self.thread = None
        if hasattr(os, "posix_fadvise") and size > lead // READ_AHEAD_WINDOWS:
            self.thread = threading.Thread(target=self._run, name="hbonecap-read-ahead", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        pos = 0
        while pos < self.size:
            with self.cond:
                while not self.done and pos >= self.walked + self.lead:
                    self.cond.wait()
                if self.done:
                    return
            n = min(READ_AHEAD_STEP, self.size - pos)
            try:
                os.posix_fadvise(self.fd, pos, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                return
            pos += n

    def reached(self, offset: int) -> None:
        with self.cond:
            self.walked = offset
            self.cond.notify()

    def stop(self) -> None:
        if self.thread is not None:
            with self.cond:
                self.done = True
                self.cond.notify()
            self.thread.join()

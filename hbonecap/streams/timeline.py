"""Byte buffers that remember when each byte range was captured.

Every stream stage hands bytes to the next one together with their capture times. Keeping a time per byte
would cost eight bytes per byte; instead a buffer keeps *marks*: ``(offset, ts_ns)`` pairs meaning "bytes from
this offset on were captured at ts_ns, until the next mark". Appending a chunk adds at most one mark, consuming
drops marks that fall behind the read position, so both are O(1) amortised and never touch single bytes.

`TimedBuffer` is the working buffer of a parser (append, look, consume). `Timed` is a finished piece of bytes with
its marks (offsets relative to its own first byte), the unit passed between stages.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class Timed:
    """Bytes plus the capture times of their ranges: ``marks[i] = (offset, ts_ns)``, offsets ascending, first 0."""

    data: bytes
    marks: tuple[tuple[int, int], ...]

    @property
    def ts_first(self) -> int:
        return self.marks[0][1] if self.marks else -1

    @property
    def ts_last(self) -> int:
        return self.marks[-1][1] if self.marks else -1

    @classmethod
    def at(cls, data: bytes, ts_ns: int) -> "Timed":
        return cls(bytes(data), ((0, ts_ns),))

    def ts_at(self, offset: int) -> int:
        """Capture time of the byte at `offset`."""
        ts = self.marks[0][1]
        for off, t in self.marks:
            if off > offset:
                break
            ts = t
        return ts

    def slice(self, start: int, end: int) -> "Timed":
        """The bytes [start, end) with their marks re-based to start."""
        end = min(end, len(self.data))
        if start >= end:
            return Timed(b"", ())
        marks: list[tuple[int, int]] = []
        prev_ts = self.marks[0][1]
        for off, t in self.marks:
            if off <= start:
                prev_ts = t
                continue
            if off >= end:
                break
            if not marks:
                marks.append((0, prev_ts))
            marks.append((off - start, t))
        if not marks:
            marks.append((0, prev_ts))
        return Timed(self.data[start:end], tuple(marks))


@dataclass(slots=True)
class TimedBuffer:
    """A growing byte buffer with capture-time marks; the read side consumes from the front.

    `start` is the stream offset of ``buf[0]`` (bytes consumed so far). Marks use stream offsets.
    """

    buf: bytearray = field(default_factory=bytearray)
    start: int = 0
    marks: deque = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.buf)

    @property
    def end(self) -> int:
        return self.start + len(self.buf)

    def append(self, data: bytes | memoryview, ts_ns: int) -> None:
        if not data:
            return
        marks = self.marks
        if not marks or marks[-1][1] != ts_ns:
            marks.append((self.start + len(self.buf), ts_ns))
        self.buf += data

    def append_timed(self, piece: Timed) -> None:
        marks = piece.marks
        if len(marks) == 1:  # the common case: one capture time
            if piece.data:
                ts = marks[0][1]
                if not self.marks or self.marks[-1][1] != ts:
                    self.marks.append((self.start + len(self.buf), ts))
                self.buf += piece.data
            return
        base = self.end
        if not piece.data:
            return
        for off, ts in piece.marks:
            if not self.marks or self.marks[-1][1] != ts:
                self.marks.append((base + off, ts))
        self.buf += piece.data

    def append_from(self, piece: Timed, start: int) -> None:
        """`append_timed(piece.slice(start, len(piece.data)))` without the intermediate slice: one copy."""
        data = piece.data
        if start >= len(data):
            return
        pm = piece.marks
        marks = self.marks
        base = self.start + len(self.buf) - start      # stream offset of data[0]
        k, last = 0, len(pm) - 1
        while k < last and pm[k + 1][0] <= start:
            k += 1
        ts = pm[k][1]
        if not marks or marks[-1][1] != ts:
            marks.append((base + start, ts))
        n = len(data)
        for off, t in pm[k + 1:]:
            if off >= n:
                break
            if t != ts:
                marks.append((base + off, t))
                ts = t
        if start:
            with memoryview(data) as view:
                self.buf += view[start:]
        else:
            self.buf += data

    def take_through(self, skip: int, piece: Timed, k: int) -> Timed:
        """Consume the whole buffer and the head ``piece.data[:k]`` (0 < k <= len) at once and return the bytes
        after the first `skip` buffered ones: what ``append_timed(piece.slice(0, k)); take(skip); take(rest)``
        gives (same bytes, same marks), with one copy and no buffer round trip. `skip` <= len(self)."""
        have = len(self.buf)
        base = self.start + have                         # stream offset of piece.data[0]
        pm = piece.marks
        if len(self.marks) == 1 and len(pm) == 1:
            # the usual case (a frame split over two decrypted records): one time before, one after
            t0, t1 = self.marks[0][1], pm[0][1]
            marks = ((0, t0),) if t0 == t1 else ((0, t1),) if have <= skip else ((0, t0), (have - skip, t1))
        else:
            m = list(self.marks)
            for off, t in pm:
                if off >= k:
                    break
                if not m or m[-1][1] != t:
                    m.append((base + off, t))
            start = self.start + skip
            i, last = 0, len(m) - 1
            while i < last and m[i + 1][0] <= start:
                i += 1
            marks = tuple((off - start if off > start else 0, t) for off, t in m[i:])
        data = piece.data
        with memoryview(self.buf) as view, memoryview(data) as pv:
            out = b"".join((view[skip:], pv[:k] if k < len(data) else pv))
        self.buf.clear()
        self.marks.clear()
        self.start = base + k
        return Timed(out, marks)

    def ts_at(self, rel: int) -> int:
        """Capture time of the byte `rel` bytes after the read position (-1 when nothing buffered)."""
        want = self.start + rel
        ts = -1
        for off, t in self.marks:
            if off > want:
                break
            ts = t
        return ts

    def take(self, n: int) -> Timed:
        """Consume `n` bytes from the front, with their marks."""
        n = min(n, len(self.buf))
        end = self.start + n
        marks: list[tuple[int, int]] = []
        m = self.marks
        # The mark in force at `start` is the last one with offset <= start.
        while len(m) > 1 and m[1][0] <= self.start:
            m.popleft()
        for off, t in m:
            if off >= end:
                break
            marks.append((max(off - self.start, 0), t))
        with memoryview(self.buf) as view:
            data = bytes(view[:n])  # one copy (slicing the bytearray first would copy twice)
        del self.buf[:n]
        self.start = end
        while len(m) > 1 and m[1][0] <= self.start:
            m.popleft()
        if not self.buf and m:
            # Keep nothing stale: the next append sets a fresh mark.
            m.clear()
        return Timed(data, tuple(marks))

    def take_bytes(self, n: int) -> tuple[bytes, int, int]:
        """Consume `n` bytes from the front -> (bytes, capture time of the first, of the last byte), without
        building the marks of the range (the TLS record path needs only the two times)."""
        buf = self.buf
        n = min(n, len(buf))
        start = self.start
        end = start + n
        m = self.marks
        while len(m) > 1 and m[1][0] <= start:
            m.popleft()
        ts_first = m[0][1] if m else -1
        ts_last = ts_first
        for off, t in reversed(m):
            if off < end:
                ts_last = t
                break
        if n == len(buf):
            data = bytes(buf)
            buf.clear()
            m.clear()
        else:
            with memoryview(buf) as view:
                data = bytes(view[:n])
            del buf[:n]
            while len(m) > 1 and m[1][0] <= end:
                m.popleft()
        self.start = end
        return data, ts_first, ts_last

    def skip(self, n: int) -> None:
        """Consume `n` bytes from the front without copying them."""
        buf = self.buf
        n = min(n, len(buf))
        end = self.start + n
        m = self.marks
        if n == len(buf):
            buf.clear()
            m.clear()
        else:
            del buf[:n]
            while len(m) > 1 and m[1][0] <= end:
                m.popleft()
        self.start = end

    def clear(self) -> None:
        """Drop everything buffered (the stream offset still advances past it)."""
        self.start += len(self.buf)
        self.buf.clear()
        self.marks.clear()

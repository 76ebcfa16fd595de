"""Readers for the tshark oracles of ../shared/conformance and comparisons with StreamAnalyzer results.

Shared by the conformance tests; the captures are read through the project's real pipeline
(`hbonecap.layers.segments.iter_tcp_segments`), never through a private reader.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CONFORMANCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "conformance"
ORACLES = CONFORMANCE / "_oracles"


def tagged(*tags: str) -> list[str]:
    """Capture paths of SPLIT.tsv whose checks column has one of `tags` (prefix match: 'H2+HPACK' matches
    'H2+HPACK(after-decrypt)')."""
    split = CONFORMANCE / "SPLIT.tsv"
    if not split.is_file():
        return []
    out = []
    for line in split.read_text().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        checks = parts[2].split()
        if any(c.startswith(t) for c in checks for t in tags):
            out.append(parts[0])
    return out


def all_captures() -> list[str]:
    """Every capture listed in SPLIT.tsv (folders of JSON vectors excluded)."""
    split = CONFORMANCE / "SPLIT.tsv"
    if not split.is_file():
        return []
    return [ln.split("\t")[0] for ln in split.read_text().splitlines()[1:] if ln and not ln.split("\t")[0].endswith("/")]


def keylog_path(capture: str) -> Path | None:
    """The key log tshark used for this capture (first line of its tls_follow_raw oracle), if any."""
    follow = ORACLES / (capture + ".tls_follow_raw.txt")
    if not follow.is_file():
        return None
    first = follow.read_text().splitlines()[0]
    m = re.search(r"tls\.keylog_file:(\S+)", first)
    return CONFORMANCE / m.group(1) if m else None


def header_blocks(capture: str) -> dict[int, list[list[tuple[str, str]] | None]]:
    """tshark's header lists per tcp.stream, one list per header block (HEADERS/PUSH_PROMISE + CONTINUATIONs).

    A block tshark could not decode at all (no header list and no block bytes in the oracle: tshark 4.0 does not
    reassemble a header block spanning CONTINUATION frames across TCP segments in http2-nghttp2.pcap) is None:
    the oracle says nothing about it.
    """
    entries = json.loads((ORACLES / (capture + ".http2_headers.json")).read_text())
    out: dict[int, list[list[tuple[str, str]]]] = {}
    open_block: dict[tuple[int, str], list] = {}
    for e in entries:
        stream = int(e["tcp_stream"])
        hs = [tuple(h) for h in (e["headers"] or [])]
        key = (stream, e["stream_id"])
        if e["type"] == 9 and key in open_block:
            open_block[key].extend(hs)
        else:
            block = list(hs)
            undecoded = not hs and not e.get("header_block_hex")
            out.setdefault(stream, []).append(None if undecoded else block)
            open_block[key] = [] if undecoded else block
        if int(e["flags"], 16) & 0x4:
            open_block.pop(key, None)
    return out


def follow_raw(capture: str) -> dict[int, tuple[bytes, bytes]]:
    """Decrypted bytes per tcp.stream as (Node 0 side, Node 1 side) from `tshark -z follow,tls,raw`."""
    text = (ORACLES / (capture + ".tls_follow_raw.txt")).read_text()
    out: dict[int, tuple[bytes, bytes]] = {}
    for section in text.split("=" * 67):
        m = re.search(r"Filter: tcp\.stream eq (\d+)", section)
        if not m:
            continue
        lines = section.split("\n")
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Node 1:")) + 1
        a, b = bytearray(), bytearray()
        for ln in lines[start:]:
            if not ln.strip():
                continue
            if ln.startswith("\t"):
                b += bytes.fromhex(ln.strip())
            else:
                a += bytes.fromhex(ln.strip())
        out[int(m.group(1))] = (bytes(a), bytes(b))
    return out

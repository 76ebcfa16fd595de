"""Post-processing of the lab's tcpdump files (classic pcap in, pcap or pcapng out).

- ``truncate_after``: keep the first packets whole and cut the rest to a snap length
  (bulk scenario: handshake, CONNECT and 200 stay decryptable, the bulk DATA is cut).
- ``sll2_to_pcapng``: split a ``tcpdump -i any`` capture (LINKTYPE_LINUX_SLL2, which
  carries only an interface *index*) into a pcapng file with one Interface Description Block
  per interface, named after the interface (``if_name``), so ``frame.interface_name`` works.
"""
from __future__ import annotations

import struct
from pathlib import Path

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
LINKTYPE_LINUX_SLL2 = 276

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


def read_pcap(path: Path) -> tuple[tuple, list[tuple[int, int, int, bytes]]]:
    """Return (global header fields, [(ts_sec, ts_frac, orig_len, data)])."""
    raw = path.read_bytes()
    header = _GLOBAL.unpack_from(raw, 0)
    if header[0] not in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        raise ValueError(f"{path}: not a little-endian classic pcap file")
    records = []
    offset = _GLOBAL.size
    while offset + _RECORD.size <= len(raw):
        ts_sec, ts_frac, incl, orig = _RECORD.unpack_from(raw, offset)
        offset += _RECORD.size
        records.append((ts_sec, ts_frac, orig, raw[offset:offset + incl]))
        offset += incl
    return header, records


def truncate_after(path: Path, keep_whole: int, snaplen: int) -> dict:
    header, records = read_pcap(path)
    out = [_GLOBAL.pack(*header)]
    cut = 0
    for index, (ts_sec, ts_frac, orig, data) in enumerate(records):
        if index >= keep_whole and len(data) > snaplen:
            data = data[:snaplen]
            cut += 1
        out.append(_RECORD.pack(ts_sec, ts_frac, len(data), orig))
        out.append(data)
    path.write_bytes(b"".join(out))
    return {"kept_whole_first_packets": keep_whole, "snaplen_after": snaplen, "packets_cut": cut}


def _block(block_type: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def sll2_to_pcapng(src: Path, dst: Path, ifnames: dict[int, str], comment: str) -> dict[str, int]:
    """Rewrite an SLL2 pcap as pcapng with one named IDB per interface index seen."""
    header, records = read_pcap(src)
    if header[6] != LINKTYPE_LINUX_SLL2:
        raise ValueError(f"{src}: link type {header[6]} is not LINUX_SLL2")
    ns_resolution = header[0] == PCAP_MAGIC_NS
    snaplen = header[5]
    shb = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                 + _option(1, comment.encode()) + _option(0, b""))
    idbs, blocks, ids, counts = [], [], {}, {}
    for ts_sec, ts_frac, orig, data in records:
        ifindex = struct.unpack_from(">I", data, 4)[0]
        if ifindex not in ids:
            ids[ifindex] = len(ids)
            name = ifnames.get(ifindex, f"ifindex{ifindex}")
            options = _option(2, name.encode())                        # if_name
            options += _option(3, f"ifindex {ifindex}".encode())      # if_description
            options += _option(9, bytes([9 if ns_resolution else 6]))  # if_tsresol
            idbs.append(_block(0x00000001, struct.pack("<HHI", LINKTYPE_LINUX_SLL2, 0, snaplen)
                               + options + _option(0, b"")))
        ticks = ts_sec * (10**9 if ns_resolution else 10**6) + ts_frac
        name = ifnames.get(ifindex, f"ifindex{ifindex}")
        counts[name] = counts.get(name, 0) + 1
        blocks.append(_block(0x00000006, struct.pack("<IIIII", ids[ifindex], ticks >> 32, ticks & 0xFFFFFFFF,
                                                      len(data), orig) + data))
    dst.write_bytes(shb + b"".join(idbs) + b"".join(blocks))
    return counts

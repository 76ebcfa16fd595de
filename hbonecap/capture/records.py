"""What the container walkers hand to the packet decoder: a batch of records sharing one buffer."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NO_TS = np.iinfo(np.int64).min  # record without a timestamp (pcapng Simple Packet Block)


@dataclass
class Interface:
    """One capture interface (pcapng IDB; a pcap file has exactly one)."""

    link_type: int
    snaplen: int
    name: str = ""
    description: str = ""
    # timestamp resolution: units per second are 10**exp10 when base == 10 else 2**exp
    ts_base: int = 10
    ts_exp: int = 6
    ts_offset_s: int = 0


@dataclass
class RecordBatch:
    """Records of one chunk. Offsets index `buf`; `buf[data_off[i]:data_off[i]+caplen[i]]` is frame i."""

    buf: np.ndarray            # uint8 view of the chunk
    data_off: np.ndarray       # int64, offset of each frame's first byte in buf
    caplen: np.ndarray         # int64
    origlen: np.ndarray        # int64
    ts_ns: np.ndarray          # int64, NO_TS when the record has no timestamp
    iface: np.ndarray          # int32, index into CaptureInfo.interfaces
    first_index: int           # frame number (from 1) of the first record
    file_offset: int           # file offset of buf[0] (of the decompressed stream)
    comments: dict[int, str] = field(default_factory=dict)  # batch position -> packet comment
    pkt_flags: dict[int, int] = field(default_factory=dict)  # batch position -> pcapng epb_flags
    # Frame numbers when not contiguous from first_index (pcapng custom blocks take a number, as in Wireshark).
    numbers: np.ndarray | None = None

    def frame_numbers(self) -> np.ndarray:
        if self.numbers is not None:
            return self.numbers
        return np.arange(self.first_index, self.first_index + len(self.data_off), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data_off)


def empty_batch(first_index: int, file_offset: int) -> RecordBatch:
    z = np.zeros(0, dtype=np.int64)
    return RecordBatch(np.zeros(0, dtype=np.uint8), z, z, z, z, np.zeros(0, dtype=np.int32), first_index, file_offset)

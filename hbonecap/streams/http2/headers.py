"""HPACK header block decoding for one direction of an HTTP/2 connection (RFC 7541, via the `hpack` package).

Follows RFC 7541 sections 2.3 (static and dynamic tables), 4 (table size, eviction), 6.3 (dynamic table size
updates) and RFC 9113 section 4.3 (one compression context per direction; a header block is HEADERS or
PUSH_PROMISE plus CONTINUATION frames).

Strategy
  * One `hpack.Decoder` per direction, fed every complete header block in order: blocks we do not care about
    still update the dynamic table.
  * As an observer we accept any table size the encoder announces (no SETTINGS_HEADER_TABLE_SIZE enforcement) and
    large header lists (`MAX_HEADER_LIST` bounds memory instead of the protocol default).
  * Lost state is explicit: a block that fails to decode, a lost header block (TCP gap, TLS failure) or a capture
    starting mid-connection makes the context *desynchronised* (`hpack_desync`). We then start a fresh decoder: a
    block that only uses the static table, literals and entries inserted since the restart decodes correctly
    (indices of newer entries are the same in both tables); a reference to an older entry fails and is reported
    (`hpack_unresolved`), the block's headers are then unknown. Each result says whether it came from a
    context known to be complete (`exact`).

Limits
  * The decoded header list is capped at `MAX_HEADER_LIST` bytes (RFC 7541 size accounting), the dynamic table
    at `MAX_TABLE` bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import hpack
from hpack.exceptions import HPACKError

from ..anomalies import Anomaly

MAX_HEADER_LIST = 1 << 20
MAX_TABLE = 1 << 20


@dataclass(slots=True)
class HeaderBlockResult:
    headers: list[tuple[bytes, bytes]] | None   # None when the block could not be decoded
    exact: bool                                  # decoded with a context known to be complete


class HeaderDecoder:
    def __init__(self, synced: bool = True) -> None:
        self._new()
        self.synced = synced
        self.blocks = 0

    def _new(self) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.decoder.max_allowed_table_size = MAX_TABLE

    def lost(self, why: str) -> list:
        """A header block went missing (or state was never known): the dynamic table is unusable."""
        was = self.synced
        self.synced = False
        self._new()
        return [Anomaly("http2", "hpack_desync", why)] if was else []

    def decode(self, block: bytes) -> tuple[HeaderBlockResult, list]:
        self.blocks += 1
        try:
            headers = self.decoder.decode(block, raw=True)
        except (HPACKError, IndexError, ValueError) as e:  # hpack raises a few builtins on garbage too
            kind = "hpack_unresolved" if not self.synced else "hpack_error"
            anomalies = [Anomaly("http2", kind, f"header block {self.blocks} of {len(block)} bytes: "
                                                f"{type(e).__name__}: {e}")]
            anomalies += self.lost("HPACK context lost after an undecodable block")
            return HeaderBlockResult(None, False), anomalies
        return HeaderBlockResult([(bytes(n), bytes(v)) for n, v in headers], self.synced), []

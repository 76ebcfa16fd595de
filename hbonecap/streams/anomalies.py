"""The anomaly event every stream stage emits instead of raising: a named condition, tied to a frame when possible.

Events of all stream stages are ``@dataclass(slots=True)``, deliberately not frozen: a frozen dataclass costs about
half a microsecond per field to build, and events are built per segment, record and frame. Treat them as read-only.

Kinds are ``<layer>_<condition>`` (``tcp_gap``, ``tls_bad_record``, ``hpack_desync``...). Details never carry
secret material (key log secrets, decrypted bytes beyond a short printable excerpt).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Anomaly:
    layer: str
    kind: str
    detail: str
    index: int | None = None  # frame number (or key log line number for the keylog layer)

    def row(self, capture: str) -> dict:
        return {"capture": capture, "index": self.index, "layer": self.layer, "kind": self.kind, "detail": self.detail}

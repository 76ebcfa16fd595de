"""TLS key logs in the NSS `SSLKEYLOGFILE` format, from files or pcapng Decryption Secrets Blocks.

Follows the NSS key log format (IETF draft-ietf-tls-keylogfile): one ``<label> <client_random hex> <secret hex>``
per line, ``#`` comments, blank lines. Labels: ``CLIENT_RANDOM`` (TLS 1.2 master secret, 48 bytes),
``CLIENT_EARLY_TRAFFIC_SECRET``, ``CLIENT_HANDSHAKE_TRAFFIC_SECRET``, ``SERVER_HANDSHAKE_TRAFFIC_SECRET``,
``CLIENT_TRAFFIC_SECRET_0``, ``SERVER_TRAFFIC_SECRET_0``, ``EARLY_EXPORTER_SECRET``, ``EXPORTER_SECRET`` (TLS 1.3,
hash-length secrets), ``RSA <8-byte prefix> <pre-master>`` (parsed, not used) and Wireshark's older
``RSA Session-ID:<hex> Master-Key:<hex>`` (TLS 1.2 master secret by session id; used).

Strategy: `KeyLog.parse(text)` never raises on content: each bad line becomes a `keylog_bad_line` anomaly with its
line number (the index column) and a description that never includes secret values; every good line is used.
`KeyLog.add(text)` merges secrets found later (pcapng DSBs arrive while a capture is read). `load(path)` is the only
function that touches a file; it raises `KeylogError` when the file cannot be read or holds no usable line at all.

Limits: lines longer than `MAX_LINE` bytes and more than `MAX_ENTRIES` client randoms are refused (reported).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import KeylogError
from ..anomalies import Anomaly

TLS13_LABELS = ("CLIENT_EARLY_TRAFFIC_SECRET", "CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EARLY_EXPORTER_SECRET", "EXPORTER_SECRET")
LABELS = ("CLIENT_RANDOM", "RSA") + TLS13_LABELS
MAX_LINE = 4096
MAX_ENTRIES = 1_000_000


class KeyLog:
    """Secrets by client random: ``secrets[client_random][label] = secret``."""

    def __init__(self, name: str = "keylog") -> None:
        self.name = name
        self.secrets: dict[bytes, dict[str, bytes]] = {}
        self.rsa: dict[bytes, bytes] = {}
        self.session_masters: dict[bytes, bytes] = {}   # session id -> TLS 1.2 master secret
        self.anomalies: list[Anomaly] = []
        self.lines_used = 0
        self.generation = 0  # bumped whenever secrets are added

    def __len__(self) -> int:
        return len(self.secrets) + len(self.session_masters)

    def __repr__(self) -> str:  # never show secrets
        return f"KeyLog({self.name!r}, {len(self.secrets)} client randoms)"

    def get(self, client_random: bytes, label: str) -> bytes | None:
        entry = self.secrets.get(client_random)
        return entry.get(label) if entry else None

    @classmethod
    def parse(cls, text: bytes | str, name: str = "keylog") -> "KeyLog":
        kl = cls(name)
        kl.add(text)
        return kl

    def add(self, text: bytes | str, name: str | None = None) -> list[Anomaly]:
        """Merge the secrets of `text`; returns the anomalies of its bad lines (also kept in `self.anomalies`)."""
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        src = name or self.name
        found: list[Anomaly] = []

        def bad(lineno: int, why: str) -> None:
            found.append(Anomaly("keylog", "keylog_bad_line", f"{src} line {lineno}: {why}", lineno))

        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            if len(line) > MAX_LINE:
                bad(lineno, f"line longer than {MAX_LINE} bytes")
                continue
            parts = line.split()
            try:
                label = parts[0].decode("ascii")
            except UnicodeDecodeError:
                bad(lineno, "label is not ASCII")
                continue
            if label not in LABELS:
                shown = label[:40] if label.replace("_", "").isalpha() and label.isupper() else f"of {len(label)} chars"
                bad(lineno, f"unknown label {shown}")
                continue
            if label == "RSA" and len(parts) == 3 and parts[1].startswith(b"Session-ID:") \
                    and parts[2].startswith(b"Master-Key:"):
                try:
                    sid = bytes.fromhex(parts[1][11:].decode("ascii"))
                    master = bytes.fromhex(parts[2][11:].decode("ascii"))
                except (ValueError, UnicodeDecodeError):
                    bad(lineno, "RSA Session-ID: a field is not hexadecimal")
                    continue
                if not 1 <= len(sid) <= 32 or len(master) != 48:
                    bad(lineno, "RSA Session-ID: expected a 1-32 byte session id and a 48-byte master secret")
                    continue
                self.session_masters.setdefault(sid, master)
                self.lines_used += 1
                continue
            if len(parts) != 3:
                bad(lineno, f"{label}: expected 3 fields, found {len(parts)}")
                continue
            try:
                key = bytes.fromhex(parts[1].decode("ascii"))
                secret = bytes.fromhex(parts[2].decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                bad(lineno, f"{label}: a field is not hexadecimal")
                continue
            if label == "RSA":
                if len(key) != 8 or len(secret) != 48:
                    bad(lineno, "RSA: expected an 8-byte prefix and a 48-byte pre-master secret")
                    continue
                self.rsa[key] = secret
                self.lines_used += 1
                continue
            if len(key) != 32:
                bad(lineno, f"{label}: client random of {len(key)} bytes, expected 32")
                continue
            if label == "CLIENT_RANDOM" and len(secret) != 48:
                bad(lineno, f"CLIENT_RANDOM: master secret of {len(secret)} bytes, expected 48")
                continue
            if label != "CLIENT_RANDOM" and len(secret) not in (32, 48):
                bad(lineno, f"{label}: secret of {len(secret)} bytes, expected 32 or 48")
                continue
            entry = self.secrets.get(key)
            if entry is None:
                if len(self.secrets) >= MAX_ENTRIES:
                    bad(lineno, f"more than {MAX_ENTRIES} client randoms; line ignored")
                    continue
                entry = self.secrets[key] = {}
            prev = entry.get(label)
            if prev is not None and prev != secret:
                found.append(Anomaly("keylog", "keylog_conflict", f"{src} line {lineno}: {label} given again with a "
                                                                  f"different secret (the first one is kept)", lineno))
                continue
            entry[label] = secret
            self.lines_used += 1
        self.anomalies += found
        self.generation += 1
        return found

    def merge(self, other: "KeyLog") -> None:
        for cr, entry in other.secrets.items():
            self.secrets.setdefault(cr, {}).update({k: v for k, v in entry.items()
                                                   if k not in self.secrets.get(cr, {})})
        self.rsa.update(other.rsa)
        for k, v in other.session_masters.items():
            self.session_masters.setdefault(k, v)
        self.anomalies += other.anomalies
        self.generation += 1


def load(path: str | Path, name: str | None = None) -> KeyLog:
    """Read a key log file (the only file access of the TLS stages)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise KeylogError(str(p), f"cannot read: {e.strerror or e}") from e
    kl = KeyLog.parse(data, name or p.name)
    if not kl.secrets and not kl.rsa and not kl.session_masters:
        raise KeylogError(str(p), f"no usable key log line ({len(kl.anomalies)} bad lines)")
    return kl

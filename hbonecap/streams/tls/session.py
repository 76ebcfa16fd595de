"""One TLS connection seen from the wire: records, handshake facts, key schedule, decrypted application data.

Follows RFC 8446 (TLS 1.3: section 2 handshake flow, 4.4.4 Finished switches to application keys, 4.6.3
KeyUpdate, 5 record protection, D.4 middlebox-compatibility ChangeCipherSpec is ignored) and RFC 5246 (TLS 1.2:
ChangeCipherSpec switches each direction to its write keys, sequence numbers restart at 0); key material comes
from a `KeyLog` (see `keylog.py`, `decrypt.py`).

Strategy
  * ``feed(direction, Timed) -> events``; ``gap(direction, n)``; ``close()``. Events: `TlsAppData` (decrypted
    application bytes, timed at the capture time of the last byte of their record), `TlsPlainGap` (application bytes
    that exist but cannot be shown: no key, failed decryption, lost records), `TlsAlert`, `Anomaly`.
    Every record also goes into `timeline` (direction, first/last byte time, type, length) for keyless analysis.
  * Keys are looked up by the ClientHello random when the ServerHello fixes version and suite; secrets that arrive
    later (pcapng DSBs) are picked up at the next record. Without a key, `why_not` says why.
  * Decryption failure triggers bounded trials, in order: application keys while the handshake keys were
    expected (a lost Finished), the next KeyUpdate generation, nearby sequence numbers (lost records).
  * Mid-connection start (no ClientHello, `midstream=True`): TLS 1.3 application records are tried against every
    traffic secret of the key log (both labels, `MIDSTREAM_GENERATIONS` KeyUpdate generations, every suite the
    secret length allows; at most `MAX_CANDIDATE_KEYS`) and sequence numbers from 0 up to `max_seq_search`,
    breadth-first (small sequence numbers of every candidate first), until one authenticates; that fixes the key, the sequence
    number and which side is the client (`tls_midstream_keys`). TLS 1.2 cannot be recovered mid-stream (the key
    block needs both hello randoms).
  * Certificates (plain in 1.2, decrypted in 1.3) give the SPIFFE ids of client and server.

Limits
  * `max_trials` AEAD attempts per connection for all searches together (and a `TrialBudget` shared by all the
    connections of an analysis, so that many undecryptable mid-stream connections cannot take minutes);
    `max_timeline` records kept.
  * Without a ServerHello (one-way captures) TLS 1.3 client records are decrypted when the client's logged secrets
    authenticate them (suite inferred from the secret length and the offered suites: `tls_server_hello_missing`).
  * 0-RTT early data is decrypted only when the key log has the early secret and no ServerHello/handshake key
    claims the record; CBC/CCM suites are not decrypted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..anomalies import Anomaly
from ..timeline import Timed
from .decrypt import TLS12_SUITES, TLS13_SUITES, RecordKeys, candidate_suites, suite_name, tls12_keys
from .handshake import (CERTIFICATE, CLIENT_HELLO, ENCRYPTED_EXTENSIONS, FINISHED, KEY_UPDATE, SERVER_HELLO,
                        HandshakeError, HandshakeReader, parse_certificate, parse_client_hello,
                        parse_encrypted_extensions, parse_server_hello, spiffe_ids, VERSION_NAMES)
from .keylog import KeyLog
from .records import ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, HANDSHAKE, Record, RecordLostSync, RecordReader

MAX_SEQ_SEARCH = 16384
MAX_TRIALS = 100_000
MAX_CANDIDATE_KEYS = 1024
MIDSTREAM_GENERATIONS = 3
MAX_TIMELINE = 500_000
NEARBY_SEQ = 64


@dataclass(slots=True)
class TrialBudget:
    """AEAD trial decryptions left for all the TLS sessions of one analysis (searches are the only costly path)."""

    left: int = 3_000_000


@dataclass(slots=True)
class TlsAppData:
    direction: int
    data: Timed


@dataclass(slots=True)
class TlsPlainGap:
    direction: int
    reason: str       # 'no_key', 'decrypt_failed', 'lost', 'early_data'


ALERT_NAMES = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
               40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate", 44: "certificate_revoked",
               45: "certificate_expired", 46: "certificate_unknown", 47: "illegal_parameter", 48: "unknown_ca",
               49: "access_denied", 50: "decode_error", 51: "decrypt_error", 70: "protocol_version",
               71: "insufficient_security", 80: "internal_error", 86: "inappropriate_fallback", 90: "user_canceled",
               109: "missing_extension", 110: "unsupported_extension", 112: "unrecognized_name",
               116: "certificate_required", 120: "no_application_protocol"}


@dataclass(slots=True)
class TlsAlert:
    direction: int
    level: int
    description: int
    ts_ns: int

    @property
    def name(self) -> str:
        return ALERT_NAMES.get(self.description, f"alert_{self.description}")


class TlsSession:
    def __init__(self, keylog: KeyLog | None = None, midstream: bool = False, max_seq_search: int = MAX_SEQ_SEARCH,
                 max_trials: int = MAX_TRIALS, max_timeline: int = MAX_TIMELINE,
                 shared_budget: "TrialBudget | None" = None) -> None:
        state = "lost" if midstream else "records"
        self.readers = (RecordReader(state), RecordReader(state))
        self.hs = (HandshakeReader(), HandshakeReader())
        self.keylog = keylog
        self.midstream = midstream
        self.max_seq_search, self.trials_left, self.max_timeline = max_seq_search, max_trials, max_timeline
        self.shared_budget = shared_budget
        self.client_hello = None
        self.server_hello = None
        self.version: int | None = None
        self.suite: int | None = None
        self.alpn: str | None = None
        self.sni: str | None = None
        self.keys: list[RecordKeys | None] = [None, None]
        self.app_keys: list[RecordKeys | None] = [None, None]
        self.early_keys: RecordKeys | None = None
        self.encrypting = [False, False]
        self.keylog_generation = -1
        self.decrypted = [0, 0]             # records decrypted per direction
        self.undecrypted = [0, 0]
        self.why_not: str | None = None
        self.spiffe: list[str | None] = [None, None]   # client, server
        self.timeline: list[tuple[int, int, int, int, int]] = []  # (direction, ts_first, ts_last, type, length)
        self.timeline_dropped = 0
        self.plain_lost = [False, False]
        self.reported: set[str] = set()
        self.swapped = False                # mid-stream: direction 0 turned out to be the server
        self.inferred_client_random: bytes | None = None  # found by trial when the ClientHello was not captured

    # -- public ------------------------------------------------------------------------------------------------------
    @property
    def version_name(self) -> str | None:
        return VERSION_NAMES.get(self.version, f"0x{self.version:04x}") if self.version else None

    @property
    def suite_name(self) -> str | None:
        return suite_name(self.suite)

    @property
    def is_decrypted(self) -> bool:
        return bool(self.decrypted[0] or self.decrypted[1])

    def feed(self, d: int, piece: Timed) -> list:
        out: list = []
        for ev in self.readers[d].feed(piece):
            if type(ev) is Record:
                self._record(d, ev, out)
            elif isinstance(ev, RecordLostSync):
                self._lost(d, out)
            else:
                out.append(ev)
        return out

    def gap(self, d: int, length: int) -> list:
        out = []
        for ev in self.readers[d].gap(length):
            if isinstance(ev, RecordLostSync):
                self._lost(d, out)
            else:
                out.append(ev)
        return out

    def close(self) -> list:
        out = self.readers[0].close() + self.readers[1].close()
        if self.why_not is None and not self.is_decrypted:
            self.why_not = self._why_not()
        return out

    # -- internals ---------------------------------------------------------------------------------------------------
    def _once(self, out: list, kind: str, detail: str, key: str | None = None) -> None:
        key = key or kind
        if key not in self.reported:
            self.reported.add(key)
            out.append(Anomaly("tls", kind, detail))

    def _lost(self, d: int, out: list) -> None:
        self.hs[d].reset()
        self._plain_gap(d, "lost", out)
        # The sequence number of the next record is unknown: decryption will search nearby numbers.

    def _plain_gap(self, d: int, reason: str, out: list) -> None:
        if not self.plain_lost[d]:
            self.plain_lost[d] = True
            out.append(TlsPlainGap(d, reason))

    def _why_not(self) -> str:
        if self.keylog is None or not len(self.keylog):
            return "no key log"
        if self.client_hello is None:
            return "capture starts mid-connection (no ClientHello)" + (
                "; TLS 1.2 keys need both hello randoms" if self.version == 0x0303 else "; no key log secret matched")
        if self.version is None:
            return "no ServerHello seen"
        if (self.version == 0x0304 and self.suite not in TLS13_SUITES) or \
                (self.version != 0x0304 and self.suite not in TLS12_SUITES):
            return f"unsupported cipher suite {self.suite_name}"
        if self.keylog.secrets.get(self.client_hello.random) is None and not (
                self.server_hello is not None and self.server_hello.session_id in self.keylog.session_masters):
            return "client random not in the key log"
        if self.undecrypted[0] or self.undecrypted[1]:
            return "decryption failed (wrong or incomplete secrets)"
        return "no encrypted records"

    def _record(self, d: int, rec: Record, out: list) -> None:
        if len(self.timeline) < self.max_timeline:
            self.timeline.append((d, rec.ts_first, rec.ts_last, rec.content_type, len(rec.fragment)))
        else:
            self.timeline_dropped += 1
        ct = rec.content_type
        if ct == APPLICATION_DATA and self.version == 0x0304:
            # the bulk of a TLS 1.3 connection: application records with keys in place (what the general path
            # below does for them, without its checks)
            keys, kl = self.keys[d], self.keylog
            if keys is not None and (kl is None or self.keylog_generation == kl.generation):
                result = keys.decrypt(ct, rec.version, rec.header, rec.fragment)
                self._decrypted(d, rec, self._recover(d, rec, out) if result is None else result, out)
                return
        if ct == CHANGE_CIPHER_SPEC:
            # TLS 1.2 (negotiated, or a mid-stream 1.2 renegotiation/resumption): this side encrypts from now on.
            # TLS 1.3 middlebox-compatibility CCS, and any CCS before the ServerHello (e.g. after a
            # HelloRetryRequest), change nothing.
            if (self.version is not None and self.version != 0x0304) or (self.midstream and self.version is None):
                self.encrypting[d] = True
                self._setup_keys(out)
            return
        encrypted = self.encrypting[d] or (ct == APPLICATION_DATA and (self.version == 0x0304 or self.midstream
                                                                        or self.version is None))
        if not encrypted:
            if ct == HANDSHAKE:
                self._handshake(d, rec.fragment, out, rec)
            elif ct == ALERT and len(rec.fragment) >= 2:
                out.append(TlsAlert(d, rec.fragment[0], rec.fragment[1], rec.ts_last))
            elif ct == APPLICATION_DATA:
                self._plain_gap(d, "no_key", out)
            return
        if self.version is None and not self.midstream and d == 0 and self.client_hello is not None:
            # Client records and no ServerHello: 0-RTT early data, or a capture that sees only the client side
            # (ztunnel's replies may leave by another interface). The key log may still say which keys fit.
            result = self._infer_client_keys(rec, out)
            if result is None:
                self._once(out, "tls_no_server_hello", "encrypted client records without a ServerHello in the capture; "
                                                       "no logged client secret decrypts them")
                self.undecrypted[d] += 1
                self._plain_gap(d, "no_key", out)
                return
        else:
            result = self._decrypt(d, rec, out)
        self._decrypted(d, rec, result, out)

    def _decrypted(self, d: int, rec: Record, result, out: list) -> None:
        """What a protected record turned out to be: `result` is (inner content type, plaintext) or None."""
        if result is None:
            self.undecrypted[d] += 1
            self._plain_gap(d, "no_key" if self.keys[d] is None and self.app_keys[d] is None else "decrypt_failed", out)
            return
        self.decrypted[d] += 1
        ict, plain = result
        if ict == APPLICATION_DATA:
            self.plain_lost[d] = False
            if plain:
                out.append(TlsAppData(d, Timed(plain if type(plain) is bytes else bytes(plain), ((0, rec.ts_last),))))
        elif ict == HANDSHAKE:
            self._handshake(d, plain, out, rec, decrypted=True)
        elif ict == ALERT and len(plain) >= 2:
            out.append(TlsAlert(d, plain[0], plain[1], rec.ts_last))

    # -- keys --------------------------------------------------------------------------------------------------------
    def _setup_keys(self, out: list) -> None:
        """Derive record keys once version, suite and client random are known and the key log has them."""
        kl = self.keylog
        if kl is None or self.client_hello is None or self.server_hello is None:
            return
        if self.keylog_generation == kl.generation:
            return
        self.keylog_generation = kl.generation
        cr = self.client_hello.random
        if self.version == 0x0304:
            if self.suite not in TLS13_SUITES:
                self._once(out, "tls_unsupported_suite", f"TLS 1.3 suite {self.suite_name} is not decrypted")
                return
            for d, hs_label, app_label in ((0, "CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0"),
                                           (1, "SERVER_HANDSHAKE_TRAFFIC_SECRET", "SERVER_TRAFFIC_SECRET_0")):
                hs_secret, app_secret = kl.get(cr, hs_label), kl.get(cr, app_label)
                if self.keys[d] is None and hs_secret and self.decrypted[d] == 0:
                    self.keys[d] = RecordKeys.tls13(self.suite, hs_secret, hs_label)
                if self.app_keys[d] is None and app_secret:
                    self.app_keys[d] = RecordKeys.tls13(self.suite, app_secret, app_label)
            early = kl.get(cr, "CLIENT_EARLY_TRAFFIC_SECRET")
            if early and self.early_keys is None:
                self.early_keys = RecordKeys.tls13(self.suite, early, "CLIENT_EARLY_TRAFFIC_SECRET")
        else:
            if self.suite not in TLS12_SUITES:
                self._once(out, "tls_unsupported_suite", f"TLS suite {self.suite_name} is not decrypted")
                return
            master = kl.get(cr, "CLIENT_RANDOM")
            if master is None and self.server_hello.session_id:
                master = kl.session_masters.get(self.server_hello.session_id)
            if master is None:
                self._once(out, "tls_no_key", "neither the client random nor the session id is in the key log")
                return
            ck, sk = tls12_keys(self.suite, master, cr, self.server_hello.random)
            for d, k in ((0, ck), (1, sk)):
                if self.keys[d] is None:
                    self.keys[d] = k
        if self.keys[0] is None and self.keys[1] is None and self.app_keys[0] is None and self.app_keys[1] is None:
            self._once(out, "tls_no_key", "client random not in the key log")

    def _decrypt(self, d: int, rec: Record, out: list):
        if self.keylog is not None and self.keylog_generation != self.keylog.generation:
            if self.midstream and self.keys[d] is None:
                self.keylog_generation = -2  # search again with the new secrets
            else:
                self._setup_keys(out)
        keys = self.keys[d]
        if keys is None and self.app_keys[d] is not None and self.version == 0x0304:
            keys = self.keys[d] = self.app_keys[d]
            self.app_keys[d] = None
        if keys is None:
            if self.midstream:
                return self._midstream_search(d, rec, out)
            if self.client_hello is None and self.server_hello is not None and self.keylog is not None \
                    and self.version == 0x0304:
                return self._infer_client_random(d, rec, out)
            if self.keylog is None:
                self._once(out, "tls_no_key", "no key log: records are not decrypted")
            return None
        r = keys.decrypt(rec.content_type, rec.version, rec.header, rec.fragment)
        if r is not None:
            return r
        return self._recover(d, rec, out)

    def _budget(self, out: list | None = None) -> bool:
        shared = self.shared_budget
        if shared is not None:
            if shared.left <= 0:
                if out is not None:
                    self._once(out, "tls_trials_exhausted", "decryption trials for this capture used up")
                return False
            shared.left -= 1
        if self.trials_left <= 0:
            if out is not None:
                self._once(out, "tls_trials_exhausted", "decryption trials for this connection used up")
            return False
        self.trials_left -= 1
        return True

    def _recover(self, d: int, rec: Record, out: list):
        keys = self.keys[d]
        if isinstance(keys, _SeqSearch):
            return None
        candidates: list[RecordKeys] = []
        if self.app_keys[d] is not None:
            candidates.append(self.app_keys[d])
        if keys.version == 0x0304 and keys.secret is not None:
            candidates.append(keys.next_generation())
        if d == 0 and self.early_keys is not None and self.decrypted[0] == 0:
            candidates.append(self.early_keys)
        for k in candidates:
            if not self._budget(out):
                break
            r = k.decrypt(rec.content_type, rec.version, rec.header, rec.fragment, k.seq)
            if r is not None:
                if k is self.early_keys:
                    self._once(out, "tls_early_data", "0-RTT early data decrypted")
                    return r
                if k is self.app_keys[d]:
                    self.app_keys[d] = None
                    out.append(Anomaly("tls", "tls_key_phase_skipped",
                                       f"dir {d}: application keys in use before the handshake Finished was seen"))
                else:
                    out.append(Anomaly("tls", "tls_missed_key_update", f"dir {d}: record needed the next key "
                                                                      f"generation ({k.generation})"))
                self.keys[d] = k
                return r
        # lost records: search sequence numbers after the expected one
        for k in [keys] + candidates[:1]:
            base = k.seq
            for delta in range(1, NEARBY_SEQ + 1):
                if not self._budget(out):
                    break
                r = k.decrypt(rec.content_type, rec.version, rec.header, rec.fragment, base + delta)
                if r is not None:
                    self.keys[d] = k
                    out.append(Anomaly("tls", "tls_records_skipped", f"dir {d}: {delta} records missing before this "
                                                                     f"one (sequence number found by search)"))
                    return r
        self._once(out, "tls_decrypt_failed", f"dir {d}: a record of {len(rec.fragment)} bytes does not "
                                              f"authenticate with the logged secrets", key=f"decrypt_failed/{d}")
        return None

    def _infer_client_random(self, d: int, rec: Record, out: list):
        """A ServerHello without its ClientHello (one-way capture of the server side): find the logged connection
        whose handshake secret of this direction authenticates the record (one trial per logged connection)."""
        kl = self.keylog
        if self.keylog_generation == kl.generation or self.suite not in TLS13_SUITES:
            return None
        label, peer = (("SERVER_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_HANDSHAKE_TRAFFIC_SECRET") if d == 1 else
                       ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET"))
        for cr, entry in kl.secrets.items():
            secret = entry.get(label)
            if secret is None or self.suite not in candidate_suites(len(secret)):
                continue
            if not self._budget(out):
                break
            k = RecordKeys.tls13(self.suite, secret, label)
            r = k.decrypt(rec.content_type, rec.version, rec.header, rec.fragment, 0)
            if r is None:
                continue
            self.keys[d] = k
            app = {0: "CLIENT_TRAFFIC_SECRET_0", 1: "SERVER_TRAFFIC_SECRET_0"}
            for side in (0, 1):
                if entry.get(app[side]) is not None:
                    self.app_keys[side] = RecordKeys.tls13(self.suite, entry[app[side]], app[side])
            if entry.get(peer) is not None and self.keys[1 - d] is None:
                self.keys[1 - d] = RecordKeys.tls13(self.suite, entry[peer], peer)
            self.inferred_client_random = cr
            out.append(Anomaly("tls", "tls_client_hello_missing", "no ClientHello captured; the logged connection "
                                                                  "was found by trial decryption"))
            return r
        self.keylog_generation = kl.generation  # nothing matched: retry only when new secrets arrive
        return None

    def _infer_client_keys(self, rec: Record, out: list):
        """Decrypt a client record without the ServerHello: try the logged client secrets of this client random
        with every TLS 1.3 suite their length allows (handshake keys first, then 0-RTT keys)."""
        kl = self.keylog
        if self.keys[0] is not None:
            return self._decrypt(0, rec, out)
        if kl is None or self.client_hello is None:
            return None
        entry = kl.secrets.get(self.client_hello.random)
        if not entry:
            return None
        for label in ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0", "CLIENT_EARLY_TRAFFIC_SECRET"):
            secret = entry.get(label)
            if secret is None:
                continue
            for suite in candidate_suites(len(secret)):
                if suite not in self.client_hello.cipher_suites:
                    continue
                k = RecordKeys.tls13(suite, secret, label)
                for seq in range(4):
                    if not self._budget(out):
                        return None
                    r = k.decrypt(rec.content_type, rec.version, rec.header, rec.fragment, seq)
                    if r is None:
                        continue
                    self.suite = suite
                    if label == "CLIENT_EARLY_TRAFFIC_SECRET":
                        self._once(out, "tls_early_data", "0-RTT early data decrypted")
                        return r
                    self.version = 0x0304
                    self.keys[0] = k
                    app = entry.get("CLIENT_TRAFFIC_SECRET_0")
                    if label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET" and app is not None:
                        self.app_keys[0] = RecordKeys.tls13(suite, app, "CLIENT_TRAFFIC_SECRET_0")
                    out.append(Anomaly("tls", "tls_server_hello_missing",
                                       f"no ServerHello captured; version and suite inferred from the key log "
                                       f"({self.suite_name}, {label})"))
                    return r
        return None

    def _midstream_search(self, d: int, rec: Record, out: list):
        """Find secret, suite and sequence number of a record when the handshake was not captured (TLS 1.3)."""
        kl = self.keylog
        if kl is None or rec.content_type != APPLICATION_DATA or self.keylog_generation == kl.generation:
            return None
        labels = ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0")
        # Every candidate key (logged connection x label x suite x KeyUpdate generation), bounded; then sequence
        # numbers breadth-first, so that small sequence numbers of every candidate are tried before large ones.
        keys: list[tuple[RecordKeys, bytes, str, int]] = []
        for cr, entry in kl.secrets.items():
            for label in labels:
                secret = entry.get(label)
                if secret is None:
                    continue
                for suite in candidate_suites(len(secret)):
                    k = RecordKeys.tls13(suite, secret, label)
                    for _gen in range(MIDSTREAM_GENERATIONS):
                        keys.append((k, cr, label, suite))
                        k = k.next_generation()
                if len(keys) >= MAX_CANDIDATE_KEYS:
                    break
            if len(keys) >= MAX_CANDIDATE_KEYS:
                self._once(out, "tls_trials_exhausted", f"more than {MAX_CANDIDATE_KEYS} candidate keys for a "
                                                        f"mid-connection search; the rest of the key log is not tried")
                break
        ctype, version, header, fragment = rec.content_type, rec.version, rec.header, rec.fragment
        for seq in range(self.max_seq_search):
            for k, cr, label, suite in keys:
                if not self._budget(out):
                    self.keylog_generation = kl.generation
                    return None
                r = k.decrypt(ctype, version, header, fragment, seq)
                if r is not None:
                    self._found(d, k, cr, label, suite, seq, out)
                    return r
        if self.keys[0] is None and self.keys[1] is None:
            self.keylog_generation = kl.generation  # nothing matched: retry only when new secrets arrive
        return None

    def _found(self, d: int, k: RecordKeys, cr: bytes, label: str, suite: int, seq: int, out: list) -> None:
        self.keys[d] = k
        self.version, self.suite = 0x0304, suite
        client_side = 0 if label.startswith("CLIENT") else 1
        self.swapped = d != client_side
        out.append(Anomaly("tls", "tls_midstream_keys", f"dir {d}: mid-connection records decrypt with the "
                                                        f"{label} of a logged connection (generation {k.generation}, "
                                                        f"sequence number {seq})"))
        # the other direction: the peer label of the same client random
        other = "SERVER_TRAFFIC_SECRET_0" if client_side == 0 else "CLIENT_TRAFFIC_SECRET_0"
        secret = self.keylog.get(cr, other)
        if secret is not None and self.keys[1 - d] is None:
            # The peer direction's sequence number is searched at its first record.
            self.keys[1 - d] = _SeqSearch(RecordKeys.tls13(suite, secret, other), self)  # type: ignore[assignment]

    # -- handshake ---------------------------------------------------------------------------------------------------
    def _handshake(self, d: int, data: bytes, out: list, rec: Record, decrypted: bool = False) -> None:
        for mtype, body in self.hs[d].feed(data):
            if mtype < 0:
                out.append(Anomaly("tls", "tls_handshake_too_large", f"dir {d}: handshake message over the cap"))
                continue
            try:
                self._message(d, mtype, body, out)
            except HandshakeError as e:
                out.append(Anomaly("tls", "tls_bad_handshake", f"dir {d}: handshake type {mtype}: {e}"))

    def _message(self, d: int, mtype: int, body: bytes, out: list) -> None:
        if mtype == CLIENT_HELLO:
            ch = parse_client_hello(body)
            if self.client_hello is None:
                self.client_hello = ch
                self.sni = ch.sni
        elif mtype == SERVER_HELLO:
            sh = parse_server_hello(body)
            if sh.retry:
                self.suite = sh.cipher_suite
                return
            self.server_hello = sh
            self.version, self.suite = sh.version, sh.cipher_suite
            if sh.alpn:
                self.alpn = sh.alpn
            self._setup_keys(out)
            if self.version == 0x0304:
                # from now on both directions protect their handshake
                self.encrypting = [False, False]
        elif mtype == ENCRYPTED_EXTENSIONS:
            alpn = parse_encrypted_extensions(body)
            if alpn:
                self.alpn = alpn
        elif mtype == CERTIFICATE:
            certs = parse_certificate(body, self.version == 0x0304)
            if certs.chain:
                ids = spiffe_ids(certs.chain[0])
                if ids:
                    self.spiffe[d] = ids[0]
        elif mtype == FINISHED and self.version == 0x0304:
            if self.app_keys[d] is not None:
                self.keys[d] = self.app_keys[d]
                self.app_keys[d] = None
        elif mtype == KEY_UPDATE and self.version == 0x0304:
            k = self.keys[d]
            if isinstance(k, RecordKeys) and k.secret is not None:
                self.keys[d] = k.next_generation()


class _SeqSearch:
    """Stands in for a direction's keys until the first record fixes the sequence number (mid-stream peer)."""

    version = 0x0304
    secret = None

    def __init__(self, keys: RecordKeys, session: TlsSession) -> None:
        self.k = keys
        self.session = session

    @property
    def seq(self) -> int:
        return self.k.seq

    def decrypt(self, ctype, version, header, fragment, seq=None):
        s = self.session
        k = self.k
        for _gen in range(3):
            for n in range(s.max_seq_search):
                if not s._budget():
                    return None
                r = k.decrypt(ctype, version, header, fragment, n)
                if r is not None:
                    d = 0 if s.keys[0] is self else 1
                    s.keys[d] = k
                    return r
            k = k.next_generation()
        return None

    def next_generation(self):
        return self

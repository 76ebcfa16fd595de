"""Keyless HBONE against decryption: every lab scenario analysed with and without its key log, and the keyless
record labels against the frames decryption finds in each record.

    python3 benchmarks/keyless_eval.py [scenario ...]

Table 1, per scenario: reference flows (exact flows of the decrypted analysis), % tied to the right HBONE connection
and destination without keys, wrong matches with confidence > 0.9, ambiguous matches (keyless_ambiguous anomalies),
lowest confidence of an inferred flow, HBONE hop events compared, worst hop-latency difference and worst event-time
difference (ms, HBONE hops). The samples carry no pcapng Decryption Secrets Blocks (checked).

Table 2, per capture that decrypts (each scenario's node captures with its key log; the public TLS 1.3 / TLS 1.2
HTTP/2 captures with key logs in ../shared/conformance when present): records of the decrypted connections, records
placed in the plaintext, records whose keyless label is one of the kinds decryption finds there.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hbonecap
from hbonecap.analysis.keyless import compare, decrypted_views, label_accuracy

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CONFORMANCE = (ROOT / ".." / "shared" / "conformance").resolve()
PUBLIC = (
    ("princeb612_hotplace/test/testcase/tls/http/http2.pcapng", "princeb612_hotplace/test/testcase/tls/http/sslkeylog"),
    ("ajbanjara_Wireshark-wiki/uploads/__moin_import__/attachments/SampleCaptures/http2-16-ssl.pcapng",
     "ajbanjara_Wireshark-wiki/uploads/__moin_import__/attachments/SampleCaptures/"
     "http2-16-ssl.keys.derived-from-comment.txt"),
    ("ajbanjara_Wireshark-wiki/uploads/bf889abf927b7d041b34a136dce7e176/grpc_person_search_protobuf_and_json_tls.pcapng",
     "ajbanjara_Wireshark-wiki/uploads/bf889abf927b7d041b34a136dce7e176/grpc_person_search_protobuf_and_json_tls"
     ".keylog.txt"),
)


def evaluate(scenario: str) -> dict:
    d = SAMPLES / scenario
    decrypted = hbonecap.analyze(str(d), keylog=str(d / "keylog.txt"))
    keyless = hbonecap.analyze(str(d))
    if int(keyless.captures["secrets"].sum()):
        raise SystemExit(f"{scenario}: captures embed TLS secrets: not a keyless run")
    return compare(decrypted, keyless)


def labels(path: Path, keylog: Path) -> tuple[int, int, int]:
    views = decrypted_views(str(path), str(keylog))
    records = good = known = 0
    for tl, pt in views.values():
        g, k, _ = label_accuracy(tl, pt)
        records, good, known = records + len(tl), good + g, known + k
    return records, known, good


def main(names: list[str]) -> None:
    names = names or sorted(p.parent.name for p in SAMPLES.glob("*/truth.json"))
    print("| scenario | flows | tied % | wrong conf>0.9 | ambiguous | min confidence | hbone events compared "
          "| worst latency diff ms | worst event time diff ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        r = evaluate(n)
        print(f"| {n} | {r['flows']} | {r['tied_pct']:.0f} | {r['wrong_confident']} | {r['ambiguous']} | "
              f"{r['min_confidence']:.2f} | {r['hbone_events_compared']}/{r['hbone_events_ref']} | "
              f"{r['worst_latency_ms']:.3f} | {r['worst_hbone_time_ms']:.3f} |", flush=True)
    print()
    print("| capture | records | placed | right labels | accuracy |")
    print("|---|---|---|---|---|")
    cases = [(f"{n}/{p.name}", p, SAMPLES / n / "keylog.txt") for n in names
             for p in sorted((SAMPLES / n).glob("node-*"))]
    if CONFORMANCE.exists():
        cases += [(Path(p).name, CONFORMANCE / p, CONFORMANCE / k) for p, k in PUBLIC]
    for label, path, keylog in cases:
        records, known, good = labels(path, keylog)
        if records:
            print(f"| {label} | {records} | {known} | {good} | {100.0 * good / known if known else float('nan'):.1f}% |",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

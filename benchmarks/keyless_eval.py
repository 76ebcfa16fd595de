"""Keyless HBONE against decryption: every lab scenario analysed with and without its key log.

    python3 benchmarks/keyless_eval.py [scenario ...]

Per scenario: reference flows (exact flows of the decrypted analysis), % tied to the right HBONE connection and
destination without keys, wrong matches with confidence > 0.9, HBONE hop events compared, worst hop-latency and
worst HBONE event-time difference (ms). The samples carry no pcapng Decryption Secrets Blocks (checked).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hbonecap
from hbonecap.analysis.keyless import compare

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def evaluate(scenario: str) -> dict:
    d = SAMPLES / scenario
    decrypted = hbonecap.analyze(str(d), keylog=str(d / "keylog.txt"))
    keyless = hbonecap.analyze(str(d))
    if int(keyless.captures["secrets"].sum()):
        raise SystemExit(f"{scenario}: captures embed TLS secrets: not a keyless run")
    return compare(decrypted, keyless)


def main(names: list[str]) -> None:
    names = names or sorted(p.parent.name for p in SAMPLES.glob("*/truth.json"))
    print(f"| scenario | flows | tied % | wrong conf>0.9 | hbone events compared | worst latency diff ms "
          f"| worst event time diff ms | min confidence |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        r = evaluate(n)
        print(f"| {n} | {r['flows']} | {r['tied_pct']:.0f} | {r['wrong_confident']} | "
              f"{r['hbone_events_compared']}/{r['hbone_events_ref']} | {r['worst_latency_ms']:.3f} | "
              f"{r['worst_hbone_time_ms']:.3f} | {r['min_confidence']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Shared fixtures: where the public conformance captures and the lab samples are, and tshark."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = (ROOT / ".." / "shared" / "conformance").resolve()
SAMPLES = ROOT / "samples"


def conformance_split() -> list[tuple[str, str, list[str]]]:
    """Rows of SPLIT.tsv: (path, group, tags); empty when the folder is absent."""
    f = CONFORMANCE / "SPLIT.tsv"
    if not f.exists():
        return []
    rows = []
    for line in f.read_text().splitlines()[1:]:
        if not line.strip():
            continue
        path, group, checks = (line.split("\t") + ["", ""])[:3]
        rows.append((path, group, checks.split()))
    return rows


@pytest.fixture
def conformance() -> Path:
    if not CONFORMANCE.exists():
        pytest.skip(f"conformance captures not found at {CONFORMANCE}")
    return CONFORMANCE


@pytest.fixture
def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.skip("tshark is not installed")
    return path

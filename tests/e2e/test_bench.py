"""``make bench-quick`` runs: every benchmark scenario end to end, at tiny sizes.

A smoke test of the suite (bench/), not a performance test: nothing here checks a
number against a target; the real run is ``make bench`` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_runs_every_scenario(tmp_path: Path) -> None:
    raw = tmp_path / "results.json"
    table = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(raw), "--output", str(table)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(raw.read_text())
    assert results["pipeline"]["complete"], "every callback got its message/send"
    assert results["fanout"]["complete"], "every queued message got its outcome"
    assert results["tokens"]["complete"], "every outcome was sent"
    assert results["tokens"]["gettoken_calls"] >= 1
    assert set(results["memory"]) >= {"gateway", "llm", "sender", "token"}
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows if r.split("|")[1].strip().isdigit()] == [
        "1", "2", "3", "4", "5", "6", "7"
    ]  # fmt: skip
    counted = results["instructions"]
    if shutil.which("valgrind") and shutil.which("callgrind_control"):
        per = counted["per_callback"]
        # The gateway's work is on top of the same HTTP handling as the bare handler's.
        assert per["gateway"] > per["bare"] > 0, per
        assert any(r.startswith("| 1. 50 callbacks each; bare / gateway") for r in rows)
    else:  # .ci/run installs valgrind; a machine without it says so instead
        assert not os.environ.get("CI"), "valgrind is not installed: .ci/run installs it"
        assert "not installed" in counted["skipped"]

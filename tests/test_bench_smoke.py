"""Keeps the benchmark harness from rotting: a tiny run must complete and print its ratio table.

No timing assertions: benchmarks are not tests (numbers live in docs/performance.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ilink_fixproxy.launcher import clean_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_in_a_tiny_mode_and_prints_the_ratio_table():
    argv = [sys.executable, "-m", "bench", "--quick", "--warmup", "0.05", "--window", "0.2"]
    argv += ["--polls", "5", "--upload-mb", "1"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "ours/mitmdump" in out and "ours/direct" in out
    for row in (
        "a. pass-through c=1",
        "a. pass-through c=16",
        "b. repair, 1 re-issue",
        "c. known-stale token",
        "d. 5 polls held",
        "e. 1 MiB upload",
    ):
        assert row in out, row


def test_the_budget_benchmark_runs_and_prints_both_paths():
    argv = [sys.executable, "-m", "bench.budget", "--sends", "40", "--peers", "2", "--budget", "3"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {
        line.split("  ")[0]: line.split()
        for line in p.stdout.splitlines()
        if line.endswith(tuple("0123456789"))
    }
    assert "without proxy" in rows and "through proxy" in rows and "attempts saved per 100 sends:" in p.stdout
    # the same messages are delivered either way (the same seed, the same fake)
    assert rows["without proxy"][-1] == rows["through proxy"][-1]

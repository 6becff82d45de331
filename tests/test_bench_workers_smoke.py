"""Keeps bench/workers.py (the scale-out benchmark) from rotting: a tiny run completes and prints
its ratios. No timing assertions: numbers live in docs/performance.md."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ilink_fixproxy.launcher import clean_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_scale_out_benchmark_runs_in_a_tiny_mode_and_prints_its_ratios():
    paths = "mitmdump,w1,w2" + (
        ",lb1,lb2" if shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin") else ""
    )
    argv = [sys.executable, "-m", "bench.workers", "--quick", "--warmup", "0.05", "--window", "0.3"]
    argv += ["--concurrency", "4", "--paths", paths]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # One row per path; a ratio is printed whenever its denominator completed a send in the
    # 0.3 s window (on a loaded machine a path may complete none: then there is no ratio to
    # print, which is the benchmark's rule, not a failure of this smoke test).
    table = [ln.split() for ln in p.stdout.splitlines()]
    rows = {r[0]: r for r in table if len(r) == 7 and r[0] in paths.split(",") and r[1].isdigit()}
    assert set(rows) == set(paths.split(",")), p.stdout
    assert all(row[-1] == "0" for row in rows.values()), p.stdout  # no errors
    for a, b in (("w2", "w1"), ("w2", "mitmdump"), ("w1", "mitmdump"), ("lb2", "lb1")):
        if a in rows and b in rows:
            assert (f"{a}/{b} throughput:" in p.stdout) == (float(rows[b][1]) > 0), p.stdout

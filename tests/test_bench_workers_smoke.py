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
    for ratio in ("w2/w1 throughput:", "w2/mitmdump throughput:", "w1/mitmdump throughput:"):
        assert ratio in p.stdout, p.stdout
    if "lb1" in paths:
        assert "lb2/lb1 throughput:" in p.stdout, p.stdout

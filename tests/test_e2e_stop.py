"""Stopping the real proxy with SIGTERM is clean: exit status 0, nothing but its own lines.

Issue 12: the proxy died with SIGSEGV at stop now and then (reverse mode). In reverse mode to an
https:// upstream mitmproxy also listens on UDP with a server that runs in mitmproxy_rs (tokio
threads). mitmproxy only asks it to close; its tasks then log "... shutting down." through
pyo3-log, taking the GIL on a tokio thread, and if the interpreter is finalizing by then CPython
ends that thread with pthread_exit, whose unwinding through Rust frames crashes the process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from conftest import HEADERS, ROOT, SEND, send_body, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI

PROBE = Path(__file__).resolve().parent / "stop_probe"
MARKER = "stop-probe: native threads still shutting down at exit:"


def test_a_stop_waits_until_the_rust_udp_listener_has_finished_closing(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    # The probe (tests/stop_probe/sitecustomize.py) holds the Rust threads inside their shutdown
    # until the interpreter exits, so the race that crashed is lost every time, not 1 stop in 20.
    env = clean_env({"PYTHONPATH": str(PROBE), "PYTHONFAULTHANDLER": "1"})
    argv = ilink_fixproxy_argv(
        "--listen",
        "127.0.0.1:0",
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
    )
    with ProxyProcess(argv, env=env) as p:
        r = httpx.post(p.url + SEND, content=send_body("stale-token"), headers=HEADERS, trust_env=False)
        assert r.headers["x-ilink-fixproxy"].startswith("repaired"), r.headers
        status = p.stop()
    probe = [ln for ln in p.output.splitlines() if ln.startswith(MARKER)]
    assert len(probe) == 1, p.output
    assert "shutdown records seen: 0)" not in probe[0], "the probe saw no Rust server shut down:\n" + p.output
    assert probe[0].startswith(f"{MARKER} 0 "), p.output
    assert status == 0, p.output
    assert "Fatal Python error" not in p.output and "Traceback" not in p.output


def test_a_few_start_repair_stop_cycles_are_clean():
    """bench/stop_cycles.py, which runs 100 of them for the record, in a tiny size."""
    argv = [sys.executable, "bench/stop_cycles.py", "--cycles", "3"]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, env=clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "stop cycles: 3/3 clean" in p.stdout

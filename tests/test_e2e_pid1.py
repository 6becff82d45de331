"""End to end: as PID 1 (how the Docker image runs it) the proxy stops on SIGTERM during start-up.

The kernel ignores a signal sent to a PID namespace's init unless the init installed a handler
for it, so before the proxy handled SIGTERM from its first steps, a `docker stop` in the first
second of a container's life waited out its timeout and ended in SIGKILL (exit 137). The proxy is
made PID 1 of a new PID namespace with `unshare`, and held in start-up deterministically: its
rules file is a FIFO nobody writes, so it blocks opening it, and SIGTERM arrives right there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ilink_fixproxy.launcher import clean_env


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def wait_until(what: str, condition, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
@pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root")
def test_sigterm_during_start_up_stops_the_proxy_running_as_pid_1(tmp_path: Path):
    fifo = tmp_path / "rules.yaml"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "ilink_fixproxy", "--listen", "127.0.0.1:0", "--rules", str(fifo)]
    argv += ["--confdir", str(tmp_path / "conf")]
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=clean_env(),
    )
    try:
        proxy = wait_until("the proxy process", lambda: (children(outer.pid) or [None])[0])
        # Blocked opening the FIFO: it is in start-up, past nothing it could have skipped.
        wait_until("the proxy to block on its rules file", lambda: _wchan(proxy) == "wait_for_partner")
        os.kill(proxy, signal.SIGTERM)
        try:
            code = outer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM to the proxy as PID 1 during start-up was ignored")
        out = outer.stdout.read().decode() if outer.stdout else ""
        assert code == 0, out
        assert "Traceback" not in out, out
    finally:
        if outer.poll() is None:
            outer.kill()  # --kill-child takes the proxy with it
            outer.wait()


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""

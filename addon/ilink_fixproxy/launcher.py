"""Start the real proxy (``ilink-fixproxy`` or ``mitmdump -s``) as a child process.

Used by ``ilink-fixproxy demo`` and by the end-to-end tests, which must exercise the very
process an operator runs. The child's output is read continuously on a thread (an unread pipe
would block it) and kept for inspection; readiness is the line that names the bound address,
which also tells us the port when we asked for port 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

# Our own start line, and mitmproxy's "<mode> listening at 127.0.0.1:1234." log line.
READY_OURS = re.compile(r"listening on (http://\S+?) ")
READY_MITMDUMP = re.compile(r"listening at (\S+?:\d+)\.")

_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment without proxy variables (they could route us through ourselves)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def ilink_fixproxy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ilink_fixproxy", *args]


class ProxyProcess:
    """A running proxy child process; use as a context manager or call stop()."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: re.Pattern[str] = READY_OURS,
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.url = ""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env or clean_env(),
            cwd=cwd,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_ready(ready, timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line)

    def _wait_ready(self, ready: re.Pattern[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = ready.search(self.output)
            if m:
                found = m.group(1)
                self.url = found if found.startswith("http") else f"http://{found}"
                return
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise RuntimeError(
                    f"proxy exited with status {self.proc.returncode} before listening:\n{self.output}"
                )
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"proxy did not start listening within {timeout:.0f} s:\n{self.output}")

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_output(self, *texts: str, timeout: float = 15.0) -> bool:
        """Whether one of `texts` appears in the output within `timeout`. The output reaches us through a
        pipe read by a thread, so a line the proxy logged before (or right after) answering may
        still be on its way when the answer has arrived: wait for it rather than look once."""
        end = time.monotonic() + timeout
        while not any(text in self.output for text in texts):
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful), then SIGKILL after `timeout`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

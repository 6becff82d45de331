"""A probe loaded into the proxy process by tests/test_e2e_stop.py (PYTHONPATH=tests/stop_probe).

It makes the condition behind issue 12's SIGSEGV at stop happen every time instead of now and
then: mitmproxy_rs's tokio threads log "... shutting down." (through pyo3-log, holding the GIL)
when a Rust-side server is closed. The probe holds each such record until the interpreter
reaches its exit handlers (or HOLD_S passes), so a proxy that does not wait for its Rust servers
to finish closing reaches exit with a Rust thread still inside its shutdown. At exit it prints
how many were still inside: a proxy that waits prints 0.

Instrumentation only: it changes no behaviour of the proxy besides those delays.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from typing import Any

HOLD_S = 1.0  # at most per record; the proxy waits up to 5 s for its Rust servers to close
MARKER = "stop-probe: native threads still shutting down at exit:"

_exiting = threading.Event()
_lock = threading.Lock()
_inside: set[str] = set()
_seen: list[str] = []
_make_record = logging.getLogRecordFactory()


def _record(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _make_record(*args, **kwargs)
    thread = threading.current_thread()
    if thread is not threading.main_thread() and "shutting down" in str(record.msg):
        with _lock:
            _inside.add(thread.name)
            _seen.append(str(record.msg))
        _exiting.wait(HOLD_S)  # releases the GIL: the main thread runs on meanwhile
        with _lock:
            _inside.discard(thread.name)
    return record


def _at_exit() -> None:
    with _lock:
        inside, seen = len(_inside), len(_seen)
    sys.stderr.write(f"{MARKER} {inside} (shutdown records seen: {seen})\n")
    sys.stderr.flush()
    _exiting.set()


logging.setLogRecordFactory(_record)
# Records are only made for enabled levels: the Rust servers log their shutdown at DEBUG.
for _name in ("mitmproxy_rs", "mitmproxy.packet_sources"):
    logging.getLogger(_name).setLevel(logging.DEBUG)
atexit.register(_at_exit)  # registered first, so it runs last of the exit handlers

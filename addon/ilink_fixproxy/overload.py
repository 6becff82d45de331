"""When the process runs out of file descriptors (or socket memory): one log line per interval
with a count, instead of a traceback per refused connection.

Where the flood came from: asyncio's accept loop (``selector_events._accept_connection``) calls
the loop's exception handler for every ``accept()`` that fails with EMFILE/ENFILE/ENOBUFS/ENOMEM,
up to the listen backlog (100) per event-loop tick, pauses the listening socket for one second
and tries again; mitmproxy's handler logs each one with its traceback. With 400 connections and
``ulimit -n 256`` that was 84,139 tracebacks, 26 MB of log in 15 s and more than a core of CPU.
The pause-and-retry is right (serving resumes by itself once descriptors free up); only the
reporting is replaced here. Every other error still reaches the handler that was installed.

The connections that do get in then fail in other places for the same reason (mitmproxy's
tlsconfig cannot open the upstream CA file: one "Addon error" traceback per connection), so
repeated tracebacks are also kept to one per message per interval, with a count
(RepeatedTracebacks).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ilink_fixproxy")

EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
REPORT_INTERVAL_S = 10.0

_Handler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


def _nofile_limit() -> str:
    try:
        import resource  # Unix only
    except ImportError:  # pragma: no cover - Windows
        return "unknown"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


class ExhaustionReport:
    """Counts resource-exhaustion errors; logs the first at once, then a count per interval while
    they go on, and nothing once they stop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float = REPORT_INTERVAL_S) -> None:
        self.loop = loop
        self.interval_s = interval_s
        self.pending = 0  # errors since the last line
        self.total = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, exc: OSError) -> None:
        self.total += 1
        if self._timer is not None:
            self.pending += 1
            return
        log.warning(
            f"ilink-fixproxy: cannot accept connections: {exc.strerror or exc} (open-files limit "
            f"{_nofile_limit()}); retrying every second, and saying how many failed every "
            f"{self.interval_s:g} s while it lasts. Raise the limit (ulimit -n, systemd LimitNOFILE=) "
            "or lower the number of connections."
        )
        self._timer = self.loop.call_later(self.interval_s, self._report)

    def _report(self) -> None:
        if not self.pending:
            self._timer = None  # quiet for a whole interval: the next error starts over
            return
        log.warning(
            f"ilink-fixproxy: {self.pending} connection(s) could not be accepted in the last "
            f"{self.interval_s:g} s (out of file descriptors; open-files limit {_nofile_limit()})"
        )
        self.pending = 0
        self._timer = self.loop.call_later(self.interval_s, self._report)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class RepeatedTracebacks(logging.Filter):
    """A log handler filter: a record with a traceback whose message was already logged with one
    in the last interval is dropped and counted; the next one after the interval goes out with
    the count appended. Records without a traceback are never touched."""

    def __init__(
        self, interval_s: float = REPORT_INTERVAL_S, clock: Callable[[], float] | None = None
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock or time.monotonic
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [since, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        key = (record.name, record.getMessage()[:300])
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.getMessage()} ({seen[1]} more like this in the last {now - seen[0]:.0f} s)"
            record.args = None
        if len(self._seen) >= 1000:  # bounded whatever the messages
            self._seen.clear()
        self._seen[key] = [now, 0]
        return True


def install(loop: asyncio.AbstractEventLoop, interval_s: float = REPORT_INTERVAL_S) -> ExhaustionReport:
    """Route the loop's resource-exhaustion errors to an ExhaustionReport (everything else goes
    to the handler installed before: mitmproxy's, once it runs, so call this from the `running`
    hook), and keep repeated tracebacks to one per interval on every root log handler."""
    inner: _Handler | None = loop.get_exception_handler()
    report = ExhaustionReport(loop, interval_s)
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatedTracebacks) for f in h.filters):
            h.addFilter(RepeatedTracebacks(interval_s))

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        accepting = str(context.get("message", "")).startswith("socket.accept()")
        if accepting and isinstance(exc, OSError) and exc.errno in EXHAUSTED:
            report.note(exc)
        elif inner is not None:
            inner(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return report

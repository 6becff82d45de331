"""The overload reporting in memory: repeated tracebacks kept to one per interval with a count."""

from __future__ import annotations

import logging

from ilink_fixproxy.overload import RepeatedTracebacks


def record(msg: str, traceback: bool = True) -> logging.LogRecord:
    try:
        raise OSError(24, "Too many open files")
    except OSError as e:
        exc = (type(e), e, e.__traceback__) if traceback else None
    return logging.LogRecord("mitmproxy.addonmanager", logging.ERROR, __file__, 1, msg, None, exc)


def test_a_repeated_traceback_is_logged_once_per_interval_with_a_count():
    now = [100.0]
    f = RepeatedTracebacks(interval_s=10, clock=lambda: now[0])
    assert f.filter(record("Addon error: Cannot load trusted certificates"))
    passed = [f.filter(record("Addon error: Cannot load trusted certificates")) for _ in range(500)]
    assert not any(passed)
    assert f.filter(record("another error"))  # a different message is its own
    assert f.filter(record("Addon error: Cannot load trusted certificates", traceback=False))
    now[0] += 10
    again = record("Addon error: Cannot load trusted certificates")
    assert f.filter(again)
    assert (
        again.getMessage()
        == "Addon error: Cannot load trusted certificates (500 more like this in the last 10 s)"
    )
    now[0] += 10
    quiet = record("Addon error: Cannot load trusted certificates")
    assert f.filter(quiet) and quiet.getMessage() == "Addon error: Cannot load trusted certificates"

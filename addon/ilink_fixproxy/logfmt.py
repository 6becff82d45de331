"""How log lines look: mitmproxy's own text lines (default) or one JSON object per line
(``--log-format json`` / ``ilink_log_format=json``), both passed through the redaction safety net.

mitmproxy prints log records with its TermLog handler on the root logger; we only swap that
handler's formatter, so every record (ours, mitmproxy's, httpx's) comes out in the same format and
nothing else about logging changes. The addon's decision lines start with the decision
(``repaired: sendmessage ...``); in JSON that word is also given as a field, so a log pipeline can
count decisions without parsing the text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

from mitmproxy.addons import termlog
from mitmproxy.utils import human

from .redact import redact_text

LOG_FORMATS = ("text", "json")

# Every decision the proxy takes about an exchange (flow.metadata["ilink_fixproxy"]["decision"]),
# plus the ones the capture adds for exchanges the addon did not decide about.
DECISIONS = frozenset(
    {
        "passed",
        "repaired",
        "still-failing",
        "stripped",
        "substituted",
        "answered-locally",
        "replayed",
        "window-closed",
        "rate-limited",
        "cooldown-started",
        "reissue-failed",
        "upstream-failed",
        "fallback",
        "matched",
        "deferred",
        "delivered-late",
        "error",
    }
)
_DECISION_RE = re.compile(r"^([a-z][a-z-]+): ")
# Control characters (C0 but tab, DEL, C1) and Unicode line/paragraph separators: a value from
# the wire (a client_id, a path, an error message) carrying "\n[12:00:00.000] repaired: ..." or
# ANSI escapes would otherwise forge or hide lines in a text log. JSON escapes them by itself.
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` on one line: each control character as a visible escape (\\n, \\x1b, \\u2028)."""
    return _CONTROL_RE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_ORIGINAL = "_ilink_fixproxy_original_formatter"


class RedactingFormatter(logging.Formatter):
    """Wraps mitmproxy's text formatter; one line per message (a traceback keeps its lines),
    scrubbed."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if (safe := escape_controls(msg)) != msg:
            record = logging.makeLogRecord({**record.__dict__, "msg": safe, "args": None})
        return redact_text(self.inner.format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, and decision / client when known.

    A record may carry structured fields in ``extra={"ilink": {...}}``; they are added as they
    are (callers put only redacted values there)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg = f"{msg}\n{self.formatException(record.exc_info)}"
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(msg),
        }
        if (m := _DECISION_RE.match(msg)) and m.group(1) in DECISIONS:
            out["decision"] = m.group(1)
        if client := getattr(record, "client", None):
            out["client"] = human.format_address(client)
        extra = getattr(record, "ilink", None)
        if isinstance(extra, dict):
            out.update({k: v for k, v in extra.items() if k not in out})
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(fmt: str) -> None:
    """Make mitmproxy's terminal log print `fmt` ("text" or "json"); both are scrubbed."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, termlog.TermLogHandler):
            continue
        original = getattr(handler, _ORIGINAL, None) or handler.formatter or logging.Formatter()
        setattr(handler, _ORIGINAL, original)
        handler.setFormatter(JsonFormatter() if fmt == "json" else RedactingFormatter(original))

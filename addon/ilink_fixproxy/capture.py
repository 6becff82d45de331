"""Capture: what iLink said and what the proxy did, one redacted JSON line per iLink API exchange.

With ``ilink_capture=DIR`` (``--capture DIR``) every exchange under ``/ilink/bot/`` is appended to
``DIR/journal.jsonl`` (rotated by size into ``journal.jsonl.1`` ... ``.5``): who (bot and peer,
hashed), which message (client_id), which token (its short hash), every upstream attempt, the
decision and the time the proxy added. With ``ilink_capture_flows`` redacted copies of the flows go
to ``DIR/flows.mitm`` as well (``mitmweb -r``). Files are owner-only; secrets are hashed (see
redact.py); message text and media references are omitted unless ``ilink_capture_bodies``.

This addon sits after IlinkFixProxy in the chain, so its ``response``/``error`` hooks see each flow
as our addon left it: ``flow.metadata["ilink_fixproxy"]`` says what was decided (see the contract
in peers.attempt_record and addon.py); flows without it were passed through untouched.

It also logs one line for each send the proxy answered by itself (replayed, answered-locally):
peers.py logs every exchange it performs, but those never reach an upstream.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.io import FlowWriter
from mitmproxy.utils import human

from .jsonedit import get_path
from .logfmt import LOG_FORMATS, configure_logging
from .matching import AnswerSummary, parse_json_object
from .redact import (
    id_value,
    redact_headers,
    redact_json,
    redact_text,
    redact_url,
    safe_text_body,
    token_hash,
)

log = logging.getLogger("ilink_fixproxy")

API_PREFIX = "/ilink/bot/"
HEADER = "X-Ilink-Fixproxy"
JOURNAL_NAME = "journal.jsonl"
FLOWS_NAME = "flows.mitm"
BACKUPS = 5  # rotated files kept besides the current one
JOURNAL_VERSION = 1
DEFAULT_BUFFER_LIMIT = 1024 * 1024
_TEXT_BODY_LIMIT = 64 * 1024  # with ilink_capture_bodies: longest non-JSON body kept as text

# Where the usual endpoints carry the peer, the message id and the token (ilink-protocol.md §1),
# for exchanges no peer-state rule described in flow.metadata.
_PEER_PATHS = (("msg", "to_user_id"), ("to_user_id",), ("ilink_user_id",))
_CLIENT_ID_PATHS = (("msg", "client_id"), ("client_id",))
_TOKEN_PATHS = (("msg", "context_token"), ("context_token",))
# The journal's facts about an exchange, also stored with redacted flows (metadata) and HAR
# entries (_ilink_fixproxy), so that every capture format tells explain the same story.
FACTS = (
    "endpoint",
    "bot",
    "peer",
    "client_id",
    "token_sent",
    "token",
    "decision",
    "rule",
    "handled",
    "attempts",
    "delivery",
    "budget",
    "nudged",
    "status",
    "upstream_ms",
    "added_ms",
    "total_ms",
    "note",
    "error",
)
# Decisions for which no upstream was contacted and peers.py logs nothing.
_LOCAL_DECISIONS = frozenset({"answered-locally", "replayed", "budget-held"})


# --------------------------------------------------------------------------- what happened


def is_api_flow(flow: http.HTTPFlow) -> bool:
    """An iLink API exchange (journaled), as opposed to CDN media and anything else."""
    return flow.request.path.startswith(API_PREFIX)


def endpoint_of(path: str) -> str:
    """``/ilink/bot/msg/notifystart?x=1`` -> ``msg/notifystart``."""
    path = path.split("?", 1)[0]
    return path[len(API_PREFIX) :].strip("/") if path.startswith(API_PREFIX) else path


@dataclass
class Exchange:
    """One iLink API exchange as the proxy handled it: the facts journal, metrics and logs share.
    `peer` is in clear here; every writer hashes it unless told otherwise."""

    endpoint: str
    decision: str
    rule: str | None
    handled: bool
    bot: str | None
    peer: str | None
    client_id: str | None
    token: str | None  # short hash of the context_token the gateway sent
    token_sent: bool
    attempts: list[dict[str, Any]]
    status: int | None  # the answer the gateway got (None: none, see error)
    upstream_ms: float
    total_ms: float
    added_ms: float  # total_ms minus the time spent waiting for upstream answers
    note: str | None  # the X-Ilink-Fixproxy header, when the proxy set one
    error: str | None
    request_doc: dict[str, Any] | None
    response_doc: dict[str, Any] | None
    # What iLink's answer said about delivery (confirmed, unconfirmed, refused, failed); None:
    # not a send a rule selects, or no iLink answer was handed back (answered from memory)
    delivery: str | None = None
    # The peer's send budget after this send (peers.budget_facts: used, limit, left,
    # window_age_s, events); None: not counted
    budget: dict[str, Any] | None = None
    nudged: bool = False  # it carried the window keeper's text (never journaled in clear)


def _first(doc: dict[str, Any] | None, paths: tuple[tuple[str, ...], ...]) -> Any:
    if doc is None:
        return None
    for path in paths:
        present, value = get_path(doc, path)
        if present and value not in (None, ""):
            return value
    return None


def request_facts(doc: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(peer, client_id, context_token) as the usual endpoints carry them, in clear."""
    return _first(doc, _PEER_PATHS), _first(doc, _CLIENT_ID_PATHS), _first(doc, _TOKEN_PATHS)


def _body_doc(message: http.Message | None) -> dict[str, Any] | None:
    if message is None or message.raw_content is None:
        return None
    try:
        return parse_json_object(message.get_content(strict=True))
    except ValueError:
        return None


def _passed_attempt(flow: http.HTTPFlow, token_sent: bool) -> dict[str, Any]:
    """The one upstream attempt of an exchange mitmproxy forwarded as it was."""
    response = flow.response
    assert response is not None
    end = response.timestamp_end or response.timestamp_start or time.time()
    sent = flow.request.timestamp_end or flow.request.timestamp_start
    attempt: dict[str, Any] = {
        "status": response.status_code,
        "ms": round(max(end - sent, 0.0) * 1000, 1),
        "token": "original" if token_sent else "none",
    }
    try:
        body = response.get_content(strict=True) if response.raw_content is not None else None
    except ValueError:
        body = None
    if body is None:  # streamed or undecodable: iLink's verdict is unknown, not "empty"
        attempt.update(ret=None, errcode=None, errmsg=None, empty=None)
    else:
        s = AnswerSummary.of(response.status_code, body)
        attempt.update(ret=s.ret, errcode=s.errcode, errmsg=s.errmsg, empty=s.empty)
    return attempt


def summarize(flow: http.HTTPFlow, now: float, bot_of: Any = None) -> Exchange:
    """What the proxy did with `flow`, from flow.metadata["ilink_fixproxy"] when our addon decided
    about it, else from the flow itself (passed through). `bot_of(request)` is the peer tracker's
    keyed bot hash when peer state is on, so journal and state listings agree."""
    meta: dict[str, Any] = flow.metadata.get("ilink_fixproxy") or {}
    request_doc = _body_doc(flow.request)
    response_doc = _body_doc(flow.response)
    sent_token = _first(request_doc, _TOKEN_PATHS)
    token = meta.get("token") if "token" in meta else (token_hash(sent_token) if sent_token else None)
    token_sent = bool(token and token != "-")

    if "attempts" in meta:
        attempts = [dict(a) for a in meta["attempts"]]
    elif flow.response is not None:
        attempts = [_passed_attempt(flow, token_sent)]
    else:
        attempts = []
    error = flow.error.msg if flow.error else None
    decision = meta.get("decision") or ("error" if flow.response is None else "passed")

    if meta.get("bot"):
        bot = meta["bot"]
    elif auth := flow.request.headers.get("authorization"):
        bot = bot_of(flow.request)[:12] if bot_of else token_hash(auth)
    else:
        bot = None
    upstream_ms = round(sum(a.get("ms") or 0.0 for a in attempts), 1)
    total_ms = round(max(now - flow.request.timestamp_start, 0.0) * 1000, 1)
    return Exchange(
        endpoint=endpoint_of(flow.request.path),
        decision=decision,
        rule=meta.get("rule"),
        handled=bool(meta.get("handled")),
        bot=bot,
        peer=meta.get("peer") if "peer" in meta else _first(request_doc, _PEER_PATHS),
        client_id=meta.get("client_id") if "client_id" in meta else _first(request_doc, _CLIENT_ID_PATHS),
        token=token if token_sent else None,
        token_sent=token_sent,
        attempts=attempts,
        delivery=str(meta["delivery"]) if meta.get("delivery") else None,
        budget=dict(meta["budget"]) if isinstance(meta.get("budget"), dict) else None,
        nudged=bool(meta.get("nudged")),
        status=flow.response.status_code if flow.response is not None else None,
        upstream_ms=upstream_ms,
        total_ms=total_ms,
        added_ms=round(max(total_ms - upstream_ms, 0.0), 1),
        note=flow.response.headers.get(HEADER) if flow.response is not None else None,
        error=error,
        request_doc=request_doc,
        response_doc=response_doc,
    )


# --------------------------------------------------------------------------- what is written


def iso_time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message_part(
    message: http.Message, doc: dict[str, Any] | None, *, bodies: bool, ids: bool
) -> dict[str, Any]:
    part: dict[str, Any] = {
        "http_version": message.http_version,
        "headers": redact_headers(message.headers.items(multi=True)),
        "size": len(message.raw_content) if message.raw_content is not None else None,
        "json": redact_json(doc, bodies=bodies, ids=ids) if doc is not None else None,
    }
    if bodies and doc is None and message.raw_content:
        text = message.get_text(strict=False)
        if text is not None and len(text) <= _TEXT_BODY_LIMIT:
            part["text"] = (
                safe_text_body(text) or f"<{len(message.raw_content)} bytes omitted: may hold secrets>"
            )
    return part


def journal_record(x: Exchange, flow: http.HTTPFlow, *, ids: bool, bodies: bool) -> dict[str, Any]:
    """The journal line for one exchange (also what the HAR export and `explain` read back)."""
    req = flow.request
    record: dict[str, Any] = {
        "v": JOURNAL_VERSION,
        "time": iso_time(req.timestamp_start),
        "ts": round(req.timestamp_start, 6),
        "flow": flow.id,
        "endpoint": x.endpoint,
        "method": req.method,
        "url": redact_url(req.pretty_url),
        "bot": x.bot,
        "peer": id_value(x.peer, ids),
        "client_id": x.client_id,
        "token_sent": x.token_sent,
        "token": x.token,
        "decision": x.decision,
        "rule": x.rule,
        "handled": x.handled,
        "attempts": [_clean_attempt(a) for a in x.attempts],
        "delivery": x.delivery,
        "budget": x.budget,
        "nudged": x.nudged,
        "status": x.status,
        "upstream_ms": x.upstream_ms,
        "added_ms": x.added_ms,
        "total_ms": x.total_ms,
        "note": redact_text(x.note) if x.note else None,
        "comment": redact_text(flow.comment) if flow.comment else None,
        "error": redact_text(x.error) if x.error else None,
        "request": _message_part(req, x.request_doc, bodies=bodies, ids=ids),
        "response": (
            _message_part(flow.response, x.response_doc, bodies=bodies, ids=ids)
            | {"reason": flow.response.reason}
            if flow.response is not None
            else None
        ),
    }
    return record


def _clean_attempt(attempt: dict[str, Any]) -> dict[str, Any]:
    out = dict(attempt)
    if isinstance(out.get("error"), str):
        out["error"] = redact_text(out["error"])
    return out


def redacted_flow(flow: http.HTTPFlow, facts: dict[str, Any], *, bodies: bool, ids: bool) -> http.HTTPFlow:
    """A copy of `flow` safe to write to a flow file: the same redaction as the journal, and the
    journal's facts (already redacted) as its only metadata."""
    c = flow.copy()
    c.request.path = redact_url(c.request.path)
    _redact_message(c.request, bodies=bodies, ids=ids)
    if c.response is not None:
        _redact_message(c.response, bodies=bodies, ids=ids)
    c.metadata = {"ilink_fixproxy": dict(facts)}
    c.comment = redact_text(c.comment)
    return c


def _redact_message(message: http.Message, *, bodies: bool, ids: bool) -> None:
    message.headers = http.Headers(
        [
            (k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
            for k, v in redact_headers(message.headers.items(multi=True))
        ]
    )
    if not message.raw_content:
        return
    doc = _body_doc(message)
    if doc is not None:
        new = json.dumps(redact_json(doc, bodies=bodies, ids=ids), ensure_ascii=False).encode()
    elif (
        bodies
        and (text := message.get_text(strict=False)) is not None
        and len(text) <= _TEXT_BODY_LIMIT
        and (safe := safe_text_body(text)) is not None
    ):
        new = safe.encode()
    else:
        new = f"<{len(message.raw_content)} bytes omitted>".encode()
    if doc is None:
        message.headers.pop("content-encoding", None)  # the placeholder is not compressed
    message.content = new


class RotatingFile:
    """An owner-only (0600) append-only file, renamed to NAME.1 (… NAME.<backups>) when the next
    write would take it past max_bytes. Each write is one os.write of whole records."""

    def __init__(self, path: Path, max_bytes: int, backups: int = BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        return fd

    def write(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size
        if size and size + len(data) > self.max_bytes:
            self._rotate()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _rotate(self) -> None:
        os.close(self._fd)
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def rotated_files(directory: Path, name: str) -> list[Path]:
    """NAME.<backups> … NAME.1, NAME: a capture's files of one kind, oldest first."""
    found = [p for p in directory.glob(f"{name}.*") if p.suffix[1:].isdigit()]
    found.sort(key=lambda p: -int(p.suffix[1:]))
    current = directory / name
    return [*found, current] if current.exists() else found


def make_private_dir(path: Path) -> None:
    """Create the capture directory owner-only (0700); OSError if impossible."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours but open to others (e.g. created by hand): capture is private


def buffer_small_api_flow(flow: http.HTTPFlow, limit: int) -> None:
    """Un-stream an iLink API request no rule selected (IlinkFixProxy streams those) when its
    body is small and its length known, so its answer's ret/errcode can be recorded. Large or
    unknown-length bodies keep streaming: capture never makes the proxy buffer big uploads."""
    if not flow.request.stream or not is_api_flow(flow):
        return
    headers = flow.request.headers
    if "transfer-encoding" in headers:
        return
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return
    if 0 <= length <= limit:
        flow.request.stream = False


def buffer_limit() -> int:
    ours = ctx.master.addons.get("ilinkfixproxy")
    return getattr(ours, "buffer_limit", DEFAULT_BUFFER_LIMIT)


def tracker_of() -> Any:
    """The peer tracker of our addon when peer state is on, else None."""
    ours = ctx.master.addons.get("ilinkfixproxy")
    return getattr(ours, "tracker", None)


def parse_size_option(name: str, value: str) -> int:
    try:
        size = human.parse_size(value)
    except ValueError:
        size = None
    if not size or size < 4096:
        raise exceptions.OptionsError(f"{name}: {value!r} is not a size of at least 4k (expected e.g. 50m)")
    return size


# --------------------------------------------------------------------------- the addon


class Capture:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.max_bytes = 50 * 1024 * 1024
        self.journal: RotatingFile | None = None
        self.flowfile: RotatingFile | None = None
        self._recorded: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()  # response, then error
        self._outbox: Any = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "ilink_capture",
            str,
            "",
            "Directory to capture iLink API exchanges in: one redacted JSON line per exchange in "
            "journal.jsonl (rotated by size). Created owner-only. Empty: no capture.",
        )
        loader.add_option(
            "ilink_capture_ids", bool, False, "Capture peer and bot ids in clear instead of hashed."
        )
        loader.add_option(
            "ilink_capture_bodies",
            bool,
            False,
            "Capture message text and media fields too (secrets are still hashed).",
        )
        loader.add_option(
            "ilink_capture_flows",
            bool,
            False,
            "Also write redacted mitmproxy flows to flows.mitm in the capture directory (mitmweb -r).",
        )
        loader.add_option(
            "ilink_capture_max_bytes",
            str,
            "50m",
            f"Size at which capture files are rotated (k/m/g suffixes); {BACKUPS} old ones are kept.",
        )
        loader.add_option(
            "ilink_log_format",
            str,
            "text",
            "Log lines as text (mitmproxy's format) or json (one object per line); both redacted.",
            choices=list(LOG_FORMATS),
        )

    def configure(self, updated: set[str]) -> None:
        if "ilink_log_format" in updated:
            if ctx.options.ilink_log_format not in LOG_FORMATS:
                raise exceptions.OptionsError(
                    f"ilink_log_format: {ctx.options.ilink_log_format!r} is not one of "
                    f"{', '.join(LOG_FORMATS)}"
                )
            configure_logging(ctx.options.ilink_log_format)
        if "ilink_capture_max_bytes" in updated:
            self.max_bytes = parse_size_option("ilink_capture_max_bytes", ctx.options.ilink_capture_max_bytes)
        if updated & {"ilink_capture", "ilink_capture_flows", "ilink_capture_max_bytes"}:
            self._open()

    def _open(self) -> None:
        self._close()
        if not ctx.options.ilink_capture:
            return
        directory = Path(os.path.expanduser(ctx.options.ilink_capture))
        try:
            make_private_dir(directory)
            self.journal = RotatingFile(directory / JOURNAL_NAME, self.max_bytes)
            if ctx.options.ilink_capture_flows:
                self.flowfile = RotatingFile(directory / FLOWS_NAME, self.max_bytes)
        except OSError as e:
            self._close()
            raise exceptions.OptionsError(
                f"ilink_capture: cannot write captures in {directory}: {e.strerror or e}"
            ) from None
        self.dir = directory
        log.info(f"ilink-fixproxy: capturing iLink exchanges in {directory / JOURNAL_NAME}")

    def _close(self) -> None:
        for f in (self.journal, self.flowfile):
            if f is not None:
                f.close()
        self.journal = self.flowfile = None
        self.dir = None

    def done(self) -> None:
        self._close()

    # ------------------------------------------------------------------ hooks

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.journal is not None:
            buffer_small_api_flow(flow, buffer_limit())

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    # ------------------------------------------------------------------ internals

    def _record(self, flow: http.HTTPFlow) -> None:
        if flow in self._recorded or not is_api_flow(flow):
            return
        self._recorded.add(flow)
        tracker = tracker_of()
        self._watch_outbox(tracker)
        meta = flow.metadata.get("ilink_fixproxy")
        if self.journal is None and not (meta and meta.get("decision") in _LOCAL_DECISIONS):
            return
        try:
            x = summarize(flow, time.time(), tracker.bot_of if tracker is not None else None)
            if x.decision in _LOCAL_DECISIONS and not x.attempts:
                log.info(
                    f"{x.decision}: {x.endpoint} to peer {token_hash(x.peer)} client_id "
                    f"{x.client_id or '-'}: answered without contacting iLink ({redact_text(x.note or '')})"
                )
            if self.journal is not None:
                self._write(flow, x)
        except Exception as e:  # capture must never disturb the traffic
            log.warning(
                f"capture: could not record {endpoint_of(flow.request.path)}: {type(e).__name__}: {e}"
            )

    def _write(self, flow: http.HTTPFlow, x: Exchange) -> None:
        assert self.journal is not None
        ids, bodies = ctx.options.ilink_capture_ids, ctx.options.ilink_capture_bodies
        record = journal_record(x, flow, ids=ids, bodies=bodies)
        self.journal.write(json.dumps(record, ensure_ascii=False, default=str).encode() + b"\n")
        if self.flowfile is not None:
            buf = io.BytesIO()
            facts = {k: record[k] for k in FACTS}
            FlowWriter(buf).add(redacted_flow(flow, facts, bodies=bodies, ids=ids))
            self.flowfile.write(buf.getvalue())

    def _watch_outbox(self, tracker: Any) -> None:
        """Journal deferred deliveries too (they happen later, outside any gateway flow)."""
        outbox = getattr(tracker, "outbox", None)
        listeners = getattr(outbox, "listeners", None)
        if outbox is None or outbox is self._outbox or not isinstance(listeners, list):
            return
        listeners.append(self._outbox_event)
        self._outbox = outbox

    def _outbox_event(self, event: dict[str, Any]) -> None:
        if self.journal is None:
            return
        ids = ctx.options.ilink_capture_ids
        record = {
            "v": JOURNAL_VERSION,
            "time": iso_time(event.get("time") or time.time()),
            "ts": event.get("time"),
            "event": event.get("event"),
            "endpoint": "sendmessage",
            "decision": event.get("event"),
            **{k: v for k, v in event.items() if k not in ("time", "event", "peer")},
            "peer": id_value(event.get("peer"), ids),
        }
        if isinstance(record.get("answer"), str):
            record["answer"] = redact_text(record["answer"])
        self.journal.write(json.dumps(record, ensure_ascii=False, default=str).encode() + b"\n")

"""Export a capture directory as HAR 1.2 (``ilink-fixproxy capture export --har OUT DIR``).

With flow files in the directory (``--capture-flows``) the HAR is mitmproxy's own
(``SaveHar.make_har`` on those already-redacted flows); otherwise it is built from the journal.
Either way each entry carries the proxy's decision as its HAR ``comment`` and, as the custom
field ``_ilink_fixproxy``, the journal's facts (decision, attempts, times), which ``explain`` reads
back. The result opens in browser devtools and in mitmproxy (``mitmproxy -r OUT.har``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import http, io
from mitmproxy.addons.savehar import SaveHar
from mitmproxy.net.http import url as mitmproxy_url

from .capture import FACTS, FLOWS_NAME, JOURNAL_NAME, iso_time, rotated_files

LATEST_TS = 253402300799  # 9999-12-31T23:59:59Z: the last time datetime can show


class CaptureError(Exception):
    """A capture that cannot be read; the message says which file and why."""


def is_journal_record(record: object) -> bool:
    """An exchange (method and url) or an outbox event, as the Capture addon writes them."""
    return isinstance(record, dict) and (("method" in record and "url" in record) or "event" in record)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _part_problem(name: str, part: object) -> str | None:
    """What is wrong with a record's request or response part, if anything."""
    if part is None:
        return None
    if not isinstance(part, dict):
        return f"{name} is not an object"
    headers = part.get("headers", [])
    if not isinstance(headers, list) or not all(isinstance(h, list) and len(h) == 2 for h in headers):
        return f"{name}.headers is not a list of [name, value] pairs"
    for key in ("text", "http_version", "reason"):
        if part.get(key) is not None and not isinstance(part[key], str):
            return f"{name}.{key} is not a string"
    if part.get("size") is not None and not _integer(part["size"]):
        return f"{name}.size is not a whole number"
    return None


def facts_problem(facts: object) -> str | None:
    """What is wrong with the proxy's facts about an exchange (a journal record, a HAR entry's
    ``_ilink_fixproxy``, a flow's metadata), if anything: `explain` and the export rely on these."""
    if facts is None:
        return None
    if not isinstance(facts, dict):
        return "not an object"
    attempts = facts.get("attempts")
    if attempts is not None:
        if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
            return "attempts is not a list of objects"
        for a in attempts:
            if a.get("status") is not None and not _integer(a["status"]):
                return "attempts[].status is not a whole number"
            if a.get("token") is not None and not isinstance(a["token"], str):
                return "attempts[].token is not a string"
    for key in ("decision", "rule", "note", "comment", "time", "error"):
        if facts.get(key) is not None and not isinstance(facts[key], str):
            return f"{key} is not a string"
    for key in ("ts", "upstream_ms", "total_ms"):
        if facts.get(key) is not None and not _number(facts[key]):
            return f"{key} is not a number"
    if facts.get("ts") is not None and not 0 <= facts["ts"] <= LATEST_TS:
        return "ts is not a time (seconds since 1970)"
    if facts.get("status") is not None and not _integer(facts["status"]):
        return "status is not a whole number"
    return None


def record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with one journal record (see is_journal_record), if anything."""
    if "method" not in record or "url" not in record:
        return None  # an outbox event: nothing reads it back
    if problem := facts_problem(record):
        return problem
    if not isinstance(record["method"], str) or not record["method"]:
        return "method is not a string"
    try:
        if not isinstance(record["url"], str):
            raise ValueError
        # A request mitmproxy itself refused is journaled as it had it, "://x:443/path": no scheme
        # (see explain._flow), and is still a record of ours.
        if not record["url"].startswith("://"):
            mitmproxy_url.parse(record["url"])
    except ValueError:
        return "url is not an absolute http(s) URL"
    return _part_problem("request", record.get("request")) or _part_problem(
        "response", record.get("response")
    )


def read_journal(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Journal records (exchanges and outbox events) from journal files, in order.

    CaptureError for a file that is not a journal: a line that is not a JSON object, or a file
    with content but no journal record in it (which would otherwise read as "0 exchanges")."""
    for path in paths:
        found = content = False
        try:
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    content = True
                    try:
                        record = json.loads(line)
                    except ValueError:
                        # The last line of a file being written may be cut short: skip it, but
                        # anything else is not a journal.
                        if fh.readline():
                            raise CaptureError(f"{path}:{n}: not a journal line (invalid JSON)") from None
                        continue
                    if not isinstance(record, dict):
                        raise CaptureError(f"{path}:{n}: not a journal line (not a JSON object)")
                    if is_journal_record(record):
                        if problem := record_problem(record):
                            raise CaptureError(f"{path}:{n}: not a journal record ({problem})")
                        found = True
                        yield record
        except OSError as e:
            raise CaptureError(f"{path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise CaptureError(f"{path}: not a journal (not UTF-8 text)") from None
        if content and not found:
            raise CaptureError(
                f"{path}: not an ilink-fixproxy journal (no complete exchange or outbox record in it)"
            )


def journal_files(directory: Path) -> list[Path]:
    return rotated_files(directory, JOURNAL_NAME)


def flow_files(directory: Path) -> list[Path]:
    return rotated_files(directory, FLOWS_NAME)


def _facts(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in FACTS if k in record}


def _comment(facts: dict[str, Any]) -> str:
    decision = facts.get("decision") or "passed"
    rule = f" (rule {facts['rule']})" if facts.get("rule") else ""
    note = f": {facts['note']}" if facts.get("note") else ""
    return f"ilink-fixproxy {decision}{rule}{note}"


def _headers(pairs: Iterable[Any]) -> list[dict[str, str]]:
    return [{"name": str(k), "value": str(v)} for k, v in pairs]


def _body_text(part: dict[str, Any]) -> str | None:
    if part.get("json") is not None:
        return json.dumps(part["json"], ensure_ascii=False)
    return part.get("text")


def _header(part: dict[str, Any], name: str) -> str:
    return next((str(v) for k, v in part.get("headers", []) if str(k).lower() == name), "")


def entry_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """One HAR entry from one journal exchange record (bodies as the journal has them)."""
    req = record.get("request") or {}
    resp = record.get("response")
    url = record["url"]
    entry_request: dict[str, Any] = {
        "method": record["method"],
        "url": url,
        "httpVersion": req.get("http_version") or "HTTP/1.1",
        "cookies": [],
        "headers": _headers(req.get("headers", [])),
        "queryString": [
            {"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": req.get("size") if req.get("size") is not None else -1,
    }
    if (text := _body_text(req)) is not None:
        entry_request["postData"] = {"mimeType": _header(req, "content-type"), "text": text, "params": []}
    if resp is not None:
        text = _body_text(resp)
        entry_response: dict[str, Any] = {
            "status": resp_status(record),
            "statusText": resp.get("reason") or "",
            "httpVersion": resp.get("http_version") or "HTTP/1.1",
            "cookies": [],
            "headers": _headers(resp.get("headers", [])),
            "content": {
                "size": len(text.encode()) if text is not None else 0,
                "mimeType": _header(resp, "content-type"),
                "text": text if text is not None else "",
            },
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": resp.get("size") if resp.get("size") is not None else -1,
        }
    else:  # no answer at all (the error says why), shaped like mitmproxy's own export
        entry_response = {
            "status": 0,
            "statusText": "",
            "httpVersion": "",
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": "", "text": ""},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
            "_error": record.get("error"),
        }
    upstream = float(record.get("upstream_ms") or 0.0)
    total = float(record.get("total_ms") or upstream)
    facts = _facts(record)
    return {
        "startedDateTime": record.get("time") or iso_time(float(record.get("ts") or 0)),
        "time": total,
        "request": entry_request,
        "response": entry_response,
        "cache": {},
        "timings": {"send": 0, "wait": upstream, "receive": max(total - upstream, 0.0)},
        "comment": _comment(facts),
        "_ilink_fixproxy": facts,
    }


def resp_status(record: dict[str, Any]) -> int:
    status = record.get("status")
    return int(status) if isinstance(status, int) else 0


def har_document(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "ilink-fixproxy", "version": _our_version(), "comment": ""},
            "pages": [],
            "entries": entries,
        }
    }


def _our_version() -> str:
    from . import __version__

    return __version__


def har_from_journal(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return har_document([entry_from_record(r) for r in records if "method" in r and "url" in r])


def har_from_flows(flows: list[Any]) -> dict[str, Any]:
    """mitmproxy's own HAR of (already redacted) flows, plus each one's decision."""
    http_flows = [f for f in flows if isinstance(f, http.HTTPFlow)]
    doc = SaveHar().make_har(http_flows)
    for entry, flow in zip(doc["log"]["entries"], http_flows, strict=True):
        meta = dict(flow.metadata.get("ilink_fixproxy") or {})
        meta.setdefault("decision", "passed")
        entry["comment"] = flow.comment or _comment(meta)
        entry["_ilink_fixproxy"] = meta
    doc["log"]["creator"] = {"name": "ilink-fixproxy", "version": _our_version(), "comment": ""}
    return doc


def export_har(directory: Path) -> dict[str, Any]:
    """The HAR document for a capture directory (flow files preferred, else the journal)."""
    if not directory.is_dir():
        raise CaptureError(f"{directory}: not a capture directory")
    if flows_paths := flow_files(directory):
        try:
            flows = io.read_flows_from_paths([str(p) for p in flows_paths])
        except Exception as e:  # FlowReadException and friends: one line for the user
            raise CaptureError(f"{directory}: cannot read the flow files: {e}") from None
        return har_from_flows(flows)
    paths = journal_files(directory)
    if not paths:
        raise CaptureError(f"{directory}: no {JOURNAL_NAME} in it (was the proxy run with --capture?)")
    return har_from_journal(read_journal(paths))


def write_private(path: Path, data: bytes) -> None:
    """Write an owner-only (0600) file: exports hold the same (redacted) traffic as the capture."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)

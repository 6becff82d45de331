"""``ilink-fixproxy explain CAPTURE [--rules PATH]``: what the proxy would do with captured traffic.

CAPTURE is a capture directory or journal (``--capture``), a HAR file (ours, mitmproxy's or a
browser's) or a mitmproxy flow file (``-w`` / ``--capture-flows``). Each iLink API exchange is
replayed offline, in capture order, through the rules:

- rules without ``peer_state``: the addon's own rule selection (``matching.first_rule``) on the
  gateway's request and iLink's first answer, then the core the proxy runs (``policy.Exchange``,
  driven by ``peers.drive``) with the recorded re-issue answers;
- rules with ``peer_state``: the proxy's real ``PeerTracker`` on an in-memory state store, fed the
  captured ``getupdates`` answers, with a clock that follows the capture's timestamps and an
  "upstream" that answers each attempt with the answer iLink gave to the same kind of attempt
  (original token, fresh token, no token) in the capture.

When a decision needs an answer the capture does not hold (the live proxy never sent that
attempt, e.g. a capture made without the proxy, or with other rules), the exchange is reported
as ``unknown`` with what would have been sent. Not reproduced: deferred deliveries (they happen
outside any exchange), gateway timeouts and in-flight waits (the replay is sequential), and rule
conditions on fields the capture redacted (message text without --capture-bodies, secret values,
fields of intermediate answers other than ret/errcode/errmsg).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import connection, http, io
from mitmproxy.io.har import request_to_flow

from . import state as state_mod
from .capture import endpoint_of, is_api_flow, iso_time, request_facts
from .core import policy
from .core.model import Decision
from .har import CaptureError, facts_problem, journal_files, read_journal
from .jsonedit import get_path
from .matching import AnswerSummary, condition_holds, first_rule, parse_json_object
from .peers import drive
from .redact import redact_value
from .reissue import ReissueError
from .rules import Rule, RuleSet

UNKNOWN = "unknown"
_TOKEN_KINDS = ("original", "fresh", "none")


# --------------------------------------------------------------------------- captured exchanges


@dataclass
class Recorded:
    """One captured iLink API exchange: the gateway's request (as a flow, for rule filters), the
    upstream answers recorded for it, and what the live proxy decided (None: captured without)."""

    ts: float
    flow: http.HTTPFlow
    attempts: list[dict[str, Any]]
    live: str | None
    final_body: bytes | None = None  # the answer the gateway got, when it is an upstream answer

    @property
    def endpoint(self) -> str:
        return endpoint_of(self.flow.request.path)

    @property
    def request_doc(self) -> dict[str, Any] | None:
        try:
            return parse_json_object(self.flow.request.get_content(strict=True))
        except ValueError:
            return None


def _headers(pairs: list[Any]) -> http.Headers:
    return http.Headers(
        [(str(k).encode("utf-8", "replace"), str(v).encode("utf-8", "replace")) for k, v in pairs]
    )


def _body(part: dict[str, Any] | None) -> bytes:
    if not part:
        return b""
    if part.get("json") is not None:
        return json.dumps(part["json"], ensure_ascii=False).encode()
    return str(part.get("text") or "").encode()


def _flow(method: str, url: str, req_headers: list[Any], req_body: bytes, ts: float) -> http.HTTPFlow:
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=ts)
    flow = http.HTTPFlow(client, connection.Server(address=None))
    try:
        flow.request = http.Request.make(method, url, req_body, _headers(req_headers))
    except ValueError:
        # A request mitmproxy itself refused (e.g. both Transfer-Encoding and Content-Length) is
        # journaled with what it had, such as "://x:443/ilink/bot/sendmessage": no scheme or host
        # to parse. The rules only need the method and the path.
        flow.request = http.Request.make(method, "http://unknown/", req_body, _headers(req_headers))
        flow.request.path = "/" + url.split("://", 1)[-1].partition("/")[2]
    flow.request.timestamp_start = flow.request.timestamp_end = ts
    return flow


def from_journal_record(record: dict[str, Any]) -> Recorded | None:
    if "method" not in record or "url" not in record:
        return None  # an outbox event, not an exchange
    ts = float(record.get("ts") or 0.0)
    flow = _flow(record["method"], record["url"], (record.get("request") or {}).get("headers", []), b"", ts)
    flow.request.set_content(_body(record.get("request")))
    final_body = None
    if (resp := record.get("response")) is not None and record.get("status") is not None:
        final_body = _body(resp)
        flow.response = http.Response.make(
            int(record["status"]), final_body, _headers(resp.get("headers", []))
        )
        flow.response.timestamp_start = flow.response.timestamp_end = ts
    return Recorded(
        ts=ts,
        flow=flow,
        attempts=list(record.get("attempts") or []),
        live=record.get("decision"),
        final_body=final_body,
    )


def from_flow(flow: http.HTTPFlow, facts: dict[str, Any] | None) -> Recorded:
    """A flow from a flow file or HAR; `facts` are the proxy's (ours), or None (plain capture)."""
    ts = flow.request.timestamp_start
    final_body = None
    if flow.response is not None:
        try:
            final_body = flow.response.get_content(strict=True)
        except ValueError:
            final_body = None
    if facts:
        return Recorded(
            ts, flow, list(facts.get("attempts") or []), facts.get("decision") or "passed", final_body
        )
    # Captured without the proxy: the answer the gateway got is iLink's answer to its request.
    attempts = []
    if flow.response is not None:
        doc = flow_request_doc(flow)
        sent = _token_of(doc) is not None
        attempts.append(_attempt_of(flow.response.status_code, final_body, "original" if sent else "none"))
    return Recorded(ts, flow, attempts, None, final_body)


def flow_request_doc(flow: http.HTTPFlow) -> dict[str, Any] | None:
    try:
        return parse_json_object(flow.request.get_content(strict=True))
    except ValueError:
        return None


def _token_of(doc: dict[str, Any] | None) -> Any:
    return request_facts(doc)[2]


def _attempt_of(status: int, body: bytes | None, token: str) -> dict[str, Any]:
    s = AnswerSummary.of(status, body)
    return {
        "status": status,
        "ret": s.ret,
        "errcode": s.errcode,
        "errmsg": s.errmsg,
        "empty": s.empty,
        "token": token,
    }


def load_capture(path: Path) -> tuple[str, list[Recorded]]:
    """(what kind of capture it is, its iLink API exchanges in time order)."""
    if path.is_dir():
        files = journal_files(path)
        if not files:
            raise CaptureError(f"{path}: no journal in it (was the proxy run with --capture?)")
        kind, records = "journal", [r for r in map(from_journal_record, read_journal(files)) if r]
    elif not path.is_file():
        raise CaptureError(f"{path}: no such file or directory")
    else:
        kind, records = _load_file(path)
    records = [r for r in records if is_api_flow(r.flow)]
    records.sort(key=lambda r: r.ts)
    return kind, records


def _load_file(path: Path) -> tuple[str, list[Recorded]]:
    with open(path, "rb") as fh:
        head = fh.read(1).lstrip(b"\xef\xbb\xbf")
    if head == b"{":
        try:
            doc = json.loads(path.read_text("utf-8-sig"))
        except ValueError:
            doc = None  # several JSON objects: a journal (JSON lines)
        if isinstance(doc, dict) and isinstance(doc.get("log"), dict):
            entries = doc["log"].get("entries", [])
            if not isinstance(entries, list):
                raise CaptureError(f"{path}: not a HAR file (log.entries is not a list)")
            out = []
            for entry in entries:
                try:
                    flow = request_to_flow(entry)
                except Exception as e:  # mitmproxy's reader rejects the entry: say which one
                    raise CaptureError(f"{path}: unreadable HAR entry: {type(e).__name__}: {e}") from None
                facts = entry.get("_ilink_fixproxy")
                if problem := facts_problem(facts):
                    raise CaptureError(f"{path}: unreadable HAR entry: _ilink_fixproxy: {problem}")
                out.append(from_flow(flow, facts))
            return "HAR", out
        return "journal", [r for r in map(from_journal_record, read_journal([path])) if r]
    try:
        flows = io.read_flows_from_paths([str(path)])
    except Exception as e:
        raise CaptureError(f"{path}: not a journal, HAR or mitmproxy flow file ({e})") from None
    flows = [f for f in flows if isinstance(f, http.HTTPFlow)]
    for f in flows:
        if problem := facts_problem(f.metadata.get("ilink_fixproxy")):
            raise CaptureError(f"{path}: flow {f.id}: unreadable ilink_fixproxy metadata: {problem}")
    return "flows", [from_flow(f, f.metadata.get("ilink_fixproxy")) for f in flows]


# --------------------------------------------------------------------------- the upstream oracle


class Unknown(Exception):
    """The replay needs an upstream answer the capture does not hold."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"iLink's answer to a send with {_KIND_TEXT[kind]} is not in the capture")
        self.kind = kind


_KIND_TEXT = {"original": "the gateway's token", "fresh": "a fresh token", "none": "no token"}


@dataclass
class Oracle:
    """Answers attempts of one exchange from the answers recorded for the same kind of attempt."""

    recorded: Recorded
    token_path: tuple[str, ...] = ("msg", "context_token")
    used: Counter[str] = field(default_factory=Counter)

    def answer(self, kind: str) -> http.Response:
        """The next recorded answer to an attempt of `kind` (Unknown / ReissueError if none)."""
        same = [a for a in self.recorded.attempts if a.get("token") == kind]
        n = self.used[kind]
        if n >= len(same):
            raise Unknown(kind)
        self.used[kind] += 1
        a = same[n]
        if a.get("status") is None:
            raise ReissueError(str(a.get("error") or "the attempt failed"), sent=a.get("sent") is not False)
        return http.Response.make(int(a["status"]), self._body(a), {"Content-Type": "application/json"})

    def _body(self, a: dict[str, Any]) -> bytes:
        answered = [x for x in self.recorded.attempts if x.get("status") is not None]
        response = self.recorded.flow.response
        if (
            answered
            and a is answered[-1]
            and self.recorded.final_body is not None
            and response is not None
            and response.status_code == a["status"]
        ):
            return self.recorded.final_body  # the full answer the gateway got (redacted)
        if a.get("empty"):
            return b""
        doc = {k: a[k] for k in ("ret", "errcode", "errmsg") if a.get(k) is not None}
        return json.dumps(doc).encode()

    def kind_of(self, body: bytes, original: Any) -> str:
        doc = parse_json_object(body)
        present, token = get_path(doc, self.token_path) if doc else (False, None)
        if not present or token in (None, ""):
            return "none"
        return "original" if token == original else "fresh"


class OracleReissuer:
    """The replayed engine's upstream (a `ports.Upstream`): answers from the capture."""

    def __init__(self) -> None:
        self.oracle: Oracle | None = None
        self.original: Any = None
        self.client_id: Any = None
        self.client_id_path: tuple[str, ...] = ("msg", "client_id")

    async def send(
        self, request: http.Request, body: bytes, via: Any, timeout: float, max_bytes: int | None = None
    ) -> http.Response:
        oracle = self.oracle
        doc = parse_json_object(body)
        same_message = doc is not None and get_path(doc, self.client_id_path)[1] == self.client_id
        if oracle is None or not same_message:
            # e.g. a deferred delivery: not part of the exchange being replayed
            raise ReissueError("not replayed offline", sent=False)
        return oracle.answer(oracle.kind_of(body, self.original))


# --------------------------------------------------------------------------- replaying


@dataclass
class Explained:
    recorded: Recorded
    decision: str
    rule: str | None = None
    detail: str = ""
    # What iLink's answer (the one the gateway would be handed) says about delivery: confirmed,
    # unconfirmed, refused, failed; None: not a send a rule selects, or answered from memory
    delivery: str | None = None

    @property
    def agrees(self) -> bool | None:
        """Whether the replay matches the live decision (None: nothing live to compare with)."""
        live = self.recorded.live
        if live is None or live == "error" or self.decision == UNKNOWN:
            return None
        return live == self.decision


class Replay:
    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.reissuer = OracleReissuer()
        self.now = 0.0  # the capture's time of the record being replayed
        self.tracker: Any = None
        if ruleset.uses_peer_state:
            from .peers import PeerTracker

            # The proxy's own engine and core, with the capture's clock and the oracle upstream.
            self.tracker = PeerTracker(
                state_mod.StateStore(state_mod.MEMORY), self.reissuer, clock=lambda: self.now
            )

    async def explain(self, records: list[Recorded]) -> list[Explained]:
        out = []
        for r in records:
            self.now = r.ts
            try:
                out.append(await self.one(r))
            except Unknown as e:
                out.append(Explained(r, UNKNOWN, detail=str(e)))
        if self.tracker is not None:
            outbox = getattr(self.tracker, "outbox", None)
            if outbox is not None and hasattr(outbox, "aclose"):
                await outbox.aclose()
            await self.tracker.aclose()
        return out

    async def one(self, r: Recorded) -> Explained:
        flow = r.flow
        updates = self.ruleset.updates
        if updates is not None and updates.filter(flow):
            seen = (
                await self.tracker.observe_updates(flow) if self.tracker is not None and flow.response else 0
            )
            return Explained(r, "passed", detail=f"{seen} inbound message(s) seen" if seen else "")
        candidates = [rule for rule in self.ruleset.rules if rule.match.filter(flow)]
        if not candidates or flow.request.headers.get("content-encoding", "identity") != "identity":
            return self._passed(r)
        doc = r.request_doc
        if self.tracker is not None and doc is not None:
            for rule in (c for c in candidates if c.peer_state):
                if all(condition_holds(c, doc) for c in rule.match.request_match):
                    explained = await self._peer_state(r, rule, doc)
                    if explained is not None:
                        return explained
                    break
        return await self._stateless(r, candidates, doc)

    def _passed(self, r: Recorded) -> Explained:
        return Explained(r, "passed")

    async def _peer_state(self, r: Recorded, rule: Rule, doc: dict[str, Any]) -> Explained | None:
        assert rule.peer_state is not None
        oracle = Oracle(r, token_path=rule.action.remove)
        self.reissuer.oracle = oracle
        self.reissuer.original = get_path(doc, rule.action.remove)[1] or None
        self.reissuer.client_id = get_path(doc, rule.peer_state.client_id)[1]
        self.reissuer.client_id_path = rule.peer_state.client_id
        flow = r.flow.copy()
        flow.metadata = {}
        try:
            outcome = await self.tracker.handle(flow, rule, doc)
        finally:
            self.reissuer.oracle = None
        if outcome.response is None:
            return None  # live: mitmproxy forwarded it itself (fallback), then the plain rules applied
        note = outcome.response.headers.get("X-Ilink-Fixproxy", "")
        return Explained(r, outcome.decision, rule.name, note, outcome.delivery)

    async def _stateless(self, r: Recorded, candidates: list[Rule], doc: dict[str, Any] | None) -> Explained:
        """The rule without peer_state, as the addon runs it: the same core decides each
        re-issue (answered from the capture) and the outcome."""
        oracle = Oracle(r)
        sent = _token_of(doc)
        try:
            first = oracle.answer("original" if sent is not None else "none")
        except ReissueError:
            return Explained(r, "passed", detail="no answer from iLink")
        first_doc = parse_json_object(first.content)
        rule = first_rule(candidates, doc, first.status_code, first_doc)
        if rule is None or doc is None:
            # (every answer to a send a rule's filter selects is classified, as live)
            evidence = policy.delivery(first.status_code, first.content, first_doc)
            return Explained(r, "passed", delivery=evidence)
        oracle.token_path = rule.action.remove
        field_name = ".".join(rule.action.remove)
        x = policy.Exchange.forwarded(
            rule,
            policy.gateway_token(*get_path(doc, rule.action.remove)),
            r.flow.request.raw_content or b"",
            r.ts + rule.action.deadline_s,
            first.status_code,
            (),
            first.content,
            first_doc,
        )

        async def reissue(step: policy.Step) -> http.Response:
            return oracle.answer("none")  # (Unknown propagates: the answer is not in the capture)

        answers = await drive(x, x.next(self.now), reissue, [], lambda: self.now)
        c = x.conclude(self.now)
        decision, evidence = c.decision, c.delivery
        if decision is Decision.MATCHED:
            summary = AnswerSummary.of(first.status_code, first.content).short()
            return Explained(r, decision, rule.name, f"{summary}; not re-issued", evidence)
        if decision is Decision.REISSUE_FAILED:
            return Explained(r, decision, rule.name, f"re-issue without {field_name} failed", evidence)
        answer, body = answers[-1]
        now = AnswerSummary.of(answer.status_code, body).short()
        return Explained(r, decision, rule.name, f"re-issued without {field_name}: {now}", evidence)


def explain(records: list[Recorded], ruleset: RuleSet) -> list[Explained]:
    """Replay `records` through `ruleset` (quietly: the replayed tracker's log lines are not news)."""
    logger = logging.getLogger("ilink_fixproxy")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return asyncio.run(Replay(ruleset).explain(records))
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- printing


def _short(value: Any) -> str:
    """Ids and tokens as printed: hashes stay hashes, clear values are hashed."""
    if value in (None, ""):
        return "-"
    return str(redact_value(str(value)))


def first_answer(r: Recorded) -> str:
    if not r.attempts:
        return "(answered by the proxy)" if r.live else "(no answer)"
    a = r.attempts[0]
    if a.get("status") is None:
        return f"error: {a.get('error') or '?'}"
    s = AnswerSummary(
        status=int(a["status"]),
        ret=a.get("ret"),
        errcode=a.get("errcode"),
        errmsg=a.get("errmsg"),
        empty=bool(a.get("empty")),
    )
    return s.short()


def as_dict(e: Explained) -> dict[str, Any]:
    peer, client_id, token = request_facts(e.recorded.request_doc)
    return {
        "time": summarize_time(e.recorded.ts),
        "endpoint": e.recorded.endpoint,
        "peer": _short(peer) if peer else None,
        "client_id": client_id,
        "token": _short(token) if token else None,
        "first": first_answer(e.recorded),
        "would": e.decision,
        "rule": e.rule,
        "delivery": e.delivery,
        "detail": e.detail,
        "live": e.recorded.live,
        "agrees": e.agrees,
    }


def summarize_time(ts: float) -> str:
    return iso_time(ts) if ts else "-"


def render(kind: str, source: Path, ruleset: RuleSet, results: list[Explained]) -> str:
    lines = [
        f"{len(results)} iLink exchange(s) from {source} ({kind}); rules: {ruleset.source} "
        f"({len(ruleset.rules)} rule(s){', peer state' if ruleset.uses_peer_state else ''})",
        "",
    ]
    rows = [as_dict(e) for e in results]
    header = (
        "time",
        "endpoint",
        "peer",
        "client_id",
        "token",
        "iLink first said",
        "would",
        "delivery",
        "live",
    )
    table = [header] + [
        (
            r["time"],
            r["endpoint"],
            r["peer"] or "-",
            str(r["client_id"] or "-"),
            r["token"] or "-",
            r["first"],
            r["would"] + (f" ({r['rule']})" if r["rule"] else ""),
            r["delivery"] or "-",
            "-" if r["live"] is None else r["live"] + ("" if r["agrees"] is not False else "  <- differs"),
        )
        for r in rows
    ]
    lines += _columns(table)
    unknown = [r for r in rows if r["would"] == UNKNOWN]
    for r in unknown[:5]:
        lines.append(f"  {r['time']} {r['endpoint']}: unknown: {r['detail']}")

    counts = Counter(r["would"] for r in rows)
    live_counts = Counter(r["live"] for r in rows if r["live"] is not None)
    agree = Counter(r["would"] for r in rows if r["agrees"])
    lines += ["", "summary:"]
    summary = [("decision", "would", "live", "agree")]
    for decision in sorted(set(counts) | set(live_counts)):
        summary.append((decision, str(counts[decision]), str(live_counts[decision]), str(agree[decision])))
    lines += _columns(summary)
    compared = [r for r in rows if r["agrees"] is not None]
    if compared:
        same = sum(1 for r in compared if r["agrees"])
        lines += [
            "",
            f"{same} of {len(compared)} exchange(s) with a live decision replay to the same decision.",
        ]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]

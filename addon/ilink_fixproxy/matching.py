"""Pure decisions: does a request qualify for a rule, is an answer a failure the rule repairs.

Everything here works on bytes and parsed JSON, never on sockets, so the addon's hooks can stay
short and these functions can be tested exhaustively (including with hypothesis).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mitmproxy import flowfilter

from .jsonedit import get_path
from .rules import Condition, Equals, Match, Missing, Regex, Rule


def parse_json_object(body: bytes | None) -> dict[str, Any] | None:
    """The body as a JSON object, or None for an empty, non-JSON or non-object body."""
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


# Filter parts whose verdict depends only on the request line (method, host, URL).
_LINE_ONLY_TESTS = (flowfilter.FMethod, flowfilter.FUrl, flowfilter.FDomain)


def request_line_only(f: Any) -> bool:
    """The flow filter's verdict depends on nothing but the request's method, host and URL, so
    it may be remembered per (method, host, URL) instead of evaluated for every flow."""
    if isinstance(f, flowfilter.FAnd | flowfilter.FOr):
        return all(request_line_only(part) for part in f.lst)
    if isinstance(f, flowfilter.FNot):
        return request_line_only(f.itm)
    return isinstance(f, _LINE_ONLY_TESTS)


def condition_holds(condition: Condition, doc: dict[str, Any]) -> bool:
    present, value = get_path(doc, condition.path)
    for alt in condition.alternatives:
        if isinstance(alt, Missing):
            if not present or value is None:
                return True
        elif isinstance(alt, Regex):
            if present and isinstance(value, str) and alt.pattern.search(value):
                return True
        elif isinstance(alt, Equals) and present and _same_scalar(alt.value, value):
            return True
    return False


def _same_scalar(expected: Any, actual: Any) -> bool:
    # Type-strict on booleans: in Python True == 1, but a rule saying `ret: 1` must not match
    # `"ret": true`, and `flag: true` must not match `"flag": 1`.
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected == actual
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return expected == actual
    return type(expected) is type(actual) and expected == actual


def carries(doc: dict[str, Any], path: tuple[str, ...]) -> bool:
    """The request carries a usable value at path: present, not null, not an empty string."""
    present, value = get_path(doc, path)
    return present and value is not None and value != ""


def request_qualifies(match: Match, request_doc: dict[str, Any] | None) -> bool:
    if request_doc is None:
        return False
    return all(carries(request_doc, p) for p in match.request_has) and all(
        condition_holds(c, request_doc) for c in match.request_match
    )


def answer_is_failure(match: Match, status: int, response_doc: dict[str, Any] | None) -> bool:
    """The answer is one the rule repairs: an allowed status and any response_any group holds."""
    if status not in match.response_status or response_doc is None:
        return False
    return any(all(condition_holds(c, response_doc) for c in group) for group in match.response_any)


@dataclass(frozen=True)
class AnswerSummary:
    """What an upstream answer said, for logs, headers and flow comments (no secrets in it)."""

    status: int
    ret: Any = None
    errcode: Any = None
    errmsg: Any = None
    empty: bool = False
    json: bool = True

    @classmethod
    def of(cls, status: int, body: bytes | None) -> AnswerSummary:
        if not body:
            return cls(status=status, empty=True)
        doc = parse_json_object(body)
        if doc is None:
            return cls(status=status, json=False)
        return cls(
            status=status,
            ret=doc.get("ret"),
            errcode=doc.get("errcode"),
            errmsg=doc.get("errmsg", doc.get("msg")),
        )

    def short(self) -> str:
        """e.g. `200 ret=-2 errmsg="prepare failed"`; ASCII only so it fits an HTTP header."""
        parts = [str(self.status)]
        if self.empty:
            parts.append("empty body")
        elif not self.json:
            parts.append("non-JSON body")
        else:
            if self.ret is not None:
                parts.append(f"ret={_ascii(self.ret)}")
            if self.errcode is not None:
                parts.append(f"errcode={_ascii(self.errcode)}")
            if self.errmsg is not None:
                parts.append(f"errmsg={json.dumps(str(self.errmsg)[:80])}")
            if len(parts) == 1:
                parts.append("ok")
        return " ".join(parts)


def _ascii(value: Any) -> str:
    return json.dumps(value)[:40]


def first_rule(
    rules: tuple[Rule, ...] | list[Rule],
    request_doc: dict[str, Any] | None,
    status: int,
    response_doc: dict[str, Any] | None,
) -> Rule | None:
    """The first rule (already selected by its flow filter) whose conditions all hold."""
    for rule in rules:
        if request_qualifies(rule.match, request_doc) and answer_is_failure(rule.match, status, response_doc):
            return rule
    return None

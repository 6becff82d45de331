"""Pure decisions: which requests qualify and which answers are failures a rule repairs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ilink_fixproxy import rules
from ilink_fixproxy.matching import (
    AnswerSummary,
    answer_is_failure,
    carries,
    first_rule,
    parse_json_object,
    request_line_only,
    request_qualifies,
)
from mitmproxy import flowfilter

DEFAULT = rules.load_default().rules[0]

# Every stale shape in ilink-protocol.md §3.1, as iLink (or hermes' logs) showed them.
STALE_ANSWERS = [
    b'{"ret":-2}',
    b'{"ret":-2,"errmsg":""}',
    b'{"ret":-2,"errmsg":null}',
    b'{"ret":-2,"errmsg":"unknown error"}',
    b'{"ret":-2,"errmsg":"prepare failed"}',
    b'{"ret":-2,"errmsg":"rate limited"}',
    b'{"ret":-2,"errcode":0,"errmsg":""}',
    b'{"errcode":-14,"errmsg":"session timeout"}',
    b'{"ret":-14}',
    b'{"errcode":-2}',
    '{"ret":-2,"errmsg":"会话已过期"}'.encode(),
]

NOT_STALE_ANSWERS = [
    b"",
    b"{}",
    b'{"ret":0}',
    b'{"message_id":7489534892789344264}',
    b'{"ret":-1}',
    b'{"ret":"-2"}',
    b'{"ret":-2.5}',
    b"not json",
    b"[-2]",
    b'{"ret":true}',
]


def send(token: object = "tok", **extra: object) -> dict:
    msg = {"to_user_id": "u", **extra}
    if token is not ...:
        msg["context_token"] = token
    return {"msg": msg}


@pytest.mark.parametrize("body", STALE_ANSWERS)
def test_every_stale_shape_is_a_failure(body: bytes):
    assert answer_is_failure(DEFAULT.match, 200, parse_json_object(body))


@pytest.mark.parametrize("body", NOT_STALE_ANSWERS)
def test_success_and_other_errors_are_not(body: bytes):
    assert not answer_is_failure(DEFAULT.match, 200, parse_json_object(body))


@pytest.mark.parametrize("status", [201, 400, 500, 502])
def test_only_http_200_answers_count(status: int):
    assert not answer_is_failure(DEFAULT.match, status, {"ret": -2})


@pytest.mark.parametrize("token", ["tok", "x" * 500])
def test_request_with_a_token_qualifies(token: str):
    assert request_qualifies(DEFAULT.match, send(token))


@pytest.mark.parametrize("doc", [send(...), send(None), send(""), {"msg": "x"}, {}, None])
def test_request_without_a_usable_token_never_qualifies(doc):
    assert not request_qualifies(DEFAULT.match, doc)


def test_conditions_are_type_strict_and_regex_only_matches_strings():
    rs = rules.parse(
        "version: 1\nrules:\n  - name: r\n    match:\n      filter: '~q'\n"
        "      request_match: {msg.flag: true}\n"
        "      response_any: [{errmsg: {regex: 'prepare'}}, {ret: 1}]\n"
        "    action: {remove: msg.context_token}\n"
    )
    m = rs.rules[0].match
    assert request_qualifies(m, send(flag=True))
    assert not request_qualifies(m, send(flag=1))
    assert answer_is_failure(m, 200, {"errmsg": "xx prepare failed"})
    assert not answer_is_failure(m, 200, {"errmsg": 5})
    assert answer_is_failure(m, 200, {"ret": 1})
    assert answer_is_failure(m, 200, {"ret": 1.0})
    assert not answer_is_failure(m, 200, {"ret": True})


def test_null_condition_matches_missing_or_null():
    rs = rules.parse(
        "version: 1\nrules:\n  - name: r\n    match:\n      filter: '~q'\n"
        "      response_any: [{ret: -2, errmsg: [null, '']}]\n"
        "    action: {remove: msg.context_token}\n"
    )
    m = rs.rules[0].match
    assert answer_is_failure(m, 200, {"ret": -2})
    assert answer_is_failure(m, 200, {"ret": -2, "errmsg": None})
    assert answer_is_failure(m, 200, {"ret": -2, "errmsg": ""})
    assert not answer_is_failure(m, 200, {"ret": -2, "errmsg": "prepare failed"})


def test_first_rule_needs_both_request_and_answer():
    assert first_rule([DEFAULT], send(), 200, {"ret": -2}) is DEFAULT
    assert first_rule([DEFAULT], send(...), 200, {"ret": -2}) is None
    assert first_rule([DEFAULT], send(), 200, {}) is None


def test_carries_treats_empty_and_null_as_absent():
    assert carries({"a": {"b": 0}}, ("a", "b"))
    assert not carries({"a": {"b": ""}}, ("a", "b"))
    assert not carries({"a": {"b": None}}, ("a", "b"))
    assert not carries({"a": 1}, ("a", "b"))


def test_answer_summary_is_short_and_ascii():
    s = AnswerSummary.of(200, '{"ret":-2,"errmsg":"会话\\n过期 prepare"}'.encode())
    text = s.short()
    assert text.startswith('200 ret=-2 errmsg="')
    assert text.isascii() and "\n" not in text
    assert AnswerSummary.of(200, b"").short() == "200 empty body"
    assert AnswerSummary.of(200, b"{}").short() == "200 ok"
    assert AnswerSummary.of(502, b"<html>").short() == "502 non-JSON body"
    assert AnswerSummary.of(200, b'{"errcode":-14,"msg":"x"}').short() == '200 errcode=-14 errmsg="x"'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@given(request=json_values, answer=json_values, status=st.integers(100, 599))
def test_decisions_never_raise_on_arbitrary_json(request, answer, status):
    req = request if isinstance(request, dict) else None
    ans = parse_json_object(json.dumps(answer).encode())
    result = first_rule([DEFAULT], req, status, ans)
    assert result is None or (status == 200 and isinstance(ans, dict))


@pytest.mark.parametrize(
    ("expression", "line_only"),
    [
        ("~m POST & ~u /ilink/bot/sendmessage", True),
        ("~d ilinkai.weixin.qq.com & !(~u getupdates | ~m GET)", True),
        ("/ilink/bot/sendmessage", True),
        ("~u sendmessage & ~h X-Test", False),  # headers differ between flows on one URL
        ("~u sendmessage & ~b context_token", False),
        ("~q & ~u sendmessage", False),  # depends on whether an answer is there yet
        ("~u sendmessage | ~s", False),
    ],
)
def test_which_filters_depend_only_on_the_request_line(expression: str, line_only: bool):
    assert request_line_only(flowfilter.parse(expression)) is line_only

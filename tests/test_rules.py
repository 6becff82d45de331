"""rules.yaml parsing: the shipped rules, the accepted shapes, and every error message's location."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from ilink_fixproxy import rules
from ilink_fixproxy.rules import Equals, Missing, Regex, RulesError

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> rules.RuleSet:
    return rules.parse(textwrap.dedent(text), "test.yaml")


def error_of(text: str) -> str:
    with pytest.raises(RulesError) as e:
        parse(text)
    return str(e.value)


BASE = """\
version: 1
hosts: [ilinkai.weixin.qq.com]
rules:
  - name: r
    match:
      filter: "~m POST & ~u /ilink/bot/sendmessage"
      response_any:
        - {{ret: -2}}
    action:
      remove: msg.context_token
{extra}"""


def test_repo_rules_file_is_the_packaged_default():
    # The repo-root rules.yaml is what `ilink-fixproxy` picks up when run from a checkout; it
    # must say the same as the rules packaged into the wheel.
    assert (ROOT / "rules.yaml").read_text() == rules.default_rules_text()


def test_default_rules_repair_every_stale_shape():
    rs = rules.load_default()
    assert rs.hosts == ("ilinkai.weixin.qq.com",)
    (rule,) = rs.rules
    assert rule.action.remove == ("msg", "context_token")
    assert rule.action.retries == 1
    assert rule.action.deadline_s == 10
    assert rule.match.request_has == (("msg", "context_token"),)
    assert rule.match.response_status == (200,)
    shapes = {(c.path, c.alternatives) for group in rule.match.response_any for c in group}
    for field in ("ret", "errcode"):
        for code in (-2, -14):
            assert ((field,), (Equals(code),)) in shapes


def test_defaults_when_optional_keys_are_absent():
    rs = parse(BASE.format(extra=""))
    (rule,) = rs.rules
    assert rule.action.retries == 1
    assert rule.action.deadline_s == 10.0
    assert rule.match.response_status == (200,)
    # the removed field is always required in the request, even when request_has is not given
    assert rule.match.request_has == (("msg", "context_token"),)
    assert rule.line == 4


def test_field_condition_shapes():
    rs = parse("""\
        version: 1
        rules:
          - name: shapes
            match:
              filter: "~u sendmessage"
              request_has: [msg.to_user_id]
              request_match: {msg.message_type: [1, 2]}
              response_status: [200, 500]
              response_any:
                - {ret: -2, errmsg: null}
                - {errmsg: {regex: "^prepare"}}
                - {ok: true, name: "x", ratio: 1.5}
            action: {remove: msg.context_token, retries: 2, deadline_s: 2.5}
        """)
    (rule,) = rs.rules
    m = rule.match
    assert m.request_has == (("msg", "to_user_id"), ("msg", "context_token"))
    assert m.request_match[0].alternatives == (Equals(1), Equals(2))
    assert m.response_status == (200, 500)
    first, second, third = m.response_any
    assert first[1].alternatives == (Missing(),)
    assert isinstance(second[0].alternatives[0], Regex)
    assert [c.alternatives[0] for c in third] == [Equals(True), Equals("x"), Equals(1.5)]
    assert rule.action.retries == 2 and rule.action.deadline_s == 2.5
    assert rs.hosts == ()


def test_unconfirmed_is_report_unless_the_rule_says_fail():
    assert parse(BASE.format(extra="")).rules[0].action.unconfirmed == "report"
    rs = parse(BASE.format(extra="      unconfirmed: fail\n"))
    assert rs.rules[0].action.unconfirmed == "fail"
    assert "answered as a failure" in rules.describe(rs)


@pytest.mark.parametrize(
    ("extra", "where", "expected"),
    [
        ("      retries: 9\n", "rule 'r'.action.retries", "expected a whole number from 0 to 3"),
        ("      retries: true\n", "rule 'r'.action.retries", "expected a whole number"),
        ("      deadline_s: 0\n", "rule 'r'.action.deadline_s", "more than 0"),
        ("      deadline_s: 61\n", "rule 'r'.action.deadline_s", "at most 60"),
        ("      remov: x\n", "rule 'r'.action", "unknown key 'remov'"),
        ("      unconfirmed: drop\n", "rule 'r'.action.unconfirmed", "'drop' is not one of: report, fail"),
        ("      unconfirmed: [fail]\n", "rule 'r'.action.unconfirmed", "expected a non-empty string"),
        ("      retries: 1\n      retries: 1\n", "rule 'r'.action", "duplicate key 'retries'"),
        ("", "rule 'r'.action", "-"),
    ],
)
def test_action_errors_name_line_and_fix(extra: str, where: str, expected: str):
    if expected == "-":  # the valid baseline: proves the cases above fail only for their line
        parse(BASE.format(extra=extra))
        return
    msg = error_of(BASE.format(extra=extra))
    line = 12 if "duplicate" in expected else 11
    assert msg.startswith(f"test.yaml:{line}:"), msg
    assert where in msg and expected in msg


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~m POST & (', response_any: [{ret: -2}]}\n"
            "    action: {remove: a.b}\n",
            4,
            "not a valid mitmproxy flow filter",
        ),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_any: [{errmsg: {regex: '(('}}]}\n"
            "    action: {remove: a.b}\n",
            4,
            "invalid regular expression",
        ),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_any: []}\n"
            "    action: {remove: a.b}\n",
            4,
            "at least one condition",
        ),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_any: [{ret: [1, [2]]}]}\n"
            "    action: {remove: a.b}\n",
            4,
            "expected a value",
        ),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_any: [{ret: -2}]}\n"
            "    action: {remove: 'a..b'}\n",
            5,
            "dotted JSON path",
        ),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_any: [{ret: -2}], extra: 1}\n"
            "    action: {remove: a.b}\n",
            4,
            "unknown key 'extra'",
        ),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_any: [{ret: -2}]}\n",
            3,
            "missing required key 'action'",
        ),
        ("version: 2\nrules: []\n", 1, "expected a whole number from 1 to 1"),
        ("version: 1\nhosts: ['https://x.y/']\nrules: []\n", 2, "is not a hostname"),
        ("version: 1\nhosts: x\nrules: []\n", 2, "expected a list of hostnames"),
        ("version: 1\nrules: {}\n", 2, "expected a list of rules"),
        ("version: 1\nrules: []\nrule: []\n", 3, "unknown key 'rule'"),
        (
            "version: 1\nrules:\n  - name: r\n    match: {filter: '~q', response_status: 700, response_any: [{a: 1}]}\n"
            "    action: {remove: a.b}\n",
            4,
            "from 100 to 599",
        ),
        ("version: 1\nrules: [\n", 3, "not valid YAML"),
    ],
)
def test_errors_point_at_the_line(text: str, line: int, expected: str):
    msg = error_of(text)
    assert re.match(rf"test\.yaml:{line}:\d+: ", msg), msg
    assert expected in msg


def test_duplicate_rule_names_are_rejected():
    text = BASE.format(extra="") + (
        "  - name: r\n    match: {filter: '~q', response_any: [{ret: -2}]}\n    action: {remove: x}\n"
    )
    msg = error_of(text)
    assert "test.yaml:11:" in msg and "used twice" in msg and "line 4" in msg


def test_empty_and_non_mapping_files():
    assert "the file is empty" in error_of("")
    assert "expected a mapping" in error_of("- 1\n- 2\n")


def test_missing_file_is_a_rules_error(tmp_path: Path):
    with pytest.raises(RulesError, match="rules file not found"):
        rules.load_file(tmp_path / "nope.yaml")
    with pytest.raises(RulesError, match="is a directory"):
        rules.load_file(tmp_path)


def test_host_patterns_match_host_and_port_only():
    exact, wildcard = rules.host_patterns(["ilinkai.weixin.qq.com", "*.weixin.qq.com"])
    assert re.search(exact, "ilinkai.weixin.qq.com:443")
    assert not re.search(exact, "evilinkai.weixin.qq.com:443")
    assert not re.search(exact, "ilinkai.weixin.qq.com.evil.com:443")
    assert re.search(wildcard, "a.b.weixin.qq.com:443")
    assert not re.search(wildcard, "weixin.qq.com:443")


def test_describe_says_what_each_rule_does():
    text = rules.describe(rules.load_default())
    assert "1 rule" in text
    assert "ret = -2" in text and "errcode = -14" in text
    assert "re-issue it without msg.context_token, once, within 10 s" in text
    assert "ilinkai.weixin.qq.com" in text


def test_peer_state_defaults_and_overrides():
    from ilink_fixproxy.rules import Cooldown, PeerState

    rs = parse(BASE.format(extra="") + "    peer_state:\n")
    assert rs.rules[0].peer_state == PeerState()
    assert rs.updates is not None and rs.updates.filter_expr == rules.DEFAULT_UPDATES_FILTER
    rs = parse(
        BASE.format(extra="")
        + "    peer_state:\n      on_closed: pass-through\n      substitute_fresh: false\n"
        "      max_attempts: 3\n      cooldown: {after: 5}\n      peer: msg.to\n"
    )
    ps = rs.rules[0].peer_state
    assert ps.on_closed == "pass-through" and not ps.substitute_fresh and ps.max_attempts == 3
    assert ps.cooldown == Cooldown(after=5) and ps.peer == ("msg", "to")


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("      on_closed: drop\n", "'drop' is not one of: answer-locally, pass-through"),
        ("      remember_stale: yes please\n", "expected true or false"),
        ("      closed_for_s: -1\n", "expected seconds"),
        ("      max_attempts: 9\n", "from 1 to 5"),
        ("      cooldown: {after: 0}\n", "from 1 to 1000"),
        ("      cooldown: {later: 1}\n", "unknown key 'later'"),
        ("      colour: red\n", "unknown key 'colour'"),
    ],
)
def test_peer_state_errors_name_the_line(block: str, expected: str):
    msg = error_of(BASE.format(extra="") + "    peer_state:\n" + block)
    assert msg.startswith("test.yaml:12:"), msg
    assert expected in msg


def test_updates_filter_is_validated():
    msg = error_of("version: 1\nupdates: {filter: '~u ('}\nrules: []\n")
    assert msg.startswith("test.yaml:2:") and "not a valid mitmproxy flow filter" in msg


def test_shipped_rules_use_peer_state():
    (rule,) = rules.load_default().rules
    assert rule.peer_state is not None and rule.peer_state.on_closed == "answer-locally"
    assert "peer state" in rules.describe(rules.load_default())


# Rules files that used to escape as RecursionError / ValueError (issue 13, item 7), or stall the
# proxy's event loop for minutes inside mitmproxy's filter parser.
_ONE_RULE = (
    "version: 1\nrules:\n  - name: r\n    match: {{filter: {filter}, response_any: [{{ret: {ret}}}]}}\n"
    "    action: {{remove: msg.context_token, retries: {retries}}}\n"
)
_HOSTILE = {
    "nested": ("version: 1\nrules: " + "[" * 5000 + "]" * 5000 + "\n", 2, "nested more than 32 levels"),
    "long integer": (
        _ONE_RULE.format(filter="'~q'", ret=-2, retries="9" * 5000),
        5,
        "retries: cannot read this value",
    ),
    "long integer in a condition": (
        _ONE_RULE.format(filter="'~q'", ret="9" * 5000, retries=1),
        4,
        "ret: cannot read this value",
    ),
    "deep filter": (
        _ONE_RULE.format(filter="'" + "(" * 5000 + "~q" + ")" * 5000 + "'", ret=-2, retries=1),
        4,
        "too many nested parentheses",
    ),
    "slow filter": (_ONE_RULE.format(filter="'((((((~q))))))'", ret=-2, retries=1), 4, "write it flatter"),
    "slow negation": (
        _ONE_RULE.format(filter="'" + "!" * 16 + "~q'", ret=-2, retries=1),
        4,
        "write it flatter",
    ),
}


@pytest.mark.parametrize("name", list(_HOSTILE))
def test_hostile_files_are_one_rules_error_with_the_line(name: str):
    text, line, expected = _HOSTILE[name]
    msg = error_of(text)
    assert re.match(rf"test\.yaml:{line}:\d+: ", msg), msg
    assert expected in msg and "\n" not in msg and len(msg) < 400


def test_real_filters_with_parentheses_and_negation_still_load():
    for expr in ("!(~m POST & !(~u a | ~u b))", '~m POST & ~u "^/ilink/bot/(sendmessage|sendtyping)$"'):
        assert (
            parse(_ONE_RULE.format(filter=repr(expr), ret=-2, retries=1)).rules[0].match.filter_expr == expr
        )


def test_budget_and_nudge_defaults_and_shapes():
    ps = parse(BASE.format(extra="    peer_state:\n")).rules[0].peer_state
    assert ps is not None and ps.budget == rules.Budget("auto", 3600.0) and ps.nudge is None
    text = BASE.format(
        extra="    peer_state:\n      budget: {per_inbound: 10, reprobe_s: 60}\n"
        '      nudge: {text: "还剩一条消息: 回复任意内容即可", when_left: 2, after_s: 79200}\n'
    )
    rs = parse(text)
    ps = rs.rules[0].peer_state
    assert ps is not None and ps.budget == rules.Budget(10, 60.0)
    assert ps.nudge == rules.Nudge("还剩一条消息: 回复任意内容即可", 2, 79200.0)
    described = rules.describe(rs)
    assert "at most 10 sends per inbound message" in described and "carries the nudge" in described
    assert "回复" not in described  # the operator's text is not repeated
    off = parse(BASE.format(extra="    peer_state:\n      budget: {per_inbound: off}\n"))
    assert off.rules[0].peer_state.budget.on is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "where", "expected"),
    [
        (
            "budget: {per_inbound: some}",
            "peer_state.budget.per_inbound",
            "expected auto, off or a whole number",
        ),
        ("budget: {per_inbound: 0}", "peer_state.budget.per_inbound", "from 1 to 1000"),
        ("budget: {per_inbound: true}", "peer_state.budget.per_inbound", "expected auto, off or a whole"),
        ("budget: {per_inbound: auto, reprobe_s: 0}", "peer_state.budget.reprobe_s", "more than 0"),
        ("budget: {limit: 3}", "peer_state.budget", "unknown key 'limit'"),
        ("budget: 10", "peer_state.budget", "expected a mapping"),
        ("nudge: {when_left: 1}", "peer_state.nudge", "missing required key 'text'"),
        ("nudge: {text: ''}", "peer_state.nudge.text", "expected a non-empty string"),
        ("nudge: {text: hi, when_left: -1}", "peer_state.nudge.when_left", "from 0 to 1000"),
        ("nudge: {text: hi, after_s: 0}", "peer_state.nudge.after_s", "more than 0"),
        (f"nudge: {{text: {'x' * 501}}}", "peer_state.nudge.text", "at most 500 characters"),
        ("budget: {per_inbound: auto}", "", "-"),
    ],
)
def test_budget_and_nudge_errors_name_line_and_fix(extra: str, where: str, expected: str):
    text = BASE.format(extra=f"    peer_state:\n      {extra}\n")
    if expected == "-":  # the valid baseline: proves the cases above fail only for their line
        parse(text)
        return
    msg = error_of(text)
    assert msg.startswith("test.yaml:12:"), msg
    assert where in msg and expected in msg

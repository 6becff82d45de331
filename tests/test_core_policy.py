"""The pure core in memory, in milliseconds: every decision of the message state machine."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from ilink_fixproxy import rules as rules_mod
from ilink_fixproxy.core import policy
from ilink_fixproxy.core.model import (
    BeginAttempt,
    BudgetView,
    CloseWindow,
    Cooling,
    CountRateLimit,
    CountSend,
    Decision,
    Defer,
    Delivery,
    Go,
    LearnBudget,
    LocalAnswer,
    MarkStale,
    MessageRecord,
    MessageState,
    OpenWindow,
    SettleMessage,
    Snapshot,
    SpendBudget,
    StartCooldown,
    StoredAnswer,
    Verdict,
    Window,
)

RULE = rules_mod.load_default().rules[0]
STALE = b'{"ret":-2,"errmsg":"prepare failed"}'
NOW = 1_000_000.0
EMPTY = Snapshot()


def rule(**peer_state: object) -> rules_mod.Rule:
    assert RULE.peer_state is not None
    return dataclasses.replace(RULE, peer_state=dataclasses.replace(RULE.peer_state, **peer_state))


def body(token: object = "tok") -> bytes:
    msg: dict[str, object] = {"to_user_id": "p", "client_id": "c"}
    if token is not None:
        msg["context_token"] = token
    return json.dumps({"msg": msg}).encode()


def settled(effects) -> MessageRecord:
    return next(e.record for e in effects if isinstance(e, SettleMessage))


# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("status", "content", "verdict"),
    [
        (200, b"{}", Verdict.SUCCESS),
        (200, b"", Verdict.SUCCESS),
        (200, b'{"ret":0}', Verdict.SUCCESS),
        (200, b'{"message_id":7}', Verdict.SUCCESS),
        (200, STALE, Verdict.REFUSED),
        (200, b'{"errcode":-14}', Verdict.REFUSED),
        (200, b'{"ret":-1}', Verdict.TRANSIENT),
        (200, b'{"ret":true}', Verdict.TRANSIENT),
        (200, b"<html>", Verdict.TRANSIENT),
        (200, None, Verdict.TRANSIENT),  # undecodable
        (503, b"{}", Verdict.TRANSIENT),
        (500, b"", Verdict.TRANSIENT),
        (429, b'{"ret":0}', Verdict.TRANSIENT),
        (502, b"<html>bad gateway</html>", Verdict.TRANSIENT),
    ],
)
def test_only_a_200_json_success_is_a_success(status, content, verdict):
    doc = json.loads(content) if content and content.startswith(b"{") else None
    assert policy.classify(RULE, status, content, doc) is verdict


# ---------------------------------------------------------------- the gate


def test_only_an_accepted_message_is_replayed():
    answer = StoredAnswer(200, (("Content-Type", "application/json"),), b"{}")
    g = policy.gate(Snapshot(message=MessageRecord(MessageState.ACCEPTED, 1, answer)), RULE, NOW)
    assert isinstance(g, LocalAnswer) and g.decision is Decision.REPLAYED and g.body == b"{}"
    for state in (MessageState.TRANSIENT, MessageState.REFUSED, MessageState.UNKNOWN, MessageState.IN_FLIGHT):
        g = policy.gate(Snapshot(message=MessageRecord(state, 1, answer)), RULE, NOW)
        assert g == Go(prior=1), state


def test_attempts_used_answers_locally_even_when_the_outcome_is_unknown():
    g = policy.gate(Snapshot(message=MessageRecord(MessageState.UNKNOWN, 2)), RULE, NOW)
    assert isinstance(g, LocalAnswer) and g.status == 502 and "reason=attempts-used" in g.note
    assert "answer=unknown" in g.note
    refused = StoredAnswer(200, (), STALE)
    g = policy.gate(Snapshot(message=MessageRecord(MessageState.REFUSED, 2, refused)), RULE, NOW)
    assert isinstance(g, LocalAnswer) and g.body == STALE and g.decision is Decision.ANSWERED_LOCALLY
    # a crash left it in flight: after a restart it is an unknown outcome like any other
    g = policy.gate(Snapshot(message=MessageRecord(MessageState.IN_FLIGHT, 2)), RULE, NOW)
    assert isinstance(g, LocalAnswer) and "reason=attempts-used" in g.note


def test_cooldown_window_and_queue():
    g = policy.gate(Snapshot(cooldown=Cooling(NOW + 60, 200, STALE)), RULE, NOW)
    assert isinstance(g, LocalAnswer) and "cooling-down" in g.note
    closed = Window(NOW + 60, 200, STALE)
    g = policy.gate(Snapshot(window=closed), RULE, NOW)
    assert isinstance(g, LocalAnswer) and "window-closed" in g.note
    assert policy.gate(Snapshot(window=closed), rule(on_closed="defer"), NOW) == Defer((200, STALE))
    assert policy.gate(Snapshot(window=Window(NOW - 1, 200, STALE)), RULE, NOW) == Go(prior=0)
    assert policy.gate(Snapshot(queued=True), RULE, NOW) == Defer(None)


# ---------------------------------------------------------------- the exchange


def exchange(
    snap: Snapshot = EMPTY, *, token: str | None = "tok", original: bytes | None = None, r=RULE, prior=0
):
    return policy.Exchange(
        r, snap, prior, token, original if original is not None else body(token), "p", NOW + 10
    )


def test_a_stale_answer_is_repaired_without_the_token_and_the_token_remembered():
    x = exchange()
    first = x.first()
    assert first.token == "tok" and first.body == body("tok") and first.effects == (BeginAttempt(),)
    x.answered(200, (), STALE, json.loads(STALE))
    second = x.next(NOW)
    assert second is not None and second.token is None and b"context_token" not in second.body
    assert second.timeout == 10
    x.answered(200, (), b"{}", {})
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.REPAIRED and c.kinds == ("original", "none")
    assert MarkStale("tok") in c.effects and OpenWindow() in c.effects
    assert settled(c.effects) == MessageRecord(MessageState.ACCEPTED, 2, StoredAnswer(200, (), b"{}"))


def test_a_retry_never_exceeds_max_attempts():
    x = exchange(prior=1)  # one attempt already used by an earlier try
    x.first()
    x.answered(200, (), STALE, json.loads(STALE))
    assert x.next(NOW) is None  # max_attempts 2: no re-issue
    c = x.conclude(NOW)
    assert c.decision is Decision.RATE_LIMITED and settled(c.effects).attempts == 2


def test_a_tokenless_refusal_closes_the_window_and_a_tokenless_send_counts_a_rate_limit():
    x = exchange()
    x.first()
    x.answered(200, (), STALE, json.loads(STALE))
    assert x.next(NOW) is not None
    x.answered(200, (), STALE, json.loads(STALE))
    c = x.conclude(NOW)
    assert c.decision is Decision.WINDOW_CLOSED and CloseWindow(NOW + 3600, 200, STALE) in c.effects
    y = exchange(token=None)
    y.first()
    y.answered(200, (), STALE, json.loads(STALE))
    assert y.next(NOW) is None
    c = y.conclude(NOW)
    assert c.decision is Decision.RATE_LIMITED and CountRateLimit(600) in c.effects
    assert policy.after_rate_limit(RULE, 3, 200, STALE, NOW) == (
        Decision.COOLDOWN_STARTED,
        StartCooldown(NOW + 900, 200, STALE),
    )
    assert policy.after_rate_limit(RULE, 2, 200, STALE, NOW) == (Decision.RATE_LIMITED, None)


@pytest.mark.parametrize("encode", [lambda b: b"\xef\xbb\xbf" + b, lambda b: b.decode().encode("utf-16")])
def test_a_body_that_cannot_be_edited_is_never_reissued_with_its_token(encode):
    x = exchange(original=encode(body("tok")))
    x.first()
    x.answered(200, (), STALE, json.loads(STALE))
    assert x.next(NOW) is None and x.uneditable
    c = x.conclude(NOW)
    assert c.decision is Decision.MATCHED
    assert not any(isinstance(e, CloseWindow | CountRateLimit) for e in c.effects)
    assert settled(c.effects).state is MessageState.REFUSED


def test_a_lost_answer_is_an_unknown_outcome_that_counts():
    x = exchange(token=None)
    x.first()
    x.lost(True, "connection reset")
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.UPSTREAM_FAILED and c.final is None
    assert settled(c.effects) == MessageRecord(MessageState.UNKNOWN, 1)
    y = exchange(token=None)
    y.first()
    y.lost(False, "connection refused")
    assert y.conclude(NOW).decision is Decision.FALLBACK  # mitmproxy forwards it: still counted
    assert settled(y.conclude(NOW).effects).attempts == 1


def test_a_reissue_whose_answer_is_lost_leaves_the_message_unknown():
    x = exchange()
    x.first()
    x.answered(200, (), STALE, json.loads(STALE))
    assert x.next(NOW) is not None
    x.lost(True, "no answer within 9.0 s")
    c = x.conclude(NOW)
    assert c.decision is Decision.REISSUE_FAILED and c.final is not None and c.final.body == STALE
    assert settled(c.effects).state is MessageState.UNKNOWN and settled(c.effects).attempts == 2
    assert not any(isinstance(e, MarkStale | CloseWindow | CountRateLimit) for e in c.effects)


def test_a_reissue_answered_5xx_leaves_the_message_transient():
    x = exchange()
    x.first()
    x.answered(200, (), STALE, json.loads(STALE))
    x.next(NOW)
    x.answered(503, (), b"busy", None)
    c = x.conclude(NOW)
    assert c.decision is Decision.REISSUE_FAILED and settled(c.effects).state is MessageState.TRANSIENT


def test_a_transient_first_answer_is_handed_back_and_not_accepted():
    x = exchange(token=None)
    x.first()
    x.answered(503, (), b"{}", {})
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.PASSED and settled(c.effects).state is MessageState.TRANSIENT
    assert not any(isinstance(e, OpenWindow | MarkStale) for e in c.effects)


def test_no_reissue_after_the_deadline():
    x = exchange()
    x.first()
    x.answered(200, (), STALE, json.loads(STALE))
    assert x.next(NOW + 11) is None  # not even begun: no attempt counted for it
    c = x.conclude(NOW)
    assert c.decision is Decision.REISSUE_FAILED and x.errors == ["no time left before the deadline"]
    assert settled(c.effects) == MessageRecord(MessageState.REFUSED, 1, StoredAnswer(200, (), STALE))


def test_fresh_and_stale_tokens_choose_the_first_attempt():
    x = exchange(Snapshot(fresh="new"))
    step = x.first()
    assert step.token == "new" and x.first_decision is Decision.SUBSTITUTED and b'"new"' in step.body
    y = exchange(Snapshot(original_stale=True))
    step = y.first()
    assert step.token is None and y.first_decision is Decision.STRIPPED
    # the body cannot be edited: sent as it came, not called "stripped"
    z = exchange(Snapshot(original_stale=True), original=b"\xef\xbb\xbf" + body("tok"))
    assert z.first().token == "tok" and z.first_decision is Decision.PASSED


# ---------------------------------------------------------------- purity


CORE = Path(__file__).resolve().parent.parent / "addon" / "ilink_fixproxy" / "core"
FORBIDDEN = (
    "sqlite3",
    "asyncio",
    "time",
    "socket",
    "ssl",
    "httpx",
    "httpcore",
    "mitmproxy.proxy",
    "mitmproxy.net",
)


@pytest.mark.parametrize("module", sorted(p.name for p in CORE.glob("*.py")))
def test_the_core_imports_no_io(module: str):
    tree = ast.parse((CORE / module).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not [n for n in names if n.split(".")[0] in FORBIDDEN or n.startswith(FORBIDDEN)]


# ---------------------------------------------------------------- the rule without peer_state


PLAIN = dataclasses.replace(RULE, peer_state=None)
OK = b'{"ret":0}'


def plain(retries: int = 1, *, original: bytes | None = None, first: bytes = STALE) -> policy.Exchange:
    """mitmproxy forwarded the send and iLink answered `first`."""
    r = dataclasses.replace(PLAIN, action=dataclasses.replace(PLAIN.action, retries=retries))
    original = original if original is not None else body("tok")
    return policy.Exchange.forwarded(r, "tok", original, NOW + 10, 200, (), first, json.loads(first))


def test_without_peer_state_a_refusal_is_reissued_without_the_token_and_nothing_is_stored():
    x = plain()
    step = x.next(NOW)
    assert step is not None and step.token is None and step.kind == "none"
    assert step.body == body(None) and step.timeout == 10
    assert step.effects == ()  # no store: no attempt to begin
    x.answered(200, (), OK, json.loads(OK))
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.REPAIRED and c.effects == () and x.reissues == 1
    assert c.final is not None and c.final.body == OK and c.kinds == ("original", "none")


def test_without_peer_state_a_refused_reissue_is_repeated_up_to_retries_then_still_failing():
    x = plain(retries=3)
    for _ in range(3):
        step = x.next(NOW)
        assert step is not None and step.token is None
        x.answered(200, (), STALE, json.loads(STALE))
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.STILL_FAILING and x.reissues == 3 and c.final.body == STALE


def test_without_peer_state_retries_0_or_a_body_it_cannot_edit_is_only_matched():
    x = plain(retries=0)
    assert x.next(NOW) is None and x.conclude(NOW).decision is Decision.MATCHED
    y = plain(original=b"\xef\xbb\xbf" + body("tok"))
    assert y.next(NOW) is None and y.uneditable
    assert y.conclude(NOW).decision is Decision.MATCHED and y.reissues == 0


def test_without_peer_state_a_reissue_that_may_have_delivered_is_never_followed_by_another():
    x = plain(retries=3)
    assert x.next(NOW) is not None
    x.lost(True, "connection reset")  # it may have reached iLink, and been delivered
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.REISSUE_FAILED and x.errors == ["connection reset"]
    assert c.final is not None and c.final.body == STALE  # the caller keeps iLink's first answer


def test_without_peer_state_a_reissue_that_never_left_leaves_the_next_its_turn():
    x = plain(retries=2)
    assert x.next(NOW) is not None
    x.lost(False, "connection refused")  # certainly not sent
    assert x.next(NOW) is not None
    x.answered(200, (), OK, json.loads(OK))
    assert x.conclude(NOW).decision is Decision.REPAIRED and x.reissues == 2


@pytest.mark.parametrize(
    ("status", "content", "error"),
    [
        (503, b'{"errmsg":"busy"}', "answer was HTTP 503"),
        (200, b"<html>", "answer was not a JSON object"),
        (200, None, "answer body could not be decoded"),
    ],
)
def test_without_peer_state_an_unusable_reissue_answer_keeps_the_first_and_ends_it(status, content, error):
    x = plain(retries=3)
    assert x.next(NOW) is not None
    x.answered(status, (), content, None)
    assert x.next(NOW) is None  # it reached iLink: nothing says it was not delivered
    c = x.conclude(NOW)
    assert c.decision is Decision.REISSUE_FAILED and x.errors == [error] and c.final.body == STALE


def test_without_peer_state_an_empty_200_or_another_answer_than_the_failure_is_handed_back():
    for content in (b"", b'{"ret":-1}'):
        x = plain()
        assert x.next(NOW) is not None
        x.answered(200, (), content, json.loads(content) if content else None)
        c = x.conclude(NOW)
        assert c.decision is Decision.REPAIRED and c.final.body == content


def test_without_peer_state_a_refusal_then_a_lost_reissue_hands_back_the_refusal():
    x = plain(retries=3)
    x.next(NOW)
    x.answered(200, (), STALE, json.loads(STALE))
    x.next(NOW)
    x.lost(True, "connection reset")
    assert x.next(NOW) is None
    c = x.conclude(NOW)
    assert c.decision is Decision.STILL_FAILING and x.reissues == 2 and len(x.tried) == 2


def test_without_peer_state_no_reissue_after_the_deadline():
    x = plain()
    assert x.next(NOW + 10) is None
    assert x.conclude(NOW + 10).decision is Decision.REISSUE_FAILED
    assert x.errors == ["no time left before the deadline"]


@pytest.mark.parametrize(
    ("present", "value", "token"),
    [
        (True, "tok", "tok"),
        (True, "", None),
        (True, None, None),
        (False, None, None),
        (True, 12345, "12345"),
        (True, {"b": 1, "a": [2]}, '{"a":[2],"b":1}'),
    ],
)
def test_a_token_that_is_not_a_string_is_still_a_token(present, value, token):
    assert policy.gateway_token(present, value) == token


# ---------------------------------------------------------------- delivery evidence

BIG_ID = b'{"ret":0,"message_id":7489534892789345001}'


@pytest.mark.parametrize(
    ("status", "content", "evidence"),
    [
        (200, BIG_ID, Delivery.CONFIRMED),
        (200, b'{"ret":0,"errcode":0,"message_id":"7489534892789345001"}', Delivery.CONFIRMED),
        (200, b'{"message_id":12}', Delivery.CONFIRMED),  # ret absent
        (200, b"", Delivery.UNCONFIRMED),
        (200, b"{}", Delivery.UNCONFIRMED),
        (200, b'{"ret":0}', Delivery.UNCONFIRMED),
        (200, b'{"ret":0,"message_id":""}', Delivery.UNCONFIRMED),
        (200, b'{"ret":0,"message_id":null}', Delivery.UNCONFIRMED),
        (200, b'{"ret":0,"message_id":true}', Delivery.UNCONFIRMED),
        (200, b'{"ret":-2,"message_id":1}', Delivery.REFUSED),
        (200, b'{"errcode":-14}', Delivery.REFUSED),
        (200, b'{"ret":false}', Delivery.REFUSED),
        (200, b"<html>", Delivery.REFUSED),
        (200, b"[]", Delivery.REFUSED),
        (503, b'{"ret":0,"message_id":1}', Delivery.REFUSED),
        (204, b"", Delivery.REFUSED),
        (200, None, Delivery.REFUSED),  # undecodable
    ],
)
def test_every_answer_is_classified_by_its_evidence_of_delivery(status, content, evidence):
    doc = policy._object(content) if content else None
    assert policy.delivery(status, content, doc) is evidence


def test_classification_never_converts_the_message_id():
    # (a float would turn ...345001 into ...344960: presence is all that is read)
    doc = json.loads(BIG_ID)
    assert (
        policy.delivery(200, BIG_ID, doc) is Delivery.CONFIRMED and doc["message_id"] == 7489534892789345001
    )


def unconfirmed_rule(mode: str, **peer_state: object) -> rules_mod.Rule:
    r = rule(**peer_state) if peer_state else RULE
    return dataclasses.replace(r, action=dataclasses.replace(r.action, unconfirmed=mode))


def test_report_keeps_an_unconfirmed_send_accepted_and_its_answer_as_it_came():
    x = exchange(r=unconfirmed_rule("report"))
    x.first()
    x.answered(200, (), b'{"ret":0}', {"ret": 0})
    c = x.conclude(NOW)
    assert c.decision is Decision.PASSED and c.delivery is Delivery.UNCONFIRMED and c.replaced is None
    assert settled(c.effects) == MessageRecord(MessageState.ACCEPTED, 1, StoredAnswer(200, (), b'{"ret":0}'))
    # a retry is answered from memory (never a second upstream send), still said to be unconfirmed
    g = policy.gate(Snapshot(message=settled(c.effects)), x.rule, NOW)
    assert isinstance(g, LocalAnswer) and g.decision is Decision.REPLAYED and g.body == b'{"ret":0}'
    assert g.note.endswith("; delivery=unconfirmed; handed=as-is")


def test_fail_answers_an_unconfirmed_send_as_a_failure_and_lets_a_retry_go_up_to_max_attempts():
    r = unconfirmed_rule("fail")
    x = exchange(r=r)
    x.first()
    x.answered(200, (), b"", None)
    c = x.conclude(NOW)
    failure = StoredAnswer(200, policy.JSON, policy.UNCONFIRMED_FAILURE)
    assert c.delivery is Delivery.UNCONFIRMED and c.replaced == failure
    assert json.loads(failure.body) == {"ret": -1, "errmsg": policy.UNCONFIRMED_ERRMSG}
    record = settled(c.effects)
    assert record == MessageRecord(MessageState.TRANSIENT, 1, failure)  # not accepted: no replay
    assert OpenWindow() in c.effects  # iLink did not refuse the token
    # the gateway's retry goes upstream again (its one attempt left) ...
    g = policy.gate(Snapshot(message=record), r, NOW)
    assert g == Go(prior=1)
    # ... and once max_attempts are used, it is answered with the same failure, locally
    used = MessageRecord(MessageState.TRANSIENT, 2, failure)
    g = policy.gate(Snapshot(message=used), r, NOW)
    assert isinstance(g, LocalAnswer) and g.decision is Decision.ANSWERED_LOCALLY and g.body == failure.body


def test_a_confirmed_send_is_never_replaced_and_a_lost_one_is_failed():
    x = exchange(r=unconfirmed_rule("fail"))
    x.first()
    x.answered(200, (), BIG_ID, json.loads(BIG_ID))
    c = x.conclude(NOW)
    assert c.delivery is Delivery.CONFIRMED and c.replaced is None
    assert settled(c.effects).state is MessageState.ACCEPTED
    x = exchange()
    x.first()
    x.lost(True, "reset")
    assert x.conclude(NOW).delivery is Delivery.FAILED
    x = exchange()
    x.first()
    x.lost(False, "refused to connect")  # mitmproxy forwards it: its own answer is classified
    assert x.conclude(NOW).delivery is None


def test_without_peer_state_an_unconfirmed_repair_is_replaced_under_fail():
    r = dataclasses.replace(unconfirmed_rule("fail"), peer_state=None)
    x = policy.Exchange.forwarded(r, "tok", body("tok"), NOW + 10, 200, (), STALE, json.loads(STALE))
    step = x.next(NOW)
    assert step is not None and step.token is None
    x.answered(200, (), b'{"ret":0}', {"ret": 0})
    c = x.conclude(NOW)
    assert c.decision is Decision.REPAIRED and c.delivery is Delivery.UNCONFIRMED
    assert c.replaced is not None and c.replaced.body == policy.UNCONFIRMED_FAILURE


# ---------------------------------------------------------------- send budget and window keeper

OK = b'{"ret":0,"message_id":7489534892789345001}'


def window(used: int = 0, limit: int | None = None, **kw: object) -> BudgetView:
    return BudgetView(inbound_at=NOW - 100, used=used, limit=limit, **kw)  # type: ignore[arg-type]


def budget_rule(per_inbound: object = "auto", nudge: rules_mod.Nudge | None = None, **peer_state: object):
    return rule(budget=rules_mod.Budget(per_inbound=per_inbound), nudge=nudge, **peer_state)  # type: ignore[arg-type]


def sent_newest(b: BudgetView, r, answer: bytes, *, probe: bool = False, nudge: str | None = None, text="hi"):
    """One send carrying the peer's newest token, answered `answer`."""
    original = json.dumps(
        {
            "msg": {
                "to_user_id": "p",
                "context_token": "tok",
                "item_list": [{"type": 1, "text_item": {"text": text}}],
            }
        }
    ).encode()
    x = policy.Exchange(r, Snapshot(budget=b), 0, "tok", original, "p", NOW + 10, probe=probe, nudge=nudge)
    step = x.first()
    x.answered(200, (), answer, json.loads(answer))
    return x, step


def test_an_accepted_send_is_counted_against_the_window():
    x, _ = sent_newest(window(3, 10, learnt_at=NOW - 5, newest=True), budget_rule(), OK)
    c = x.conclude(NOW)
    assert CountSend(10) in c.effects and not any(isinstance(e, LearnBudget) for e in c.effects)
    # not counted without a window (no inbound seen), nor with budget: off
    y = exchange()
    y.first()
    y.answered(200, (), OK, json.loads(OK))
    assert not any(isinstance(e, CountSend) for e in y.conclude(NOW).effects)
    z, _ = sent_newest(window(3, newest=True), budget_rule("off"), OK)
    assert not any(isinstance(e, CountSend) for e in z.conclude(NOW).effects)


def test_auto_learns_the_budget_from_the_first_refusal_of_the_newest_token_and_never_reissues():
    x, _ = sent_newest(window(10, newest=True), budget_rule(), STALE)
    assert x.next(NOW) is None  # no tokenless re-issue: it would be refused too (a longer penalty)
    c = x.conclude(NOW)
    assert c.decision is Decision.BUDGET_SPENT
    assert SpendBudget() in c.effects and LearnBudget(10, "learnt") in c.effects
    # an exhausted budget, not a rate limit: no cooldown, and the window is not closed either
    assert not any(isinstance(e, CountRateLimit | CloseWindow) for e in c.effects)
    assert settled(c.effects).state is MessageState.REFUSED
    # a given limit is never learnt, only spent
    y, _ = sent_newest(window(4, 5, newest=True), budget_rule(5), STALE)
    assert y.next(NOW) is None
    c = y.conclude(NOW)
    assert c.decision is Decision.BUDGET_SPENT and SpendBudget() in c.effects
    assert not any(isinstance(e, LearnBudget) for e in c.effects)


def test_a_refusal_before_any_accepted_send_or_with_an_old_token_is_not_a_budget():
    x, _ = sent_newest(window(0, newest=True), budget_rule(), STALE)  # nothing accepted yet
    assert x.next(NOW) is not None  # a stale token as before: re-issued without it
    y, _ = sent_newest(window(5), budget_rule(), STALE)  # the gateway's token is not the newest
    assert y.next(NOW) is not None
    # ... but a fresh one substituted for it is the newest
    b = window(5)
    snap = Snapshot(budget=b, fresh="fresh-tok")
    z = policy.Exchange(budget_rule(), snap, 0, "old", body("old"), "p", NOW + 10)
    assert z.first().token == "fresh-tok"
    z.answered(200, (), STALE, json.loads(STALE))
    assert z.next(NOW) is None and z.conclude(NOW).decision is Decision.BUDGET_SPENT


def test_a_spent_budget_holds_sends_per_on_closed():
    spent = Snapshot(budget=window(10, 10, learnt_at=NOW - 5))
    g = policy.gate(spent, budget_rule(), NOW)
    assert isinstance(g, LocalAnswer) and g.decision is Decision.BUDGET_HELD
    assert json.loads(g.body)["ret"] == -2 and "used=10; limit=10; window-age=100s" in g.note
    d = policy.gate(spent, budget_rule(on_closed="defer"), NOW)
    assert isinstance(d, Defer) and d.reason == "budget-spent"
    assert isinstance(policy.gate(spent, budget_rule(on_closed="pass-through"), NOW), Go)
    assert isinstance(policy.gate(spent, budget_rule("off"), NOW), Go)
    refused = Snapshot(budget=window(3, refused=True))  # iLink said so, whatever the count
    assert isinstance(policy.gate(refused, budget_rule(), NOW), LocalAnswer)
    assert policy.gate(Snapshot(budget=window(9, 10)), budget_rule(), NOW) == Go(prior=0)
    assert policy.gate(Snapshot(budget=window(50)), budget_rule(), NOW) == Go(prior=0)  # unknown


def test_a_learnt_budget_is_reprobed_after_a_while_and_raised_when_iLink_accepts_more():
    old = window(10, 10, learnt_at=NOW - 3600)
    assert policy.gate(Snapshot(budget=old), budget_rule(), NOW) == Go(prior=0, probe=True)
    # never a probe of a given limit, nor after iLink refused in this window
    assert isinstance(policy.gate(Snapshot(budget=window(5, 5)), budget_rule(5), NOW), LocalAnswer)
    refused = window(10, 10, learnt_at=NOW - 3600, refused=True)
    assert isinstance(policy.gate(Snapshot(budget=refused), budget_rule(), NOW), LocalAnswer)
    x, _ = sent_newest(dataclasses.replace(old, newest=True), budget_rule(), OK, probe=True)
    c = x.conclude(NOW)
    assert CountSend(11) in c.effects and LearnBudget(11, "raised") in c.effects
    y, _ = sent_newest(dataclasses.replace(old, newest=True), budget_rule(), STALE, probe=True)
    assert y.next(NOW) is None
    c = y.conclude(NOW)
    assert c.decision is Decision.BUDGET_SPENT and LearnBudget(10, "confirmed") in c.effects


def test_the_nudge_goes_once_per_window_on_the_send_that_leaves_when_left():
    n = rules_mod.Nudge(text="还剩一条消息请回复任意内容", when_left=1)
    r = budget_rule(nudge=n)
    assert policy.nudge_text(window(7, 10, learnt_at=NOW), r.peer_state, NOW) is None  # leaves 2
    assert policy.gate(Snapshot(budget=window(8, 10, learnt_at=NOW)), r, NOW) == Go(prior=0, nudge=n.text)
    assert policy.nudge_text(window(8, 10, nudged=True), r.peer_state, NOW) is None  # once
    assert policy.nudge_text(window(8), r.peer_state, NOW) is None  # budget not known
    late = budget_rule(nudge=rules_mod.Nudge(text="ping", when_left=1, after_s=60))
    assert policy.nudge_text(window(0), late.peer_state, NOW) == "ping"  # the window is 100 s old
    x, step = sent_newest(window(8, 10, newest=True), r, OK, nudge=n.text, text="报告\u4e2d")
    doc = json.loads(step.body)
    assert doc["msg"]["item_list"][0]["text_item"]["text"] == "报告中\n" + n.text
    assert x.nudged and CountSend(10, nudged=True) in x.conclude(NOW).effects


def test_no_nudge_on_a_send_without_a_text_item():
    image = json.dumps({"msg": {"to_user_id": "p", "item_list": [{"type": 2, "image_item": {}}]}}).encode()
    x = policy.Exchange(
        budget_rule(), Snapshot(budget=window(8, 10)), 0, None, image, "p", NOW + 10, nudge="x"
    )
    assert x.first().body == image and not x.nudged
    x.answered(200, (), OK, json.loads(OK))
    assert CountSend(10, nudged=False) in x.conclude(NOW).effects  # the next send gets it

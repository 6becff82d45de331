"""The decisions for one message, as functions of (snapshot, answer, now) -> (decision, effects).

`gate` decides whether a send goes upstream at all; an `Exchange` then says which token each
attempt carries, classifies each answer and concludes. Nothing here reads a clock, a socket or
the store: the engine passes `now` in and applies the effects it gets back. The invariants these
functions keep are listed in docs/architecture.md ("One delivery per message").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..jsonedit import append_line, remove_member, replace_value
from ..matching import AnswerSummary, answer_is_failure
from ..rules import PeerState, Rule
from .model import (
    BeginAttempt,
    BudgetView,
    CloseWindow,
    CountRateLimit,
    CountSend,
    Decision,
    Defer,
    Delivery,
    Effect,
    Gate,
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
)

TEXT_PLAIN = (("Content-Type", "text/plain"),)
JSON = (("Content-Type", "application/json"),)
# What the gateway gets for an unconfirmed send under `unconfirmed: fail`: HTTP 200 so that it
# reads the body, and ret -1 because both gateways treat a non-zero ret as a failed send
# (openclaw-weixin throws on a truthy ret other than 0, hermes on ret != 0) and -1 is the code
# iLink uses for a generic failure, not one the rules take for a stale token (-14, -2).
UNCONFIRMED_ERRMSG = (
    "ilink-fixproxy: iLink accepted the send without a message_id: not delivered (unconfirmed)"
)
# Where a sendmessage body keeps its items (ilink-protocol.md §1): the nudge goes into the last
# text item's text.
NUDGE_ITEMS = ("msg", "item_list")
UNCONFIRMED_FAILURE = json.dumps({"ret": -1, "errmsg": UNCONFIRMED_ERRMSG}, separators=(",", ":")).encode()


def _zero(value: Any) -> bool:
    # `"ret": 0` or no ret at all is success; `true`/`false` are not numbers here.
    return value is None or (not isinstance(value, bool) and isinstance(value, int | float) and value == 0)


def classify(rule: Rule, status: int, content: bytes | None, doc: dict[str, Any] | None) -> Verdict:
    """What an answer means. `content` is the decoded body, None if it could not be decoded.

    Success is only what iLink says on delivery: HTTP 200 with an empty body or a JSON object
    whose ret and errcode are 0 or absent. The rule's failure answer is a refusal; anything else
    (5xx, 429, HTML, `{"ret":-1}`) is transient: nothing says it was delivered, so it is never
    replayed as accepted, and nothing says it was not, so it still counts as an attempt."""
    if answer_is_failure(rule.match, status, doc):
        return Verdict.REFUSED
    delivered = not content or (doc is not None and _zero(doc.get("ret")) and _zero(doc.get("errcode")))
    if status == 200 and content is not None and delivered:
        return Verdict.SUCCESS
    return Verdict.TRANSIENT


def delivery(status: int, content: bytes | None, doc: dict[str, Any] | None) -> Delivery:
    """What a sendmessage answer says about delivery. `content` is the decoded body (None: it
    could not be decoded), `doc` the body as a JSON object. Only a message_id is evidence: an
    accepted send without one (empty body, `{}`, `{"ret":0}`) is unconfirmed. The message_id
    is only tested for presence, never converted (a uint64 would lose digits as a float)."""
    if status != 200 or content is None:
        return Delivery.REFUSED
    if not content:
        return Delivery.UNCONFIRMED
    if doc is None or not (_zero(doc.get("ret")) and _zero(doc.get("errcode"))):
        return Delivery.REFUSED
    mid = doc.get("message_id")
    if (isinstance(mid, str) and mid) or (isinstance(mid, int) and not isinstance(mid, bool)):
        return Delivery.CONFIRMED
    return Delivery.UNCONFIRMED


def delivery_note(rule: Rule) -> str:
    """The tail of the X-Ilink-Fixproxy header on an unconfirmed answer: after the decision's own
    note, or after `unconfirmed; rule=NAME` when the proxy had nothing else to say."""
    handed = "failure" if rule.action.unconfirmed == "fail" else "as-is"
    return f"delivery=unconfirmed; handed={handed}"


def budget_refusal(b: BudgetView) -> bytes:
    """What the gateway gets for a send held because the peer's budget is spent: ret -2, what
    iLink itself answers a send beyond the budget, so gateways treat it as the failure it is."""
    count = f"{b.used} of {b.limit}" if b.limit is not None and not b.refused else f"{b.used}"
    errmsg = (
        f"ilink-fixproxy: the peer's send budget is spent ({count} sends since it last wrote); "
        "not sent to iLink until the peer writes again"
    )
    return json.dumps({"ret": -2, "errmsg": errmsg}, separators=(",", ":")).encode()


def probe_due(b: BudgetView, ps: PeerState, now: float) -> bool:
    """A learnt limit reached (not refused by iLink in this window), learnt long enough ago:
    one real send goes, so a budget that rose is found (see README "Send budget")."""
    return b.learnt_at is not None and not b.refused and now - b.learnt_at >= ps.budget.reprobe_s


def nudge_text(b: BudgetView | None, ps: PeerState, now: float) -> str | None:
    """The window keeper's text if this send is the window's one to carry it (it may still not,
    when the send has no text item: then the next send of the window is)."""
    n = ps.nudge
    if n is None or b is None or b.nudged:
        return None
    left = b.left()
    if left is not None and ps.budget.on and left - 1 <= n.when_left:
        return n.text
    if n.after_s is not None and now - b.inbound_at >= n.after_s:
        return n.text
    return None


def gate(snap: Snapshot, rule: Rule, now: float) -> Gate:
    """Answer from memory, defer, or go upstream (and with how many attempts already used)."""
    ps = _ps(rule)
    if snap.queued:
        return Defer(None)
    m = snap.message
    if m is not None:
        if m.state is MessageState.ACCEPTED and m.answer is not None:
            note = f"replayed; rule={rule.name}; iLink already accepted this client_id"
            body = m.answer.body
            if delivery(m.answer.status, body, _object(body)) is Delivery.UNCONFIRMED:
                note += "; delivery=unconfirmed; handed=as-is"  # (a `fail` send is not accepted)
            return LocalAnswer(Decision.REPLAYED, m.answer.status, m.answer.body, note, m.answer.headers)
        if m.attempts >= ps.max_attempts:
            # An attempt whose outcome is unknown is still an attempt: never one more.
            if m.answer is None:
                note = (
                    f"answered-locally; reason=attempts-used; rule={rule.name}; "
                    f"attempts={m.attempts}; answer=unknown"
                )
                body = (
                    f"ilink-fixproxy: this client_id already used its {m.attempts} upstream attempt(s) "
                    "and the outcome of the last is unknown; not sent again"
                ).encode()
                return LocalAnswer(Decision.ANSWERED_LOCALLY, 502, body, note, TEXT_PLAIN)
            note = (
                f"answered-locally; reason=attempts-used; rule={rule.name}; "
                f"attempts={m.attempts}; answer={AnswerSummary.of(m.answer.status, m.answer.body).short()}"
            )
            return LocalAnswer(
                Decision.ANSWERED_LOCALLY, m.answer.status, m.answer.body, note, m.answer.headers
            )
    if (c := snap.cooldown) is not None:
        note = f"answered-locally; reason=cooling-down; rule={rule.name}; for={c.until - now:.0f}s"
        return LocalAnswer(Decision.ANSWERED_LOCALLY, c.status, c.body, note)
    w = snap.window
    if w is not None and w.closed_until and w.closed_until > now and w.status is not None:
        if ps.on_closed == "defer":
            return Defer((w.status, w.body or b""))
        note = (
            f"answered-locally; reason=window-closed; rule={rule.name}; "
            f"until-inbound-or={w.closed_until - now:.0f}s"
        )
        return LocalAnswer(Decision.ANSWERED_LOCALLY, w.status, w.body or b"", note)
    prior = m.attempts if m is not None else 0
    b = snap.budget
    if b is not None and ps.budget.on and ps.on_closed != "pass-through" and b.left() == 0:
        if probe_due(b, ps, now):
            return Go(prior=prior, probe=True)
        body = budget_refusal(b)
        if ps.on_closed == "defer":
            return Defer((200, body), reason="budget-spent")
        note = (
            f"budget-held; rule={rule.name}; used={b.used}; limit={b.limit if b.limit is not None else '-'}; "
            f"window-age={now - b.inbound_at:.0f}s"
        )
        return LocalAnswer(Decision.BUDGET_HELD, 200, body, note)
    return Go(prior=prior, nudge=nudge_text(b, ps, now))


def after_rate_limit(
    rule: Rule, limited: int, status: int, body: bytes, now: float
) -> tuple[Decision, Effect | None]:
    """`limited` genuine rate-limit answers within the window (this one included): cool down?"""
    ps = _ps(rule)
    if limited >= ps.cooldown.after:
        return Decision.COOLDOWN_STARTED, StartCooldown(now + ps.cooldown.for_s, status, body)
    return Decision.RATE_LIMITED, None


def gateway_token(present: bool, value: Any) -> str | None:
    """The gateway's context_token: a string, None when absent, null or "", and for any other
    value (a number, an object, an array) its JSON text: a token that is there but invalid, to be
    repaired like a stale one, never taken for "no token" (that would count as a rate limit)."""
    if isinstance(value, str):
        return value or None
    if not present or value is None:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def token_kind(token: str | None, original: str | None) -> str:
    if token is None:
        return "none"
    return "original" if token == original else "fresh"


@dataclass(frozen=True)
class Step:
    """One upstream attempt to make: with which token and body, and how long it may take
    (None: the first attempt, which stands in for mitmproxy's own forwarding)."""

    token: str | None
    body: bytes
    kind: str
    timeout: float | None
    effects: tuple[Effect, ...] = (BeginAttempt(),)


@dataclass(frozen=True)
class Tried:
    """An attempt that brought back an answer the caller may be handed."""

    token: str | None
    verdict: Verdict
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    doc: dict[str, Any] | None
    delivery: Delivery = Delivery.REFUSED


@dataclass(frozen=True)
class Conclusion:
    decision: Decision
    final: Tried | None  # None: no answer to hand back (upstream failed, or fallback)
    effects: tuple[Effect, ...]
    kinds: tuple[str, ...]  # the token kind of each answered attempt, for the header and log
    # What iLink's final answer says about delivery (None: fallback, mitmproxy forwards it)
    delivery: Delivery | None = None
    # Under `unconfirmed: fail`, the answer the gateway gets instead of iLink's (None: iLink's)
    replaced: StoredAnswer | None = None


@dataclass
class Exchange:
    """One send's upstream exchange, as a state machine: `first()`, then `answered`/`lost` for
    each attempt, `next(now)` for the re-issue (None: done), then `conclude(now)`.

    The same machine serves both kinds of rule. With `peer_state` the engine makes every
    attempt, reads a snapshot before and applies the effects after. Without it (`forwarded`)
    mitmproxy made the first attempt and there is no store: an empty snapshot, no effects, and
    each re-issue goes without the token (up to `retries` of them)."""

    rule: Rule
    snap: Snapshot
    prior: int  # attempts used by earlier tries of this message
    token: str | None  # the gateway's token (a non-string one as its JSON text), None: none
    original: bytes
    peer: str | None
    deadline: float
    made: int = 0  # attempts begun (counted when sent, not when answered)
    tried: list[Tried] = field(default_factory=list)
    tokens_sent: list[str | None] = field(default_factory=list)
    first_decision: Decision = Decision.PASSED
    fallback: bool = False  # the first attempt could not connect: mitmproxy forwards it
    unknown: bool = False  # an attempt was sent and its answer lost
    reissue_failed: bool = False
    reissue_transient: bool = False
    uneditable: bool = False  # the tokenless body could not be built: no re-issue
    errors: list[str] = field(default_factory=list)
    probe: bool = False  # a send beyond a learnt budget (Go.probe)
    nudge: str | None = None  # the window keeper's text to append (Go.nudge)
    nudged: bool = False  # ... and it was: the body sent carries it
    budget_spent: bool = False  # refused with the newest token after accepted sends: no re-issue

    @classmethod
    def forwarded(
        cls,
        rule: Rule,
        token: str | None,
        original: bytes,
        deadline: float,
        status: int,
        headers: tuple[tuple[str, str], ...],
        content: bytes | None,
        doc: dict[str, Any] | None,
    ) -> Exchange:
        """The rule without peer_state: mitmproxy forwarded the first attempt and got this answer."""
        x = cls(rule, Snapshot(), 0, token, original, None, deadline)
        x.made, x.tokens_sent = 1, [token]
        x.answered(status, headers, content, doc)
        return x

    @property
    def stateless(self) -> bool:
        return self.rule.peer_state is None

    def first(self) -> Step:
        ps = _ps(self.rule)
        path = self.rule.action.remove
        if self.nudge and (nudged := append_line(self.original, NUDGE_ITEMS, self.nudge)) is not None:
            # Every attempt of this send carries it (re-issues are built from `original`).
            self.original, self.nudged = nudged, True
        if self.token is not None:
            fresh = self.snap.fresh if ps.substitute_fresh else None
            if (
                fresh
                and fresh != self.token
                and (body := replace_value(self.original, path, fresh)) is not None
            ):
                self.first_decision = Decision.SUBSTITUTED
                return self._step(fresh, body, None)
            stale = ps.remember_stale and self.snap.original_stale
            if stale and (body := remove_member(self.original, path)) is not None:
                self.first_decision = Decision.STRIPPED
                return self._step(None, body, None)
        return self._step(self.token, self.original, None)

    def _step(self, token: str | None, body: bytes, timeout: float | None) -> Step:
        self.made += 1
        self.tokens_sent.append(token)
        effects = () if self.stateless else (BeginAttempt(),)  # no store: nothing to begin
        return Step(token, body, token_kind(token, self.token), timeout, effects)

    def answered(
        self,
        status: int,
        headers: tuple[tuple[str, str], ...],
        content: bytes | None,
        doc: dict[str, Any] | None,
    ) -> None:
        verdict = classify(self.rule, status, content, doc)
        first = not self.tried and self.made == 1
        unusable = None if first else unusable_reissue_answer(status, content, doc)
        if unusable is None:
            evidence = delivery(status, content, doc)
            self.tried.append(
                Tried(self.tokens_sent[-1], verdict, status, headers, content or b"", doc, evidence)
            )
        else:
            # A re-issue answered with something we cannot hand back (5xx, non-JSON, cut short):
            # the caller keeps the earlier answer, and nothing is learnt from it. It reached
            # iLink and nothing says it was not delivered: no further re-issue either.
            self.reissue_failed = self.reissue_transient = True
            self.errors.append(unusable)

    def lost(self, sent: bool, error: str) -> None:
        """An attempt brought back no answer; `sent`: it may have reached iLink."""
        self.errors.append(error)
        if not self.tried:
            if not sent:
                self.fallback = True
            else:
                self.unknown = True
            return
        self.reissue_failed = True
        self.unknown = self.unknown or sent

    def next(self, now: float) -> Step | None:
        """The re-issue to make after the last answer, or None when the exchange is over."""
        if self.fallback or not self.tried or self.tried[-1].verdict is not Verdict.REFUSED:
            return None
        if self.reissue_failed and (not self.stateless or self.unknown or self.reissue_transient):
            # An attempt whose outcome is unknown is still an attempt (it may have delivered),
            # and so is one answered with an error: never one more. Without peer_state a
            # re-issue that never reached iLink (no connection) leaves the next one its turn.
            return None
        if self.made >= 1 + self.rule.action.retries:
            return None
        if self.stateless:
            return self._next_tokenless(now)
        if self._budget_refusal():
            # A send without the token, or another one, would be refused as well and every
            # refusal may lengthen iLink's penalty: the peer's budget is spent until it writes.
            self.budget_spent = True
            return None
        ps = _ps(self.rule)
        if self.prior + self.made >= ps.max_attempts:
            return None
        if self.token is None:
            return None  # the gateway sent none: nothing to repair by changing it
        path = self.rule.action.remove
        fresh = self.snap.fresh if ps.substitute_fresh else None
        choice: tuple[str | None, bytes] | None = None
        untried = fresh and fresh not in self.tokens_sent and not self.snap.fresh_stale
        if untried and (body := replace_value(self.original, path, fresh)) is not None:
            choice = (fresh, body)
        if choice is None and None not in self.tokens_sent:
            if (body := remove_member(self.original, path)) is None:
                # Never a "tokenless" re-issue that still carries the token (a UTF-8 BOM, UTF-16):
                # it would be refused again and close the window for nothing.
                self.uneditable = True
                return None
            choice = (None, body)
        if choice is None:
            return None
        return self._timed_step(choice[0], choice[1], now)

    def _budget_refusal(self) -> bool:
        """The last refusal is an exhausted budget: it carried the peer's newest token, after
        sends iLink accepted in the same window (or as a re-probe beyond a learnt limit). Not a
        stale token (the peer's newest is not stale), nor a bot-wide rate limit."""
        b = self.snap.budget
        if b is None or not _ps(self.rule).budget.on:
            return False
        t = self.tokens_sent[-1]
        newest = t is not None and (t == self.snap.fresh or (t == self.token and b.newest))
        return newest and (b.used >= 1 or self.probe)

    def _budget_effects(self, accepted: bool) -> list[Effect]:
        """What this send teaches about the peer's budget (nothing when it is not counted)."""
        b = self.snap.budget
        ps = _ps(self.rule)
        if b is None:
            return []
        if not ps.budget.on:  # not counted; only the window's nudge is remembered
            return [CountSend(None, True)] if accepted and self.nudged else []
        learnt = ps.budget.given is None
        if accepted:
            effects: list[Effect] = []
            limit = b.limit
            if learnt and b.limit is not None and b.used + 1 > b.limit:
                # iLink accepted a send beyond the learnt limit: the budget rose
                limit = b.used + 1
                effects.append(LearnBudget(limit, "raised"))
            return [CountSend(limit, self.nudged), *effects]
        if not self.budget_spent:
            return []
        effects = [SpendBudget()]
        if learnt:
            same = b.limit is not None and b.learnt_at is not None and b.used == b.limit
            effects.append(LearnBudget(b.used, "confirmed" if same else "learnt"))
        return effects

    def _next_tokenless(self, now: float) -> Step | None:
        """Without peer_state: the same body without the rule's field, again if refused again."""
        body = remove_member(self.original, self.rule.action.remove)
        if body is None:
            self.uneditable = True  # never a "tokenless" re-issue that still carries it
            return None
        return self._timed_step(None, body, now)

    def _timed_step(self, token: str | None, body: bytes, now: float) -> Step | None:
        if self.deadline - now <= 0:
            self.reissue_failed = True
            self.errors.append("no time left before the deadline")
            return None
        return self._step(token, body, self.deadline - now)

    def conclude(self, now: float) -> Conclusion:
        kinds = tuple(token_kind(t.token, self.token) for t in self.tried)
        if self.stateless:
            final = self.tried[-1]
            replaced = self._replacement(final)
            return Conclusion(self._stateless_decision(), final, (), kinds, final.delivery, replaced)
        ps = _ps(self.rule)
        attempts = self.prior + self.made
        if not self.tried:
            decision = Decision.FALLBACK if self.fallback else Decision.UPSTREAM_FAILED
            settle = SettleMessage(MessageRecord(MessageState.UNKNOWN, attempts))
            evidence = None if self.fallback else Delivery.FAILED
            return Conclusion(decision, None, (settle,), kinds, evidence)
        first, final = self.tried[0], self.tried[-1]
        effects: list[Effect] = []
        decision = self.first_decision
        if self.reissue_failed and len(self.tried) == 1:
            decision = Decision.REISSUE_FAILED
            if self.unknown:
                state = MessageState.UNKNOWN
            elif self.reissue_transient:
                state = MessageState.TRANSIENT
            else:
                state = _state_of(first.verdict)
        elif final.verdict is Verdict.SUCCESS:
            state = MessageState.ACCEPTED
            if len(self.tried) > 1:
                decision = Decision.REPAIRED
            if (
                self.token
                and final.token != self.token
                and ps.remember_stale
                and decision != Decision.STRIPPED
            ):
                # ("stripped": the store already knew the token was stale, no need to say it again)
                effects.append(MarkStale(self.token))
            if self.peer:
                effects.append(OpenWindow())
            effects.extend(self._budget_effects(accepted=True))
        elif final.verdict is Verdict.REFUSED:
            state = MessageState.REFUSED
            if self.budget_spent:
                decision = Decision.BUDGET_SPENT
                effects.extend(self._budget_effects(accepted=False))
            elif self.uneditable:
                decision = Decision.MATCHED
            elif self.token is not None and final.token is None and self.peer:
                # Even the tokenless send was refused: the peer's window is closed until it writes.
                decision = Decision.WINDOW_CLOSED
                effects.append(CloseWindow(now + ps.closed_for_s, final.status, final.body))
            else:
                # Refused with no token from the gateway, or with a fresh one: a genuine rate limit.
                decision = Decision.RATE_LIMITED
                effects.append(CountRateLimit(ps.cooldown.within_s))
        else:
            state = MessageState.TRANSIENT  # handed back as it came; nothing learnt from it
        answer = StoredAnswer(final.status, final.headers, final.body)
        replaced = self._replacement(final)
        if replaced is not None:
            # `unconfirmed: fail`: the gateway is told it failed, so it may send it again; that
            # retry goes upstream (not a replay of the failure), within max_attempts, after
            # which it is answered with the same failure (docs/architecture.md).
            state, answer = MessageState.TRANSIENT, replaced
        effects.append(SettleMessage(MessageRecord(state, attempts, answer)))
        return Conclusion(decision, final, tuple(effects), kinds, final.delivery, replaced)

    def _replacement(self, final: Tried) -> StoredAnswer | None:
        if final.delivery is Delivery.UNCONFIRMED and self.rule.action.unconfirmed == "fail":
            return StoredAnswer(200, JSON, UNCONFIRMED_FAILURE)
        return None

    def _stateless_decision(self) -> Decision:
        """Without peer_state: nothing to remember, only what the caller is handed."""
        if self.made == 1 and not self.reissue_failed:
            return Decision.MATCHED  # not re-issued: `retries: 0`, or a body it cannot edit
        if len(self.tried) == 1:
            return Decision.REISSUE_FAILED  # no usable answer: the caller keeps iLink's first
        if self.tried[-1].verdict is Verdict.REFUSED:
            return Decision.STILL_FAILING
        return Decision.REPAIRED

    @property
    def reissues(self) -> int:
        """Attempts made after the first."""
        return self.made - 1


def unusable_reissue_answer(status: int, content: bytes | None, doc: dict[str, Any] | None) -> str | None:
    """Why a re-issue's answer cannot be handed back instead of the first (None: it can): only
    HTTP 200 with an empty body or a JSON object is an answer the gateway understands."""
    if content is None:
        return "answer body could not be decoded"
    if status != 200:
        return f"answer was HTTP {status}"
    if content and doc is None:
        return "answer was not a JSON object"
    return None


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _state_of(verdict: Verdict) -> MessageState:
    return {
        Verdict.SUCCESS: MessageState.ACCEPTED,
        Verdict.REFUSED: MessageState.REFUSED,
        Verdict.TRANSIENT: MessageState.TRANSIENT,
        Verdict.LOST: MessageState.UNKNOWN,
    }[verdict]


def _ps(rule: Rule) -> PeerState:
    ps = rule.peer_state
    assert ps is not None, "the peer-state engine only runs rules with peer_state"
    return ps

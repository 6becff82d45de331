"""The vocabulary of the core: decisions, message states, snapshots and effects."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Decision(StrEnum):
    """What the proxy did with a send; the first word of the X-Ilink-Fixproxy header, the flow
    comment and the log line, and the `decision` in flow metadata, captures and metrics."""

    PASSED = "passed"
    SUBSTITUTED = "substituted"
    STRIPPED = "stripped"
    REPAIRED = "repaired"
    REPLAYED = "replayed"
    ANSWERED_LOCALLY = "answered-locally"
    DEFERRED = "deferred"
    WINDOW_CLOSED = "window-closed"
    RATE_LIMITED = "rate-limited"
    COOLDOWN_STARTED = "cooldown-started"
    REISSUE_FAILED = "reissue-failed"
    UPSTREAM_FAILED = "upstream-failed"
    FALLBACK = "fallback"  # handed back to mitmproxy's own forwarding: nothing reached iLink
    MATCHED = "matched"  # refused for a stale token, and the body cannot be sent without it
    STILL_FAILING = "still-failing"  # without peer_state: the re-issue was refused too
    # iLink refused a send carrying the peer's newest token after sends it accepted in the same
    # window: the peer's send budget is spent (learnt under `budget: auto`); no re-issue
    BUDGET_SPENT = "budget-spent"
    BUDGET_HELD = "budget-held"  # not sent: the peer's known budget is spent (answered locally)


class MessageState(StrEnum):
    """Where one message (a (bot, client_id)) stands; see docs/architecture.md for the diagram."""

    NEW = "new"  # nothing known (or its memory expired)
    IN_FLIGHT = "in-flight"  # an attempt is on its way; stored before its first byte goes out
    ACCEPTED = "accepted"  # iLink answered success: the only state whose answer is replayed
    REFUSED = "refused"  # iLink refused it (stale token, closed window, rate limit): not delivered
    TRANSIENT = "transient"  # 5xx, 429, non-JSON, ret/errcode not 0 and not a refusal
    UNKNOWN = "unknown"  # the answer was lost (or the process died): it may have been delivered


class Verdict(StrEnum):
    """What one upstream answer means for the message."""

    SUCCESS = "success"
    REFUSED = "refused"  # the rule's failure answer (stale token, rate limit)
    TRANSIENT = "transient"
    LOST = "lost"  # no answer: sent, fate unknown


class Delivery(StrEnum):
    """What one sendmessage answer says about delivery (docs/architecture.md "Delivery evidence").
    Only a `message_id` is evidence of delivery: iLink answers `{"ret":0}` without one for sends
    it accepted and never delivered."""

    CONFIRMED = "confirmed"  # HTTP 200, ret/errcode 0 or absent, and a message_id
    UNCONFIRMED = "unconfirmed"  # HTTP 200, ret/errcode 0 or absent, no message_id (empty, {})
    REFUSED = "refused"  # any other answer: ret/errcode not 0, not HTTP 200, not a JSON object
    FAILED = "failed"  # no answer at all (reset, timeout)


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class MessageRecord:
    """What is known about one message: its state, the upstream attempts it used (counted when
    sent, not when answered) and the answer to hand back if it comes again."""

    state: MessageState
    attempts: int
    answer: StoredAnswer | None = None


@dataclass(frozen=True)
class Window:
    closed_until: float | None
    status: int | None
    body: bytes | None


@dataclass(frozen=True)
class Cooling:
    until: float
    status: int
    body: bytes


@dataclass(frozen=True)
class BudgetView:
    """The peer's send budget in its current window (since its last inbound message)."""

    inbound_at: float  # when the peer last wrote: the window's start
    used: int  # sends iLink accepted since then (the proxy's deferred deliveries included)
    limit: int | None  # the known limit (given, or learnt for the bot); None: not known yet
    learnt_at: float | None = None  # when a learnt limit was learnt or last checked; None: given
    refused: bool = False  # iLink refused a send carrying the newest token in this window
    nudged: bool = False  # the window's nudge has gone
    newest: bool = False  # the gateway's token is the peer's newest

    def left(self) -> int | None:
        if self.refused:
            return 0
        return None if self.limit is None else max(self.limit - self.used, 0)


@dataclass(frozen=True)
class Snapshot:
    """What the engine read before a send: everything the gate and the token choice look at."""

    message: MessageRecord | None = None
    cooldown: Cooling | None = None
    window: Window | None = None
    queued: bool = False
    fresh: str | None = None  # the newest token seen for the peer (memory only), if still newest
    original_stale: bool = False  # the gateway's token is remembered as stale
    fresh_stale: bool = False
    budget: BudgetView | None = None  # None: not counted (budget off, or no inbound seen)


@dataclass(frozen=True)
class LocalAnswer:
    """An answer made by the proxy without going upstream."""

    decision: Decision
    status: int
    body: bytes
    note: str
    headers: tuple[tuple[str, str], ...] | None = None  # None: Content-Type: application/json


@dataclass(frozen=True)
class Defer:
    """Queue the send for delivery when the peer writes; `refusal` is what iLink last said."""

    refusal: tuple[int, bytes] | None
    reason: str = "window-closed"  # or "budget-spent"


@dataclass(frozen=True)
class Go:
    """Send it upstream; `prior` attempts were already used by earlier tries of this message."""

    prior: int
    probe: bool = False  # one real send beyond a learnt budget, to see whether it rose
    nudge: str | None = None  # the window keeper's text, to append to the last text item


Gate = LocalAnswer | Defer | Go


# ---------------------------------------------------------------- effects


@dataclass(frozen=True)
class BeginAttempt:
    """Store that one more attempt is in flight, before its first byte goes upstream."""


@dataclass(frozen=True)
class SettleMessage:
    record: MessageRecord


@dataclass(frozen=True)
class MarkStale:
    token: str  # hashed by the engine before it is stored


@dataclass(frozen=True)
class OpenWindow:
    pass


@dataclass(frozen=True)
class CloseWindow:
    until: float
    status: int
    body: bytes


@dataclass(frozen=True)
class CountRateLimit:
    """Record a genuine rate-limit answer; the count decides whether a cooldown starts
    (`policy.after_rate_limit`)."""

    within_s: float


@dataclass(frozen=True)
class StartCooldown:
    until: float
    status: int
    body: bytes


@dataclass(frozen=True)
class CountSend:
    """iLink accepted one more send in the peer's window; `limit` is the budget known then
    (stored with the count, for the "spent" gauge), `nudged`: it carried the window's nudge."""

    limit: int | None
    nudged: bool = False


@dataclass(frozen=True)
class SpendBudget:
    """iLink refused a send carrying the peer's newest token: its budget is spent until it writes."""


@dataclass(frozen=True)
class LearnBudget:
    """The bot's budget per inbound message is `limit` (a refusal at that count, or a send beyond
    the old limit accepted); `event`: learnt, raised or confirmed (a re-probe refused)."""

    limit: int
    event: str


Effect = (
    BeginAttempt
    | SettleMessage
    | MarkStale
    | OpenWindow
    | CloseWindow
    | CountRateLimit
    | StartCooldown
    | CountSend
    | SpendBudget
    | LearnBudget
)

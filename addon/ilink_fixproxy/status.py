"""What ``/status`` shows (on the ``--metrics`` listener): the data, gathered in one place.

Two halves, so the page is cheap to test and safe to change:

- here, ``Activity`` (recent exchanges and per-minute counts, fed by Metrics.observe on the event
  loop) and ``collect``, the ONE function that reads the peer-state store, called on the event loop
  (Metrics.on_loop) and returning a plain immutable ``Snapshot``;
- status_page.py renders a Snapshot to HTML (pure: no I/O, no clock).

Nothing secret ever enters a Snapshot: peers and bots are the short hashes the logs and
``ilink-fixproxy state`` show (peers in clear only with ``--capture-ids``), tokens are never read,
and of an upstream answer only its status, ret and errcode are kept (an errmsg is free text an
upstream controls). With several replicas on a shared store, the peers, windows and outbox are the
shared ones; recent exchanges and the charts are what this replica handled (held in its memory).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

from .core.model import BudgetView
from .core.policy import probe_due
from .redact import token_hash

RECENT_MAX = 50  # exchanges listed
MINUTES = 60  # the charts' span
PEERS_SHOWN = 200  # rows of the peer table (most recently active first); the rest are counted
OUTBOX_SCAN = 10_000  # queued sends read to count them per peer
# Polls are the bulk of the traffic and always "passed": they would push the sends out of the list.
UNLISTED_ENDPOINTS = frozenset({"getupdates"})


def shown_id(value: Any, ids: bool) -> str | None:
    """A peer id as logs and `state` show it: ``#…`` (token_hash), or in clear with `ids`. Values
    of any type (a hostile gateway may send a number or an object) end up as one string."""
    if value is None or value == "":
        return None
    if ids and isinstance(value, str):
        return value
    return token_hash(value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str))


def short_bot(value: Any) -> str | None:
    """The bot as `state` lists it: the first 10 characters of its keyed hash."""
    return str(value)[:10] if value else None


# --------------------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class PeerRow:
    bot: str | None
    peer: str | None
    inbound_age_s: float | None  # since the peer's last inbound message (None: none seen)
    closed_left_s: float | None  # a closed window: seconds until the proxy tries again; None: open
    stale_tokens: int
    queued: int  # deferred sends waiting for this peer
    budget_left: int | None  # sends left before iLink refuses (None: unknown)
    budget_probe: bool = False  # spent, but the next send re-checks a learnt budget at iLink


@dataclass(frozen=True)
class BotRow:
    bot: str | None
    cooldown_left_s: float | None  # None: not cooling down
    limited: int  # recent genuine rate-limit answers


@dataclass(frozen=True)
class Recent:
    ts: float
    endpoint: str
    bot: str | None
    peer: str | None
    decision: str
    attempts: int
    tokens: str  # the token kinds tried, e.g. "original -> none"
    answers: str  # each upstream answer, e.g. "200 ret=-2, 200 ret=0" ("" when none)
    delivery: str | None  # confirmed, unconfirmed, refused, failed; None: not a send iLink answered
    status: int | None  # what the gateway got


@dataclass(frozen=True)
class Minute:
    start: float  # epoch seconds, a multiple of 60
    decisions: tuple[tuple[str, int], ...]
    deliveries: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Snapshot:
    now: float
    replica: str
    problems: tuple[str, ...]  # why the proxy is unhealthy; () healthy
    starting: bool = False
    peer_state: bool = False  # a rule remembers peers (else no windows, no outbox)
    store_error: str | None = None  # the store could not be read (the page says so)
    on_closed: str | None = None  # "defer" or "answer-locally": what happens to a closed window's sends
    max_age_s: float | None = None  # deferred sends are dropped after this long
    budget_known: bool = False  # the data carries a send budget at all
    peers: tuple[PeerRow, ...] = ()
    peers_total: int = 0
    bots: tuple[BotRow, ...] = ()
    outbox_depth: int | None = None
    outbox_oldest_age_s: float | None = None
    outbox_totals: tuple[tuple[str, int], ...] = ()
    recent: tuple[Recent, ...] = ()
    minutes: tuple[Minute, ...] = ()
    ids_in_clear: bool = False
    version: str = ""

    @property
    def healthy(self) -> bool:
        return not self.problems and not self.starting

    def to_json(self) -> str:
        doc = asdict(self)
        doc["healthy"] = self.healthy
        return json.dumps(doc, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------- activity


class Activity:
    """Recent exchanges and per-minute counts of this replica, in memory. Fed and read on the
    event loop only (Metrics.observe, collect), so it needs no lock."""

    def __init__(self, recent_max: int = RECENT_MAX, minutes: int = MINUTES) -> None:
        self.recent: deque[Recent] = deque(maxlen=recent_max)
        self.minutes = minutes
        self._decisions: dict[int, Counter[str]] = {}
        self._deliveries: dict[int, Counter[str]] = {}

    def record(self, x: Any, now: float, *, ids: bool, endpoint: str | None = None) -> None:
        """Note one exchange (capture.Exchange): kept without tokens, text or errmsg. `endpoint`:
        how to show it (metrics folds paths iLink does not have into "other": a gateway's path
        may carry anything)."""
        endpoint = str(x.endpoint if endpoint is None else endpoint)[:40]
        if endpoint in UNLISTED_ENDPOINTS:
            return
        self.recent.append(
            Recent(
                ts=now,
                endpoint=endpoint,
                bot=short_bot(x.bot),
                peer=shown_id(x.peer, ids),
                decision=str(x.decision),
                attempts=len(x.attempts),
                tokens=" -> ".join(str(a.get("token", "?")) for a in x.attempts),
                answers=", ".join(_answer(a) for a in x.attempts),
                delivery=x.delivery,
                status=x.status,
            )
        )
        minute = int(now // 60)
        if endpoint == "sendmessage":  # the charts are about messages
            self._decisions.setdefault(minute, Counter())[str(x.decision)] += 1
        if x.delivery:
            self._deliveries.setdefault(minute, Counter())[str(x.delivery)] += 1
        for counts in (self._decisions, self._deliveries):
            for old in [m for m in counts if m <= minute - self.minutes]:
                del counts[old]

    def window(self, now: float) -> tuple[Minute, ...]:
        """The last `minutes` minutes, oldest first, each with its counts of sends by decision and
        by delivery evidence (empty minutes included)."""
        last = int(now // 60)
        return tuple(
            Minute(
                start=m * 60.0,
                decisions=tuple(sorted(self._decisions.get(m, Counter()).items())),
                deliveries=tuple(sorted(self._deliveries.get(m, Counter()).items())),
            )
            for m in range(last - self.minutes + 1, last + 1)
        )


def _answer(attempt: dict[str, Any]) -> str:
    status = attempt.get("status")
    if status is None:
        return "no answer"
    text = str(status)
    for key in ("ret", "errcode"):
        if isinstance(attempt.get(key), int) and not isinstance(attempt.get(key), bool):
            text += f" {key}={attempt[key]}"
    if attempt.get("empty"):
        text += " empty"
    return text


# --------------------------------------------------------------------------- collect


def replica_name() -> str:
    # A worker of `--workers N` (workers.py sets the variable "INDEX:..."): its charts and recent
    # requests are its own, so the page names the worker, not only the machine.
    worker = os.environ.get("_ILINK_FIXPROXY_WORKER", "").split(":", 1)[0]
    host = socket.gethostname()[:64]
    return f"{host} worker {worker}" if worker.isdigit() else host


async def collect(
    *,
    tracker: Any,
    rules: tuple[Any, ...],
    activity: Activity,
    problems: tuple[str, ...],
    ids: bool,
    now: float | None = None,
    version: str = "",
) -> Snapshot:
    """Everything the page shows, read once, on the event loop. `tracker` is the peer tracker
    (None: no rule remembers peers); its store is read here and nowhere else."""
    now = time.time() if now is None else now
    base = {
        "now": now,
        "replica": replica_name(),
        "problems": tuple(problems),
        "recent": tuple(reversed(activity.recent)),
        "minutes": activity.window(now),
        "ids_in_clear": ids,
        "version": version,
    }
    kept = [r.peer_state for r in rules if getattr(r, "peer_state", None) is not None]
    if tracker is None or not kept:
        return Snapshot(**base)
    ps = kept[0]
    policy = {
        "peer_state": True,
        "on_closed": "defer" if any(p.on_closed == "defer" for p in kept) else ps.on_closed,
        "max_age_s": max(p.outbox.max_age_s for p in kept),
    }
    store = tracker.store
    # The send budget as the engine sees it (PeerTracker._budget_view): the first rule that counts.
    budgeted = next((p for p in kept if p.budget.on), None)
    try:
        peers = await store.peers()
        queued = Counter((q.bot, q.peer) for q in await store.outbox(limit=OUTBOX_SCAN))
        stats = await store.outbox_stats(now)
        bots = await store.bots()
        learnt = (
            {b: await store.bot_budget(b) for b in {p.bot for p in peers[:PEERS_SHOWN]}}
            if budgeted is not None and budgeted.budget.given is None
            else {}
        )
    except Exception as e:  # the page must still answer (and say so) when the store does not
        return Snapshot(
            **base, **policy, store_error=f"the peer-state store cannot be read ({type(e).__name__})"
        )
    rows = []
    for p in peers[:PEERS_SHOWN]:
        left, probe = _budget(p, budgeted, learnt.get(p.bot), now)
        rows.append(
            PeerRow(
                bot=short_bot(p.bot),
                peer=shown_id(p.peer, ids),
                inbound_age_s=max(now - p.inbound_at, 0.0) if p.inbound_at else None,
                closed_left_s=(p.closed_until - now) if p.closed_until and p.closed_until > now else None,
                stale_tokens=int(p.stale_tokens),
                queued=queued.get((p.bot, p.peer), 0),
                budget_left=left,
                budget_probe=probe,
            )
        )
    return Snapshot(
        **base,
        **policy,
        budget_known=budgeted is not None,
        peers=tuple(rows),
        peers_total=len(peers),
        bots=tuple(
            BotRow(short_bot(b), (until - now) if until and until > now else None, int(limited))
            for b, until, limited in bots
        ),
        outbox_depth=int(stats["depth"]),
        outbox_oldest_age_s=float(stats["oldest_age_s"]),
        outbox_totals=tuple(
            (k, int(stats[k])) for k in ("deferred", "delivered_late", "expired", "dropped") if k in stats
        ),
    )


def _budget(peer: Any, ps: Any, learnt: tuple[int, float] | None, now: float) -> tuple[int | None, bool]:
    """(sends left in the peer's window, whether the next send re-checks a learnt budget), as the
    engine decides them (core.policy.gate): the limit given by the rule, else the one learnt for
    the bot; 0 once iLink refused the newest token in this window. (None, False): not counted
    (budget off, no inbound message seen yet, or no limit known)."""
    if ps is None or peer.inbound_at is None:
        return None, False
    limit, learnt_at = ps.budget.given, None
    if limit is None and learnt is not None:
        limit, learnt_at = learnt
    view = BudgetView(
        inbound_at=peer.inbound_at,
        used=peer.sent,
        limit=limit,
        learnt_at=learnt_at,
        refused=peer.refused_at is not None,
    )
    left = view.left()
    return left, left == 0 and probe_due(view, ps, now)

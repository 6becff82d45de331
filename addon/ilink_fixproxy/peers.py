"""Peer state in action: fresh tokens, stale memory, closed windows, cooldowns, one delivery per
message.

For a send selected by a rule with ``peer_state``, the proxy owns the whole upstream exchange
(first attempt and any re-issue) instead of letting mitmproxy forward it. That is what makes
idempotency possible: mitmproxy aborts the upstream exchange when the gateway's client times out,
so the answer to a send iLink may already have delivered would be lost and the gateway's retry
would deliver it again. Here the exchange runs in mitmproxy's hook task, which outlives the
client connection (see handle); a retry of the same ``client_id`` waits for it, or gets its
stored answer.

Never worse than no proxy: if the first attempt cannot even connect, the flow is handed back to
mitmproxy's own forwarding; a failed re-issue leaves the answer already received.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from .core import policy
from .core.model import (
    BudgetView,
    CloseWindow,
    Cooling,
    CountRateLimit,
    CountSend,
    Decision,
    Defer,
    Delivery,
    Effect,
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
from .health import STATE, Health, component_of
from .jsonedit import get_path
from .matching import AnswerSummary, parse_json_object
from .outbox import Outbox
from .ports import Store, Upstream
from .redact import token_hash
from .reissue import ReissueError
from .rules import PeerState, Rule
from .state import Message, Peer, SqliteStore, StateStore

log = logging.getLogger("ilink_fixproxy")

HEADER = "X-Ilink-Fixproxy"
# The first attempt is not bounded by the rule's deadline (that is for re-issues: a slow but
# successful answer must still reach the caller), only by this, so nothing hangs forever.
FIRST_ATTEMPT_TIMEOUT_S = 60.0
# Nor by the buffer limit (a 2 MB answer iLink gave must still reach the caller: it may have
# delivered), but by this: the answer is held in memory whole, and a sendmessage answer is a few
# dozen bytes (`{"ret":0}`). 64 MiB let four concurrent 1 GB answers from a broken upstream take
# the proxy from 84 to 342 MB RSS; past 4 MiB the gateway gets a 502 saying so (the send did go
# upstream: it counts as an attempt).
FIRST_ATTEMPT_MAX_BYTES = 4 * 1024 * 1024
# Messages the store could not take (a full disk, a locked file), kept in memory so a retry is
# still answered from them; the newest this many.
UNSTORED_MAX = 100_000
# A shared store's lease on a message under way lasts the rule's deadline and this much more; the
# holder renews it every third of that while its exchange runs, so a replica killed mid-exchange
# holds the message up for at most that long.
LEASE_MARGIN_S = 2.0
BUDGET_WRITE_WAIT_S = 2.0  # a send waits at most this for the previous sends' budget writes
_STORED_HEADER_SKIP = frozenset(
    {"content-length", "content-encoding", "transfer-encoding", "date", HEADER.lower()}
)


@dataclass(frozen=True)
class Outcome:
    """What one message's exchange ended with."""

    response: http.Response | None  # None: hand the flow back to mitmproxy's own forwarding
    decision: Decision
    accepted: bool = False
    trace: tuple[dict[str, Any], ...] = ()  # one entry per upstream attempt (see attempt_record)
    # What the send taught us, still to be stored (PeerTracker.handle's write_back_later)
    record: Callable[[], Awaitable[None]] | None = None
    # What iLink's answer says about delivery (core Delivery); None: no answer from iLink was
    # handed back (answered from memory, or mitmproxy forwards it)
    delivery: str | None = None
    # The peer's send budget after this send (see budget_facts); None: not counted
    budget: dict[str, Any] | None = None
    nudged: bool = False  # iLink accepted it carrying the window keeper's text


# Outcome.record, the send's single-flight key and its done future (see PeerTracker.handle)
_Unwritten = tuple[Callable[[], Awaitable[None]], tuple[str, str] | None, asyncio.Future[None]]


@dataclass
class _Send:
    """One message on its way: who, to whom, and what was tried."""

    rule: Rule
    request: http.Request
    via: Any
    bot: str
    peer: str | None
    client_id: str | None
    token: str | None  # the token the gateway sent (None: none)
    deadline: float
    began: int = 0  # attempts begun: sent, or about to be (it may have reached iLink)
    window: float | None = None  # the start of the peer's window it is sent in (counted sends)
    trace: list[dict[str, Any]] = field(default_factory=list)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _local_response(
    status: int, body: bytes, note: str, headers: list[tuple[str, str]] | None = None
) -> http.Response:
    fields = [
        (k.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
        for k, v in (headers or [("Content-Type", "application/json")])
        if k.lower() not in _STORED_HEADER_SKIP
    ]
    response = http.Response.make(status, body, fields)
    response.headers[HEADER] = note
    return response


class _Renewal:
    """Keeps a held lease alive, extending it every third of its TTL: a timer, not a task per
    send, since nearly every exchange ends long before the first extension is due."""

    def __init__(self, tracker: PeerTracker, key: tuple[str, str], ttl: float) -> None:
        self.tracker, self.key, self.ttl = tracker, key, ttl
        # The snapshot stored the message's first attempt (Reads.begun) and it is not made yet:
        # the first _begin_attempt uses it, else the release takes it back (see handle).
        self.reserved = False
        self.loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        self.timer = self.loop.call_later(ttl / 3, self._due)

    def _due(self) -> None:
        self.task = self.loop.create_task(self._extend())

    async def _extend(self) -> None:
        store = self.tracker.store
        try:
            await store.take_lease(*self.key, self.tracker._owner, self.ttl)  # (ours: extended)
        except store.errors as e:
            self.tracker._store_failed(e, "renew_lease")
        self.timer = self.loop.call_later(self.ttl / 3, self._due)

    def cancel(self) -> None:
        self.timer.cancel()
        if self.task is not None:
            self.task.cancel()


class PeerTracker:
    def __init__(
        self,
        store: StateStore | Store,
        reissuer: Upstream,
        rule_named: Callable[[str], Rule | None] = lambda _: None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        # The SQLite file is synchronous inside; the engine sees every store through ports.Store.
        self.store: Store = SqliteStore(store) if isinstance(store, StateStore) else store
        self.reissuer = reissuer
        self.clock = clock  # None: time.time(), looked up at each call
        self.outbox = Outbox(self.store, reissuer, rule_named, clock=self._now)  # type: ignore[arg-type]
        self.outbox.window = self.window_budget
        # (bot, client_id) -> (what the store could not take, when): see _apply
        self._unstored: OrderedDict[tuple[str, str], tuple[MessageRecord, float]] = OrderedDict()
        self._storing = True  # False from a failed write to the next successful one (logged once)
        # The bots' Authorization values, in memory only: deferred sends are stored without them
        # and delivered with the credentials of the bot's latest request.
        self._auth: dict[str, str] = {}
        # Authorization -> its keyed hash: an HMAC per send is measurable, a proxy serves a handful
        # of bots (memory only, like _auth).
        self._bot_hash = functools.lru_cache(maxsize=10_000)(self.store.keyed_hash)
        # (bot, client_id) -> done when the send under way for it has finished (single flight)
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}
        # flow id -> (record, single-flight key, its done future): answered, not yet stored
        self._unwritten: dict[str, _Unwritten] = {}
        # Single flight across replicas (a shared store): this process's name on the leases it
        # holds, and each held lease's renewal task.
        self._owner = uuid.uuid4().hex
        self._leases: dict[tuple[str, str], _Renewal] = {}
        # (bot, peer) -> the budget writes of sends answered but not yet stored (see _budget_record)
        self._budget_writes: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self.health: Health | None = None  # told about store errors and successful writes

    async def aclose(self) -> None:
        await self.write_back()
        for task in list(self._leases.values()):
            task.cancel()
        await self.store.aclose()

    def busy(self) -> bool:
        return bool(self._inflight) or bool(self._unwritten) or bool(self.outbox._tasks)

    async def write_back(self, flow_id: str | None = None) -> None:
        """Store what answered sends taught us (see handle): `flow_id`'s, or every one pending."""
        if flow_id is None:
            pending, self._unwritten = list(self._unwritten.values()), {}
        elif (one := self._unwritten.pop(flow_id, None)) is not None:
            pending = [one]
        else:
            return
        for record, key, done in pending:
            try:
                await record()  # _apply: store faults are handled there
            except Exception as e:  # the gateway has its answer; only our memory of it is lost
                log.warning(f"peer state: could not record a send: {type(e).__name__}: {e}")
                if self.health is not None:
                    self.health.failed(component_of(e), e)
            finally:
                await self._settle(key, done)

    async def _settle(self, key: tuple[str, str] | None, done: asyncio.Future[None]) -> None:
        if key and self._inflight.get(key) is done:
            del self._inflight[key]
            if (renewal := self._leases.pop(key, None)) is not None:
                # After the record is stored: a replica waiting for this message reads it next.
                renewal.cancel()
                release = self.store.release_lease(*key, self._owner, unbegin=renewal.reserved)
                await self._store_call("release_lease", release)
        if not done.done():
            done.set_result(None)

    # ------------------------------------------------------------------ the store, unavailable

    async def _store_call(self, operation: str, call: Awaitable[Any], default: Any = None) -> Any:
        """`call`'s result, or `default` when the store cannot answer (counted and logged: see
        _store_failed). For the calls whose failure changes nothing but what is shared."""
        try:
            result = await call
        except self.store.errors as e:
            self._store_failed(e, operation)
            return default
        self._store_ok()
        return result

    # ------------------------------------------------------------------ learning from getupdates

    async def observe_updates(self, flow: http.HTTPFlow) -> int:
        """Record each inbound message's sender and context_token; returns how many were seen."""
        if flow.response is None or flow.response.status_code != 200:
            return 0
        try:
            doc = parse_json_object(flow.response.get_content(strict=True))
        except ValueError:
            return 0
        msgs = doc.get("msgs") if doc else None
        if not isinstance(msgs, list):
            return 0
        bot = self.bot_of(flow.request)
        self.remember_auth(bot, flow.request)
        now = self._now()
        seen = 0
        store = self.store
        for msg in msgs:
            if not isinstance(msg, dict) or not (peer := _text(msg.get("from_user_id"))):
                continue
            token = _text(msg.get("context_token"))
            # Each inbound message on its own: the poll's answer passes on whatever the store says.
            try:
                await store.saw_inbound(bot, peer, store.keyed_hash(token) if token else None, now)
                if token:
                    await store.remember_fresh(bot, peer, token)
            except store.errors as e:
                self._store_failed(e, "saw_inbound")
            else:
                self._store_ok()
            if (auth := self._auth.get(bot)) is not None:
                await self.outbox.on_inbound(bot, peer, token or await self.fresh_token(bot, peer), auth)
            seen += 1
        if seen:
            log.info(f"getupdates: {seen} inbound message(s); their senders' send windows are open")
        return seen

    def remember_auth(self, bot: str, request: http.Request) -> None:
        if auth := request.headers.get("authorization"):
            self._auth[bot] = auth
            if len(self._auth) > 10_000:
                self._auth.pop(next(iter(self._auth)))

    async def flush_requested(self) -> None:
        """Serve `ilink-fixproxy outbox flush PEER` requests left in the store."""
        for wanted in await self.store.take_flush_requests():
            for q in await self.store.outbox():
                if wanted in (q.peer, token_hash(q.peer)) and (auth := self._auth.get(q.bot)):
                    await self.outbox.on_inbound(q.bot, q.peer, await self.fresh_token(q.bot, q.peer), auth)

    def bot_of(self, request: http.Request) -> str:
        return self._bot_hash(request.headers.get("authorization", ""))

    async def fresh_token(self, bot: str, peer: str | None) -> str | None:
        """The newest token seen for the peer, if the store still agrees it is the newest."""
        if not peer or (token := await self.store.fresh(bot, peer)) is None:
            return None
        p = await self.store.peer(bot, peer)
        if p is None or p.newest_token != self.store.keyed_hash(token):
            return None  # forgotten (`state forget`) or superseded
        return token

    # ------------------------------------------------------------------ a send

    def _now(self) -> float:
        return self.clock() if self.clock is not None else time.time()

    async def handle(
        self, flow: http.HTTPFlow, rule: Rule, doc: dict[str, Any], *, write_back_later: bool = False
    ) -> Outcome:
        """Deliver one sendmessage, repairing it if it fails. With `write_back_later` what it
        taught us is stored only at write_back(flow.id): the addon calls that once the answer
        is on its way to the gateway, so the store's commit is not part of the send's latency.
        Until then a retry of the same client_id waits, as for a send still under way.
        (Each attempt itself is stored before it is sent: see _begin_attempt.)"""
        ps = rule.peer_state
        assert ps is not None
        bot = self.bot_of(flow.request)
        peer = _text(get_path(doc, ps.peer)[1])
        client_id = _text(get_path(doc, ps.client_id)[1])
        key = (bot, client_id) if client_id else None
        token = policy.gateway_token(*get_path(doc, rule.action.remove))
        flow.metadata.setdefault("ilink_fixproxy", {}).update(
            {
                "bot": bot[:12],
                "peer": peer,
                "client_id": client_id,
                "token": token_hash(token) if token else None,
            }
        )

        self.remember_auth(bot, flow.request)
        # A retry of a message still on its way waits for it, then looks again: the exchange it
        # waited for may have settled the message (replayed), used its attempts (answered
        # locally) or lost its answer (one more attempt, if any is left). Another waiter may
        # have started an exchange meanwhile: wait for that one too.
        while key and (running := self._inflight.get(key)) is not None:
            await asyncio.shield(running)
        if peer and (bot, peer) in self._budget_writes:
            await self._budget_written(bot, peer)
        # Taken before the store is read (a shared store's reads suspend: a retry arriving
        # meanwhile must wait for this one), released once what it taught us is stored.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key:
            self._inflight[key] = done
        outcome = None
        try:
            # Single flight across replicas (a shared store): a lease on the message, taken before
            # its record is read and held until what the exchange taught us is stored. Held by
            # another replica: wait for its outcome (published when it lets go, or the lease
            # expiring), then look again, as a local retry does after `running`.
            ttl = rule.action.deadline_s + LEASE_MARGIN_S if key is not None and self.store.shared else None
            while True:
                now = self._now()
                snap = await self._snapshot(rule, bot, peer, client_id, token, now, lease_ttl=ttl)
                if snap is not None:
                    break
                await self._store_call("wait_lease", self.store.wait_lease(*key, ttl))  # type: ignore[misc]
            gate = policy.gate(snap, rule, now)
            if isinstance(gate, LocalAnswer):
                held = gate.decision is Decision.BUDGET_HELD  # (logged by capture, as local answers are)
                return Outcome(
                    _local_response(gate.status, gate.body, gate.note, _list(gate.headers)),
                    gate.decision,
                    budget=budget_facts(snap.budget, now, ("exhausted",)) if held else None,
                )
            if isinstance(gate, Defer):
                if peer:
                    deferred = await self._deferred(
                        rule,
                        bot,
                        peer,
                        client_id,
                        flow.request,
                        flow.server_conn.via,
                        gate.refusal,
                        gate.reason,
                    )
                    if gate.reason == "budget-spent":
                        deferred = dataclasses.replace(
                            deferred, budget=budget_facts(snap.budget, now, ("exhausted",))
                        )
                    return deferred
                gate = Go(prior=snap.message.attempts if snap.message else 0)  # nobody to defer for

            send = _Send(
                rule=rule,
                request=flow.request,  # not copied: nothing changes it once this hook answers
                via=flow.server_conn.via,
                bot=bot,
                peer=peer,
                client_id=client_id,
                token=token,
                deadline=flow.request.timestamp_start + rule.action.deadline_s,
                window=snap.budget.inbound_at if snap.budget is not None else None,
            )
            # Run right here, in mitmproxy's hook task: mitmproxy never cancels a hook task when
            # the gateway hangs up (it only abandons its own upstream exchange; proxy/server.py in
            # 11.0 and 12.3), so the exchange still completes and is recorded. A separate shielded
            # task cost three more event-loop turns per send.
            try:
                outcome = await self._exchange(
                    send,
                    policy.Exchange(
                        rule,
                        snap,
                        gate.prior,
                        token,
                        flow.request.raw_content or b"",
                        peer,
                        send.deadline,
                        probe=gate.probe,
                        nudge=gate.nudge,
                    ),
                )
            except Exception as e:
                if not send.began:
                    raise  # nothing went upstream: the addon lets mitmproxy forward it as usual
                # Something may have reached iLink: never hand the flow back to be sent again.
                log.warning(f"sendmessage: {type(e).__name__} after sending; the gateway gets HTTP 502")
                outcome = Outcome(
                    _failed_response(rule, "internal error after sending"), Decision.UPSTREAM_FAILED
                )
            return outcome
        except Exception:
            # Handed back: mitmproxy forwards it, and the first attempt the snapshot stored (if
            # any) counts as that one (invariant 1), so it is not taken back.
            if key and (renewal := self._leases.get(key)) is not None:
                renewal.reserved = False
            raise
        finally:
            if outcome is not None and outcome.record is not None:
                self._unwritten[flow.id] = (outcome.record, key, done)
                if not write_back_later:
                    await self.write_back(flow.id)
            else:
                await self._settle(key, done)

    async def _snapshot(
        self,
        rule: Rule,
        bot: str,
        peer: str | None,
        client_id: str | None,
        token: str | None,
        now: float,
        *,
        lease_ttl: float | None = None,
    ) -> Snapshot | None:
        """What the store knows about this send, looked up together (one transaction, or one
        round trip). Without the store: what memory knows (never worse than no proxy: the send
        goes, and a stale token is still repaired by the plain re-issue). With `lease_ttl` (a
        shared store) the message's lease is taken first and kept renewed until _settle; None
        when another replica holds it."""
        ps = rule.peer_state
        assert ps is not None
        closable = ps.on_closed in ("answer-locally", "defer")
        counted = ps.budget.on or ps.nudge is not None
        store = self.store
        since = now - ps.dedupe_s
        with_fresh = ps.substitute_fresh and token is not None and peer is not None
        try:
            r = await store.snapshot(
                bot,
                client_id,
                peer,
                store.keyed_hash(token) if ps.remember_stale and token is not None else None,
                since,
                now,
                with_peer=closable,
                with_fresh=with_fresh,
                with_budget=counted,
                lease=(self._owner, lease_ttl) if lease_ttl is not None else None,
                begin_new=lease_ttl is not None,
            )
        except store.errors as e:
            self._store_failed(e, "snapshot")
            kept = self._unstored.get((bot, client_id)) if client_id else None
            return Snapshot(
                message=kept[0] if kept is not None and kept[1] >= since else None,
                cooldown=None,
                window=None,
                queued=False,
                fresh=None,
                original_stale=False,
                fresh_stale=False,
            )
        if store.shared:
            self._store_ok()
        if not r.leased:
            return None
        if lease_ttl is not None and client_id:
            key = (bot, client_id)
            if key not in self._leases:
                self._leases[key] = _Renewal(self, key, lease_ttl)
            self._leases[key].reserved = r.begun
        p = r.peer
        fresh = r.fresh
        if fresh is not None and (p is None or p.newest_token != store.keyed_hash(fresh)):
            fresh = None  # forgotten (`state forget`) or superseded
        cooldown = r.cooldown
        return Snapshot(
            message=self._message(bot, client_id, since, r.message) if client_id else None,
            cooldown=Cooling(cooldown.until, cooldown.status, cooldown.body) if cooldown else None,
            window=Window(p.closed_until, p.closed_status, p.closed_body) if p and closable else None,
            queued=r.queued_id is not None,
            fresh=fresh,
            original_stale=r.token_stale,
            fresh_stale=fresh is not None and r.newest_stale,
            budget=(
                self._budget_view(ps, p, r.bot_budget, store.keyed_hash(token) if token else None)
                if counted and p
                else None
            ),
        )

    def _budget_view(
        self, ps: PeerState, p: Peer, learnt: tuple[int, float] | None, token: str | None
    ) -> BudgetView | None:
        """The peer's window as the core sees it; None before the proxy saw the peer write (the
        window's start, and so what was sent in it, is unknown: nothing is held or counted).
        `learnt`: the bot's learnt budget (read with the peer, in the same snapshot)."""
        if p.inbound_at is None:
            return None
        limit, learnt_at = ps.budget.given, None
        if limit is None and ps.budget.on and learnt is not None:
            limit, learnt_at = learnt
        return BudgetView(
            inbound_at=p.inbound_at,
            used=p.sent,
            limit=limit,
            learnt_at=learnt_at,
            refused=p.refused_at is not None,
            nudged=p.nudged_at is not None,
            newest=token is not None and token == p.newest_token,
        )

    async def window_budget(self, rule: Rule, bot: str, peer: str) -> BudgetView | None:
        """The peer's window now (for the outbox: deferred deliveries count against it)."""
        ps = rule.peer_state
        if ps is None or not ps.budget.on:
            return None
        r = await self.store.snapshot(
            bot, None, peer, None, 0.0, self._now(), with_peer=True, with_fresh=False, with_budget=True
        )
        if r.peer is None:
            return None
        return self._budget_view(ps, r.peer, r.bot_budget, None)

    def _message(self, bot: str, client_id: str, since: float, m: Message | None) -> MessageRecord | None:
        """The message as known here: what could not be stored (memory), else the store's `m`."""
        if (kept := self._unstored.get((bot, client_id))) is not None and kept[1] >= since:
            return kept[0]
        if m is None:
            return None
        if m.state:
            state = MessageState(m.state)
        else:  # written by a version without message states
            state = MessageState.ACCEPTED if m.accepted else MessageState.TRANSIENT
        answer = StoredAnswer(m.status, tuple(m.headers), m.body or b"") if m.status is not None else None
        return MessageRecord(state, m.attempts, answer)

    # ------------------------------------------------------------------ send budgets, in order

    def _budget_record(
        self, send: _Send, effects: tuple[Effect, ...], now: float
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        """_apply for a send that counts against the peer's budget, known to be pending until it
        ran: its answer goes back first (write_back), and the gateway's next send to the peer may
        arrive before it is stored; that send waits for it (_budget_written) so it reads the
        count this one left, not the one before (a shared store's write takes round trips)."""
        key = (send.bot, send.peer or "")
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._budget_writes.setdefault(key, set()).add(written)

        async def record() -> None:
            try:
                await self._apply(send, effects, now)
            finally:
                self._budget_done(key, written)

        return record

    def _budget_done(self, key: tuple[str, str], written: asyncio.Future[None]) -> None:
        if (waiting := self._budget_writes.get(key)) is not None:
            waiting.discard(written)
            if not waiting:
                del self._budget_writes[key]
        if not written.done():
            written.set_result(None)

    async def _budget_written(self, bot: str, peer: str) -> None:
        """Until the budget writes of the peer's sends answered before this one are stored (at
        most BUDGET_WRITE_WAIT_S: one whose write-back never comes is not waited for again)."""
        pending = set(self._budget_writes.get((bot, peer), ()))
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=BUDGET_WRITE_WAIT_S)
        for written in late:
            self._budget_done((bot, peer), written)

    # ------------------------------------------------------------------ the store, and its faults

    async def _begin_attempt(self, send: _Send, x: policy.Exchange) -> None:
        """Store one more attempt as in flight before it is sent (a crash or a lost answer still
        counts it). If the store cannot, the send still goes, once: remembered in memory."""
        send.began += 1
        if not send.client_id:
            return
        ps = send.rule.peer_state
        assert ps is not None
        now = self._now()
        record = MessageRecord(MessageState.IN_FLIGHT, x.prior + x.made)
        renewal = self._leases.get((send.bot, send.client_id))
        if renewal is not None and renewal.reserved:
            # Stored with the snapshot (the same script that took the lease): this is that attempt.
            renewal.reserved = False
            if (send.bot, send.client_id) in self._unstored:
                self._remember(send.bot, send.client_id, record, now)  # memory stays the newer
            return
        try:
            await self.store.begin_attempt(send.bot, send.client_id, now, since=now - ps.dedupe_s)
        except self.store.errors as e:
            self._store_failed(e, "begin_attempt")
            self._remember(send.bot, send.client_id, record, now)
        else:
            self._store_ok()
            if (send.bot, send.client_id) in self._unstored:
                self._remember(send.bot, send.client_id, record, now)  # memory stays the newer

    def _remember(self, bot: str, client_id: str, record: MessageRecord, now: float) -> None:
        self._unstored[(bot, client_id)] = (record, now)
        self._unstored.move_to_end((bot, client_id))
        if len(self._unstored) > UNSTORED_MAX:
            self._unstored.popitem(last=False)

    def _store_failed(self, e: BaseException, operation: str = "write") -> None:
        if self.health is not None:  # every fault, not only the first: /healthz counts them
            self.health.failed(STATE, e)  # (an OSError here is the store's: disk full, I/O)
        if self._storing:
            self._storing = False
            log.warning(
                f"peer state: cannot persist sends in {self.store.path} ({type(e).__name__}: {e}); "
                "each send still goes upstream at most once, remembered in memory only (until a "
                "restart) until the store works again"
            )

    def _store_ok(self) -> None:
        if self.health is not None:
            self.health.succeeded(STATE)
        if not self._storing:
            self._storing = True
            log.warning(f"peer state: {self.store.path} is writable again")

    async def _apply(self, send: _Send, effects: tuple[Effect, ...], now: float) -> None:
        """Store what a send taught us (one commit); what cannot be stored about the message
        itself is kept in memory, so a retry is still answered from it."""
        ps = send.rule.peer_state
        assert ps is not None
        store = self.store
        # (looked up first: any write of the batch may be the one that fails)
        settled = next((e.record for e in effects if isinstance(e, SettleMessage)), None)
        key = (send.bot, send.client_id) if send.client_id else None
        # The message's lease is let go with its record, after everything else the send taught
        # us is stored (a waiting replica then reads all of it): the settlement goes last.
        release = self._owner if key is not None and key in self._leases else None
        # Likewise a spent budget goes after the limit learnt with it: whoever sees the one (another
        # replica's next send) sees the other.
        ordered = sorted(effects, key=lambda e: (isinstance(e, SettleMessage), isinstance(e, SpendBudget)))
        try:
            async with store.batch(write=True):
                for effect in ordered:
                    if isinstance(effect, SettleMessage):
                        if send.client_id:
                            answer = effect.record.answer
                            await store.settle_message(
                                send.bot,
                                send.client_id,
                                effect.record.state.value,
                                effect.record.attempts,
                                (answer.status, list(answer.headers), answer.body) if answer else None,
                                now,
                                since=now - ps.dedupe_s,
                                release=release,
                            )
                            if release is not None and (renewal := self._leases.pop(key, None)):  # type: ignore[arg-type]
                                renewal.cancel()  # released: _settle has nothing left to do
                    elif isinstance(effect, MarkStale):
                        await store.mark_stale(send.bot, store.keyed_hash(effect.token), send.peer or "", now)
                    elif isinstance(effect, OpenWindow) and send.peer:
                        await store.open_window(send.bot, send.peer, now)
                    elif isinstance(effect, CloseWindow) and send.peer:
                        await store.close_window(
                            send.bot, send.peer, effect.until, effect.status, effect.body, now
                        )
                    elif isinstance(effect, StartCooldown):
                        await store.start_cooldown(send.bot, effect.until, effect.status, effect.body, now)
                    elif isinstance(effect, CountSend) and send.peer:
                        await store.count_send(
                            send.bot, send.peer, effect.limit, effect.nudged, now, send.window
                        )
                    elif isinstance(effect, SpendBudget) and send.peer:
                        await store.spend_budget(send.bot, send.peer, now, send.window)
                    elif isinstance(effect, LearnBudget):
                        await store.learn_budget(send.bot, effect.limit, now)
        except store.errors as e:
            self._store_failed(e, "apply")
            if settled is not None and send.client_id:
                self._remember(send.bot, send.client_id, settled, now)
            return
        self._store_ok()
        if send.client_id:
            self._unstored.pop((send.bot, send.client_id), None)

    # ------------------------------------------------------------------ the exchange

    async def _exchange(self, send: _Send, x: policy.Exchange) -> Outcome:
        rule = send.rule
        ps = rule.peer_state
        assert ps is not None

        async def attempt(step: policy.Step) -> http.Response:
            await self._begin_attempt(send, x)
            first = step.timeout is None
            return await self.reissuer.send(
                send.request,
                step.body,
                send.via,
                FIRST_ATTEMPT_TIMEOUT_S if first else step.timeout,  # type: ignore[arg-type]
                FIRST_ATTEMPT_MAX_BYTES if first else None,
            )

        answers = await drive(x, x.first(), attempt, send.trace, self._now)
        now = self._now()
        c = x.conclude(now)
        trace = tuple(send.trace)
        if c.decision is Decision.FALLBACK:
            log.warning(f"sendmessage: cannot reach upstream ({x.errors[-1]}); mitmproxy forwards it instead")
            await self._apply(send, c.effects, now)
            return Outcome(None, c.decision, trace=trace)
        if c.decision is Decision.UPSTREAM_FAILED:
            await self._apply(send, c.effects, now)
            error = x.errors[-1]
            log.warning(f"sendmessage to {token_hash(send.peer)}: {error}; the gateway gets HTTP 502")
            return Outcome(_failed_response(rule, error), c.decision, trace=trace, delivery=c.delivery)
        if x.reissue_failed:
            if x.reissue_transient:
                log.warning(
                    f"sendmessage to peer {token_hash(send.peer)}: re-issue answer unusable "
                    f"({send.trace[-1].get('status')}); the original answer is kept"
                )
            else:
                # Never worse than no proxy: the answer already received goes back unchanged, and
                # an attempt whose fate is unknown teaches us nothing about the peer or the bot.
                log.warning(
                    f"sendmessage to peer {token_hash(send.peer)}: re-issue failed ({x.errors[-1]}); "
                    "the original answer is kept"
                )
        if x.uneditable:
            log.warning(
                f"sendmessage to peer {token_hash(send.peer)}: refused, and its body cannot be edited "
                f"to drop {'.'.join(rule.action.remove)} (not plain UTF-8 JSON): not re-issued"
            )
        decision = c.decision
        effects = c.effects
        final, final_body = answers[-1]
        first, first_body = answers[0]
        if any(isinstance(e, CountRateLimit) for e in effects):
            # Stored now: whether it starts a cooldown is part of the answer.
            assert c.final is not None
            try:
                async with self.store.batch(write=True):
                    limited = await self.store.count_limited(send.bot, now, ps.cooldown.within_s)
                    decision, cooldown = policy.after_rate_limit(
                        rule, limited, c.final.status, c.final.body, now
                    )
                    if cooldown is not None:
                        await self._apply(send, (cooldown,), now)
            except self.store.errors as e:
                self._store_failed(e, "count_limited")

        # A plain pass-through is the common case: logged at debug, so INFO shows what the proxy
        # did; and nothing is worked out for a line nobody will see.
        if decision != Decision.PASSED or log.isEnabledFor(logging.DEBUG):
            summary_final = AnswerSummary.of(final.status_code, final_body).short()
            tokens = " -> ".join(c.kinds)
            if decision not in (Decision.PASSED, Decision.REISSUE_FAILED):
                summary_first = AnswerSummary.of(first.status_code, first_body).short()
                final.headers[HEADER] = (
                    f"{decision}; rule={rule.name}; attempts={len(answers)}; tokens={tokens}; "
                    f"first={summary_first}; now={summary_final}"
                )
            (log.debug if decision == Decision.PASSED else log.info)(
                f"{decision}: sendmessage to peer {token_hash(send.peer)} client_id {send.client_id or '-'} "
                f"with context_token {token_hash(send.token)}: {len(answers)} attempt(s) [{tokens}]: "
                f"{summary_final}"
            )
        nudged = any(isinstance(e, CountSend) and e.nudged for e in effects)
        if nudged:
            note = final.headers.get(HEADER)
            final.headers[HEADER] = f"{note}; nudged" if note else f"passed; rule={rule.name}; nudged"
            log.info(f"nudged: sendmessage to peer {token_hash(send.peer)} carried the window keeper's text")
        learnt_events = tuple(e.event for e in effects if isinstance(e, LearnBudget))
        events = (("reprobed",) if x.probe else ()) + learnt_events
        if decision is Decision.BUDGET_SPENT:
            learnt = next((e.limit for e in effects if isinstance(e, LearnBudget)), None)
            log.info(
                f"budget-spent: iLink refused a send to peer {token_hash(send.peer)} carrying its newest "
                f"token after {x.snap.budget.used if x.snap.budget else 0} accepted since it last wrote"
                + (f"; budget per inbound message {learnt} for this bot" if learnt is not None else "")
                + "; further sends wait until it writes"
            )
        elif "raised" in events:
            log.info(f"budget raised: iLink accepted a send to peer {token_hash(send.peer)} beyond it")
        facts = budget_facts(x.snap.budget, now, events, effects)
        if c.delivery is Delivery.UNCONFIRMED:
            mark_unconfirmed(final, rule, c.replaced)
            log.info(
                f"unconfirmed: sendmessage to peer {token_hash(send.peer)} client_id "
                f"{send.client_id or '-'}: iLink accepted it without a message_id; the gateway gets "
                f"{'a failure' if c.replaced else 'the answer as it came'}"
            )
        if send.peer and any(isinstance(e, (CountSend, SpendBudget, LearnBudget)) for e in effects):
            record = self._budget_record(send, effects, now)
        else:
            record = functools.partial(self._apply, send, effects, now)
        accepted = (
            c.final is not None
            and c.final.verdict is Verdict.SUCCESS
            and decision != Decision.REISSUE_FAILED
            and c.replaced is None
        )
        outcome = Outcome(
            final,
            decision,
            accepted=accepted,
            trace=trace,
            record=record,
            delivery=c.delivery,
            budget=facts,
            nudged=nudged,
        )
        closed = decision in (Decision.WINDOW_CLOSED, Decision.BUDGET_SPENT)
        if closed and ps.on_closed == "defer" and send.peer:
            try:
                deferred = await self._deferred(
                    rule,
                    send.bot,
                    send.peer,
                    send.client_id,
                    send.request,
                    send.via,
                    (final.status_code, final_body),
                    "budget-spent" if decision is Decision.BUDGET_SPENT else "window-closed",
                )
            except self.store.errors:
                return outcome  # nowhere to queue it: the refusal goes back as it came
            return Outcome(
                deferred.response,
                deferred.decision,
                trace=trace,
                record=record,
                delivery=c.delivery,
                budget=facts,
            )
        return outcome

    async def _deferred(
        self,
        rule: Rule,
        bot: str,
        peer: str,
        client_id: str | None,
        request: http.Request,
        via: Any,
        refusal: tuple[int, bytes] | None,
        reason: str = "window-closed",
    ) -> Outcome:
        """Queue the send for delivery when the peer writes, and answer per defer_answer."""
        ps = rule.peer_state
        assert ps is not None
        try:
            result, queued = await self.outbox.defer(rule, bot, peer, client_id, request, via)
        except self.store.errors as e:
            # Nowhere to keep it: it goes upstream now, as with no proxy (refused again, likely).
            self._store_failed(e, "enqueue")
            raise
        if refusal is None:  # a retry of a send already queued: its refusal is not at hand
            p = await self._store_call("peer", self.store.peer(bot, peer))
            refusal = (p.closed_status or 200, p.closed_body or b"") if p and p.closed_status else (200, b"")
        if result == "full":
            log.warning(f"outbox full for peer {token_hash(peer)}: client_id {client_id or '-'} not queued")
            note = f"answered-locally; reason=outbox-full; rule={rule.name}; queued={queued}"
            return Outcome(_local_response(refusal[0], refusal[1], note), Decision.ANSWERED_LOCALLY)
        if result == "uneditable":
            # Never a token in clear at rest: a body the edit cannot take the token out of is not
            # stored; the gateway gets the refusal, as with on_closed: answer-locally.
            log.warning(
                f"outbox: sendmessage to peer {token_hash(peer)} client_id {client_id or '-'} not queued: "
                "its body cannot be stored without its context_token (not plain UTF-8 JSON)"
            )
            note = f"answered-locally; reason={reason}; rule={rule.name}; not-deferred=body-not-editable"
            return Outcome(_local_response(refusal[0], refusal[1], note), Decision.ANSWERED_LOCALLY)
        note = f"deferred; rule={rule.name}; queued={queued}; reason={reason}"
        if result == "queued":
            log.info(
                f"deferred: sendmessage to peer {token_hash(peer)} client_id {client_id or '-'} queued "
                f"until the peer writes ({queued} queued for it)"
            )
        if ps.defer_answer == "accepted" or not refusal[1]:
            return Outcome(_local_response(200, b'{"ret":0}', note), Decision.DEFERRED)
        return Outcome(_local_response(refusal[0], refusal[1], note), Decision.DEFERRED)


def budget_facts(
    b: BudgetView | None, now: float, events: tuple[str, ...] = (), effects: tuple[Effect, ...] = ()
) -> dict[str, Any] | None:
    """The peer's send budget after a send, as journaled (`budget`) and shown by explain: sends
    iLink accepted in the window, the known limit, what is left, the window's age, and what
    happened to the budget (learnt, raised, confirmed, reprobed, exhausted)."""
    if b is None:
        return None
    used = b.used + sum(1 for e in effects if isinstance(e, CountSend))
    limit = next((e.limit for e in effects if isinstance(e, LearnBudget)), b.limit)
    spent = b.refused or any(isinstance(e, SpendBudget) for e in effects)
    left = 0 if spent else (None if limit is None else max(limit - used, 0))
    return {
        "used": used,
        "limit": limit,
        "left": left,
        "window_age_s": round(now - b.inbound_at, 1),
        "events": list(events),
    }


async def drive(
    x: policy.Exchange,
    step: policy.Step | None,
    attempt: Callable[[policy.Step], Awaitable[http.Response]],
    trace: list[dict[str, Any]],
    clock: Callable[[], float],
) -> list[tuple[http.Response, bytes]]:
    """Make the attempts the core asks for, from `step` on, and tell it each outcome; returns
    the answers `x.tried` lists, as received, with their decoded bodies. `attempt` does the I/O
    (the engine's upstream, or explain's capture) and raises ReissueError when no answer came;
    each attempt is added to `trace` (see attempt_record). Every decision is the core's: whether
    there is another attempt, with which token, and whether an answer may be handed back."""
    answers: list[tuple[http.Response, bytes]] = []
    while step is not None:
        started = time.monotonic()  # (storing the attempt first is part of its time: ~0.1 ms)
        pending = attempt(step)
        try:
            response = await pending
        except ReissueError as e:
            ms = (time.monotonic() - started) * 1000
            trace.append(attempt_record(None, None, ms, step.kind, str(e), sent=e.sent))
            x.lost(e.sent, str(e))
        else:
            try:
                content: bytes | None = response.get_content(strict=True) or b""
            except ValueError:
                content = None
            ms = (time.monotonic() - started) * 1000
            trace.append(attempt_record(response.status_code, content or b"", ms, step.kind))
            doc = parse_json_object(content) if content is not None else None
            tried = len(x.tried)
            x.answered(response.status_code, stored_headers(response), content, doc)
            if len(x.tried) > tried:
                answers.append((response, content or b""))
        step = x.next(clock())
    return answers


def mark_unconfirmed(response: http.Response, rule: Rule, replaced: StoredAnswer | None) -> None:
    """Say on the answer that iLink accepted the send without a message_id: after the header the
    decision set, or as `unconfirmed; rule=NAME; ...` when it set none; under `unconfirmed: fail`
    the body becomes the failure the core chose (status and headers as they came otherwise)."""
    tail = policy.delivery_note(rule)
    note = response.headers.get(HEADER)
    response.headers[HEADER] = f"{note}; {tail}" if note else f"unconfirmed; rule={rule.name}; {tail}"
    if replaced is not None:
        response.status_code = replaced.status
        for k, v in replaced.headers:
            response.headers[k] = v
        response.headers.pop("content-encoding", None)
        response.content = replaced.body


def stored_headers(response: http.Response) -> tuple[tuple[str, str], ...]:
    """The answer's headers as kept with a message (framing and our own header left out)."""
    fields = response.headers.items(multi=True)
    return tuple((k, v) for k, v in fields if k.lower() not in _STORED_HEADER_SKIP)


def _failed_response(rule: Rule, error: str) -> http.Response:
    note = f"upstream-failed; rule={rule.name}; {error}"
    return _local_response(502, f"ilink-fixproxy: {error}".encode(), note, [("Content-Type", "text/plain")])


def _list(headers: tuple[tuple[str, str], ...] | None) -> list[tuple[str, str]] | None:
    return list(headers) if headers is not None else None


def attempt_record(
    status: int | None,
    body: bytes | None,
    ms: float,
    token: str,
    error: str | None = None,
    *,
    sent: bool = True,
) -> dict[str, Any]:
    """One upstream attempt as recorded in flow.metadata["ilink_fixproxy"]["attempts"]: no secrets,
    only what iLink said (status, ret, errcode, errmsg), how long it took, and which token kind
    was sent ("original", "fresh" or "none"); for a failed attempt its error, and `"sent": false`
    if it certainly never reached iLink (explain replays that distinction)."""
    record: dict[str, Any] = {"status": status, "ms": round(ms, 1), "token": token}
    if status is not None:
        summary = AnswerSummary.of(status, body)
        record.update(ret=summary.ret, errcode=summary.errcode, errmsg=summary.errmsg, empty=summary.empty)
    if error:
        record["error"] = error
        if not sent:
            record["sent"] = False
    return record


async def describe_state(store: Store, *, show_ids: bool) -> str:
    """The `ilink-fixproxy state` listing."""
    now = time.time()
    lines = []
    peers = await store.peers()
    started = await store.running_proxy_started()
    lines.append(f"{store.path}: {len(peers)} peer(s), counts {json.dumps(await store.counts())}")
    for p in peers:
        who = p.peer if show_ids else token_hash(p.peer)
        status = "window open"
        if p.closed_until and p.closed_until > now:
            status = f"window CLOSED for {p.closed_until - now:.0f}s more or until the peer writes"
        seen = f"last inbound {now - p.inbound_at:.0f}s ago" if p.inbound_at else "no inbound seen"
        lines.append(
            f"  peer {who}  bot {p.bot[:10]}  {status}; {seen}; "
            f"{_fresh_token_status(p, started, now, shared=store.shared)}; "
            f"{p.stale_tokens} stale token(s) remembered"
        )
        if (budget := await _budget_status(store, p, now)) is not None:
            lines.append(f"    {budget}")
    for bot, until, limited in await store.bots():
        cooling = f"cooling down for {until - now:.0f}s" if until and until > now else "not cooling down"
        learnt = await store.bot_budget(bot)
        budget = (
            f"; send budget {learnt[0]} per inbound message (learnt {now - learnt[1]:.0f}s ago)"
            if learnt
            else ""
        )
        lines.append(f"  bot {bot[:10]}: {cooling}; {limited} recent rate-limit answer(s){budget}")
    return "\n".join(lines)


async def _budget_status(store: Store, p: Peer, now: float) -> str | None:
    """The peer's send budget in its window, when one is known (a given limit is known to the
    proxy's rules only: the store shows the limit that applied at the window's last send)."""
    if p.inbound_at is None:
        return None
    learnt = await store.bot_budget(p.bot) if p.budget_limit is None else None
    limit = p.budget_limit if p.budget_limit is not None else (learnt[0] if learnt else None)
    window = f"{p.sent} send(s) accepted since the peer last wrote {now - p.inbound_at:.0f}s ago"
    if p.refused_at is not None:
        return f"send budget SPENT (iLink refused the newest token {now - p.refused_at:.0f}s ago): {window}"
    if limit is None:
        return None
    return f"send budget {max(limit - p.sent, 0)} of {limit} left: {window}"


def _fresh_token_status(p: Peer, started: float | None, now: float, *, shared: bool = False) -> str:
    """Whether a fresh token can be used. The file keeps only its hash; the token itself lives in
    the memory of the proxy that saw it, so it is usable only while that proxy runs. A shared
    store keeps it encrypted, for every replica."""
    if not p.newest_token or p.newest_seen is None:
        return "no fresh token"
    age = f"{now - p.newest_seen:.0f}s ago"
    if shared:
        return f"fresh token seen {age} (kept encrypted in the shared store)"
    if started is not None and p.newest_seen >= started:
        return f"fresh token seen {age} (in the running proxy's memory only, lost on restart)"
    return f"no fresh token (the one seen {age} was lost when the proxy that saw it stopped)"

"""Deferred delivery: keep sends refused because the peer's window is closed, deliver them when
the peer writes again.

Like a mail server: the send is accepted into a durable queue (the state file's outbox table),
and delivered later, oldest first, with the fresh context_token that the peer's inbound message
brought, paced and capped per flush so the fresh token keeps budget for the gateway's own reply.
Each queued send keeps its client_id; a delivery failure keeps it queued (bounded attempts);
expired ones are dropped and reported, never silently.

Queued sends are stored without the bot's Authorization header and without the context_token:
the credentials come from the request that triggers the flush (the same bot's getupdates poll),
the token is the fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mitmproxy import http

from .core.model import BudgetView
from .jsonedit import remove_member, set_value
from .matching import AnswerSummary, answer_is_failure, carries, parse_json_object
from .redact import token_hash
from .reissue import ReissueError, Reissuer
from .rules import Rule
from .state import Queued

if TYPE_CHECKING:
    from .ports import Store

log = logging.getLogger("ilink_fixproxy")

DELIVERY_TIMEOUT_S = 15.0  # what gateways allow a sendmessage
# A queued send being delivered is claimed in the store for this long (a shared store: the other
# replicas leave it alone; a replica killed mid-delivery lets go when the claim expires).
CLAIM_S = DELIVERY_TIMEOUT_S + 5.0
# Headers that describe the gateway's connection or carry its credentials: never stored.
_NOT_STORED = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)

Event = dict[str, Any]


async def _no_window(rule: Rule, bot: str, peer: str) -> BudgetView | None:
    return None


class Outbox:
    def __init__(
        self,
        store: Store,
        reissuer: Reissuer,
        rule_named: Callable[[str], Rule | None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.reissuer = reissuer
        self.rule_named = rule_named
        self.clock = clock  # the wall clock; `explain` passes the capture's
        self.listeners: list[Callable[[Event], None]] = []
        # The peer's send budget now (PeerTracker.window_budget): deliveries count against it
        # and stop when it is spent. None: not counted.
        self.window: Callable[[Rule, str, str], Awaitable[BudgetView | None]] = _no_window
        self._active: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[int]] = set()

    # ------------------------------------------------------------------ queueing

    async def defer(
        self, rule: Rule, bot: str, peer: str, client_id: str | None, request: http.Request, via: Any
    ) -> tuple[str, int]:
        """Queue a send; returns ("queued" | "duplicate" | "full" | "uneditable", sends now queued
        for the peer). "uneditable": the body carries a context_token the edit cannot take out (a
        UTF-8 BOM, UTF-16): not queued, since the outbox never stores a token in clear."""
        ps = rule.peer_state
        assert ps is not None
        raw = request.raw_content or b""
        body = remove_member(raw, rule.action.remove)
        if body is None:
            if carries(parse_json_object(raw) or {}, rule.action.remove):
                return "uneditable", await self.store.outbox_count(bot, peer)
            body = raw  # nothing to take out
        headers = [(k, v) for k, v in request.headers.items(multi=True) if k.lower() not in _NOT_STORED]
        await self.expire(self.clock())
        result, _ = await self.store.enqueue(
            bot=bot,
            peer=peer,
            client_id=client_id,
            rule=rule.name,
            method=request.method,
            url=request.url,
            headers=headers,
            body=body,
            via=via,
            now=self.clock(),
            max_per_peer=ps.outbox.max_per_peer,
            max_total=ps.outbox.max_total,
        )
        return result, await self.store.outbox_count(bot, peer)

    async def expire(self, now: float) -> list[Queued]:
        expired: list[Queued] = []
        for name in await self.store.outbox_rules():
            rule = self.rule_named(name)
            max_age = rule.peer_state.outbox.max_age_s if rule and rule.peer_state else 86400.0
            expired += await self.store.expire(now, max_age, rule=name)
        for q in expired:
            log.warning(
                f"outbox: dropped an expired deferred send to peer {token_hash(q.peer)} client_id "
                f"{q.client_id or '-'} (queued {now - q.created:.0f} s ago, {q.attempts} failed deliveries)"
            )
            self._emit(
                {
                    "event": "expired",
                    "peer": q.peer,
                    "bot": q.bot[:12],
                    "client_id": q.client_id,
                    "queued_s": round(now - q.created, 1),
                    "attempts": q.attempts,
                }
            )
        return expired

    # ------------------------------------------------------------------ delivering

    async def on_inbound(self, bot: str, peer: str, token: str | None, authorization: str) -> None:
        """The peer wrote: deliver its queued sends (in the background, one flush at a time)."""
        if (bot, peer) in self._active:
            return
        try:
            if not await self.store.outbox_count(bot, peer):
                return
        except self.store.errors as e:
            log.warning(
                f"outbox: cannot look for sends queued for peer {token_hash(peer)}: {type(e).__name__}"
            )
            return
        if (bot, peer) in self._active:  # (another inbound message started it meanwhile)
            return
        self._active.add((bot, peer))
        task = asyncio.ensure_future(self.flush(bot, peer, token, authorization))
        self._tasks.add(task)

        def finished(t: asyncio.Task[int]) -> None:
            self._tasks.discard(t)
            self._active.discard((bot, peer))
            if not t.cancelled() and t.exception() is not None:
                log.warning(f"outbox: flush to peer {token_hash(peer)} failed: {t.exception()!r}")

        task.add_done_callback(finished)

    async def flush(self, bot: str, peer: str, token: str | None, authorization: str) -> int:
        """Deliver up to the rule's flush_max queued sends, oldest first; returns how many went."""
        await self.expire(self.clock())
        queued = await self.store.outbox(bot, peer)
        if not queued:
            return 0
        first_rule = self.rule_named(queued[0].rule)
        limit = first_rule.peer_state.outbox.flush_max if first_rule and first_rule.peer_state else 3
        delivered = 0
        for i, q in enumerate(queued[:limit]):
            rule = self.rule_named(q.rule)
            if rule is None or rule.peer_state is None:
                continue
            if i:
                await asyncio.sleep(rule.peer_state.outbox.flush_gap_s)
            try:
                b = await self.window(rule, bot, peer)
            except self.store.errors:
                b = None  # (the claim below fails the same way, and says so)
            if b is not None and b.left() == 0:
                # The new window's budget is spent (deliveries count against it): the rest
                # waits for the peer's next message.
                log.info(f"outbox: send budget of peer {token_hash(peer)} spent; the rest waits")
                break
            if not await self.store.claim(q.id, CLAIM_S):
                continue  # another replica is delivering it (or just did)
            ok = await self._deliver(rule, q, token, authorization, b)
            if not ok:
                break  # the window closed again: the rest waits for the next inbound message
            delivered += 1
        if delivered:
            left = await self.store.outbox_count(bot, peer)
            log.info(
                f"outbox: delivered {delivered} deferred send(s) to peer {token_hash(peer)}; "
                f"{left} still queued"
            )
        return delivered

    async def _deliver(
        self, rule: Rule, q: Queued, token: str | None, authorization: str, window: BudgetView | None = None
    ) -> bool:
        ps = rule.peer_state
        assert ps is not None
        body = set_value(q.body, rule.action.remove, token) if token else q.body
        body = body or q.body
        fields = [
            (k.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
            for k, v in [*q.headers, ("Authorization", authorization)]
        ]
        request = http.Request.make(q.method, q.url, body, fields)
        started = time.monotonic()
        try:
            response = await self.reissuer.send(request, body, q.via, DELIVERY_TIMEOUT_S)
            content = response.get_content(strict=True) or b""
            error = None
        except (ReissueError, ValueError) as e:
            response, content, error = None, b"", str(e)
        ms = round((time.monotonic() - started) * 1000, 1)
        failed = response is None or answer_is_failure(
            rule.match, response.status_code, parse_json_object(content)
        )
        summary = error or AnswerSummary.of(response.status_code, content).short()  # type: ignore[union-attr]
        event: Event = {
            "peer": q.peer,
            "bot": q.bot[:12],
            "client_id": q.client_id,
            "rule": rule.name,
            "ms": ms,
            "queued_s": round(self.clock() - q.created, 1),
            "answer": summary,
            "token": "fresh" if token else "none",
        }
        if not failed and response is not None:
            # The record first, then the queue entry goes: a gateway retry of this client_id
            # in between (another replica, or this one while Redis answers) finds one of the
            # two and is replayed or held; in the other order it found neither and was sent again.
            if q.client_id:  # a gateway retry of this client_id now gets iLink's answer replayed
                now = self.clock()
                headers = [
                    (k, v) for k, v in response.headers.items(multi=True) if k.lower() != "content-length"
                ]
                await self.store.record_attempts(
                    q.bot,
                    q.client_id,
                    1,
                    True,
                    response.status_code,
                    headers,
                    content,
                    now,
                    since=now - ps.dedupe_s,
                )
            await self.store.dequeue(q.id)  # (its claim stays until it expires: nobody re-takes it)
            await self.store.bump("delivered_late")
            if window is not None:  # it counts against the peer's new window (shared with replicas)
                await self.store.count_send(
                    q.bot, q.peer, window.limit, False, self.clock(), window.inbound_at
                )
            log.info(
                f"delivered-late: deferred send to peer {token_hash(q.peer)} client_id {q.client_id or '-'} "
                f"after {event['queued_s']:.0f} s: {summary}"
            )
            self._emit({"event": "delivered-late", **event})
            return True
        attempts = await self.store.note_failure(q.id, summary)
        if attempts >= ps.outbox.max_attempts:
            await self.store.dequeue(q.id)
            await self.store.bump("dropped")
            log.warning(
                f"outbox: gave up on deferred send to peer {token_hash(q.peer)} client_id "
                f"{q.client_id or '-'} after {attempts} failed deliveries: {summary}"
            )
            self._emit({"event": "dropped", **event, "attempts": attempts})
        else:
            log.warning(
                f"outbox: delivery to peer {token_hash(q.peer)} client_id {q.client_id or '-'} failed "
                f"({summary}); still queued ({attempts}/{ps.outbox.max_attempts} attempts)"
            )
            self._emit({"event": "delivery-failed", **event, "attempts": attempts})
            await self.store.unclaim(q.id)
        return False

    def _emit(self, event: Event) -> None:
        event = {"time": self.clock(), **event}
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception as e:  # a broken listener must not stop deliveries
                log.warning(f"outbox: event listener failed: {type(e).__name__}: {e}")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

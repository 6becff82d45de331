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
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from .jsonedit import get_path, remove_member, replace_value
from .matching import AnswerSummary, answer_is_failure, parse_json_object
from .outbox import Outbox
from .redact import token_hash
from .reissue import ReissueError, Reissuer
from .rules import PeerState, Rule
from .state import StateStore

log = logging.getLogger("ilink_fixproxy")

HEADER = "X-Ilink-Fixproxy"
FRESH_CACHE_SIZE = 100_000
# The first attempt is not bounded by the rule's deadline (that is for re-issues: a slow but
# successful answer must still reach the caller), only by this, so nothing hangs forever.
FIRST_ATTEMPT_TIMEOUT_S = 60.0
# Nor by the buffer limit (a 2 MB answer iLink gave must still reach the caller: it may have
# delivered), but by this: the answer is held in memory whole, and a sendmessage answer is a few
# dozen bytes (`{"ret":0}`). 64 MiB let four concurrent 1 GB answers from a broken upstream take
# the proxy from 84 to 342 MB RSS; past 4 MiB the gateway gets a 502 saying so (the send did go
# upstream: it counts as an attempt).
FIRST_ATTEMPT_MAX_BYTES = 4 * 1024 * 1024
_STORED_HEADER_SKIP = frozenset(
    {"content-length", "content-encoding", "transfer-encoding", "date", HEADER.lower()}
)


@dataclass(frozen=True)
class Outcome:
    """What one message's exchange ended with."""

    response: http.Response | None  # None: hand the flow back to mitmproxy's own forwarding
    decision: str
    accepted: bool = False
    trace: tuple[dict[str, Any], ...] = ()  # one entry per upstream attempt (see attempt_record)
    # What the send taught us, still to be stored (PeerTracker.handle's write_back_later)
    record: Callable[[], None] | None = None


# Outcome.record, the send's single-flight key and its done future (see PeerTracker.handle)
_Unwritten = tuple[Callable[[], None], tuple[str, str] | None, asyncio.Future[None]]


@dataclass
class _Attempt:
    token: str | None
    response: http.Response
    body: bytes
    doc: dict[str, Any] | None


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
    budget: int  # upstream attempts this message may still use
    attempts: list[_Attempt] = field(default_factory=list)
    sent: int = 0  # attempts that (may have) reached the upstream
    trace: list[dict[str, Any]] = field(default_factory=list)
    reissue_failed: bool = False


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


class PeerTracker:
    def __init__(
        self, store: StateStore, reissuer: Reissuer, rule_named: Callable[[str], Rule | None] = lambda _: None
    ) -> None:
        self.store = store
        self.reissuer = reissuer
        self.outbox = Outbox(store, reissuer, rule_named)
        # The bots' Authorization values, in memory only: deferred sends are stored without them
        # and delivered with the credentials of the bot's latest request.
        self._auth: dict[str, str] = {}
        # Authorization -> its keyed hash: an HMAC per send is measurable, a proxy serves a handful
        # of bots (memory only, like _auth).
        self._bot_hash = functools.lru_cache(maxsize=10_000)(store.keyed_hash)
        self._fresh: OrderedDict[tuple[str, str], str] = OrderedDict()  # clear tokens: memory only
        # (bot, client_id) -> done when the send under way for it has finished (single flight)
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}
        # flow id -> (record, single-flight key, its done future): answered, not yet stored
        self._unwritten: dict[str, _Unwritten] = {}

    def close(self) -> None:
        self.write_back()
        self.store.close()

    def busy(self) -> bool:
        return bool(self._inflight) or bool(self._unwritten) or bool(self.outbox._tasks)

    def write_back(self, flow_id: str | None = None) -> None:
        """Store what answered sends taught us (see handle): `flow_id`'s, or every one pending."""
        if flow_id is None:
            pending, self._unwritten = list(self._unwritten.values()), {}
        elif (one := self._unwritten.pop(flow_id, None)) is not None:
            pending = [one]
        else:
            return
        for record, key, done in pending:
            try:
                record()
            except Exception as e:  # the gateway has its answer; only our memory of it is lost
                log.warning(f"peer state: could not record a send: {type(e).__name__}: {e}")
            finally:
                self._settle(key, done)

    def _settle(self, key: tuple[str, str] | None, done: asyncio.Future[None]) -> None:
        if key and self._inflight.get(key) is done:
            del self._inflight[key]
        if not done.done():
            done.set_result(None)

    # ------------------------------------------------------------------ learning from getupdates

    def observe_updates(self, flow: http.HTTPFlow) -> int:
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
        now = time.time()
        seen = 0
        for msg in msgs:
            if not isinstance(msg, dict) or not (peer := _text(msg.get("from_user_id"))):
                continue
            token = _text(msg.get("context_token"))
            self.store.saw_inbound(bot, peer, self.store.keyed_hash(token) if token else None, now)
            if token:
                self._fresh[(bot, peer)] = token
                self._fresh.move_to_end((bot, peer))
                if len(self._fresh) > FRESH_CACHE_SIZE:
                    self._fresh.popitem(last=False)
            if (auth := self._auth.get(bot)) is not None:
                self.outbox.on_inbound(bot, peer, token or self.fresh_token(bot, peer), auth)
            seen += 1
        if seen:
            log.info(f"getupdates: {seen} inbound message(s); their senders' send windows are open")
        return seen

    def remember_auth(self, bot: str, request: http.Request) -> None:
        if auth := request.headers.get("authorization"):
            self._auth[bot] = auth
            if len(self._auth) > 10_000:
                self._auth.pop(next(iter(self._auth)))

    def flush_requested(self) -> None:
        """Serve `ilink-fixproxy outbox flush PEER` requests left in the state file."""
        for wanted in self.store.take_flush_requests():
            for q in self.store.outbox():
                if wanted in (q.peer, token_hash(q.peer)) and (auth := self._auth.get(q.bot)):
                    self.outbox.on_inbound(q.bot, q.peer, self.fresh_token(q.bot, q.peer), auth)

    def bot_of(self, request: http.Request) -> str:
        return self._bot_hash(request.headers.get("authorization", ""))

    def fresh_token(self, bot: str, peer: str | None) -> str | None:
        """The newest token seen for the peer, if the store still agrees it is the newest."""
        if not peer or (token := self._fresh.get((bot, peer))) is None:
            return None
        p = self.store.peer(bot, peer)
        if p is None or p.newest_token != self.store.keyed_hash(token):
            self._fresh.pop((bot, peer), None)  # forgotten (`state forget`) or superseded
            return None
        return token

    # ------------------------------------------------------------------ a send

    async def handle(
        self, flow: http.HTTPFlow, rule: Rule, doc: dict[str, Any], *, write_back_later: bool = False
    ) -> Outcome:
        """Deliver one sendmessage, repairing it if it fails. With `write_back_later` what it
        taught us is stored only at write_back(flow.id): the addon calls that once the answer
        is on its way to the gateway, so the store's commit is not part of the send's latency.
        Until then a retry of the same client_id waits, as for a send still under way."""
        ps = rule.peer_state
        assert ps is not None
        now = time.time()
        bot = self.bot_of(flow.request)
        peer = _text(get_path(doc, ps.peer)[1])
        client_id = _text(get_path(doc, ps.client_id)[1])
        key = (bot, client_id) if client_id else None
        token = _text(get_path(doc, rule.action.remove)[1])
        flow.metadata.setdefault("ilink_fixproxy", {}).update(
            {
                "bot": bot[:12],
                "peer": peer,
                "client_id": client_id,
                "token": token_hash(token) if token else None,
            }
        )

        self.remember_auth(bot, flow.request)
        if key and (running := self._inflight.get(key)) is not None:
            await asyncio.shield(running)  # a retry of a message still on its way: wait for it
        # What the store knows about this send, looked up together (one transaction: see batch)
        closable = ps.on_closed in ("answer-locally", "defer")
        with self.store.batch(write=False):
            queued = self.store.queued_id(bot, client_id) if client_id and peer else None
            msg = self.store.message(bot, client_id, since=now - ps.dedupe_s) if client_id else None
            cooldown = self.store.cooldown(bot, now)
            p = self.store.peer(bot, peer) if peer and closable else None
        if queued is not None and peer:
            return self._deferred(rule, bot, peer, client_id, flow.request, flow.server_conn.via, None)
        prior = 0
        if msg and msg.accepted and msg.status is not None:
            note = f"replayed; rule={rule.name}; iLink already accepted this client_id"
            return Outcome(
                _local_response(msg.status, msg.body or b"", note, msg.headers), "replayed", accepted=True
            )
        if msg:
            prior = msg.attempts
            if prior >= ps.max_attempts and msg.status is not None:
                note = (
                    f"answered-locally; reason=attempts-used; rule={rule.name}; "
                    f"attempts={prior}; answer={AnswerSummary.of(msg.status, msg.body).short()}"
                )
                return Outcome(
                    _local_response(msg.status, msg.body or b"", note, msg.headers), "answered-locally"
                )
        if cooldown is not None:
            note = f"answered-locally; reason=cooling-down; rule={rule.name}; for={cooldown.until - now:.0f}s"
            return Outcome(_local_response(cooldown.status, cooldown.body, note), "answered-locally")
        if peer and p and p.closed_until and p.closed_until > now and p.closed_status is not None:
            if ps.on_closed == "defer":
                refusal = (p.closed_status, p.closed_body or b"")
                return self._deferred(rule, bot, peer, client_id, flow.request, flow.server_conn.via, refusal)
            note = (
                f"answered-locally; reason=window-closed; rule={rule.name}; "
                f"until-inbound-or={p.closed_until - now:.0f}s"
            )
            return Outcome(_local_response(p.closed_status, p.closed_body or b"", note), "answered-locally")

        send = _Send(
            rule=rule,
            request=flow.request,  # not copied: nothing changes it once this hook answers
            via=flow.server_conn.via,
            bot=bot,
            peer=peer,
            client_id=client_id,
            token=token,
            deadline=flow.request.timestamp_start + rule.action.deadline_s,
            budget=max(ps.max_attempts - prior, 0),
        )
        # Run right here, in mitmproxy's hook task: mitmproxy never cancels a hook task when the
        # gateway hangs up (it only abandons its own upstream exchange; proxy/server.py in 11.0
        # and 12.3), so the exchange still completes and is recorded. A separate shielded task
        # cost three more event-loop turns per send.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key:
            self._inflight[key] = done
        outcome = None
        try:
            outcome = await self._exchange(send)
            return outcome
        finally:
            if outcome is not None and outcome.record is not None:
                self._unwritten[flow.id] = (outcome.record, key, done)
                if not write_back_later:
                    self.write_back(flow.id)
            else:
                self._settle(key, done)

    async def _exchange(self, send: _Send) -> Outcome:
        ps = send.rule.peer_state
        assert ps is not None
        first, decision = self._first_token(send, ps)
        original = send.request.raw_content or b""
        try:
            await self._attempt(send, first, original, FIRST_ATTEMPT_TIMEOUT_S, FIRST_ATTEMPT_MAX_BYTES)
        except ReissueError as e:
            if not e.sent:
                log.warning(f"sendmessage: cannot reach upstream ({e}); mitmproxy forwards it instead")
                return Outcome(None, "fallback", trace=tuple(send.trace))
            self._record(send, accepted=False, status=502, headers=[], body=b"")
            note = f"upstream-failed; rule={send.rule.name}; {e}"
            log.warning(f"sendmessage to {token_hash(send.peer)}: {e}; the gateway gets HTTP 502")
            return Outcome(
                _local_response(502, f"ilink-fixproxy: {e}".encode(), note, [("Content-Type", "text/plain")]),
                "upstream-failed",
                trace=tuple(send.trace),
            )

        while self._failed(send) and send.sent < min(send.budget, 1 + send.rule.action.retries):
            nxt = self._next_token(send, ps)
            if nxt is False:
                break
            try:
                await self._attempt(send, nxt, original, send.deadline - time.time())
                if send.reissue_failed:
                    log.warning(
                        f"sendmessage to peer {token_hash(send.peer)}: re-issue answer unusable "
                        f"({send.trace[-1].get('status')}); the original answer is kept"
                    )
                    break
            except ReissueError as e:
                # Never worse than no proxy: the answer already received goes back unchanged, and
                # an attempt whose fate is unknown teaches us nothing about the peer or the bot.
                log.warning(
                    f"sendmessage to peer {token_hash(send.peer)}: re-issue failed ({e}); "
                    "the original answer is kept"
                )
                send.reissue_failed = True
                break
        outcome = self._conclude(send, decision)
        if outcome.decision == "window-closed" and ps.on_closed == "defer" and send.peer:
            final = send.attempts[-1]
            deferred = self._deferred(
                send.rule,
                send.bot,
                send.peer,
                send.client_id,
                send.request,
                send.via,
                (final.response.status_code, final.body),
            )
            return Outcome(deferred.response, deferred.decision, trace=outcome.trace, record=outcome.record)
        return outcome

    def _deferred(
        self,
        rule: Rule,
        bot: str,
        peer: str,
        client_id: str | None,
        request: http.Request,
        via: Any,
        refusal: tuple[int, bytes] | None,
    ) -> Outcome:
        """Queue the send for delivery when the peer writes, and answer per defer_answer."""
        ps = rule.peer_state
        assert ps is not None
        result, queued = self.outbox.defer(rule, bot, peer, client_id, request, via)
        if refusal is None:  # a retry of a send already queued: its refusal is not at hand
            p = self.store.peer(bot, peer)
            refusal = (p.closed_status or 200, p.closed_body or b"") if p and p.closed_status else (200, b"")
        if result == "full":
            log.warning(f"outbox full for peer {token_hash(peer)}: client_id {client_id or '-'} not queued")
            note = f"answered-locally; reason=outbox-full; rule={rule.name}; queued={queued}"
            return Outcome(_local_response(refusal[0], refusal[1], note), "answered-locally")
        note = f"deferred; rule={rule.name}; queued={queued}; reason=window-closed"
        if result == "queued":
            log.info(
                f"deferred: sendmessage to peer {token_hash(peer)} client_id {client_id or '-'} queued "
                f"until the peer writes ({queued} queued for it)"
            )
        if ps.defer_answer == "accepted" or not refusal[1]:
            return Outcome(_local_response(200, b'{"ret":0}', note), "deferred")
        return Outcome(_local_response(refusal[0], refusal[1], note), "deferred")

    def _first_token(self, send: _Send, ps: PeerState) -> tuple[str | None, str]:
        if send.token is None:
            return None, "passed"
        fresh = self.fresh_token(send.bot, send.peer) if ps.substitute_fresh else None
        if fresh and fresh != send.token:
            return fresh, "substituted"
        if ps.remember_stale and self.store.is_stale(send.bot, self.store.keyed_hash(send.token)):
            return None, "stripped"
        return send.token, "passed"

    def _next_token(self, send: _Send, ps: PeerState) -> str | bool | None:
        """The next token to try after a stale answer, or False when there is none left."""
        if send.token is None:
            return False  # the gateway sent none: nothing to repair by changing it
        tried = [a.token for a in send.attempts]
        fresh = self.fresh_token(send.bot, send.peer) if ps.substitute_fresh else None
        if fresh and fresh not in tried and not self.store.is_stale(send.bot, self.store.keyed_hash(fresh)):
            return fresh
        return None if None not in tried else False

    async def _attempt(
        self, send: _Send, token: str | None, original: bytes, timeout: float, max_bytes: int | None = None
    ) -> None:
        path = send.rule.action.remove
        if token == send.token:
            body = original
        elif token is None:
            body = remove_member(original, path) or original
        else:
            body = replace_value(original, path, token) or original
        kind = _describe_token(token, send.token)
        started = time.monotonic()
        try:
            response = await self.reissuer.send(send.request, body, send.via, timeout, max_bytes)
        except ReissueError as e:
            send.trace.append(attempt_record(None, None, (time.monotonic() - started) * 1000, kind, str(e)))
            raise
        send.sent += 1
        try:
            content = response.get_content(strict=True) or b""
            decodable = True
        except ValueError:
            content, decodable = b"", False
        send.trace.append(
            attempt_record(response.status_code, content, (time.monotonic() - started) * 1000, kind)
        )
        doc = parse_json_object(content) if decodable else None
        usable = not send.attempts or (
            decodable and response.status_code == 200 and (not content or doc is not None)
        )
        if usable:
            send.attempts.append(_Attempt(token, response, content, doc))
        else:
            # A re-issue answered with something we cannot hand back (5xx, non-JSON, cut short):
            # like a reset, the caller keeps the earlier answer and nothing is learnt from it.
            send.reissue_failed = True

    def _failed(self, send: _Send) -> bool:
        last = send.attempts[-1]
        return answer_is_failure(send.rule.match, last.response.status_code, last.doc)

    def _conclude(self, send: _Send, decision: str) -> Outcome:
        ps = send.rule.peer_state
        assert ps is not None
        final = send.attempts[-1]
        first = send.attempts[0]
        failed = self._failed(send)
        now = time.time()
        fields = final.response.headers.items(multi=True)
        headers = [(k, v) for k, v in fields if k.lower() not in _STORED_HEADER_SKIP]
        store = self.store
        writes: list[Callable[[], object]] = []  # what this send taught us (see handle)
        if send.reissue_failed and len(send.attempts) == 1:
            decision = "reissue-failed"
        elif not failed:
            if len(send.attempts) > 1:
                decision = "repaired"
            if send.token and final.token != send.token and ps.remember_stale and decision != "stripped":
                # ("stripped": the store already knew the token was stale, no need to say it again)
                stale = store.keyed_hash(send.token)
                writes.append(functools.partial(store.mark_stale, send.bot, stale, send.peer or "", now))
            if send.peer:
                writes.append(functools.partial(store.open_window, send.bot, send.peer, now))
        elif send.token is not None and final.token is None and send.peer:
            # Even the tokenless send was refused: the peer's window is closed until it writes.
            decision = "window-closed"
            until = now + ps.closed_for_s
            status = final.response.status_code
            writes.append(
                functools.partial(store.close_window, send.bot, send.peer, until, status, final.body, now)
            )
        else:
            # Refused with no token from the gateway, or with a fresh one: a genuine rate limit.
            # (Stored now: whether it starts a cooldown is part of the answer.)
            decision = "rate-limited"
            with store.batch(write=True):
                if store.count_limited(send.bot, now, ps.cooldown.within_s) >= ps.cooldown.after:
                    decision = "cooldown-started"
                    store.start_cooldown(
                        send.bot, now + ps.cooldown.for_s, final.response.status_code, final.body, now
                    )
        status = final.response.status_code
        writes.append(
            functools.partial(
                self._record, send, accepted=not failed, status=status, headers=headers, body=final.body
            )
        )

        # A plain pass-through is the common case: logged at debug, so INFO shows what the proxy
        # did; and nothing is worked out for a line nobody will see.
        if decision != "passed" or log.isEnabledFor(logging.DEBUG):
            summary_final = AnswerSummary.of(final.response.status_code, final.body).short()
            tokens = " -> ".join(_describe_token(a.token, send.token) for a in send.attempts)
            if decision not in ("passed", "reissue-failed"):
                summary_first = AnswerSummary.of(first.response.status_code, first.body).short()
                final.response.headers[HEADER] = (
                    f"{decision}; rule={send.rule.name}; attempts={len(send.attempts)}; tokens={tokens}; "
                    f"first={summary_first}; now={summary_final}"
                )
            (log.debug if decision == "passed" else log.info)(
                f"{decision}: sendmessage to peer {token_hash(send.peer)} client_id {send.client_id or '-'} "
                f"with context_token {token_hash(send.token)}: {len(send.attempts)} attempt(s) [{tokens}]: "
                f"{summary_final}"
            )
        return Outcome(
            final.response,
            decision,
            accepted=not failed,
            trace=tuple(send.trace),
            record=functools.partial(self._store_all, tuple(writes)),
        )

    def _store_all(self, writes: tuple[Callable[[], object], ...]) -> None:
        with self.store.batch(write=True):  # one commit
            for write in writes:
                write()

    def _record(
        self, send: _Send, *, accepted: bool, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        if send.client_id:
            ps = send.rule.peer_state
            assert ps is not None
            now = time.time()
            self.store.record_attempts(
                send.bot,
                send.client_id,
                send.sent,
                accepted,
                status,
                headers,
                body,
                now,
                since=now - ps.dedupe_s,
            )


def attempt_record(
    status: int | None, body: bytes | None, ms: float, token: str, error: str | None = None
) -> dict[str, Any]:
    """One upstream attempt as recorded in flow.metadata["ilink_fixproxy"]["attempts"]: no secrets,
    only what iLink said (status, ret, errcode, errmsg), how long it took, and which token kind
    was sent ("original", "fresh" or "none")."""
    record: dict[str, Any] = {"status": status, "ms": round(ms, 1), "token": token}
    if status is not None:
        summary = AnswerSummary.of(status, body)
        record.update(ret=summary.ret, errcode=summary.errcode, errmsg=summary.errmsg, empty=summary.empty)
    if error:
        record["error"] = error
    return record


def _describe_token(token: str | None, original: str | None) -> str:
    if token is None:
        return "none"
    return "original" if token == original else "fresh"


def describe_state(store: StateStore, *, show_ids: bool) -> str:
    """The `ilink-fixproxy state` listing."""
    now = time.time()
    lines = []
    peers = store.peers()
    lines.append(f"{store.path}: {len(peers)} peer(s), counts {json.dumps(store.counts())}")
    for p in peers:
        who = p.peer if show_ids else token_hash(p.peer)
        status = "window open"
        if p.closed_until and p.closed_until > now:
            status = f"window CLOSED for {p.closed_until - now:.0f}s more or until the peer writes"
        seen = f"last inbound {now - p.inbound_at:.0f}s ago" if p.inbound_at else "no inbound seen"
        lines.append(
            f"  peer {who}  bot {p.bot[:10]}  {status}; {seen}; "
            f"{'fresh token known' if p.newest_token else 'no fresh token'}; "
            f"{p.stale_tokens} stale token(s) remembered"
        )
    for bot, until, limited in store.bots():
        cooling = f"cooling down for {until - now:.0f}s" if until and until > now else "not cooling down"
        lines.append(f"  bot {bot[:10]}: {cooling}; {limited} recent rate-limit answer(s)")
    return "\n".join(lines)

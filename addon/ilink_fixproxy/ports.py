"""The engine's two seams, as typed interfaces: the store it remembers messages in and the
upstream it sends them to. `state.SqliteStore` (the embedded SQLite file, the default),
`store_redis.RedisStore` (shared by several replicas) and `reissue.Reissuer` are the real ones;
tests and `explain` put fakes behind the same types.

The store is asynchronous because a shared store is reached over the network and must not
block mitmproxy's event loop. The SQLite store does its short synchronous work inside each call
and never suspends, so for it `async with batch()` is still one transaction nothing interleaves
with."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mitmproxy import http

    from .state import Cooldown, Message, Peer, Queued, Reads


class Upstream(Protocol):
    async def send(
        self,
        request: http.Request,
        body: bytes,
        via: tuple[str, tuple[str, int]] | None,
        timeout: float,
        max_bytes: int | None = None,
    ) -> http.Response:
        """The upstream's answer to `request` sent with `body`; reissue.ReissueError on any
        failure, with `sent` False only if nothing can have reached the upstream."""
        ...


class Store(Protocol):
    """What the send engine reads and writes. Any call may raise one of `errors` (sqlite3.Error,
    OSError: a full disk, a locked file; redis errors: Redis down or slow); the engine then
    decides without it and remembers the message in memory only. Each concern is one small
    method, so another store mirrors it method by method."""

    path: str  # what to show the operator (a Redis URL without its password)
    errors: tuple[type[BaseException], ...]
    shared: bool  # several proxy processes use it at once (single flight needs leases)

    def keyed_hash(self, secret: str) -> str: ...
    def batch(self, *, write: bool) -> AbstractAsyncContextManager[None]: ...
    async def aclose(self) -> None: ...

    # reads (one snapshot per send: `snapshot`, all of them at once, one round trip for Redis)
    async def snapshot(
        self,
        bot: str,
        client_id: str | None,
        peer: str | None,
        token_hash: str | None,
        since: float,
        now: float,
        *,
        with_peer: bool,
        with_fresh: bool,
        with_budget: bool = False,
        lease: tuple[str, float] | None = None,
        begin_new: bool = False,
    ) -> Reads:
        """Everything one send reads. With `lease` (owner, TTL in seconds), the message's lease
        is taken (or extended, if the owner's) first; held by another owner: `leased` False and
        nothing read (see PeerTracker.handle). With `with_budget`, the peer's window counters
        and the bot's learnt send budget are read too (the same round trip). With `begin_new`
        and the lease, a store may also store the first attempt of a message it has no record of
        (within `since`) and not queued, as begin_attempt would, and say so in `begun` (one
        round trip less per send); the engine then sends it, or takes it back with
        `release_lease(unbegin=True)`."""
        ...

    async def message(self, bot: str, client_id: str, since: float) -> Message | None: ...
    async def queued_id(self, bot: str, client_id: str) -> int | None: ...
    async def cooldown(self, bot: str, now: float) -> Cooldown | None: ...
    async def peer(self, bot: str, peer: str) -> Peer | None: ...
    async def is_stale(self, bot: str, token_hash: str) -> bool: ...
    async def fresh(self, bot: str, peer: str) -> str | None: ...
    async def bot_budget(self, bot: str) -> tuple[int, float] | None: ...
    async def budget_spent_peers(self) -> int: ...  # the gauge, read on scrape

    # writes
    async def begin_attempt(self, bot: str, client_id: str, now: float, since: float) -> None: ...
    async def settle_message(
        self,
        bot: str,
        client_id: str,
        state: str,
        attempts: int,
        answer: tuple[int, list[tuple[str, str]], bytes] | None,
        now: float,
        since: float,
        release: str | None = None,
    ) -> None:
        """Where the message stands after its exchange; with `release`, the lease that owner
        holds on it is let go in the same step (a waiting replica reads the settled record)."""
        ...

    async def record_attempts(
        self,
        bot: str,
        client_id: str,
        attempts: int,
        accepted: bool,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        now: float,
        since: float,
    ) -> None: ...
    async def mark_stale(self, bot: str, token_hash: str, peer: str, now: float) -> None: ...
    async def open_window(self, bot: str, peer: str, now: float) -> None: ...
    async def close_window(
        self, bot: str, peer: str, until: float, status: int, body: bytes, now: float
    ) -> None: ...
    async def count_limited(self, bot: str, now: float, window_s: float) -> int: ...
    async def start_cooldown(self, bot: str, until: float, status: int, body: bytes, now: float) -> None: ...
    async def saw_inbound(self, bot: str, peer: str, token_hash: str | None, now: float) -> None: ...
    async def remember_fresh(self, bot: str, peer: str, token: str) -> None: ...

    # send budgets (a peer's window counters are reset by saw_inbound). `window`: the start of
    # the window a send was made in (the peer's inbound_at it read): a send's write landing
    # after the peer wrote again (a late write-back, another replica's) leaves the new window be.
    async def count_send(
        self, bot: str, peer: str, limit: int | None, nudged: bool, now: float, window: float | None = None
    ) -> None: ...
    async def spend_budget(self, bot: str, peer: str, now: float, window: float | None = None) -> None: ...
    async def learn_budget(self, bot: str, limit: int, now: float) -> None: ...

    # single flight across processes (a process-local store grants every lease at once)
    async def take_lease(self, bot: str, client_id: str, owner: str, ttl_s: float) -> bool: ...
    async def release_lease(self, bot: str, client_id: str, owner: str, *, unbegin: bool = False) -> None:
        """Let go of the lease and publish the outcome; with `unbegin`, the first attempt the
        snapshot stored (`begun`) was not made: taken back, if the lease is still the owner's."""
        ...

    async def wait_lease(self, bot: str, client_id: str, timeout_s: float) -> None: ...

    # the outbox
    async def enqueue(
        self,
        *,
        bot: str,
        peer: str,
        client_id: str | None,
        rule: str,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        via: tuple[str, tuple[str, int]] | None,
        now: float,
        max_per_peer: int,
        max_total: int,
    ) -> tuple[str, int | None]: ...
    async def outbox(
        self, bot: str | None = None, peer: str | None = None, limit: int = -1
    ) -> list[Queued]: ...
    async def outbox_count(self, bot: str, peer: str) -> int: ...
    async def outbox_rules(self) -> list[str]: ...
    async def claim(self, queued_id: int, ttl_s: float) -> bool: ...
    async def unclaim(self, queued_id: int) -> None: ...
    async def dequeue(self, queued_id: int) -> bool: ...
    async def note_failure(self, queued_id: int, error: str) -> int: ...
    async def expire(self, now: float, max_age_s: float, rule: str | None = None) -> list[Queued]: ...
    async def outbox_stats(self, now: float) -> dict[str, float]: ...
    async def request_flush(self, peer: str, now: float) -> None: ...
    async def take_flush_requests(self) -> list[str]: ...
    async def bump(self, name: str, by: int = 1) -> None: ...

    # the `state` command and /metrics
    async def peers(self) -> list[Peer]: ...
    async def bots(self) -> list[tuple[str, float | None, int]]: ...
    async def counts(self) -> dict[str, int]: ...
    async def forget_peer(self, peer_or_hash: str, hasher: object = None) -> int: ...
    async def running_proxy_started(self) -> float | None: ...

"""The engine's two seams, as typed interfaces: the store it remembers messages in and the
upstream it sends them to. `state.StateStore` (SQLite, the embedded default) and
`reissue.Reissuer` are the real ones; tests and `explain` put fakes behind the same types, and a
shared store for several replicas fits here without touching the core."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mitmproxy import http

    from .state import Cooldown, Message, Peer


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
    """What the send engine reads and writes. Writes may raise (sqlite3.Error, OSError: a full
    disk, a locked file); the engine then remembers the message in memory only."""

    path: str

    def keyed_hash(self, secret: str) -> str: ...
    def batch(self, *, write: bool) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...

    # reads (one snapshot per send)
    def message(self, bot: str, client_id: str, since: float) -> Message | None: ...
    def queued_id(self, bot: str, client_id: str) -> int | None: ...
    def cooldown(self, bot: str, now: float) -> Cooldown | None: ...
    def peer(self, bot: str, peer: str) -> Peer | None: ...
    def is_stale(self, bot: str, token_hash: str) -> bool: ...
    def bot_budget(self, bot: str) -> tuple[int, float] | None: ...
    def budget_spent_peers(self) -> int: ...  # the gauge, read on scrape

    # writes
    def begin_attempt(self, bot: str, client_id: str, now: float, since: float) -> None: ...
    def settle_message(
        self,
        bot: str,
        client_id: str,
        state: str,
        attempts: int,
        answer: tuple[int, list[tuple[str, str]], bytes] | None,
        now: float,
        since: float,
    ) -> None: ...
    def mark_stale(self, bot: str, token_hash: str, peer: str, now: float) -> None: ...
    def open_window(self, bot: str, peer: str, now: float) -> None: ...
    def close_window(
        self, bot: str, peer: str, until: float, status: int, body: bytes, now: float
    ) -> None: ...
    def count_limited(self, bot: str, now: float, window_s: float) -> int: ...
    def start_cooldown(self, bot: str, until: float, status: int, body: bytes, now: float) -> None: ...
    def saw_inbound(self, bot: str, peer: str, token_hash: str | None, now: float) -> None: ...

    # send budgets (a peer's window counters are reset by saw_inbound)
    def count_send(self, bot: str, peer: str, limit: int | None, nudged: bool, now: float) -> None: ...
    def spend_budget(self, bot: str, peer: str, now: float) -> None: ...
    def learn_budget(self, bot: str, limit: int, now: float) -> None: ...

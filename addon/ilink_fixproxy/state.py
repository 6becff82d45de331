"""The peer-state store: what the proxy remembers between requests and across restarts.

Embedded SQLite (WAL), one file per proxy, owner-only. It holds, per bot and peer: the keyed hash
of the newest context_token seen in getupdates, when the peer last wrote, whether its send window
is closed; per bot: the genuine rate-limit counter and cooldown; per message (client_id): upstream
attempts and the accepted answer, for idempotency. Tokens are stored only as keyed hashes
(HMAC-SHA256 with a random key kept in the file), never in clear. Every table is bounded: the
oldest rows are evicted.

All methods are synchronous and called from mitmproxy's single event-loop thread, so SQLite
sees one writer at a time; each call is a short indexed statement. The engine reaches them
through `SqliteStore`, the asynchronous `ports.Store` facade (whose calls never suspend).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MEMORY = ":memory:"
DEFAULT_NAME = "ilink-fixproxy-state.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    bot TEXT NOT NULL, peer TEXT NOT NULL,
    newest_token TEXT, newest_seen REAL, inbound_at REAL,
    closed_until REAL, closed_status INTEGER, closed_body BLOB,
    updated REAL NOT NULL,
    PRIMARY KEY (bot, peer)
);
CREATE INDEX IF NOT EXISTS peers_updated ON peers (updated);
CREATE TABLE IF NOT EXISTS stale_tokens (
    bot TEXT NOT NULL, token TEXT NOT NULL, peer TEXT NOT NULL, proven_at REAL NOT NULL,
    PRIMARY KEY (bot, token)
);
CREATE INDEX IF NOT EXISTS stale_proven ON stale_tokens (proven_at);
CREATE TABLE IF NOT EXISTS bots (
    bot TEXT PRIMARY KEY, limited_at TEXT NOT NULL DEFAULT '[]',
    cooldown_until REAL, cooldown_status INTEGER, cooldown_body BLOB, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    bot TEXT NOT NULL, client_id TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0, status INTEGER, headers TEXT, body BLOB,
    updated REAL NOT NULL, state TEXT,
    PRIMARY KEY (bot, client_id)
);
CREATE INDEX IF NOT EXISTS messages_updated ON messages (updated);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    bot TEXT NOT NULL, peer TEXT NOT NULL, client_id TEXT, created REAL NOT NULL,
    rule TEXT NOT NULL, method TEXT NOT NULL, url TEXT NOT NULL, headers TEXT NOT NULL,
    body BLOB NOT NULL, via TEXT, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    UNIQUE (bot, client_id)
);
CREATE INDEX IF NOT EXISTS outbox_peer ON outbox (bot, peer, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS flush_requests (peer TEXT PRIMARY KEY, requested REAL NOT NULL);
"""


class StateError(Exception):
    """The state file cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Limits:
    """Row caps; the oldest rows beyond them are evicted."""

    peers: int = 100_000
    stale_tokens: int = 100_000
    messages: int = 100_000


@dataclass(frozen=True)
class Peer:
    bot: str
    peer: str
    newest_token: str | None
    newest_seen: float | None
    inbound_at: float | None
    closed_until: float | None
    closed_status: int | None
    closed_body: bytes | None
    stale_tokens: int = 0
    # The send budget of the peer's current window (since inbound_at; reset by saw_inbound):
    sent: int = 0  # sends iLink accepted (count_send)
    refused_at: float | None = None  # iLink refused a send with the newest token (spend_budget)
    nudged_at: float | None = None  # the window keeper's nudge went (count_send nudged=True)
    budget_limit: int | None = None  # the limit known at the last count_send (for the gauge)


@dataclass(frozen=True)
class Message:
    attempts: int
    accepted: bool
    status: int | None
    headers: list[tuple[str, str]]
    body: bytes | None
    updated: float
    state: str | None = None  # a core.model.MessageState value; None: written by an older version


@dataclass(frozen=True)
class Queued:
    """A deferred send waiting in the outbox. Stored without Authorization and without the
    context_token: the bot's credentials and a fresh token are added when it is delivered."""

    id: int
    bot: str
    peer: str
    client_id: str | None
    created: float
    rule: str
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    via: tuple[str, tuple[str, int]] | None
    attempts: int
    last_error: str | None


@dataclass(frozen=True)
class Cooldown:
    until: float
    status: int
    body: bytes


@dataclass(frozen=True)
class Reads:
    """What the engine reads for one send, looked up together (`Store.snapshot`)."""

    queued_id: int | None
    message: Message | None
    cooldown: Cooldown | None
    peer: Peer | None
    fresh: str | None  # the newest token kept for the peer (the engine checks it is still newest)
    token_stale: bool  # the token hash asked about is a proven-stale one
    newest_stale: bool  # the peer's newest token (by its hash) is a proven-stale one
    leased: bool = True  # False: another process holds the message's lease (nothing was read)
    bot_budget: tuple[int, float] | None = None  # the bot's learnt send budget (with_budget)
    # True: the message had no record and its first attempt is now stored as in flight (the
    # snapshot's `begin_new`); the engine sends it, or takes it back with the lease
    begun: bool = False


class StateStore:
    def __init__(self, path: str, *, limits: Limits = Limits(), lock: bool = True) -> None:
        """Open (creating if needed) the state file; StateError if it is unusable or in use."""
        self.path = path
        self.limits = limits
        self._lock_fd: int | None = None
        self._writes = 0
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        db_path = path
        if path != MEMORY:
            try:
                # The file's identity, not the name given: through a symlink, a second proxy would
                # otherwise take a lock of its own name next to the link and both would deliver.
                p = Path(path).resolve()
                db_path = str(p)
                p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                if lock:
                    self._take_lock(p, path)
                fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    links = os.fstat(fd).st_nlink
                finally:
                    os.close(fd)
                if links > 1:
                    # A hard link is another name for the same file that no path check can see:
                    # the lock (named after the path) would not hold, and SQLite names its -wal
                    # file after the path, so two names corrupt it (sqlite.org/howtocorrupt.html).
                    self.close()
                    raise StateError(
                        f"state file {path} has {links} names (hard links): the one-proxy lock and "
                        "SQLite's write-ahead log both need exactly one; remove the other links "
                        "(or copy the file)"
                    )
                os.chmod(p, 0o600)
                st = os.stat(p)
                self._identity = (st.st_dev, st.st_ino)
            except OSError as e:
                self.close()
                raise StateError(f"cannot open state file {path}: {e.strerror or e}") from None
        try:
            self.db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            if path != MEMORY:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            self._migrate()
            self._key = self._hash_key()
            if self._lock_fd is not None:
                # Fresh tokens live only in the memory of the proxy that saw them: `state` compares
                # when each was seen with when the proxy holding the file started.
                self.db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('proxy_started', ?)",
                    (repr(time.time()).encode(),),
                )
        except sqlite3.DatabaseError as e:
            self.close()
            raise StateError(
                f"state file {path} is not a usable SQLite database ({e}); "
                "move it away or use another --state path"
            ) from None

    def file_problem(self) -> str | None:
        """What is wrong with the state file on disk, or None. SQLite keeps working on a file that
        was deleted or moved away, so nothing else notices: what the proxy learns from then on is
        lost when it restarts, and the `state`/`outbox` commands no longer see it. Only a stat():
        safe from any thread."""
        if self._identity is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return (
                f"state file {self.path} is gone (deleted or moved away): what the proxy learns "
                "now is lost at its next restart; put the file back or restart the proxy"
            )
        except OSError as e:
            return f"state file {self.path} cannot be checked: {e.strerror or e}"
        if (st.st_dev, st.st_ino) != self._identity:
            return (
                f"state file {self.path} was replaced by another file; the proxy still uses the one "
                "it opened: restart it to use the new one"
            )
        return None

    def _migrate(self) -> None:
        """State files written before messages had a `state` (see core.model.MessageState), and
        before send budgets (peers: the window's counters; bots: the learnt budget)."""
        for table, column, kind in (
            ("messages", "state", "TEXT"),
            ("peers", "sent", "INTEGER NOT NULL DEFAULT 0"),
            ("peers", "refused_at", "REAL"),
            ("peers", "nudged_at", "REAL"),
            ("peers", "budget_limit", "INTEGER"),
            ("bots", "budget", "INTEGER"),
            ("bots", "budget_at", "REAL"),
        ):
            columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _take_lock(self, p: Path, shown: str) -> None:
        lock_path = p.with_name(p.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StateError(
                f"state file {shown} is in use by another ilink-fixproxy (pid {holder}); "
                "stop it or give this one its own --state path"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _hash_key(self) -> bytes:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'hmac_key'").fetchone()
        if row:
            return bytes(row[0])
        key = secrets.token_bytes(32)
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES ('hmac_key', ?), ('schema', ?)",
            (key, str(SCHEMA_VERSION).encode()),
        )
        return key

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self.db = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)  # no pid left behind: nobody holds the file now
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def running_proxy_started(self) -> float | None:
        """When the proxy now holding this file started, or None when no proxy holds it.

        Read from the lock file's pid, without taking the lock: even a brief shared lock could
        make a proxy starting at that moment refuse to start. A pid left by a killed proxy
        counts only while some process has that pid.
        """
        if self.path == MEMORY:
            return None
        lock_path = Path(self.path).with_name(Path(self.path).name + ".lock")
        try:
            pid = int(lock_path.read_text(encoding="ascii").strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, under another user
        row = self.db.execute("SELECT value FROM meta WHERE key = 'proxy_started'").fetchone()
        try:
            return float(bytes(row[0])) if row else None
        except ValueError:
            return None

    # ------------------------------------------------------------------ hashing

    def keyed_hash(self, secret: str) -> str:
        """The stored form of a token or bot credential: HMAC-SHA256, 32 hex characters."""
        return hmac.new(self._key, secret.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]

    # ------------------------------------------------------------------ peers

    def saw_inbound(self, bot: str, peer: str, token_hash: str | None, now: float) -> None:
        """An inbound message from `peer`: newest token, and its send window is open again."""
        self.db.execute(
            """INSERT INTO peers (bot, peer, newest_token, newest_seen, inbound_at, updated)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (bot, peer) DO UPDATE SET
                 newest_token = COALESCE(excluded.newest_token, newest_token),
                 newest_seen = CASE WHEN excluded.newest_token IS NULL THEN newest_seen
                                    ELSE excluded.newest_seen END,
                 inbound_at = excluded.inbound_at, closed_until = NULL, closed_status = NULL,
                 closed_body = NULL, sent = 0, refused_at = NULL, nudged_at = NULL,
                 updated = excluded.updated""",
            (bot, peer, token_hash, now if token_hash else None, now, now),
        )
        self._wrote()

    _PEER_COLUMNS = (
        "p.bot, p.peer, p.newest_token, p.newest_seen, p.inbound_at, p.closed_until, p.closed_status, "
        "p.closed_body, p.sent, p.refused_at, p.nudged_at, p.budget_limit"
    )

    @staticmethod
    def _peer_row(r: tuple, stale: int = 0) -> Peer:
        return Peer(
            *r[:7],
            bytes(r[7]) if r[7] is not None else None,
            stale,
            sent=r[8] or 0,
            refused_at=r[9],
            nudged_at=r[10],
            budget_limit=r[11],
        )

    def peer(self, bot: str, peer: str) -> Peer | None:
        row = self.db.execute(
            f"SELECT {self._PEER_COLUMNS} FROM peers p WHERE p.bot = ? AND p.peer = ?", (bot, peer)
        ).fetchone()
        return self._peer_row(row) if row else None

    # ------------------------------------------------------------------ send budgets

    def count_send(
        self, bot: str, peer: str, limit: int | None, nudged: bool, now: float, window: float | None = None
    ) -> None:
        """iLink accepted one more send to `peer` in its current window: `sent` + 1; `limit` is
        the budget known then (kept for budget_spent_peers); `nudged`: it carried the nudge.
        `window`: the start (inbound_at) of the window it was sent in, read before the send: if
        the peer wrote since, it belongs to a window gone and is not counted in the new one."""
        if window is not None:
            self.db.execute(
                """UPDATE peers SET sent = sent + 1, budget_limit = ?,
                     nudged_at = COALESCE(?, nudged_at), updated = ?
                   WHERE bot = ? AND peer = ? AND inbound_at = ?""",
                (limit, now if nudged else None, now, bot, peer, window),
            )
            self._wrote()
            return
        self.db.execute(
            """INSERT INTO peers (bot, peer, sent, budget_limit, nudged_at, updated)
               VALUES (?, ?, 1, ?, ?, ?)
               ON CONFLICT (bot, peer) DO UPDATE SET sent = sent + 1,
                 budget_limit = excluded.budget_limit,
                 nudged_at = COALESCE(excluded.nudged_at, nudged_at), updated = excluded.updated""",
            (bot, peer, limit, now if nudged else None, now),
        )
        self._wrote()

    def spend_budget(self, bot: str, peer: str, now: float, window: float | None = None) -> None:
        """iLink refused a send carrying the peer's newest token after accepted ones: its budget
        is spent until it writes again (saw_inbound clears it). `window`: as for count_send."""
        if window is not None:
            self.db.execute(
                "UPDATE peers SET refused_at = ?, updated = ? WHERE bot = ? AND peer = ? AND inbound_at = ?",
                (now, now, bot, peer, window),
            )
            self._wrote()
            return
        self.db.execute(
            """INSERT INTO peers (bot, peer, refused_at, updated) VALUES (?, ?, ?, ?)
               ON CONFLICT (bot, peer) DO UPDATE SET refused_at = excluded.refused_at,
                 updated = excluded.updated""",
            (bot, peer, now, now),
        )
        self._wrote()

    def learn_budget(self, bot: str, limit: int, now: float) -> None:
        """The bot's budget per inbound message is `limit` (learnt, raised or confirmed at `now`)."""
        self.db.execute(
            """INSERT INTO bots (bot, budget, budget_at, updated) VALUES (?, ?, ?, ?)
               ON CONFLICT (bot) DO UPDATE SET budget = excluded.budget,
                 budget_at = excluded.budget_at, updated = excluded.updated""",
            (bot, limit, now, now),
        )
        self._wrote()

    def bot_budget(self, bot: str) -> tuple[int, float] | None:
        """The bot's learnt budget per inbound message and when it was learnt (or last checked)."""
        row = self.db.execute(
            "SELECT budget, budget_at FROM bots WHERE bot = ? AND budget IS NOT NULL", (bot,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def budget_spent_peers(self) -> int:
        """Peers whose known budget is spent now: refused in this window, or as many sends as
        the limit known at their last count."""
        return self.db.execute(
            "SELECT COUNT(*) FROM peers WHERE refused_at IS NOT NULL "
            "OR (budget_limit IS NOT NULL AND sent >= budget_limit)"
        ).fetchone()[0]

    def close_window(self, bot: str, peer: str, until: float, status: int, body: bytes, now: float) -> None:
        self.db.execute(
            """INSERT INTO peers (bot, peer, closed_until, closed_status, closed_body, updated)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (bot, peer) DO UPDATE SET closed_until = excluded.closed_until,
                 closed_status = excluded.closed_status, closed_body = excluded.closed_body,
                 updated = excluded.updated""",
            (bot, peer, until, status, body, now),
        )
        self._wrote()

    def open_window(self, bot: str, peer: str, now: float) -> None:
        self.db.execute(
            "UPDATE peers SET closed_until = NULL, closed_status = NULL, closed_body = NULL, updated = ? "
            "WHERE bot = ? AND peer = ? AND closed_until IS NOT NULL",
            (now, bot, peer),
        )

    def peers(self) -> list[Peer]:
        rows = self.db.execute(
            f"""SELECT {self._PEER_COLUMNS},
                      (SELECT COUNT(*) FROM stale_tokens s WHERE s.bot = p.bot AND s.peer = p.peer)
               FROM peers p ORDER BY p.updated DESC"""
        ).fetchall()
        return [self._peer_row(r[:12], r[12]) for r in rows]

    def forget_peer(self, peer_or_hash: str, hasher: callable | None = None) -> int:  # type: ignore[valid-type]
        """Forget everything about a peer (by id, or by the short hash `state` shows)."""
        peers = {r[0] for r in self.db.execute("SELECT DISTINCT peer FROM peers")}
        peers |= {r[0] for r in self.db.execute("SELECT DISTINCT peer FROM stale_tokens")}
        targets = [p for p in peers if p == peer_or_hash or (hasher and hasher(p) == peer_or_hash)]
        count = 0
        for p in targets:
            count += self.db.execute("DELETE FROM peers WHERE peer = ?", (p,)).rowcount
            count += self.db.execute("DELETE FROM stale_tokens WHERE peer = ?", (p,)).rowcount
        return count

    # ------------------------------------------------------------------ stale tokens

    def mark_stale(self, bot: str, token_hash: str, peer: str, now: float) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO stale_tokens (bot, token, peer, proven_at) VALUES (?, ?, ?, ?)",
            (bot, token_hash, peer, now),
        )
        self._wrote()

    def is_stale(self, bot: str, token_hash: str) -> bool:
        return (
            self.db.execute(
                "SELECT 1 FROM stale_tokens WHERE bot = ? AND token = ?", (bot, token_hash)
            ).fetchone()
            is not None
        )

    # ------------------------------------------------------------------ bots

    def count_limited(self, bot: str, now: float, window_s: float) -> int:
        """Record one genuine rate-limit answer; returns how many fell within the window."""
        row = self.db.execute("SELECT limited_at FROM bots WHERE bot = ?", (bot,)).fetchone()
        times = [t for t in (json.loads(row[0]) if row else []) if t > now - window_s] + [now]
        times = times[-1000:]
        self.db.execute(
            """INSERT INTO bots (bot, limited_at, updated) VALUES (?, ?, ?)
               ON CONFLICT (bot) DO UPDATE SET
                 limited_at = excluded.limited_at, updated = excluded.updated""",
            (bot, json.dumps(times), now),
        )
        return len(times)

    def start_cooldown(self, bot: str, until: float, status: int, body: bytes, now: float) -> None:
        self.db.execute(
            """UPDATE bots SET cooldown_until = ?, cooldown_status = ?, cooldown_body = ?,
                 limited_at = '[]', updated = ? WHERE bot = ?""",
            (until, status, body, now, bot),
        )

    def cooldown(self, bot: str, now: float) -> Cooldown | None:
        row = self.db.execute(
            "SELECT cooldown_until, cooldown_status, cooldown_body FROM bots "
            "WHERE bot = ? AND cooldown_until > ?",
            (bot, now),
        ).fetchone()
        return Cooldown(row[0], row[1], bytes(row[2])) if row else None

    def bots(self) -> list[tuple[str, float | None, int]]:
        rows = self.db.execute("SELECT bot, cooldown_until, limited_at FROM bots ORDER BY updated DESC")
        return [(b, until, len(json.loads(lim))) for b, until, lim in rows]

    # ------------------------------------------------------------------ messages (idempotency)

    def message(self, bot: str, client_id: str, since: float) -> Message | None:
        row = self.db.execute(
            """SELECT attempts, accepted, status, headers, body, updated, state FROM messages
               WHERE bot = ? AND client_id = ? AND updated >= ?""",
            (bot, client_id, since),
        ).fetchone()
        if not row:
            return None
        headers = [tuple(h) for h in json.loads(row[3])] if row[3] else []
        return Message(
            row[0],
            bool(row[1]),
            row[2],
            headers,
            bytes(row[4]) if row[4] is not None else None,
            row[5],
            row[6],
        )

    def begin_attempt(self, bot: str, client_id: str, now: float, since: float) -> None:
        """One more upstream attempt for this message is about to be sent: stored (committed)
        before its first byte goes out, so a crash or a lost answer still counts it."""
        self.db.execute(
            """INSERT INTO messages (bot, client_id, attempts, accepted, state, updated)
               VALUES (?, ?, 1, 0, 'in-flight', ?)
               ON CONFLICT (bot, client_id) DO UPDATE SET
                 attempts = CASE WHEN updated >= ? THEN attempts ELSE 0 END + 1,
                 accepted = 0,
                 status = CASE WHEN updated >= ? THEN status ELSE NULL END,
                 headers = CASE WHEN updated >= ? THEN headers ELSE NULL END,
                 body = CASE WHEN updated >= ? THEN body ELSE NULL END,
                 state = 'in-flight',
                 updated = excluded.updated""",
            (bot, client_id, now, since, since, since, since),
        )
        self._wrote()

    def settle_message(
        self,
        bot: str,
        client_id: str,
        state: str,
        attempts: int,
        answer: tuple[int, list[tuple[str, str]], bytes] | None,
        now: float,
        since: float,
    ) -> None:
        """Where the message stands after its exchange, and the answer to hand back if it comes
        again; `attempts` is the engine's count (never lowers the stored one)."""
        status, headers, body = answer if answer is not None else (None, None, None)
        self.db.execute(
            """INSERT INTO messages
                 (bot, client_id, attempts, accepted, status, headers, body, state, updated)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (bot, client_id) DO UPDATE SET
                 attempts = MAX(CASE WHEN updated >= ? THEN attempts ELSE 0 END, excluded.attempts),
                 accepted = excluded.accepted, status = excluded.status, headers = excluded.headers,
                 body = excluded.body, state = excluded.state, updated = excluded.updated""",
            (
                bot,
                client_id,
                attempts,
                int(state == "accepted"),
                status,
                json.dumps(headers) if headers is not None else None,
                body,
                state,
                now,
                since,
            ),
        )
        self._wrote()

    def record_attempts(
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
    ) -> None:
        """Add `attempts` upstream attempts to this message and store its latest answer."""
        self.db.execute(
            """INSERT INTO messages (bot, client_id, attempts, accepted, status, headers, body, updated)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (bot, client_id) DO UPDATE SET
                 attempts = CASE WHEN updated >= ? THEN attempts ELSE 0 END + excluded.attempts,
                 accepted = MAX(CASE WHEN updated >= ? THEN accepted ELSE 0 END, excluded.accepted),
                 status = CASE WHEN accepted AND updated >= ? THEN status ELSE excluded.status END,
                 headers = CASE WHEN accepted AND updated >= ? THEN headers ELSE excluded.headers END,
                 body = CASE WHEN accepted AND updated >= ? THEN body ELSE excluded.body END,
                 updated = excluded.updated""",
            (
                bot,
                client_id,
                attempts,
                int(accepted),
                status,
                json.dumps(headers),
                body,
                now,
                since,
                since,
                since,
                since,
                since,
            ),
        )
        self._wrote()

    # ------------------------------------------------------------------ outbox (deferred delivery)

    _QUEUED_COLUMNS = (
        "id, bot, peer, client_id, created, rule, method, url, headers, body, via, attempts, last_error"
    )

    @staticmethod
    def _queued(row: tuple) -> Queued:
        via = json.loads(row[10]) if row[10] else None
        return Queued(
            id=row[0],
            bot=row[1],
            peer=row[2],
            client_id=row[3],
            created=row[4],
            rule=row[5],
            method=row[6],
            url=row[7],
            headers=[(k, v) for k, v in json.loads(row[8])],
            body=bytes(row[9]),
            via=(via[0], (via[1][0], via[1][1])) if via else None,
            attempts=row[11],
            last_error=row[12],
        )

    def enqueue(
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
    ) -> tuple[str, int | None]:
        """Queue a send: ("queued", id), ("duplicate", id) for a client_id already queued, or
        ("full", None) when the peer's or the whole outbox's cap is reached."""
        if client_id:
            row = self.db.execute(
                "SELECT id FROM outbox WHERE bot = ? AND client_id = ?", (bot, client_id)
            ).fetchone()
            if row:
                return "duplicate", row[0]
        per_peer = self.db.execute(
            "SELECT COUNT(*) FROM outbox WHERE bot = ? AND peer = ?", (bot, peer)
        ).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        if per_peer >= max_per_peer or total >= max_total:
            return "full", None
        cur = self.db.execute(
            """INSERT INTO outbox (bot, peer, client_id, created, rule, method, url, headers, body, via)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                bot,
                peer,
                client_id,
                now,
                rule,
                method,
                url,
                json.dumps(headers),
                body,
                json.dumps(via) if via else None,
            ),
        )
        self.bump("deferred")
        return "queued", cur.lastrowid

    def queued_id(self, bot: str, client_id: str) -> int | None:
        row = self.db.execute(
            "SELECT id FROM outbox WHERE bot = ? AND client_id = ?", (bot, client_id)
        ).fetchone()
        return row[0] if row else None

    def outbox(self, bot: str | None = None, peer: str | None = None, limit: int = -1) -> list[Queued]:
        """Queued sends, oldest first (all of them, or one bot's peer's)."""
        if bot is None:
            rows = self.db.execute(f"SELECT {self._QUEUED_COLUMNS} FROM outbox ORDER BY id LIMIT ?", (limit,))
        else:
            rows = self.db.execute(
                f"SELECT {self._QUEUED_COLUMNS} FROM outbox WHERE bot = ? AND peer = ? ORDER BY id LIMIT ?",
                (bot, peer, limit),
            )
        return [self._queued(r) for r in rows]

    def outbox_count(self, bot: str, peer: str) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM outbox WHERE bot = ? AND peer = ?", (bot, peer)
        ).fetchone()[0]

    def dequeue(self, queued_id: int) -> bool:
        return self.db.execute("DELETE FROM outbox WHERE id = ?", (queued_id,)).rowcount > 0

    def note_failure(self, queued_id: int, error: str) -> int:
        self.db.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?", (error[:200], queued_id)
        )
        row = self.db.execute("SELECT attempts FROM outbox WHERE id = ?", (queued_id,)).fetchone()
        return row[0] if row else 0

    def outbox_rules(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT rule FROM outbox")]

    def expire(self, now: float, max_age_s: float, rule: str | None = None) -> list[Queued]:
        """Remove and return the sends (of one rule, or all) queued longer than max_age_s."""
        rows = [
            self._queued(r)
            for r in self.db.execute(
                f"SELECT {self._QUEUED_COLUMNS} FROM outbox WHERE created < ? AND (? IS NULL OR rule = ?) "
                "ORDER BY id",
                (now - max_age_s, rule, rule),
            )
        ]
        for q in rows:
            self.dequeue(q.id)
        if rows:
            self.bump("expired", len(rows))
        return rows

    def outbox_stats(self, now: float) -> dict[str, float]:
        depth, oldest = self.db.execute("SELECT COUNT(*), MIN(created) FROM outbox").fetchone()
        counters = self.counters()
        return {
            "depth": depth,
            "oldest_age_s": (now - oldest) if oldest else 0.0,
            "deferred": counters.get("deferred", 0),
            "delivered_late": counters.get("delivered_late", 0),
            "expired": counters.get("expired", 0),
            "dropped": counters.get("dropped", 0),
        }

    def request_flush(self, peer: str, now: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO flush_requests (peer, requested) VALUES (?, ?)", (peer, now))

    def take_flush_requests(self) -> list[str]:
        peers = [r[0] for r in self.db.execute("SELECT peer FROM flush_requests")]
        if peers:
            self.db.execute("DELETE FROM flush_requests")
        return peers

    # ------------------------------------------------------------------ counters

    def bump(self, name: str, by: int = 1) -> None:
        self.db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, value FROM counters").fetchall())

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def batch(self, *, write: bool) -> Iterator[None]:
        """Run the statements inside as one transaction.

        Why: every statement on its own is a transaction, and each takes and drops SQLite's
        locks (two fcntl() calls for a read, four or more for a write) and a write commits on
        its own; a send's handful of lookups, or its few updates, cost half as many system
        calls together. A write batch takes the write lock up front (BEGIN IMMEDIATE): a read
        that later turns into a write could otherwise fail outright when another process (the
        `state`/`outbox` commands) wrote in between. Nested batches join the outer one.
        """
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ housekeeping

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes % 500 == 0:
            self.evict()

    def evict(self) -> None:
        """Keep each table under its cap, dropping the least recently updated rows."""
        for table, column, cap in (
            ("peers", "updated", self.limits.peers),
            ("stale_tokens", "proven_at", self.limits.stale_tokens),
            ("messages", "updated", self.limits.messages),
        ):
            self.db.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} ORDER BY {column} DESC "
                f"LIMIT -1 OFFSET ?)",
                (cap,),
            )

    def counts(self) -> dict[str, int]:
        return {
            table: self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("peers", "stale_tokens", "bots", "messages", "outbox")
        }


def default_path(confdir: str) -> str:
    return str(Path(os.path.expanduser(confdir)) / DEFAULT_NAME)


FRESH_CACHE_SIZE = 100_000


class _Batch:
    """`async with` around StateStore.batch: nothing in it suspends, so it stays one transaction
    (a class, not asynccontextmanager: this runs twice per send)."""

    __slots__ = ("_cm",)

    def __init__(self, store: StateStore, write: bool) -> None:
        self._cm = store.batch(write=write)

    async def __aenter__(self) -> None:
        self._cm.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)  # type: ignore[arg-type]


class SqliteStore:
    """The state file behind the engine's asynchronous `ports.Store`: each method does its short
    synchronous SQLite work and returns, never suspending (so SQLite still sees one writer at a
    time, and a send costs what it did). Fresh context_tokens stay in this process's memory:
    the file never holds a token in clear, and one file serves one proxy."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    shared = False

    def __init__(self, db: StateStore) -> None:
        self.db = db
        self.path = db.path
        self.keyed_hash = db.keyed_hash
        self._fresh: OrderedDict[tuple[str, str], str] = OrderedDict()  # clear tokens: memory only

    def batch(self, *, write: bool) -> _Batch:
        return _Batch(self.db, write)

    def file_problem(self) -> str | None:
        return self.db.file_problem()

    async def aclose(self) -> None:
        self.db.close()

    # reads
    async def message(self, bot: str, client_id: str, since: float) -> Message | None:
        return self.db.message(bot, client_id, since)

    async def queued_id(self, bot: str, client_id: str) -> int | None:
        return self.db.queued_id(bot, client_id)

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
        # (one process per file: its own single flight suffices, every lease is granted; an
        # attempt is stored by begin_attempt, a local commit: nothing to save by folding it in)
        db = self.db
        with db.batch(write=False):  # one transaction: see StateStore.batch
            p = db.peer(bot, peer) if peer and (with_peer or with_fresh or with_budget) else None
            return Reads(
                queued_id=db.queued_id(bot, client_id) if client_id and peer else None,
                message=db.message(bot, client_id, since) if client_id else None,
                cooldown=db.cooldown(bot, now),
                peer=p,
                fresh=self._fresh.get((bot, peer)) if with_fresh and peer else None,
                token_stale=db.is_stale(bot, token_hash) if token_hash else False,
                newest_stale=(
                    db.is_stale(bot, p.newest_token)
                    if with_fresh and p is not None and p.newest_token and (bot, peer) in self._fresh
                    else False
                ),
                bot_budget=db.bot_budget(bot) if with_budget else None,
            )

    async def cooldown(self, bot: str, now: float) -> Cooldown | None:
        return self.db.cooldown(bot, now)

    async def peer(self, bot: str, peer: str) -> Peer | None:
        return self.db.peer(bot, peer)

    async def is_stale(self, bot: str, token_hash: str) -> bool:
        return self.db.is_stale(bot, token_hash)

    async def fresh(self, bot: str, peer: str) -> str | None:
        return self._fresh.get((bot, peer))

    async def bot_budget(self, bot: str) -> tuple[int, float] | None:
        return self.db.bot_budget(bot)

    async def budget_spent_peers(self) -> int:
        return self.db.budget_spent_peers()

    # writes
    async def begin_attempt(self, bot: str, client_id: str, now: float, since: float) -> None:
        self.db.begin_attempt(bot, client_id, now, since)

    async def settle_message(
        self,
        bot: str,
        client_id: str,
        state: str,
        attempts: int,
        answer: tuple[int, list[tuple[str, str]], bytes] | None,
        now: float,
        since: float,
        release: str | None = None,  # (no leases: one process per file)
    ) -> None:
        self.db.settle_message(bot, client_id, state, attempts, answer, now, since)

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
    ) -> None:
        self.db.record_attempts(bot, client_id, attempts, accepted, status, headers, body, now, since)

    async def mark_stale(self, bot: str, token_hash: str, peer: str, now: float) -> None:
        self.db.mark_stale(bot, token_hash, peer, now)

    async def open_window(self, bot: str, peer: str, now: float) -> None:
        self.db.open_window(bot, peer, now)

    async def close_window(
        self, bot: str, peer: str, until: float, status: int, body: bytes, now: float
    ) -> None:
        self.db.close_window(bot, peer, until, status, body, now)

    async def count_limited(self, bot: str, now: float, window_s: float) -> int:
        return self.db.count_limited(bot, now, window_s)

    async def start_cooldown(self, bot: str, until: float, status: int, body: bytes, now: float) -> None:
        self.db.start_cooldown(bot, until, status, body, now)

    async def saw_inbound(self, bot: str, peer: str, token_hash: str | None, now: float) -> None:
        self.db.saw_inbound(bot, peer, token_hash, now)

    async def count_send(
        self, bot: str, peer: str, limit: int | None, nudged: bool, now: float, window: float | None = None
    ) -> None:
        self.db.count_send(bot, peer, limit, nudged, now, window)

    async def spend_budget(self, bot: str, peer: str, now: float, window: float | None = None) -> None:
        self.db.spend_budget(bot, peer, now, window)

    async def learn_budget(self, bot: str, limit: int, now: float) -> None:
        self.db.learn_budget(bot, limit, now)

    async def remember_fresh(self, bot: str, peer: str, token: str) -> None:
        self._fresh[(bot, peer)] = token
        self._fresh.move_to_end((bot, peer))
        if len(self._fresh) > FRESH_CACHE_SIZE:
            self._fresh.popitem(last=False)

    # single flight: one process per file (the flock), whose own in-memory single flight suffices
    async def take_lease(self, bot: str, client_id: str, owner: str, ttl_s: float) -> bool:
        return True

    async def release_lease(self, bot: str, client_id: str, owner: str, *, unbegin: bool = False) -> None:
        return None

    async def wait_lease(self, bot: str, client_id: str, timeout_s: float) -> None:
        return None

    # the outbox
    async def enqueue(self, **kw: Any) -> tuple[str, int | None]:
        return self.db.enqueue(**kw)

    async def outbox(self, bot: str | None = None, peer: str | None = None, limit: int = -1) -> list[Queued]:
        return self.db.outbox(bot, peer, limit)

    async def outbox_count(self, bot: str, peer: str) -> int:
        return self.db.outbox_count(bot, peer)

    async def outbox_rules(self) -> list[str]:
        return self.db.outbox_rules()

    async def claim(self, queued_id: int, ttl_s: float) -> bool:
        return True  # one process per file: Outbox's own `_active` keeps flushes apart

    async def unclaim(self, queued_id: int) -> None:
        return None

    async def dequeue(self, queued_id: int) -> bool:
        return self.db.dequeue(queued_id)

    async def note_failure(self, queued_id: int, error: str) -> int:
        return self.db.note_failure(queued_id, error)

    async def expire(self, now: float, max_age_s: float, rule: str | None = None) -> list[Queued]:
        return self.db.expire(now, max_age_s, rule)

    async def outbox_stats(self, now: float) -> dict[str, float]:
        return self.db.outbox_stats(now)

    async def request_flush(self, peer: str, now: float) -> None:
        self.db.request_flush(peer, now)

    async def take_flush_requests(self) -> list[str]:
        return self.db.take_flush_requests()

    async def bump(self, name: str, by: int = 1) -> None:
        self.db.bump(name, by)

    # the `state` command and /metrics
    async def peers(self) -> list[Peer]:
        return self.db.peers()

    async def bots(self) -> list[tuple[str, float | None, int]]:
        return self.db.bots()

    async def counts(self) -> dict[str, int]:
        return self.db.counts()

    async def forget_peer(self, peer_or_hash: str, hasher: Any = None) -> int:
        return self.db.forget_peer(peer_or_hash, hasher)

    async def running_proxy_started(self) -> float | None:
        return self.db.running_proxy_started()

"""The peer-state store on its own: hashing, windows, stale memory, cooldowns, idempotency
records, bounds, locking and bad files."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.state import MEMORY, Limits, StateError, StateStore


@pytest.fixture
def store(tmp_path: Path):
    s = StateStore(str(tmp_path / "state.sqlite3"))
    yield s
    s.close()


def test_tokens_are_stored_only_as_keyed_hashes(tmp_path: Path):
    path = tmp_path / "s.sqlite3"
    s = StateStore(str(path))
    h = s.keyed_hash("ctx-secret-token")
    s.saw_inbound("bot", "peer", h, 1.0)
    s.mark_stale("bot", s.keyed_hash("ctx-old-token"), "peer", 2.0)
    s.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"ctx-secret-token" not in data and b"ctx-old-token" not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = StateStore(str(path))
    assert again.keyed_hash("ctx-secret-token") == h  # the key persists with the file
    again.close()
    other = StateStore(str(tmp_path / "other.sqlite3"))
    assert other.keyed_hash("ctx-secret-token") != h  # and is per file
    other.close()


def test_windows_open_on_inbound(store: StateStore):
    store.close_window("b", "p", until=100.0, status=200, body=b'{"ret":-2}', now=1.0)
    p = store.peer("b", "p")
    assert p and p.closed_until == 100.0 and p.closed_body == b'{"ret":-2}'
    store.saw_inbound("b", "p", store.keyed_hash("t2"), 5.0)
    p = store.peer("b", "p")
    assert p and p.closed_until is None and p.newest_token == store.keyed_hash("t2") and p.inbound_at == 5.0
    store.saw_inbound("b", "p", None, 6.0)  # a message without a token keeps the newest one
    assert store.peer("b", "p").newest_token == store.keyed_hash("t2")  # type: ignore[union-attr]


def test_stale_memory_is_per_bot(store: StateStore):
    h = store.keyed_hash("t")
    store.mark_stale("bot-a", h, "p", 1.0)
    assert store.is_stale("bot-a", h)
    assert not store.is_stale("bot-b", h)


def test_rate_limit_window_and_cooldown(store: StateStore):
    assert store.count_limited("b", now=0.0, window_s=10) == 1
    assert store.count_limited("b", now=5.0, window_s=10) == 2
    assert store.count_limited("b", now=20.0, window_s=10) == 1  # the old ones left the window
    store.start_cooldown("b", until=50.0, status=200, body=b"x", now=20.0)
    assert store.cooldown("b", now=30.0).body == b"x"  # type: ignore[union-attr]
    assert store.cooldown("b", now=51.0) is None
    assert store.bots()[0][0] == "b"


def test_message_attempts_accumulate_and_acceptance_sticks(store: StateStore):
    store.record_attempts("b", "c1", 1, False, 200, [], b'{"ret":-2}', now=10.0, since=0.0)
    store.record_attempts(
        "b", "c1", 1, True, 200, [("Content-Type", "application/json")], b"{}", now=11.0, since=1.0
    )
    m = store.message("b", "c1", since=0.0)
    assert (
        m
        and m.attempts == 2
        and m.accepted
        and m.body == b"{}"
        and m.headers == [("Content-Type", "application/json")]
    )
    store.record_attempts("b", "c1", 1, False, 200, [], b'{"ret":-2}', now=12.0, since=2.0)
    m = store.message("b", "c1", since=0.0)
    assert m and m.accepted and m.body == b"{}"  # a later failure never hides the accepted answer
    assert store.message("b", "c1", since=100.0) is None  # outside the dedupe window
    store.record_attempts("b", "c1", 1, False, 200, [], b"late", now=200.0, since=150.0)
    m = store.message("b", "c1", since=150.0)
    assert m and m.attempts == 1 and not m.accepted  # an expired record starts afresh


def test_tables_are_bounded(tmp_path: Path):
    s = StateStore(str(tmp_path / "s.sqlite3"), limits=Limits(peers=10, stale_tokens=10, messages=10))
    for i in range(50):
        s.saw_inbound("b", f"p{i}", None, float(i))
        s.mark_stale("b", f"h{i}", f"p{i}", float(i))
        s.record_attempts("b", f"c{i}", 1, True, 200, [], b"{}", float(i), 0.0)
    s.evict()
    assert s.counts() == {"peers": 10, "stale_tokens": 10, "bots": 0, "messages": 10, "outbox": 0}
    assert s.peer("b", "p49") is not None and s.peer("b", "p0") is None  # the oldest went
    s.close()


def test_one_proxy_per_state_file(tmp_path: Path):
    path = str(tmp_path / "s.sqlite3")
    first = StateStore(path)
    with pytest.raises(StateError, match=r"in use by another ilink-fixproxy \(pid \d+\)"):
        StateStore(path)
    reader = StateStore(path, lock=False)  # `ilink-fixproxy state` may read it meanwhile
    reader.close()
    first.close()
    StateStore(path).close()  # released on close


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="not a usable SQLite database"):
        StateStore(str(bad))
    with pytest.raises(StateError, match="cannot open state file"):
        StateStore(str(bad / "below-a-file.sqlite3"))


def test_forget_by_id_or_hash(store: StateStore):
    store.saw_inbound("b", "wxid_a", None, 1.0)
    store.mark_stale("b", "h", "wxid_a", 1.0)
    store.saw_inbound("b", "wxid_b", None, 1.0)
    assert store.forget_peer(token_hash("wxid_a"), token_hash) == 2
    assert store.forget_peer("wxid_b") == 1
    assert store.forget_peer("wxid_c") == 0
    assert store.peers() == []


def test_memory_store_needs_no_file():
    s = StateStore(MEMORY)
    s.saw_inbound("b", "p", None, 1.0)
    assert s.peer("b", "p") is not None
    s.close()


def test_send_budgets_count_per_window_and_the_learnt_limit_per_bot(store: StateStore):
    store.saw_inbound("b", "p", store.keyed_hash("t1"), 10.0)
    store.count_send("b", "p", None, False, 11.0)
    store.count_send("b", "p", 2, True, 12.0)
    p = store.peer("b", "p")
    assert p is not None and (p.sent, p.budget_limit, p.nudged_at, p.refused_at) == (2, 2, 12.0, None)
    assert store.budget_spent_peers() == 1  # as many sends as the limit known at the last count
    store.spend_budget("b", "p", 13.0)
    store.learn_budget("b", 2, 13.0)
    store.count_limited("b", 13.0, 600)  # the cooldown counter leaves the budget alone
    assert store.bot_budget("b") == (2, 13.0) and store.bot_budget("other") is None
    assert store.peer("b", "p").refused_at == 13.0  # type: ignore[union-attr]
    store.saw_inbound("b", "p", None, 20.0)  # the peer wrote: a new window
    p = store.peer("b", "p")
    assert p is not None and (p.sent, p.refused_at, p.nudged_at) == (0, None, None)
    assert store.budget_spent_peers() == 0 and store.bot_budget("b") == (2, 13.0)


def test_a_state_file_from_before_budgets_opens_and_gains_them(tmp_path: Path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE peers (bot TEXT NOT NULL, peer TEXT NOT NULL, newest_token TEXT,
             newest_seen REAL, inbound_at REAL, closed_until REAL, closed_status INTEGER,
             closed_body BLOB, updated REAL NOT NULL, PRIMARY KEY (bot, peer));
           CREATE TABLE bots (bot TEXT PRIMARY KEY, limited_at TEXT NOT NULL DEFAULT '[]',
             cooldown_until REAL, cooldown_status INTEGER, cooldown_body BLOB, updated REAL NOT NULL);
           INSERT INTO peers (bot, peer, inbound_at, updated) VALUES ('b', 'p', 5.0, 5.0);
           INSERT INTO bots (bot, updated) VALUES ('b', 5.0);"""
    )
    db.close()
    s = StateStore(str(path))
    p = s.peer("b", "p")
    assert p is not None and p.sent == 0 and p.inbound_at == 5.0
    s.count_send("b", "p", None, False, 6.0)
    s.learn_budget("b", 10, 6.0)
    assert s.peer("b", "p").sent == 1 and s.bot_budget("b") == (10, 6.0)  # type: ignore[union-attr]
    s.close()

"""The send budget and the window keeper with the shared Redis store, end to end: real proxy
replicas sharing one real redis-server, in front of the fake iLink whose peers refuse sends
beyond their budget per inbound message (FakeILink.budget_peers). Sends through every replica
count against the same window of a peer, a limit learnt at one replica is used by the others,
the window's nudge goes once whichever replica sends, a restart keeps it all, and nothing of it
is in Redis in clear (issue 15: "restarts keep budgets (both stores)"; issue 14: send budgets
are shared state)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.sandbox import SUCCESS_ANSWER, FakeILink, TestPKI
from obs_helpers import Gateway, leaks
from redis_helpers import STATE_KEY, RedisServer, redis_binary
from test_e2e_budget import HEADER, NUDGE, sends_to, wait_for, writes
from test_e2e_redis import assert_nothing_in_clear, replica, shared_rules
from test_metrics import scrape, value


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_binary()  # skipped without it, saying why (a failure with CI=true)
    with RedisServer(tmp_path / "redis") as r:
        yield r


def metrics_base(p: ProxyProcess) -> str:
    m = re.search(r"metrics on (http://\S+)/metrics", p.output)
    assert m, p.output
    return m.group(1)


def via(gw: Gateway, p: ProxyProcess) -> Gateway:
    """The same gateway (bot, peer), talking to another replica."""
    other = Gateway(p.url)
    other.bot_token, other.peer, other.headers = gw.bot_token, gw.peer, gw.headers
    return other


def state_listing(redis: RedisServer) -> str:
    p = subprocess.run(
        ilink_fixproxy_argv("state", "--state", redis.url),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def window_count(redis_server: RedisServer, sent: int, refused: bool = False) -> None:
    """Wait until the peer's window in Redis says `sent` (and `refused`): a replica stores what a
    send taught it just after its answer left for the gateway, so the gateway's next send, through
    the other replica, may otherwise be read before it (as two sends in flight at once are)."""
    import redis

    def stored() -> bool:
        with redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5) as r:
            keys = list(r.scan_iter(match="ilfp:p:*", count=1000))
            if len(keys) != 1:
                return False
            sn, rf = r.hmget(keys[0], "sn", "rf")
            return int(sn or 0) == sent and (rf is not None) == refused

    assert wait_for(stored), (sent, refused)


def peer_row(base: str, peer: str) -> dict:
    doc = httpx.get(base + "/status.json", trust_env=False, timeout=10).json()
    return next(p for p in doc["peers"] if p["peer"] == token_hash(peer))


def test_a_budget_learnt_at_one_replica_is_respected_at_the_other_and_sends_through_both_count(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path, nudge={"text": NUDGE, "when_left": 1})
    metrics = ("--metrics", "127.0.0.1:0")
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules, *metrics) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules, *metrics) as b,
    ):
        gw_a = Gateway(a.url)
        gw_b = via(gw_a, b)
        fake.budget_peers[gw_a.peer] = 3
        # The first window: sends through both replicas add up to 3; the 4th, at A, is refused
        # by iLink: A learns the budget (3) and the peer's budget is spent, for B too.
        token = writes(fake, gw_a)
        for n, g in enumerate((gw_b, gw_a, gw_b), 1):
            assert g.send(token).content == SUCCESS_ANSWER
            window_count(redis_server, n)
        spent = gw_a.send(token)
        assert spent.headers[HEADER].startswith("budget-spent; ")
        window_count(redis_server, 3, refused=True)
        held = gw_b.send(token)
        assert held.headers[HEADER].startswith("budget-held; rule=stale-context-token; used=3; limit=3; ")
        assert len(sends_to(fake, gw_a)) == 4
        assert peer_row(metrics_base(b), gw_a.peer)["budget_left"] == 0
        assert value(scrape(metrics_base(b)), "ilink_fixproxy_peers_budget_spent") == 1

        # The next window opens through B's poll; the limit learnt at A stops B after 3 sends
        # made through either replica, and the window's nudge goes once, whichever sends.
        token = writes(fake, gw_b)
        window_count(redis_server, 0)
        answers = []
        for n, g in enumerate((gw_a, gw_b, gw_a), 1):
            answers.append(g.send(token))
            window_count(redis_server, n)
        assert [r.content for r in answers] == [SUCCESS_ANSWER] * 3
        assert [r.headers.get(HEADER, "").endswith("; nudged") for r in answers] == [False, True, False]
        assert peer_row(metrics_base(a), gw_a.peer)["budget_left"] == 0
        page = httpx.get(metrics_base(a) + "/status", trust_env=False, timeout=10).text
        assert "no: send budget used up" in page and "Not sent (iLink would refuse it)" in page
        for g in (gw_b, gw_a):  # known spent: neither replica asks iLink
            assert g.send(token).headers[HEADER].startswith("budget-held; ")
        assert len(sends_to(fake, gw_a)) == 7 and fake.budget_used(gw_a.peer) == 3
        texts = [d.text for d in fake.deliveries]
        assert sum(t.endswith("\n" + NUDGE) for t in texts) == 1
        listing = state_listing(redis_server)
        assert "send budget 0 of 3 left: 3 send(s) accepted since the peer last wrote" in listing
        assert "send budget 3 per inbound message (learnt" in listing
        gw_a.close()
        gw_b.close()

    # Nothing in clear in Redis, the budget's keys and the operator's nudge text included
    dump = redis_server.dump()
    assert any(k.startswith(b"ilfp:p:") and v == b"sn" for k, v in dump)  # the window's count
    assert any(k.startswith(b"ilfp:b:") and v == b"bg" for k, v in dump)  # the learnt limit
    # (the peer's inbound "hi" is left out: two letters occur in ciphertext by chance)
    sent_texts = [t for t in (*gw_a.texts, *gw_b.texts) if t != "hi"]
    secrets = [NUDGE, gw_a.peer, *sent_texts, *gw_a.secrets(), *gw_b.secrets()]
    assert_nothing_in_clear(redis_server, *secrets)
    assert not leaks(b"\n".join(k + b" " + v for k, v in dump), secrets)
    # every key expires, or is one of the few bounded ones (a counter, the outbox indexes)
    bounded = {b"ilfp:q:seq", b"ilfp:c", b"ilfp:qa"}
    for key in {k for k, _ in dump}:
        assert key in bounded or int(redis_server.command("PTTL", key)) > 0, key  # type: ignore[arg-type]


def test_a_restart_keeps_the_budgets_in_redis(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path)
    with replica(fake, pki, tmp_path, "a", redis_server, rules) as a:
        gw = Gateway(a.url)
        fake.budget_peers[gw.peer] = 3
        token = writes(fake, gw)
        assert [gw.send(token).content for _ in range(3)] == [SUCCESS_ANSWER] * 3
        assert gw.send(token).headers[HEADER].startswith("budget-spent; ")  # learnt: 3
        token = writes(fake, gw)
        assert [gw.send(token).content for _ in range(2)] == [SUCCESS_ANSWER] * 2
        gw.close()
    window_count(redis_server, 2)  # (stored once the answer left: a graceful stop waits for it)
    # A new process (the same or another replica): the window's count and the learnt limit stay
    with replica(fake, pki, tmp_path, "a2", redis_server, rules) as a2:
        gw2 = via(gw, a2)
        assert gw2.send(token).content == SUCCESS_ANSWER  # the window's 3rd
        held = gw2.send(token)
        assert held.headers[HEADER].startswith("budget-held; rule=stale-context-token; used=3; limit=3; ")
        token = writes(fake, gw2)  # a new window, after the restart: stops at 3 again
        assert [gw2.send(token).content for _ in range(3)] == [SUCCESS_ANSWER] * 3
        assert gw2.send(token).headers[HEADER].startswith("budget-held; ")
        assert len(sends_to(fake, gw)) == 4 + 3 + 3 and fake.budget_used(gw.peer) == 3
        gw2.close()

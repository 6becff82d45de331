"""End to end: several real proxy replicas sharing one real Redis (`--state redis://...`), in
front of the fake iLink. What one replica learns, the others use; a message under way at one
replica is waited for at the others (single flight across replicas); the outbox is delivered by
exactly one; Redis failing is never worse than no proxy; nothing is in Redis in clear."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, SEND, Gateway, argv_with_fault, sends_to, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from redis_helpers import STATE_KEY, RedisServer, redis_binary
from test_e2e_faults import wait_for

STALE_ANSWER = b'{"ret":-2,"errmsg":"prepare failed"}'


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_binary()
    with RedisServer(tmp_path / "redis") as r:
        yield r


def shared_rules(directory: Path, *, deadline: float | None = None, **peer_state: object) -> Path:
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    rule = doc["rules"][0]
    rule["peer_state"].update(peer_state)
    if deadline is not None:
        rule["action"]["deadline_s"] = deadline
    path = directory / "shared-rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def replica(
    fake: FakeILink, pki: TestPKI, tmp: Path, name: str, redis: RedisServer, rules: Path, *extra: str
) -> ProxyProcess:
    argv = ilink_fixproxy_argv(
        "--listen",
        "127.0.0.1:0",
        *upstream_args(fake, pki, tmp / name),
        "--rules",
        str(rules),
        "--state",
        redis.url,
        *extra,
    )
    p = ProxyProcess(argv, env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}))
    assert p.wait_output("peer state in redis://")
    return p


def via(gw: Gateway, p: ProxyProcess) -> Gateway:
    """The same gateway (bot, peer), talking to another replica."""
    other = Gateway(p)
    other.bot_token, other.peer, other.headers = gw.bot_token, gw.peer, gw.headers
    return other


def assert_nothing_in_clear(redis: RedisServer, *secrets: str) -> None:
    dump = redis.dump()
    assert dump, "the replicas stored nothing in Redis"
    for secret in secrets:
        needle = secret.encode()
        for key, value in dump:
            assert needle not in key and needle not in value, (secret, key, value[:80])


def test_single_flight_across_two_replicas_with_a_slow_upstream(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path)
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules) as b,
    ):
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        fake.script(SEND, Answer(body=b'{"ret":0,"message_id":7}', delay=1.5, deliver=True))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(gw_a.send, None, "slow-1")
            wait_for(lambda: len(sends_to(fake, gw_a)) == 1)  # A's exchange is under way
            retry = gw_b.send(None, client_id="slow-1")  # the gateway's retry lands on B
            original = first.result()
        assert original.status_code == 200 and retry.status_code == 200
        assert retry.content == original.content == b'{"ret":0,"message_id":7}'
        assert retry.headers["x-ilink-fixproxy"].startswith("replayed")
        assert len(sends_to(fake, gw_a)) == 1  # B waited for A's outcome: one upstream send
        assert len([d for d in fake.deliveries if d.to_user_id == gw_a.peer]) == 1


def test_a_lease_is_renewed_while_an_exchange_outlasts_its_ttl(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """The lease lasts deadline_s + 2 s (3 s here); a first attempt may take longer (it is bounded
    by 60 s, not the deadline): its holder keeps extending it, so the retry at B still waits."""
    rules = shared_rules(tmp_path, deadline=1.0)
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules) as b,
    ):
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        fake.script(SEND, Answer(body=b'{"ret":0,"message_id":8}', delay=4.5, deliver=True))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(gw_a.send, None, "long-1")
            wait_for(lambda: len(sends_to(fake, gw_a)) == 1)
            retry = gw_b.send(None, client_id="long-1")
            assert first.result().content == b'{"ret":0,"message_id":8}'
        assert retry.content == b'{"ret":0,"message_id":8}'
        assert retry.headers["x-ilink-fixproxy"].startswith("replayed")
        assert len(sends_to(fake, gw_a)) == 1


def test_stale_memory_closed_window_and_fresh_token_learnt_at_one_replica_are_used_at_the_other(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path)
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules) as b,
    ):
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        # stale memory: proven at A, never sent again by B
        assert (
            gw_a.send("proven-stale-at-a", client_id="first", text="first words")
            .headers["x-ilink-fixproxy"]
            .startswith("repaired")
        )
        assert len(sends_to(fake, gw_a)) == 2
        # What a send taught is stored just after its answer went out, its lease let go last: the
        # gateway's retry at B waits for that, and from then on B sees all A learnt (without it,
        # the next send could reach B first: a race, not a guarantee).
        r = gw_b.send("proven-stale-at-a", client_id="first", text="first words")
        assert r.headers["x-ilink-fixproxy"].startswith("replayed"), r.headers
        r = gw_b.send("proven-stale-at-a", text="second words")
        assert r.headers["x-ilink-fixproxy"].startswith("stripped"), r.headers
        assert len(sends_to(fake, gw_a)) == 3 and sends_to(fake, gw_a)[-1].context_token is None

        # fresh token: getupdates through A, the send through B carries it
        fresh = fake.push_inbound(gw_a.peer, "I'm here")
        assert gw_a.poll().json()["msgs"][0]["context_token"] == fresh
        r = gw_b.send("token-the-gateway-cached-yesterday", text="third words")
        assert r.headers["x-ilink-fixproxy"].startswith("substituted"), r.headers
        assert sends_to(fake, gw_a)[-1].context_token == fresh

        # closed window: learnt at A, answered locally at B (nothing more reaches iLink)
        gw2_a = Gateway(a)
        gw2_b = via(gw2_a, b)
        fake.tokenless_delivers = False
        first = gw2_a.send("old-token", client_id="fourth", text="fourth words")
        assert first.headers["x-ilink-fixproxy"].startswith("window-closed")
        assert len(sends_to(fake, gw2_a)) == 2
        r = gw2_b.send("old-token", client_id="fourth", text="fourth words")  # (as above)
        assert r.headers["x-ilink-fixproxy"].startswith("answered-locally; reason=attempts-used"), r.headers
        r = gw2_b.send("old-token", text="fifth words")
        assert r.content == STALE_ANSWER
        assert r.headers["x-ilink-fixproxy"].startswith("answered-locally; reason=window-closed"), r.headers
        assert len(sends_to(fake, gw2_a)) == 2

        # the `state` command reads the shared store, as the file's
        state = subprocess.run(
            ilink_fixproxy_argv("state", "--state", redis_server.url),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
        )
        assert state.returncode == 0, state.stderr
        assert "2 peer(s)" in state.stdout and "window CLOSED" in state.stdout
        assert "kept encrypted in the shared store" in state.stdout
        forget = subprocess.run(
            ilink_fixproxy_argv("state", "forget", gw2_a.peer, "--state", redis_server.url),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
        )
        assert forget.returncode == 0 and f"forgot {gw2_a.peer}" in forget.stdout, forget.stderr
        r = gw2_b.send("old-token", text="fifth words")  # the window is forgotten: it goes upstream
        assert len(sends_to(fake, gw2_a)) > 2

    assert_nothing_in_clear(
        redis_server,
        gw_a.bot_token,
        gw2_a.bot_token,
        "proven-stale-at-a",
        "token-the-gateway-cached-yesterday",
        "old-token",
        fresh,
        gw_a.peer,
        gw2_a.peer,
        *(f"{n} words" for n in ("first", "second", "third", "fourth", "fifth")),
        "I'm here",
    )
    # every key expires, or is one of the few bounded ones (a counter, the outbox indexes)
    bounded = {b"ilfp:q:seq", b"ilfp:c", b"ilfp:qa"}
    for key in {k for k, _ in redis_server.dump()}:
        assert key in bounded or int(redis_server.command("PTTL", key)) > 0, key  # type: ignore[arg-type]


def test_a_new_message_answered_locally_does_not_use_an_attempt(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """The snapshot script stores a new message's first attempt with its lease (one round trip
    less per send); when the gate sends nothing (here: the window is closed) that attempt is taken
    back as the lease is let go, so once the peer writes, the same client_id still has both of
    its max_attempts: the original refused, then the re-issue that delivers it."""
    rules = shared_rules(tmp_path, substitute_fresh=False)  # so the retry needs its two attempts
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules) as b,
    ):
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        fake.tokenless_delivers = False
        assert gw_a.send("old-token").headers["x-ilink-fixproxy"].startswith("window-closed")
        r = gw_b.send("old-token", client_id="cid-while-closed")
        assert r.headers["x-ilink-fixproxy"].startswith("answered-locally; reason=window-closed"), r.headers
        assert len(sends_to(fake, gw_a)) == 2

        fake.push_inbound(gw_a.peer, "back again")  # the peer writes: the window opens
        assert gw_a.poll().json()["msgs"]
        fake.tokenless_delivers = True
        r = gw_b.send("a-token-never-seen", client_id="cid-while-closed")
        assert r.status_code == 200 and r.headers["x-ilink-fixproxy"].startswith("repaired"), r.headers
        assert len(sends_to(fake, gw_a)) == 4 and sends_to(fake, gw_a)[-1].context_token is None


def test_a_replica_killed_in_a_storm_of_alternating_retries_loses_nothing(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """Each message is retried alternately at A and B until it gets an answer; A is SIGKILLed
    in the middle. Every message is delivered; one is delivered twice only if A had it upstream
    when killed (its answer died with A), and never more than max_attempts (2) times."""
    rules = shared_rules(tmp_path, deadline=2.0)
    a = replica(fake, pki, tmp_path, "a", redis_server, rules)
    with replica(fake, pki, tmp_path, "b", redis_server, rules) as b:
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        fake.script(SEND, *(Answer(body=b'{"ret":0}', delay=0.4, deliver=True) for _ in range(12)))
        ids = [f"storm-{i}" for i in range(8)]
        killed = threading.Event()
        answered: dict[str, bytes] = {}

        def gateway(cid: str, start: int) -> None:
            for attempt in range(40):
                target = (gw_a, gw_b)[(start + attempt) % 2]
                if target is gw_a and killed.is_set():
                    continue
                try:
                    r = target.send(None, client_id=cid, timeout=0.3 if attempt < 4 else 15)
                except httpx.HTTPError:
                    continue  # timed out, or the replica died: retry (at the other one next)
                if r.status_code == 200:
                    answered[cid] = r.content
                    return

        with ThreadPoolExecutor(len(ids)) as pool:
            futures = [pool.submit(gateway, cid, i) for i, cid in enumerate(ids)]
            wait_for(lambda: len(sends_to(fake, gw_a)) >= 3)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            killed.set()
            for f in futures:
                f.result()
        a.stop()
        assert set(answered) == set(ids)  # no message lost
        attempts = Counter(s.client_id for s in sends_to(fake, gw_a))
        deliveries = Counter(d.client_id for d in fake.deliveries if d.to_user_id == gw_a.peer)
        assert set(deliveries) == set(ids)
        assert max(attempts.values()) <= 2, attempts  # max_attempts, whatever the gateway retried
        assert max(deliveries.values()) <= 2, deliveries


def test_redis_killed_and_restarted_mid_traffic(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path)
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules, "--metrics", "127.0.0.1:0") as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules) as b,
    ):
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        assert gw_a.send(None).status_code == 200
        redis_server.kill()
        for i in range(6):  # sends keep flowing, stale tokens are still repaired (plain re-issue)
            r = (gw_a, gw_b)[i % 2].send(f"stale-while-down-{i}")
            assert r.status_code == 200 and r.content == fake.success_answer
            assert r.headers["x-ilink-fixproxy"].startswith("repaired"), r.headers
        assert a.wait_output("unavailable for")
        # logged once per interval per operation, not once per send
        logged = Counter(re.findall(r"Redis \S+ unavailable for (\w+)", a.output))
        assert logged and max(logged.values()) == 1, a.output
        metrics = re.search(r"metrics on (http://\S+/metrics)", a.output)
        assert metrics, a.output
        base = metrics.group(1).removesuffix("/metrics")
        text = httpx.get(base + "/metrics", timeout=10).text
        assert "ilink_fixproxy_store_up 0.0" in text
        assert re.search(r'ilink_fixproxy_store_unavailable_total\{operation="\w+"\} [1-9]', text)
        health = httpx.get(base + "/healthz", timeout=10)
        assert health.status_code == 503 and "peer-state store failing" in health.text

        redis_server.start()  # empty: no persistence
        time.sleep(1.1)  # past the store's back-off after a failure (store_redis.BACKOFF_S)
        assert gw_a.send("proven-stale-after").headers["x-ilink-fixproxy"].startswith("repaired")
        r = gw_b.send("proven-stale-after")
        assert r.headers["x-ilink-fixproxy"].startswith("stripped"), r.headers  # shared again
        assert a.wait_output("answers again; shared state resumes")
        assert "ilink_fixproxy_store_up 1.0" in httpx.get(base + "/metrics", timeout=10).text
    assert "Traceback" not in a.output and "Traceback" not in b.output


def test_the_outbox_is_flushed_by_exactly_one_of_two_replicas(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path, on_closed="defer", outbox={"flush_gap_s": 0.3, "flush_max": 5})
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules) as b,
    ):
        gw_a = Gateway(a)
        gw_b = via(gw_a, b)
        fake.tokenless_delivers = False
        for i in range(4):
            r = (gw_a, gw_b)[i % 2].send("stale-token", text=f"queued-{i}")
            assert r.headers["x-ilink-fixproxy"].startswith("deferred"), r.headers
        assert not fake.deliveries
        # The peer writes twice; one poll lands on each replica: both flush, at the same time.
        fake.push_inbound(gw_a.peer, "back")
        gw_a.poll()
        fake.push_inbound(gw_a.peer, "again")
        gw_b.poll()
        wait_for(lambda: len(fake.deliveries) >= 4)
        time.sleep(1.5)  # (both flushes are paced 0.3 s apart: long finished by now)
        texts = Counter(d.text for d in fake.deliveries)
        assert texts == Counter({f"queued-{i}": 1 for i in range(4)}), texts
        listing = subprocess.run(
            ilink_fixproxy_argv("outbox", "--state", redis_server.url),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
        )
        assert listing.returncode == 0, listing.stderr
        assert "0 deferred send(s); delivered late 4" in listing.stdout
    assert_nothing_in_clear(
        redis_server, gw_a.bot_token, "stale-token", gw_a.peer, "queued-", "back", "again"
    )


@pytest.mark.parametrize(
    ("env", "state", "fragment"),
    [
        ({}, "redis://127.0.0.1:1/0", "needs ILINK_FIXPROXY_STATE_KEY"),
        ({"ILINK_FIXPROXY_STATE_KEY": "short"}, "redis://127.0.0.1:1/0", "is malformed"),
        (
            {"ILINK_FIXPROXY_STATE_KEY": STATE_KEY},
            "redis://:hunter2pass@127.0.0.1:99999/0",
            "not a valid Redis URL",
        ),
        (
            {"ILINK_FIXPROXY_STATE_KEY": STATE_KEY},
            "redis://:hunter2pass@127.0.0.1:6379/x",
            "must be a number",
        ),
    ],
)
def test_a_redis_store_without_its_key_or_with_a_bad_url_is_one_line(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, env: dict[str, str], state: str, fragment: str
):
    for argv in (
        ["--listen", "127.0.0.1:0", *upstream_args(fake, pki, tmp_path), "--rules", str(ROOT / "rules.yaml")],
        ["state"],
        ["outbox"],
    ):
        p = subprocess.run(
            ilink_fixproxy_argv(*argv, "--state", state),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env({k: v for k, v in env.items()} | ({} if env else {"ILINK_FIXPROXY_STATE_KEY": ""})),
            stdin=subprocess.DEVNULL,
        )
        both = p.stdout + p.stderr
        assert p.returncode != 0, both
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and fragment in lines[0], (argv, p.stderr)
        assert "Traceback" not in both and "hunter2pass" not in both


def test_the_subcommands_say_in_one_line_when_redis_is_down(tmp_path: Path):
    redis_binary()
    down = RedisServer(tmp_path / "r")  # never started: nothing listens on its port
    p = subprocess.run(
        ilink_fixproxy_argv("outbox", "--state", f"redis://:hunter2pass@127.0.0.1:{down.port}/0"),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "cannot read the peer-state store" in lines[0], p.stderr
    assert "hunter2pass" not in p.stdout + p.stderr and "Traceback" not in p.stderr
    assert os.environ.get("ILINK_FIXPROXY_STATE_KEY") != STATE_KEY  # (the test's key stays in its child)


# The delivered send leaves the queue, then (before the fix) its record was written: a gateway
# retry of that client_id arriving in between found neither and went to iLink a second time.
# The fault widens that gap, in the real command, to a second after each dequeue.
SLOW_DEQUEUE = """
import asyncio
from ilink_fixproxy import store_redis

_dequeue = store_redis.RedisStore.dequeue

async def dequeue(self, queued_id):
    done = await _dequeue(self, queued_id)
    await asyncio.sleep(1.0)
    return done

store_redis.RedisStore.dequeue = dequeue
"""


def test_a_retry_while_a_deferred_send_is_delivered_late_is_replayed_not_sent_again(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    rules = shared_rules(tmp_path, on_closed="defer")
    argv = argv_with_fault(tmp_path, SLOW_DEQUEUE, "--listen", "127.0.0.1:0")
    argv += [*upstream_args(fake, pki, tmp_path / "a"), "--rules", str(rules), "--state", redis_server.url]
    with ProxyProcess(argv, env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY})) as p:
        assert p.wait_output("peer state in redis://"), p.output
        gw = Gateway(p)
        fake.tokenless_delivers = False
        r = gw.send("stale-token", text="closes the window")  # refused twice: deferred
        assert r.headers["x-ilink-fixproxy"].startswith("deferred"), r.headers
        # Deferred without an attempt (the window is known closed): no record of it but the queue.
        r = gw.send("stale-token", client_id="late-1", text="held")
        assert r.headers["x-ilink-fixproxy"].startswith("deferred"), r.headers
        fake.tokenless_delivers = True
        fake.push_inbound(gw.peer, "back")
        gw.poll()  # the peer wrote: the outbox delivers, then dequeues (slowly, by the fault)
        assert wait_for(lambda: any(d.text == "held" for d in fake.deliveries)), fake.deliveries
        time.sleep(0.3)  # inside the widened gap
        retry = gw.send("stale-token", client_id="late-1", text="held")
        assert retry.status_code == 200, retry.headers
        time.sleep(1.2)
    assert [d.text for d in fake.deliveries].count("held") == 1, fake.deliveries

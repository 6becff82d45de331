"""End to end, the parts of scale-out together: `--workers 2` on a shared Redis store with the
SHIPPED rules (peer state on), against the fake iLink and a real `redis-server`.

The kernel chooses the worker of each new connection (SO_REUSEPORT), so a test cannot pick one;
it can see which one answered. `pinned` opens keep-alive connections one after another and, from
the parent's /metrics (every worker's counters carry a `worker` label), learns which worker
answered each, until it holds one connection to each worker: a request on such a connection is
handled by that worker (checked again afterwards from the counters)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SEND, UPDATES, Gateway, sends_to, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from redis_helpers import STATE_KEY, RedisServer, redis_binary
from test_e2e_redis import assert_nothing_in_clear
from test_e2e_workers import METRICS, alive, children, per_worker, wait_for


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_binary()
    with RedisServer(tmp_path / "redis") as r:
        yield r


@contextlib.contextmanager
def workers_on_redis(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis: RedisServer, *extra: str, via_env: bool = False
) -> Iterator[ProxyProcess]:
    """The real command: --workers 2, the shipped rules, the Redis store (by --state, or by
    ILINK_FIXPROXY_REDIS_URL alone), --metrics; afterwards no worker is left running."""
    env = {"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}
    state = ["--state", redis.url]
    if via_env:
        env["ILINK_FIXPROXY_REDIS_URL"] = redis.url
        state = []
    argv = ilink_fixproxy_argv(
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        *state,
        "--metrics",
        "127.0.0.1:0",
        *extra,
    )
    p = ProxyProcess(argv, env=clean_env(env))
    seen: set[int] = set()
    try:
        # (logged just after the line that says it is listening: it may still be on its way)
        assert p.wait_output("metrics of all workers on"), p.output
        p.metrics = METRICS.search(p.output).group(1)  # type: ignore[attr-defined,union-attr]
        p.seen = seen  # type: ignore[attr-defined]
        seen.update(children(p.proc.pid))
        assert len(seen) == 2, p.output
        # both workers really run with the shared store and peer state
        assert wait_for(lambda: p.output.count("peer state in redis://") == 2), p.output
        yield p
    finally:
        seen.update(children(p.proc.pid))
        p.stop()
        left = [pid for pid in seen if alive(pid)]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"workers left running: {left}\n{p.output}"


def counted(p: ProxyProcess) -> dict[str, float]:
    return per_worker(p.metrics, "ilink_fixproxy_requests_total")  # type: ignore[attr-defined]


def one_connection() -> httpx.Client:
    # One keep-alive connection that never expires: every request of this client is on it.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=None)
    return httpx.Client(trust_env=False, timeout=30, limits=limits)


def pinned(p: ProxyProcess, gw: Gateway) -> dict[str, Gateway]:
    """The gateway `gw` (its bot, its peer) over one connection to each worker: {"0": .., "1": ..}."""
    found: dict[str, Gateway] = {}
    for _ in range(64):  # each new connection goes to either worker: 64 all to one is 2**-63
        before = counted(p)
        c = one_connection()
        assert (
            c.post(p.url + UPDATES, content=b'{"get_updates_buf":""}', headers=gw.headers).status_code == 200
        )
        after: dict[str, float] = {}

        def one_more(before: dict[str, float] = before, after: dict[str, float] = after) -> bool:
            after.update(counted(p))
            return sum(after.values()) == sum(before.values()) + 1

        assert wait_for(one_more), (before, after)
        worker = next(w for w in after if after[w] != before.get(w, 0.0))
        if worker in found:
            c.close()
            continue
        g = Gateway(p)
        g.bot_token, g.peer, g.headers = gw.bot_token, gw.peer, gw.headers
        g.client.close()
        g.client = c
        found[worker] = g
        if len(found) == 2:
            return found
    raise AssertionError(f"64 connections, all to one worker: {found}")


def sendmessages(p: ProxyProcess) -> dict[str, float]:
    text = httpx.get(p.metrics + "/metrics", trust_env=False).text  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ilink_fixproxy_requests_total{") and 'endpoint="sendmessage"' in line:
            worker = line.split('worker="', 1)[1].split('"', 1)[0]
            totals[worker] = totals.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def peer_row(base: str, peer: str) -> dict:
    """The peer's row on /status.json at `base` ({} until the store has one)."""
    from ilink_fixproxy.redact import token_hash

    rows = get(base + "/status.json").json()["peers"]
    return next((r for r in rows if r["peer"] == token_hash(peer)), {})


def stored(base: str, peer: str, what: str) -> None:
    """Wait until the shared store holds what a send taught (written just after its answer went
    out, so as not to delay it: a request arriving at another worker or replica within that
    moment does not see it yet)."""
    checks = {
        "stale": lambda row: row.get("stale_tokens", 0) >= 1,
        "closed": lambda row: (row.get("closed_left_s") or 0) > 0,
    }
    assert wait_for(lambda: checks[what](peer_row(base, peer))), (what, peer_row(base, peer))


def test_single_flight_across_two_workers_on_redis(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """The gateway's retry lands on the other worker while the first exchange is slow: it waits
    for the first worker's outcome (the lease in Redis), and iLink sees one send."""
    with workers_on_redis(fake, pki, tmp_path, redis_server) as p:
        on = pinned(p, Gateway(p))
        fake.script(SEND, Answer(body=b'{"ret":0,"message_id":7}', delay=1.5, deliver=True))
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(on["0"].send, None, "slow-1")
            assert wait_for(lambda: len(sends_to(fake, on["0"])) == 1)  # worker 0's exchange is under way
            retry = on["1"].send(None, client_id="slow-1")
            original = first.result()
        assert original.status_code == retry.status_code == 200
        assert retry.content == original.content == b'{"ret":0,"message_id":7}'
        assert retry.headers["x-ilink-fixproxy"].startswith("replayed"), retry.headers
        assert len(sends_to(fake, on["0"])) == 1  # one upstream send
        assert len([d for d in fake.deliveries if d.to_user_id == on["0"].peer]) == 1
        # each worker handled one of the two (the connections were not silently reopened elsewhere)
        assert sendmessages(p) == {"0": 1.0, "1": 1.0}
    assert "Traceback" not in p.output


@pytest.mark.parametrize("store", ["--state", "ILINK_FIXPROXY_REDIS_URL"])
def test_stale_memory_and_fresh_token_learnt_at_one_worker_are_used_by_the_other(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer, store: str
):
    with workers_on_redis(fake, pki, tmp_path, redis_server, via_env=store != "--state") as p:
        gw = Gateway(p)
        on = pinned(p, gw)
        # stale memory: proven at worker 0, never sent again by worker 1
        r = on["0"].send("proven-stale-at-w0", client_id="m-1", text="first words")
        assert r.headers["x-ilink-fixproxy"].startswith("repaired"), r.headers
        assert len(sends_to(fake, gw)) == 2
        # What a send taught is stored just after its answer went out (not to delay it), and its
        # lease is let go last: the gateway's retry at worker 1 waits for it, is answered from
        # the record, and from then on worker 1 sees everything worker 0 learnt.
        r = on["1"].send("proven-stale-at-w0", client_id="m-1", text="first words")
        assert r.headers["x-ilink-fixproxy"].startswith("replayed"), r.headers
        assert len(sends_to(fake, gw)) == 2
        r = on["1"].send("proven-stale-at-w0", text="second words")
        assert r.headers["x-ilink-fixproxy"].startswith("stripped"), r.headers
        assert len(sends_to(fake, gw)) == 3 and sends_to(fake, gw)[-1].context_token is None

        # fresh token: getupdates through worker 0, the send through worker 1 carries it
        fresh = fake.push_inbound(gw.peer, "I'm here")
        assert on["0"].poll().json()["msgs"][0]["context_token"] == fresh
        r = on["1"].send("token-the-gateway-cached-yesterday", text="third words")
        assert r.headers["x-ilink-fixproxy"].startswith("substituted"), r.headers
        assert sends_to(fake, gw)[-1].context_token == fresh
        assert sendmessages(p) == {"0": 1.0, "1": 3.0}
    assert_nothing_in_clear(
        redis_server,
        gw.bot_token,
        gw.peer,
        "proven-stale-at-w0",
        "token-the-gateway-cached-yesterday",
        fresh,
        "first words",
        "second words",
        "third words",
        "I'm here",
    )
    assert "Traceback" not in p.output


def test_sigterm_stops_every_worker_cleanly_with_redis(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """SIGTERM while each worker has a repair under way: both answers reach the gateway, every
    worker closes its Redis connections and exits, the parent exits 0, nothing complains."""
    with workers_on_redis(fake, pki, tmp_path, redis_server) as p:
        gw = Gateway(p)
        on = pinned(p, gw)
        workers = children(p.proc.pid)
        with ThreadPoolExecutor(2) as pool:
            futures = []
            for n, w in enumerate(("0", "1")):  # one at a time: each original meets its own answers
                fake.script(SEND, Answer(body=b'{"ret":-2}'), Answer(body=b"{}", delay=3.0))
                futures.append(pool.submit(on[w].send, f"stale-{w}", f"term-{w}"))
                assert wait_for(lambda n=n: len(sends_to(fake, gw)) == 2 * (n + 1)), fake.sends()
            os.kill(p.proc.pid, signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [(a.status_code, a.content) for a in answers] == [(200, b"{}")] * 2
        assert all(a.headers["x-ilink-fixproxy"].startswith("repaired") for a in answers)
        assert p.proc.wait(30) == 0, p.output
        assert not [pid for pid in workers if alive(pid)]

        # every worker closed its connections to Redis: only the test's own is left
        def clients() -> list[bytes]:
            return bytes(redis_server.command("CLIENT", "LIST")).strip().splitlines()  # type: ignore[arg-type]

        assert wait_for(lambda: len(clients()) == 1), clients()
    for complaint in ("Traceback", "Unclosed", "was destroyed but it is pending", "unavailable for"):
        assert complaint not in p.output, p.output


def test_a_worker_killed_in_a_storm_of_retries_loses_nothing(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """Eight messages, each retried on a new connection (the kernel picks the worker) until it is
    answered; a worker is SIGKILLed in the middle and restarted by the parent. Every message is
    delivered, and never more often than max_attempts (2): a second delivery only where the killed
    worker had the message upstream when it died."""
    with workers_on_redis(fake, pki, tmp_path, redis_server) as p:
        gw = Gateway(p)
        fake.script(SEND, *(Answer(body=b'{"ret":0}', delay=0.4, deliver=True) for _ in range(12)))
        ids = [f"storm-{i}" for i in range(8)]
        answered: dict[str, bytes] = {}
        lock = threading.Lock()

        def gateway(cid: str) -> None:
            for attempt in range(40):
                with httpx.Client(trust_env=False) as c:
                    try:
                        r = c.post(
                            p.url + SEND,
                            content=gw.body(None, cid),
                            headers=gw.headers,
                            timeout=0.3 if attempt < 4 else 15,
                        )
                    except httpx.HTTPError:
                        continue  # timed out, or its worker died: retry on a new connection
                if r.status_code == 200:
                    with lock:
                        answered[cid] = r.content
                    return

        victim = min(children(p.proc.pid))
        with ThreadPoolExecutor(len(ids)) as pool:
            futures = [pool.submit(gateway, cid) for cid in ids]
            assert wait_for(lambda: len(sends_to(fake, gw)) >= 3)
            os.kill(victim, signal.SIGKILL)
            for f in futures:
                f.result()
        assert p.wait_output(f"(pid {victim}) exited with signal SIGKILL; restarted it as pid"), p.output
        p.seen.update(children(p.proc.pid))  # type: ignore[attr-defined]
        assert set(answered) == set(ids)  # no message lost
        attempts = Counter(s.client_id for s in sends_to(fake, gw))
        deliveries = Counter(d.client_id for d in fake.deliveries if d.to_user_id == gw.peer)
        assert set(deliveries) == set(ids), deliveries
        assert max(attempts.values()) <= 2, attempts
        assert max(deliveries.values()) <= 2, deliveries
    assert "Traceback" not in p.output


# ------------------------------------------------------------------ /status with several replicas

PAGE_SECRETS = ("stale-at-a", "stale-closed", "secret words")


def get(url: str) -> httpx.Response:
    return httpx.get(url, trust_env=False, timeout=30)


def learn_at(p: ProxyProcess, fake: FakeILink, base: str) -> tuple[Gateway, Gateway]:
    """Through `p` (its /status at `base`): a stale token proven (remembered), and a closed window
    with one deferred send; returned once the store holds them."""
    stale = Gateway(p)
    r = stale.send("stale-at-a", text="secret words one")
    assert r.headers["x-ilink-fixproxy"].startswith("repaired"), r.headers
    # (the store lists a peer once it wrote or its window closed: stale tokens alone, no row)
    fake.push_inbound(stale.peer, "secret words three")
    assert stale.poll().status_code == 200
    closed = Gateway(p)
    fake.tokenless_delivers = False
    r = closed.send("stale-closed", text="secret words two")
    assert r.headers["x-ilink-fixproxy"].startswith("deferred"), r.headers
    stored(base, stale.peer, "stale")
    stored(base, closed.peer, "closed")
    return stale, closed


def assert_shows_shared_state(base: str, stale: Gateway, closed: Gateway) -> tuple[str, dict]:
    from ilink_fixproxy.redact import token_hash

    data = get(base + "/status.json")
    page = get(base + "/status")
    assert data.status_code == page.status_code == 200
    doc = data.json()
    rows = {row["peer"]: row for row in doc["peers"]}
    assert rows[token_hash(stale.peer)]["stale_tokens"] >= 1, rows
    assert rows[token_hash(stale.peer)]["closed_left_s"] is None, rows
    assert rows[token_hash(stale.peer)]["inbound_age_s"] is not None, rows
    assert rows[token_hash(closed.peer)]["closed_left_s"] > 0, rows
    assert rows[token_hash(closed.peer)]["queued"] == 1, rows
    assert doc["outbox_depth"] == 1
    html = page.text
    text = re.sub(r"<[^>]+>", "", html)
    assert "no: window closed" in text and "1 message(s) waiting in the outbox" in text
    assert token_hash(stale.peer) in html and token_hash(closed.peer) in html
    for body in (html, data.text):
        for secret in (*PAGE_SECRETS, stale.bot_token, stale.peer, closed.peer, "wxid_"):
            assert secret not in body, secret
    # the page says what is this replica's own: the charts and the recent requests
    assert "minutes on this replica</h2>" in html and "Recent requests on this replica</h2>" in html
    return html, doc


def test_status_of_a_replica_shows_what_another_replica_learnt(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    from test_e2e_redis import replica
    from test_e2e_status import metrics_base

    rules = ROOT / "rules.yaml"
    extra = ("--defer", "--metrics", "127.0.0.1:0")
    with (
        replica(fake, pki, tmp_path, "a", redis_server, rules, *extra) as a,
        replica(fake, pki, tmp_path, "b", redis_server, rules, *extra) as b,
    ):
        stale, closed = learn_at(a, fake, metrics_base(a))
        _, doc = assert_shows_shared_state(metrics_base(b), stale, closed)
        assert not [r for r in doc["recent"] if r["endpoint"] == "sendmessage"]  # B handled none
        _, doc_a = assert_shows_shared_state(metrics_base(a), stale, closed)
        assert len([r for r in doc_a["recent"] if r["endpoint"] == "sendmessage"]) == 2
    assert "Traceback" not in a.output + b.output


def store_up(base: str) -> float:
    from test_e2e_status import scrape

    return scrape(base)[("ilink_fixproxy_store_up", frozenset())]


def test_status_and_store_up_when_redis_is_killed_and_back(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    from test_e2e_redis import replica
    from test_e2e_status import metrics_base

    with replica(
        fake, pki, tmp_path, "a", redis_server, ROOT / "rules.yaml", "--metrics", "127.0.0.1:0"
    ) as a:
        base = metrics_base(a)
        gw = Gateway(a)
        assert gw.send(None).status_code == 200
        assert store_up(base) == 1
        assert "Healthy: the proxy is working." in get(base + "/status").text
        redis_server.kill()
        page = get(base + "/status")
        assert page.status_code == 200
        assert "the peer-state store cannot be read" in page.text, page.text
        assert "Not healthy" in page.text
        assert get(base + "/status.json").json()["healthy"] is False
        assert store_up(base) == 0
        assert gw.send("stale-while-down").status_code == 200  # sends still flow
        # for alerts: the store is failing (once traffic has met the failure)
        assert wait_for(lambda: get(base + "/healthz").status_code == 503)
        # for load balancers and the kubelet: it still serves (sends go upstream without the
        # store); were it 503 too, every replica would be taken out at once while Redis is down
        assert (get(base + "/livez").status_code, get(base + "/livez").text) == (200, "ok\n")
        redis_server.start()  # empty (no persistence): nothing to crash on
        # back without any traffic (an idle proxy, or one taken out of its load balancer)
        assert wait_for(lambda: store_up(base) == 1), a.output
        assert wait_for(lambda: get(base + "/healthz").status_code == 200), a.output
        assert wait_for(lambda: "Healthy: the proxy is working." in get(base + "/status").text), a.output
        assert "cannot be read" not in get(base + "/status").text
    assert "Traceback" not in a.output


def test_the_workers_parent_serves_status_with_the_shared_state(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, redis_server: RedisServer
):
    """With --workers, the --metrics listener is the parent's: it serves a worker's /status (the
    shared peers, windows and outbox; that worker's own charts, and the page names the worker)."""
    with workers_on_redis(fake, pki, tmp_path, redis_server, "--defer") as p:
        stale, closed = learn_at(p, fake, p.metrics)  # type: ignore[attr-defined]
        _, doc = assert_shows_shared_state(p.metrics, stale, closed)  # type: ignore[attr-defined]
        assert re.fullmatch(r".+ worker [01]", doc["replica"]), doc["replica"]
        page = get(p.metrics + "/status")  # type: ignore[attr-defined]
        assert page.headers["content-security-policy"].startswith("default-src 'none';")
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        redis_server.kill()
        assert Gateway(p).send("stale-while-down").status_code == 200
        assert wait_for(lambda: get(p.metrics + "/healthz").status_code == 503)  # type: ignore[attr-defined]
        livez = get(p.metrics + "/livez")  # type: ignore[attr-defined]
        assert (livez.status_code, livez.text) == (200, "ok\n")
        assert get(p.metrics + "/nothing").text == "not found: try /status, /metrics, /healthz or /livez\n"  # type: ignore[attr-defined]
    assert "Traceback" not in p.output

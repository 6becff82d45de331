"""End to end: peer state through the real proxy process with the shipped rules (fresh tokens,
stale memory, closed windows, cooldowns, one delivery per client_id)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SEND, UPDATES, Gateway, sends_to, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI

STALE_ANSWER = b'{"ret":-2,"errmsg":"prepare failed"}'


@pytest.fixture
def gw(peer_proxy: ProxyProcess) -> Iterator[Gateway]:
    g = Gateway(peer_proxy)
    yield g
    g.client.close()


def test_a_retrying_gateway_gets_one_delivery_in_at_most_two_attempts(gw: Gateway, fake: FakeILink):
    # Unpatched hermes: the first try times out (iLink is slow), then it retries the same
    # client_id; without the proxy every retry is another upstream send.
    fake.script(SEND, Answer(body=STALE_ANSWER, delay=2.0))
    body_cid = "hermes-chunk-1"
    answers = []
    for attempt in range(5):
        try:
            answers.append(gw.send("stale-token-a", client_id=body_cid, timeout=0.6 if attempt < 3 else 10))
        except httpx.TimeoutException:
            answers.append(None)
    assert answers[:3] == [None, None, None]
    assert [a.status_code for a in answers[3:]] == [200, 200]
    assert all(a.content == fake.success_answer for a in answers[3:])
    assert len(sends_to(fake, gw)) == 2  # the stale try and its tokenless re-issue
    assert len([d for d in fake.deliveries if d.to_user_id == gw.peer]) == 1
    assert answers[4].headers["x-ilink-fixproxy"].startswith("replayed")


def test_concurrent_duplicates_wait_for_the_first(gw: Gateway, fake: FakeILink):
    fake.script(SEND, Answer(body=b"{}", delay=1.0))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: gw.send(None, client_id="dup-1"), range(4)))
    assert [r.status_code for r in results] == [200] * 4
    assert len(sends_to(fake, gw)) == 1


def test_closed_window_answers_locally_until_the_peer_writes(gw: Gateway, fake: FakeILink):
    fake.tokenless_delivers = False
    first = gw.send("old-token")
    assert first.content == STALE_ANSWER
    assert first.headers["x-ilink-fixproxy"].startswith("window-closed")
    assert len(sends_to(fake, gw)) == 2

    for _ in range(3):  # the gateway keeps trying: nothing reaches iLink
        r = gw.send("old-token")
        assert r.content == STALE_ANSWER
        assert r.headers["x-ilink-fixproxy"].startswith("answered-locally; reason=window-closed")
    assert len(sends_to(fake, gw)) == 2

    fresh = fake.push_inbound(gw.peer, "I'm back")
    assert gw.poll().json()["msgs"][0]["from_user_id"] == gw.peer
    r = gw.send("old-token", text="queued news")
    assert r.status_code == 200 and r.content == fake.success_answer
    assert r.headers["x-ilink-fixproxy"].startswith("substituted")
    last = sends_to(fake, gw)[-1]
    assert len(sends_to(fake, gw)) == 3 and last.context_token == fresh
    assert [d.text for d in fake.deliveries if d.to_user_id == gw.peer] == ["queued news"]


def test_fresh_token_from_getupdates_replaces_an_older_one(gw: Gateway, fake: FakeILink):
    fresh = fake.push_inbound(gw.peer)
    gw.poll()
    body = gw.body("token-the-gateway-cached-yesterday")
    r = gw.client.post(gw.url + SEND, content=body, headers=gw.headers)
    assert r.headers["x-ilink-fixproxy"].startswith("substituted")
    (only,) = sends_to(fake, gw)
    assert only.context_token == fresh
    # only the token's value changed, every other byte is the gateway's
    assert only.body == body.replace(b"token-the-gateway-cached-yesterday", fresh.encode())


def test_the_newest_token_itself_passes_untouched(gw: Gateway, fake: FakeILink):
    fresh = fake.push_inbound(gw.peer)
    gw.poll()
    body = gw.body(fresh)
    r = gw.client.post(gw.url + SEND, content=body, headers=gw.headers)
    assert r.content == fake.success_answer and "x-ilink-fixproxy" not in r.headers
    (only,) = sends_to(fake, gw)
    assert only.body == body


def test_getupdates_answer_is_passed_on_byte_for_byte(gw: Gateway, fake: FakeILink):
    raw = (
        '{"ret":0, "msgs":[{"message_id":18446744073709551615,"from_user_id":"' + gw.peer + '",'
        '"context_token":"ctx-from-poll","item_list":[{"type":1,"text_item":{"text":"\\u4f60好"}}]}],'
        '"get_updates_buf":"Zm9v"}'
    ).encode()
    fake.script(UPDATES, Answer(body=raw))
    r = gw.poll()
    assert r.content == raw
    fake.fresh_tokens.add("ctx-from-poll")
    sent = gw.send("older")
    assert sent.headers["x-ilink-fixproxy"].startswith("substituted")
    assert sends_to(fake, gw)[-1].context_token == "ctx-from-poll"


def test_an_accepted_client_id_is_never_delivered_twice(gw: Gateway, fake: FakeILink):
    first = gw.send(None, client_id="once")
    again = gw.send(None, client_id="once")
    assert first.status_code == again.status_code == 200
    assert again.headers["x-ilink-fixproxy"].startswith("replayed")
    assert len(sends_to(fake, gw)) == 1


def test_genuine_rate_limits_cool_the_bot_down(gw: Gateway, fake: FakeILink):
    fake.tokenless_delivers = False  # sends carrying no token are refused: a genuine limit
    for _ in range(3):
        r = gw.send(None)
        assert r.content == STALE_ANSWER
    assert r.headers["x-ilink-fixproxy"].startswith("cooldown-started")
    assert len(sends_to(fake, gw)) == 3
    cooled = gw.send(None)
    assert cooled.content == STALE_ANSWER
    assert cooled.headers["x-ilink-fixproxy"].startswith("answered-locally; reason=cooling-down")
    assert len(sends_to(fake, gw)) == 3


def test_stale_memory_survives_a_restart(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    state = tmp_path / "state.sqlite3"
    args = (
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(state),
    )
    with start_proxy(*args) as p:
        gw = Gateway(p)
        assert gw.send("proven-stale").headers["x-ilink-fixproxy"].startswith("repaired")
        assert len(sends_to(fake, gw)) == 2
    with start_proxy(*args) as p:
        gw.url = p.url
        r = gw.send("proven-stale")
        assert r.content == fake.success_answer
        assert r.headers["x-ilink-fixproxy"].startswith("stripped")
        assert len(sends_to(fake, gw)) == 3  # one attempt, without the dead token
        assert sends_to(fake, gw)[-1].context_token is None
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    assert b"proven-stale" not in state.read_bytes()
    assert gw.bot_token.encode() not in state.read_bytes()


def test_two_proxies_on_one_state_file_are_refused(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    state = tmp_path / "shared.sqlite3"
    args = (
        *upstream_args(fake, pki, tmp_path / "c"),
        "--state",
        str(state),
    )
    with start_proxy(*args) as first:
        p = subprocess.run(
            ilink_fixproxy_argv("--listen", "127.0.0.1:0", *args),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert p.returncode != 0
        assert "Traceback" not in p.stderr + p.stdout
        assert f"is in use by another ilink-fixproxy (pid {first.proc.pid})" in p.stderr


def test_state_command_lists_and_forgets_peers(gw: Gateway, fake: FakeILink, peer_proxy: ProxyProcess):
    fake.tokenless_delivers = False
    gw.send("dead-token")  # closes the window
    conf = peer_proxy.confdir  # type: ignore[attr-defined]

    def state(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ilink_fixproxy_argv("state", *args, "--confdir", str(conf)),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )

    listing = state()
    assert listing.returncode == 0, listing.stderr
    assert token_hash(gw.peer) in listing.stdout and "window CLOSED" in listing.stdout
    assert gw.peer not in listing.stdout
    assert gw.peer in state("--show-ids").stdout

    forgot = state("forget", token_hash(gw.peer))
    assert forgot.returncode == 0, forgot.stderr
    fake.tokenless_delivers = True
    time.sleep(0.1)
    r = gw.send("dead-token")  # no longer answered locally: goes upstream and is repaired
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert state("forget", "nobody").returncode == 2


def test_state_command_says_a_fresh_token_is_usable_only_while_the_proxy_that_saw_it_runs(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    # The file keeps only the token's keyed hash; the token itself is in the proxy's memory.
    # After a restart `state` must not claim a fresh token the new proxy cannot use.
    file = tmp_path / "state.sqlite3"
    args = (
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(file),
    )

    def listing() -> str:
        p = subprocess.run(
            ilink_fixproxy_argv("state", "--state", str(file)),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert p.returncode == 0, p.stderr
        return p.stdout

    with start_proxy(*args) as first:
        gw = Gateway(first)
        fresh = fake.push_inbound(gw.peer)
        assert gw.poll().status_code == 200
        running = listing()
        assert "fresh token seen" in running and "in the running proxy's memory only" in running
        # and it really is usable: a stale send goes out with it
        assert gw.send("old-token").headers["x-ilink-fixproxy"].startswith("substituted")
        assert sends_to(fake, gw)[-1].context_token == fresh
    assert first.proc.returncode == 0

    stopped = listing()
    assert "fresh token seen" not in stopped and "fresh token known" not in stopped
    assert (
        "no fresh token (the one seen" in stopped and "was lost when the proxy that saw it stopped" in stopped
    )

    with start_proxy(*args) as second:
        assert "no fresh token (the one seen" in listing()
        gw.url = second.url
        r = gw.send("old-token-2")  # nothing to substitute: the new proxy never saw the token
        assert not r.headers["x-ilink-fixproxy"].startswith("substituted")
        assert sends_to(fake, gw)[-1].context_token != fresh
    gw.client.close()

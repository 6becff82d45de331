"""End to end: one delivery per message under every fault (issue 13, items 1-6), through the real
proxy process against the fake iLink. The fake counts upstream attempts (``fake.sends()``) and
deliveries (``fake.deliveries``) separately; scripted answers with ``deliver=True`` deliver first
and then lose, delay or disguise the answer."""

from __future__ import annotations

import json
import resource
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, SEND, Gateway, core_rules, sends_to, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from test_e2e_faults import wait_for

STALE_ANSWER = b'{"ret":-2,"errmsg":"prepare failed"}'


def peer_rules(directory: Path, **peer_state: object) -> Path:
    """The shipped rules with some peer_state settings changed."""
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    doc["rules"][0]["peer_state"].update(peer_state)
    path = directory / f"rules-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def deliveries_to(fake: FakeILink, gw: Gateway) -> list:
    return [d for d in fake.deliveries if d.to_user_id == gw.peer]


@pytest.fixture
def gw(peer_proxy: ProxyProcess) -> Iterator[Gateway]:
    g = Gateway(peer_proxy)
    yield g
    g.client.close()


@pytest.fixture(scope="module")
def once_proxy(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The shipped rules with max_attempts: 1: at most one upstream attempt per client_id."""
    conf = tmp_path_factory.mktemp("once")
    with start_proxy(
        *upstream_args(fake_server, pki, conf), "--rules", str(peer_rules(conf, max_attempts=1))
    ) as p:
        yield p


def _send_all(gw: Gateway, client_id: str, n: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: gw.send(None, client_id=client_id), range(n)))


# ---------------------------------------------------------------- item 1: a lost answer


def test_retries_waiting_behind_a_lost_answer_stay_within_max_attempts(gw: Gateway, fake: FakeILink):
    # Delivered, then the connection resets before the answer: 20 retries were waiting behind it.
    fake.script(SEND, Answer(fault="reset", deliver=True, delay=1.0))
    answers = _send_all(gw, "lost-1", 20)
    # max_attempts: 2 (shipped): the lost attempt counts, one retry may go upstream, the rest
    # share what it got (it was accepted: replayed).
    assert len(sends_to(fake, gw)) == 2
    assert len(deliveries_to(fake, gw)) == 2
    assert sorted(r.status_code for r in answers).count(200) == 19
    assert sum(r.headers.get("x-ilink-fixproxy", "").startswith("replayed") for r in answers) == 18


def test_with_max_attempts_1_a_lost_answer_is_never_sent_again(once_proxy: ProxyProcess, fake: FakeILink):
    gw = Gateway(once_proxy)
    fake.script(SEND, Answer(fault="reset", deliver=True, delay=1.0))
    answers = _send_all(gw, "lost-once", 20)
    assert len(sends_to(fake, gw)) == 1
    assert len(deliveries_to(fake, gw)) == 1
    assert all(r.status_code == 502 for r in answers)
    # Every waiter is told the attempts are used up, not handed a fresh upstream attempt.
    assert sum("reason=attempts-used" in r.headers.get("x-ilink-fixproxy", "") for r in answers) == 19


def test_sequential_retries_after_a_lost_answer_stay_within_max_attempts(gw: Gateway, fake: FakeILink):
    # Every answer is lost after delivery; the gateway retries the same client_id 5 times.
    fake.script(SEND, *[Answer(fault="reset", deliver=True)] * 5)
    answers = [gw.send(None, client_id="lost-seq") for _ in range(5)]
    assert [r.status_code for r in answers] == [502] * 5
    assert len(sends_to(fake, gw)) == 2
    assert len(deliveries_to(fake, gw)) == 2
    assert all("reason=attempts-used" in r.headers["x-ilink-fixproxy"] for r in answers[2:])


# ---------------------------------------------------------------- item 2: transient answers


TRANSIENT = {
    "503": Answer(status=503, body=b'{"errmsg":"busy"}'),
    "500": Answer(status=500, body=b""),
    "429": Answer(status=429, body=b'{"errmsg":"slow down"}'),
    "html-502": Answer(
        status=502, body=b"<html>bad gateway</html>", headers=(("Content-Type", "text/html"),)
    ),
    "ret-1": Answer(status=200, body=b'{"ret":-1,"errmsg":"system error"}'),
}


@pytest.mark.parametrize("answer", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_a_transient_answer_is_not_replayed_as_accepted(gw: Gateway, fake: FakeILink, answer: Answer):
    fake.script(SEND, answer)
    first = gw.send(None, client_id="transient-1")
    assert first.status_code == answer.status and first.content == answer.body  # handed back as is
    retry = gw.send(None, client_id="transient-1")
    assert not retry.headers.get("x-ilink-fixproxy", "").startswith("replayed")
    assert retry.status_code == 200 and retry.content == fake.success_answer
    assert len(sends_to(fake, gw)) == 2
    assert len(deliveries_to(fake, gw)) == 1


# ---------------------------------------------------------------- item 3: kill -9


def test_kill_9_during_a_repair_then_a_retry_delivers_once(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    args = (
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(tmp_path / "state.sqlite3"),
    )
    # The stale try is refused; the tokenless re-issue is delivered and its answer is slow.
    fake.script(SEND, Answer(body=STALE_ANSWER), Answer(body=b"{}", deliver=True, delay=5.0))
    with start_proxy(*args) as p:
        gw = Gateway(p)
        with pytest.raises(httpx.TimeoutException):
            gw.send("killed-stale", client_id="killed-1", timeout=0.5)
        assert wait_for(lambda: len(deliveries_to(fake, gw)) == 1)
        p.proc.kill()
        p.proc.wait(5)
    with start_proxy(*args) as p:
        gw.url = p.url
        r = gw.send("killed-stale", client_id="killed-1")
        assert len(sends_to(fake, gw)) == 2, r.headers.get("x-ilink-fixproxy")
        assert len(deliveries_to(fake, gw)) == 1
        assert "reason=attempts-used" in r.headers["x-ilink-fixproxy"]


# ---------------------------------------------------------------- item 4: disk full


@pytest.fixture
def full_disk_proxy(fake: FakeILink, pki: TestPKI, tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy whose state file cannot grow: once it is up, no file it writes may grow at all
    (RLIMIT_FSIZE 0; Python ignores SIGXFSZ, so the write fails with EFBIG, as on a full disk)."""
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(tmp_path / "state.sqlite3"),
    ) as p:
        resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, (0, 0))
        yield p


def test_on_a_full_disk_a_repaired_message_retried_is_not_delivered_again(full_disk_proxy, fake: FakeILink):
    gw = Gateway(full_disk_proxy)
    first = gw.send("full-stale", client_id="full-1")
    assert first.headers["x-ilink-fixproxy"].startswith("repaired")
    retry = gw.send("full-stale", client_id="full-1")
    assert retry.headers["x-ilink-fixproxy"].startswith("replayed")
    assert len(deliveries_to(fake, gw)) == 1
    assert len(sends_to(fake, gw)) == 2
    gw.send(None)  # more sends: the operator is told once, not per send
    gw.send(None)
    assert full_disk_proxy.output.count("cannot persist") == 1, full_disk_proxy.output


def test_on_a_full_disk_a_lost_answer_is_not_forwarded_again(full_disk_proxy, fake: FakeILink):
    gw = Gateway(full_disk_proxy)
    fake.script(SEND, Answer(fault="reset", deliver=True))
    r = gw.send(None, client_id="full-lost")
    assert r.status_code == 502
    assert len(sends_to(fake, gw)) == 1  # not forwarded a second time by mitmproxy
    assert len(deliveries_to(fake, gw)) == 1


# ---------------------------------------------------------------- item 5: non-string context_token


@pytest.mark.parametrize("token", [12345, {"t": 1}, ["x"]], ids=["number", "object", "array"])
def test_a_non_string_context_token_is_repaired_not_counted_as_a_rate_limit(
    gw: Gateway, fake: FakeILink, token
):
    for n in range(3):
        body = json.loads(gw.body(None, client_id=f"odd-{n}"))
        body["msg"]["context_token"] = token
        r = gw.client.post(gw.url + SEND, content=json.dumps(body).encode(), headers=gw.headers)
        # repaired (sent without it), then known stale: stripped before it is sent
        assert r.headers["x-ilink-fixproxy"].startswith("stripped" if n else "repaired")
    fresh = gw.send(None)
    assert "cooling-down" not in fresh.headers.get("x-ilink-fixproxy", "")
    assert len(deliveries_to(fake, gw)) == 4


# ---------------------------------------------------------------- item 6: bodies the edit cannot parse


ENCODINGS = {
    "utf-8-bom": lambda b: b"\xef\xbb\xbf" + b,
    "utf-16": lambda b: b.decode().encode("utf-16"),
}


@pytest.mark.parametrize("encode", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_a_body_that_cannot_be_edited_is_not_reissued_with_its_token(gw: Gateway, fake: FakeILink, encode):
    body = encode(gw.body("uneditable-stale", client_id="bom-1"))
    r = gw.client.post(gw.url + SEND, content=body, headers=gw.headers)
    assert r.content == STALE_ANSWER
    assert len(sends_to(fake, gw)) == 1  # no byte-identical "tokenless" re-issue
    assert "window-closed" not in r.headers.get("x-ilink-fixproxy", "")
    nxt = gw.send("another-stale")  # the window was not closed for it: repaired as usual
    assert nxt.headers["x-ilink-fixproxy"].startswith("repaired")


def test_a_deferred_body_that_cannot_be_edited_never_stores_its_token(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    state = tmp_path / "state.sqlite3"
    rules = peer_rules(tmp_path, on_closed="defer")
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"), "--rules", str(rules), "--state", str(state)
    ) as p:
        gw = Gateway(p)
        fake.tokenless_delivers = False
        assert gw.send("stale-closing").headers["x-ilink-fixproxy"].startswith("deferred")  # window closed
        body = b"\xef\xbb\xbf" + gw.body("secret-bom-token", client_id="bom-defer")
        r = gw.client.post(gw.url + SEND, content=body, headers=gw.headers)
        assert r.status_code == 200
    stored = b"".join(f.read_bytes() for f in tmp_path.glob("state.sqlite3*") if f.is_file())
    assert b"secret-bom-token" not in stored


# ---------------------------------------------------------------- the rule without peer_state


@pytest.fixture(scope="module")
def plain_proxy(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The shipped rules without peer_state (mitmproxy forwards the first attempt, the addon
    re-issues), allowed up to 3 re-issues."""
    conf = tmp_path_factory.mktemp("plain")
    doc = yaml.safe_load(core_rules(conf).read_text())
    doc["rules"][0]["action"]["retries"] = 3
    rules = conf / "retries-3.yaml"
    rules.write_text(yaml.safe_dump(doc, sort_keys=False))
    with start_proxy(*upstream_args(fake_server, pki, conf), "--rules", str(rules)) as p:
        yield p


LOST_AFTER_DELIVERY = {
    "reset": Answer(fault="reset", deliver=True),
    "503": Answer(status=503, body=b'{"errmsg":"busy"}', deliver=True),
}


@pytest.mark.parametrize("lost", LOST_AFTER_DELIVERY.values(), ids=LOST_AFTER_DELIVERY.keys())
def test_without_peer_state_a_reissue_that_may_have_delivered_is_not_reissued_again(
    plain_proxy: ProxyProcess, fake: FakeILink, lost: Answer
):
    # Refused for a stale token; the tokenless re-issue is delivered, then its connection resets
    # (or iLink answers 503). It may have been delivered, so it is an attempt like any other:
    # retries: 3 must not send it again (it did, and iLink delivered the message twice).
    gw = Gateway(plain_proxy)
    token = f"stale-{secrets.token_hex(4)}"
    fake.script(SEND, Answer(body=STALE_ANSWER), lost)
    r = gw.send(token, client_id="plain-lost")
    gw.client.close()
    assert len(deliveries_to(fake, gw)) == 1
    assert len(sends_to(fake, gw)) == 2
    # the gateway keeps iLink's first answer, unchanged
    assert r.content == STALE_ANSWER
    assert r.headers.get("x-ilink-fixproxy") is None
    assert wait_for(lambda: f"{token_hash(token)}: iLink answered" in plain_proxy.output)
    line = plain_proxy.output.split(token_hash(token), 1)[1].split("\n", 1)[0]
    assert "re-issue without msg.context_token failed" in line and "original answer kept" in line

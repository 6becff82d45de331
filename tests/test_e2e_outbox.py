"""End to end: deferred delivery (on_closed: defer) through the real proxy process. Sends to a
closed window are queued, answered per defer_answer, and delivered when the peer writes again."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SEND, Gateway, sends_to, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI

STALE_ANSWER = b'{"ret":-2,"errmsg":"prepare failed"}'


def defer_rules(path: Path, **peer_state: object) -> Path:
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    ps = doc["rules"][0]["peer_state"]
    ps["on_closed"] = "defer"
    outbox = {"flush_gap_s": 0.3, **peer_state.pop("outbox", {})}  # type: ignore[dict-item]
    ps.update(peer_state, outbox=outbox)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def proxy_with(fake: FakeILink, pki: TestPKI, tmp: Path, *extra: str, **peer_state: object) -> ProxyProcess:
    rules = defer_rules(tmp / "rules.yaml", **peer_state)
    return start_proxy(
        *upstream_args(fake, pki, tmp / "conf"),
        "--rules",
        str(rules),
        "--state",
        str(tmp / "state.sqlite3"),
        *extra,
    )


def close_window(gw: Gateway, fake: FakeILink) -> None:
    """The peer has been silent: iLink refuses the send with and without the token."""
    fake.tokenless_delivers = False
    first = gw.send("stale-token", text="msg-0")
    assert first.headers["x-ilink-fixproxy"].startswith("deferred"), first.headers
    assert len(sends_to(fake, gw)) == 2


def outbox(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ilink_fixproxy_argv("outbox", *args, "--state", str(tmp / "state.sqlite3")),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_queued_while_closed_then_delivered_in_order_with_the_fresh_token(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        for i in (1, 2):
            r = gw.send("stale-token", text=f"msg-{i}")
            assert r.status_code == 200 and r.content == b'{"ret":0}'  # accepted, like an MTA's "queued"
            assert r.headers["x-ilink-fixproxy"].startswith("deferred")
        assert len(sends_to(fake, gw)) == 2  # nothing reached iLink while the window was closed
        assert not fake.deliveries

        fresh = fake.push_inbound(gw.peer, "good morning")
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 3)
        late = sends_to(fake, gw)[2:]
        assert [json.loads(s.body)["msg"]["item_list"][0]["text_item"]["text"] for s in late] == [
            "msg-0",
            "msg-1",
            "msg-2",
        ]
        assert {s.context_token for s in late} == {fresh}
        gaps = [b.time - a.time for a, b in itertools.pairwise(late)]
        assert all(g >= 0.25 for g in gaps), gaps  # paced
        time.sleep(0.5)
        assert len(fake.deliveries) == 3  # each exactly once
        assert p.wait_output("delivered-late")


def test_flush_is_capped_and_the_rest_waits_for_the_next_inbound(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path, outbox={"flush_max": 2, "flush_gap_s": 0.05}) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        for i in (1, 2, 3):
            gw.send("stale-token", text=f"msg-{i}")
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 2)
        time.sleep(0.5)
        assert len(fake.deliveries) == 2
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 4)
        assert [d.text for d in fake.deliveries] == ["msg-0", "msg-1", "msg-2", "msg-3"]


def test_defer_answer_error_hands_back_the_refusal(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path, defer_answer="error") as p:
        gw = Gateway(p)
        fake.tokenless_delivers = False
        r = gw.send("stale-token")
        assert r.content == STALE_ANSWER
        assert r.headers["x-ilink-fixproxy"].startswith("deferred")
        again = gw.send("stale-token")
        assert again.content == STALE_ANSWER and again.headers["x-ilink-fixproxy"].startswith("deferred")
        assert len(sends_to(fake, gw)) == 2


def test_the_same_client_id_is_never_queued_twice(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        for _ in range(3):
            r = gw.send("stale-token", client_id="retried", text="once")
            assert r.headers["x-ilink-fixproxy"].startswith("deferred")
        listing = outbox(tmp_path)
        assert listing.stdout.count("client_id retried") == 1, listing.stdout
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 2)
        time.sleep(0.3)
        assert [d.text for d in fake.deliveries].count("once") == 1
        # the gateway retrying it once more now gets iLink's answer, not a second delivery
        replay = gw.send("stale-token", client_id="retried", text="once")
        assert replay.headers["x-ilink-fixproxy"].startswith("replayed")
        assert [d.text for d in fake.deliveries].count("once") == 1


def test_per_peer_cap(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path, outbox={"max_per_peer": 2}) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        assert gw.send("stale-token").headers["x-ilink-fixproxy"].startswith("deferred")
        full = gw.send("stale-token")
        assert full.content == STALE_ANSWER
        assert full.headers["x-ilink-fixproxy"].startswith("answered-locally; reason=outbox-full")


def test_expired_sends_are_dropped_counted_and_reported(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path, outbox={"max_age_s": 1}) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        wait_for(lambda: "dropped an expired deferred send" in p.output, timeout=8)
        assert "expired 1" in outbox(tmp_path).stdout
        fake.push_inbound(gw.peer)
        gw.poll()
        time.sleep(0.5)
        assert not fake.deliveries


def test_the_outbox_survives_a_restart(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        gw.send("stale-token", text="msg-1")
    with proxy_with(fake, pki, tmp_path) as p:
        gw.url = p.url
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 2)
        assert [d.text for d in fake.deliveries] == ["msg-0", "msg-1"]


def test_a_failed_delivery_stays_queued(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        fake.script(SEND, Answer(fault="reset"))
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: "still queued (1/3 attempts)" in p.output)
        assert not fake.deliveries
        assert "1 failed deliveries" in outbox(tmp_path).stdout
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 1)
        assert "0 deferred send(s)" in outbox(tmp_path).stdout


def test_defer_flag_turns_it_on_without_editing_rules(fake, pki, tmp_path: Path):
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--defer",
    ) as p:
        gw = Gateway(p)
        fake.tokenless_delivers = False
        r = gw.send("stale-token")
        assert r.headers["x-ilink-fixproxy"].startswith("deferred")
        assert r.content == b'{"ret":0}'


def test_outbox_command_lists_drops_and_flushes(fake, pki, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path) as p:
        gw = Gateway(p)
        close_window(gw, fake)
        gw.send("stale-token", text="msg-1")
        listing = outbox(tmp_path)
        assert listing.returncode == 0 and "2 deferred send(s)" in listing.stdout
        assert token_hash(gw.peer) in listing.stdout and gw.peer not in listing.stdout
        first_id = listing.stdout.split("  id ")[1].split()[0]
        assert outbox(tmp_path, "drop", first_id).returncode == 0
        assert outbox(tmp_path, "drop", "99999").returncode == 2
        fake.tokenless_delivers = True  # an operator forcing delivery (tokenless: no fresh token known)
        flushed = outbox(tmp_path, "flush", token_hash(gw.peer))
        assert flushed.returncode == 0, flushed.stderr
        wait_for(lambda: len(fake.deliveries) == 1)
        assert [d.text for d in fake.deliveries] == ["msg-1"]
        assert outbox(tmp_path, "flush", "nobody").returncode == 2


@pytest.mark.parametrize(("key", "value"), [("defer_answer", "maybe"), ("outbox", {"flush_max": 0})])
def test_bad_defer_settings_are_rejected_by_check(tmp_path: Path, key: str, value: object):
    rules = defer_rules(tmp_path / "r.yaml", **{key: value})
    p = subprocess.run(
        ilink_fixproxy_argv("check", str(rules)), capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert str(rules) in p.stderr and key in p.stderr


def test_outbox_metrics_show_depth_age_and_late_deliveries(fake, pki, tmp_path: Path):
    import re

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(url: str) -> dict[tuple[str, tuple], float]:
        text = httpx.get(url, timeout=10, trust_env=False).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    with proxy_with(fake, pki, tmp_path, "--metrics", "127.0.0.1:0") as p:
        url = re.search(r"metrics on (http://\S+/metrics)", p.output).group(1)
        gw = Gateway(p)
        close_window(gw, fake)
        time.sleep(1.1)
        m = scrape(url)
        assert m[("ilink_fixproxy_outbox_depth", ())] == 1
        assert m[("ilink_fixproxy_outbox_oldest_age_seconds", ())] >= 1.0
        fake.push_inbound(gw.peer)
        gw.poll()
        wait_for(lambda: len(fake.deliveries) == 1)
        wait_for(lambda: scrape(url)[("ilink_fixproxy_outbox_total", (("outcome", "delivered_late"),))] == 1)
        m = scrape(url)
        assert m[("ilink_fixproxy_outbox_depth", ())] == 0
        assert m[("ilink_fixproxy_outbox_total", (("outcome", "deferred"),))] == 1

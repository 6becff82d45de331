"""The send budget per inbound message and the window keeper through the real proxy process and
the fake iLink (issue 15, items 2-4): a peer whose budget is N sends per inbound message refuses
the N+1th with ret=-2 until it writes again (FakeILink.budget_peers). The proxy learns N from that
refusal, holds or defers further sends until the peer writes, counts its own deferred deliveries,
re-probes a learnt limit, keeps budgets across restarts, and nudges once per window."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from conftest import ROOT, start_proxy, tls_context, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import SUCCESS_ANSWER, FakeILink, TestPKI
from obs_helpers import SEND, Gateway, files_under, journal, leaks
from test_e2e_faults import wait_for
from test_metrics import scrape, value

HEADER = "x-ilink-fixproxy"
STALE = b'{"ret":-2,"errmsg":"prepare failed"}'
# The operator's text, in any language (never written anywhere in clear by the proxy)
NUDGE = "还剩一条消息额度\uff1a回复任意内容即可继续接收"


def rules_with(path: Path, **peer_state: object) -> Path:
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    doc["rules"][0]["peer_state"].update(peer_state)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


@contextmanager
def proxy_with(
    fake: FakeILink, pki: TestPKI, tmp: Path, *extra: str, **peer_state: object
) -> Iterator[tuple[ProxyProcess, str]]:
    rules = rules_with(tmp / "rules.yaml", **peer_state)
    args = (
        *upstream_args(fake, pki, tmp / "conf"),
        "--rules",
        str(rules),
        "--state",
        str(tmp / "state.sqlite3"),
    )
    with start_proxy(*args, "--metrics", "127.0.0.1:0", "--capture", str(tmp / "cap"), *extra) as p:
        m = re.search(r"metrics on (http://\S+)/metrics", p.output)
        assert m, p.output
        yield p, m.group(1)


def writes(fake: FakeILink, gw: Gateway) -> str:
    """The peer writes: its inbound message reaches the gateway's poll through the proxy; returns
    the new context token (a new window)."""
    token = fake.push_inbound(gw.peer, "hi")
    assert token in {m["context_token"] for m in gw.poll().json()["msgs"]}
    return token


def sends_to(fake: FakeILink, gw: Gateway) -> list:
    return [s for s in fake.sends() if s.json and s.json["msg"].get("to_user_id") == gw.peer]


def state_listing(tmp: Path) -> str:
    p = subprocess.run(
        ilink_fixproxy_argv("state", "--state", str(tmp / "state.sqlite3")),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def budget_events(base: str) -> dict[str, float]:
    s = scrape(base)
    events = ("learnt", "exhausted", "reprobed", "raised", "confirmed")
    return {e: value(s, "ilink_fixproxy_budget_events_total", event=e) for e in events}


def test_the_budget_is_learnt_in_the_first_window_and_stopped_at_in_the_next_and_after_a_restart(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path) as (p, base):
        gw = Gateway(p.url)
        fake.budget_peers[gw.peer] = 3
        token = writes(fake, gw)
        for _ in range(3):
            assert gw.send(token).content == SUCCESS_ANSWER
        fourth = gw.send(token)  # iLink refuses the 4th: the budget is 3
        assert fourth.content == STALE and fourth.headers[HEADER].startswith("budget-spent; ")
        assert len(sends_to(fake, gw)) == 4  # no tokenless re-issue: it would be refused too
        held = gw.send(token)  # known spent: not sent at all
        assert held.status_code == 200 and held.json()["ret"] == -2
        assert held.headers[HEADER].startswith("budget-held; rule=stale-context-token; used=3; limit=3; ")
        assert len(sends_to(fake, gw)) == 4
        assert budget_events(base) == {
            "learnt": 1,
            "exhausted": 1,
            "reprobed": 0,
            "raised": 0,
            "confirmed": 0,
        }
        assert value(scrape(base), "ilink_fixproxy_peers_budget_spent") == 1
        listing = state_listing(tmp_path)
        assert "send budget SPENT (iLink refused the newest token" in listing
        # an exhausted budget is not a rate limit: the bot does not cool down
        assert "not cooling down; 0 recent rate-limit answer(s); send budget 3 per inbound message" in listing

        token = writes(fake, gw)  # the next window: stops at the learnt 3 without asking iLink
        assert value(scrape(base), "ilink_fixproxy_peers_budget_spent") == 0
        assert [gw.send(token).content for _ in range(3)] == [SUCCESS_ANSWER] * 3
        assert "send budget 0 of 3 left: 3 send(s) accepted since the peer last wrote" in state_listing(
            tmp_path
        )
        assert gw.send(token).headers[HEADER].startswith("budget-held; ")
        assert len(sends_to(fake, gw)) == 7
        assert [s.answered for s in sends_to(fake, gw)].count("refused-budget") == 1
        gw.close()
    records = [r for r in journal(tmp_path / "cap") if r["endpoint"] == "sendmessage"]
    assert [r["decision"] for r in records] == ["passed"] * 3 + ["budget-spent", "budget-held"] + [
        "passed"
    ] * 3 + ["budget-held"]
    assert records[3]["budget"] == {
        "used": 3,
        "limit": 3,
        "left": 0,
        "window_age_s": records[3]["budget"]["window_age_s"],
        "events": ["learnt"],
    }
    assert records[4]["budget"]["events"] == ["exhausted"] and records[4]["attempts"] == []
    assert [r["budget"]["left"] for r in records[5:]] == [2, 1, 0, 0]

    # A restart keeps the learnt budget (the SQLite file): the next window stops at 3 again.
    with proxy_with(fake, pki, tmp_path) as (p, base):
        gw2 = Gateway(p.url)
        gw2.peer, gw2.headers = gw.peer, gw.headers  # the same bot and peer
        token = writes(fake, gw2)
        assert [gw2.send(token).content for _ in range(3)] == [SUCCESS_ANSWER] * 3
        assert gw2.send(token).headers[HEADER].startswith("budget-held; ")
        assert len(sends_to(fake, gw2)) == 10 and fake.budget_used(gw.peer) == 3
        gw2.close()


def test_deferred_sends_are_flushed_after_the_next_inbound_message_within_its_budget(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    outbox = {"flush_max": 10, "flush_gap_s": 0.05}
    with proxy_with(fake, pki, tmp_path, on_closed="defer", outbox=outbox) as (p, _):
        gw = Gateway(p.url)
        fake.budget_peers[gw.peer] = 2
        token = writes(fake, gw)
        assert [gw.send(token).content for _ in range(2)] == [SUCCESS_ANSWER] * 2
        spent = gw.send(token)  # refused by iLink: queued, and the gateway told it was accepted
        assert spent.content == b'{"ret":0}' and spent.headers[HEADER].endswith("reason=budget-spent")
        for _ in range(2):  # known spent: queued without reaching iLink
            r = gw.send(token)
            assert r.headers[HEADER].startswith("deferred; ") and r.headers[HEADER].endswith(
                "reason=budget-spent"
            )
        assert len(sends_to(fake, gw)) == 3 and len(fake.deliveries) == 2

        token = writes(fake, gw)  # the new window: 2 of the 3 queued go, the budget is spent again
        assert wait_for(lambda: p.output.count("outbox: delivered 2 deferred send(s)") == 1, 15.0)
        assert p.wait_output("the rest waits")
        assert len(fake.deliveries) == 4 and fake.budget_used(gw.peer) == 2
        # the gateway's next send counts against the same (spent) budget: queued, not sent
        assert gw.send(token).headers[HEADER].startswith("deferred; ")
        assert len(sends_to(fake, gw)) == 5  # 3 + the 2 deliveries: nothing refused after them
        assert [s.answered for s in sends_to(fake, gw)[3:]] == ["delivered"] * 2

        writes(fake, gw)  # the rest (2 queued) goes in the next window
        assert wait_for(lambda: p.output.count("outbox: delivered 2 deferred send(s)") == 2, 15.0)
        texts = [d.text for d in fake.deliveries]
        assert len(texts) == len(set(texts)) == 6  # each exactly once
        gw.close()


def body_without_text(gw: Gateway, token: str) -> bytes:
    msg = {
        "to_user_id": gw.peer,
        "client_id": f"img-{secrets.token_hex(4)}",
        "message_type": 2,
        "message_state": 2,
        "item_list": [{"type": 2, "image_item": {"media": {"encrypt_query_param": "x"}}}],
        "context_token": token,
    }
    return json.dumps({"msg": msg}).encode()


def test_the_nudge_goes_on_exactly_one_send_per_window_and_never_without_a_text_item(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    nudge = {"text": NUDGE, "when_left": 1}
    with proxy_with(fake, pki, tmp_path, budget={"per_inbound": 4}, nudge=nudge) as (p, base):
        gw = Gateway(p.url)
        token = writes(fake, gw)
        answers = [gw.send(token) for _ in range(4)]
        texts = [d.text for d in fake.deliveries]
        assert texts == [gw.texts[-4], gw.texts[-3], gw.texts[-2] + "\n" + NUDGE, gw.texts[-1]]
        assert [HEADER in a.headers and a.headers[HEADER].endswith("; nudged") for a in answers] == [
            False,
            False,
            True,
            False,
        ]

        token = writes(fake, gw)  # a new window: nudged again, once
        gw.send(token)
        gw.send(token)
        image = gw.client.post(gw.url + SEND, content=body_without_text(gw, token), headers=gw.headers)
        assert image.status_code == 200 and HEADER not in image.headers  # nothing to append it to
        assert json.loads(fake.sends()[-1].body)["msg"]["item_list"][0]["type"] == 2
        last = gw.send(token)  # leaves 0: the window's nudge goes with it
        assert last.headers[HEADER] == "passed; rule=stale-context-token; nudged"
        assert fake.deliveries[-1].text == gw.texts[-1] + "\n" + NUDGE
        assert value(scrape(base), "ilink_fixproxy_nudges_total") == 2
        gw.close()
    written = b"".join(f.read_bytes() for f in files_under(tmp_path / "cap"))
    written += (tmp_path / "state.sqlite3").read_bytes() + p.output.encode()
    assert not leaks(written, [NUDGE, *gw.texts, *gw.secrets()])
    assert [r["nudged"] for r in journal(tmp_path / "cap") if r["endpoint"] == "sendmessage"].count(True) == 2


def test_a_learnt_budget_rises_again_when_a_reprobe_is_accepted(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path, budget={"per_inbound": "auto", "reprobe_s": 0.5}) as (p, base):
        gw = Gateway(p.url)
        fake.budget_peers[gw.peer] = 2
        token = writes(fake, gw)
        [gw.send(token) for _ in range(2)]
        assert gw.send(token).headers[HEADER].startswith("budget-spent; ")  # learnt: 2

        fake.budget_peers[gw.peer] = 4  # iLink now allows more
        token = writes(fake, gw)
        assert [gw.send(token).content for _ in range(2)] == [SUCCESS_ANSWER] * 2
        time.sleep(0.6)  # the learnt limit is older than reprobe_s: one real send goes
        assert gw.send(token).content == SUCCESS_ANSWER  # accepted: raised to 3
        time.sleep(0.6)
        assert gw.send(token).content == SUCCESS_ANSWER  # raised to 4
        time.sleep(0.6)
        refused = gw.send(token)  # the 5th is refused: 4 confirmed, spent until the peer writes
        assert refused.headers[HEADER].startswith("budget-spent; ")
        time.sleep(0.6)
        assert gw.send(token).headers[HEADER].startswith("budget-held; ")  # never a probe once refused
        assert budget_events(base) == {
            "learnt": 1,
            "exhausted": 1,
            "reprobed": 3,
            "raised": 2,
            "confirmed": 1,
        }
        assert len(sends_to(fake, gw)) == 3 + 5
        assert "send budget 4 per inbound message" in state_listing(tmp_path)
        gw.close()


def test_budget_off_counts_nothing_and_lets_every_send_reach_ilink(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path, budget={"per_inbound": "off"}) as (p, base):
        gw = Gateway(p.url)
        fake.budget_peers[gw.peer] = 1
        token = writes(fake, gw)
        assert gw.send(token).content == SUCCESS_ANSWER
        second = gw.send(token)  # refused, then re-issued without the token as before
        assert second.headers[HEADER].startswith("window-closed; ")
        assert len(sends_to(fake, gw)) == 3
        assert budget_events(base) == dict.fromkeys(
            ("learnt", "exhausted", "reprobed", "raised", "confirmed"), 0
        )
        gw.close()


def test_explain_replays_the_budget_decisions(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with proxy_with(fake, pki, tmp_path) as (p, _):
        gw = Gateway(p.url)
        fake.budget_peers[gw.peer] = 2
        token = writes(fake, gw)
        for _ in range(4):
            gw.send(token)
        gw.close()
    out = subprocess.run(
        ilink_fixproxy_argv("explain", str(tmp_path / "cap"), "--rules", str(tmp_path / "rules.yaml")),
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert out.returncode == 0, out.stderr
    summary = out.stdout.split("summary:", 1)[1]
    assert re.search(r"budget-held\s+1\s+1\s+1", summary), out.stdout
    assert re.search(r"budget-spent\s+1\s+1\s+1", summary), out.stdout


def test_the_fake_refuses_beyond_its_budget_until_the_peer_writes(fake: FakeILink, pki: TestPKI):
    client = httpx.Client(trust_env=False, timeout=10, verify=tls_context(pki.ca_cert))
    try:
        fake.budget_peers["wxid_b"] = 1
        token = fake.push_inbound("wxid_b")

        def send(tok: str | None) -> bytes:
            msg = {"to_user_id": "wxid_b", "item_list": [{"type": 1, "text_item": {"text": "x"}}]}
            if tok:
                msg["context_token"] = tok
            return client.post(fake.url + SEND, content=json.dumps({"msg": msg})).content

        assert send(token) == SUCCESS_ANSWER
        assert send(token) == STALE and send(None) == STALE  # tokenless too
        token = fake.push_inbound("wxid_b")
        assert send(token) == SUCCESS_ANSWER and fake.budget_used("wxid_b") == 1
    finally:
        client.close()

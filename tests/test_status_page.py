"""The /status page's two halves without a proxy: status.collect on a real (in-memory) peer-state
store and real rules, status.Activity fed capture.Exchange facts, and status_page.render, a pure
function of the snapshot: hostile values escaped, nothing secret kept, the fate of messages in
plain words. (test_e2e_status.py serves it from the real proxy to a real browser.)"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import re
import types
from typing import Any

from ilink_fixproxy import rules as rules_mod
from ilink_fixproxy.capture import Exchange
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.state import MEMORY, SqliteStore, StateStore
from ilink_fixproxy.status import Activity, BotRow, PeerRow, Recent, Snapshot, collect, shown_id
from ilink_fixproxy.status_page import duration, render

NOW = 1_800_000_000.0
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;"\''


def exchange(**over: Any) -> Exchange:
    facts: dict[str, Any] = {
        "endpoint": "sendmessage",
        "decision": "repaired",
        "rule": "stale-context-token",
        "handled": True,
        "bot": "0123456789abcdef",
        "peer": "wxid_peer@im.wechat",
        "client_id": "c-1",
        "token": token_hash("ctx-SECRET"),
        "token_sent": True,
        "attempts": [
            {
                "status": 200,
                "ms": 3.0,
                "token": "original",
                "ret": -2,
                "errcode": None,
                "errmsg": "prepare failed",
            },
            {"status": 200, "ms": 2.0, "token": "none", "ret": 0, "errcode": None, "errmsg": None},
        ],
        "status": 200,
        "upstream_ms": 5.0,
        "total_ms": 6.0,
        "added_ms": 1.0,
        "note": "repaired; rule=stale-context-token",
        "error": None,
        "request_doc": None,
        "response_doc": None,
        "delivery": "confirmed",
    }
    facts.update(over)
    return Exchange(**facts)


def snapshot(**over: Any) -> Snapshot:
    base: dict[str, Any] = {"now": NOW, "replica": "replica-1", "problems": (), "peer_state": True}
    base.update(over)
    return Snapshot(**base)


def peer(**over: Any) -> PeerRow:
    base: dict[str, Any] = {
        "bot": "0123456789",
        "peer": token_hash("wxid_peer@im.wechat"),
        "inbound_age_s": 120.0,
        "closed_left_s": None,
        "stale_tokens": 1,
        "queued": 0,
        "budget_left": None,
    }
    base.update(over)
    return PeerRow(**base)


def text_of(page: str) -> str:
    """The page's text, roughly as a browser shows it (a line per table row, tags dropped,
    entities decoded)."""
    page = re.sub(r"(?s)<style>.*?</style>", "", page).replace("</tr>", "\n")
    return re.sub(r"[ \t]+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


# ------------------------------------------------------------------ escaping, secrets


def test_hostile_values_are_escaped_everywhere():
    recent = Recent(
        ts=NOW,
        endpoint=HOSTILE,
        bot=HOSTILE,
        peer=HOSTILE,
        decision=HOSTILE,
        attempts=1,
        tokens=HOSTILE,
        answers=HOSTILE,
        delivery=HOSTILE,
        status=None,
    )
    page = render(
        snapshot(
            replica=HOSTILE,
            version=HOSTILE,
            problems=(HOSTILE,),
            store_error=None,
            peers=(peer(peer=HOSTILE, bot=HOSTILE),),
            bots=(BotRow(bot=HOSTILE, cooldown_left_s=30.0, limited=3),),
            recent=(recent,),
            outbox_depth=1,
            outbox_oldest_age_s=5.0,
            outbox_totals=((HOSTILE, 1),),
        )
    )
    assert "<script" not in page and "<img" not in page and "onerror=alert(1)>" not in page
    assert page.count(html.escape(HOSTILE, quote=True)) >= 9
    # a decision the page does not know is shown as a failure, never as a CSS class of its own
    assert re.findall(r'class="d-([^"]*)"', page) == ["failed"]


def test_activity_keeps_no_token_text_or_errmsg():
    activity = Activity()
    secret_doc = {
        "msg": {"context_token": "ctx-SECRET", "item_list": [{"text_item": {"text": "hello SECRET"}}]}
    }
    x = exchange(
        request_doc=secret_doc,
        response_doc={"errmsg": "token ctx-SECRET"},
        note="x ctx-SECRET",
        error="ctx-SECRET",
        attempts=[{"status": 200, "ms": 1.0, "token": "original", "ret": -2, "errmsg": "SECRET errmsg"}],
    )
    activity.record(x, NOW, ids=False)
    page = render(snapshot(recent=tuple(activity.recent), minutes=activity.window(NOW)))
    assert "SECRET" not in page and "SECRET" not in snapshot(recent=tuple(activity.recent)).to_json()
    assert "wxid_peer" not in page
    assert token_hash("wxid_peer@im.wechat") in page  # as in the log lines
    assert "200 ret=-2" in page


def test_ids_in_clear_only_when_asked():
    assert shown_id("wxid_a", False) == token_hash("wxid_a")
    assert shown_id("wxid_a", True) == "wxid_a"
    # not a string (a hostile gateway): always one hashed string, never the object
    assert shown_id({"a": "<b>"}, True) == token_hash('{"a": "<b>"}')
    assert shown_id(12345, False) == token_hash("12345")
    assert shown_id("", False) is None and shown_id(None, True) is None


# ------------------------------------------------------------------ what it says


def test_an_operator_reads_who_can_be_reached_and_what_happens():
    rows = (
        peer(peer="#open000000", inbound_age_s=300.0),
        peer(peer="#closed0000", closed_left_s=1800.0, queued=3),
        peer(peer="#aging00000", inbound_age_s=23 * 3600.0),
        peer(peer="#spent00000", budget_left=0),
        peer(peer="#budget0000", budget_left=7),
    )
    deferring = text_of(render(snapshot(peers=rows, on_closed="defer", max_age_s=86400.0)))
    lines = {line.split()[0]: line for line in deferring.splitlines() if line.strip().startswith("#")}
    assert "Healthy: the proxy is working." in deferring
    assert "yes" in lines["#open000000"] and "5 min ago" in lines["#open000000"]
    assert "Sent to WeChat now." in lines["#open000000"] and "unknown" in lines["#open000000"]
    assert "no: window closed" in lines["#closed0000"]
    assert (
        "Held in the outbox and delivered as soon as they write to your bot (dropped if they do not "
        in (lines["#closed0000"])
    )
    assert "tries iLink again in 30 min" in lines["#closed0000"]
    assert "yes, for now" in lines["#aging00000"] and "about 24 h" in lines["#aging00000"]
    assert "no: send budget used up" in lines["#spent00000"]
    assert " 7 " in lines["#budget0000"] and "unknown" not in lines["#budget0000"]

    answering = text_of(render(snapshot(peers=rows[1:2], on_closed="answer-locally")))
    assert "Not sent: your bot is told at once that the send failed" in answering
    assert "--defer" in answering


def test_a_spent_budget_decides_what_happens_to_a_message_sent_now():
    rows = (
        peer(peer="#spent00000", budget_left=0),
        peer(peer="#recheck000", budget_left=0, budget_probe=True),
        peer(peer="#left100000", budget_left=1),
    )

    def lines(on_closed: str) -> dict[str, str]:
        text = text_of(render(snapshot(peers=rows, on_closed=on_closed, budget_known=True)))
        return {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("#")}

    held = lines("answer-locally")
    assert "no: send budget used up" in held["#spent00000"]
    assert "Not sent (iLink would refuse it)" in held["#spent00000"]
    assert "tries iLink again" not in held["#spent00000"]  # only the person writing reopens it
    assert (
        "once: budget re-check" in held["#recheck000"]
        and "Sent to WeChat as one re-check" in (held["#recheck000"])
    )
    assert "\tyes\t" not in held["#left100000"] and "Sent to WeChat now." in held["#left100000"]
    deferring = lines("defer")
    assert "Held in the outbox and delivered as soon as they write" in deferring["#spent00000"]
    passing = lines("pass-through")  # sends beyond the budget are only counted: they still go
    assert "Sent to WeChat now." in passing["#spent00000"] and " 0 " in passing["#spent00000"]


def test_unhealthy_and_store_failures_are_said_first():
    page = text_of(
        render(
            snapshot(
                problems=("peer-state store failing: 3 internal error(s)",),
                store_error="the peer-state store cannot be read (OperationalError)",
                bots=(BotRow(bot="0123456789", cooldown_left_s=120.0, limited=5),),
            )
        )
    )
    health = page.split("Can your bot reach")[0]
    assert "Not healthy" in health and "peer-state store failing" in health
    assert "cannot be read (OperationalError)" in health
    assert "bot 0123456789 is cooling down" in health and "2 min more" in health
    starting = text_of(render(Snapshot(now=NOW, replica="r", problems=(), starting=True)))
    assert "Starting" in starting


def test_charts_count_the_last_hour_by_minute():
    activity = Activity()
    activity.record(exchange(decision="deferred", delivery=None), NOW - 3600 - 60, ids=False)  # too old
    activity.record(exchange(), NOW - 600, ids=False)
    activity.record(exchange(decision="window-closed", delivery="refused"), NOW - 5, ids=False)
    activity.record(exchange(decision="<evil>", delivery="unconfirmed"), NOW, ids=False)
    activity.record(exchange(endpoint="getupdates", decision="passed", delivery=None), NOW, ids=False)
    minutes = activity.window(NOW)
    assert len(minutes) == 60 and minutes[-1].start <= NOW < minutes[-1].start + 60
    assert sum(c for m in minutes for _, c in m.decisions) == 3  # getupdates polls are not listed
    page = render(snapshot(minutes=minutes, recent=tuple(reversed(activity.recent))))
    assert page.count("<svg") == 2 and page.count("<rect") == 6  # 3 decisions, 3 delivery outcomes
    text = text_of(page)
    assert "sent: 1" in text and "not sent: 1" in text and "failed: 1" in text and "held for later: 0" in text
    assert "confirmed: 1" in text and "refused: 1" in text and "unconfirmed: 1" in text
    assert len(activity.recent) == 4  # the old deferred one is still listed: the list is by count


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (None, -3, 0, 59, 60, 3599, 3600, 7500, 86400, 90000 + 3600)] == [
        "\u2013",
        "0 s",
        "0 s",
        "59 s",
        "1 min",
        "59 min",
        "1 h",
        "2 h 5 min",
        "1 day",
        "1 day 2 h",
    ]


# ------------------------------------------------------------------ collect, on a real store


def test_collect_reads_peers_windows_and_the_outbox_from_the_store():
    store = StateStore(MEMORY, lock=False)
    ruleset = rules_mod.with_deferral(rules_mod.load_default())
    tracker = types.SimpleNamespace(store=SqliteStore(store))
    store.saw_inbound("bothash-1234567", "wxid_open", store.keyed_hash("ctx-1"), NOW - 90)
    store.saw_inbound("bothash-1234567", "wxid_closed", None, NOW - 7200)
    store.close_window("bothash-1234567", "wxid_closed", NOW + 600, 200, b'{"ret":-2}', NOW - 10)
    store.mark_stale("bothash-1234567", store.keyed_hash("old"), "wxid_open", NOW - 100)
    snap = asyncio.run(
        collect(tracker=tracker, rules=ruleset.rules, activity=Activity(), problems=(), ids=False, now=NOW)
    )
    assert snap.peer_state and snap.on_closed == "defer" and snap.max_age_s == 86400.0
    rows = {p.peer: p for p in snap.peers}
    assert set(rows) == {token_hash("wxid_open"), token_hash("wxid_closed")}
    opened, closed = rows[token_hash("wxid_open")], rows[token_hash("wxid_closed")]
    assert (opened.closed_left_s, opened.inbound_age_s, opened.stale_tokens) == (None, 90.0, 1)
    assert (closed.closed_left_s, closed.inbound_age_s, closed.stale_tokens) == (600.0, 7200.0, 0)
    # the default rules count sends (budget auto): none learnt yet, so "unknown"
    assert opened.bot == "bothash-12" and opened.budget_left is None and snap.budget_known
    assert (snap.outbox_depth, snap.peers_total) == (0, 2)
    assert "wxid_" not in snap.to_json()

    store.db.close()  # a store that fails (its database gone): the page still answers, and says so
    broken = asyncio.run(
        collect(tracker=tracker, rules=ruleset.rules, activity=Activity(), problems=(), ids=False, now=NOW)
    )
    assert broken.store_error == "the peer-state store cannot be read (ProgrammingError)"
    assert "cannot be read" in text_of(render(broken))


def test_collect_reads_each_peers_sends_left_from_the_budget_fields():
    store = StateStore(MEMORY, lock=False)
    bot = "bothash-1234567"
    tracker = types.SimpleNamespace(store=SqliteStore(store))
    for peer_id in ("wxid_fresh", "wxid_counted", "wxid_refused", "wxid_full", "wxid_quiet"):
        if peer_id != "wxid_quiet":  # quiet: a send to it was counted, but it never wrote
            store.saw_inbound(bot, peer_id, None, NOW - 600)
    for _ in range(3):
        store.count_send(bot, "wxid_counted", 10, False, NOW - 60)
    for _ in range(10):
        store.count_send(bot, "wxid_full", 10, False, NOW - 60)
    store.count_send(bot, "wxid_refused", 10, False, NOW - 60)
    store.spend_budget(bot, "wxid_refused", NOW - 30)
    store.count_send(bot, "wxid_quiet", None, False, NOW - 60)

    def rows(ruleset: rules_mod.RuleSet) -> dict[str, PeerRow]:
        snap = asyncio.run(
            collect(tracker=tracker, rules=ruleset.rules, activity=Activity(), problems=(), ids=True, now=NOW)
        )
        return {p.peer: p for p in snap.peers}  # type: ignore[misc]

    auto = rules_mod.load_default()
    unknown = rows(auto)  # nothing learnt yet: only a refusal in this window is known (spent)
    assert [unknown[p].budget_left for p in ("wxid_fresh", "wxid_counted", "wxid_refused")] == [None, None, 0]
    store.learn_budget(bot, 10, NOW - 60)
    learnt = rows(auto)
    assert {p: r.budget_left for p, r in learnt.items()} == {
        "wxid_fresh": 10,
        "wxid_counted": 7,
        "wxid_refused": 0,
        "wxid_full": 0,
        "wxid_quiet": None,
    }
    assert not any(r.budget_probe for r in learnt.values())
    store.learn_budget(bot, 10, NOW - 7200)  # learnt longer than reprobe_s ago: the next send re-checks
    stale = rows(auto)
    assert stale["wxid_full"].budget_probe and not stale["wxid_refused"].budget_probe
    given = with_budget(auto, rules_mod.Budget(4, 3600.0))  # a given limit wins over the learnt one
    assert rows(given)["wxid_counted"].budget_left == 1 and rows(given)["wxid_fresh"].budget_left == 4
    off = with_budget(auto, rules_mod.Budget("off", 3600.0))
    snap = asyncio.run(
        collect(tracker=tracker, rules=off.rules, activity=Activity(), problems=(), ids=True, now=NOW)
    )
    assert not snap.budget_known and all(p.budget_left is None for p in snap.peers)


def with_budget(ruleset: rules_mod.RuleSet, budget: rules_mod.Budget) -> rules_mod.RuleSet:
    return dataclasses.replace(
        ruleset,
        rules=tuple(
            dataclasses.replace(r, peer_state=dataclasses.replace(r.peer_state, budget=budget))
            if r.peer_state is not None
            else r
            for r in ruleset.rules
        ),
    )


def test_collect_without_peer_state():
    core = rules_mod.load_default()
    plain = tuple(r for r in core.rules if r.peer_state is None)
    snap = asyncio.run(
        collect(tracker=None, rules=plain, activity=Activity(), problems=(), ids=False, now=NOW)
    )
    assert not snap.peer_state and snap.peers == ()
    assert "Peer state is off" in render(snap)

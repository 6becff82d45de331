"""Delivery evidence through the real proxy process and the fake iLink (issue 15, item 1): every
send's answer is classified (confirmed, unconfirmed, refused, failed), counted on /metrics,
journaled, and an unconfirmed one is marked, or answered as a failure under `unconfirmed: fail`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from conftest import ROOT, core_rules, start_proxy, upstream_args
from ilink_fixproxy.core.policy import UNCONFIRMED_ERRMSG
from ilink_fixproxy.launcher import ProxyProcess
from ilink_fixproxy.sandbox import SILENT_DROP_ANSWER, SUCCESS_ANSWER, Answer, FakeILink, TestPKI
from obs_helpers import SEND, Gateway, journal
from test_metrics import moved, scrape

HEADER = "x-ilink-fixproxy"
STALE = b'{"ret":-2,"errmsg":"prepare failed"}'
FAILURE = {"ret": -1, "errmsg": UNCONFIRMED_ERRMSG}
OUTCOMES = ("confirmed", "unconfirmed", "refused", "failed")


def rules_with(path: Path, source: Path, unconfirmed: str) -> Path:
    doc = yaml.safe_load(source.read_text())
    for rule in doc["rules"]:
        rule["action"]["unconfirmed"] = unconfirmed
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextmanager
def proxy_with(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, *, peer_state: bool, unconfirmed: str
) -> Iterator[tuple[ProxyProcess, str, Path]]:
    fake.reset()
    source = ROOT / "rules.yaml" if peer_state else core_rules(tmp_path)
    rules = rules_with(tmp_path / "rules.yaml", source, unconfirmed)
    cap = tmp_path / "cap"
    state = ("--state", ":memory:") if peer_state else ()
    args = (*upstream_args(fake, pki, tmp_path / "conf"), "--rules", str(rules), *state)
    with start_proxy(*args, "--metrics", "127.0.0.1:0", "--capture", str(cap)) as p:
        assert ("peer state in" in p.output) is peer_state  # (printed before the start line)
        m = re.search(r"metrics on (http://\S+)/metrics", p.output)
        assert m, p.output
        yield p, m.group(1), cap


def outcomes(before: dict, after: dict) -> dict[str, float]:
    return {o: moved(before, after, "ilink_fixproxy_send_outcomes_total", outcome=o) for o in OUTCOMES}


def deliveries(cap: Path) -> list[str | None]:
    return [r["delivery"] for r in journal(cap) if r["endpoint"] == "sendmessage"]


def test_with_peer_state_report_marks_an_unconfirmed_send_and_replays_it_without_sending_again(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path, peer_state=True, unconfirmed="report") as (proxy, base, cap):
        gw = Gateway(proxy.url)
        s0 = scrape(base)
        fake.fresh_tokens.add(token := gw.token("fresh"))
        ok = gw.send(token, "c-ok")
        assert ok.status_code == 200 and ok.content == SUCCESS_ANSWER and HEADER not in ok.headers

        fake.dropping_peers.add(gw.peer)  # iLink answers {"ret":0} and never delivers
        lost = gw.send(token, "c-lost")
        assert lost.status_code == 200 and lost.content == SILENT_DROP_ANSWER  # body unchanged
        assert (
            lost.headers[HEADER]
            == "unconfirmed; rule=stale-context-token; delivery=unconfirmed; handed=as-is"
        )
        again = gw.send(token, "c-lost")  # the gateway's retry: answered from memory
        assert again.content == SILENT_DROP_ANSWER
        assert again.headers[HEADER].startswith("replayed; ")
        assert again.headers[HEADER].endswith("; delivery=unconfirmed; handed=as-is")
        assert len(fake.sends()) == 2 and len(fake.deliveries) == 1

        fake.dropping_peers.clear()
        fake.script(SEND, Answer(fault="reset"))  # no answer at all
        assert gw.send(token, "c-reset").status_code == 502
        s1 = scrape(base)
        gw.close()
    assert outcomes(s0, s1) == {"confirmed": 1, "unconfirmed": 1, "refused": 0, "failed": 1}
    assert deliveries(cap) == ["confirmed", "unconfirmed", None, "failed"]


def test_with_peer_state_fail_answers_a_failure_and_a_retry_goes_upstream_within_max_attempts(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path, peer_state=True, unconfirmed="fail") as (proxy, base, cap):
        gw = Gateway(proxy.url)
        s0 = scrape(base)
        fake.fresh_tokens.add(token := gw.token("fresh"))
        ok = gw.send(token, "c-ok")  # a confirmed send is never touched
        assert ok.content == SUCCESS_ANSWER and HEADER not in ok.headers
        fake.dropping_peers.add(gw.peer)
        first = gw.send(token, "c-lost")
        assert first.status_code == 200 and first.json() == FAILURE
        assert (
            first.headers[HEADER]
            == "unconfirmed; rule=stale-context-token; delivery=unconfirmed; handed=failure"
        )
        assert len(fake.sends()) == 2
        retry = gw.send(token, "c-lost")  # told it failed, the gateway retries: one more real try
        assert retry.json() == FAILURE and retry.headers[HEADER].startswith("unconfirmed; ")
        assert len(fake.sends()) == 3
        last = gw.send(token, "c-lost")  # max_attempts (2) used: never a third upstream send
        assert last.json() == FAILURE and last.headers[HEADER].startswith(
            "answered-locally; reason=attempts-used"
        )
        assert len(fake.sends()) == 3 and len(fake.deliveries) == 1
        s1 = scrape(base)
        gw.close()
    assert outcomes(s0, s1) == {"confirmed": 1, "unconfirmed": 2, "refused": 0, "failed": 0}
    assert deliveries(cap) == ["confirmed", "unconfirmed", "unconfirmed", None]


def test_without_peer_state_report_marks_plain_and_repaired_unconfirmed_answers(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path, peer_state=False, unconfirmed="report") as (proxy, base, cap):
        gw = Gateway(proxy.url)
        s0 = scrape(base)
        ok = gw.send(None)  # a send without a token is a send too
        assert ok.content == SUCCESS_ANSWER and HEADER not in ok.headers
        repaired = gw.send(gw.token("stale"))  # refused, re-issued without the token: delivered
        assert repaired.content == SUCCESS_ANSWER and repaired.headers[HEADER].startswith("repaired; ")
        assert "delivery=" not in repaired.headers[HEADER]

        fake.script(SEND, Answer(body=STALE), Answer(body=SILENT_DROP_ANSWER))
        dropped = gw.send(gw.token("stale"))  # the tokenless re-issue is silently dropped
        assert dropped.content == SILENT_DROP_ANSWER
        assert dropped.headers[HEADER].startswith("repaired; rule=stale-context-token; ")
        assert dropped.headers[HEADER].endswith("; delivery=unconfirmed; handed=as-is")
        fake.dropping_peers.add(gw.peer)
        plain = gw.send(None)
        assert plain.content == SILENT_DROP_ANSWER
        assert (
            plain.headers[HEADER]
            == "unconfirmed; rule=stale-context-token; delivery=unconfirmed; handed=as-is"
        )
        fake.dropping_peers.clear()
        fake.tokenless_delivers = False
        refused = gw.send(gw.token("stale"))
        assert refused.json()["ret"] == -2
        fake.script(SEND, Answer(fault="reset"))
        assert gw.send(None).status_code == 502
        s1 = scrape(base)
        gw.close()
    assert outcomes(s0, s1) == {"confirmed": 2, "unconfirmed": 2, "refused": 1, "failed": 1}
    assert deliveries(cap) == ["confirmed", "confirmed", "unconfirmed", "unconfirmed", "refused", "failed"]


def test_without_peer_state_fail_answers_unconfirmed_sends_as_failures(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with proxy_with(fake, pki, tmp_path, peer_state=False, unconfirmed="fail") as (proxy, base, _):
        gw = Gateway(proxy.url)
        s0 = scrape(base)
        assert gw.send(None).content == SUCCESS_ANSWER
        fake.script(SEND, Answer(body=STALE), Answer(body=b""))
        repaired = gw.send(gw.token("stale"))
        assert repaired.status_code == 200 and repaired.json() == FAILURE
        assert repaired.headers["content-type"] == "application/json"
        assert repaired.headers[HEADER].endswith("; delivery=unconfirmed; handed=failure")
        assert repaired.headers[HEADER].startswith("repaired; ")
        fake.dropping_peers.add(gw.peer)
        plain = gw.send(None)
        assert plain.status_code == 200 and json.loads(plain.content) == FAILURE
        assert (
            plain.headers[HEADER]
            == "unconfirmed; rule=stale-context-token; delivery=unconfirmed; handed=failure"
        )
        s1 = scrape(base)
        gw.close()
    assert outcomes(s0, s1) == {"confirmed": 1, "unconfirmed": 2, "refused": 0, "failed": 0}

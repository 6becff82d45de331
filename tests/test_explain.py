"""`ilink-fixproxy explain`: captures made by the real proxy replay, offline, to the decisions the
proxy took live (journal, HAR export and flow file alike); captures made without the proxy show
what it would do, and say when the capture lacks the upstream answer needed to know."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SEND, core_rules, start_proxy, upstream_args
from ilink_fixproxy.explain import UNKNOWN, explain, from_flow, load_capture
from ilink_fixproxy.launcher import clean_env, ilink_fixproxy_argv
from ilink_fixproxy.rules import load_file
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from mitmproxy import io
from mitmproxy.addons.savehar import SaveHar
from mitmproxy.test import tflow
from obs_helpers import Gateway, journal

STALE = b'{"ret":-2,"errmsg":"prepare failed"}'


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ilink_fixproxy_argv(*args), capture_output=True, text=True, timeout=60, env=clean_env()
    )


def explained(capture: Path, rules: Path) -> list[dict]:
    p = run("explain", str(capture), "--rules", str(rules), "--json")
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


@dataclass
class Capture:
    dir: Path
    rules: Path
    decisions: list[str]


def _proxy_args(fake: FakeILink, pki: TestPKI, base: Path, rules: Path) -> list[str]:
    return [
        *upstream_args(fake, pki, base / "conf"),
        "--rules",
        str(rules),
        "--state",
        ":memory:",
        "--capture",
        str(base / "cap"),
        "--capture-flows",
    ]


@pytest.fixture(scope="module")
def peer_capture(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Capture]:
    """Live traffic through the shipped rules (peer state) taking every kind of decision."""
    fake = fake_server
    fake.reset()
    fake.longpoll_seconds = 0.05
    base = tmp_path_factory.mktemp("explain-peers")
    rules = ROOT / "rules.yaml"
    with start_proxy(*_proxy_args(fake, pki, base, rules)) as proxy:
        gw, other_bot = Gateway(proxy.url), Gateway(proxy.url)
        stale_a, stale_b = gw.token("a"), gw.token("b")
        got = []

        def send(g: Gateway, token: str | None, cid: str) -> None:
            got.append(g.send(token, cid).headers.get("x-ilink-fixproxy", "passed").split(";")[0])

        gw.poll()
        got.append("passed")
        send(gw, stale_a, "c1")  # repaired
        send(gw, stale_a, "c1")  # replayed
        send(gw, stale_a, "c2")  # stripped: a proven-stale token is removed up front
        send(gw, None, "c3")  # passed
        fake.tokenless_delivers = False
        send(gw, stale_b, "c4")  # window-closed
        send(gw, stale_b, "c5")  # answered-locally
        fake.push_inbound(gw.peer, "back")
        gw.poll()
        got.append("passed")
        send(gw, stale_b, "c6")  # substituted
        for i in range(4):  # another bot's tokenless sends refused: rate limit, then cooldown
            send(other_bot, None, f"r{i}")
        gw.getconfig(gw.token("cfg"))
        got.append("passed")
        for g in (gw, other_bot):
            g.close()
    assert got == [
        "passed",
        "repaired",
        "replayed",
        "stripped",
        "passed",
        "window-closed",
        "answered-locally",
        "passed",
        "substituted",
        "rate-limited",
        "rate-limited",
        "cooldown-started",
        "answered-locally",
        "passed",
    ]
    yield Capture(base / "cap", rules, got)


def test_explain_reproduces_the_live_peer_state_decisions(peer_capture: Capture):
    live = [r["decision"] for r in journal(peer_capture.dir)]
    assert live == peer_capture.decisions
    rows = explained(peer_capture.dir, peer_capture.rules)
    assert [r["would"] for r in rows] == live
    assert all(r["agrees"] is True for r in rows)


def test_explain_reads_the_har_export_and_the_flow_file_alike(peer_capture: Capture, tmp_path: Path):
    har = tmp_path / "capture.har"
    assert run("capture", "export", "--har", str(har), str(peer_capture.dir)).returncode == 0
    for capture in (har, peer_capture.dir / "flows.mitm"):
        assert [r["would"] for r in explained(capture, peer_capture.rules)] == peer_capture.decisions


def test_explain_prints_a_table_and_a_summary(peer_capture: Capture):
    p = run("explain", str(peer_capture.dir), "--rules", str(peer_capture.rules))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"{len(peer_capture.decisions)} iLink exchange(s) from {peer_capture.dir} (journal)" in out
    assert "summary:" in out and "decision" in out and "would" in out and "live" in out
    summary = out.split("summary:")[1]
    assert any(line.split()[:4] == ["answered-locally", "2", "2", "2"] for line in summary.splitlines())
    n = len(peer_capture.decisions)
    assert f"{n} of {n} exchange(s) with a live decision replay to the same decision." in out


def test_explain_reproduces_plain_repairs_and_failed_reissues(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    rules = core_rules(tmp_path)
    with start_proxy(*_proxy_args(fake, pki, tmp_path, rules)) as proxy:
        gw = Gateway(proxy.url)
        gw.send(gw.token("s1"))  # repaired
        fake.fresh_tokens.add(fresh := gw.token("fresh"))
        gw.send(fresh)  # passed
        fake.script(SEND, Answer(body=STALE), Answer(fault="reset"))
        gw.send(gw.token("s2"))  # reissue-failed
        fake.tokenless_delivers = False
        gw.send(gw.token("s3"))  # still-failing
        gw.close()
    live = [r["decision"] for r in journal(tmp_path / "cap")]
    assert live == ["repaired", "passed", "reissue-failed", "still-failing"]
    rows = explained(tmp_path / "cap", rules)
    assert [r["would"] for r in rows] == live
    # explain says what iLink's answer told about delivery, as the live proxy journaled it
    evidence = ["confirmed", "confirmed", "refused", "refused"]
    assert [r["delivery"] for r in journal(tmp_path / "cap")] == [r["delivery"] for r in rows] == evidence
    # the same capture under peer-state rules: what the capture cannot tell is said, not guessed
    with_state = explained(tmp_path / "cap", ROOT / "rules.yaml")
    assert [r["would"] for r in with_state][:2] == ["repaired", "passed"]


def test_a_capture_made_without_the_proxy_shows_what_it_would_do(tmp_path: Path):
    def flow(token: str | None, answer: bytes):
        f = tflow.tflow(resp=True)
        f.request.method, f.request.path = "POST", SEND
        msg = {"to_user_id": "wxid_x", "client_id": token or "none", "item_list": []}
        if token:
            msg["context_token"] = token
        f.request.content = json.dumps({"msg": msg}).encode()
        f.response.content = answer
        return f

    flows = [flow("ctx-stale", STALE), flow(None, STALE), flow("ctx-ok", b"{}")]
    path = tmp_path / "plain.mitm"
    with open(path, "wb") as fh:
        writer = io.FlowWriter(fh)
        for f in flows:
            writer.add(f)
    har = tmp_path / "plain.har"
    har.write_text(json.dumps(SaveHar().make_har(flows)))
    rules = load_file(core_rules(tmp_path))
    for capture in (path, har):
        kind, records = load_capture(capture)
        results = explain(records, rules)
        assert [e.decision for e in results] == [UNKNOWN, "passed", "passed"], kind
        assert "no token is not in the capture" in results[0].detail
        assert all(e.agrees is None for e in results)  # nothing live to compare with


def test_explain_mistakes_end_in_one_line(tmp_path: Path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not a capture")
    for target in (tmp_path / "missing", garbage, tmp_path):
        p = run("explain", str(target))
        assert p.returncode == 2, p.stdout + p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text("version: 1\nrules: 3\n")
    p = run("explain", str(garbage), "--rules", str(bad_rules))
    assert p.returncode == 1 and "Traceback" not in p.stderr


def test_explain_replays_a_reissue_that_never_left_as_one_that_leaves_the_next_its_turn(tmp_path: Path):
    # The proxy records `"sent": false` for a re-issue that certainly never reached iLink; the
    # core then allows the next one (retries: 2), and only then: a re-issue that may have
    # reached iLink ends the exchange, live and replayed alike.
    doc = yaml.safe_load(core_rules(tmp_path).read_text())
    doc["rules"][0]["action"]["retries"] = 2
    (tmp_path / "retries-2.yaml").write_text(yaml.safe_dump(doc))
    rules = load_file(tmp_path / "retries-2.yaml")

    def recorded(sent: bool):
        f = tflow.tflow(resp=True)
        f.request.method, f.request.path = "POST", SEND
        f.request.content = json.dumps({"msg": {"to_user_id": "wxid_x", "context_token": "ctx"}}).encode()
        f.response.content = b"{}"
        error = {"status": None, "token": "none", "error": "connection refused"}
        if not sent:
            error["sent"] = False
        ok = {"status": 200, "token": "none", "empty": False}
        attempts = [{"status": 200, "token": "original", "ret": -2, "errmsg": "prepare failed"}, error, ok]
        return from_flow(f, {"decision": "repaired", "attempts": attempts})

    never_left, may_have = explain([recorded(False), recorded(True)], rules)
    assert never_left.decision == "repaired" and never_left.agrees
    assert may_have.decision == "reissue-failed"

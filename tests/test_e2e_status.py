"""End to end: `/status` on the `--metrics` listener, served by the real proxy after real traffic
through the fake iLink (a repaired stale send, a substituted token, a send accepted without a
message_id, a closed window whose sends are deferred), read by headless Chromium as an operator's
browser reads it; and nothing secret on it, ever."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from browser import Browser, chromium
from conftest import ROOT, SEND, UPDATES, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_health import REISSUE_FAULT, health
from test_e2e_health import start as start_health
from test_e2e_outbox import wait_for

BOT_TOKEN = "status-bot@im.bot:Sh0uldNeverAppear-b0t-t0ken"
HEADERS = {
    "Content-Type": "application/json",
    "AuthorizationType": "ilink_bot_token",
    "Authorization": f"Bearer {BOT_TOKEN}",
}
ALICE, BOB, CAROL, DAVE = (f"wxid_{n}_status@im.wechat" for n in ("alice", "bob", "carol", "dave"))
TEXT = "private text: the quarterly numbers"
SECRET_PATH = "bot-path-Sh0uldNeverAppear"
STALE = "AARzJWAFAAAB-status-stale-token-{}"


def metrics_base(p: ProxyProcess) -> str:
    """The metrics listener's address, once the proxy has started (until its event loop has run,
    /healthz and /status say "starting")."""
    m = re.search(r"metrics on (http://\S+)/metrics", p.output)
    assert m, p.output
    wait_for(lambda: httpx.get(m.group(1) + "/healthz", trust_env=False).status_code == 200)
    return m.group(1)


def send(client: httpx.Client, p: ProxyProcess, peer: str, token: str, client_id: str) -> httpx.Response:
    msg = {
        "to_user_id": peer,
        "client_id": client_id,
        "message_type": 2,
        "message_state": 2,
        "item_list": [{"type": 1, "text_item": {"text": TEXT}}],
        "context_token": token,
    }
    return client.post(p.url + SEND, content=json.dumps({"msg": msg}).encode(), headers=HEADERS)


def traffic(client: httpx.Client, p: ProxyProcess, fake: FakeILink) -> str:
    """Four people in four situations; returns the fresh token alice's message brought."""
    # a path iLink does not have, carrying what could be a secret: shown as "other"
    assert client.post(p.url + "/ilink/bot/" + SECRET_PATH, content=b"{}", headers=HEADERS).status_code == 404
    fresh = fake.push_inbound(ALICE, TEXT)
    client.post(p.url + UPDATES, content=b'{"get_updates_buf":""}', headers=HEADERS)
    assert (
        send(client, p, ALICE, STALE.format(1), "st-1").headers["x-ilink-fixproxy"].startswith("substituted")
    )
    assert send(client, p, BOB, STALE.format(2), "st-2").headers["x-ilink-fixproxy"].startswith("repaired")
    fake.dropping_peers.add(DAVE)
    assert "unconfirmed" in send(client, p, DAVE, STALE.format(3), "st-3").headers["x-ilink-fixproxy"]
    fake.tokenless_delivers = False  # carol's window is closed: refused with and without the token
    for cid in ("st-4", "st-5"):
        assert send(client, p, CAROL, STALE.format(4), cid).headers["x-ilink-fixproxy"].startswith("deferred")
    return fresh


@pytest.fixture(scope="module")
def served(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, str, str]]:
    """A proxy with --defer and --metrics that has seen the traffic above: (proxy, base, fresh)."""
    fake_server.reset()
    conf = tmp_path_factory.mktemp("status")
    with (
        start_proxy(
            *upstream_args(fake_server, pki, conf),
            "--rules",
            str(ROOT / "rules.yaml"),
            "--state",
            str(conf / "state.sqlite3"),
            "--defer",
            "--metrics",
            "127.0.0.1:0",
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as client,
    ):
        fresh = traffic(client, p, fake_server)
        yield p, metrics_base(p), fresh
    fake_server.reset()


def _need_chromium() -> str:
    found = chromium()
    if found:
        return found
    reason = "chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(f"{reason} (with CI=true this fails)")


def test_the_page_answers_who_can_be_reached_and_what_happens_to_messages(served):
    binary = _need_chromium()
    _, base, _ = served
    with Browser(binary) as browser:
        page = browser.load(base + "/status")
        text = page.text()
        requested = page.requested()
    origin = urlsplit(base).netloc
    # everything the page made the browser fetch came from the proxy (here: only the page)
    assert requested and all(urlsplit(u).netloc == origin for u in requested), requested
    assert requested == [base + "/status"], requested

    assert "Healthy: the proxy is working." in text
    assert "Can your bot reach each person right now?" in text
    rows = {line.split("\t")[0]: line for line in text.splitlines() if line.startswith("#")}
    carol, alice = rows[token_hash(CAROL)], rows[token_hash(ALICE)]
    # carol: window closed, her two sends held, and what happens next in plain words
    assert "no: window closed" in carol
    assert "\t2\t" in carol  # messages waiting
    assert "Held in the outbox and delivered as soon as they write to your bot" in carol
    assert "dropped if they do not write within 1 day)" in carol
    # alice wrote: reachable, and the stale token the gateway sent is remembered
    assert "\tyes\t" in alice and "s ago" in alice
    assert "unknown" in alice  # the send budget, until the store knows it
    assert "2 message(s) waiting in the outbox" in text
    # recent decisions, newest first: the repaired stale send with its two attempts
    recent = [line for line in text.splitlines() if line.count("\t") >= 8 and "sendmessage" in line]
    bob = next(line for line in recent if token_hash(BOB) in line)
    assert "\trepaired\t2\toriginal -> none\t200 ret=-2, 200 ret=0\tconfirmed\t200" in bob
    dave = next(line for line in recent if token_hash(DAVE) in line)
    assert "\tpassed\t" in dave and "\tunconfirmed\t" in dave
    assert [line.split("\t")[4] for line in recent][:3] == ["deferred", "deferred", "passed"]
    # the charts' legends count this traffic
    assert re.search(r"held for later: 2\b", text), text
    assert re.search(r"unconfirmed: 1\b", text), text


def test_nothing_secret_on_the_page_or_in_its_data(served):
    _, base, fresh = served
    page = httpx.get(base + "/status", trust_env=False).text
    data = httpx.get(base + "/status.json", trust_env=False).text
    secrets = [
        BOT_TOKEN,
        BOT_TOKEN.split(":")[1],
        fresh,
        TEXT,
        "quarterly",
        *(STALE.format(i) for i in range(1, 5)),
    ]
    ids = [ALICE, BOB, CAROL, DAVE, "wxid_"]
    for body in (page, data):
        for value in [*secrets, *ids]:
            assert value not in body
        for value in (ALICE, BOB, CAROL, DAVE):
            assert token_hash(value) in body  # hashed as in the log lines
    assert json.loads(data)["healthy"] is True
    assert "<td>other</td>" in page


def test_the_page_loads_nothing_from_anywhere(served):
    _, base, _ = served
    r = httpx.get(base + "/status", trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"].startswith("default-src 'none';")
    assert "<script" not in r.text.lower()
    assert "://" not in r.text  # no URL at all, so nothing to fetch or link out to
    assert not re.search(r"(?i)\b(src|srcset|action)\s*=", r.text)
    assert re.findall(r'(?i)href="([^"]*)"', r.text) == ["data:,"]
    assert '<meta http-equiv="refresh" content="10">' in r.text


def test_clear_ids_only_with_capture_ids(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with (
        start_proxy(
            *upstream_args(fake, pki, tmp_path / "conf"),
            "--rules",
            str(ROOT / "rules.yaml"),
            "--state",
            ":memory:",
            "--metrics",
            "127.0.0.1:0",
            "--capture",
            str(tmp_path / "capture"),
            "--capture-ids",
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as client,
    ):
        fake.push_inbound(ALICE, TEXT)
        client.post(p.url + UPDATES, content=b'{"get_updates_buf":""}', headers=HEADERS)
        send(client, p, BOB, STALE.format(9), "ids-1")
        page = client.get(metrics_base(p) + "/status").text
    assert ALICE in page and BOB in page  # the operator asked for ids in clear
    assert "(<code>--capture-ids</code> is on)" in page
    assert BOT_TOKEN not in page and TEXT not in page and STALE.format(9) not in page


def test_without_peer_state_the_page_says_it_cannot_tell(proxy_plain):
    base = proxy_plain
    page = httpx.get(base + "/status", trust_env=False).text
    assert "Peer state is off" in page
    assert "Healthy: the proxy is working." in page


@pytest.fixture
def proxy_plain(fake: FakeILink, pki: TestPKI, tmp_path: Path) -> Iterator[str]:
    rules = core_rules(tmp_path)  # the shipped rules without peer_state
    with start_proxy(
        *upstream_args(fake, pki, tmp_path), "--rules", str(rules), "--metrics", "127.0.0.1:0"
    ) as p:
        yield metrics_base(p)


# ------------------------------------------------------------------ when things go wrong


def scrape(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(base + "/metrics", trust_env=False).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_failing_store_is_on_the_page_and_in_store_up(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    state_dir = tmp_path / "state"
    with start_health(
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(state_dir / "s.db"),
    ) as p:
        base = metrics_base(p)
        up = scrape(base)
        assert up[("ilink_fixproxy_store_up", frozenset())] == 1
        assert up[("ilink_fixproxy_healthy", frozenset())] == 1
        state_dir.rename(tmp_path / "elsewhere")
        page = httpx.get(base + "/status", trust_env=False).text
        assert "Not healthy: the proxy cannot do its job fully." in page
        assert "is gone (deleted or moved away)" in page
        down = scrape(base)
        assert down[("ilink_fixproxy_store_up", frozenset())] == 0
        assert down[("ilink_fixproxy_healthy", frozenset())] == 0
        (tmp_path / "elsewhere").rename(state_dir)
        assert scrape(base)[("ilink_fixproxy_store_up", frozenset())] == 1
        assert "Healthy: the proxy is working." in httpx.get(base + "/status", trust_env=False).text


def test_the_page_answers_while_the_event_loop_is_stuck(tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    text = (ROOT / "rules.yaml").read_text()
    rules.write_text(text)
    with start_health(
        "--rules", str(rules), "--state", ":memory:", "--confdir", str(tmp_path / "conf"),
        "--set", "ilink_health_stall_s=1",
    ) as p:  # fmt: skip
        base = metrics_base(p)
        # as in test_e2e_health: a rules file that is a FIFO with no writer blocks the loop in open()
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.replace(fifo, rules)
        released = threading.Event()

        def release() -> None:
            with open(rules, "w") as writer:
                writer.write(text)
            released.set()

        try:
            wait_for(lambda: health(p)[1].startswith("unhealthy: event loop stuck"), timeout=30)
            page = httpx.get(base + "/status", trust_env=False, timeout=30)
            assert page.status_code == 200
            assert "Not healthy" in page.text and "event loop stuck" in page.text
        finally:
            threading.Thread(target=release, daemon=True).start()
            assert released.wait(30)
        wait_for(lambda: health(p) == (200, "ok\n"), timeout=30)


def test_repairs_failing_internally_are_counted(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with (
        start_health(
            *upstream_args(fake, pki, tmp_path / "conf"),
            "--rules",
            str(core_rules(tmp_path)),
            fault=(tmp_path, REISSUE_FAULT),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as client,
    ):
        base = metrics_base(p)
        repairs = ("ilink_fixproxy_internal_errors_total", frozenset({("component", "repairs")}))
        assert scrape(base)[repairs] == 0
        (tmp_path / "broken").touch()
        client.post(p.url + SEND, content=send_body(STALE.format(0)), headers=HEADERS)
        after = scrape(base)
        assert after[repairs] == 1
        assert after[("ilink_fixproxy_internal_errors_total", frozenset({("component", "store")}))] == 0
        assert "repairs failing" in client.get(base + "/status").text

"""The addon in-process with mitmproxy's own test harness (taddons/tflow): option validation,
which flows are buffered, and the repair against a real fake iLink on loopback."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import HEADERS, SEND, core_rules, send_body
from ilink_fixproxy.addon import HEADER, IlinkFixProxy
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from mitmproxy import exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

STALE = "stale-ctx-in-process"
# The stateless repair path (peer state has its own tests).
CORE_RULES = core_rules(Path(tempfile.mkdtemp(prefix="ilink-core-rules-")))


def flow_to(
    url: str, body: bytes, answer: bytes = b'{"ret":-2,"errmsg":"prepare failed"}', status: int = 200
) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.request = http.Request.make("POST", url + SEND, body, HEADERS)
    f.response = http.Response.make(status, answer, {"Content-Type": "application/json"})
    f.client_conn.proxy_mode = ProxyMode.parse(f"reverse:{url}")
    return f


def test_invalid_options_are_rejected_with_actionable_messages(tmp_path: Path):
    addon = IlinkFixProxy()
    with taddons.context(addon) as tctx:
        bad = tmp_path / "bad.yaml"
        bad.write_text("version: 1\nrules: [1]\n")
        with pytest.raises(exceptions.OptionsError, match=r"ilink_rules: .*bad\.yaml:2:9: rules\[0\]"):
            tctx.configure(addon, ilink_rules=str(bad))
        with pytest.raises(exceptions.OptionsError, match="not a size"):
            tctx.configure(addon, ilink_buffer_limit="huge")
        with pytest.raises(exceptions.OptionsError, match="not one of rule-hosts, all"):
            tctx.configure(addon, ilink_intercept="most")
        with pytest.raises(exceptions.OptionsError, match="cannot load the upstream CA"):
            tctx.configure(addon, ssl_verify_upstream_trusted_ca=str(tmp_path / "missing.pem"))
        # the rejected values left the working configuration in place
        assert addon.ruleset.rules[0].name == "stale-context-token"


def test_forward_mode_intercepts_only_the_rule_hosts():
    addon = IlinkFixProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, mode=["regular"])
        assert tctx.options.allow_hosts == [r"^ilinkai\.weixin\.qq\.com:\d+$"]
        tctx.configure(addon, ilink_intercept="all")
        assert tctx.options.allow_hosts == []
        tctx.configure(addon, ilink_intercept="rule-hosts", mode=["reverse:https://x.y"])
        assert tctx.options.allow_hosts == []  # reverse mode: never restrict


def test_operator_allow_hosts_win():
    addon = IlinkFixProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, allow_hosts=["example"], mode=["regular"])
        assert tctx.options.allow_hosts == ["example"]


def test_only_selected_flows_are_buffered():
    addon = IlinkFixProxy()
    with taddons.context(addon):
        send = tflow.tflow()
        send.request = http.Request.make("POST", "https://ilinkai.weixin.qq.com" + SEND, b"", HEADERS)
        addon.requestheaders(send)
        assert not send.request.stream

        config = tflow.tflow(resp=True)
        config.request = http.Request.make("POST", "https://ilinkai.weixin.qq.com/ilink/bot/getconfig", b"")
        addon.requestheaders(config)
        addon.responseheaders(config)
        assert config.request.stream and config.response.stream

        # getupdates answers are read (never changed) to learn fresh tokens
        poll = tflow.tflow(resp=True)
        poll.request = http.Request.make("POST", "https://ilinkai.weixin.qq.com/ilink/bot/getupdates", b"")
        addon.requestheaders(poll)
        addon.responseheaders(poll)
        assert not poll.request.stream and not poll.response.stream

        huge = tflow.tflow(resp=True)
        huge.request = http.Request.make("POST", "https://ilinkai.weixin.qq.com" + SEND, b"")
        huge.request.headers["content-length"] = str(50 * 1024 * 1024)
        addon.requestheaders(huge)
        assert huge.request.stream


def test_rule_selection_is_remembered_only_for_request_line_filters(tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    doc = yaml.safe_load(CORE_RULES.read_text())
    doc["rules"][0]["match"]["filter"] = "~u /ilink/bot/sendmessage & ~h X-Pick"
    rules.write_text(yaml.safe_dump(doc))
    addon = IlinkFixProxy()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ilink_rules=str(rules))

        def selected(headers: dict[str, str]) -> int:
            f = tflow.tflow()
            f.request = http.Request.make("POST", "https://ilinkai.weixin.qq.com" + SEND, b"", headers)
            return len(addon._candidates(f))

        # one URL, different headers: a header filter is evaluated for every flow
        assert [selected({**HEADERS, "X-Pick": "1"}), selected(HEADERS), selected({"X-Pick": "1"})] == [
            1,
            0,
            1,
        ]

        tctx.configure(addon, ilink_rules=str(CORE_RULES))  # "~m POST & ~u ...": remembered per line
        assert [selected(HEADERS), selected({}), selected(HEADERS)] == [1, 1, 1]
        get = tflow.tflow()
        get.request = http.Request.make("GET", "https://ilinkai.weixin.qq.com" + SEND, b"")
        assert addon._candidates(get) == []
        assert len(addon._line_memo) == 2


@pytest.fixture
def fake_ilink(pki: TestPKI):
    with FakeILink(pki) as fake:
        yield fake


def repair(addon: IlinkFixProxy, f: http.HTTPFlow, pki: TestPKI, **opts) -> None:
    async def go() -> None:
        with taddons.context(addon) as tctx:
            tctx.configure(
                addon,
                ssl_verify_upstream_trusted_ca=str(pki.ca_cert),
                ilink_rules=str(CORE_RULES),
                **opts,
            )
            await addon.response(f)
            await addon.reissuer.aclose()

    asyncio.run(go())


def test_response_hook_repairs_and_annotates(fake_ilink: FakeILink, pki: TestPKI, caplog):
    caplog.set_level(logging.INFO)
    addon = IlinkFixProxy()
    f = flow_to(fake_ilink.url, send_body(STALE))
    repair(addon, f, pki)
    assert f.response.content == fake_ilink.success_answer
    assert f.response.headers[HEADER].startswith("repaired; rule=stale-context-token")
    assert f.marked == ":wrench:"
    assert "repaired" in f.comment and 'ret=-2 errmsg="prepare failed"' in f.comment
    assert f.metadata["ilink_fixproxy"]["decision"] == "repaired"
    (sent,) = fake_ilink.sends()
    assert sent.context_token is None and sent.body == send_body(None)
    assert STALE not in caplog.text


def test_a_flow_without_the_token_is_untouched(fake_ilink: FakeILink, pki: TestPKI):
    addon = IlinkFixProxy()
    f = flow_to(fake_ilink.url, send_body(None))
    before = f.response.get_state()
    repair(addon, f, pki)
    assert f.response.get_state() == before
    assert not fake_ilink.requests and not f.comment


def test_reissue_failure_keeps_the_original_and_says_so(fake_ilink: FakeILink, pki: TestPKI):
    fake_ilink.script(SEND, Answer(fault="reset"))
    addon = IlinkFixProxy()
    f = flow_to(fake_ilink.url, send_body(STALE))
    original = f.response
    repair(addon, f, pki)
    assert f.response is original
    assert HEADER not in f.response.headers
    assert "reissue-failed" in f.comment and "original answer kept" in f.comment


def test_retries_zero_only_annotates(fake_ilink: FakeILink, pki: TestPKI, tmp_path: Path):
    rules = tmp_path / "r.yaml"
    rules.write_text(CORE_RULES.read_text().replace("retries: 1", "retries: 0"))
    addon = IlinkFixProxy()
    f = flow_to(fake_ilink.url, send_body(STALE))

    async def go() -> None:
        with taddons.context(addon) as tctx:
            tctx.configure(addon, ilink_rules=str(rules))
            await addon.response(f)

    asyncio.run(go())
    assert "matched" in f.comment
    assert not fake_ilink.requests


def test_an_unexpected_error_leaves_the_original_answer(pki: TestPKI, caplog):
    addon = IlinkFixProxy()
    f = flow_to("https://127.0.0.1:9", send_body(STALE))

    async def explode(*args, **kwargs):
        raise RuntimeError("boom")

    addon.reissuer.send = explode  # type: ignore[method-assign]
    original = f.response
    repair(addon, f, pki)
    assert f.response is original
    assert "original answer kept: internal error RuntimeError: boom at tests/test_addon.py:204" in caplog.text


def test_housekeeping_survives_a_failing_step_and_says_so_once(monkeypatch, caplog):
    """Whatever a housekeeping step raises, the loop goes on with the other steps and the next
    rounds, and a fault that lasts is logged once, not every round."""
    monkeypatch.setattr("ilink_fixproxy.addon.HOUSEKEEPING_S", 0)
    addon = IlinkFixProxy()
    tended = 0

    def broken() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    def tend() -> None:
        nonlocal tended
        tended += 1

    addon._reload_rules_if_changed = broken  # type: ignore[method-assign]
    addon._tend_state = tend  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.ensure_future(addon._housekeep())
        while tended < 5 and not task.done():
            await asyncio.sleep(0)
        task.cancel()

    with caplog.at_level(logging.WARNING, "ilink_fixproxy"):
        asyncio.run(run())
    assert tended == 5
    lines = [r.getMessage() for r in caplog.records if "housekeeping" in r.getMessage()]
    assert lines == [
        "ilink-fixproxy housekeeping (rules reload): RecursionError: maximum recursion depth exceeded"
    ]

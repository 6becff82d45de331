"""End to end: operating the proxy — rules reloaded from disk, graceful shutdown, and safe
defaults for where it listens."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
from conftest import HEADERS, ROOT, SEND, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI

STALE = "ctx-stale-ops"


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_an_edited_rules_file_is_reloaded_and_a_broken_edit_keeps_the_last_good(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    rules = core_rules(tmp_path)
    with (
        start_proxy(
            *upstream_args(fake, pki, tmp_path / "c"),
            "--rules",
            str(rules),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        assert c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS).headers["x-ilink-fixproxy"]

        rules.write_text(rules.read_text().replace("retries: 1", "retries: 0"))
        wait_for(lambda: "rules reloaded: 1 rule(s)" in p.output)
        before = len(fake.sends())
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert "x-ilink-fixproxy" not in r.headers  # retries: 0 only annotates
        assert len(fake.sends()) == before + 1

        rules.write_text("version: 1\nrules: {oops\n")
        wait_for(lambda: "keeping the last good rules" in p.output)
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert "x-ilink-fixproxy" not in r.headers and len(fake.sends()) == before + 2
        warning = [ln for ln in p.output.splitlines() if "keeping the last good rules" in ln]
        assert len(warning) == 1 and str(rules) in warning[0]
        assert "Traceback" not in p.output


def test_rules_edits_that_broke_the_yaml_parser_are_one_warning_and_reloads_go_on(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    """Issue 13 item 7: YAML nested 5000 deep or a 5000-digit number used to escape the reload
    as RecursionError / ValueError and end housekeeping silently (no more reloads, outbox expiry
    or flush requests)."""
    rules = core_rules(tmp_path)
    good = rules.read_text()
    hostile = [
        "version: 1\nrules: " + "[" * 5000 + "]" * 5000 + "\n",
        good.replace("retries: 1", "retries: " + "9" * 5000),
        good.replace("~m POST", "(" * 5000 + "~m POST" + ")" * 5000),
    ]
    with (
        start_proxy(*upstream_args(fake, pki, tmp_path / "c"), "--rules", str(rules)) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        for n, text in enumerate(hostile, 1):
            rules.write_text(text)
            wait_for(lambda n=n: p.output.count("keeping the last good rules") == n)
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert r.headers["x-ilink-fixproxy"].startswith("repaired")  # the last good rules serve

        rules.write_text(good.replace("retries: 1", "retries: 0"))
        wait_for(lambda: "rules reloaded: 1 rule(s)" in p.output)  # housekeeping is still alive
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert "x-ilink-fixproxy" not in r.headers
    warnings = [ln for ln in p.output.splitlines() if "keeping the last good rules" in ln]
    assert [str(rules) in ln and len(ln) < 600 for ln in warnings] == [True] * 3, warnings
    assert "nested more than 32 levels" in warnings[0] and "cannot read this value" in warnings[1]
    assert "too many nested parentheses" in warnings[2]
    assert "Traceback" not in p.output


def test_sigterm_lets_an_in_flight_repair_finish(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    fake.script(SEND, Answer(body=b'{"ret":-2}'), Answer(body=b"{}", delay=1.5))
    result: dict[str, httpx.Response] = {}
    # The context manager stops the proxy (SIGTERM, then SIGKILL) also when an assertion fails,
    # so a failing run leaves no proxy behind.
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
    ) as p:

        def send() -> None:
            with httpx.Client(trust_env=False, timeout=30) as c:
                result["r"] = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)

        t = threading.Thread(target=send, daemon=True)
        t.start()
        try:
            wait_for(lambda: len(fake.sends()) == 2)  # the re-issue is on its way
            p.proc.send_signal(signal.SIGTERM)
            status = p.proc.wait(15)
        finally:
            t.join(15)
    assert "r" in result, "the in-flight send got no answer"
    assert result["r"].status_code == 200 and result["r"].content == b"{}"
    assert result["r"].headers["x-ilink-fixproxy"].startswith("repaired")
    assert status == 0, p.output
    assert "Traceback" not in p.output
    # the state file was closed cleanly: a new proxy opens it at once
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
    ) as again:
        assert again.wait_output("listening on")


def test_loopback_by_default_and_a_warning_when_exposed(tmp_path: Path):
    with start_proxy("--confdir", str(tmp_path / "c1")) as p:
        assert p.url.startswith("http://127.0.0.1:")
        assert "WARNING" not in p.output
    with ProxyProcess(ilink_fixproxy_argv("--listen", "0.0.0.0:0", "--confdir", str(tmp_path / "c2"))) as p:
        wait_for(lambda: "WARNING" in p.output)
        assert p.wait_output("reverse mode: anyone who reaches it")
    with ProxyProcess(
        ilink_fixproxy_argv("--listen", "0.0.0.0:0", "--mode", "forward", "--confdir", str(tmp_path / "c3"))
    ) as p:
        wait_for(lambda: "WARNING" in p.output)
        assert p.wait_output("add --proxy-auth USER:PASS")
    with ProxyProcess(
        ilink_fixproxy_argv(
            "--listen",
            "0.0.0.0:0",
            "--mode",
            "forward",
            "--proxy-auth",
            "u:secret",
            "--confdir",
            str(tmp_path / "c4"),
        )
    ) as p:
        time.sleep(0.5)
        assert "WARNING" not in p.output


def test_proxy_auth_is_required_in_forward_mode(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with start_proxy("--mode", "forward", "--proxy-auth", "gw:pa55", "--confdir", str(tmp_path / "c")) as p:
        with httpx.Client(proxy=p.url, trust_env=False, timeout=30) as c:
            assert c.get("http://127.0.0.1:9/").status_code == 407
        user_url = p.url.replace("http://", "http://gw:pa55@")
        with httpx.Client(proxy=user_url, trust_env=False, timeout=30) as c:
            r = c.get("http://127.0.0.1:9/")  # authenticated: on to the destination policy
            assert r.status_code == 403 and r.headers["x-ilink-fixproxy"] == "refused-destination"


def test_proxy_auth_is_refused_in_reverse_mode(tmp_path: Path):
    p = subprocess.run(
        ilink_fixproxy_argv("--proxy-auth", "u:p", "--confdir", str(tmp_path / "c")),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert p.returncode == 2
    assert "--proxy-auth only applies to --mode forward" in p.stderr and "Traceback" not in p.stderr


def test_state_and_ca_files_are_owner_only(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    conf = tmp_path / "conf"
    with start_proxy(
        *upstream_args(fake, pki, conf),
        "--rules",
        str(ROOT / "rules.yaml"),
    ):
        pass
    for name in ("ilink-fixproxy-state.sqlite3", "mitmproxy-ca.pem"):
        mode = (conf / name).stat().st_mode & 0o777
        assert mode & 0o077 == 0, (name, oct(mode))

"""End to end: `--ui` never serves flows (bot tokens in them) or options without a password.

Where mitmweb can require one (mitmproxy >= 11.1.2; 12.x on Python >= 3.12) the command makes
it require ours; where it cannot (11.0.x, the newest on Python 3.11) `--ui` is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import BOT_TOKEN, HEADERS, SEND, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.cli_capture import UI_PASSWORD_ENV, UI_PASSWORD_FILE
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from mitmproxy.tools.web import webaddons
from mitmproxy.version import VERSION
from obs_helpers import free_port
from test_e2e_egress import connect_through
from test_e2e_faults import wait_for

STALE = "AARzJWAFAAABAAAAAAA-stale-token-ui"
HAS_WEB_AUTH = hasattr(webaddons, "WebAuth")
needs_web_auth = pytest.mark.skipif(not HAS_WEB_AUTH, reason=f"mitmweb {VERSION} has no authentication")


@pytest.mark.skipif(HAS_WEB_AUTH, reason=f"mitmweb {VERSION} can require a password")
def test_ui_is_refused_where_mitmweb_has_no_authentication(tmp_path: Path):
    web_port = free_port()
    p = subprocess.run(
        ilink_fixproxy_argv(
            "--listen",
            "127.0.0.1:0",
            "--ui",
            "--set",
            f"web_port={web_port}",
            "--confdir",
            str(tmp_path / "c"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert not (tmp_path / "c").exists()  # a refused start creates nothing
    assert p.stderr == (
        f"ilink-fixproxy: --ui: the web UI of mitmproxy {VERSION} has no authentication (anyone who "
        "reaches its port could read every flow, bot tokens included, and change options); --ui needs "
        "mitmproxy >= 12 (Python >= 3.12)\n"
    )


def flows_url(web_port: int) -> str:
    return f"http://127.0.0.1:{web_port}/flows"


@needs_web_auth
def test_ui_serves_flows_and_options_only_with_the_password(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    conf = tmp_path / "conf"
    web_port = free_port()
    with start_proxy(
        *upstream_args(fake, pki, conf),
        "--rules",
        str(core_rules(tmp_path)),
        "--ui",
        "--set",
        f"web_port={web_port}",
    ) as proxy:
        with httpx.Client(trust_env=False, timeout=30) as c:
            assert c.post(proxy.url + SEND, content=send_body(STALE), headers=HEADERS).status_code == 200
        password_file = conf / UI_PASSWORD_FILE
        password = password_file.read_text().strip()
        with httpx.Client(trust_env=False, timeout=30) as web:
            refused = web.get(flows_url(web_port))
            wrong = web.get(flows_url(web_port), headers={"Authorization": "Bearer not-it"})
            put = web.put(f"http://127.0.0.1:{web_port}/options", json={"scripts": ["/tmp/x.py"]})
            auth = {"Authorization": f"Bearer {password}"}
            assert wait_for(lambda: len(web.get(flows_url(web_port), headers=auth).json()) == 1)
            allowed = web.get(flows_url(web_port), headers=auth)
        output = proxy.output
    assert refused.status_code == wrong.status_code == put.status_code == 403
    assert BOT_TOKEN not in refused.text + wrong.text + put.text
    assert allowed.status_code == 200 and allowed.json()[0]["request"]["path"] == SEND
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert f"needs a password: the file {password_file} (owner-only)" in output
    assert password not in output  # never printed


@needs_web_auth
def test_ui_password_from_the_environment_and_kept_across_restarts(tmp_path: Path):
    conf = tmp_path / "conf"
    web_port = free_port()
    argv = ilink_fixproxy_argv(
        "--listen", "127.0.0.1:0", "--ui", "--set", f"web_port={web_port}", "--confdir", str(conf)
    )
    env = clean_env({UI_PASSWORD_ENV: "operator-chosen-ui-secret"})
    with ProxyProcess(argv, env=env) as p:
        auth = {"Authorization": "Bearer operator-chosen-ui-secret"}
        assert httpx.get(flows_url(web_port), headers=auth, trust_env=False).status_code == 200
        assert wait_for(lambda: f"needs a password: ${UI_PASSWORD_ENV}" in p.output)
        assert "operator-chosen-ui-secret" not in p.output
    assert not (conf / UI_PASSWORD_FILE).exists()
    # Without it: a generated one in the confdir, the same on the next start.
    passwords = []
    for _ in range(2):
        with ProxyProcess(argv) as p:
            passwords.append((conf / UI_PASSWORD_FILE).read_text().strip())
            auth = {"Authorization": f"Bearer {passwords[-1]}"}
            assert httpx.get(flows_url(web_port), headers=auth, trust_env=False).status_code == 200
    assert passwords[0] == passwords[1] and len(passwords[0]) >= 32


@needs_web_auth
def test_ui_refuses_a_password_file_others_can_read(tmp_path: Path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / UI_PASSWORD_FILE).write_text("shared-secret\n")
    os.chmod(conf / UI_PASSWORD_FILE, 0o644)
    p = subprocess.run(
        ilink_fixproxy_argv(
            "--listen", "127.0.0.1:0", "--ui", "--set", f"web_port={free_port()}", "--confdir", str(conf)
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert p.returncode == 2
    assert p.stderr == (
        f"ilink-fixproxy: --ui: {conf / UI_PASSWORD_FILE} is readable by other users; `chmod 600` it, "
        "or delete it for a new one\n"
    )


@needs_web_auth
def test_forward_mode_clients_cannot_reach_the_ui_through_the_proxy(tmp_path: Path):
    web_port = free_port()
    with start_proxy(
        "--mode",
        "forward",
        "--allow-private-destinations",
        "--ui",
        "--set",
        f"web_port={web_port}",
        "--confdir",
        str(tmp_path / "conf"),
    ) as p:
        status, _, body = connect_through(p, f"127.0.0.1:{web_port}")
        with httpx.Client(proxy=p.url, trust_env=False, timeout=30) as c:
            plain = c.put(f"http://localhost:{web_port}/options", json={"scripts": ["/tmp/x.py"]})
    assert status == 403 and b"this proxy's own web UI listener" in body
    assert plain.status_code == 403 and "this proxy's own web UI listener" in plain.text

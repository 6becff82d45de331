"""The `ilink-fixproxy` command as an operator meets it: start line, subcommands, and every
mistake ending in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, start_proxy, upstream_args
from ilink_fixproxy.launcher import clean_env, ilink_fixproxy_argv


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ilink_fixproxy_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        cwd=str(cwd) if cwd else None,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(p: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ilink-fixproxy: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_start_line_tells_the_operator_what_to_configure(fake, pki, tmp_path: Path):
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
    ) as p:
        line = next(ln for ln in p.output.splitlines() if "listening on" in ln)
        status = p.stop()
    assert f"listening on {p.url} (reverse mode -> {fake.url})" in line
    assert "(1 rule)" in line
    assert f"WEIXIN_BASE_URL={p.url}" in line and "WEIXIN_TOKEN" in line
    assert f'"baseUrl": "{p.url}"' in line
    assert status == 0, p.output  # SIGTERM is a clean stop
    assert "Traceback" not in p.output


def test_rules_yaml_in_the_working_directory_is_used(fake, pki, tmp_path: Path):
    (tmp_path / "rules.yaml").write_text((ROOT / "rules.yaml").read_text())
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        cwd=tmp_path,
    ) as p:
        assert p.wait_output("rules: rules.yaml (1 rule)")


def test_bad_rules_file_is_one_clear_line(tmp_path: Path):
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "version: 1\nrules:\n  - name: x\n    match: {filter: '~u sendmessage'}\n"
        "    action: {remove: msg.context_token}\n"
    )
    assert_one_line_error(
        run("--rules", str(bad), "--listen", "127.0.0.1:0"),
        1,
        f"{bad}:4:12:",
        "missing required key 'response_any'",
    )


def test_missing_rules_file(tmp_path: Path):
    assert_one_line_error(run("--rules", str(tmp_path / "nope.yaml")), 1, "rules file not found")


def test_port_in_use(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run("--listen", f"127.0.0.1:{port}", "--confdir", str(tmp_path / "c"))
    assert_one_line_error(p, 2, f"cannot listen on 127.0.0.1:{port}", "address already in use")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--listen", "8765"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "from 0 to 65535"),
        (["--upstream", "ftp://x"], "expected an http:// or https:// URL"),
        (["--upstream", "https://x.y/ilink/bot"], "no path"),
        (["--mode", "forward", "--upstream", "https://x.y"], "--upstream only applies"),
        (["--upstream-ca", "/nonexistent/ca.pem"], "file not found"),
        (["--set", "no_such_option=1"], "no_such_option"),
        (["--set", "ilink_buffer_limit=lots"], "ilink_buffer_limit"),
        (["--set", "ilink_intercept=some"], "ilink_intercept"),
        (["--set", "novalue"], "expected NAME=VALUE"),
    ],
)
def test_bad_flags_are_one_clear_line(args: list[str], fragment: str, tmp_path: Path):
    p = run("--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c"), *args)
    assert p.returncode != 0
    assert_one_line_error(p, p.returncode, fragment)


def test_unknown_flag_is_one_line_pointing_at_help():
    assert_one_line_error(run("--no-such-flag"), 2, "unrecognized arguments: --no-such-flag", "--help")


def test_help_explains_commands_and_flags():
    p = run("--help")
    assert p.returncode == 0
    for word in (
        "--listen",
        "--upstream",
        "--mode",
        "--rules",
        "--upstream-ca",
        "--ssl-insecure",
        "--confdir",
        "--set",
        "check",
        "ca",
        "demo",
        "stale",
    ):
        assert word in p.stdout


def test_check_explains_a_valid_file_and_rejects_a_bad_one(tmp_path: Path):
    ok = run("check", str(ROOT / "rules.yaml"))
    assert ok.returncode == 0
    assert "stale-context-token" in ok.stdout and "re-issue it without msg.context_token" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nrules:\n  - name: x\n    match: {filter: '~q', response_any: [{ret: -2}]}\n"
        "    action: {remove: msg.context_token, retries: 7}\n"
    )
    assert_one_line_error(run("check", str(bad)), 1, f"{bad}:5:", "retries", "0 to 3")


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nrules: " + "[" * 5000 + "]" * 5000 + "\n",
        "version: 1\nrules:\n  - name: x\n    match: {filter: '~q', response_any: [{ret: -2}]}\n"
        "    action: {remove: msg.context_token, retries: " + "9" * 5000 + "}\n",
    ],
    ids=["nested-5000-deep", "5000-digit-number"],
)
def test_check_of_a_file_that_broke_the_yaml_parser_is_one_line(text: str, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert_one_line_error(run("check", str(bad)), 1, f"{bad}:")


def test_check_without_a_path_uses_the_packaged_rules(tmp_path: Path):
    p = run("check", cwd=tmp_path)
    assert p.returncode == 0 and "packaged" in p.stdout


def test_ca_creates_and_explains_the_certificate(tmp_path: Path):
    conf = tmp_path / "conf"
    p = run("ca", "--confdir", str(conf))
    assert p.returncode == 0, p.stderr
    cert = conf / "mitmproxy-ca-cert.pem"
    assert str(cert) in p.stdout and cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert "certifi" in p.stdout and "NODE_EXTRA_CA_CERTS" in p.stdout
    key = conf / "mitmproxy-ca.pem"
    assert not stat.S_IMODE(key.stat().st_mode) & 0o077, "the CA private key must be owner-only"


def test_demo_shows_a_delivered_repair():
    p = run("demo", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "delivered: no" in p.stdout  # straight to iLink: refused
    assert "Result: delivered." in p.stdout
    assert "X-Ilink-Fixproxy: repaired" in p.stdout


def test_python_dash_m_is_the_same_command():
    p = subprocess.run(
        [*ilink_fixproxy_argv("--version")], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert p.returncode == 0 and p.stdout.startswith("ilink-fixproxy ")


def test_console_script_is_installed():
    import shutil
    import sys

    exe = shutil.which("ilink-fixproxy", path=os.path.dirname(sys.executable))
    assert exe, "pip install gives the ilink-fixproxy console script"
    p = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert p.returncode == 0


def test_the_startup_heap_is_frozen_once_the_proxy_listens():
    # In-process: the addon the command adds after mitmproxy's `running` event.
    import gc

    from ilink_fixproxy.cli import FreezeStartupHeap

    # Python 3.12 starts with a few hundred objects frozen already (375 on 3.12.1; 0 on 3.11 and
    # 3.13), so count what the addon adds.
    before = gc.get_freeze_count()
    try:
        FreezeStartupHeap().running()
        assert gc.get_freeze_count() - before > 1000  # everything imported so far
    finally:
        gc.unfreeze()  # (the interpreter's own go back to the oldest generation: still alive, still valid)


def test_a_connection_cancelled_at_shutdown_is_no_traceback(caplog):
    # Python 3.11's start_server callback raises CancelledError for a handler cancelled at
    # shutdown; the command drops exactly that, and reports anything else as asyncio would.
    import asyncio
    import logging

    from ilink_fixproxy.cli import _quiet_about_cancelled_connections

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            _quiet_about_cancelled_connections(
                loop, {"message": "Exception in callback callback()", "exception": asyncio.CancelledError()}
            )
            assert caplog.records == []
            _quiet_about_cancelled_connections(
                loop, {"message": "Exception in callback other()", "exception": RuntimeError("real")}
            )
        assert [r.getMessage() for r in caplog.records] == ["Exception in callback other()"]
    finally:
        loop.close()

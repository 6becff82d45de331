"""Secrets audit: run the real proxy through every path that handles a token (repair, refusal,
failed re-issue, upstream failure, fresh-token substitution, getupdates, getconfig, a malformed
body), then collect everything it wrote (its stdout/stderr with -v, every file under its
working directory, confdir, HOME and TMPDIR: CA files, the peer-state database, the capture
journal and flows when the command has --capture; the `state` and `capture export` output; the
headers it handed back) and assert the bot token and the context tokens never appear in clear,
nor JSON-escaped, URL-encoded, base64-encoded or as UTF-16.

Also the safe defaults: loopback unless told otherwise, a warning for a non-loopback address,
owner-only state file and CA key.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import subprocess
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BOT_TOKEN, HEADERS, ROOT, SEND, upstream_args
from ilink_fixproxy import cli
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI

UPDATES = "/ilink/bot/getupdates"
CONFIG = "/ilink/bot/getconfig"
BOT_SECRET = BOT_TOKEN.split(":", 1)[1]
ORIGINAL = b'{"ret":-2,"errmsg":"prepare failed"}'


def token(kind: str) -> str:
    # Shaped like iLink's (a long base64-ish string), unique per run so no earlier test's
    # output could ever be mistaken for ours.
    return f"AARzJWAFAAABAAAAAAA-{kind}-{secrets.token_hex(8)}"


def body(tok: str | None, peer: str, client_id: str) -> bytes:
    msg: dict[str, object] = {
        "from_user_id": "",
        "to_user_id": peer,
        "client_id": client_id,
        "message_type": 2,
        "message_state": 2,
        "item_list": [{"type": 1, "text_item": {"text": "audit"}}],
    }
    if tok is not None:
        msg["context_token"] = tok
    return json.dumps({"msg": msg, "base_info": {"channel_version": "2.2.0"}}).encode()


def encodings(secret: str) -> list[bytes]:
    """The forms a secret could leak in: as is, JSON-escaped, URL-encoded, base64, UTF-16."""
    raw = secret.encode()
    forms = {
        raw,
        json.dumps(secret).encode()[1:-1],
        urllib.parse.quote(secret, safe="").encode(),
        base64.b64encode(raw).rstrip(b"="),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        secret.encode("utf-16-le"),
    }
    return sorted(forms)


def plain_rules(directory: Path) -> Path:
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    doc.pop("updates", None)
    for rule in doc["rules"]:
        rule.pop("peer_state", None)
    path = directory / "plain-rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def exercise(proxy: ProxyProcess, fake: FakeILink, *, malformed: bool) -> tuple[list[str], list[str]]:
    """Every token-handling path once (`malformed`: also a body cut short inside the token);
    returns (the context tokens used, the X-Ilink-Fixproxy headers the proxy handed back)."""
    used: list[str] = []
    notes: list[str] = []
    n = 0

    def send(tok: str | None, peer: str, **kw) -> httpx.Response:
        nonlocal n
        n += 1
        if tok:
            used.append(tok)
        r = c.post(proxy.url + SEND, content=body(tok, peer, f"audit-{n}"), headers=HEADERS, **kw)
        notes.extend(v for k, v in r.headers.items() if k.lower() == "x-ilink-fixproxy")
        return r

    with httpx.Client(trust_env=False, timeout=30) as c:
        fresh = token("fresh")
        fake.fresh_tokens.add(fresh)
        assert send(fresh, "wxid_a@im.wechat").status_code == 200  # passes untouched

        r = send(token("stale"), "wxid_b@im.wechat")  # repaired
        assert r.headers["x-ilink-fixproxy"].startswith("repaired")

        fake.script(SEND, Answer(body=ORIGINAL), Answer(fault="reset"))  # re-issue fails
        assert send(token("stale-reset"), "wxid_c@im.wechat").content == ORIGINAL

        fake.script(SEND, Answer(fault="reset"))  # the first attempt fails: 502
        assert send(token("stale-502"), "wxid_d@im.wechat").status_code == 502

        # A peer writes: getupdates carries its fresh token (peer state learns it), then a send
        # to that peer with an old token (substituted with peer state, repaired without).
        inbound = fake.push_inbound("wxid_e@im.wechat", "hi")
        used.append(inbound)
        r = c.post(proxy.url + UPDATES, content=b'{"get_updates_buf":""}', headers=HEADERS)
        assert inbound in r.text
        assert send(token("old"), "wxid_e@im.wechat").status_code == 200

        cfg = token("config")
        used.append(cfg)
        r = c.post(
            proxy.url + CONFIG,
            content=json.dumps({"ilink_user_id": "wxid_a@im.wechat", "context_token": cfg}).encode(),
            headers=HEADERS,
        )
        assert r.json()["ret"] == 0

        if malformed:  # not JSON, so no JSON-aware redaction can find the token in it
            bad = token("malformed")
            used.append(bad)
            c.post(proxy.url + SEND, content=b'{"msg":{"context_token":"' + bad.encode(), headers=HEADERS)

        fake.tokenless_delivers = False  # iLink refuses the tokenless send too
        r = send(token("closed"), "wxid_f@im.wechat")
        assert r.status_code == 200 and "x-ilink-fixproxy" in r.headers  # still-failing / window-closed
        r = send(token("closed-again"), "wxid_f@im.wechat")  # peer state: answered from memory
        assert r.status_code == 200
    return used, notes


def collect(*roots: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                found[str(path)] = path.read_bytes()
    return found


def run_flags() -> set[str]:
    """The command's run flags: observability flags (capture, log format) are used when the
    command has them, so the audit covers every file the proxy can write."""
    return {opt for action in cli.build_parser()._actions for opt in action.option_strings}


def subcommands() -> set[str]:
    parser = cli.build_parser()
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def audit_run(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, *, rules_kind: str, log_format: str, malformed: bool
) -> list[str]:
    """Run the proxy through `exercise`, collect everything it wrote; returns the leaks found."""
    home, work, conf, tmp = (tmp_path / d for d in ("home", "work", "conf", "tmp"))
    for d in (home, work, conf, tmp):
        d.mkdir()
    rules = ROOT / "rules.yaml" if rules_kind == "shipped" else plain_rules(tmp_path)
    env = clean_env({"HOME": str(home), "TMPDIR": str(tmp)})
    flags = run_flags()
    capture = work / "capture"
    extra: list[str] = []
    if "--capture" in flags:  # the most a capture keeps: flows and message bodies too
        extra += ["--capture", str(capture)]
        extra += [f for f in ("--capture-flows", "--capture-bodies") if f in flags]
    if "--log-format" in flags:
        extra += ["--log-format", log_format]
    argv = ilink_fixproxy_argv(
        "--listen",
        "127.0.0.1:0",
        *upstream_args(fake, pki, conf),
        "--rules",
        str(rules),
        "-v",
        *extra,
    )
    proxy = ProxyProcess(argv, env=env, cwd=str(work))
    try:
        used, notes = exercise(proxy, fake, malformed=malformed)
        time.sleep(0.3)  # let the last log lines and capture records out
    finally:
        status = proxy.stop()
    assert status == 0

    blobs = {"proxy output": proxy.output.encode(), "X-Ilink-Fixproxy headers": "\n".join(notes).encode()}

    def run(*args: str) -> None:
        done = subprocess.run(
            ilink_fixproxy_argv(*args), capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL
        )
        assert done.returncode == 0, done.stderr
        blobs[f"`ilink-fixproxy {' '.join(args[:2])}` output"] = done.stdout + done.stderr

    if rules_kind == "shipped":
        state = conf / "ilink-fixproxy-state.sqlite3"
        assert state.is_file(), "the run was meant to write peer state"
        assert state.stat().st_mode & 0o077 == 0, "the state file is readable by others"
        run("state", "--confdir", str(conf))
    if "--capture" in flags:
        assert any(capture.iterdir()), "the run was meant to write a capture"
        if "capture" in subcommands():
            run("capture", "export", "--har", str(tmp / "export.har"), str(capture))
    blobs.update(collect(home, work, conf, tmp))  # after the exports: their files too

    # The audit only means something if the secret-handling paths really ran and logged.
    out = proxy.output
    assert "repaired" in out and "re-issue" in out and "failed" in out, out
    assert len(used) >= 8

    return [
        f"{name}: {secret[:24]}... as {form[:16]!r}"
        for secret in [BOT_TOKEN, BOT_SECRET, *used]
        for form in encodings(secret)
        for name, blob in blobs.items()
        if form in blob
    ]


@pytest.mark.parametrize(
    "rules_kind,log_format", [("shipped", "json"), ("plain", "text")], ids=["shipped-rules", "plain-rules"]
)
def test_nothing_the_proxy_writes_holds_a_secret(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, rules_kind: str, log_format: str
):
    leaks = audit_run(fake, pki, tmp_path, rules_kind=rules_kind, log_format=log_format, malformed=False)
    assert not leaks, "secrets written in clear:\n" + "\n".join(leaks)


def test_a_malformed_body_leaves_no_secret_either(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    # A body cut short inside "context_token":"... is not JSON, so only text scrubbing stands
    # between it and a --capture-bodies capture (journal, flows, HAR export). It once leaked.
    leaks = audit_run(fake, pki, tmp_path, rules_kind="shipped", log_format="text", malformed=True)
    assert not leaks, "secrets written in clear:\n" + "\n".join(leaks)


def test_the_audit_would_see_a_leak(tmp_path: Path):
    # The scanner itself must find each form, or the test above proves nothing.
    secret = token("probe")
    for form in encodings(secret):
        (tmp_path / "leak.bin").write_bytes(b"xx" + form + b"yy")
        assert any(form in b for b in collect(tmp_path).values())
    assert len(encodings(secret)) >= 3  # iLink tokens are URL- and JSON-safe: fewer forms differ


# ------------------------------------------------------------------------------ safe defaults


def test_listens_on_loopback_by_default():
    args = cli.build_parser().parse_args([])
    host, _ = cli.parse_listen(args.listen)
    assert cli.is_loopback(host)
    assert cli.DEFAULT_LISTEN == "127.0.0.1:8765"


def test_non_loopback_listen_warns(tmp_path: Path):
    # Bound to all interfaces only for a moment, forwarding to a port where nothing listens.
    argv = ilink_fixproxy_argv(
        "--listen",
        "0.0.0.0:0",
        "--upstream",
        "http://127.0.0.1:9",
        "--confdir",
        str(tmp_path / "c"),
        "--rules",
        str(plain_rules(tmp_path)),
    )
    with ProxyProcess(argv) as p:
        assert wait_until(lambda: "WARNING" in p.output)  # printed right after the start line
        out = p.output
    assert "ilink-fixproxy: WARNING: listening on 0.0.0.0" in out, out
    assert "Traceback" not in out


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.05)
    return predicate()


def test_the_state_file_and_ca_key_are_private(tmp_path: Path, fake: FakeILink, pki: TestPKI):
    conf = tmp_path / "conf"
    argv = ilink_fixproxy_argv(
        "--listen",
        "127.0.0.1:0",
        *upstream_args(fake, pki, conf),
        "--rules",
        str(ROOT / "rules.yaml"),
    )
    with ProxyProcess(argv):
        pass
    for name in ("ilink-fixproxy-state.sqlite3", "mitmproxy-ca.pem"):
        mode = os.stat(conf / name).st_mode
        assert mode & 0o077 == 0, f"{name} is {oct(mode & 0o777)}"

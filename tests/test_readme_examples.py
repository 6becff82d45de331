"""The README's example outputs are what a new user sees: each is produced again here by the real
commands (the proxy process, the demo, `check`, `state`, `explain`, the sandbox) and compared, with
only what differs from run to run (times, ports, paths, keyed hashes, ages) normalised."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import ROOT, SEND, UPDATES, core_rules, start_proxy
from ilink_fixproxy.launcher import READY_MITMDUMP, ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI

# The README's scenario: one peer, one stale token, client_ids a1 (twice), a2, then the peer writes
# and a3 goes out. Peer and token hashes are unkeyed one-way hashes, so they match the README's.
PEER = "wxid_friend@im.wechat"
STALE = "AARzJWAFAAABAAAAAAA-stale-1"
HEADERS = {
    "Content-Type": "application/json",
    "AuthorizationType": "ilink_bot_token",
    "Authorization": "Bearer demo-bot@im.bot:secret",
}


def readme() -> str:
    return (ROOT / "README.md").read_text()


def block_after(marker: str) -> list[str]:
    """The lines of the first fenced block after `marker` in the README."""
    text = readme()
    start = text.index(marker)
    opening = text.index("```", start)
    body = text.index("\n", opening) + 1
    return text[body : text.index("```", body)].rstrip("\n").splitlines()


def normalise(text: str, *, port: int | None = None, home: Path | None = None) -> str:
    text = re.sub(r"\[\d\d:\d\d:\d\d\.\d{3}\]", "[T]", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", "TIME", text)
    text = re.sub(r"\b\d+s ago", "Ns ago", text)
    text = re.sub(r"\(1x, \d+ ms\)", "(1x, N ms)", text)
    text = re.sub(r"bot [0-9a-f]{10}", "bot BOT", text)  # keyed hash: a new key per state file
    if port is not None:
        text = text.replace(f"127.0.0.1:{port}", "127.0.0.1:8765")
    if home is not None:
        text = text.replace(str(home), "/home/me")
    return text


def body(client_id: str, token: str | None = STALE) -> bytes:
    tok = f',"context_token":"{token}"' if token else ""
    return (
        f'{{"msg":{{"to_user_id":"{PEER}","client_id":"{client_id}","message_type":2,"message_state":2,'
        f'"item_list":[{{"type":1,"text_item":{{"text":"daily report"}}}}]{tok}}}}}'
    ).encode()


def run(*argv: str, cwd: Path = ROOT, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env({"HOME": str(home)} if home else None)
    return subprocess.run(
        ilink_fixproxy_argv(*argv), capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


def test_the_start_output_is_what_the_readme_shows(tmp_path: Path):
    home = tmp_path / "me"
    home.mkdir()
    # From the checkout, as the README runs it; port 0 instead of 8765 (tests never use fixed ports).
    with ProxyProcess(
        ilink_fixproxy_argv("--listen", "127.0.0.1:0"), env=clean_env({"HOME": str(home)}), cwd=str(ROOT)
    ) as p:
        port = int(p.url.rsplit(":", 1)[1])
        output = p.output
    shown = block_after("prints which rules it loaded")
    assert normalise(output, port=port, home=home).splitlines() == [normalise(line) for line in shown]


def test_the_repair_examples_state_and_explain_are_what_the_proxy_prints(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    home, capture = tmp_path / "me", tmp_path / "me" / "ilink-capture"
    home.mkdir()
    args = ("--upstream", fake.url, "--upstream-ca", str(pki.ca_cert), "--capture", str(capture))
    with (
        ProxyProcess(
            ilink_fixproxy_argv("--listen", "127.0.0.1:0", *args),
            env=clean_env({"HOME": str(home)}),
            cwd=str(ROOT),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        headers = [
            c.post(p.url + SEND, content=body(cid), headers=HEADERS).headers for cid in ("a1", "a1", "a2")
        ]
        fake.push_inbound(PEER, "thanks")
        assert c.post(p.url + UPDATES, content=b'{"get_updates_buf":""}', headers=HEADERS).status_code == 200
        headers.append(c.post(p.url + SEND, content=body("a3"), headers=HEADERS).headers)
        # What a send taught the store is written just after its answer went out: wait for a3's
        # record (the listing counts it) rather than race it.
        for _ in range(100):
            listing_running = run("state", home=home)
            if '"messages": 3' in listing_running.stdout:
                break
    listing_stopped = run("state", home=home)

    text = readme()
    # the header and the log line "What you will see" shows for the shipped rules
    repaired = headers[0]["x-ilink-fixproxy"]
    assert f"X-Ilink-Fixproxy: {repaired}\n" in text
    assert [h["x-ilink-fixproxy"].split(";")[0] for h in headers] == [
        "repaired",
        "replayed",
        "stripped",
        "substituted",
    ]
    log = next(line for line in p.output.splitlines() if line.split("] ", 1)[-1].startswith("repaired: "))
    assert f"`{log.split('] ', 1)[1]}`" in text

    # `state` while the proxy runs, and the line after it stopped
    shown = block_after("While the\nproxy that saw a peer's newest token runs")
    assert listing_running.returncode == 0, listing_running.stderr
    assert normalise(listing_running.stdout, home=home).splitlines() == [
        normalise(line) for line in shown[1:]
    ]
    stopped_peer = normalise(listing_stopped.stdout).splitlines()[1]
    said = re.search(r"the same peer reads `(.+?)`", " ".join(text.split())).group(1)  # type: ignore[union-attr]
    assert normalise(said) in stopped_peer

    # `explain` of that capture
    explained = run("explain", str(capture))
    assert explained.returncode == 0, explained.stderr
    shown = block_after("tune rules on real traffic before going live")
    assert shown[0] == "$ ilink-fixproxy explain ~/ilink-capture"
    assert normalise(explained.stdout, home=home).rstrip("\n").splitlines() == [
        normalise(line) for line in shown[1:]
    ]


def test_the_plain_rules_examples_are_what_the_proxy_prints(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    rules = core_rules(tmp_path)  # the shipped rules without peer_state
    with (
        start_proxy(
            "--upstream",
            fake.url,
            "--upstream-ca",
            str(pki.ca_cert),
            "--confdir",
            str(tmp_path / "c"),
            "--rules",
            str(rules),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        header = c.post(p.url + SEND, content=body("b1"), headers=HEADERS).headers["x-ilink-fixproxy"]
    shown = block_after("(the plain re-issue) say it differently")
    log = next(line for line in p.output.splitlines() if "repaired: " in line).split("] ", 1)[1]
    assert [f"X-Ilink-Fixproxy: {header}", normalise(log)] == [shown[0], normalise(shown[1])]


def test_the_check_error_example_is_what_check_prints(tmp_path: Path):
    shown = block_after("line and column and say what is expected")
    assert shown[0].startswith("$ ilink-fixproxy check rules.yaml") and "`retries: 5`" in shown[0]
    text = (ROOT / "rules.yaml").read_text()
    assert "retries: 1 " in text
    (tmp_path / "rules.yaml").write_text(text.replace("retries: 1 ", "retries: 5 "))
    p = run("check", "rules.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines() == shown[1:]


def test_the_demo_excerpt_is_what_the_demo_prints(tmp_path: Path):
    p = run("demo", home=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    shown = block_after("explains what happened. Its core:")
    port = re.search(r"through ilink-fixproxy \(http://127\.0\.0\.1:(\d+)\)", p.stdout).group(1)  # type: ignore[union-attr]
    first = out.index(shown[0])
    assert [
        line.replace(f"127.0.0.1:{port}", "127.0.0.1:55037") for line in out[first : first + len(shown)]
    ] == shown


def test_the_sandbox_example_is_what_the_sandbox_prints(tmp_path: Path):
    shown = block_after("Ctrl-C to stop):")
    assert shown[0] == "$ .venv/bin/python -m ilink_fixproxy.sandbox --tls-dir /tmp/sandbox-ca"
    ca_dir = tmp_path / "sandbox-ca"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ilink_fixproxy.sandbox", "--tls-dir", str(ca_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline().rstrip("\n") for _ in shown[1:]]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    port = re.search(r":(\d+)$", printed[0]).group(1)  # type: ignore[union-attr]
    normalised = [
        line.replace(f":{port}", ":43643").replace(str(ca_dir), "/tmp/sandbox-ca") for line in printed
    ]
    assert normalised == shown[1:]
    assert proc.returncode == 0


def test_the_mitmdump_example_listens_on_loopback_with_its_own_state_file(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    # The README's command as given (umask included), pointed at the fake iLink, next to an
    # `ilink-fixproxy` holding the default state file in the same home directory.
    shown = " ".join(
        line.rstrip("\\")
        for line in block_after("## mitmdump and mitmweb")
        if "mitmdump" in line or line.startswith("    ")
    )
    command = shown[shown.index("(umask 077;") :]
    assert command.endswith(")")
    home = tmp_path / "me"
    home.mkdir()
    command = (
        command[1:-1]
        .replace(".venv/bin/mitmdump", f"exec {Path(sys.executable).parent / 'mitmdump'}")
        .replace("reverse:https://ilinkai.weixin.qq.com", f"reverse:{fake.url}")
        .replace("--listen-port 8765", "--listen-port 0")
        .replace("+flows.mitm", f"+{tmp_path / 'flows.mitm'}")
    ) + f" --set ssl_verify_upstream_trusted_ca={pki.ca_cert}"
    env = clean_env({"HOME": str(home)})
    with ProxyProcess(
        ilink_fixproxy_argv("--listen", "127.0.0.1:0", "--upstream", fake.url), env=env, cwd=str(ROOT)
    ):
        with (
            ProxyProcess(["bash", "-c", command], ready=READY_MITMDUMP, env=env, cwd=str(ROOT)) as md,
            httpx.Client(trust_env=False, timeout=30) as c,
        ):
            assert md.url.startswith("http://127.0.0.1:")
            r = c.post(md.url + SEND, content=body("m1"), headers=HEADERS)
            assert r.headers["x-ilink-fixproxy"].startswith("repaired")
            assert (home / ".mitmproxy" / "ilink-fixproxy-mitmdump.sqlite3").exists()
        assert md.proc.returncode == 0, md.output
    assert oct((tmp_path / "flows.mitm").stat().st_mode & 0o777) == "0o600"

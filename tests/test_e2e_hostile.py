"""End to end: the proxy under hostile conditions and input (issue 13, items 8 and 9): out of file
descriptors, control characters from the wire, a second proxy on a linked state file, huge
answers, malformed credential headers, trailers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import HEADERS, ROOT, SEND, Gateway, send_body, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI


def wait_for(predicate, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def start_proxy_after(prelude: str, *args: str) -> ProxyProcess:
    """The real command in a child that runs `prelude` (Python) first: a lower open-files limit, a
    umask, set in the process itself before anything else."""
    boot = (
        f"{prelude}; import runpy, sys; sys.argv = ['ilink-fixproxy', *sys.argv[1:]]; "
        "runpy.run_module('ilink_fixproxy', run_name='__main__', alter_sys=True)"
    )
    return ProxyProcess([sys.executable, "-c", boot, "--listen", "127.0.0.1:0", *args])


def start_limited_proxy(nofile: int, *args: str) -> ProxyProcess:
    return start_proxy_after(
        f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))", *args
    )


def test_out_of_file_descriptors_is_one_line_and_serving_resumes(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    """Item 8: every refused accept() used to be logged with a traceback, a hundred per second
    (84,139 tracebacks, 26 MB of log in 15 s at 400 connections and ulimit -n 256)."""
    with start_limited_proxy(
        64, *upstream_args(fake, pki, tmp_path / "c"), "--rules", str(ROOT / "rules.yaml")
    ) as p:
        host, port = p.url.removeprefix("http://").rsplit(":", 1)
        held = []
        try:
            for _ in range(80):  # more than the proxy has descriptors for: the rest wait in the backlog
                held.append(socket.create_connection((host, int(port)), timeout=10))
            wait_for(lambda: "cannot accept connections" in p.output or "Too many open files" in p.output)
        finally:
            for s in held:
                s.close()
        # descriptors free again: asyncio retries the listening socket every second
        with httpx.Client(trust_env=False, timeout=30) as c:
            r = c.post(p.url + "/ilink/bot/getconfig", content=b"{}", headers=HEADERS)
        assert r.status_code == 200
    out = p.output
    assert "Traceback" not in out and "Unhandled error" not in out, out[:3000]
    lines = [ln for ln in out.splitlines() if "cannot accept connections" in ln]
    assert len(lines) == 1 and "open-files limit 64" in lines[0], out[:3000]


def test_control_characters_from_the_wire_cannot_forge_log_lines(peer_proxy: ProxyProcess, fake: FakeILink):
    """Item 9: a client_id carrying a newline and ANSI escapes used to start a line of its own in
    the text log (here a forged "repaired" decision), and recolour the terminal."""
    gw = Gateway(peer_proxy)
    forged = "[10:00:00.000] repaired: sendmessage to peer forged"
    try:
        r = gw.send("stale-token-forge", client_id=f"cid-x\n{forged}\x1b[2K\u2028")
    finally:
        gw.client.close()
    assert r.status_code == 200
    wait_for(lambda: "cid-x" in peer_proxy.output)
    out = peer_proxy.output
    line = next(ln for ln in out.splitlines() if "cid-x" in ln)
    assert f"cid-x\\n{forged}\\x1b[2K\\u2028" in line
    assert not any(ln.startswith(forged) for ln in out.splitlines())
    assert "\x1b[2K" not in out and "\u2028" not in out


def test_a_symlink_or_hard_link_to_the_state_file_is_the_same_state_file(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    """Item 9: the one-proxy lock was named after the path given, so a second proxy started on a
    symlink or a hard link to the state file ran too, and both delivered every deferred send."""
    state = tmp_path / "state.sqlite3"
    symlink, hardlink = tmp_path / "via-symlink.sqlite3", tmp_path / "other-dir" / "via-hardlink.sqlite3"

    def second(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ilink_fixproxy_argv(
                "--listen", "127.0.0.1:0", *upstream_args(fake, pki, tmp_path / "c2"), "--state", str(path)
            ),
            capture_output=True,
            text=True,
            timeout=30,  # a second proxy that starts never exits by itself: this fails the test
            env=clean_env(),
        )

    with start_proxy(*upstream_args(fake, pki, tmp_path / "c"), "--state", str(state)) as first:
        symlink.symlink_to(state)
        p = second(symlink)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert f"state file {symlink} is in use by another ilink-fixproxy (pid {first.proc.pid})" in p.stderr

        hardlink.parent.mkdir()
        os.link(state, hardlink)
        p = second(hardlink)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert "has 2 names (hard links)" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_huge_first_answer_is_not_buffered_whole(peer_proxy: ProxyProcess, fake: FakeILink):
    """Item 9: the first attempt buffered up to 64 MiB per send (four concurrent 1 GB answers took
    the proxy from 84 to 342 MB RSS); a sendmessage answer is a few dozen bytes, so the
    gateway gets a 502 that says why past 4 MiB (2 MiB still reach it: test_e2e_faults)."""
    fake.script(SEND, Answer(body=b'{"ret":0,"pad":"' + b"x" * (8 * 1024 * 1024) + b'"}'))
    gw = Gateway(peer_proxy)
    try:
        r = gw.send("token-huge-answer", client_id="cid-huge")
    finally:
        gw.client.close()
    assert r.status_code == 502 and "answer larger than 4194304 bytes" in r.text


def test_malformed_credential_header_lines_are_not_captured_in_clear(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    """Item 9: a header line without a colon that starts with a space is folded into the previous
    header's value by mitmproxy: "Authorization Bearer <token>" went in clear into the journal, the
    flow file and the HAR export; so did credentials under names not on the secret list."""
    secrets = ["FOLDEDs3cr3t0001", "XAUTHs3cr3t0003", "ANYs3cr3t0004"]
    cap = tmp_path / "cap"
    body = send_body(None, client_id="cid-malformed-header")
    head = (
        "POST /ilink/bot/sendmessage HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Note: hello\r\n Authorization Bearer {secrets[0]}\r\n"
        f"X-Auth-Token: {secrets[1]}\r\n"
        f"X-Copy: Bearer {secrets[2]}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--capture",
        str(cap),
        "--capture-flows",
    ) as p:
        host, port = p.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head.encode() + body)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        wait_for(
            lambda: (
                (cap / "journal.jsonl").exists()
                and b"cid-malformed-header" in (cap / "journal.jsonl").read_bytes()
            )
        )
    sent = dict((k.lower(), v) for k, v in fake.sends()[-1].headers)
    assert sent["x-auth-token"] == secrets[1]  # iLink gets the request as sent: only captures are redacted
    har = tmp_path / "out.har"
    export = subprocess.run(
        ilink_fixproxy_argv("capture", "export", "--har", str(har), str(cap)),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert export.returncode == 0, export.stderr
    for f in (cap / "journal.jsonl", cap / "flows.mitm", har):
        data = f.read_bytes()
        assert data and not [s for s in secrets if s.encode() in data], f.name
    assert "Traceback" not in p.output


def test_the_confdir_is_owner_only_whatever_the_umask(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    """Item 9: under umask 000 mitmproxy created the confdir 0777 (the CA's private key inside) and
    the upstream CA bundle 0666 (anyone could add a CA and read the bot's traffic to iLink)."""
    conf = tmp_path / "conf"
    with start_proxy_after(
        "import os; os.umask(0)", *upstream_args(fake, pki, conf), "--rules", str(ROOT / "rules.yaml")
    ):
        pass
    assert conf.stat().st_mode & 0o777 == 0o700
    for f in conf.iterdir():
        assert f.stat().st_mode & 0o077 == 0, (f.name, oct(f.stat().st_mode))


def test_explain_and_export_read_a_journal_with_a_request_mitmproxy_refused(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    """Item 9: a request mitmproxy refuses (both Transfer-Encoding and Content-Length) is journaled
    with the URL "://x:443/ilink/bot/sendmessage"; `explain` crashed on it (No hostname given)."""
    cap = tmp_path / "cap"
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "c"), "--rules", str(ROOT / "rules.yaml"), "--capture", str(cap)
    ) as p:
        host, port = p.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(
                b"POST /ilink/bot/sendmessage HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Length: 5\r\n\r\n0\r\n\r\n"
            )
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        wait_for(
            lambda: (
                (cap / "journal.jsonl").exists()
                and b'"decision": "error"' in (cap / "journal.jsonl").read_bytes()
            )
        )
    for args in (
        ["explain", str(cap)],
        ["explain", str(cap), "--json"],
        ["capture", "export", "--har", str(tmp_path / "o.har"), str(cap)],
    ):
        r = subprocess.run(
            ilink_fixproxy_argv(*args), capture_output=True, text=True, timeout=60, env=clean_env()
        )
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    r = subprocess.run(
        ilink_fixproxy_argv("explain", str(cap)), capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert "sendmessage" in r.stdout and "error" in r.stdout


def test_a_chunked_request_with_trailers_is_refused_at_once(proxy: ProxyProcess, fake: FakeILink):
    """Item 9: mitmproxy raises NotImplementedError on HTTP/1 trailers inside its proxy layer; the
    gateway got no answer at all until its own timeout."""
    body = send_body("ctx-trailers", client_id="cid-trailers")
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    for path in (SEND, "/ilink/bot/getconfig"):  # buffered (a rule selects it) and streamed
        with socket.create_connection((host, int(port)), timeout=20) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                + b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                + b"%x\r\n" % len(body)
                + body
                + b"\r\n0\r\nX-Checksum: 1\r\n\r\n"
            )
            answer = b""
            while chunk := s.recv(65536):  # the proxy answers, then closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400") and b"trailers" in answer, answer[:300]
    assert not [r for r in fake.sends() if r.client_id == "cid-trailers"]  # nothing was delivered
    assert "Traceback" not in proxy.output


def test_a_body_with_duplicate_msg_objects_is_never_re_issued_with_a_token(
    proxy: ProxyProcess, fake: FakeILink
):
    """Item 9: with two "msg" objects the edit followed the last one (as json.loads does) and the
    "tokenless" re-issue still carried the first one's token, which a server reading the first
    duplicate uses. Such a body is ambiguous: it is not edited, iLink's answer stays."""
    first = send_body("ctx-dup-first", client_id="cid-dup").decode()
    last = send_body("ctx-dup-last", client_id="cid-dup").decode()
    body = ('{"msg": ' + first[len('{"msg": ') : first.index(', "base_info"')] + ", " + last[1:]).encode()
    with httpx.Client(trust_env=False, timeout=30) as c:
        r = c.post(proxy.url + SEND, content=body, headers=HEADERS)
    assert r.status_code == 200 and "x-ilink-fixproxy" not in r.headers  # iLink's refusal, as is
    sent = [s for s in fake.sends() if b"cid-dup" in s.body]
    assert [s.body for s in sent] == [body]  # the original only: no re-issue carrying ctx-dup-first

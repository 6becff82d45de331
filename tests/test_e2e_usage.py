"""User mistakes through the real `ilink-fixproxy` process: each one works, or ends in one line on
stderr and a non-zero exit; never a Python traceback, a Rust backtrace or a crash.

Found by trying the command as a new user would (issue 12, item 3) and with hostile inputs."""

from __future__ import annotations

import json
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import HEADERS, SEND, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.cli import udp_listener_takes_bare_ipv6
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from mitmproxy.tools.web import webaddons

STALE = "AARzJWAFAAABAAAAAAA-stale-token-usage"
PASSWORD = "Sup3rS3cretPassw0rd"


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


def assert_one_line(p: subprocess.CompletedProcess[str], *fragments: str, code: int = 2) -> str:
    """Exit status `code`, exactly one line on stderr naming the command, no backtrace of any kind."""
    both = p.stdout + p.stderr
    assert p.returncode == code, (p.returncode, both)
    assert "Traceback" not in both and "Stack backtrace" not in both and "Addon error" not in both, both
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ilink-fixproxy: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def proxy_args(fake: FakeILink, pki: TestPKI, conf: Path, *more: str) -> list[str]:
    return [*upstream_args(fake, pki, conf), "--rules", str(core_rules(conf.parent)), *more]


def repaired_through(p: ProxyProcess) -> None:
    """A stale-token send through the proxy is repaired: the proxy really works where it listens."""
    with httpx.Client(trust_env=False, timeout=30) as c:
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.status_code == 200
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def busy_tcp() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# --------------------------------------------------------------------------- --listen


def test_listen_on_localhost_works_on_its_ipv4_address(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    # mitmproxy's UDP (HTTP/3) listener took only IP addresses: a Rust backtrace, exit 1.
    with start_proxy(*proxy_args(fake, pki, tmp_path / "c"), "--listen", "localhost:0") as p:
        assert p.url.startswith("http://127.0.0.1:")  # the start line says where it really listens
        repaired_through(p)
        assert p.stop() == 0


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_listen_on_bracketed_ipv6_works_or_says_why_not(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    args = [*proxy_args(fake, pki, tmp_path / "c"), "--listen", "[::1]:0"]
    if udp_listener_takes_bare_ipv6():  # mitmproxy 12: it can listen there
        with start_proxy(*args) as p:
            assert p.url.startswith("http://[::1]:")
            repaired_through(p)
            assert p.stop() == 0
    else:  # mitmproxy 11: no IPv6 address works for both of its listeners
        assert_one_line(
            run(*args), "--listen [::1]:0", "mitmproxy 11 cannot listen on an IPv6 address", "127.0.0.1"
        )


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_listen_on_bracketed_ipv6_works_in_forward_mode(tmp_path: Path):
    with start_proxy("--mode", "forward", "--confdir", str(tmp_path / "c"), "--listen", "[::1]:0") as p:
        assert p.url.startswith("http://[::1]:")
        assert p.stop() == 0


@pytest.mark.parametrize("listen", ["::1:8765", "::1:0", "::1"])
def test_unbracketed_ipv6_is_ambiguous_and_says_how_to_write_it(listen: str, tmp_path: Path):
    # `::1:PORT` crashed the proxy (signal 11, exit 139) in mitmproxy's Rust listener.
    line = assert_one_line(run("--listen", listen, "--confdir", str(tmp_path / "c")), "in brackets")
    if listen == "::1:8765":
        assert "--listen [::1]:8765" in line


@pytest.mark.parametrize(
    ("listen", "fragment"),
    [
        ("[::1", "IPv6 address in brackets"),
        ("[127.0.0.1]:0", "IPv6 address in brackets"),
        ("[::1]8765", "IPv6 address in brackets"),
        ("no-such-host.invalid:0", "cannot resolve 'no-such-host.invalid'"),
    ],
)
def test_a_malformed_or_unknown_listen_host_is_one_line(listen: str, fragment: str, tmp_path: Path):
    assert_one_line(run("--listen", listen, "--confdir", str(tmp_path / "c")), fragment)


def udp_port_with_its_tcp_port_free() -> socket.socket:
    """A UDP socket bound to a port whose TCP twin is free, chosen BELOW the kernel's ephemeral
    range: a port from the range (port 0) can at any moment become the local port of some
    process's outgoing TCP connection, and then the proxy's TCP listen fails first (this test
    failed so once in CI, with redis and proxies busy around it)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, low)
        udp = socket.socket(type=socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", port))
            with socket.socket() as tcp:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind(("127.0.0.1", port))
        except OSError:
            udp.close()
            continue
        return udp
    raise AssertionError(f"no free port pair below {low}")


def test_the_udp_port_taken_is_one_line(tmp_path: Path):
    # Reverse mode to an https upstream also listens on UDP (HTTP/3) on the same port.
    with udp_port_with_its_tcp_port_free() as s:
        port = s.getsockname()[1]
        p = run("--listen", f"127.0.0.1:{port}", "--confdir", str(tmp_path / "c"))
    assert_one_line(p, f"cannot listen on 127.0.0.1:{port} (UDP", "address already in use")


# --------------------------------------------------------------------------- --upstream


@pytest.mark.parametrize(
    ("upstream", "fragment"),
    [
        ("https://[::1", "not a valid URL"),
        ("https://[::1]:99999", "not a valid URL"),
        ("https://a b", "Invalid hostname"),
        ("https://host:0", "invalid port"),
    ],
)
def test_a_malformed_upstream_is_one_line(upstream: str, fragment: str, tmp_path: Path):
    assert_one_line(
        run("--upstream", upstream, "--confdir", str(tmp_path / "c")), f"--upstream {upstream!r}", fragment
    )


@pytest.mark.parametrize(
    "upstream",
    [
        f"https://user:{PASSWORD}@ilink.example",
        f"https://user:{PASSWORD}@[::1",  # broken as well: still never echoed
        f"https://user:{PASSWORD[:4]}/{PASSWORD[4:]}@ilink.example",  # a "/" in the password
        f"https://{PASSWORD}@ilink.example",
    ],
)
def test_credentials_in_the_upstream_are_refused_and_never_echoed(upstream: str, tmp_path: Path):
    p = run("--upstream", upstream, "--confdir", str(tmp_path / "c"))
    assert_one_line(p, "no user or password in the URL", "https://***@")
    assert PASSWORD[:4] not in p.stdout + p.stderr and PASSWORD[4:] not in p.stdout + p.stderr


def test_credentials_in_a_set_mode_url_are_not_echoed(tmp_path: Path):
    p = run("--set", f"mode=reverse:https://user:{PASSWORD}@h:x", "--confdir", str(tmp_path / "c"))
    assert_one_line(p, "https://***@h")
    assert PASSWORD not in p.stdout + p.stderr


# --------------------------------------------------------------------------- CA and confdir


@pytest.fixture
def corrupt_ca(tmp_path: Path) -> Path:
    conf = tmp_path / "corrupt"
    conf.mkdir()
    (conf / "mitmproxy-ca.pem").write_text(
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    )
    return conf


def test_ca_command_with_a_corrupt_ca_is_one_line(corrupt_ca: Path):
    assert_one_line(
        run("ca", "--confdir", str(corrupt_ca)), f"{corrupt_ca / 'mitmproxy-ca.pem'} is unreadable"
    )


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_running_with_a_corrupt_ca_is_one_line(mode: str, corrupt_ca: Path):
    # With --state :memory: nothing else stops first: mitmproxy's "Addon error" traceback.
    p = run("--listen", "127.0.0.1:0", "--mode", mode, "--confdir", str(corrupt_ca), "--state", ":memory:")
    assert_one_line(p, "the CA in", "is unreadable", "mitmproxy-ca")


@pytest.fixture
def encrypted_ca(tmp_path: Path) -> Path:
    """A confdir whose CA key is encrypted with the passphrase "open sesame" (cert_passphrase)."""
    from cryptography.hazmat.primitives import serialization
    from mitmproxy import certs

    key, cert = certs.create_ca("ilink-fixproxy tests", "encrypted CA", 2048)
    conf = tmp_path / "encrypted"
    conf.mkdir()
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"open sesame"),
    )
    (conf / "mitmproxy-ca.pem").write_bytes(pem_key + cert.public_bytes(serialization.Encoding.PEM))
    return conf


def test_an_encrypted_ca_key_needs_its_passphrase(encrypted_ca: Path):
    assert_one_line(run("ca", "--confdir", str(encrypted_ca)), "cannot be read", "--set cert_passphrase=")
    p = run("--listen", "127.0.0.1:0", "--confdir", str(encrypted_ca), "--set", "cert_passphrase=wrong")
    assert_one_line(p, "is unreadable (wrong passphrase)")
    ok = run("--set", "cert_passphrase=open sesame", "ca", "--confdir", str(encrypted_ca))
    assert ok.returncode == 0, ok.stderr
    assert "CA certificate:" in ok.stdout


@pytest.mark.parametrize("command", [[], ["ca"]])
@pytest.mark.parametrize("under", ["file", "file/sub"])
def test_a_confdir_that_cannot_be_a_directory_is_one_line(command: list[str], under: str, tmp_path: Path):
    # Tests run as root, for whom no directory is unreadable: a confdir that is a file, or lies
    # under a file, is what no user can use.
    (tmp_path / "file").write_text("")
    conf = tmp_path / under
    p = run("--listen", "127.0.0.1:0", "--state", ":memory:", *command, "--confdir", str(conf))
    assert_one_line(p, str(conf), "not a directory" if under == "file" else "Not a directory")


def test_a_confdir_that_is_a_file_with_upstream_ca_is_one_line(pki: TestPKI, tmp_path: Path):
    (tmp_path / "file").write_text("")
    p = run("--confdir", str(tmp_path / "file"), "--upstream-ca", str(pki.ca_cert), "--state", ":memory:")
    assert_one_line(p, "--confdir", "not a directory")


def test_set_confdir_is_checked_like_the_flag(tmp_path: Path):
    (tmp_path / "file").write_text("")
    p = run(
        "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c"), "--set", f"confdir={tmp_path / 'file'}"
    )
    assert_one_line(p, "not a directory")


def test_set_ilink_state_on_a_directory_is_one_line_before_listening(tmp_path: Path):
    (tmp_path / "d").mkdir()
    p = run(
        "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c"), "--set", f"ilink_state={tmp_path / 'd'}"
    )
    assert_one_line(p, "cannot open state file", "Is a directory")
    assert "listening on" not in p.stdout


# --------------------------------------------------------------------------- --ui


# (mitmproxy 11.0.x refuses --ui before looking at its port: it has no web authentication)
needs_web_auth = pytest.mark.skipif(
    not hasattr(webaddons, "WebAuth"),
    reason="--ui is refused outright on mitmproxy without web authentication",
)


@needs_web_auth
def test_ui_with_the_web_port_taken_is_one_line(busy_tcp: int, tmp_path: Path):
    p = run(
        "--ui", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c"), "--set", f"web_port={busy_tcp}"
    )
    assert_one_line(
        p, f"cannot listen on 127.0.0.1:{busy_tcp} for the web UI", "address already in use", "web_port"
    )


@needs_web_auth
@pytest.mark.parametrize("port", ["-5", "abc", "70000"])
def test_ui_with_a_bad_web_port_is_one_line(port: str, tmp_path: Path):
    p = run("--ui", "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c"), "--set", f"web_port={port}")
    assert_one_line(p, f"web_port={port}", "0 to 65535")


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["state", "list", "extra"], "state list takes no argument"),
        (["outbox", "list", "extra"], "outbox list takes no argument"),
        (["ca", "extra"], "unrecognized arguments: extra"),
        (["state", "forget", "a", "b"], "unrecognized arguments: b"),
        (["state", "flush"], "invalid choice: 'flush'"),
        (["--mode", "sideways"], "invalid choice: 'sideways'"),
        (["explain"], "required: CAPTURE"),
        (["--set", "=1"], "expected NAME=VALUE"),
    ],
)
def test_extra_or_missing_arguments_are_one_line(args: list[str], fragment: str, tmp_path: Path):
    p = run(*args, "--confdir", str(tmp_path / "c")) if args[0] == "--set" else run(*args)
    assert_one_line(p, fragment)


# --------------------------------------------------------------------------- explain / capture


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"a": 1}\n{"b": 2}\n', "not an ilink-fixproxy journal"),  # JSON lines, but not ours
        (b"{garbage\n", "not an ilink-fixproxy journal"),  # one cut-short line and nothing else
        (b'{"log": 5}\n', "not an ilink-fixproxy journal"),
        (b'{"method": "POST", "url": "https://h/x"}\n[1, 2]\n', ":2: not a journal line (not a JSON object)"),
        (b'{"method": "POST", "url": "x"}\n', ":1: not a journal record (url is not an absolute"),
        (
            b'{"method": "POST", "url": "https://h/x", "ts": NaN}\n',
            "not a journal record (ts is not a number)",
        ),
        (
            b'{"method": "GET", "url": "https://h/x", "attempts": [5]}\n',
            "(attempts is not a list of objects)",
        ),
        (b'{"a": 1}\n\xff\xfe\n', "not UTF-8"),
        (b'{"log": {"entries": 5}}', "not a HAR file"),
        (b"hello\nworld\n", "not a journal, HAR or mitmproxy flow file"),
    ],
)
def test_explain_of_something_that_is_not_a_capture_says_so(content: bytes, fragment: str, tmp_path: Path):
    garbage = tmp_path / "journal.jsonl"
    garbage.write_bytes(content)
    line = assert_one_line(run("explain", str(garbage)), fragment)
    assert "0 iLink exchange" not in line


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"not": "a journal"}\n', "not an ilink-fixproxy journal"),
        (
            '{"method": "POST", "url": "https://h/x", "request": {"headers": 5}}\n',
            "request.headers is not a list",
        ),
    ],
)
def test_capture_export_of_a_garbage_journal_says_so(content: str, fragment: str, tmp_path: Path):
    (tmp_path / "journal.jsonl").write_text(content)
    p = run("capture", "export", "--har", str(tmp_path / "out.har"), str(tmp_path))
    assert_one_line(p, fragment)
    assert not (tmp_path / "out.har").exists()


def test_explain_of_an_empty_journal_still_reads_as_no_exchanges(tmp_path: Path):
    # Not garbage: a proxy started with --capture that has seen no traffic yet.
    (tmp_path / "journal.jsonl").write_text("")
    p = run("explain", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "0 iLink exchange(s)" in p.stdout


def test_explain_of_a_real_journal_still_works(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    cap = tmp_path / "cap"
    with start_proxy(*proxy_args(fake, pki, tmp_path / "c"), "--capture", str(cap)) as p:
        repaired_through(p)
    records = [json.loads(ln) for ln in (cap / "journal.jsonl").read_text().splitlines()]
    assert records and all("method" in r for r in records)
    p2 = run("explain", str(cap), "--rules", str(tmp_path / "core-rules.yaml"))
    assert p2.returncode == 0, p2.stderr
    assert "1 iLink exchange(s)" in p2.stdout

"""End to end: in forward mode a client cannot make the proxy connect to the proxy's own listeners
(web UI, metrics, the proxy port) nor, by default, to loopback, private or link-local addresses;
`--allow-private-destinations` opens the latter only. Through the real proxy process."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import HEADERS, SEND, send_body, start_proxy, tls_context
from ilink_fixproxy.launcher import ProxyProcess
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from obs_helpers import free_port
from test_e2e_faults import wait_for
from test_e2e_modes import STALE, write_rules


def hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def read_answer(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Status code, head and body of one HTTP/1.1 answer (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), head, body


def connect_through(proxy: ProxyProcess, target: str) -> tuple[int, bytes, bytes]:
    """Send `CONNECT target` to the proxy; its answer."""
    with socket.create_connection(hostport(proxy.url), timeout=30) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return read_answer(s)


def socks5_connect(proxy: ProxyProcess, host: str, port: int) -> int:
    """A SOCKS5 CONNECT by name through the proxy; the reply code (0: connected)."""
    with socket.create_connection(hostport(proxy.url), timeout=30) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        name = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", port))
        reply = s.recv(262)
        return reply[1]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """Forward mode with the default policy and a metrics listener."""
    conf = tmp_path_factory.mktemp("guarded")
    with start_proxy("--mode", "forward", "--confdir", str(conf), "--metrics", "127.0.0.1:0") as p:
        p.metrics_port = int(  # type: ignore[attr-defined]
            p.output.split("metrics on http://127.0.0.1:")[1].split("/", 1)[0]
        )
        yield p


def test_connect_to_the_metrics_listener_is_refused_with_403(guarded: ProxyProcess):
    status, head, body = connect_through(guarded, f"127.0.0.1:{guarded.metrics_port}")  # type: ignore[attr-defined]
    assert status == 403
    assert b"X-Ilink-Fixproxy: refused-destination" in head
    assert b"own metrics listener" in body


def test_plain_http_to_the_metrics_listener_is_refused(guarded: ProxyProcess):
    port = guarded.metrics_port  # type: ignore[attr-defined]
    with httpx.Client(proxy=guarded.url, trust_env=False, timeout=30) as c:
        r = c.get(f"http://127.0.0.1:{port}/metrics")
    assert r.status_code == 403
    assert "own metrics listener" in r.text
    assert "ilink_fixproxy_requests_total" not in r.text


@pytest.mark.parametrize(
    "target",
    [
        "localhost:{port}",  # a name resolving to loopback
        "127.0.0.1:{port}",
        "127.1.2.3:{port}",
        "[::1]:{port}",
        "[::ffff:127.0.0.1]:{port}",  # IPv4-mapped IPv6
        "[::ffff:7f00:1]:{port}",
        "0.0.0.0:{port}",  # "this machine" on Linux
        "[::]:{port}",
        "10.1.2.3:{port}",
        "192.168.1.1:{port}",
        "172.16.0.1:{port}",
        "169.254.169.254:80",  # cloud metadata service
        "[fe80::1]:{port}",
        "[fd00::1]:{port}",
        "100.64.0.1:{port}",  # carrier-grade NAT
        "[2002:7f00:1::1]:{port}",  # 6to4 around 127.0.0.1
        "[64:ff9b::a00:1]:{port}",  # NAT64 around 10.0.0.1
    ],
)
def test_loopback_and_private_destinations_are_refused_by_default(guarded: ProxyProcess, target: str):
    status, _, body = connect_through(guarded, target.format(port=free_port()))
    assert status == 403, body
    assert b"--allow-private-destinations allows it" in body


def test_a_refusal_is_logged_once_without_the_request(guarded: ProxyProcess):
    port = free_port()
    with httpx.Client(proxy=guarded.url, trust_env=False, timeout=30) as c:
        r = c.get(f"http://10.9.8.7:{port}/secret-path?token=abc", headers=HEADERS)
    assert r.status_code == 403
    assert wait_for(lambda: f"10.9.8.7:{port}" in guarded.output)  # the log line may trail the answer
    lines = [line for line in guarded.output.splitlines() if f"10.9.8.7:{port}" in line]
    assert len(lines) == 1, lines
    assert "refused GET to 10.9.8.7" in lines[0]
    assert "secret-path" not in guarded.output and "token=abc" not in guarded.output
    assert HEADERS["Authorization"].split()[1] not in guarded.output


def test_socks5_clients_are_held_to_the_resolved_address(tmp_path: Path):
    # SOCKS5 asks no CONNECT question the early check could answer: the check at connect time,
    # on the address the name resolves to, is what refuses it.
    with start_proxy(
        "--mode",
        "forward",
        "--set",
        "mode=socks5",
        "--confdir",
        str(tmp_path / "c"),
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        metrics_port = int(p.output.split("metrics on http://127.0.0.1:")[1].split("/", 1)[0])
        assert socks5_connect(p, "localhost", metrics_port) != 0
        assert wait_for(lambda: "own metrics listener" in p.output)
        assert socks5_connect(p, "localhost", free_port()) != 0
        assert wait_for(lambda: "is a loopback address" in p.output)


@pytest.fixture(scope="module")
def permissive(fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("permissive")
    conf = tmp / "conf"
    web_port = free_port()
    with start_proxy(
        "--mode",
        "forward",
        "--allow-private-destinations",
        "--rules",
        str(write_rules(tmp / "rules.yaml")),
        "--confdir",
        str(conf),
        "--upstream-ca",
        str(pki.ca_cert),
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        p.confdir = conf  # type: ignore[attr-defined]
        p.metrics_port = int(  # type: ignore[attr-defined]
            p.output.split("metrics on http://127.0.0.1:")[1].split("/", 1)[0]
        )
        p.web_port = web_port  # type: ignore[attr-defined]
        yield p


def test_allowed_private_destinations_work_by_name_through_tls_interception(permissive, fake: FakeILink):
    # localhost is resolved and checked once, the connection pinned to that address, and TLS to
    # the fake still verifies its certificate for the name.
    ca = permissive.confdir / "mitmproxy-ca-cert.pem"
    with httpx.Client(proxy=permissive.url, verify=tls_context(ca), trust_env=False, timeout=30) as c:
        first = c.post(fake.url + SEND, content=send_body(STALE), headers=HEADERS)
        again = c.post(fake.url + SEND, content=send_body(STALE, client_id="c-2"), headers=HEADERS)
    assert first.headers["x-ilink-fixproxy"].startswith("repaired")
    assert again.headers["x-ilink-fixproxy"].startswith("stripped")  # same tunnel; token known stale
    assert first.content == again.content == fake.success_answer


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:{metrics}",
        "localhost:{metrics}",
        "0.0.0.0:{metrics}",
        "[::ffff:127.0.0.1]:{metrics}",
        "127.0.0.1:{proxy}",
    ],
)
def test_the_proxys_own_listeners_stay_refused_when_private_ones_are_allowed(permissive, target: str):
    target = target.format(metrics=permissive.metrics_port, proxy=hostport(permissive.url)[1])
    status, _, body = connect_through(permissive, target)
    assert status == 403, body
    assert b"this proxy's own" in body

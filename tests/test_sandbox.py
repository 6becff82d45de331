"""The fake iLink (sandbox.py) must itself be right, or every proxy test built on it is noise."""

from __future__ import annotations

import gzip
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from ilink_fixproxy.sandbox import (
    FIRST_MESSAGE_ID,
    SUCCESS_ANSWER,
    Answer,
    FakeILink,
    TestPKI,
    make_pki,
)

SEND = "/ilink/bot/sendmessage"
UPDATES = "/ilink/bot/getupdates"
PEER = "wxid_peer@im.wechat"


def send_body(
    token: Any = None, *, text: str = "hello", client_id: str = "cid-1", omit_token: bool = False
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "from_user_id": "",
        "to_user_id": PEER,
        "client_id": client_id,
        "message_type": 2,
        "message_state": 2,
        "item_list": [{"type": 1, "text_item": {"text": text}}],
    }
    if not omit_token:
        msg["context_token"] = token
    return {"msg": msg, "base_info": {"channel_version": "2.2.0"}}


def verify_context(pki: TestPKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13+ does by default
    return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki") / "nested")


@pytest.fixture(scope="module")
def tls_fake(pki: TestPKI) -> Iterator[FakeILink]:
    with FakeILink(pki, longpoll_seconds=0.3) as fake:
        yield fake


@pytest.fixture
def fake(tls_fake: FakeILink) -> FakeILink:
    tls_fake.reset()
    return tls_fake


@pytest.fixture
def client(pki: TestPKI) -> Iterator[httpx.Client]:
    with httpx.Client(verify=verify_context(pki), trust_env=False, timeout=5) as c:
        yield c


@pytest.fixture
def plain_fake() -> Iterator[FakeILink]:
    with FakeILink(longpoll_seconds=0.3) as fake:
        yield fake


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes and read until the server closes (or resets) the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


# -- PKI / TLS -------------------------------------------------------------------------------


def test_pki_files_and_extensions(pki: TestPKI) -> None:
    assert pki.ca_cert.parent.is_dir()
    assert (pki.server_key.stat().st_mode & 0o777) == 0o600
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert server.not_valid_before_utc < ca.not_valid_after_utc
    server.verify_directly_issued_by(ca)


def test_tls_verifies_with_ca_by_name_and_ip(fake: FakeILink, client: httpx.Client) -> None:
    assert fake.url == f"https://localhost:{fake.port}"
    for base in (fake.url, f"https://127.0.0.1:{fake.port}"):
        r = client.post(base + "/ilink/bot/getconfig", json={"ilink_user_id": PEER})
        assert r.status_code == 200
        assert r.json()["ret"] == 0 and r.json()["typing_ticket"].startswith("tt-")


def test_tls_fails_without_ca_and_server_survives(fake: FakeILink, client: httpx.Client) -> None:
    with (
        httpx.Client(verify=ssl.create_default_context(), trust_env=False, timeout=5) as bare,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        bare.post(fake.url + SEND, json=send_body(omit_token=True))
    # A client that opens a socket and says nothing must not block anyone else.
    with socket.create_connection(("127.0.0.1", fake.port)):
        r = client.post(fake.url + "/ilink/bot/sendtyping", json={"status": 1})
        assert r.json() == {"ret": 0}
    assert [r.path for r in fake.requests] == ["/ilink/bot/sendtyping"]


# -- the stale-token model -------------------------------------------------------------------


def test_fresh_token_delivered(fake: FakeILink, client: httpx.Client) -> None:
    fake.fresh_tokens.add("tok-fresh")
    r = client.post(fake.url + SEND, json=send_body("tok-fresh", text="good morning"))
    assert r.status_code == 200 and r.content == SUCCESS_ANSWER
    [delivery] = fake.deliveries
    assert (delivery.to_user_id, delivery.client_id, delivery.text, delivery.context_token) == (
        PEER,
        "cid-1",
        "good morning",
        "tok-fresh",
    )
    assert json.loads(delivery.body) == send_body("tok-fresh", text="good morning")
    [rec] = fake.sends()
    assert (rec.method, rec.answered, rec.context_token, rec.client_id) == (
        "POST",
        "delivered",
        "tok-fresh",
        "cid-1",
    )


def test_stale_token_refused(fake: FakeILink, client: httpx.Client) -> None:
    r = client.post(fake.url + SEND, json=send_body("tok-stale"))
    assert r.status_code == 200
    assert r.content == b'{"ret":-2,"errmsg":"prepare failed"}'
    fake.stale_answer = b'{"ret":-2}'
    assert client.post(fake.url + SEND, json=send_body("tok-stale")).content == b'{"ret":-2}'
    assert fake.deliveries == []
    assert [s.answered for s in fake.sends()] == ["refused-stale", "refused-stale"]


def test_tokenless_delivered_or_refused_per_flag(fake: FakeILink, client: httpx.Client) -> None:
    fake.success_answer = b'{"message_id":1}'
    for body in (send_body(omit_token=True), send_body(None), send_body("")):
        assert client.post(fake.url + SEND, json=body).content == b'{"message_id":1}'
    assert len(fake.deliveries) == 3
    assert all(d.context_token is None for d in fake.deliveries)

    fake.tokenless_delivers = False
    r = client.post(fake.url + SEND, json=send_body(omit_token=True))
    assert r.content == b'{"ret":-2,"errmsg":"prepare failed"}'
    assert len(fake.deliveries) == 3
    assert [s.answered for s in fake.sends()] == ["delivered"] * 3 + ["refused-tokenless"]


def test_other_paths(fake: FakeILink, client: httpx.Client) -> None:
    r = client.post(fake.url + "/ilink/bot/getuploadurl", json={})
    assert r.status_code == 404 and r.json() == {"ret": -1, "errmsg": "not found"}
    assert client.get(fake.url + SEND).status_code == 404
    assert [r.answered for r in fake.requests] == ["other", "other"]


def test_chunked_request_body_is_read(fake: FakeILink, client: httpx.Client) -> None:
    raw = json.dumps(send_body(omit_token=True, text="chunky")).encode()
    pieces = iter([raw[:10], raw[10:]])
    r = client.post(fake.url + SEND + "?x=1", content=pieces)  # an iterator is sent chunked
    assert r.status_code == 200
    [rec] = fake.requests
    assert ("Transfer-Encoding", "chunked") in rec.headers
    assert rec.body == raw and rec.path == SEND + "?x=1" and rec.answered == "delivered"
    assert fake.deliveries[0].text == "chunky"


# -- scripted answers ------------------------------------------------------------------------


def test_scripts_consumed_in_order_then_model(fake: FakeILink, client: httpx.Client) -> None:
    fake.script(
        "sendmessage", Answer(status=503, body=b"busy", headers=(("X-A", "1"),)), Answer(body=b'{"ret":-14}')
    )
    fake.fresh_tokens.add("tok")
    answers = [client.post(fake.url + SEND + "?q=1", json=send_body("tok")) for _ in range(3)]
    assert [(r.status_code, r.content) for r in answers] == [
        (503, b"busy"),
        (200, b'{"ret":-14}'),
        (200, SUCCESS_ANSWER),
    ]
    assert answers[0].headers["x-a"] == "1"
    assert [s.answered for s in fake.sends()] == ["scripted", "scripted", "delivered"]
    assert fake.sends()[0].context_token == "tok"
    assert len(fake.deliveries) == 1


def test_scripted_gzip_and_chunked(fake: FakeILink, client: httpx.Client) -> None:
    payload = json.dumps({"ret": 0, "text": "ü" * 50}, ensure_ascii=False).encode()
    fake.script(
        SEND,
        Answer(body=payload, gzip=True),
        Answer(body=payload, chunked=True),
        Answer(body=payload, gzip=True, chunked=True),
    )
    gz, ch, both = (client.post(fake.url + SEND, json={}) for _ in range(3))
    assert gz.headers["content-encoding"] == "gzip" and gz.content == payload
    assert int(gz.headers["content-length"]) == len(gzip.compress(payload, mtime=0))
    assert ch.headers["transfer-encoding"] == "chunked" and "content-length" not in ch.headers
    assert ch.content == payload
    assert both.headers["content-encoding"] == "gzip" and both.content == payload


def test_scripted_delay(fake: FakeILink, client: httpx.Client) -> None:
    fake.script(SEND, Answer(delay=0.3, body=b"late"), Answer(delay=0.5))
    start = time.monotonic()
    assert client.post(fake.url + SEND, json={}).content == b"late"
    assert time.monotonic() - start >= 0.3
    with pytest.raises(httpx.ReadTimeout):
        client.post(fake.url + SEND, json={}, timeout=0.1)


def test_scripted_reset_and_truncate_raise(fake: FakeILink, client: httpx.Client) -> None:
    fake.script(
        SEND,
        Answer(fault="reset"),
        Answer(fault="truncate", body=b'{"ret":0}'),
        Answer(fault="truncate", chunked=True, body=b'{"ret":0}'),
    )
    for _ in range(3):
        with pytest.raises(httpx.TransportError):
            client.post(fake.url + SEND, json=send_body(omit_token=True))
    assert [s.answered for s in fake.sends()] == ["scripted"] * 3  # recorded before the fault
    assert fake.deliveries == []
    assert client.post(fake.url + SEND, json=send_body(omit_token=True)).status_code == 200


def test_faults_on_the_wire(plain_fake: FakeILink) -> None:
    plain_fake.script(SEND, Answer(fault="reset"), Answer(fault="truncate", body=b"abc"))
    request = b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    with pytest.raises(ConnectionResetError):
        raw_exchange(plain_fake.port, request)
    head, _, body = raw_exchange(plain_fake.port, request).partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert body == b"abc" and length > len(body)


def test_plain_http_url(plain_fake: FakeILink) -> None:
    assert plain_fake.url == f"http://127.0.0.1:{plain_fake.port}"
    with httpx.Client(trust_env=False, timeout=5) as c:
        assert c.post(plain_fake.url + SEND, json=send_body("x")).json()["ret"] == -2


# -- getupdates ------------------------------------------------------------------------------


def test_getupdates_returns_inbound_and_token_becomes_fresh(fake: FakeILink, client: httpx.Client) -> None:
    token = fake.push_inbound(PEER, "你好")
    assert token in fake.fresh_tokens
    r = client.post(fake.url + UPDATES, json={"get_updates_buf": ""})
    assert f'"message_id":{FIRST_MESSAGE_ID}'.encode() in r.content
    assert "你好".encode() in r.content  # ensure_ascii=False
    doc = r.json()
    [msg] = doc["msgs"]
    assert msg["message_id"] == FIRST_MESSAGE_ID > 2**53
    assert (msg["from_user_id"], msg["context_token"], msg["message_type"], msg["message_state"]) == (
        PEER,
        token,
        1,
        2,
    )
    assert msg["item_list"] == [{"type": 1, "text_item": {"text": "你好"}}]
    assert {"seq", "to_user_id", "client_id", "create_time_ms"} <= msg.keys()
    cursor = doc["get_updates_buf"]
    assert doc["ret"] == 0 and cursor

    assert client.post(fake.url + SEND, json=send_body(token)).content == SUCCESS_ANSWER
    assert fake.deliveries[0].context_token == token

    start = time.monotonic()
    empty = client.post(fake.url + UPDATES, json={"get_updates_buf": cursor})
    assert time.monotonic() - start >= 0.25  # held for longpoll_seconds (0.3)
    assert empty.json() == {"ret": 0, "msgs": [], "get_updates_buf": cursor}
    assert fake.requests[0].answered == "updates"


def test_longpoll_wakes_early_on_push(fake: FakeILink, client: httpx.Client) -> None:
    fake.longpoll_seconds = 5
    result: dict[str, Any] = {}

    def poll() -> None:
        result["response"] = client.post(fake.url + UPDATES, json={"get_updates_buf": "c0"})
        result["at"] = time.monotonic()

    poller = threading.Thread(target=poll)
    poller.start()
    _wait_for(lambda: fake.requests)
    pushed_at = time.monotonic()
    token = fake.push_inbound("wxid_b", "wake up")
    poller.join(timeout=3)
    assert not poller.is_alive()
    assert result["at"] - pushed_at < 1.0
    assert result["response"].json()["msgs"][0]["context_token"] == token


def test_reset_clears_state(fake: FakeILink, client: httpx.Client) -> None:
    token = fake.push_inbound(PEER)
    fake.push_inbound(PEER)
    client.post(fake.url + SEND, json=send_body(token))
    fake.script(SEND, Answer(status=500))
    fake.stale_answer, fake.success_answer, fake.tokenless_delivers = b"x", b"y", False
    fake.longpoll_seconds = 9
    fake.reset()
    assert fake.requests == [] and fake.deliveries == [] and fake.fresh_tokens == set()
    assert (fake.stale_answer, fake.success_answer, fake.tokenless_delivers, fake.longpoll_seconds) == (
        b'{"ret":-2,"errmsg":"prepare failed"}',
        SUCCESS_ANSWER,
        True,
        0.3,
    )
    r = client.post(fake.url + SEND, json=send_body(token))  # no script, token forgotten
    assert r.status_code == 200 and r.json()["ret"] == -2
    assert client.post(fake.url + UPDATES, json={}).json()["msgs"] == []  # inbound forgotten


# -- lifecycle -------------------------------------------------------------------------------


def test_stop_is_prompt_with_longpoll_held(pki: TestPKI) -> None:
    fake = FakeILink(pki, longpoll_seconds=30).start()
    outcome: dict[str, Any] = {}

    def poll() -> None:
        try:
            with httpx.Client(verify=verify_context(pki), trust_env=False, timeout=10) as c:
                outcome["response"] = c.post(fake.url + UPDATES, json={})
        except httpx.TransportError as exc:
            outcome["error"] = exc

    poller = threading.Thread(target=poll)
    poller.start()
    _wait_for(lambda: fake.requests)
    start = time.monotonic()
    fake.stop()
    assert time.monotonic() - start < 2
    poller.join(timeout=2)
    assert not poller.is_alive() and "error" in outcome
    with (
        pytest.raises(httpx.ConnectError),
        httpx.Client(verify=verify_context(pki), trust_env=False, timeout=2) as c,
    ):
        c.post(fake.url + UPDATES, json={})
    fake.stop()  # idempotent


def test_cli_runs_and_exits_cleanly_on_ctrl_c(tmp_path: Path, pki: TestPKI) -> None:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ilink_fixproxy.sandbox", "--tls-dir", str(tmp_path / "cli")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        url = proc.stdout.readline().split()[-1]
        ca = proc.stdout.readline().split(": ", 1)[1].strip()
        assert url.startswith("https://localhost:") and Path(ca).is_file()
        proc.stdout.readline()  # usage hint
        proc.stdin.write("push wxid_cli hello\n")
        proc.stdin.flush()
        token = proc.stdout.readline().split()[-1]
        ctx = ssl.create_default_context(cafile=ca)
        with httpx.Client(verify=ctx, trust_env=False, timeout=5) as c:
            assert c.post(url + SEND, json=send_body(token)).content == SUCCESS_ANSWER
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err and "Traceback" not in out


def _wait_for(condition: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_malformed_chunked_request_gets_400(plain_fake: FakeILink) -> None:
    request = (
        b"POST " + SEND.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n"
    )
    assert raw_exchange(plain_fake.port, request).startswith(b"HTTP/1.1 400 ")
    assert plain_fake.requests == []  # broken framing is not a request the model saw


def test_a_dropping_peer_gets_ret_0_without_message_id_and_nothing_is_delivered(
    fake: FakeILink, client: httpx.Client
) -> None:
    fake.fresh_tokens.add("tok-fresh")
    fake.dropping_peers.add(PEER)
    r = client.post(fake.url + SEND, json=send_body("tok-fresh", text="lost"))
    assert r.status_code == 200 and r.content == b'{"ret":0}'
    assert fake.deliveries == [] and fake.sends()[-1].answered == "dropped-silently"
    fake.reset()
    assert fake.dropping_peers == set()

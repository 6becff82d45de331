"""The fault matrix, end to end: the real `ilink-fixproxy` process in reverse mode in front of the
fake iLink over TLS, the fake (or the client) misbehaving in every way we could think of.

For each fault the contract is the same (docs/reliability.md has the table):
- the caller gets the original upstream answer byte for byte, or the repaired one, or, when the
  upstream never answered, mitmproxy's normal 502;
- the number of upstream attempts is exactly what the rule allows (1, or 2 with the re-issue);
- the proxy stays up (the next ordinary stale send is repaired) and logs no traceback.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import HEADERS, ROOT, SEND, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI, make_pki

STALE = "AARzJWAFAAABAAAAAAA-stale-token-fault"
ORIGINAL = b'{"ret":-2,"errmsg":"prepare failed"}'
SUCCESS = b'{"ret":0,"message_id":"7489534892789344265"}'
TEN_MB = 10 * 1024 * 1024
# Any of these in the proxy's output means an exception escaped somewhere.
BAD_OUTPUT = ("Traceback", "Addon error", "Task exception was never retrieved", "Unhandled error")


# ------------------------------------------------------------------------------------ helpers


def post(client: httpx.Client, proxy: ProxyProcess, body: bytes | None = None, **kw) -> httpx.Response:
    return client.post(
        proxy.url + SEND, content=send_body(STALE) if body is None else body, headers=HEADERS, **kw
    )


def post_raw(proxy: ProxyProcess, body: bytes | None = None) -> tuple[httpx.Response, bytes]:
    """POST and return the answer with its body exactly as it came over the wire (not decoded)."""
    with httpx.Client(trust_env=False, timeout=30) as c:
        req = c.build_request("POST", proxy.url + SEND, content=body or send_body(STALE), headers=HEADERS)
        r = c.send(req, stream=True)
        try:
            wire = b"".join(r.iter_raw())
        finally:
            r.close()
    return r, wire


class Gw:
    """A gateway of its own: bot token, peer, client_id and context token nobody else uses."""

    def __init__(self) -> None:
        tag = secrets.token_hex(4)
        self.peer = f"wxid_fault_{tag}@im.wechat"
        self.client_id = f"fault-{tag}"
        self.token = f"AARzJWAFAAABAAAAAAA-peer-fault-{tag}"
        self.headers = {**HEADERS, "Authorization": f"Bearer fault-bot-{tag}@im.bot:s3cret-{tag}"}

    def body(self) -> bytes:
        msg = {
            "to_user_id": self.peer,
            "client_id": self.client_id,
            "message_type": 2,
            "message_state": 2,
            "item_list": [{"type": 1, "text_item": {"text": "fault"}}],
            "context_token": self.token,
        }
        return json.dumps({"msg": msg}).encode()

    def post(self, proxy: ProxyProcess, timeout: float = 30) -> tuple[httpx.Response, bytes]:
        with httpx.Client(trust_env=False, timeout=timeout) as c:
            r = c.send(
                c.build_request("POST", proxy.url + SEND, content=self.body(), headers=self.headers),
                stream=True,
            )
            try:
                wire = b"".join(r.iter_raw())
            finally:
                r.close()
        return r, wire


def assert_clean(proxy: ProxyProcess) -> None:
    assert proxy.proc.poll() is None, f"the proxy exited:\n{proxy.output}"
    out = proxy.output
    for marker in BAD_OUTPUT:
        assert marker not in out, f"{marker!r} in the proxy output:\n{out}"


def assert_still_serving(proxy: ProxyProcess, fake: FakeILink) -> None:
    """The proxy survived the fault: alive, no traceback, and the next ordinary stale send (on a
    new connection, from a gateway it has never seen) is repaired with exactly two attempts."""
    assert_clean(proxy)
    fake.reset()
    gateway = Gw()
    r, wire = gateway.post(proxy)
    assert r.status_code == 200 and wire == fake.success_answer
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2
    assert [d.client_id for d in fake.deliveries] == [gateway.client_id]
    assert_clean(proxy)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def proxy_conf(proxy: ProxyProcess) -> Path:
    return Path(proxy.argv[proxy.argv.index("--confdir") + 1])


class H2OnlyContext(ssl.SSLContext):
    """httpcore offers ALPN "http/1.1, h2" in that order and mitmproxy honours the client's
    order; offering only h2 makes the client really speak HTTP/2."""

    def set_alpn_protocols(self, alpn_protocols):  # type: ignore[override]
        super().set_alpn_protocols(["h2"])


def h2_client(proxy: ProxyProcess, timeout: float = 30) -> tuple[httpx.Client, str]:
    """An HTTP/2-only client over TLS to the proxy (reverse mode terminates TLS with its CA)."""
    ctx = H2OnlyContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(proxy_conf(proxy) / "mitmproxy-ca-cert.pem"))
    url = proxy.url.replace("http://127.0.0.1", "https://localhost")
    return httpx.Client(http1=False, http2=True, verify=ctx, trust_env=False, timeout=timeout), url


def proxy_address(proxy: ProxyProcess) -> tuple[str, int]:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def proxy(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """This module's own proxy (the plain re-issue, deadline 10 s): faults must not leak into
    other modules' proxies, nor theirs into ours."""
    conf = tmp_path_factory.mktemp("faults")
    with start_proxy(
        *upstream_args(fake_server, pki, conf),
        "--rules",
        str(core_rules(conf)),
    ) as p:
        yield p


@pytest.fixture(scope="module")
def short_proxy(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The same with a 1.5 s deadline, for faults that are about time."""
    conf = tmp_path_factory.mktemp("faults-short")
    with start_proxy(
        *upstream_args(fake_server, pki, conf),
        "--rules",
        str(core_rules(conf, deadline=1.5)),
    ) as p:
        yield p


# ------------------------------------------------------------------ the first attempt fails


@pytest.mark.parametrize(
    "answer",
    [
        Answer(fault="reset"),
        Answer(fault="close"),
        Answer(body=ORIGINAL * 64, fault="reset-mid-body"),
        Answer(body=ORIGINAL, fault="truncate"),
        Answer(body=ORIGINAL, fault="truncate", chunked=True),
    ],
    ids=["reset-before-answer", "close-before-answer", "reset-mid-body", "truncated", "truncated-chunked"],
)
def test_upstream_dies_before_a_complete_answer_gives_mitmproxys_502(proxy, fake: FakeILink, client, answer):
    fake.script(SEND, answer)
    r = post(client, proxy)
    assert r.status_code == 502
    assert b"502 Bad Gateway" in r.content
    assert "x-ilink-fixproxy" not in r.headers
    assert len(fake.sends()) == 1  # no answer to repair: nothing is re-issued, nothing retried
    assert_still_serving(proxy, fake)


@pytest.mark.parametrize(
    "answer",
    [
        Answer(status=500, body=b'{"ret":-2}'),
        Answer(
            status=503,
            body=b"<html>busy</html>",
            headers=(("Content-Type", "text/html"), ("Retry-After", "3")),
        ),
        Answer(status=504, body=b""),
        Answer(body=b'{"ret":-2,"errmsg":"prep'),  # 200, JSON cut short with correct framing
        Answer(body=b"<html>prepare failed</html>", headers=(("Content-Type", "text/html"),)),
        Answer(body=b""),
        Answer(body=b'[{"ret":-2}]'),
        Answer(body=b'{"ret":"-2"}'),  # a string is not the number -2
        Answer(body=b'{"ret":true}'),
        Answer(body=ORIGINAL, headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip"))),
        Answer(
            body=ORIGINAL, headers=(("Content-Type", "application/json"), ("Content-Encoding", "deflate"))
        ),
        Answer(body=b"\x1f\x8b\x08\x00garbage", headers=(("Content-Encoding", "gzip"),)),
        Answer(
            body=ORIGINAL, headers=(("Content-Type", "application/json"), ("Content-Encoding", "x-unknown"))
        ),
    ],
    ids=[
        "http-500-stale-shape",
        "http-503-html",
        "http-504-empty",
        "truncated-json",
        "non-json",
        "empty-body",
        "json-array",
        "ret-as-string",
        "ret-as-bool",
        "claims-gzip-but-plain",
        "claims-deflate-but-plain",
        "broken-gzip",
        "unknown-coding",
    ],
)
def test_an_answer_the_rule_does_not_match_passes_through_byte_for_byte(proxy, fake: FakeILink, answer):
    fake.script(SEND, answer)
    r, wire = post_raw(proxy)
    assert r.status_code == answer.status
    assert wire == answer.body
    sent = {k.lower(): v for k, v in answer.headers}
    for name, value in sent.items():
        assert r.headers[name] == value
    # only the header says something: an empty 200 is iLink accepting without a message_id
    unconfirmed = answer.status == 200 and answer.body == b""
    mark = "unconfirmed; rule=stale-context-token; delivery=unconfirmed; handed=as-is"
    assert r.headers.get("x-ilink-fixproxy") == (mark if unconfirmed else None)
    assert len(fake.sends()) == 1
    assert_still_serving(proxy, fake)


# ------------------------------------------------------------------ encodings and framing


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "deflate-raw", "br"])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_compressed_answers_are_understood_and_handed_back_as_sent(proxy, fake: FakeILink, encoding, chunked):
    first = Answer(body=ORIGINAL, encoding=encoding, chunked=chunked)
    second = Answer(body=SUCCESS, encoding=encoding, chunked=chunked)
    fake.script(SEND, first, second)
    r, wire = post_raw(proxy)
    assert r.status_code == 200
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert r.headers["content-encoding"] == second.content_coding
    assert wire == second.encoded_body()  # still compressed, exactly as iLink sent it
    assert int(r.headers["content-length"]) == len(wire)
    assert "transfer-encoding" not in r.headers  # the re-issue's framing is recomputed
    assert len(fake.sends()) == 2
    assert_still_serving(proxy, fake)


def test_answers_delimited_by_connection_close_are_repaired(proxy, fake: FakeILink):
    # No Content-Length, no chunking: the body ends where iLink closes the connection.
    fake.script(
        SEND, Answer(body=ORIGINAL, fault="close-delimited"), Answer(body=SUCCESS, fault="close-delimited")
    )
    r, wire = post_raw(proxy)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert wire == SUCCESS
    assert int(r.headers["content-length"]) == len(SUCCESS)
    assert len(fake.sends()) == 2
    assert_still_serving(proxy, fake)


def test_a_compressed_request_body_is_never_rewritten(proxy, fake: FakeILink, client):
    # The rule reads JSON; a gzip request body is not JSON to it, so it is forwarded as is.
    import gzip

    body = gzip.compress(send_body(STALE), mtime=0)
    fake.script(SEND, Answer(body=ORIGINAL))
    r = client.post(proxy.url + SEND, content=body, headers={**HEADERS, "Content-Encoding": "gzip"})
    assert r.content == ORIGINAL
    assert "x-ilink-fixproxy" not in r.headers
    (only,) = fake.sends()
    assert only.body == body
    assert_still_serving(proxy, fake)


# ------------------------------------------------------------------ the re-issue fails


@pytest.mark.parametrize(
    "reissue",
    [
        Answer(fault="reset"),
        Answer(fault="close"),
        Answer(body=SUCCESS * 64, fault="reset-mid-body"),
        Answer(body=SUCCESS, fault="truncate"),
        Answer(body=SUCCESS, fault="truncate", chunked=True),
        Answer(status=500, body=b'{"ret":0}'),
        Answer(status=503, body=b"<html>busy</html>", headers=(("Content-Type", "text/html"),)),
        Answer(body=b'{"ret":0,"message_id":"74'),
        Answer(body=b"<html>ok</html>"),
        Answer(body=b'["ok"]'),
        Answer(body=SUCCESS, headers=(("Content-Encoding", "gzip"),)),
        Answer(body=SUCCESS, headers=(("Content-Encoding", "deflate"),)),
        Answer(body=b'{"ret":0,"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'),
        Answer(body=b'{"ret":0,"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}', chunked=True),
        Answer(body=b'{"ret":0,"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}', fault="close-delimited"),
    ],
    ids=[
        "reset",
        "close",
        "reset-mid-body",
        "truncated",
        "truncated-chunked",
        "http-500",
        "http-503",
        "truncated-json",
        "non-json",
        "json-array",
        "broken-gzip",
        "broken-deflate",
        "larger-than-buffer-limit",
        "larger-than-buffer-limit-chunked",
        "larger-than-buffer-limit-close-delimited",
    ],
)
def test_a_failed_reissue_hands_back_the_original_answer(proxy, fake: FakeILink, client, reissue):
    fake.script(
        SEND,
        Answer(body=ORIGINAL, headers=(("Content-Type", "application/json"), ("X-Upstream", "first"))),
        reissue,
    )
    before = proxy.output.count("original answer kept")
    r = post(client, proxy)
    assert r.status_code == 200
    assert r.content == ORIGINAL
    assert r.headers["x-upstream"] == "first"
    assert "x-ilink-fixproxy" not in r.headers
    assert len(fake.sends()) == 2  # exactly one re-issue, never a second one
    assert wait_for(lambda: proxy.output.count("original answer kept") == before + 1)
    assert_still_serving(proxy, fake)


def test_an_empty_200_reissue_answer_is_the_repaired_answer(proxy, fake: FakeILink, client):
    # ilink-protocol.md §1: iLink sometimes acknowledges a send with 200 and no body at all.
    fake.script(SEND, Answer(body=ORIGINAL), Answer(body=b""))
    r = post(client, proxy)
    assert r.status_code == 200 and r.content == b""
    assert "now=200 empty body" in r.headers["x-ilink-fixproxy"]
    assert len(fake.sends()) == 2
    assert_still_serving(proxy, fake)


def test_a_reissue_slower_than_the_deadline_hands_back_the_original(short_proxy, fake: FakeILink, client):
    fake.script(SEND, Answer(body=ORIGINAL), Answer(body=SUCCESS, delay=4))
    started = time.monotonic()
    r = post(client, short_proxy)
    took = time.monotonic() - started
    assert r.content == ORIGINAL
    assert "x-ilink-fixproxy" not in r.headers
    assert took < 3.5, f"held {took:.1f} s with a 1.5 s deadline"
    assert len(fake.sends()) == 2
    assert short_proxy.wait_output("no answer within")
    assert_still_serving(short_proxy, fake)


# ------------------------------------------------------------------ misbehaving clients


@pytest.mark.parametrize("protocol", ["http1", "http2"])
def test_client_that_hangs_up_during_the_reissue(proxy, fake: FakeILink, protocol):
    # The re-issue takes 2 s; the client gives up after 0.5 s and closes its connection
    # (HTTP/1.1) or resets its stream (HTTP/2) while the proxy is still waiting for iLink.
    fake.script(SEND, Answer(body=ORIGINAL), Answer(body=SUCCESS, delay=2))
    before = proxy.output.count("repaired:")
    if protocol == "http1":
        c, base = httpx.Client(trust_env=False, timeout=0.5), proxy.url
    else:
        c, base = h2_client(proxy, timeout=0.5)
    with c, pytest.raises(httpx.TimeoutException):
        c.post(base + SEND, content=send_body(STALE), headers=HEADERS)
    # The re-issue still completes (iLink may have delivered: its answer is logged) and is
    # neither repeated nor retried.
    assert wait_for(lambda: proxy.output.count("repaired:") == before + 1)
    assert len(fake.sends()) == 2
    assert_still_serving(proxy, fake)


def test_slow_client_trickling_its_body_is_repaired(proxy, fake: FakeILink):
    body = send_body(STALE, text="slow " * 200)
    pieces = [body[i : i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]

    def trickle() -> Iterator[bytes]:
        for piece in pieces:
            time.sleep(0.2)  # ~1.4 s for the whole body
            yield piece

    conn = http.client.HTTPConnection(*proxy_address(proxy), timeout=30)
    try:
        conn.request("POST", SEND, body=trickle(), headers={**HEADERS, "Content-Length": str(len(body))})
        resp = conn.getresponse()
        content = resp.read()
        repaired = resp.getheader("x-ilink-fixproxy", "")
    finally:
        conn.close()
    assert resp.status == 200 and content == fake.success_answer
    assert repaired.startswith("repaired")
    first, second = fake.sends()
    assert first.body == body  # buffered whole before anything went upstream
    assert second.body == send_body(None, text="slow " * 200)
    assert_still_serving(proxy, fake)


def test_client_that_disconnects_mid_request_sends_nothing_upstream(proxy, fake: FakeILink):
    body = send_body(STALE)
    head = f"POST {SEND} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(proxy_address(proxy)) as s:
        s.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.2)
    time.sleep(0.3)
    assert fake.sends() == []  # half a request is never forwarded, let alone re-issued
    assert_still_serving(proxy, fake)


def test_client_speaking_garbage_gets_an_error_and_the_proxy_survives(proxy, fake: FakeILink):
    with socket.create_connection(proxy_address(proxy), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 this is not HTTP \r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert not data or data.startswith(b"HTTP/1.1 4")  # mitmproxy's 400, or just a close
    assert fake.requests == []
    assert_still_serving(proxy, fake)


# ------------------------------------------------------------------ large bodies on an API path


def test_a_10mb_request_streams_through_untouched(proxy, fake: FakeILink, client):
    body = send_body(STALE, text="x" * TEN_MB)
    r = post(client, proxy, body)
    assert r.content == fake.stale_answer  # not buffered, so not repairable: passed on as is
    assert "x-ilink-fixproxy" not in r.headers
    (only,) = fake.sends()
    assert only.body == body
    assert_still_serving(proxy, fake)


def test_a_10mb_answer_streams_through_untouched(proxy, fake: FakeILink, client):
    big = json.dumps({"ret": -2, "errmsg": "prepare failed", "pad": "y" * TEN_MB}).encode()
    fake.script(SEND, Answer(body=big))
    r = post(client, proxy)
    assert r.content == big
    assert "x-ilink-fixproxy" not in r.headers
    assert len(fake.sends()) == 1
    assert_still_serving(proxy, fake)


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_a_10mb_chunked_request_streams_through_untouched(proxy, fake: FakeILink, client):
    body = send_body(STALE, text="x" * TEN_MB)
    r = client.post(proxy.url + SEND, content=_chunks(body), headers=HEADERS)  # no Content-Length
    assert r.status_code == 200
    assert_clean(proxy)
    assert [len(s.body) for s in fake.sends()] == [len(body)]  # one attempt, not buffered
    assert "x-ilink-fixproxy" not in r.headers
    assert_still_serving(proxy, fake)


def test_a_10mb_chunked_answer_streams_through_untouched(proxy, fake: FakeILink, client):
    big = json.dumps({"ret": -2, "errmsg": "prepare failed", "pad": "y" * TEN_MB}).encode()
    fake.script(SEND, Answer(body=big, chunked=True))
    r = post(client, proxy)
    assert r.status_code == 200
    assert_clean(proxy)
    assert len(fake.sends()) == 1
    assert r.content == big
    assert_still_serving(proxy, fake)


# ------------------------------------------------------------------ HTTP/2 clients


def test_http2_client_gets_the_original_when_the_reissue_fails(proxy, fake: FakeILink):
    fake.script(SEND, Answer(body=ORIGINAL), Answer(fault="reset"))
    c, base = h2_client(proxy)
    with c:
        r = c.post(base + SEND, content=send_body(STALE), headers=HEADERS)
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200 and r.content == ORIGINAL
        assert "x-ilink-fixproxy" not in r.headers
        assert len(fake.sends()) == 2
        # the same HTTP/2 connection keeps working
        fake.reset()
        r = c.post(base + SEND, content=send_body(STALE), headers=HEADERS)
        assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert_still_serving(proxy, fake)


def test_http2_concurrent_streams_are_each_repaired_once(proxy, fake: FakeILink):
    ids = [f"h2-{i}" for i in range(8)]
    c, base = h2_client(proxy)
    with c, concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        # Open the one HTTP/2 connection first (a getconfig, not a send), so that the eight sends
        # below are streams on it rather than eight threads racing to set connections up.
        assert c.post(base + "/ilink/bot/getconfig", content=b"{}", headers=HEADERS).http_version == "HTTP/2"
        answers = list(
            pool.map(
                lambda cid: c.post(
                    base + SEND, content=send_body(f"{STALE}-{cid}", client_id=cid), headers=HEADERS
                ),
                ids,
            )
        )
    assert {r.http_version for r in answers} == {"HTTP/2"}
    assert all(r.headers["x-ilink-fixproxy"].startswith("repaired") for r in answers)
    assert len(fake.sends()) == 2 * len(ids)
    assert sorted(d.client_id for d in fake.deliveries) == sorted(ids)  # each exactly once
    assert_still_serving(proxy, fake)


# ------------------------------------------------------------------ the upstream cannot be used


def test_upstream_tls_failure_gives_502_and_the_proxy_stays_up(fake: FakeILink, tmp_path: Path):
    # A proxy that trusts another CA than the fake's: the TLS handshake upstream fails.
    other_ca = make_pki(tmp_path / "other-pki").ca_cert
    with (
        start_proxy(
            "--upstream",
            fake.url,
            "--upstream-ca",
            str(other_ca),
            "--confdir",
            str(tmp_path / "c"),
            "--rules",
            str(core_rules(tmp_path)),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        for _ in range(2):  # the second one too: nothing was left broken by the first
            r = post(c, p)
            assert r.status_code == 502
            assert b"certificate" in r.content.lower()
            assert "x-ilink-fixproxy" not in r.headers
        assert fake.requests == []  # no request ever reached the untrusted server
        assert_clean(p)


def test_dead_upstream_gives_502_and_the_proxy_stays_up(tmp_path: Path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        start_proxy(
            "--upstream",
            f"https://127.0.0.1:{port}",
            "--confdir",
            str(tmp_path / "c"),
            "--rules",
            str(core_rules(tmp_path)),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        for _ in range(2):
            r = post(c, p)
            assert r.status_code == 502
            assert "x-ilink-fixproxy" not in r.headers
        assert_clean(p)


# ------------------------------------------------------------------ what is re-sent


# httpx merges its client defaults (Accept, Accept-Encoding, User-Agent) into every request;
# the re-issue removes them so that iLink sees exactly the gateway's headers.
def test_the_reissue_sends_no_header_the_client_did_not_send(proxy, fake: FakeILink):
    body = send_body(STALE)
    head = (
        f"POST {SEND} HTTP/1.1\r\nHost: {proxy.url.removeprefix('http://')}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer x\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection(proxy_address(proxy), timeout=30) as s:
        s.sendall(head.encode() + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert b"X-Ilink-Fixproxy: repaired" in answer
    assert_clean(proxy)
    first, second = fake.sends()
    hop = {"content-length", "connection"}
    assert {k.lower() for k, _ in second.headers} - hop == {k.lower() for k, _ in first.headers} - hop


# ------------------------------------------------------------------ the shipped rules (peer state)
#
# With peer_state the proxy makes the upstream exchange itself (first attempt and re-issue), so
# the same faults take another code path. Every test here is its own gateway: its own bot token,
# peer, client_id and context token, so what the state remembers (stale tokens, closed windows,
# cooldowns per bot) cannot couple tests.


@pytest.mark.parametrize(
    "answer",
    [Answer(fault="reset"), Answer(fault="close"), Answer(body=ORIGINAL, fault="truncate")],
    ids=["reset-before-answer", "close-before-answer", "truncated"],
)
def test_peer_state_upstream_dies_before_answering_gives_502(peer_proxy, fake: FakeILink, answer):
    fake.script(SEND, answer)
    r, _ = Gw().post(peer_proxy)
    assert r.status_code == 502
    assert len(fake.sends()) == 1  # the attempt may have reached iLink: never sent twice
    assert_still_serving(peer_proxy, fake)


@pytest.mark.parametrize(
    "answer",
    [
        Answer(status=503, body=b"<html>busy</html>", headers=(("Content-Type", "text/html"),)),
        Answer(body=b'{"ret":-2,"errmsg":"prep'),
        Answer(body=b""),
        Answer(body=ORIGINAL, headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip"))),
    ],
    ids=["http-503", "truncated-json", "empty-body", "claims-gzip-but-plain"],
)
def test_peer_state_passes_unmatched_answers_through_byte_for_byte(peer_proxy, fake: FakeILink, answer):
    fake.script(SEND, answer)
    r, wire = Gw().post(peer_proxy)
    assert r.status_code == answer.status
    assert wire == answer.body
    assert len(fake.sends()) == 1
    assert_still_serving(peer_proxy, fake)


@pytest.mark.parametrize(
    "first,second",
    [
        (Answer(body=ORIGINAL, encoding="gzip"), Answer(body=SUCCESS, encoding="gzip")),
        (Answer(body=ORIGINAL, encoding="deflate"), Answer(body=SUCCESS, encoding="deflate")),
        (
            Answer(body=ORIGINAL, encoding="br", chunked=True),
            Answer(body=SUCCESS, encoding="br", chunked=True),
        ),
        (Answer(body=ORIGINAL, fault="close-delimited"), Answer(body=SUCCESS, fault="close-delimited")),
    ],
    ids=["gzip", "deflate", "br-chunked", "close-delimited"],
)
def test_peer_state_repairs_whatever_the_encoding_and_framing(peer_proxy, fake: FakeILink, first, second):
    fake.script(SEND, first, second)
    r, wire = Gw().post(peer_proxy)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert wire == second.encoded_body()
    assert r.headers.get("content-encoding") == second.content_coding
    assert int(r.headers["content-length"]) == len(wire)
    assert len(fake.sends()) == 2
    assert_still_serving(peer_proxy, fake)


@pytest.mark.parametrize(
    "reissue",
    [
        Answer(fault="reset"),
        Answer(body=SUCCESS * 64, fault="reset-mid-body"),
        Answer(body=SUCCESS, fault="truncate"),
        Answer(body=b'{"ret":0,"pad":"' + b"x" * (2 * 1024 * 1024) + b'"}'),
        # An unusable answer is a failed re-issue like a reset: not a rate limit (it once was,
        # and three of them cooled the whole bot down for 900 s).
        Answer(status=502, body=b"<html>bad gateway</html>"),
        Answer(body=b'{"ret":0,"message_id":"74'),
    ],
    ids=["reset", "reset-mid-body", "truncated", "larger-than-buffer-limit", "http-502", "truncated-json"],
)
def test_peer_state_failed_reissue_hands_back_the_original_answer(peer_proxy, fake: FakeILink, reissue):
    fake.script(
        SEND,
        Answer(body=ORIGINAL, headers=(("Content-Type", "application/json"), ("X-Upstream", "first"))),
        reissue,
    )
    r, wire = Gw().post(peer_proxy)
    assert_clean(peer_proxy)
    assert len(fake.sends()) == 2
    assert r.status_code == 200 and wire == ORIGINAL
    assert r.headers["x-upstream"] == "first"
    assert "x-ilink-fixproxy" not in r.headers  # the original answer, unchanged
    assert_still_serving(peer_proxy, fake)


def test_peer_state_transient_5xx_on_reissues_do_not_cool_the_bot_down(peer_proxy, fake: FakeILink):
    gateway = Gw()  # one bot, several peers
    for _ in range(3):
        fake.script(SEND, Answer(body=ORIGINAL), Answer(status=502, body=b"<html>bad gateway</html>"))
        gateway.peer, gateway.client_id, gateway.token = (
            f"{x}-{secrets.token_hex(2)}" for x in ("wxid", "cid", "tok")
        )
        r, wire = gateway.post(peer_proxy)
        assert wire == ORIGINAL
    assert_clean(peer_proxy)
    fake.reset()
    fake.fresh_tokens.add("fresh-after-502s")
    gateway.client_id = "cid-fresh-after-502s"
    gateway.token = "fresh-after-502s"
    r, wire = gateway.post(peer_proxy)
    assert len(fake.sends()) == 1, r.headers.get("x-ilink-fixproxy")  # it reached iLink
    assert wire == fake.success_answer and [d.client_id for d in fake.deliveries] == ["cid-fresh-after-502s"]


def test_peer_state_client_hanging_up_then_retrying_is_delivered_once(peer_proxy, fake: FakeILink):
    # The gateway gives up while the re-issue is in flight, then retries the same client_id:
    # the exchange finished without it and the retry is answered from memory, not re-sent.
    gateway = Gw()
    fake.script(SEND, Answer(body=ORIGINAL), Answer(body=SUCCESS, delay=1.5))
    with pytest.raises(httpx.TimeoutException):
        gateway.post(peer_proxy, timeout=0.5)
    assert wait_for(lambda: "repaired" in peer_proxy.output and len(fake.sends()) == 2)
    time.sleep(1.5)  # the delayed answer lands
    r, wire = gateway.post(peer_proxy)
    assert wire == SUCCESS
    assert r.headers["x-ilink-fixproxy"].startswith("replayed")
    assert len(fake.sends()) == 2  # no third upstream attempt
    assert_still_serving(peer_proxy, fake)


def test_peer_state_a_large_first_answer_reaches_the_caller(peer_proxy, fake: FakeILink):
    big = json.dumps({"ret": 0, "pad": "y" * (2 * 1024 * 1024)}).encode()
    fake.script(SEND, Answer(body=big))
    r, wire = Gw().post(peer_proxy)
    assert_clean(peer_proxy)
    assert len(fake.sends()) == 1
    assert r.status_code == 200 and wire == big


def test_peer_state_http2_client_and_upstream_tls_failure(peer_proxy, fake: FakeILink, tmp_path: Path):
    gateway = Gw()
    c, base = h2_client(peer_proxy)
    with c:
        r = c.post(base + SEND, content=gateway.body(), headers=gateway.headers)
    assert r.http_version == "HTTP/2" and r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2
    # A peer-state proxy that does not trust the fake: its own client cannot connect, so the send
    # is handed back to mitmproxy, which answers 502 like for any dead upstream.
    fake.reset()
    other_ca = make_pki(tmp_path / "other").ca_cert
    with (
        start_proxy(
            "--upstream",
            fake.url,
            "--upstream-ca",
            str(other_ca),
            "--confdir",
            str(tmp_path / "c"),
            "--rules",
            str(ROOT / "rules.yaml"),
        ) as p,
    ):
        r, _ = Gw().post(p)
        assert r.status_code == 502
        assert fake.requests == []
        assert_clean(p)
    assert_still_serving(peer_proxy, fake)

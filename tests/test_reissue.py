"""The re-issue client in-process against the real fake iLink over TLS (its own CA): the
connections lent one request at a time, the asyncio network backend under them, and how every
failure maps to "sent" or "certainly not sent" (which decides whether mitmproxy may forward it)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpcore
import httpx
import pytest
from conftest import HEADERS, SEND, send_body
from ilink_fixproxy.reissue import DirectConnection, Lanes, ReissueError, Reissuer, UpstreamTrust
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from mitmproxy import http


def trusting(pki: TestPKI) -> Reissuer:
    reissuer = Reissuer(max_answer_bytes=1 << 20)
    reissuer.configure(UpstreamTrust(ca_file=str(pki.ca_cert)))
    return reissuer


def send_request(url: str) -> http.Request:
    return http.Request.make("POST", url + SEND, send_body(None), HEADERS)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def failure(reissuer: Reissuer, url: str, **send_options: int) -> ReissueError:
    """The ReissueError one send to `url` ends with."""

    async def go() -> ReissueError:
        request = send_request(url)
        with pytest.raises(ReissueError) as caught:
            await reissuer.send(request, request.raw_content or b"", None, 10, **send_options)
        await reissuer.aclose()
        return caught.value

    return run(go())


def lanes_to(reissuer: Reissuer, url: str) -> Lanes[DirectConnection]:
    return reissuer.direct_lanes(httpcore.URL(url).origin)


async def send_in_turn(reissuer: Reissuer, url: str, times: int, pause: float = 0.0) -> list[int]:
    """The statuses of `times` sends to `url`, one after the other."""
    request = send_request(url)
    statuses = []
    for _ in range(times):
        answer = await reissuer.send(request, request.raw_content or b"", None, 10)
        statuses.append(answer.status_code)
        await asyncio.sleep(pause)
    return statuses


def test_sequential_sends_share_one_tls_connection(fake: FakeILink, pki: TestPKI):
    async def go() -> tuple[list[int], int]:
        reissuer = trusting(pki)
        statuses = await send_in_turn(reissuer, fake.url, 3)
        size = lanes_to(reissuer, fake.url).size
        await reissuer.aclose()
        return statuses, size

    statuses, size = run(go())
    assert statuses == [200, 200, 200]
    assert size == 1
    assert len(fake.sends()) == 3
    # exactly the gateway's headers: nothing of httpx's own (Accept, User-Agent ...) added
    sent = {k.lower() for k, _ in fake.sends()[0].headers}
    assert "user-agent" not in sent and "accept" not in sent and "accept-encoding" not in sent
    assert json.loads(fake.sends()[0].body) == json.loads(send_body(None))


def test_concurrent_sends_wait_for_a_free_connection(fake: FakeILink, pki: TestPKI):
    fake.script(SEND, *[Answer(body=b'{"ret":0}', delay=0.2) for _ in range(5)])

    async def go() -> tuple[list[int], int]:
        reissuer = trusting(pki)
        lanes = lanes_to(reissuer, fake.url)
        lanes._max_connections = 2  # a small cap, so three of the five must wait their turn
        request = send_request(fake.url)
        answers = await asyncio.gather(
            *(reissuer.send(request, request.raw_content or b"", None, 10) for _ in range(5))
        )
        size = lanes.size
        await reissuer.aclose()
        return [a.status_code for a in answers], size

    started = time.monotonic()
    statuses, size = run(go())
    assert statuses == [200] * 5
    assert size == 2
    assert time.monotonic() - started >= 0.5  # three rounds of 0.2 s on two connections


def test_waiting_for_a_connection_past_the_deadline_was_never_sent(fake: FakeILink, pki: TestPKI):
    fake.script(SEND, Answer(body=b'{"ret":0}', delay=1.0))

    async def go() -> ReissueError:
        reissuer = trusting(pki)
        lanes_to(reissuer, fake.url)._max_connections = 1
        request = send_request(fake.url)
        slow = asyncio.ensure_future(reissuer.send(request, request.raw_content or b"", None, 10))
        await asyncio.sleep(0.2)
        with pytest.raises(ReissueError) as caught:
            await reissuer.send(request, request.raw_content or b"", None, 0.2)
        await slow
        await reissuer.aclose()
        return caught.value

    error = run(go())
    assert error.sent is False
    assert len(fake.sends()) == 1


def test_a_connection_the_server_closed_is_not_reused(fake: FakeILink, pki: TestPKI):
    # close-delimited: the server answers, then closes the connection; the next send must notice
    # the closed keep-alive connection and open a new one instead of failing.
    fake.script(SEND, Answer(body=b'{"ret":0}', fault="close-delimited"))

    async def go() -> list[int]:
        reissuer = trusting(pki)
        statuses = await send_in_turn(reissuer, fake.url, 2, pause=0.1)
        await reissuer.aclose()
        return statuses

    assert run(go()) == [200, 200]
    assert len(fake.sends()) == 2


@pytest.mark.parametrize(
    ("fault", "sent"),
    [("reset", True), ("close", True), ("reset-mid-body", True), ("truncate", True)],
)
def test_a_broken_answer_counts_as_sent(fake: FakeILink, pki: TestPKI, fault: str, sent: bool):
    fake.script(SEND, Answer(body=b'{"ret":0,"padding":"' + b"x" * 2000 + b'"}', fault=fault))
    assert failure(trusting(pki), fake.url).sent is sent


def test_an_untrusted_certificate_is_never_sent(fake: FakeILink):
    error = failure(Reissuer(max_answer_bytes=1 << 20), fake.url)  # certifi's roots: not the fake's CA
    assert error.sent is False
    assert "certificate" in str(error).lower()
    assert fake.sends() == []


def test_a_refused_connection_is_never_sent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    error = failure(Reissuer(max_answer_bytes=1 << 20), f"https://127.0.0.1:{port}")
    assert error.sent is False and "ConnectError" in str(error)


def test_an_answer_over_the_cap_is_refused(fake: FakeILink, pki: TestPKI):
    fake.script(SEND, Answer(body=b'{"ret":0,"padding":"' + b"x" * 5000 + b'"}'))
    assert "larger than 1000 bytes" in str(failure(trusting(pki), fake.url, max_bytes=1000))


def test_lanes_lend_each_connection_to_one_request_and_close_returned_ones():
    made: list[httpx.AsyncHTTPTransport] = []

    def make() -> httpx.AsyncHTTPTransport:
        made.append(httpx.AsyncHTTPTransport())
        return made[-1]

    async def go() -> None:
        lanes = Lanes(make, max_connections=2, max_idle=1, idle_expiry=60)
        a = await lanes.acquire()
        b = await lanes.acquire()
        assert a is not b and lanes.size == 2
        waiting = asyncio.ensure_future(lanes.acquire())
        await asyncio.sleep(0.01)
        assert not waiting.done()  # both lent: the third request waits
        lanes.release(a)
        assert await waiting is a  # handed straight to the waiter
        lanes.release(a)
        lanes.release(b)  # one idle slot: b is closed
        assert lanes.size == 1
        # a waiter cancelled while waiting does not lose the transport handed to it
        c = await lanes.acquire()
        second = await lanes.acquire()
        waiter = asyncio.ensure_future(lanes.acquire())
        await asyncio.sleep(0.01)
        waiter.cancel()
        lanes.release(c)
        assert lanes.size == 2 and await lanes.acquire() is c
        lanes.close()
        lanes.release(c)
        lanes.release(second)
        assert lanes.size == 0
        with pytest.raises(ReissueError):
            await lanes.acquire()
        await lanes.aclose()

    run(go())
    assert len(made) == 3  # a, b (closed when returned), and one more after b was gone


def test_idle_connections_expire():
    async def go() -> int:
        lanes = Lanes(httpx.AsyncHTTPTransport, max_connections=4, max_idle=4, idle_expiry=0.05)
        first = await lanes.acquire()
        lanes.release(first)
        await asyncio.sleep(0.1)
        fresh = await lanes.acquire()  # the idle one was too old: closed, a new one made
        assert fresh is not first
        lanes.release(fresh)
        size = lanes.size
        await lanes.aclose()
        return size

    assert run(go()) == 1


def test_an_idle_connection_that_is_no_longer_reusable_is_replaced():
    made: list[httpx.AsyncHTTPTransport] = []
    broken: set[int] = set()

    def make() -> httpx.AsyncHTTPTransport:
        made.append(httpx.AsyncHTTPTransport())
        return made[-1]

    async def go() -> None:
        lanes = Lanes(make, idle_expiry=60, reusable=lambda t: id(t) not in broken)
        first = await lanes.acquire()
        lanes.release(first)
        assert await lanes.acquire() is first  # still good: lent again
        lanes.release(first)
        broken.add(id(first))
        second = await lanes.acquire()  # first is closed and replaced
        assert second is not first and lanes.size == 1
        lanes.release(second)
        await lanes.aclose()

    run(go())
    assert len(made) == 2


def test_direct_connections_per_origin(fake: FakeILink, pki: TestPKI):
    # one set of lanes per origin: a send to another host name of the same server opens its own
    async def go() -> tuple[int, int]:
        reissuer = trusting(pki)
        for url in (fake.url, fake.url.replace("localhost", "127.0.0.1")):
            request = send_request(url)
            answer = await reissuer.send(request, request.raw_content or b"", None, 10)
            assert answer.status_code == 200
        sizes = lanes_to(reissuer, fake.url).size, len(reissuer._direct)
        await reissuer.aclose()
        return sizes

    assert run(go()) == (1, 2)

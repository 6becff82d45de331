"""The re-issue's TCP connections (netbackend.connect_tcp) on real sockets, under both task
factories asyncio has: the default one and ``asyncio.eager_task_factory``, which mitmproxy 12 turns
on and under which asyncio's own happy-eyeballs race (``asyncio.staggered``) fails an assertion
on Python before 3.12.8 / 3.13.5 (CPython gh-124309)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpcore
import pytest
from ilink_fixproxy import netbackend

T = TypeVar("T")
TCP = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")

FACTORIES = [
    pytest.param(None, id="default-tasks"),
    pytest.param(
        getattr(asyncio, "eager_task_factory", None),
        id="eager-tasks",
        marks=pytest.mark.skipif(
            not hasattr(asyncio, "eager_task_factory"), reason="eager tasks exist from Python 3.12"
        ),
    ),
]


def run(factory: Any, make: Callable[[], Awaitable[T]]) -> T:
    """`make()` awaited on a new loop whose tasks come from `factory` (None: asyncio's default)."""

    async def main() -> T:
        asyncio.get_running_loop().set_task_factory(factory)
        return await make()

    return asyncio.run(main())


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def listener() -> Iterator[tuple[str, int]]:
    """A loopback port that accepts connections (the kernel completes them; nobody needs to accept)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()


@contextlib.contextmanager
def dead_address() -> Iterator[tuple[str, int]]:
    """A loopback port whose SYNs go unanswered, like a host that is down or a route to nowhere:
    a listener with a full accept queue (backlog 0 plus one connection nobody accepts) makes
    Linux drop every further SYN, so a connect to it just waits."""
    with socket.socket() as s, socket.socket() as filler:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        filler.connect(s.getsockname())
        yield s.getsockname()


@contextlib.contextmanager
def refused_address() -> Iterator[tuple[str, int]]:
    """A loopback port nothing listens on (bound, so no one else takes it): a connect gets RST."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize(
    ("host", "listen_on"),
    [
        ("localhost", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        pytest.param("::1", "::1", marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 here")),
    ],
    ids=["host-name", "ipv4-literal", "ipv6-literal"],
)
def test_a_host_connects_and_carries_bytes(factory: Any, host: str, listen_on: str):
    async def go() -> bytes:
        server = await asyncio.start_server(echo, listen_on, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            stream = await netbackend.connect_tcp(host, port)  # a name is resolved, then raced
            await stream.write(b"ping")
            answer = await stream.read(4)
            await stream.aclose()
            return answer

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    assert run(factory, go) == b"ping"


@pytest.mark.parametrize("factory", FACTORIES)
def test_an_address_that_never_answers_does_not_hold_up_the_next(factory: Any):
    with dead_address() as dead, listener() as live:
        before = open_fds()

        async def go() -> tuple[Any, ...]:
            # The bound only turns a hang into a failure: an address-by-address connect would wait
            # for the kernel to give up on the dead one (about two minutes); the race starts the
            # next address after netbackend's 0.25 s.
            async with asyncio.timeout(60):
                sock = await netbackend._connect_first([(*TCP, dead), (*TCP, live)], 0.25)
            with sock:
                return sock.getpeername()

        assert run(factory, go) == live
        assert open_fds() == before  # the attempt on the dead address was closed, not leaked


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_refused_address_is_followed_by_the_next(factory: Any):
    with refused_address() as refused, listener() as live:

        async def go() -> tuple[Any, ...]:
            # a delay longer than the test's timeout: only the refusal itself can start the next one
            sock = await netbackend._connect_first([(*TCP, refused), (*TCP, live)], 3600)
            with sock:
                return sock.getpeername()

        assert run(factory, go) == live


@pytest.mark.parametrize("factory", FACTORIES)
def test_when_every_address_fails_the_error_says_why(factory: Any):
    with refused_address() as one, refused_address() as two:
        with pytest.raises(httpcore.ConnectError, match=rf"Errno 111.*'127\.0\.0\.1', {one[1]}\)"):
            run(factory, lambda: netbackend.connect_tcp("127.0.0.1", one[1]))
        with pytest.raises(OSError) as caught:
            run(factory, lambda: netbackend._connect_first([(*TCP, one), (*TCP, two)], 0.25))
        assert str(one) in str(caught.value) and str(two) in str(caught.value)  # each address's failure


@pytest.mark.parametrize("factory", FACTORIES)
def test_the_callers_deadline_cancels_every_attempt_and_closes_its_socket(factory: Any):
    with dead_address() as dead, dead_address() as also_dead:
        before = open_fds()

        async def go() -> None:
            async with asyncio.timeout(0.5):
                await netbackend._connect_first([(*TCP, dead), (*TCP, also_dead)], 0.1)

        with pytest.raises(TimeoutError):
            run(factory, go)
        assert open_fds() == before

"""asyncio network streams for httpcore (the engine under httpx), for the re-issue's connections.

Why: httpcore reaches the network through anyio by default, and anyio's streams add an event-loop
round trip (a checkpoint) to every write and a cancel scope to every read and write. On a send
that the proxy performs itself, that was about a fifth of the re-issue's CPU time. mitmproxy
already runs on asyncio, so httpcore gets plain asyncio streams instead, through httpcore's
public ``AsyncNetworkStream`` interface. There is no HTTP in here (h11 still reads and writes
the messages) and no TLS of our own (``asyncio`` and ``ssl`` do it); the stream only moves bytes
and turns socket errors into httpcore's exceptions, as httpcore's own backends do.

Only direct connections use it (``reissue.DirectConnection`` opens them with ``connect_tcp``):
through an upstream proxy (TLS inside a CONNECT tunnel, perhaps inside TLS to the proxy) httpx's
transport keeps httpcore's default backend.

No ``asyncio.timeout`` when httpcore passes no timeout (the caller's deadline bounds the whole
exchange): even an unlimited one costs a task lookup, and on Python 3.11 every lookup of the
running loop is a getpid() system call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import select
import socket
import ssl
import typing

import httpcore

# Like anyio.connect_tcp: try the next address if the first has not connected within 250 ms.
_HAPPY_EYEBALLS_DELAY_S = 0.25
# Writes smaller than this, together, wait for the next read (see AsyncioStream).
_GATHER_WRITES_UP_TO = 64 * 1024


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


class AsyncioStream(httpcore.AsyncNetworkStream):
    """A connection as httpcore sees it. Writes are gathered until the next read (or 64 KiB):
    h11 hands over a request's head and body separately, and two small writes mean two
    syscalls here and two wake-ups at iLink for one request. An HTTP/1.1 client always reads
    after it has written a request, so nothing waits in the buffer for longer than that."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            if self._unsent:
                await self._flush(timeout)
            if timeout is None:  # the usual (see the module docstring)
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as e:  # before OSError: TimeoutError is one
            raise httpcore.ReadTimeout(_why(e)) from e
        except ssl.SSLEOFError:
            return b""  # a TLS peer that hung up without close_notify: an end of stream, as anyio sees it
        except (OSError, RuntimeError) as e:  # RuntimeError: writing to a transport being closed
            raise httpcore.ReadError(_why(e)) from e

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._unsent.append(buffer)
        self._unsent_bytes += len(buffer)
        if self._unsent_bytes < _GATHER_WRITES_UP_TO:
            return
        try:
            await self._flush(timeout)
        except TimeoutError as e:
            raise httpcore.WriteTimeout(_why(e)) from e
        except (OSError, RuntimeError) as e:
            raise httpcore.WriteError(_why(e)) from e

    async def _flush(self, timeout: float | None) -> None:
        data = self._unsent[0] if len(self._unsent) == 1 else b"".join(self._unsent)
        self._unsent.clear()
        self._unsent_bytes = 0
        self._writer.write(data)
        if timeout is None:
            await self._writer.drain()
            return
        async with asyncio.timeout(timeout):
            await self._writer.drain()

    async def aclose(self) -> None:
        # Not awaiting wait_closed(): a TLS peer that never answers close_notify must not hold
        # up the caller; asyncio finishes (or abandons) the shutdown in the background.
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as e:
            self._writer.close()
            raise httpcore.ConnectTimeout(_why(e)) from e
        except (OSError, ssl.SSLError) as e:
            self._writer.close()
            raise httpcore.ConnectError(_why(e)) from e
        return self  # the writer now speaks TLS; the reader reads what it decrypts

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            # httpcore asks this of an idle keep-alive connection: anything readable there means
            # the server closed it (or broke the protocol), so it must not be reused. asyncio
            # reads eagerly, so look at what the reader got as well as at the socket.
            if self._reader.at_eof() or self._reader.exception() is not None:
                return True
            sock = self._writer.get_extra_info("socket")
            if sock is None or sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        if info == "ssl_object":
            return self._writer.get_extra_info("ssl_object")
        if info == "socket":
            return self._writer.get_extra_info("socket")
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        return None


async def connect_tcp(host: str, port: int) -> AsyncioStream:
    """A TCP connection as httpcore's connections take it (no timeout: the caller bounds it)."""
    try:
        sock = await _connect_first(await _resolve(host, port), _HAPPY_EYEBALLS_DELAY_S)
    except OSError as e:
        raise httpcore.ConnectError(_why(e)) from e
    try:
        # asyncio sets TCP_NODELAY on the socket's transport, as anyio does.
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException as e:
        sock.close()
        if isinstance(e, OSError):
            raise httpcore.ConnectError(_why(e)) from e
        raise
    return AsyncioStream(reader, writer)


# Happy eyeballs (RFC 8305) of our own, instead of asyncio's (``open_connection(...,
# happy_eyeballs_delay=...)``): asyncio's runs on ``asyncio.staggered.staggered_race``, which
# before CPython 3.12.8 / 3.13.5 (bug gh-124309) assumed a new task does not start running
# before ``create_task`` returns. mitmproxy 12 installs ``asyncio.eager_task_factory``, under
# which it does, and staggered_race fails an assertion on every connection, with any number of
# addresses. The race below makes no assumption about when a task first runs: every attempt is
# a task, and what happened is read only from ``asyncio.wait``'s answer, so an attempt that
# finished inside ``create_task`` (eagerly) is simply one of the finished ones.
#
# Why a race at all rather than one address after the other: a first address that drops our SYN
# (an IPv6 route that goes nowhere, a dead host in a DNS round-robin) would otherwise hold the
# connection until the kernel gives up (about two minutes), far past any repair's deadline.


_AddrInfo = tuple[int, int, int, str, tuple[typing.Any, ...]]


async def _resolve(host: str, port: int) -> list[_AddrInfo]:
    """The addresses to try, alternating address families from the first one's, as RFC 8305
    (and asyncio's own ``interleave``) do; an IP literal without a trip to the resolver thread."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo() returned no address for {host}")
    by_family: dict[int, list[_AddrInfo]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    rounds = itertools.zip_longest(*by_family.values())
    return [info for batch in rounds for info in batch if info is not None]


async def _connect_one(info: _AddrInfo) -> socket.socket:
    family, type_, proto, _, address = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:  # a failure, or cancelled because another address won: never leak it
        sock.close()
        raise
    return sock


async def _connect_first(infos: list[_AddrInfo], delay: float) -> socket.socket:
    """A socket connected to the first of `infos` that answers. Each address gets `delay` seconds
    on its own; then the next one starts alongside (at once when every running attempt failed).
    The others are cancelled (their sockets closed) as soon as one connects; OSError when every
    address failed, naming each failure."""
    loop = asyncio.get_running_loop()
    waiting = list(reversed(infos))
    running: set[asyncio.Task[socket.socket]] = set()
    errors: list[str] = []
    try:
        while waiting or running:
            if waiting:
                running.add(loop.create_task(_connect_one(waiting.pop())))
            done, running = await asyncio.wait(
                running, timeout=delay if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            connected = [task.result() for task in done if task.exception() is None]
            if connected:
                for extra in connected[1:]:  # two connected in the same turn of the loop
                    extra.close()
                return connected[0]
            for task in done:
                error = task.exception()
                if not isinstance(error, OSError):
                    raise typing.cast(BaseException, error)
                errors.append(_why(error))
            # An attempt failed (start the next address now) or the delay passed (start it
            # alongside); with nothing left to start, wait on for the running ones.
    finally:
        # The others (or all of them, when the caller's deadline cancelled us) are cancelled, and
        # awaited so that their sockets are closed by the time we return.
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for task in running:
            if not task.cancelled() and task.exception() is None:  # connected before the cancel
                task.result().close()
    raise OSError("; ".join(dict.fromkeys(errors)) or "no address to connect to")

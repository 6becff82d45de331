"""Send a repaired request upstream the way mitmproxy itself would, and bring back its answer.

"The way mitmproxy would" means: the same URL mitmproxy connected to, the same headers (minus
the ones that describe the old body or the old connection), the same upstream TLS trust
(``ssl_insecure``, ``ssl_verify_upstream_trusted_ca``/``_confdir``, else certifi like mitmproxy)
and, in upstream mode, the same upstream proxy. The answer's bytes are kept exactly as they came
(still compressed if they came compressed), so what the caller gets is what iLink said.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import certifi
import httpcore
import httpx
from mitmproxy import http

from . import netbackend

# Headers that describe the connection or the framing of the old body, not the request itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


# Parsing a URL is a tenth of httpx's work per request, and a proxy sees the same few (iLink's
# endpoints): keep the parsed forms.
_parsed_url = functools.lru_cache(maxsize=256)(httpx.URL)


@functools.lru_cache(maxsize=256)
def _core_target(url: httpx.URL) -> tuple[httpcore.Origin, httpcore.URL]:
    """The connection a URL needs and the URL as httpcore takes it (httpx's own mapping)."""
    core_url = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
    return core_url.origin, core_url


# Upstream connections per upstream (origin or upstream proxy): at most, kept idle, and how long
# an idle one is kept (httpx's own defaults: 100, 20, 5 s).
MAX_CONNECTIONS = 100
MAX_IDLE_CONNECTIONS = 20
IDLE_EXPIRY_S = 5.0

# Failures that certainly happened before any byte of the request left: the TCP or TLS
# connection could not be made, or (a lent connection found closed) it was never written to.
_NOT_SENT_CORE = (
    httpcore.ConnectError,
    httpcore.ConnectTimeout,
    httpcore.UnsupportedProtocol,
    httpcore.ConnectionNotAvailable,
)
_CORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    *_NOT_SENT_CORE,
)


class ReissueError(Exception):
    """The re-issue produced no usable answer; the caller keeps the original one.

    `sent` is False only when the request certainly never reached the upstream (the connection
    could not be made), so sending it another way cannot deliver it twice.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True)
class UpstreamTrust:
    """mitmproxy's upstream TLS options, mirrored so the re-issue trusts exactly what it trusts."""

    insecure: bool = False
    ca_file: str | None = None
    ca_dir: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            # like mitmproxy's ssl_insecure (and httpx's verify=False): encrypted, nothing checked
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            cafile = self.ca_file or (None if self.ca_dir else certifi.where())
            context = ssl.create_default_context(cafile=cafile, capath=self.ca_dir)
        # HTTP/1.1 only, like mitmproxy's own upstream connections to iLink
        context.set_alpn_protocols(["http/1.1"])
        return context


class Closeable(Protocol):
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=Closeable)


class Lanes(Generic[C]):
    """Connections (or one-connection transports) lent out for one request at a time.

    Why not a pool: httpcore's pool rescans all its connections several times per request
    (quadratic in their number, and every HTTP/1.1 request that finds its connection taken goes
    round again: encode/httpcore#1035, still open in 1.0.9). With 16 sends in flight that
    bookkeeping cost more CPU than mitmproxy's whole forwarding of a send. This class only
    decides which idle connection a request borrows; the HTTP and TLS stay httpcore's.
    `reusable` says whether an idle one may serve again (not closed by the server, say).
    """

    def __init__(
        self,
        make: Callable[[], C],
        max_connections: int = MAX_CONNECTIONS,
        max_idle: int = MAX_IDLE_CONNECTIONS,
        idle_expiry: float = IDLE_EXPIRY_S,
        reusable: Callable[[C], bool] = lambda _: True,
    ) -> None:
        self._make = make
        self._reusable = reusable
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._idle: list[tuple[C, float]] = []  # a stack: the warmest on top
        self._waiters: deque[asyncio.Future[C]] = deque()
        self._count = 0
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        """Connections that exist now, lent out or idle."""
        return self._count

    async def acquire(self) -> C:
        if self._closed:
            raise ReissueError("the re-issue client is closed", sent=False)
        self._expire_idle()
        while self._idle:
            idle = self._idle.pop()[0]
            if self._reusable(idle):
                return idle
            self._discard(idle)
        if self._count < self._max_connections:
            self._count += 1
            return self._make()
        waiter: asyncio.Future[C] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed over just as we were cancelled: pass it on
            raise

    def release(self, conn: C) -> None:
        if self._closed:
            self._discard(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if len(self._idle) < self._max_idle:
            self._idle.append((conn, time.monotonic()))
        else:
            self._discard(conn)

    def close(self) -> None:
        """Close idle connections now and lent ones when they come back (no await needed)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._discard(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ReissueError("the re-issue client was replaced", sent=False))

    async def aclose(self) -> None:
        self.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _expire_idle(self) -> None:
        # The coldest idle connection sits at the bottom of the stack; one unused for a while holds
        # a connection the upstream has probably closed: let it go.
        deadline = time.monotonic() - self._idle_expiry
        while self._idle and self._idle[0][1] < deadline:
            self._discard(self._idle.pop(0)[0])

    def _discard(self, conn: C) -> None:
        self._count -= 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing was ever sent on it, nothing to flush
        task = loop.create_task(conn.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class Reissuer:
    """Sends requests upstream: httpx builds each request, httpcore (httpx's engine) carries it on
    a connection lent to it alone (`Lanes`): one set of lanes per origin for direct connections,
    one httpx transport per lane through an upstream proxy."""

    def __init__(self, max_answer_bytes: int) -> None:
        self.max_answer_bytes = max_answer_bytes
        self._trust = UpstreamTrust()
        self._ssl_context = self._trust.ssl_context()
        # keyed by (scheme, host, port): httpcore.Origin compares by value but cannot be hashed
        self._direct: dict[tuple[bytes, bytes, int], Lanes[DirectConnection]] = {}
        self._proxied: dict[str, Lanes[httpx.AsyncHTTPTransport]] = {}

    def configure(self, trust: UpstreamTrust) -> None:
        """Adopt new TLS options; raises OSError/ssl.SSLError for unreadable CA files."""
        if trust == self._trust:
            return
        self._ssl_context = trust.ssl_context()
        self._trust = trust
        self.close_clients()

    def _all_lanes(self) -> list[Lanes[Any]]:
        """Every set of lanes, forgotten: the next send makes new ones."""
        lanes: list[Lanes[Any]] = [*self._direct.values(), *self._proxied.values()]
        self._direct, self._proxied = {}, {}
        return lanes

    def close_clients(self) -> None:
        for lanes in self._all_lanes():
            lanes.close()

    async def aclose(self) -> None:
        for lanes in self._all_lanes():
            await lanes.aclose()

    def direct_lanes(self, origin: httpcore.Origin) -> Lanes[DirectConnection]:
        key = (origin.scheme, origin.host, origin.port)
        lanes = self._direct.get(key)
        if lanes is None:
            context = self._ssl_context
            lanes = self._direct[key] = Lanes(
                lambda: DirectConnection(origin, context), reusable=DirectConnection.reusable
            )
        return lanes

    def proxied_lanes(self, proxy: str) -> Lanes[httpx.AsyncHTTPTransport]:
        lanes = self._proxied.get(proxy)
        if lanes is None:
            context = self._ssl_context

            def make_transport() -> httpx.AsyncHTTPTransport:
                # A transport, not a Client: a Client adds default headers we would have to take
                # out again, a cookie jar and redirect handling we must not have (the gateway
                # gets iLink's answer as it came).
                return httpx.AsyncHTTPTransport(
                    verify=context,
                    proxy=proxy,
                    trust_env=False,  # HTTPS_PROXY, SSL_CERT_FILE... often point at this very proxy
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                )

            lanes = self._proxied[proxy] = Lanes(make_transport)
        return lanes

    async def send(
        self,
        request: http.Request,
        body: bytes,
        via: tuple[str, tuple[str, int]] | None,
        timeout: float,
        max_bytes: int | None = None,
    ) -> http.Response:
        """Send `request` with `body` instead of its own; ReissueError on any failure.

        `max_bytes` caps the answer (default: the buffer limit); a first attempt that stands in for
        mitmproxy's own forwarding passes a larger cap, since mitmproxy would not refuse it.
        """
        limit = max_bytes or self.max_answer_bytes
        if timeout <= 0:
            raise ReissueError("no time left before the deadline", sent=False)
        headers = [
            (k, v) for k, v in request.headers.fields if k.decode("latin-1").lower() not in _HOP_BY_HOP
        ]
        for k, v in headers:
            if b"\n" in v or b"\r" in v or b"\0" in v:
                # mitmproxy keeps a folded header line (obs-fold) inside the value; h11 refuses to
                # send it (LocalProtocolError, which would read as "maybe sent"). Nothing has gone
                # out: mitmproxy's own forwarding, which writes it as it came, can take the send.
                raise ReissueError(f"header {k.decode('latin-1')} holds a line break (obs-fold)", sent=False)
        url = _parsed_url(request.url)
        lanes: Lanes[Any]
        if via is None:
            origin, core_url = _core_target(url)
            lanes = self.direct_lanes(origin)
        else:
            lanes = self.proxied_lanes(f"{via[0]}://{via[1][0]}:{via[1][1]}")
        started = time.time()
        conn = None
        try:
            async with asyncio.timeout(timeout):
                # Exactly the gateway's headers; httpx adds only Content-Length (and Host if the
                # gateway sent none). No timeout extension: the deadline above bounds it all.
                req = httpx.Request(request.method, url, headers=headers, content=body)
                conn = await lanes.acquire()
                if via is None:
                    answer = await _exchange_direct(conn, core_url, req, body, limit)
                else:
                    answer = await _exchange_proxied(conn, req, limit)
        except TimeoutError:
            # Still waiting for a free connection means nothing was sent.
            raise ReissueError(f"no answer within {timeout:.1f} s", sent=conn is not None) from None
        finally:
            if conn is not None:
                lanes.release(conn)
        status, reason, version, fields, raw = answer
        fields = [(k, v) for k, v in fields if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        fields.append((b"content-length", str(len(raw)).encode()))
        response = http.Response(
            http_version=version,
            status_code=status,
            reason=reason,
            headers=tuple(fields),
            content=None,
            trailers=None,
            timestamp_start=started,
            timestamp_end=time.time(),
        )
        response.raw_content = bytes(raw)
        return response


# status, reason, HTTP version, header fields, body
_Answer = tuple[int, bytes, bytes, list[tuple[bytes, bytes]], bytearray]


class DirectConnection:
    """One HTTP/1.1 connection straight to an origin, opened by its first request.

    httpcore's own ``AsyncHTTPConnection`` does the same plus what we never use (HTTP/2, Unix
    sockets, connect retries, tracing), behind one more anyio lock: each of those costs an
    event-loop turn and, on Python 3.11, a getpid() system call per lock operation. The HTTP is
    httpcore's ``AsyncHTTP11Connection`` (h11), the TLS is ``ssl``'s, the sockets are asyncio's.
    """

    def __init__(self, origin: httpcore.Origin, ssl_context: ssl.SSLContext) -> None:
        self._origin = origin
        self._ssl_context = ssl_context
        self._http: httpcore.AsyncHTTP11Connection | None = None
        self._failed = False

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._http is None:
            try:
                stream = await self._connect()
            except BaseException:
                self._failed = True
                raise
            self._http = httpcore.AsyncHTTP11Connection(self._origin, stream)
        return await self._http.handle_async_request(request)

    async def _connect(self) -> httpcore.AsyncNetworkStream:
        host = self._origin.host.decode("ascii")
        stream = await netbackend.connect_tcp(host, self._origin.port)
        if self._origin.scheme == b"https":
            # SNI and certificate checks for the origin's name, as httpcore does (ALPN offers
            # http/1.1 only: see UpstreamTrust.ssl_context)
            stream = await stream.start_tls(self._ssl_context, server_hostname=host)
        return stream

    def reusable(self) -> bool:
        """Whether it may carry another request: not failed or closed, and the server did not
        hang up while it sat idle (httpcore looks for anything readable on an idle socket)."""
        if self._http is None:
            return not self._failed
        return not self._http.is_closed() and not self._http.has_expired()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


async def _read_all(
    stream: AsyncIterable[bytes], aclose: Callable[[], Awaitable[None]], limit: int
) -> bytearray:
    """The answer's body, refused past `limit` bytes; the answer is closed either way."""
    try:
        raw = bytearray()
        async for chunk in stream:
            raw += chunk
            if len(raw) > limit:
                raise ReissueError(f"answer larger than {limit} bytes")
        return raw
    finally:
        await aclose()


def _reissue_error(e: Exception, *, sent: bool) -> ReissueError:
    # (httpx re-raises each httpcore error as its namesake: messages read the same on both paths)
    return ReissueError(f"{type(e).__name__}: {e or 'connection failed'}", sent=sent)


async def _exchange_direct(
    conn: DirectConnection, url: httpcore.URL, req: httpx.Request, body: bytes, limit: int
) -> _Answer:
    # What httpx's transport does with a request, minus its pool (see Lanes).
    core_req = httpcore.Request(req.method, url, headers=req.headers.raw, content=body)
    try:
        answer = await conn.handle_async_request(core_req)
        raw = await _read_all(answer.stream, answer.aclose, limit)  # type: ignore[arg-type]
    except _NOT_SENT_CORE as e:
        raise _reissue_error(e, sent=False) from None
    except _CORE_ERRORS as e:
        raise _reissue_error(e, sent=True) from None
    reason, version = answer.extensions.get("reason_phrase", b""), answer.extensions.get("http_version", b"")
    return answer.status, reason, version or b"HTTP/1.1", answer.headers, raw


async def _exchange_proxied(transport: httpx.AsyncHTTPTransport, req: httpx.Request, limit: int) -> _Answer:
    try:
        answer = await transport.handle_async_request(req)
        raw = await _read_all(answer.stream, answer.aclose, limit)  # type: ignore[arg-type]
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as e:
        raise _reissue_error(e, sent=False) from None
    except httpx.HTTPError as e:
        raise _reissue_error(e, sent=True) from None
    reason = answer.reason_phrase.encode("ascii", "replace")
    return answer.status_code, reason, answer.http_version.encode("ascii", "replace"), answer.headers.raw, raw

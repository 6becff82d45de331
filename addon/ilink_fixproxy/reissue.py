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
from collections.abc import Callable
from dataclasses import dataclass

import certifi
import httpx
from mitmproxy import http

from .netbackend import use_asyncio_backend

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

# Upstream connections per upstream proxy: at most, kept idle, and how long an idle one is kept
# (httpx's own defaults: 100, 20, 5 s).
MAX_CONNECTIONS = 100
MAX_IDLE_CONNECTIONS = 20
IDLE_EXPIRY_S = 5.0


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

    def ssl_context(self) -> ssl.SSLContext | bool:
        if self.insecure:
            return False
        cafile = self.ca_file or (None if self.ca_dir else certifi.where())
        return ssl.create_default_context(cafile=cafile, capath=self.ca_dir)


class TransportLanes:
    """httpx transports with one connection each, lent out for one request at a time.

    Why not one transport with a pool of connections: httpcore's pool rescans all its
    connections several times per request (quadratic in their number, and every HTTP/1.1 request
    that finds its connection taken goes round again: encode/httpcore#1035, still open in
    1.0.9). With 16 sends in flight that bookkeeping cost more CPU than mitmproxy's whole
    forwarding of a send. A transport that owns a single connection has nothing to scan; this
    class only decides which idle one a request borrows, the HTTP and TLS stay httpx's.
    """

    def __init__(
        self,
        make_transport: Callable[[], httpx.AsyncHTTPTransport],
        max_transports: int = MAX_CONNECTIONS,
        max_idle: int = MAX_IDLE_CONNECTIONS,
        idle_expiry: float = IDLE_EXPIRY_S,
    ) -> None:
        self._make = make_transport
        self._max_transports = max_transports
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._idle: list[tuple[httpx.AsyncHTTPTransport, float]] = []  # a stack: the warmest on top
        self._waiters: deque[asyncio.Future[httpx.AsyncHTTPTransport]] = deque()
        self._count = 0
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        """Transports that exist now, lent out or idle."""
        return self._count

    async def acquire(self) -> httpx.AsyncHTTPTransport:
        if self._closed:
            raise ReissueError("the re-issue client is closed", sent=False)
        self._expire_idle()
        if self._idle:
            return self._idle.pop()[0]
        if self._count < self._max_transports:
            self._count += 1
            return self._make()
        waiter: asyncio.Future[httpx.AsyncHTTPTransport] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed over just as we were cancelled: pass it on
            raise

    def release(self, transport: httpx.AsyncHTTPTransport) -> None:
        if self._closed:
            self._discard(transport)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(transport)
                return
        if len(self._idle) < self._max_idle:
            self._idle.append((transport, time.monotonic()))
        else:
            self._discard(transport)

    def close(self) -> None:
        """Close idle transports now and lent ones when they come back (no await needed)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for transport, _ in idle:
            self._discard(transport)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ReissueError("the re-issue client was replaced", sent=False))

    async def aclose(self) -> None:
        self.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _expire_idle(self) -> None:
        # The coldest idle transport sits at the bottom of the stack; one unused for a while holds
        # a connection the upstream has probably closed: let it go.
        deadline = time.monotonic() - self._idle_expiry
        while self._idle and self._idle[0][1] < deadline:
            self._discard(self._idle.pop(0)[0])

    def _discard(self, transport: httpx.AsyncHTTPTransport) -> None:
        self._count -= 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: nothing was ever sent on it, nothing to flush
        task = loop.create_task(transport.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class Reissuer:
    """Sends requests upstream with httpx, one set of lanes per upstream proxy (usually just one)."""

    def __init__(self, max_answer_bytes: int) -> None:
        self.max_answer_bytes = max_answer_bytes
        self._trust = UpstreamTrust()
        self._verify: ssl.SSLContext | bool = UpstreamTrust().ssl_context()
        self._lanes: dict[str | None, TransportLanes] = {}

    def configure(self, trust: UpstreamTrust) -> None:
        """Adopt new TLS options; raises OSError/ssl.SSLError for unreadable CA files."""
        if trust == self._trust:
            return
        self._verify = trust.ssl_context()
        self._trust = trust
        self.close_clients()

    def close_clients(self) -> None:
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            lane.close()

    async def aclose(self) -> None:
        lanes, self._lanes = self._lanes, {}
        for lane in lanes.values():
            await lane.aclose()

    def _lanes_for(self, proxy: str | None) -> TransportLanes:
        lanes = self._lanes.get(proxy)
        if lanes is None:
            verify = self._verify

            def make_transport() -> httpx.AsyncHTTPTransport:
                # A transport, not a Client: a Client adds default headers we would have to take
                # out again, a cookie jar and redirect handling we must not have (the gateway
                # gets iLink's answer as it came), and costs a fifth of a send's CPU doing so.
                transport = httpx.AsyncHTTPTransport(
                    verify=verify,
                    proxy=proxy,
                    trust_env=False,  # HTTPS_PROXY, SSL_CERT_FILE... often point at this very proxy
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                )
                if proxy is None:
                    use_asyncio_backend(transport)
                return transport

            lanes = self._lanes[proxy] = TransportLanes(make_transport)
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
        proxy = f"{via[0]}://{via[1][0]}:{via[1][1]}" if via else None
        lanes = self._lanes_for(proxy)
        started = time.time()
        transport: httpx.AsyncHTTPTransport | None = None
        try:
            async with asyncio.timeout(timeout):
                # Exactly the gateway's headers; httpx adds only Content-Length (and Host if the
                # gateway sent none). No timeout extension: the deadline above bounds it all.
                req = httpx.Request(request.method, _parsed_url(request.url), headers=headers, content=body)
                transport = await lanes.acquire()
                answer = await transport.handle_async_request(req)
                try:
                    raw = bytearray()
                    async for chunk in answer.stream:
                        raw += chunk
                        if len(raw) > limit:
                            raise ReissueError(f"answer larger than {limit} bytes")
                finally:
                    await answer.aclose()
        except TimeoutError:
            # Still waiting for a free connection means nothing was sent.
            raise ReissueError(f"no answer within {timeout:.1f} s", sent=transport is not None) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as e:
            raise ReissueError(f"{type(e).__name__}: {e or 'connection failed'}", sent=False) from None
        except httpx.HTTPError as e:
            raise ReissueError(f"{type(e).__name__}: {e or 'connection failed'}") from None
        finally:
            if transport is not None:
                lanes.release(transport)

        fields = [(k, v) for k, v in answer.headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        fields.append((b"content-length", str(len(raw)).encode()))
        response = http.Response(
            http_version=answer.http_version.encode("ascii", "replace"),
            status_code=answer.status_code,
            reason=answer.reason_phrase.encode("ascii", "replace"),
            headers=tuple(fields),
            content=None,
            trailers=None,
            timestamp_start=started,
            timestamp_end=time.time(),
        )
        response.raw_content = bytes(raw)
        return response

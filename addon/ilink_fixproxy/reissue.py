"""Send a repaired request upstream the way mitmproxy itself would, and bring back its answer.

"The way mitmproxy would" means: the same URL mitmproxy connected to, the same headers (minus
the ones that describe the old body or the old connection), the same upstream TLS trust
(``ssl_insecure``, ``ssl_verify_upstream_trusted_ca``/``_confdir``, else certifi like mitmproxy)
and, in upstream mode, the same upstream proxy. The answer's bytes are kept exactly as they came
(still compressed if they came compressed), so what the caller gets is what iLink said.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import certifi
import httpx
from mitmproxy import http

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


_HTTPX_DEFAULTS = ("accept", "accept-encoding", "user-agent")


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


class Reissuer:
    """One pooled httpx client per upstream proxy (usually just one), shared by all repairs."""

    def __init__(self, max_answer_bytes: int) -> None:
        self.max_answer_bytes = max_answer_bytes
        self._trust = UpstreamTrust()
        self._verify: ssl.SSLContext | bool = UpstreamTrust().ssl_context()
        self._clients: dict[str | None, httpx.AsyncClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def configure(self, trust: UpstreamTrust) -> None:
        """Adopt new TLS options; raises OSError/ssl.SSLError for unreadable CA files."""
        if trust == self._trust:
            return
        self._verify = trust.ssl_context()
        self._trust = trust
        self.close_clients()

    def close_clients(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                continue  # no loop: nothing was ever sent on it, nothing to flush
            task = loop.create_task(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    def _client(self, proxy: str | None) -> httpx.AsyncClient:
        client = self._clients.get(proxy)
        if client is None:
            client = httpx.AsyncClient(
                verify=self._verify,
                proxy=proxy,
                trust_env=False,  # HTTPS_PROXY etc. often point at this very proxy
                follow_redirects=False,
                timeout=None,  # the caller's deadline bounds every re-issue instead
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
            self._clients[proxy] = client
        return client

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
        client = self._client(proxy)
        started = time.time()
        try:
            async with asyncio.timeout(timeout):
                req = client.build_request(request.method, request.url, headers=headers, content=body)
                # httpx adds its own defaults (Accept, Accept-Encoding, User-Agent); send exactly
                # the gateway's headers instead.
                for name in _HTTPX_DEFAULTS:
                    if name in req.headers and name not in request.headers:
                        del req.headers[name]
                if "connection" in req.headers:  # httpx's; keep-alive is HTTP/1.1's default anyway
                    del req.headers["connection"]
                answer = await client.send(req, stream=True)
                try:
                    raw = bytearray()
                    async for chunk in answer.aiter_raw():
                        raw += chunk
                        if len(raw) > limit:
                            raise ReissueError(f"answer larger than {limit} bytes")
                finally:
                    await answer.aclose()
        except TimeoutError:
            raise ReissueError(f"no answer within {timeout:.1f} s") from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as e:
            raise ReissueError(f"{type(e).__name__}: {e or 'connection failed'}", sent=False) from None
        except httpx.HTTPError as e:
            raise ReissueError(f"{type(e).__name__}: {e or 'connection failed'}") from None

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

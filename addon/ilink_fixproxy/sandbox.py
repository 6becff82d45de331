"""A fake iLink bot API on loopback, for ``ilink-fixproxy demo`` and the test-suite.

It models the one behaviour the proxy exists for: ``sendmessage`` with a context_token the
server no longer considers live is refused with ``{"ret":-2,"errmsg":"prepare failed"}``, while
a fresh token (handed out with an inbound message on ``getupdates``) or, depending on a flag, no
token at all is delivered. Tests can also script exact answers per path, including transport
faults (connection reset, truncated body), delays, gzip and chunked framing, to see how the
proxy copes with a misbehaving upstream.

It speaks real HTTP/1.1 over real sockets (optionally TLS with a throw-away test CA), so the
proxy, httpx and mitmproxy are exercised exactly as against the real service.

Run ``python -m ilink_fixproxy.sandbox [--tls-dir DIR] [--port N]`` for manual experiments.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import gzip as gzip_module
import http.server
import ipaddress
import json
import os
import secrets
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SEND_PATH = "/ilink/bot/sendmessage"
UPDATES_PATH = "/ilink/bot/getupdates"
CONFIG_PATH = "/ilink/bot/getconfig"
TYPING_PATH = "/ilink/bot/sendtyping"

#: The bot's own id, used as ``to_user_id`` of inbound messages.
BOT_USER_ID = "fake-bot@im.bot"
#: First inbound ``message_id``; above 2**53 so that a float round-trip would corrupt it.
FIRST_MESSAGE_ID = 7489534892789344264
#: A delivered send's answer: iLink's evidence of delivery is the message_id (above 2**53 too).
SUCCESS_ANSWER = b'{"ret":0,"message_id":7489534892789345001}'
#: What iLink answers for a send it accepts and never delivers (a "silent drop").
SILENT_DROP_ANSWER = b'{"ret":0}'

_HANDSHAKE_TIMEOUT = 10.0  # a client that never finishes TLS must not pin a thread forever
_IDLE_TIMEOUT = 120.0  # idle keep-alive connections are dropped after this
_MAX_BODY = 64 * 1024 * 1024
_TRUNCATE_MISSING = 64  # how many promised body bytes a "truncate" fault never sends
# A "reset-mid-body" fault pauses this long after the first half of the body before the RST, so
# the client has certainly read the status line and headers: the failure is mid-body, not before.
_MID_BODY_PAUSE = 0.05
FAULTS = (None, "reset", "truncate", "reset-mid-body", "close", "close-delimited")
ENCODINGS = (None, "gzip", "deflate", "deflate-raw", "br")
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})


# --------------------------------------------------------------------------------------------
# Test PKI


@dataclass(frozen=True)
class TestPKI:
    """A throw-away CA and a localhost server certificate signed by it (PEM files)."""

    __test__ = False  # not a pytest test class, despite the name

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file that is 0600 from the first byte (no chmod race)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply when the file already existed


_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A KeyUsage extension allowing only `allowed` (x509.KeyUsage wants every flag spelled out)."""
    return x509.KeyUsage(**{usage: usage in allowed for usage in _KEY_USAGES})


def make_pki(directory: Path) -> TestPKI:
    """Create a test CA and a server certificate for localhost/127.0.0.1/::1 in ``directory``.

    The extensions are the ones OpenSSL 3's strict verification and mitmproxy insist on. The
    CA's private key is never written: nobody can mint further certificates from this CA.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ilink-fixproxy sandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ilink-fixproxy test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage("key_cert_sign", "crl_sign"),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage("digital_signature"),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pki = TestPKI(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
    )
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        pki.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return pki


# --------------------------------------------------------------------------------------------
# Records and scripts


@dataclass(frozen=True)
class Answer:
    """A scripted answer, consumed by the next request on a matching path.

    ``fault="reset"`` closes the connection with an RST and no response; ``fault="truncate"``
    promises more body bytes (Content-Length, or a missing last chunk when ``chunked``) than it
    sends before closing. ``fault="reset-mid-body"`` sends the status line, the headers and the
    first half of the (encoded, framed) body, then an RST; ``fault="close"`` closes the
    connection cleanly (TLS close_notify and FIN) without any response;
    ``fault="close-delimited"`` is no fault but rare framing: no Content-Length (unless
    ``chunked``), the body ends where the server closes the connection. Content-Length/
    Transfer-Encoding in ``headers`` are ignored: framing is always derived from
    ``gzip``/``encoding``/``chunked``/``fault``.

    ``encoding`` compresses the body and sets ``Content-Encoding``: ``"gzip"`` (the same as
    ``gzip=True``), ``"deflate"`` (zlib-wrapped, RFC 9110), ``"deflate-raw"`` (sent as
    ``deflate`` without the zlib wrapper, as some servers do) or ``"br"``.

    ``deliver=True`` (sendmessage only): the send first goes through the fake's model (so it is
    delivered if the model would deliver it) and only then gets this answer: a delivery whose
    answer is lost (``fault="reset"``), slow (``delay``) or misleading (a 503 after delivering).
    A scripted answer without it never delivers, like an iLink that refused before delivering.
    """

    status: int = 200
    body: bytes = b"{}"
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    delay: float = 0.0
    fault: str | None = None
    gzip: bool = False
    chunked: bool = False
    encoding: str | None = None
    deliver: bool = False

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (one of {', '.join(map(repr, FAULTS))})")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r} (one of {', '.join(map(repr, ENCODINGS))})")
        if self.gzip and self.encoding not in (None, "gzip"):
            raise ValueError(f"gzip=True contradicts encoding={self.encoding!r}")

    @property
    def content_coding(self) -> str | None:
        """The Content-Encoding value this answer is sent with (None: identity)."""
        if self.gzip or self.encoding == "gzip":
            return "gzip"
        return "deflate" if self.encoding == "deflate-raw" else self.encoding

    def encoded_body(self) -> bytes:
        """The body as it goes on the wire (before chunking): compressed per ``encoding``."""
        if self.gzip or self.encoding == "gzip":
            return gzip_module.compress(self.body, mtime=0)
        if self.encoding == "deflate":
            return zlib.compress(self.body)
        if self.encoding == "deflate-raw":
            raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            return raw.compress(self.body) + raw.flush()
        if self.encoding == "br":
            import brotli  # mitmproxy depends on it; imported late as only br answers need it

            return bytes(brotli.compress(self.body))
        return self.body


@dataclass(frozen=True)
class Recorded:
    """One request the fake received, and what it did with it."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    json: Any | None
    context_token: str | None
    client_id: str | None
    answered: str
    time: float


@dataclass(frozen=True)
class Delivery:
    """A message the fake "delivered" to a WeChat user."""

    to_user_id: str
    client_id: str | None
    text: str
    context_token: str | None
    body: bytes


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _send_fields(doc: Any) -> tuple[dict[str, Any], str | None, str | None]:
    """(msg, context_token, client_id) of a sendmessage body; absent, null and "" mean no token."""
    msg = doc.get("msg") if isinstance(doc, dict) else None
    if not isinstance(msg, dict):
        return {}, None, None
    token = msg.get("context_token")
    if token is None or token == "":
        token_str = None
    else:
        token_str = token if isinstance(token, str) else json.dumps(token)
    client_id = msg.get("client_id")
    return msg, token_str, client_id if isinstance(client_id, str) else None


def _path_only(target: str) -> str:
    """The path of a request target without its query (also for absolute-form targets)."""
    path = target.split("?", 1)[0]
    return (urlsplit(target).path or "/") if "://" in path else path


def _message_text(msg: dict[str, Any]) -> str:
    parts: list[str] = []
    items = msg.get("item_list")
    for item in items if isinstance(items, list) else ():
        text_item = item.get("text_item") if isinstance(item, dict) else None
        text = text_item.get("text") if isinstance(text_item, dict) else None
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


class _BadRequest(Exception):
    """The request's framing is broken; answer 400 and drop the connection."""


# --------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(http.server.ThreadingHTTPServer):
    """Threaded HTTP/1.1 server; TLS is negotiated in the worker thread, never in accept()."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        fake: FakeILink,
        ssl_context: ssl.SSLContext | None,
        family: socket.AddressFamily,
    ) -> None:
        self.address_family = family
        self.fake = fake
        self.ssl_context = ssl_context
        self._conns: set[socket.socket] = set()
        self._resets: set[socket.socket] = set()  # connections a "reset" fault must RST
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn: socket.socket = request
        with self._conns_lock:
            self._conns.add(conn)
        try:
            if self.ssl_context is not None:
                conn.settimeout(_HANDSHAKE_TIMEOUT)
                try:
                    tls = self.ssl_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=True)
                except OSError:  # includes ssl.SSLError: untrusting or aborting clients
                    return
                with self._conns_lock:
                    self._conns.discard(conn)
                    self._conns.add(tls)
                conn = tls
            if self.fake._stopping.is_set():
                return
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
                reset = conn in self._resets
                self._resets.discard(conn)
            if not reset:
                self._close_gracefully(conn)
            conn.close()

    @staticmethod
    def _close_gracefully(conn: socket.socket) -> None:
        """TLS close_notify (without waiting for the peer's), then FIN."""
        if isinstance(conn, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                conn.setblocking(False)
                conn.unwrap()
        with contextlib.suppress(OSError):
            socket.socket.shutdown(conn, socket.SHUT_WR)

    def mark_reset(self, conn: socket.socket) -> None:
        """Make closing ``conn`` send an RST (SO_LINGER 0) instead of a FIN."""
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._conns_lock:
            self._resets.add(conn)

    def shutdown_request(self, request: Any) -> None:
        # finish_request already shut the connection down the right way (FIN or RST).
        with contextlib.suppress(OSError):
            request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that abort mid-request are expected (fault tests); never print tracebacks."""

    def drop_connections(self) -> None:
        """Wake every worker blocked on a socket so stop() does not wait for idle clients."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(conn, socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = _IDLE_TIMEOUT
    server: _Server

    def version_string(self) -> str:
        return "FakeILink/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request stderr log."""

    def _read_body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te is not None:
            codings = [c.strip().lower() for c in te.split(",") if c.strip()]
            if not codings or codings[-1] != "chunked":
                raise _BadRequest(f"unsupported Transfer-Encoding {te!r}")
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit() or int(length) > _MAX_BODY:
            raise _BadRequest(f"bad Content-Length {length!r}")
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise _BadRequest("body shorter than Content-Length")
        return body

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(65537)
            if not line.endswith(b"\n"):
                raise _BadRequest("bad chunk size line")
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                raise _BadRequest("bad chunk size")
            size = int(size_text, 16)
            if len(body) + size > _MAX_BODY:
                raise _BadRequest("chunk too large")
            if size == 0:
                break
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BadRequest("truncated chunk")
            body += chunk
        while True:  # trailer section, ended by an empty line
            line = self.rfile.readline(65537)
            if not line:
                raise _BadRequest("missing end of chunked body")
            if line in (b"\r\n", b"\n"):
                return bytes(body)

    def _handle(self) -> None:
        try:
            body = self._read_body()
        except _BadRequest as exc:
            self.close_connection = True
            self._write(
                400, _json_bytes({"ret": -1, "errmsg": str(exc)}), (("Content-Type", "application/json"),)
            )
            return
        answer = self.server.fake._respond(self.command, self.path, tuple(self.headers.items()), body)
        if answer is None:  # stopping
            self.close_connection = True
            return
        self._send_answer(answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _handle

    def _send_answer(self, answer: Answer) -> None:
        fake = self.server.fake
        if answer.delay > 0 and fake._stopping.wait(answer.delay):
            self.close_connection = True
            return
        if answer.fault == "reset":
            self.close_connection = True
            self.server.mark_reset(self.connection)
            return
        if answer.fault == "close":
            self.close_connection = True  # finish_request then closes gracefully: no response at all
            return
        coding = answer.content_coding
        body = answer.encoded_body()
        headers = tuple(
            (k, v)
            for k, v in answer.headers
            if k.lower() not in _FRAMING_HEADERS and not (coding and k.lower() == "content-encoding")
        )
        if coding:
            headers += (("Content-Encoding", coding),)
        self._write(
            answer.status,
            body,
            headers,
            chunked=answer.chunked,
            truncate=answer.fault == "truncate",
            cut=answer.fault == "reset-mid-body",
            close_delimited=answer.fault == "close-delimited",
        )

    def _write(
        self,
        status: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...],
        *,
        chunked: bool = False,
        truncate: bool = False,
        cut: bool = False,
        close_delimited: bool = False,
    ) -> None:
        head = self.command == "HEAD"
        if truncate or cut or close_delimited:
            self.close_connection = True
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not close_delimited:
            self.send_header("Content-Length", str(len(body) + (_TRUNCATE_MISSING if truncate else 0)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()  # writes the buffered status line and headers
        if head:
            return
        if not chunked:
            self._write_body(body, cut)
            return
        step = max(1, -(-len(body) // 3))  # a few chunks, so the client really de-chunks
        out = bytearray()
        for start in range(0, len(body), step):
            piece = body[start : start + step]
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
        if not truncate:
            out += b"0\r\n\r\n"
        self._write_body(bytes(out), cut)

    def _write_body(self, data: bytes, cut: bool) -> None:
        """Write the framed body; ``cut``: only its first half, then reset the connection."""
        if not cut:
            self.wfile.write(data)
            return
        self.wfile.write(data[: len(data) // 2])
        self.server.fake._stopping.wait(_MID_BODY_PAUSE)
        self.server.mark_reset(self.connection)


# --------------------------------------------------------------------------------------------
# The fake


class FakeILink:
    """A fake iLink server: a stale-token model plus per-path scripted answers.

    ``fresh_tokens``, ``stale_answer``, ``success_answer``, ``tokenless_delivers``,
    ``longpoll_seconds``, ``dropping_peers`` and ``budget_peers`` are plain attributes tests may
    change at any time; ``reset()`` restores the constructor's values. Sends to a peer in
    ``dropping_peers`` are answered ``{"ret":0}`` (no message_id) and never delivered, whatever
    their token. A peer in ``budget_peers`` (peer -> N) takes N delivered sends per inbound
    message (``push_inbound`` from it): every further send, with any token or none, is refused
    with ``stale_answer`` (``ret=-2``) until it writes again (ilink-protocol.md §8).
    """

    def __init__(
        self,
        pki: TestPKI | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        stale_answer: bytes = b'{"ret":-2,"errmsg":"prepare failed"}',
        success_answer: bytes = SUCCESS_ANSWER,
        tokenless_delivers: bool = True,
        longpoll_seconds: float = 1.0,
    ) -> None:
        self.pki = pki
        self.host = host
        self._requested_port = port
        self._defaults = (stale_answer, success_answer, tokenless_delivers, longpoll_seconds)
        self.stale_answer = stale_answer
        self.success_answer = success_answer
        self.tokenless_delivers = tokenless_delivers
        self.longpoll_seconds = longpoll_seconds
        self.fresh_tokens: set[str] = set()
        self.dropping_peers: set[str] = set()
        self.budget_peers: dict[str, int] = {}
        self._budget_used: dict[str, int] = {}  # budget peer -> sends delivered since it wrote

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the same lock; waits for inbound/stop
        self._stopping = threading.Event()
        self._requests: list[Recorded] = []
        self._deliveries: list[Delivery] = []
        self._scripts: dict[str, deque[Answer]] = {}
        self._inbound: list[dict[str, Any]] = []
        self._next_seq = 1
        self._cursor = self._new_cursor()

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeILink has not been started")
        return self._port

    @property
    def url(self) -> str:
        if self.pki is not None:
            return f"https://localhost:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> FakeILink:
        """Bind and serve on a daemon thread; returns self so ``with FakeILink().start()`` works."""
        if self._server is not None:
            raise RuntimeError("FakeILink is already running")
        context: ssl.SSLContext | None = None
        if self.pki is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.pki.server_cert), str(self.pki.server_key))
            context.set_alpn_protocols(["http/1.1"])  # no h2: keep mitmproxy on HTTP/1.1
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._stopping.clear()
        server = _Server((self.host, self._requested_port), self, context, family)
        self._server, self._port = server, server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeILink:{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: wake long-polls and delays, drop open connections, close the socket."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeILink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything tests did, so one running fake can serve many tests."""
        with self._lock:
            self._requests.clear()
            self._deliveries.clear()
            self._scripts.clear()
            self._inbound.clear()
            self.fresh_tokens.clear()
            self.dropping_peers.clear()
            self.budget_peers.clear()
            self._budget_used.clear()
            (self.stale_answer, self.success_answer, self.tokenless_delivers, self.longpoll_seconds) = (
                self._defaults
            )

    def script(self, path_suffix: str, *answers: Answer) -> None:
        """Queue answers for requests whose path (without query) ends with ``path_suffix``.

        If several queued suffixes match a request, the longest (most specific) one is used.
        """
        with self._lock:
            self._scripts.setdefault(path_suffix, deque()).extend(answers)

    def push_inbound(self, from_user_id: str, text: str = "hi") -> str:
        """Queue a user's message for the next getupdates; returns its new (fresh) context token."""
        token = "ctx-" + secrets.token_hex(16)
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            self._inbound.append(
                {
                    "seq": seq,
                    "message_id": FIRST_MESSAGE_ID + seq - 1,
                    "from_user_id": from_user_id,
                    "to_user_id": BOT_USER_ID,
                    "client_id": f"fake-inbound-{seq}",
                    "create_time_ms": int(time.time() * 1000),
                    "message_type": 1,
                    "message_state": 2,
                    "item_list": [{"type": 1, "text_item": {"text": text}}],
                    "context_token": token,
                }
            )
            self.fresh_tokens.add(token)
            self._budget_used.pop(from_user_id, None)  # a new window: the budget is whole again
            self._cond.notify_all()
        return token

    def budget_used(self, peer: str) -> int:
        """Sends delivered to a budget peer since it last wrote."""
        with self._lock:
            return self._budget_used.get(peer, 0)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def sends(self) -> list[Recorded]:
        """Only the sendmessage requests, in arrival order."""
        return [r for r in self.requests if _path_only(r.path) == SEND_PATH]

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    # -- the model -----------------------------------------------------------------------------

    @staticmethod
    def _new_cursor() -> str:
        return base64.b64encode(secrets.token_bytes(24)).decode()

    def _take_script(self, path: str) -> Answer | None:
        """Pop the next scripted answer for ``path``; caller holds the lock."""
        matches = [s for s, q in self._scripts.items() if q and path.endswith(s)]
        if not matches:
            return None
        return self._scripts[max(matches, key=len)].popleft()

    def _respond(
        self, method: str, raw_path: str, headers: tuple[tuple[str, str], ...], body: bytes
    ) -> Answer | None:
        """Record the request and decide the answer; None means "the server is stopping"."""
        received = time.monotonic()
        path = _path_only(raw_path)
        try:
            doc: Any = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            doc = None
        token = client_id = None
        msg: dict[str, Any] = {}
        if path == SEND_PATH:
            msg, token, client_id = _send_fields(doc)

        def record(answered: str) -> None:
            self._requests.append(
                Recorded(
                    method=method,
                    path=raw_path,
                    headers=headers,
                    body=body,
                    json=doc,
                    context_token=token,
                    client_id=client_id,
                    answered=answered,
                    time=received,
                )
            )

        ok = (("Content-Type", "application/json"),)
        with self._lock:
            scripted = self._take_script(path)
            if scripted is not None:
                delivered = (
                    scripted.deliver and path == SEND_PATH and self._deliver(msg, token, client_id, body)
                )
                record("scripted-delivered" if delivered else "scripted")
                return scripted
            if method != "POST" or path not in (SEND_PATH, UPDATES_PATH, CONFIG_PATH, TYPING_PATH):
                record("other")
                return Answer(status=404, body=_json_bytes({"ret": -1, "errmsg": "not found"}))
            if path == SEND_PATH:
                if not isinstance(doc, dict) or not isinstance(doc.get("msg"), dict):
                    record("other")
                    return Answer(
                        status=400,
                        body=_json_bytes({"ret": -1, "errmsg": "body must be a JSON object with msg"}),
                    )
                if msg.get("to_user_id") in self.dropping_peers:
                    record("dropped-silently")
                    return Answer(body=SILENT_DROP_ANSWER, headers=ok)
                to_user = msg.get("to_user_id")
                peer = to_user if isinstance(to_user, str) else ""
                budget = self.budget_peers.get(peer)
                if budget is not None and self._budget_used.get(peer, 0) >= budget:
                    record("refused-budget")
                    return Answer(body=self.stale_answer, headers=ok)
                if self._deliver(msg, token, client_id, body):
                    if budget is not None:
                        self._budget_used[peer] = self._budget_used.get(peer, 0) + 1
                    record("delivered")
                    return Answer(body=self.success_answer, headers=ok)
                record("refused-stale" if token is not None else "refused-tokenless")
                return Answer(body=self.stale_answer, headers=ok)
            if path == CONFIG_PATH:
                record("other")
                return Answer(body=_json_bytes({"ret": 0, "typing_ticket": "tt-" + secrets.token_hex(12)}))
            if path == TYPING_PATH:
                record("other")
                return Answer(body=b'{"ret":0}')
            record("updates")
        return self._get_updates(doc)

    def _deliver(self, msg: dict[str, Any], token: str | None, client_id: str | None, body: bytes) -> bool:
        """The stale-token model: deliver a send with a fresh token, or with none while
        ``tokenless_delivers``; returns whether it was delivered. Caller holds the lock."""
        fresh = token is not None and token in self.fresh_tokens
        if not msg or not (fresh or (token is None and self.tokenless_delivers)):
            return False
        to_user = msg.get("to_user_id")
        self._deliveries.append(
            Delivery(
                to_user_id=to_user if isinstance(to_user, str) else "",
                client_id=client_id,
                text=_message_text(msg),
                context_token=token,
                body=body,
            )
        )
        return True

    def _get_updates(self, doc: Any) -> Answer | None:
        """Answer at once with queued inbound messages, else hold the long-poll."""
        sent_cursor = doc.get("get_updates_buf") if isinstance(doc, dict) else None
        deadline = time.monotonic() + self.longpoll_seconds
        with self._cond:
            while not self._inbound and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping.is_set():
                return None
            if self._inbound:
                msgs, self._inbound = self._inbound, []
                self._cursor = self._new_cursor()
                cursor = self._cursor
            else:
                msgs = []
                cursor = sent_cursor if isinstance(sent_cursor, str) and sent_cursor else self._cursor
        return Answer(body=_json_bytes({"ret": 0, "msgs": msgs, "get_updates_buf": cursor}))


# --------------------------------------------------------------------------------------------
# Command line


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run a fake iLink in the foreground; stdin lines ``push USER [TEXT]`` queue inbound."""
    parser = argparse.ArgumentParser(
        prog="python -m ilink_fixproxy.sandbox",
        description="Run a fake iLink bot API on loopback for manual experiments.",
    )
    parser.add_argument("--tls-dir", type=Path, help="serve HTTPS with a new test CA in DIR")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        pki = make_pki(args.tls_dir) if args.tls_dir is not None else None
        fake = FakeILink(pki, port=args.port).start()
        try:
            print(f"fake iLink listening on {fake.url}", flush=True)
            if pki is not None:
                print(f"CA certificate: {pki.ca_cert}", flush=True)
            print("type 'push USER [TEXT]' to queue an inbound message; Ctrl-C to stop", flush=True)
            _command_loop(fake)
        finally:
            fake.stop()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    return 0


def _command_loop(fake: FakeILink) -> None:
    for line in sys.stdin:
        words = line.split(maxsplit=2)
        if len(words) >= 2 and words[0] == "push":
            token = fake.push_inbound(words[1], words[2].strip() if len(words) > 2 else "hi")
            print(f"queued inbound from {words[1]}; fresh context_token {token}", flush=True)
        elif words:
            print("usage: push USER [TEXT]", flush=True)
    threading.Event().wait()  # stdin closed (e.g. </dev/null): keep serving until Ctrl-C


if __name__ == "__main__":
    sys.exit(main())

"""A lean, fast fake iLink for benchmarks: raw asyncio, plain HTTP/1.1 keep-alive on loopback.

The test sandbox (``ilink_fixproxy.sandbox.FakeILink``) is a ThreadingHTTPServer with TLS and
fault injection; at a few thousand requests per second its per-request thread hand-off would be
what we measure. This one answers from an ``asyncio.Protocol`` with one ``write`` per answer,
TCP_NODELAY and a large backlog, so the direct path is limited by the load generator, not by it.

Behaviour (the part of iLink the proxy cares about):

- ``POST /ilink/bot/sendmessage``: a ``msg.context_token`` in ``fresh_tokens`` is delivered, any
  other token is refused with ``{"ret":-2,"errmsg":"prepare failed"}``, no token is delivered;
- ``POST /ilink/bot/getupdates``: a long poll held for ``--poll-hold`` seconds, then an empty
  batch (as iLink does when nothing arrives);
- any other ``POST`` (media uploads): the body is counted and dropped, never buffered;
- ``GET /__bench/stats``: counters, so the harness can tell how many upstream requests each
  client request caused (re-issues) and how many polls are held.

Run ``python -m bench.fake_ilink --port 0``; it prints ``fake-ilink listening on http://...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections import Counter
from typing import Any

SEND_PATH = b"/ilink/bot/sendmessage"
UPDATES_PATH = b"/ilink/bot/getupdates"
STATS_PATH = b"/__bench/stats"
DEFAULT_FRESH_TOKENS = frozenset({"fresh-bench-token"})
STALE_ANSWER = b'{"ret":-2,"errmsg":"prepare failed"}'
OK_ANSWER = b'{"ret":0}'
_MAX_HEAD = 64 * 1024  # a request head larger than this is garbage: drop the connection


def _answer(status: bytes, body: bytes, *, close: bool = False) -> bytes:
    # One buffer per answer: head and body in separate writes would meet Nagle/delayed-ACK on
    # some stacks (the 40 ms stalls the mitmproxy notes describe).
    return b"".join(
        (
            b"HTTP/1.1 ",
            status,
            b"\r\nContent-Type: application/json\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\nConnection: close\r\n\r\n" if close else b"\r\n\r\n",
            body,
        )
    )


class FakeState:
    def __init__(self, fresh_tokens: frozenset[str], poll_hold: float) -> None:
        self.fresh_tokens = set(fresh_tokens)
        self.poll_hold = poll_hold
        self.counts: Counter[str] = Counter()
        self.polls_open = 0
        self.connections_open = 0

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "polls_open": self.polls_open, "connections_open": self.connections_open}


class FakeConnection(asyncio.Protocol):
    """One client connection: parse request heads, count bodies, answer in order."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        # The request whose body is still arriving: (method, path, remaining bytes, keep body?).
        self.pending: tuple[bytes, bytes, int, bool] | None = None
        self.body = bytearray()
        self.poll_timer: asyncio.TimerHandle | None = None

    # -------------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.state.connections_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections_open -= 1
        if self.poll_timer is not None:  # the client gave up on its long poll
            self.poll_timer.cancel()
            self.poll_timer = None
            self.state.polls_open -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.pending is not None:
            data = self._feed_body(data)
        if data:
            self.buf += data
        while self.pending is None and self.poll_timer is None and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    self.transport.close()
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self._start_request(head)
            if self.pending is not None and self.buf:
                rest = bytes(self.buf)
                self.buf.clear()
                self.buf += self._feed_body(rest)

    # -------------------------------------------------------------------- requests

    def _start_request(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        try:
            method, target, _ = lines[0].split(b" ", 2)
        except ValueError:
            assert self.transport is not None
            self.transport.write(_answer(b"400 Bad Request", b'{"ret":-1}', close=True))
            self.transport.close()
            return
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        path = target.split(b"?", 1)[0]
        # Only the small JSON bodies are kept; uploads are counted and dropped as they arrive.
        keep = path in (SEND_PATH, UPDATES_PATH)
        self.body = bytearray()
        self.pending = (method, path, length, keep)
        if length == 0:
            self._finish_request()

    def _feed_body(self, data: bytes) -> bytes:
        """Consume body bytes of the pending request; return what belongs to the next one."""
        assert self.pending is not None
        method, path, remaining, keep = self.pending
        take = data[:remaining]
        if keep:
            self.body += take
        else:
            self.state.counts["upload_bytes"] += len(take)
        remaining -= len(take)
        self.pending = (method, path, remaining, keep)
        if remaining == 0:
            self._finish_request()
        return data[len(take) :]

    def _finish_request(self) -> None:
        assert self.pending is not None and self.transport is not None
        method, path, _, _ = self.pending
        self.pending = None
        counts = self.state.counts
        if path == SEND_PATH:
            counts["send_total"] += 1
            self.transport.write(_answer(b"200 OK", self._send_answer(bytes(self.body))))
        elif path == UPDATES_PATH:
            counts["polls_total"] += 1
            self.state.polls_open += 1
            self.poll_timer = asyncio.get_running_loop().call_later(self.state.poll_hold, self._poll_done)
        elif path == STATS_PATH:
            self.transport.write(_answer(b"200 OK", json.dumps(self.state.stats()).encode()))
        elif method == b"POST":
            counts["uploads"] += 1
            self.transport.write(_answer(b"200 OK", b'{"ret":0}'))
        else:
            self.transport.write(_answer(b"404 Not Found", b'{"ret":-1,"errmsg":"not found"}'))

    def _send_answer(self, body: bytes) -> bytes:
        counts = self.state.counts
        try:
            msg = json.loads(body).get("msg") or {}
            token = msg.get("context_token") if isinstance(msg, dict) else None
        except (ValueError, AttributeError):
            counts["send_bad"] += 1
            return b'{"ret":-1,"errmsg":"bad request"}'
        if not token:
            counts["send_tokenless"] += 1
            return OK_ANSWER
        if token in self.state.fresh_tokens:
            counts["send_fresh"] += 1
            return OK_ANSWER
        counts["send_stale"] += 1
        return STALE_ANSWER

    def _poll_done(self) -> None:
        self.poll_timer = None
        self.state.polls_open -= 1
        if self.transport is not None:
            self.transport.write(
                _answer(b"200 OK", b'{"ret":0,"msgs":[],"get_updates_buf":"","longpolling_timeout_ms":35000}')
            )
            if self.buf:  # a pipelined request arrived while the poll was held
                self.data_received(b"")


async def serve(host: str, port: int, state: FakeState) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FakeConnection(state), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()
    print(f"fake-ilink listening on http://{bound[0]}:{bound[1]} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fake_ilink", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--poll-hold", type=float, default=35.0, help="seconds a getupdates long poll is held")
    p.add_argument("--fresh-token", action="append", default=[], help="a token iLink still accepts")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print("fake-ilink: loopback only", file=sys.stderr)
        return 2
    state = FakeState(frozenset(args.fresh_token) or DEFAULT_FRESH_TOKENS, args.poll_hold)
    asyncio.run(serve(args.host, args.port, state))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Real `redis-server` processes for the shared-store tests: each on a free port, in its own
directory, without persistence unless asked (`--appendonly yes`). Without the binary the tests
are skipped saying why, except in CI (CI=true), where that is a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

STATE_KEY = "test-state-key-" + "0123456789abcdef" * 2  # what every replica of a test shares


def redis_unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the Redis test cannot run: {reason}", pytrace=False)
    pytest.skip(f"Redis test skipped: {reason} (with CI=true this fails)")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        redis_unavailable("redis-server is not installed (Debian package redis-server)")
    return found  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, *, aof: bool = False) -> None:
        self.binary = redis_binary()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.aof else "no",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}) on port {self.port}")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer within 10 s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def command(self, *args: str | bytes) -> object:
        """One command over a plain socket (the tests' view of Redis, independent of the proxy)."""
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as r:
            return r.execute_command(*args)

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every key and every value in it (all types), as raw bytes."""
        import redis

        out: list[tuple[bytes, bytes]] = []
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as r:
            for key in r.scan_iter(count=1000):
                kind = r.type(key)
                if kind == b"string":
                    values = [r.get(key) or b""]
                elif kind == b"hash":
                    values = [b for kv in r.hgetall(key).items() for b in kv]
                elif kind == b"zset":
                    values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
                elif kind == b"set":
                    values = list(r.smembers(key))
                elif kind == b"list":
                    values = r.lrange(key, 0, -1)
                else:
                    values = []
                out.extend((key, v) for v in values)
                out.append((key, b""))
        return out

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

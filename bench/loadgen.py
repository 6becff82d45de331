"""A small raw-asyncio HTTP/1.1 load generator: keep-alive connections, closed loop, no httpx.

httpx costs a few hundred microseconds of Python per request, about what the direct path costs
in total, so a load generator built on it would measure itself. This one writes each request in
one buffer and parses just enough of the answer (status, Content-Length or chunked) to find its
end. One connection per worker, opened before the warm-up, so connection setup is not timed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

REQUEST_TIMEOUT = 30.0  # no single request may hang the benchmark
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str) -> None:
        self.reader = reader
        self.writer = writer
        self.authority = authority.encode()

    @classmethod
    async def open(cls, host: str, port: int) -> Conn:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, limit=1024 * 1024)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, f"{host}:{port}")

    def head(self, method: str, path: str, length: int) -> bytes:
        return b"".join(
            (
                method.encode(),
                b" ",
                path.encode(),
                b" HTTP/1.1\r\nHost: ",
                self.authority,
                b"\r\nContent-Type: application/json\r\nAuthorizationType: ilink_bot_token\r\n"
                b"Authorization: Bearer bench-bot@im.bot:bench\r\niLink-App-Id: bot\r\nContent-Length: ",
                str(length).encode(),
                b"\r\n\r\n",
            )
        )

    async def request(self, method: str, path: str, body: bytes = b"") -> Answer:
        self.writer.write(self.head(method, path, len(body)) + body)
        return await self.read_answer()

    async def upload(self, path: str, size: int, chunk: int = 256 * 1024) -> Answer:
        """POST `size` bytes in `chunk`-sized writes, respecting flow control (drain)."""
        self.writer.write(self.head("POST", path, size))
        block = b"\x5a" * chunk
        sent = 0
        while sent < size:  # bounded by size
            n = min(chunk, size - sent)
            self.writer.write(block if n == chunk else block[:n])
            sent += n
            await self.writer.drain()
        return await self.read_answer()

    async def read_answer(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = await self._read_chunked()
        else:
            body = await self.reader.read()  # framed by connection close
        return Answer(status, headers, body)

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        for _ in range(1_000_000):  # bounded: a chunked answer of a million chunks is broken
            size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)
        raise ValueError("too many chunks")

    def close(self) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------ measuring


@dataclass
class Sample:
    """What one closed-loop window measured."""

    requests: int = 0  # completed inside the measured window
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    issued: int = 0  # every request sent, warm-up included (for upstream-per-request counts)
    proxy_cpu_s: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, from /proc/<pid>/stat."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mb(pid: int | None) -> float | None:
    """VmRSS of a process in MB (10^6 bytes), from /proc/<pid>/status."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


# One worker's request: send it on the connection, return True if the answer was the expected one.
Step = Callable[[Conn, int, int], Awaitable[bool]]


async def closed_loop(
    host: str,
    port: int,
    step: Step,
    *,
    concurrency: int,
    warmup: float,
    window: float,
    max_requests: int = 2_000_000,
    watch_pid: int | None = None,
) -> Sample:
    """`concurrency` workers, each on its own keep-alive connection, sending back to back.

    Requests that start after the warm-up and finish before the window closes are timed; the
    throughput is those requests divided by the window.
    """
    conns = await asyncio.gather(*(Conn.open(host, port) for _ in range(concurrency)))
    sample = Sample()
    start = time.perf_counter()
    measure_from = start + warmup
    measure_to = measure_from + window
    cpu_at: list[float | None] = []

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        cpu_at.append(cpu_seconds(watch_pid))
        await asyncio.sleep(max(0.0, measure_to - time.perf_counter()))
        cpu_at.append(cpu_seconds(watch_pid))

    async def worker(w: int, conn: Conn) -> None:
        per_worker = max_requests // concurrency
        for i in range(per_worker):  # bounded in count; the clock check bounds it in time
            t0 = time.perf_counter()
            if t0 >= measure_to:
                return
            sample.issued += 1
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    ok = await step(conn, w, i)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                # TimeoutError is an OSError; after any of these the connection is unusable.
                sample.errors += 1
                return
            t1 = time.perf_counter()
            if not ok:
                sample.errors += 1
            if t0 >= measure_from and t1 <= measure_to:
                sample.requests += 1
                sample.latencies_ms.append((t1 - t0) * 1000)

    marks = asyncio.create_task(cpu_marks())
    try:
        await asyncio.gather(*(worker(w, c) for w, c in enumerate(conns)))
        await marks
    finally:
        marks.cancel()
        for c in conns:
            c.close()
    sample.seconds = window
    if len(cpu_at) == 2 and cpu_at[0] is not None and cpu_at[1] is not None:
        sample.proxy_cpu_s = cpu_at[1] - cpu_at[0]
    return sample

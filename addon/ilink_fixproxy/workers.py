"""``--workers N``: N proxy processes on one machine sharing the listen port, under one parent.

Why processes: the proxy is one asyncio loop, so one process uses at most one core. Each worker is
the ordinary proxy (``python -m ilink_fixproxy`` with the same arguments) started by the parent;
the kernel spreads new connections over the workers' listening sockets (``SO_REUSEPORT``).

The parent (the ``ilink-fixproxy`` process the operator started) checks everything a single proxy
checks, then:

- holds a bound (not listening) ``SO_REUSEPORT`` socket on the listen address for its whole life:
  it resolves port 0 once for every worker and keeps the port while workers restart; a bound
  socket that does not listen gets no connections (Linux hands them only to listening sockets);
- serves ``--metrics`` itself: ``/metrics`` is every worker's metrics with a ``worker="I"`` label
  (one scrape target per machine, as Prometheus expects; ``sum without (worker)`` gives the
  machine's totals) plus ``ilink_fixproxy_worker_up`` / ``_worker_restarts_total``, and
  ``/healthz`` is 200 only while every worker is up and healthy. Each worker serves its own
  metrics on an internal loopback port and tells the parent which, with its readiness;
- prints the start line once, when every worker listens;
- restarts a worker that dies (one log line); a worker that fails before it ever listened (a
  start-up error: restarting cannot help), or more than ``MAX_RESTARTS`` restarts within
  ``RESTART_WINDOW_S``, stops them all and exits 1;
- on SIGTERM / SIGINT sends SIGTERM to every worker, each of which stops as a single proxy does
  (stops accepting, lets its in-flight sends finish), and exits 0 when they all did; a second
  signal is passed on as SIGINT (each worker then stops at once; repeated SIGTERMs, which systemd
  also sends every worker directly, do not hurry a worker). The workers are in their own process
  group, so Ctrl-C in a terminal reaches them only through the parent (once, not twice), and each
  asks the kernel for SIGTERM should the parent die without stopping them (``PR_SET_PDEATHSIG``).

How a worker shares the port, narrowly and independently of mitmproxy's version: mitmproxy 11.0
and 12.3 both open their TCP listener with ``asyncio.start_server(handler, host, port)`` (in
``mitmproxy/proxy/mode_servers.py``, ``AsyncioServerInstance.listen``), which calls the running
loop's ``create_server``; there is no mitmproxy option for ``SO_REUSEPORT``, and subclassing its
server instances fights its registry (one class per mode, asserted). A worker therefore runs on an
event loop whose ``create_server`` adds ``reuse_port=True`` for exactly the listen address, and
for nothing else (the metrics port, any other server stays exclusive).

UDP (HTTP/3): in reverse mode to an https upstream mitmproxy also listens on UDP through
mitmproxy_rs, in Rust, which cannot be given ``SO_REUSEPORT``: a second worker could not bind it.
No worker listens on UDP: the gateways (hermes-agent's aiohttp, openclaw-weixin's Node fetch)
speak HTTP/1.1 over TCP, and one worker holding the UDP port alone would lose it to nobody else
when it dies. Done by making the reverse mode's parsed spec TCP-only (``transport_protocol``, the
attribute both versions' ``listen`` consult; mitmproxy's own ``ReverseMode.__post_init__`` sets it
per instance), on the very object mitmproxy uses (``ProxyMode.parse`` is cached in 11 and 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cli import Settings

log = logging.getLogger("ilink_fixproxy")

# Set by the parent in each worker's environment: "INDEX:READY_FD:PARENT_PID:PARENT_METRICS_PORT"
# (0: none). Internal.
WORKER_ENV = "_ILINK_FIXPROXY_WORKER"
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0  # a worker's graceful stop is bounded by its 12 s grace; then SIGKILL
_FETCH_TIMEOUT_S = 3.0
SHARED_STORE_SCHEMES = ("redis://", "rediss://")


# --------------------------------------------------------------------------- in a worker


@dataclass(frozen=True)
class Role:
    index: int
    ready_fd: int
    parent_pid: int
    parent_metrics_port: int  # the parent's --metrics listener, one of the proxy's own (egress.py)


def worker_role() -> Role | None:
    """This process's role when the parent of ``--workers N`` started it, else None."""
    value = os.environ.get(WORKER_ENV, "")
    try:
        index, fd, parent, metrics = (int(part) for part in value.split(":"))
    except ValueError:
        return None
    return Role(index, fd, parent, metrics)


def die_with_parent(role: Role) -> None:
    """Ask Linux for SIGTERM when the parent dies (killed without stopping us): no worker outlives
    its supervisor. SIGTERM, not SIGKILL, so in-flight sends still finish."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != role.parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def reuse_port_loop_factory(host: str, port: int) -> Callable[[], asyncio.AbstractEventLoop]:
    """An event loop whose servers on exactly (host, port) are opened with SO_REUSEPORT."""

    class ReusePortLoop(asyncio.SelectorEventLoop):
        async def create_server(  # type: ignore[override]
            self, protocol_factory: Any, host_: Any = None, port_: Any = None, **kwargs: Any
        ) -> asyncio.Server:
            if kwargs.get("sock") is None and (host_, port_) == (host, port):
                kwargs["reuse_port"] = True
            return await super().create_server(protocol_factory, host_, port_, **kwargs)

    return ReusePortLoop


def tcp_only(modes: Iterable[str]) -> None:
    """No UDP (HTTP/3) listener in a worker: see the module docstring."""
    from mitmproxy.proxy import mode_specs

    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if mode.transport_protocol == "both":
            mode.transport_protocol = "tcp"  # type: ignore[misc]


class WorkerReady:
    """Tells the parent, once mitmproxy listens, that this worker serves and where its own
    metrics are (in place of the start line, which the parent prints once for all)."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def running(self) -> None:
        from mitmproxy import ctx

        port = 0
        for addon in _all_addons(ctx.master.addons.chain):
            server = getattr(addon, "server", None)
            if type(addon).__name__ == "Metrics" and server is not None:
                port = server.server_port
        os.write(self.role.ready_fd, f"ready {port}\n".encode())


def _all_addons(chain: Iterable[Any]) -> Iterator[Any]:
    for addon in chain:
        yield addon
        yield from _all_addons(getattr(addon, "addons", ()) or ())


# --------------------------------------------------------------------------- in the parent


def store_is_shared(state: str | None) -> bool:
    return bool(state) and str(state).startswith(SHARED_STORE_SCHEMES)


def refusal(s: Settings, state: str | None) -> str | None:
    """Why `s` cannot run with several workers (one line), or None."""
    n = s.workers
    if s.ui:
        return (
            f"--workers {n} cannot be combined with --ui: the web UI shows one process's flows "
            "(use --workers 1)"
        )
    if s.observability.get("ilink_capture"):
        return (
            f"--workers {n} cannot be combined with --capture: the capture journal is written and rotated "
            "by one process (capture with --workers 1)"
        )
    if (s.ruleset.uses_peer_state or s.defer) and not store_is_shared(state):
        where = "':memory:'" if state == ":memory:" else "the SQLite state file"
        return (
            f"--workers {n}: the rules keep peer state and {where} belongs to one process (a file lock; "
            "in-flight sends and fresh tokens live in its memory): share it with --state "
            "redis://HOST:PORT/DB, or run --workers 1"
        )
    return None


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket on host:port (see the module docstring)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio's create_server, so the workers' sockets match
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    metrics_port: int = 0
    ready: bool = False
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class Supervisor:
    settings: Settings
    worker_argv: list[str]
    count: int
    metrics_port: int = 0  # the parent's own --metrics listener (0: none)
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False
    restart_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workers = [Worker(i) for i in range(self.count)]

    # ------------------------------------------------------------------ processes

    async def spawn(self, w: Worker) -> None:
        """Start worker `w` and wait until it listens (RuntimeError with why if it does not)."""
        read_fd, write_fd = os.pipe()
        env = {**os.environ, WORKER_ENV: f"{w.index}:{write_fd}:{os.getpid()}:{self.metrics_port}"}
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self.worker_argv,
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                pass_fds=(write_fd,),
                process_group=0,  # no terminal Ctrl-C directly: the parent passes signals on
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        w.ready, w.metrics_port = False, 0
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb", 0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        try:
            line = await asyncio.wait_for(reader.readline(), READY_TIMEOUT_S)
        except TimeoutError:
            line = b""
        finally:
            transport.close()
        words = line.decode("ascii", "replace").split()
        if len(words) != 2 or words[0] != "ready":
            code = None
            with contextlib.suppress(TimeoutError):
                code = await asyncio.wait_for(w.proc.wait(), 5)
            how = (
                f"exited with {_status(code)}"
                if code is not None
                else f"did not listen within {READY_TIMEOUT_S:.0f} s"
            )
            raise RuntimeError(f"worker {w.index} (pid {w.pid}) {how} before listening")
        w.metrics_port, w.ready = int(words[1]), True

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def stop_all(self) -> list[int]:
        """SIGTERM every worker, wait for them (SIGKILL after STOP_TIMEOUT_S); their exit codes."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "ilink-fixproxy: workers still running %.0f s after SIGTERM: killing them", STOP_TIMEOUT_S
            )
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        return [p.returncode for p in procs if p.returncode is not None]

    def note_restart(self) -> bool:
        """Record a restart; False when workers died too often to keep restarting them."""
        now = time.monotonic()
        self.restart_times = [t for t in self.restart_times if now - t < RESTART_WINDOW_S] + [now]
        return len(self.restart_times) <= MAX_RESTARTS

    async def run(self, announce: Callable[[], None]) -> int:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:  # a second signal: every worker stops at once, as a single proxy does
                self.signal_all(signal.SIGINT)
            stop_requested.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

        starting = asyncio.ensure_future(asyncio.gather(*(self.spawn(w) for w in self.workers)))
        stop_wait = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if stop_requested.is_set():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            codes = await self.stop_all()
            return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
        try:
            starting.result()
        except RuntimeError as e:
            stop_wait.cancel()
            # (a worker's own reason, if it had one, is on stderr already, from the worker)
            print(f"ilink-fixproxy: {e}: stopping all workers", file=sys.stderr, flush=True)
            await self.stop_all()
            return 1
        announce()

        while True:
            waits = {asyncio.ensure_future(w.proc.wait()): w for w in self.workers if w.proc is not None}
            done, _ = await asyncio.wait({*waits, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            for fut in waits:
                if fut not in done:
                    fut.cancel()
            if stop_requested.is_set():
                codes = await self.stop_all()
                # -SIGTERM: a worker that had finished stopping when a SIGTERM (systemd's, say)
                # found it without a handler any more
                failed = [c for c in codes if c not in (0, -signal.SIGTERM)]
                if failed:
                    log.warning("ilink-fixproxy: %d worker(s) did not stop cleanly: %s", len(failed), failed)
                return 0 if not failed else 1
            for fut in done:
                w = waits[fut]
                how = _status(fut.result())
                if not self.note_restart():
                    log.error(
                        "ilink-fixproxy: worker %d (pid %s) exited with %s: %d restarts within %.0f s, "
                        "stopping all workers",
                        w.index,
                        w.pid,
                        how,
                        MAX_RESTARTS,
                        RESTART_WINDOW_S,
                    )
                    await self.stop_all()
                    return 1
                old = w.pid
                w.restarts += 1
                w.ready = False
                restart = asyncio.ensure_future(self.spawn(w))
                await asyncio.wait({restart, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if stop_requested.is_set():  # stopping while a worker restarts: no waiting for it
                    restart.cancel()
                    with contextlib.suppress(BaseException):
                        await restart
                    break
                try:
                    restart.result()
                except RuntimeError as e:
                    log.error(
                        "ilink-fixproxy: %s after worker %d (pid %s) exited with %s: stopping",
                        e,
                        w.index,
                        old,
                        how,
                    )
                    await self.stop_all()
                    return 1
                log.warning(
                    "ilink-fixproxy: worker %d (pid %s) exited with %s; restarted it as pid %s",
                    w.index,
                    old,
                    how,
                    w.pid,
                )

    # ------------------------------------------------------------------ metrics and health

    def snapshot(self) -> list[tuple[int, int | None, int, bool, int]]:
        return [(w.index, w.pid, w.metrics_port, w.ready, w.restarts) for w in self.workers]

    def health(self, path: str = "/healthz") -> tuple[str, str]:
        """/healthz (or /livez) of every worker: ok only when all say ok."""
        if self.stopping:
            return "503 Service Unavailable", "stopping\n"
        problems = []
        for index, _pid, port, ready, _ in self.snapshot():
            if not ready:
                problems.append(f"worker {index}: starting")
                continue
            ok, text = _fetch(port, path)
            if not ok:
                problems.append(f"worker {index}: {text.strip() or 'unreachable'}")
        if problems:
            return "503 Service Unavailable", "unhealthy: " + "; ".join(problems) + "\n"
        return "200 OK", "ok\n"

    def status_page(self, path: str) -> tuple[str, list[tuple[str, str]], bytes]:
        """/status or /status.json of the first worker that answers, as it served it (its headers:
        the page's Content-Security-Policy). With a shared store its peers, windows and outbox are
        the shared ones; its charts and recent requests are that worker's, and the page names it."""
        for _index, _pid, port, ready, _ in self.snapshot():
            if ready and (got := _forward(port, path)) is not None:
                return got
        text = b"no worker answered: see /healthz\n"
        return "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")], text

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_WorkersCollector(self))
        return generate_latest(registry)


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"status {code}"


def _fetch(port: int, path: str) -> tuple[bool, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=_FETCH_TIMEOUT_S) as answer:
            return answer.status == 200, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return False, e.read(4096).decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        return False, f"unreachable ({getattr(e, 'reason', None) or e})"


# What a forwarded answer must not carry over: the parent's own server sets these.
_HOP_HEADERS = frozenset({"connection", "content-length", "date", "server", "transfer-encoding"})


def _forward(port: int, path: str) -> tuple[str, list[tuple[str, str]], bytes] | None:
    """A worker's 200 answer to `path` (status line, headers, body), or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=_FETCH_TIMEOUT_S) as answer:
            headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_HEADERS]
            return f"{answer.status} {answer.reason}", headers, answer.read()
    except (OSError, ValueError):  # (HTTPError is an OSError: a worker not answering 200)
        return None


class _WorkersCollector:
    """Every worker's families, each sample labelled with its worker, plus the parent's own."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        up = GaugeMetricFamily(
            "ilink_fixproxy_worker_up",
            "1 while the worker serves and answered this scrape",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "ilink_fixproxy_worker_restarts", "Times the parent restarted the worker", labels=["worker"]
        )
        merged: dict[str, Metric] = {}
        for index, _pid, port, ready, restart_count in self.sup.snapshot():
            text = ""
            if ready:
                ok, text = _fetch(port, "/metrics")
                if not ok:
                    text = ""
            up.add_metric([str(index)], 1.0 if text else 0.0)
            restarts.add_metric([str(index)], float(restart_count))
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    into.add_sample(
                        sample.name, {**sample.labels, "worker": str(index)}, sample.value, sample.timestamp
                    )
        yield up
        yield restarts
        yield from merged.values()


def serve_metrics(sup: Supervisor, host: str, port: int) -> Any:
    """The parent's /metrics, /healthz and /status on the operator's --metrics address, in threads."""
    from wsgiref.simple_server import make_server

    from .metrics import _QuietHandler, _server_class

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body = sup.exposition()
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            return [body]
        if path in ("/healthz", "/livez"):
            status, text = sup.health(path)
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]
        if path in ("/status", "/status/", "/status.json"):
            code, headers, body = sup.status_page(path)
            start_response(code, headers)
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /status, /metrics, /healthz or /livez\n"]

    server = make_server(host, port, app, _server_class(host, port), handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="ilink-metrics", daemon=True).start()
    return server


def supervise(s: Settings, worker_argv: list[str], announce: Callable[[str], None]) -> int:
    """Run `s.workers` workers (the command line `worker_argv`) until stopped; the exit status."""
    from .cli import UsageError, check_port_free

    check_port_free(s.listen_host, s.listen_port)  # nothing else there, ours or not
    try:
        reservation = reserve_port(s.listen_host, s.listen_port)
    except OSError as e:
        shown = f"[{s.listen_host}]" if ":" in s.listen_host else s.listen_host
        raise UsageError(f"cannot listen on {shown}:{s.listen_port}: {e.strerror or e}") from None
    port = reservation.getsockname()[1]
    metrics = s.observability.get("ilink_metrics")
    argv = [*worker_argv, "--listen", _hostport(s.listen_host, port), "--workers", "1"]
    if metrics:
        argv += ["--metrics", "127.0.0.1:0"]
    sup = Supervisor(s, argv, s.workers)
    server = None
    if metrics:
        from .metrics import parse_hostport

        mhost, mport = parse_hostport(str(metrics))
        try:
            server = serve_metrics(sup, mhost, mport)
        except OSError as e:
            reservation.close()
            reason = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror or e
            raise UsageError(f"--metrics {metrics}: cannot listen there: {reason}") from None
        sup.metrics_port = server.server_port
    _log_like_the_workers(str(s.observability.get("ilink_log_format", "text")))

    def ready() -> None:
        announce(_hostport(s.listen_host, port))
        pids = ", ".join(str(w.pid) for w in sup.workers)
        where = ""
        if server is not None:
            shown = (
                f"[{server.server_address[0]}]"
                if ":" in server.server_address[0]
                else server.server_address[0]
            )
            where = (
                f"; metrics of all workers on http://{shown}:{server.server_port}/metrics (health: /healthz)"
            )
        log.info(f"ilink-fixproxy: {s.workers} workers share the port (pids {pids}){where}")

    try:
        return asyncio.run(sup.run(ready))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        reservation.close()


def _log_like_the_workers(fmt: str) -> None:
    """The parent's log lines as the workers' (mitmproxy's "[HH:MM:SS.mmm] ..." or JSON), on stdout."""
    from .logfmt import JsonFormatter

    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

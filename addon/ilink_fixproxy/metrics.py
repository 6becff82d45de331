"""Prometheus metrics and a health check: ``ilink_metrics=HOST:PORT`` (``--metrics``).

Served by prometheus-client's WSGI app (``/metrics``) next to ``/healthz``, with the standard
library's wsgiref server in daemon threads, from a registry of our own (never the process-global
one, so embedding the addon cannot collide with other exporters). Every family is prefixed
``ilink_fixproxy_``:

- ``requests_total{endpoint, decision}``: iLink API exchanges and what the proxy decided;
- ``upstream_answers_total{endpoint, status, ret, errcode, errmsg_class}``: every upstream attempt;
- ``repairs_total{outcome}``: sends the proxy changed (re-issued, token substituted or stripped),
  by what the gateway finally got: ``delivered``, ``still_failing``, ``unconfirmed_empty_body``
  (iLink's bare 200 with no body, which it also uses when it silently drops a message);
- ``send_outcomes_total{outcome}``: sends that reached iLink, by what its answer says about
  delivery: ``confirmed`` (a message_id), ``unconfirmed`` (accepted without one: empty, ``{}``,
  ``{"ret":0}``), ``refused``, ``failed`` (no answer);
- ``added_seconds{endpoint}`` and ``upstream_seconds{endpoint}`` histograms: the time the proxy
  added to an exchange beyond waiting for upstream answers, and each upstream attempt's time;
- ``state_rows{table}``, ``outbox_depth``, ``outbox_oldest_age_seconds``, ``outbox_total{outcome}``:
  the peer-state file and its deferred-delivery queue, read on scrape;
- ``outbox_events_total{event}``: deferred deliveries (when that feature is on);
- ``budget_events_total{event}``: the per-inbound send budget: ``learnt`` (iLink refused the
  newest token after N accepted sends), ``exhausted`` (a send held or deferred because the budget
  is spent), ``reprobed`` (one real send beyond a learnt budget), ``raised`` (iLink accepted a
  send beyond it), ``confirmed`` (a re-probe refused at the same count);
- ``nudges_total``: sends iLink accepted carrying the window keeper's text;
- ``peers_budget_spent``: peers whose known budget is spent now, read on scrape;
- ``store_up``: 1 while the peer-state store answers (0 when it fails, see health.py), with peer
  state on; ``outbox_max_age_seconds``: the rules' ``outbox.max_age_s``, with deferred delivery on;
- ``healthy``: 1 while ``/healthz`` says ok, else 0; ``internal_errors_total{component}``: internal
  failures (``store``, ``repairs``) counted by health.py (what makes ``/healthz`` unhealthy).

The same listener serves ``/status`` (status.py, status_page.py): one HTML page for operators, and
its data as ``/status.json``.

Labels are bounded: unknown endpoints, codes and error messages are folded into ``other``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mitmproxy import ctx, exceptions, http
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from . import __version__, status, status_page
from .capture import Exchange, buffer_limit, buffer_small_api_flow, is_api_flow, summarize, tracker_of
from .health import REPAIRS, STATE

log = logging.getLogger("ilink_fixproxy")

PREFIX = "ilink_fixproxy"
ENDPOINTS = frozenset(
    {
        "getupdates",
        "sendmessage",
        "getconfig",
        "sendtyping",
        "getuploadurl",
        "msg/notifystart",
        "msg/notifystop",
        "get_bot_qrcode",
        "get_qrcode_status",
    }
)
# errmsg texts iLink (or gateways' reports of it) use, as (substring, class); first match wins.
_ERRMSG_CLASSES = (
    ("prepare failed", "prepare_failed"),
    ("unknown error", "unknown_error"),
    ("session timeout", "session_timeout"),
    ("expired", "expired"),
    ("freq", "frequency_limit"),
    ("too frequent", "frequency_limit"),
    ("rate limit", "rate_limit"),
)
BUDGET_EVENTS = ("learnt", "exhausted", "reprobed", "raised", "confirmed")
ADDED_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)
_LOOP_TIMEOUT_S = 2.0
_NO_STORE = [("Cache-Control", "no-store")]
# The page loads nothing: a browser that obeys this cannot be made to fetch anything by it, even
# if a value escaped escaping. Inline styles only; images only as data: (none today).
_PAGE_HEADERS = [
    *_NO_STORE,
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]
DEFAULT_STALL_S = 5.0  # a busy loop answers within milliseconds; a blocked one does not
_BEAT_S = 0.25


# --------------------------------------------------------------------------- label values


def endpoint_label(endpoint: str) -> str:
    return endpoint if endpoint in ENDPOINTS else "other"


def code_label(value: Any) -> str:
    """A ret/errcode value as a bounded label: "none" when absent, the number, or "other"."""
    if value is None:
        return "none"
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,6}", value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and -999_999 <= value <= 999_999:
        return str(value)
    return "other"


def errmsg_class(errmsg: Any) -> str:
    if errmsg is None:
        return "none"
    text = str(errmsg).strip().lower()
    if not text:
        return "empty"
    for needle, cls in _ERRMSG_CLASSES:
        if needle in text:
            return cls
    return "other"


def _succeeded(attempt: dict[str, Any]) -> bool:
    """iLink accepted it: HTTP 200 and no non-zero ret/errcode (an empty body included)."""
    return attempt.get("status") == 200 and all(attempt.get(k) in (None, 0) for k in ("ret", "errcode"))


def repair_outcome(x: Exchange) -> str | None:
    """For a send the proxy changed (re-issued, substituted or stripped the token): what the
    gateway finally got. None for exchanges the proxy did not change."""
    if not x.token_sent or not any(a.get("token") in ("fresh", "none") for a in x.attempts):
        return None
    answered = [a for a in x.attempts if a.get("status") is not None]
    if x.decision == "reissue-failed" or not answered:
        return "still_failing"
    final = answered[-1]
    if not _succeeded(final):
        return "still_failing"
    return "unconfirmed_empty_body" if final.get("empty") else "delivered"


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) with an explicit host; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9464; port 0 picks a free one)")
    return host, int(port)


# --------------------------------------------------------------------------- HTTP serving


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the proxy's own lines."""


def _server_class(host: str, port: int) -> type[WSGIServer]:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})


class _StateCollector(Collector):
    """Peer-state sizes, read when Prometheus scrapes (on the event loop: see Metrics.on_loop)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def describe(self) -> Iterable[Any]:
        return []  # unknown until the state is open; keeps register() from collecting early

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.read()
        except Exception:  # no state, or the loop is busy: leave the family out of this scrape
            return
        family = GaugeMetricFamily(
            f"{PREFIX}_state_rows", "Rows in the peer-state file, by table", labels=["table"]
        )
        if "store_up" in counts:
            up = GaugeMetricFamily(f"{PREFIX}_store_up", "1 while the peer-state store answers, else 0")
            up.add_metric([], counts["store_up"])
            yield up
        if "rows" not in counts:
            return
        for table, n in sorted(counts["rows"].items()):
            family.add_metric([table], n)
        yield family
        outbox = counts.get("outbox")
        if outbox:
            depth = GaugeMetricFamily(f"{PREFIX}_outbox_depth", "Deferred sends waiting in the outbox")
            depth.add_metric([], outbox["depth"])
            yield depth
            age = GaugeMetricFamily(
                f"{PREFIX}_outbox_oldest_age_seconds", "Age of the oldest deferred send (0 when empty)"
            )
            age.add_metric([], outbox["oldest_age_s"])
            yield age
            totals = GaugeMetricFamily(
                f"{PREFIX}_outbox_total",
                "Deferred sends so far, by outcome (kept in the state file across restarts)",
                labels=["outcome"],
            )
            for outcome in ("deferred", "delivered_late", "expired", "dropped"):
                totals.add_metric([outcome], outbox[outcome])
            yield totals
            if counts.get("max_age_s") is not None:
                max_age = GaugeMetricFamily(
                    f"{PREFIX}_outbox_max_age_seconds",
                    "Deferred sends are dropped after this long (the rules' outbox.max_age_s)",
                )
                max_age.add_metric([], counts["max_age_s"])
                yield max_age
        if "budget_spent" in counts:
            spent = GaugeMetricFamily(
                f"{PREFIX}_peers_budget_spent", "Peers whose known send budget is spent now"
            )
            spent.add_metric([], counts["budget_spent"])
            yield spent


_COMPONENT_LABELS = {STATE: "store", REPAIRS: "repairs"}


class _HealthCollector(Collector):
    """What /healthz says, as numbers (read from the scrape thread: health() never waits)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        problems = self.metrics.problems()
        healthy = GaugeMetricFamily(f"{PREFIX}_healthy", "1 while /healthz answers ok, else 0")
        healthy.add_metric([], 1 if problems == [] else 0)
        yield healthy
        errors = CounterMetricFamily(
            f"{PREFIX}_internal_errors",
            "Internal failures by component (store, repairs): what makes /healthz unhealthy",
            labels=["component"],
        )
        engine = self.metrics._engine_health
        totals = engine.failure_totals() if engine is not None else dict.fromkeys(_COMPONENT_LABELS, 0)
        for name, label in _COMPONENT_LABELS.items():
            errors.add_metric([label], totals.get(name, 0))
        yield errors


class _SharedStoreCollector(Collector):
    """The shared store's failed operations (store_redis.RedisStore's `unavailable`: plain values,
    read from the scrape thread without the event loop, so a stuck Redis cannot stall a scrape).
    Absent with the SQLite store. (``store_up`` is _StateCollector's, for either store.)"""

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        store = getattr(tracker_of(), "store", None)
        if store is None or not getattr(store, "shared", False):
            return
        counted = CounterMetricFamily(
            f"{PREFIX}_store_unavailable",
            "Store operations that failed (Redis down, slow or partitioned): the proxy decided "
            "without the shared state, as with no proxy",
            labels=["operation"],
        )
        for operation, n in sorted(dict(store.unavailable).items()):
            counted.add_metric([operation], n)
        yield counted


# --------------------------------------------------------------------------- the addon


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "iLink API exchanges by endpoint and decision",
            ["endpoint", "decision"],
            registry=r,
        )
        self.answers = Counter(
            f"{PREFIX}_upstream_answers",
            "Upstream attempts by endpoint, HTTP status, ret, errcode and errmsg class",
            ["endpoint", "status", "ret", "errcode", "errmsg_class"],
            registry=r,
        )
        self.repairs = Counter(
            f"{PREFIX}_repairs",
            "Sends the proxy changed, by what the gateway finally got",
            ["outcome"],
            registry=r,
        )
        self.send_outcomes = Counter(
            f"{PREFIX}_send_outcomes",
            "Sends that reached iLink, by what its answer says about delivery",
            ["outcome"],
            registry=r,
        )
        for evidence in ("confirmed", "unconfirmed", "refused", "failed"):
            self.send_outcomes.labels(evidence)  # present (at 0) from the first scrape
        self.added = Histogram(
            f"{PREFIX}_added_seconds",
            "Time the proxy added to an exchange beyond waiting for upstream answers",
            ["endpoint"],
            buckets=ADDED_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            f"{PREFIX}_upstream_seconds",
            "Time of each upstream attempt",
            ["endpoint"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.outbox_events = Counter(
            f"{PREFIX}_outbox_events", "Deferred-delivery events by kind", ["event"], registry=r
        )
        self.budget_events = Counter(
            f"{PREFIX}_budget_events", "Send budget events by kind", ["event"], registry=r
        )
        for event in BUDGET_EVENTS:
            self.budget_events.labels(event)  # present (at 0) from the first scrape
        self.nudges = Counter(
            f"{PREFIX}_nudges", "Sends iLink accepted carrying the window keeper's text", registry=r
        )
        for outcome in ("delivered", "still_failing", "unconfirmed_empty_body"):
            self.repairs.labels(outcome)  # present (at 0) from the first scrape
        r.register(_StateCollector(self.state_counts))
        r.register(_SharedStoreCollector())
        r.register(_HealthCollector(self))
        self.app = make_wsgi_app(r)
        self.server: WSGIServer | None = None
        self.address: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counted: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self._outbox: Any = None
        # Health: the event loop's heartbeat (time.monotonic() of its last beat), how old it may
        # get, and what the engine reports (health.py); read by the HTTP server's threads.
        self._beat_at: float | None = None
        self._beating: asyncio.Future[None] | None = None
        self._stall_s = DEFAULT_STALL_S
        self._engine_health: Any = None
        self._probing: concurrent.futures.Future[None] | None = None  # see _probe_shared_store
        # What /status lists and charts (fed and read on the event loop)
        self.activity = status.Activity()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "ilink_metrics",
            str,
            "",
            "Serve Prometheus metrics at http://HOST:PORT/metrics and a health check at /healthz "
            "(e.g. 127.0.0.1:9464; port 0 picks a free one). Empty: off.",
        )
        loader.add_option(
            "ilink_health_stall_s",
            str,  # mitmproxy's options have no float type
            f"{DEFAULT_STALL_S:g}",
            "/healthz reports the event loop stuck when it has not run for this many seconds.",
        )

    def configure(self, updated: set[str]) -> None:
        if "ilink_health_stall_s" in updated:
            text = ctx.options.ilink_health_stall_s
            try:
                stall_s = float(text)
            except ValueError:
                stall_s = 0.0
            if not 0 < stall_s < float("inf"):
                raise exceptions.OptionsError(
                    f"ilink_health_stall_s: {text!r} is not a number of seconds above 0"
                )
            self._stall_s = stall_s
        if "ilink_metrics" not in updated:
            return
        spec = ctx.options.ilink_metrics
        try:
            wanted = parse_hostport(spec) if spec else None
        except ValueError as e:
            raise exceptions.OptionsError(f"ilink_metrics: {e}") from None
        if wanted is not None and wanted == self.address:
            return
        self._stop()
        if wanted is not None:
            self._start(*wanted)

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._engine_health = getattr(ctx.master.addons.get("ilinkfixproxy"), "health", None)
        self._beating = asyncio.ensure_future(self._heartbeat())

    async def _heartbeat(self) -> None:
        while True:
            self._beat_at = time.monotonic()
            await asyncio.sleep(_BEAT_S)

    def done(self) -> None:
        self._stop()
        if self._beating is not None:
            self._beating.cancel()
        self._loop = None

    # ------------------------------------------------------------------ serving

    def _start(self, host: str, port: int) -> None:
        try:
            server = make_server(
                host, port, self._wsgi, _server_class(host, port), handler_class=_QuietHandler
            )
        except OSError as e:
            reason = e.strerror or str(e)
            raise exceptions.OptionsError(
                f"ilink_metrics: cannot listen on {host}:{port}: {reason}"
            ) from None
        self.server = server
        self.address = (host, port)
        self._thread = threading.Thread(target=server.serve_forever, name="ilink-metrics", daemon=True)
        self._thread.start()
        shown = f"[{host}]" if ":" in host else host
        log.info(f"ilink-fixproxy: metrics on http://{shown}:{server.server_port}/metrics (health: /healthz)")

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.server, self.address, self._thread = None, None, None

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self.app(environ, start_response)
        if path in ("/healthz", "/livez"):
            code, text = self.health() if path == "/healthz" else self.liveness()
            start_response(code, [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]
        if path in ("/status", "/status/", "/status.json"):
            snap = self.snapshot()
            if path == "/status.json":
                start_response("200 OK", [("Content-Type", "application/json"), *_NO_STORE])
                return [snap.to_json().encode()]
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), *_PAGE_HEADERS])
            return [status_page.render(snap).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /status, /metrics, /healthz or /livez\n"]

    def snapshot(self) -> status.Snapshot:
        """What /status shows, gathered on the event loop; when the loop does not answer, a page
        that says why (the health problems) instead of an error."""
        problems = self.problems()
        if problems is None:
            return status.Snapshot(now=time.time(), replica=status.replica_name(), problems=(), starting=True)

        async def gather() -> status.Snapshot:
            ours = ctx.master.addons.get("ilinkfixproxy")
            return await status.collect(
                tracker=getattr(ours, "tracker", None),
                rules=tuple(getattr(getattr(ours, "ruleset", None), "rules", ())),
                activity=self.activity,
                problems=tuple(problems),
                ids=bool(getattr(ctx.options, "ilink_capture_ids", False)),
                version=__version__,
            )

        try:
            snap = self.on_loop_await(gather)
        except Exception as e:
            why = (
                "the proxy is stopping"
                if isinstance(e, RuntimeError)
                else f"no answer from the event loop ({type(e).__name__})"
            )
            return status.Snapshot(
                now=time.time(),
                replica=status.replica_name(),
                problems=tuple(problems) or (f"status unavailable: {why}",),
                version=__version__,
            )
        if snap.store_error and not snap.problems:
            # The health was read before the store failed the page's own reads: a store that
            # cannot be read is not "healthy" (as /healthz says once the failure is counted).
            later = tuple(self.problems() or ()) or ("peer-state store failing",)
            snap = dataclasses.replace(snap, problems=later)
        return snap

    def liveness(self) -> tuple[str, str]:
        """/livez: 200 "ok" while the proxy serves (its event loop runs), whatever the store or the
        repairs do: what a load balancer or the kubelet should check. A failing store does not
        stop sends (they go upstream as with no proxy), so it must not take every replica out of
        a load balancer at once, as /healthz would while Redis is down. Never waits for the loop."""
        beat = self._beat_at
        if self._loop is None or beat is None:
            return "503 Service Unavailable", "starting\n"
        stalled = time.monotonic() - beat
        if stalled > self._stall_s:
            return (
                "503 Service Unavailable",
                f"unhealthy: event loop stuck: it has not run for {stalled:.1f} s\n",
            )
        return "200 OK", "ok\n"

    def health(self) -> tuple[str, str]:
        """200 "ok" while the proxy can do its job; else 503 and one line saying why: the event
        loop has not run for ilink_health_stall_s, the state file is gone, or the state store or
        repairs keep failing for internal reasons (health.py). Never waits for the loop."""
        problems = self.problems()
        if problems is None:
            return "503 Service Unavailable", "starting\n"
        if problems:
            return "503 Service Unavailable", "unhealthy: " + "; ".join(problems) + "\n"
        return "200 OK", "ok\n"

    def problems(self) -> list[str] | None:
        """What keeps the proxy from doing its job ([]: healthy; None: not started yet)."""
        beat = self._beat_at
        if self._loop is None or beat is None:
            return None
        problems = []
        stalled = time.monotonic() - beat
        if stalled > self._stall_s:
            problems.append(f"event loop stuck: it has not run for {stalled:.1f} s")
        else:
            self._probe_shared_store()
        if self._engine_health is not None:
            problems.extend(self._engine_health.problems())
        return problems

    def _probe_shared_store(self) -> None:
        """While the shared store counts as failing, ask it again, on the loop and without waiting
        for the answer (health never waits): once it answers, it is no longer a problem. Traffic
        tells the health so too, but an idle proxy, or one its load balancer took out for being
        unhealthy, has none: it stayed unhealthy for the whole failure window (5 min) after Redis
        was back. The next /healthz, scrape or /status sees the outcome."""
        health, loop = self._engine_health, self._loop
        if health is None or loop is None or loop.is_closed():
            return
        if self._probing is not None and not self._probing.done():
            return
        store = getattr(tracker_of(), "store", None)
        if not getattr(store, "shared", False) or not health.store_failing():
            return

        async def probe() -> None:
            try:
                await store.counts()
            except Exception:  # still down: the failure stays (and the store counts it)
                return
            if getattr(store, "up", True) is not False:
                health.succeeded(STATE)

        self._probing = asyncio.run_coroutine_threadsafe(probe(), loop)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the proxy's event loop and return its result (called from scrape threads:
        the peer-state database and the tracker belong to the loop)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the proxy is not running")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

        loop.call_soon_threadsafe(run)
        return done.result(_LOOP_TIMEOUT_S)

    def state_counts(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            tracker = tracker_of()
            if tracker is None:
                return {}
            store = tracker.store
            failing = self._engine_health is not None and self._engine_health.store_failing()
            try:
                counts = {
                    "rows": await store.counts(),
                    "outbox": await store.outbox_stats(time.time()),
                    "budget_spent": await store.budget_spent_peers(),
                }
            except Exception:
                return {"store_up": 0}
            ours = ctx.master.addons.get("ilinkfixproxy")
            deferring = [
                r.peer_state.outbox.max_age_s
                for r in getattr(getattr(ours, "ruleset", None), "rules", ())
                if r.peer_state is not None and r.peer_state.on_closed == "defer"
            ]
            max_age = {"max_age_s": max(deferring)} if deferring else {}
            # A shared store says itself whether its last operation (any replica's traffic
            # here) succeeded: Redis can fail between two scrapes without the scrape noticing.
            down = failing or getattr(store, "up", True) is False
            return {**counts, **max_age, "store_up": 0 if down else 1}

        return self.on_loop_await(read)

    def on_loop_await(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Await fn() on the proxy's event loop and return its result (called from scrape
        threads: the store is awaited on the loop; at most _LOOP_TIMEOUT_S)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the proxy is not running")
        future = asyncio.run_coroutine_threadsafe(fn(), loop)
        try:
            return future.result(_LOOP_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()  # a stuck store must not pile up scrapes on the loop
            raise

    # ------------------------------------------------------------------ counting

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.server is not None:
            buffer_small_api_flow(flow, buffer_limit())

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def _count(self, flow: http.HTTPFlow) -> None:
        if self.server is None or flow in self._counted or not is_api_flow(flow):
            return
        self._counted.add(flow)
        self._watch_outbox()
        try:
            tracker = tracker_of()  # its keyed bot hash: /status names bots as `state` does
            self.observe(summarize(flow, time.time(), tracker.bot_of if tracker is not None else None))
        except Exception as e:  # metrics must never disturb the traffic
            log.warning(f"metrics: could not count an exchange: {type(e).__name__}: {e}")

    def observe(self, x: Exchange) -> None:
        endpoint = endpoint_label(x.endpoint)
        self.requests.labels(endpoint, x.decision).inc()
        for a in x.attempts:
            status = str(a["status"]) if a.get("status") is not None else "error"
            self.answers.labels(
                endpoint,
                status,
                code_label(a.get("ret")),
                code_label(a.get("errcode")),
                errmsg_class(a.get("errmsg")),
            ).inc()
            if a.get("ms") is not None:
                self.upstream.labels(endpoint).observe(a["ms"] / 1000)
        self.added.labels(endpoint).observe(x.added_ms / 1000)
        if (outcome := repair_outcome(x)) is not None:
            self.repairs.labels(outcome).inc()
        if x.delivery is not None:
            self.send_outcomes.labels(x.delivery).inc()
        ids = bool(getattr(ctx.options, "ilink_capture_ids", False))
        self.activity.record(x, time.time(), ids=ids, endpoint=endpoint)
        for event in (x.budget or {}).get("events", ()):
            self.budget_events.labels(event if event in BUDGET_EVENTS else "other").inc()
        if x.nudged:
            self.nudges.inc()

    def _watch_outbox(self) -> None:
        outbox = getattr(tracker_of(), "outbox", None)
        listeners = getattr(outbox, "listeners", None)
        if outbox is None or outbox is self._outbox or not isinstance(listeners, list):
            return
        listeners.append(lambda event: self.outbox_events.labels(str(event.get("event", "other"))).inc())
        self._outbox = outbox

"""What ``/healthz`` reports besides the event loop: failures the proxy hit doing its job.

The engine (addon.py, peers.py) reports here, on the event loop, each internal failure and each
success of two components: the peer-state store (SQLite errors on use, Redis unreachable or
failing) and repairs (an
unexpected exception while re-issuing or handling a send: a bug or a broken runtime, such as
CPython's eager-task race in ``asyncio.staggered``, issue 12 item 1; iLink refusing or being
unreachable is not one). A component is unhealthy while its latest event within the window is
a failure: the next success, or ``window_s`` without failures, makes it healthy again.
``problems()`` is read from the metrics server's threads.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .state import StateError

try:  # the shared store's errors (redis-py is a dependency; still, never a reason not to start)
    from redis.exceptions import RedisError as _RedisError
except ImportError:  # pragma: no cover
    _RedisError = sqlite3.Error  # type: ignore[assignment,misc]

_STORE_ERRORS = (sqlite3.Error, StateError, _RedisError)

WINDOW_S = 300.0
STATE = "peer-state store"
REPAIRS = "repairs"


@dataclass
class _Component:
    failures: deque[tuple[float, str]]
    ok_at: float = float("-inf")


def component_of(e: BaseException) -> str:
    """Which component an exception caught while handling traffic says is failing."""
    return STATE if isinstance(e, _STORE_ERRORS) else REPAIRS


def summary_of(e: BaseException) -> str:
    """The exception's type, and the store's own message (SQLite's and Redis's name no data) for
    store errors."""
    name = type(e).__name__
    return f"{name}: {e}" if isinstance(e, _STORE_ERRORS) and str(e) else name


class Health:
    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._components = {name: _Component(deque(maxlen=1000)) for name in (STATE, REPAIRS)}
        self._totals = dict.fromkeys((STATE, REPAIRS), 0)  # every failure so far (metrics)
        # Set while a state file is open: says what is wrong with the file itself (thread-safe).
        self.state_file_check: Callable[[], str | None] | None = None

    def failed(self, component: str, e: BaseException) -> None:
        with self._lock:
            self._components[component].failures.append((self._clock(), summary_of(e)))
            self._totals[component] += 1

    def failure_totals(self) -> dict[str, int]:
        """Internal failures so far, per component (``internal_errors_total`` in metrics.py)."""
        with self._lock:
            return dict(self._totals)

    def succeeded(self, *components: str) -> None:
        now = self._clock()
        with self._lock:
            for name in components:
                self._components[name].ok_at = now

    def store_failing(self) -> bool:
        """The peer-state store is one of the problems (metrics' ``store_up``)."""
        check = self.state_file_check
        if check is not None and check():
            return True
        return any(line.startswith(STATE) for line in self._component_problems())

    def problems(self) -> list[str]:
        """One line per thing that keeps the proxy from doing its job ([]: healthy)."""
        found: list[str] = []
        check = self.state_file_check
        if check is not None and (why := check()):
            found.append(why)
        return found + self._component_problems()

    def _component_problems(self) -> list[str]:
        found: list[str] = []
        now = self._clock()
        with self._lock:
            for name, c in self._components.items():
                recent = [(t, s) for t, s in c.failures if now - t <= self.window_s]
                if not recent or recent[-1][0] < c.ok_at:
                    continue
                last_at, last = recent[-1]
                found.append(
                    f"{name} failing: {len(recent)} internal error(s) in the last {self.window_s:.0f} s, "
                    f"the last {now - last_at:.0f} s ago ({last})"
                )
        return found

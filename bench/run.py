"""Benchmark ``ilink-fixproxy`` against bare ``mitmdump`` and against talking to iLink directly.

    python -m bench            # full run: 3 interleaved rounds (about 7 minutes)
    python -m bench --quick    # 1 round, short windows (about a minute)

Everything runs on 127.0.0.1: a fast fake iLink (``bench/fake_ilink.py``, its own process), bare
``mitmdump`` in reverse mode in front of it, ``ilink-fixproxy`` in front of it, and this process
as the load generator (``bench/loadgen.py``). Each round measures every case on every path, the
paths in a rotating order, so drift (other work on the machine, CPU frequency) hits all of them.
See docs/performance.md for what the cases mean and the numbers measured on our machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilink_fixproxy.launcher import READY_MITMDUMP, ProxyProcess, clean_env, ilink_fixproxy_argv

from .loadgen import Conn, Sample, closed_loop, percentile, rss_mb

ROOT = Path(__file__).resolve().parent.parent
SEND = "/ilink/bot/sendmessage"
UPDATES = "/ilink/bot/getupdates"
UPLOAD = "/c2c/upload?filekey=bench"
STATS = "/__bench/stats"
READY_FAKE = re.compile(r"listening on (http://\S+)")
FRESH_TOKEN = "fresh-bench-token"
PATHS = ("direct", "mitmdump", "ours")
# "before": ilink-fixproxy imported from --baseline DIR (an older copy of the package), for A/B runs.
ALL_PATHS = ("direct", "mitmdump", "before", "ours")
CASES = ("a1", "a16", "b", "c", "d", "e")
# Context tokens are long opaque strings; a realistic length keeps the JSON work realistic.
_TOKEN_PAD = "AARzJWAFAAABAAAAAAAp2Z0xQ8m7qkXo3vYbTtWgNCAAAAB+" * 2


def send_body(token: str | None, client_id: str, peer: str) -> bytes:
    """A sendmessage body shaped like hermes' (json.dumps defaults, token inside ``msg``).

    Every send carries its own client_id, as a gateway's do: the proxy's peer state answers a
    client_id iLink already accepted from memory, which would measure a cache, not a send.
    """
    msg: dict[str, Any] = {
        "from_user_id": "",
        "to_user_id": f"{peer}@im.wechat",
        "client_id": client_id,
        "message_type": 2,
        "message_state": 2,
        "item_list": [{"type": 1, "text_item": {"text": "cron: daily report, all systems normal"}}],
    }
    if token is not None:
        msg["context_token"] = token
    return json.dumps({"msg": msg, "base_info": {"channel_version": "2.2.0"}}).encode()


def is_ok(body: bytes) -> bool:
    return b'"ret":0' in body or b'"ret": 0' in body


def is_stale(body: bytes) -> bool:
    return b'"ret":-2' in body or b'"ret": -2' in body


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup: float
    window: float
    polls: int
    poll_hold: float
    upload_mb: float
    cases: tuple[str, ...]
    paths: tuple[str, ...]
    json_out: Path | None
    command: str
    rules: str
    baseline: Path | None

    @property
    def upload_bytes(self) -> int:
        return int(self.upload_mb * 1024 * 1024)


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round with short windows (about a minute)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per window (default 1, --quick 0.3)")
    p.add_argument("--window", type=float, help="measured seconds per case and path (default 5, --quick 2)")
    p.add_argument("--polls", type=int, default=500, help="getupdates long polls held open in case d")
    p.add_argument("--poll-hold", type=float, default=35.0, help="seconds the fake holds a long poll")
    p.add_argument("--upload-mb", type=float, default=50.0, help="size of the case e upload in MiB")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(ALL_PATHS)}")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also measure the ilink_fixproxy package found in this directory (path 'before'), "
        "e.g. a `git worktree` of an older commit's addon/ directory",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument(
        "--rules",
        default="shipped",
        help="ilink-fixproxy's rules: 'shipped' (rules.yaml, peer state included), 'plain' (the "
        "same without peer state: the plain re-issue, mitmproxy forwards every send) or a path",
    )
    a = p.parse_args(argv)
    cases = tuple(c for c in a.cases.split(",") if c)
    paths = tuple(x for x in a.paths.split(",") if x)
    if a.baseline is not None and "before" not in paths:
        paths = (*paths, "before")
    if bad := [c for c in cases if c not in CASES] + [x for x in paths if x not in ALL_PATHS]:
        p.error(f"unknown case or path: {', '.join(bad)}")
    if not 1 <= a.polls <= 5000 or not 0 < a.upload_mb <= 1024:
        p.error("--polls must be 1..5000 and --upload-mb 0..1024")
    return Settings(
        rounds=max(1, min(20, a.rounds or (1 if a.quick else 3))),
        warmup=a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0),
        window=a.window if a.window is not None else (2.0 if a.quick else 5.0),
        polls=a.polls,
        poll_hold=a.poll_hold,
        upload_mb=a.upload_mb,
        cases=cases,
        paths=paths,
        json_out=a.json,
        command="python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        rules=a.rules,
        baseline=a.baseline,
    )


# ---------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One way of reaching the fake iLink: directly, or through one of the proxies."""

    name: str
    host: str
    port: int
    pid: int | None  # the proxy process to watch (RSS, CPU); None when direct

    @classmethod
    def from_url(cls, name: str, url: str, pid: int | None) -> Target:
        hostport = url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        return cls(name, host.strip("[]"), int(port), pid)


class Fake:
    """Talks to the fake iLink's stats endpoint (always directly, never through a proxy)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def stats(self) -> dict[str, int]:
        conn = await Conn.open(self.host, self.port)
        try:
            async with asyncio.timeout(10):
                answer = await conn.request("GET", STATS)
        finally:
            conn.close()
        return json.loads(answer.body)

    async def wait_polls(self, predicate: Callable[[int], bool], timeout: float) -> int:
        """Wait (bounded) until the number of held polls satisfies `predicate`; return it."""
        end = time.monotonic() + timeout
        while True:
            n = (await self.stats()).get("polls_open", 0)
            if predicate(n) or time.monotonic() > end:
                return n
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------- results


@dataclass
class Result:
    """One case on one path in one round."""

    sample: Sample | None = None
    upstream_per_send: float | None = None
    extra: dict[str, float | None] = field(default_factory=dict)


class Results:
    def __init__(self) -> None:
        self.by: dict[tuple[str, str], list[Result]] = {}

    def add(self, case: str, path: str, r: Result) -> None:
        self.by.setdefault((case, path), []).append(r)

    def samples(self, case: str, path: str) -> list[Sample]:
        return [r.sample for r in self.by.get((case, path), []) if r.sample is not None]

    def rps(self, case: str, path: str) -> float | None:
        s = self.samples(case, path)
        secs = sum(x.seconds for x in s)
        return sum(x.requests for x in s) / secs if secs else None

    def pct(self, case: str, path: str, q: float) -> float | None:
        lat = [v for x in self.samples(case, path) for v in x.latencies_ms]
        return percentile(lat, q) if lat else None

    def cpu_ms_per_req(self, case: str, path: str) -> float | None:
        s = [x for x in self.samples(case, path) if x.proxy_cpu_s is not None]
        n = sum(x.requests for x in s)
        return sum(x.proxy_cpu_s or 0.0 for x in s) * 1000 / n if n else None

    def errors(self) -> int:
        return sum(x.errors for rs in self.by for x in self.samples(*rs))

    def mean_extra(
        self, case: str, path: str, key: str, agg: Callable[[list[float]], float] = max
    ) -> float | None:
        vals = [r.extra[key] for r in self.by.get((case, path), []) if r.extra.get(key) is not None]
        return agg(vals) if vals else None  # type: ignore[arg-type]

    def per_send(self, case: str, path: str) -> float | None:
        vals = [r.upstream_per_send for r in self.by.get((case, path), []) if r.upstream_per_send is not None]
        return sum(vals) / len(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (case, path), rs in self.by.items():
            out[f"{case}/{path}"] = {
                "rps": self.rps(case, path),
                "p50_ms": self.pct(case, path, 50),
                "p99_ms": self.pct(case, path, 99),
                "proxy_cpu_ms_per_req": self.cpu_ms_per_req(case, path),
                "upstream_per_send": self.per_send(case, path),
                "errors": sum(x.errors for x in self.samples(case, path)),
                "rounds": [
                    {
                        "rps": r.sample.rps if r.sample else None,
                        "p50_ms": percentile(r.sample.latencies_ms, 50) if r.sample else None,
                        "p99_ms": percentile(r.sample.latencies_ms, 99) if r.sample else None,
                        **r.extra,
                    }
                    for r in rs
                ],
            }
        return out


# ---------------------------------------------------------------------------------- cases


class Bench:
    def __init__(self, s: Settings, fake: Fake, targets: dict[str, Target]) -> None:
        self.s = s
        self.fake = fake
        self.targets = targets
        self.results = Results()

    async def _loop(self, t: Target, step: Any, concurrency: int) -> tuple[Sample, float | None]:
        """A closed-loop window plus how many upstream sends each client send caused."""
        before = (await self.fake.stats()).get("send_total", 0)
        sample = await closed_loop(
            t.host,
            t.port,
            step,
            concurrency=concurrency,
            warmup=self.s.warmup,
            window=self.s.window,
            watch_pid=t.pid,
        )
        after = (await self.fake.stats()).get("send_total", 0)
        return sample, ((after - before) / sample.issued if sample.issued else None)

    async def case_pass(self, t: Target, rnd: int, concurrency: int) -> Result:
        """(a) sendmessage with a fresh token: the proxy buffers and inspects it, nothing to repair."""

        async def step(conn: Conn, w: int, i: int) -> bool:
            body = send_body(FRESH_TOKEN, f"a{concurrency}-{t.name}-{rnd}-{w}-{i}", f"wxid_a{w}")
            answer = await conn.request("POST", SEND, body)
            return answer.status == 200 and is_ok(answer.body)

        sample, per = await self._loop(t, step, concurrency)
        return Result(sample, per)

    async def case_repair(self, t: Target, rnd: int) -> Result:
        """(b) a send with a stale token iLink refuses: one re-issue without it.

        Every request carries a token never seen before, for a peer never seen before, so even a
        proxy that remembers stale tokens or closed peers must re-issue. Direct and through bare
        mitmdump there is nobody to repair it, so the client does what a fixed gateway would:
        send, see ret=-2, send again without the token.
        """
        ours = t.name in ("ours", "before")

        async def step(conn: Conn, w: int, i: int) -> bool:
            unique = f"{t.name}-{rnd}-{w}-{i}"
            peer = f"wxid_b-{unique}"
            answer = await conn.request(
                "POST", SEND, send_body(f"stale-b-{unique}-{_TOKEN_PAD}", f"b-{unique}", peer)
            )
            if ours:
                return answer.status == 200 and is_ok(answer.body)
            if not is_stale(answer.body):
                return False
            answer = await conn.request("POST", SEND, send_body(None, f"b-{unique}", peer))
            return answer.status == 200 and is_ok(answer.body)

        sample, per = await self._loop(t, step, 1)
        return Result(sample, per)

    async def case_known_stale(self, t: Target, rnd: int) -> Result:
        """(c) the same stale token again after the proxy has seen it refused once.

        With peer state (the proxy remembers the stale token, or substitutes a fresher one seen in
        getupdates) these sends need no re-issue; without it each is repaired again. The number of
        upstream sends per client send says which one was measured.
        """
        token = f"stale-c-{t.name}-{rnd}-{_TOKEN_PAD}"
        peer = f"wxid_c-{t.name}-{rnd}"
        teach = await Conn.open(t.host, t.port)
        try:
            async with asyncio.timeout(30):
                first = await teach.request("POST", SEND, send_body(token, f"c-{t.name}-{rnd}-teach", peer))
        finally:
            teach.close()
        if not is_ok(first.body):
            raise RuntimeError(f"case c: the first stale send was not repaired: {first.body[:200]!r}")

        async def step(conn: Conn, w: int, i: int) -> bool:
            answer = await conn.request("POST", SEND, send_body(token, f"c-{t.name}-{rnd}-{w}-{i}", peer))
            return answer.status == 200 and is_ok(answer.body)

        sample, per = await self._loop(t, step, 1)
        return Result(sample, per)

    async def case_polls(self, t: Target, rnd: int) -> Result:
        """(d) sends while `polls` getupdates long polls are held open through the same proxy."""
        fresh = self._fresh_step(t, rnd, "idle")
        idle, _ = await self._loop(t, fresh, 1)
        rss_idle = rss_mb(t.pid)
        stop = asyncio.Event()
        conns: list[Conn] = []
        for start in range(0, self.s.polls, 50):  # batches: do not overflow listen backlogs
            n = min(50, self.s.polls - start)
            conns += await asyncio.gather(*(Conn.open(t.host, t.port) for _ in range(n)))
        poll_body = b'{"get_updates_buf":"","base_info":{"channel_version":"2.2.0"}}'

        async def poller(conn: Conn) -> None:
            for _ in range(10_000):  # bounded; in practice ends when `stop` closes the connection
                if stop.is_set():
                    return
                try:
                    await conn.request("POST", UPDATES, poll_body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    return

        tasks = [asyncio.create_task(poller(c)) for c in conns]
        try:
            held = await self.fake.wait_polls(lambda n: n >= self.s.polls, 60)
            loaded, _ = await self._loop(t, self._fresh_step(t, rnd, "polls"), 1)
            rss_polls = rss_mb(t.pid)
        finally:
            stop.set()
            for c in conns:
                c.close()
            await asyncio.wait(tasks, timeout=15)
            for task in tasks:
                task.cancel()
        left = await self.fake.wait_polls(lambda n: n == 0, 20)
        extra = {
            "polls_held": float(held),
            "polls_left_after_close": float(left),
            "idle_p50_ms": percentile(idle.latencies_ms, 50),
            "idle_p99_ms": percentile(idle.latencies_ms, 99),
            "polls_p50_ms": percentile(loaded.latencies_ms, 50),
            "polls_p99_ms": percentile(loaded.latencies_ms, 99),
            "rss_idle_mb": rss_idle,
            "rss_polls_mb": rss_polls,
        }
        loaded.errors += idle.errors
        return Result(loaded, None, extra)

    @staticmethod
    def _fresh_step(t: Target, rnd: int, phase: str) -> Any:
        async def step(conn: Conn, w: int, i: int) -> bool:
            body = send_body(FRESH_TOKEN, f"d-{phase}-{t.name}-{rnd}-{w}-{i}", "wxid_d")
            answer = await conn.request("POST", SEND, body)
            return answer.status == 200 and is_ok(answer.body)

        return step

    async def case_upload(self, t: Target, rnd: int) -> Result:
        """(e) one large media upload through the proxy: throughput and the proxy's RSS growth."""
        conn = await Conn.open(t.host, t.port)
        peak: list[float] = []
        try:
            async with asyncio.timeout(120):
                warm = await conn.upload(UPLOAD, 1024 * 1024)  # first-use allocations are not growth
                if warm.status != 200:
                    raise RuntimeError(f"case e: warm-up upload answered {warm.status}")
                base = rss_mb(t.pid)
                before = (await self.fake.stats()).get("upload_bytes", 0)
                done = asyncio.Event()

                async def sample_rss() -> None:
                    for _ in range(100_000):  # bounded; ends with the upload
                        if done.is_set():
                            return
                        if (v := rss_mb(t.pid)) is not None:
                            peak.append(v)
                        await asyncio.sleep(0.01)

                sampler = asyncio.create_task(sample_rss())
                t0 = time.perf_counter()
                answer = await conn.upload(UPLOAD, self.s.upload_bytes)
                seconds = time.perf_counter() - t0
                done.set()
                await sampler
                if (v := rss_mb(t.pid)) is not None:
                    peak.append(v)
        finally:
            conn.close()
        arrived = (await self.fake.stats()).get("upload_bytes", 0) - before
        sample = Sample(requests=1, seconds=seconds, latencies_ms=[seconds * 1000], issued=1)
        sample.errors = int(answer.status != 200 or arrived != self.s.upload_bytes)
        return Result(
            sample,
            None,
            {
                "mb_per_s": self.s.upload_bytes / 1e6 / seconds,
                "rss_base_mb": base,
                "rss_peak_mb": max(peak) if peak else None,
                "rss_growth_mb": (max(peak) - base) if peak and base is not None else None,
            },
        )

    # ------------------------------------------------------------------------------ driver

    async def run(self) -> Results:
        for rnd in range(self.s.rounds):
            paths = [p for p in ALL_PATHS if p in self.s.paths]
            order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
            print(f"round {rnd + 1}/{self.s.rounds}: paths in order {', '.join(order)}", flush=True)
            for case in self.s.cases:
                for path in order:
                    if case == "c" and path not in ("ours", "before"):
                        continue  # only a proxy can remember a token
                    t = self.targets[path]
                    started = time.perf_counter()
                    r = await self.run_case(case, t, rnd)
                    self.results.add(case, path, r)
                    print(
                        f"  {case:<3} {path:<8} {_brief(r)} [{time.perf_counter() - started:.1f} s]",
                        flush=True,
                    )
        return self.results

    async def run_case(self, case: str, t: Target, rnd: int) -> Result:
        if case == "a1":
            return await self.case_pass(t, rnd, 1)
        if case == "a16":
            return await self.case_pass(t, rnd, 16)
        if case == "b":
            return await self.case_repair(t, rnd)
        if case == "c":
            return await self.case_known_stale(t, rnd)
        if case == "d":
            return await self.case_polls(t, rnd)
        return await self.case_upload(t, rnd)


def _brief(r: Result) -> str:
    s = r.sample
    if s is None:
        return "-"
    p50, p99 = percentile(s.latencies_ms, 50), percentile(s.latencies_ms, 99)
    text = f"{s.rps:8.1f} req/s  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms"
    if s.errors:
        text += f"  ERRORS {s.errors}"
    if r.upstream_per_send is not None:
        text += f"  upstream/send {r.upstream_per_send:.2f}"
    if "mb_per_s" in r.extra:
        text = f"{r.extra['mb_per_s']:8.1f} MB/s  RSS growth {_f(r.extra.get('rss_growth_mb'), 1)} MB"
    if "polls_p99_ms" in r.extra:
        text += (
            f"  idle p99 {_f(r.extra['idle_p99_ms'], 3)} ms, polls held {r.extra['polls_held']:.0f},"
            f" RSS {_f(r.extra['rss_polls_mb'], 1)} MB"
        )
    return text


# ---------------------------------------------------------------------------------- report


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or v != v else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISS")


def machine() -> dict[str, str]:
    import mitmproxy.version

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "kernel": platform.release(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def report(s: Settings, res: Results, info: dict[str, str], elapsed: float) -> str:
    """The ratio table: one row per case and metric, one column per path, then the ratios."""
    cols = [p for p in ALL_PATHS if p in s.paths or p in PATHS]
    ratio_to = [p for p in ("mitmdump", "direct", "before") if p in cols]
    head = ("case", "metric", *cols, *(f"ours/{p}" for p in ratio_to), "target", "")
    rows: list[tuple[str, ...]] = []

    def row(case: str, metric: str, values: dict[str, float | None], digits: int = 2,
            target: str = "", ok: bool | None = None) -> None:  # fmt: skip
        ours = values.get("ours")
        rows.append((
            case, metric, *(_f(values.get(p), digits) for p in cols),
            *(_x(_ratio(ours, values.get(p))) for p in ratio_to), target, _verdict(ok),
        ))  # fmt: skip

    def per_path(
        f: Callable[[str], float | None], only: tuple[str, ...] = ALL_PATHS
    ) -> dict[str, float | None]:
        return {p: f(p) if p in only else None for p in cols}

    proxies = ("mitmdump", "before", "ours")
    ourselves = ("before", "ours")
    for case, label in (("a1", "a. pass-through c=1"), ("a16", "a. pass-through c=16")):
        if case not in s.cases:
            continue
        rps = per_path(lambda p, c=case: res.rps(c, p))
        p50 = per_path(lambda p, c=case: res.pct(c, p, 50))
        r_rps, r_p50 = _ratio(rps["ours"], rps["mitmdump"]), _ratio(p50["ours"], p50["mitmdump"])
        row(label, "req/s", rps, 1, ">=1.0x mitmdump (stretch 1.5x)", None if r_rps is None else r_rps >= 1.0)
        row("", "p50 ms", p50, 3, "<=1.05x mitmdump", None if r_p50 is None else r_p50 <= 1.05)
        row("", "p99 ms", per_path(lambda p, c=case: res.pct(c, p, 99)), 3)
        row("", "proxy CPU ms/req", per_path(lambda p, c=case: res.cpu_ms_per_req(c, p), proxies), 3)

    base_p50 = res.pct("a1", "ours", 50)
    if "b" in s.cases:
        p50 = per_path(lambda p: res.pct("b", p, 50))
        r = _ratio(p50["ours"], base_p50)
        row("b. repair, 1 re-issue (c=1)", "p50 ms", p50, 3, f"<=2.5x ours a1 p50: {_x(r)}",
            None if r is None else r <= 2.5)  # fmt: skip
        row("   direct, mitmdump: the", "p99 ms", per_path(lambda p: res.pct("b", p, 99)), 3)
        row("   client re-sends itself", "sends/s", per_path(lambda p: res.rps("b", p)), 1,
            f"ours a1/b req/s: {_x(_ratio(res.rps('a1', 'ours'), res.rps('b', 'ours')))}")  # fmt: skip
        row("", "upstream reqs/send", per_path(lambda p: res.per_send("b", p)), 2)
    if "c" in s.cases:
        p50 = per_path(lambda p: res.pct("c", p, 50), ourselves)
        r = _ratio(p50["ours"], base_p50)
        per = res.per_send("c", "ours")
        state = (
            "-" if per is None
            else "peer state ABSENT: each send still re-issued" if per >= 1.5
            else "remembered: no re-issue"
        )  # fmt: skip
        row("c. known-stale token (c=1)", "p50 ms", p50, 3, f"<=1.2x ours a1 p50: {_x(r)}",
            None if r is None else r <= 1.2)  # fmt: skip
        row("", "p99 ms", per_path(lambda p: res.pct("c", p, 99), ourselves), 3)
        row("", "upstream reqs/send", per_path(lambda p: res.per_send("c", p), ourselves), 2, state)
    if "d" in s.cases:
        idle = per_path(lambda p: res.mean_extra("d", p, "idle_p99_ms"))
        loaded = per_path(lambda p: res.mean_extra("d", p, "polls_p99_ms"))
        rss = per_path(lambda p: res.mean_extra("d", p, "rss_polls_mb"), proxies)
        r = _ratio(loaded["ours"], idle["ours"])
        row(f"d. {s.polls} polls held, sends c=1", "idle send p99 ms", idle, 3)
        row("", "send p99 ms w/ polls", loaded, 3, f"<=2x idle: {_x(r)}", None if r is None else r <= 2.0)
        row("", "p99 polls/idle", {p: _ratio(loaded[p], idle[p]) for p in cols}, 2)
        row("", "proxy RSS MB", rss, 1, "<=200 MB", None if rss["ours"] is None else rss["ours"] <= 200)
        row("", "polls held (min)", per_path(lambda p: res.mean_extra("d", p, "polls_held", min)), 0)
    if "e" in s.cases:
        mbps = per_path(lambda p: res.mean_extra("e", p, "mb_per_s", lambda v: sum(v) / len(v)))
        growth = per_path(lambda p: res.mean_extra("e", p, "rss_growth_mb"), proxies)
        row(f"e. {s.upload_mb:g} MiB upload", "MB/s", mbps, 1)
        row("", "proxy RSS growth MB", growth, 1, "<=10 MB",
            None if growth["ours"] is None else growth["ours"] <= 10)  # fmt: skip

    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = set(range(2, 2 + len(cols) + len(ratio_to)))

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)
        ).rstrip()

    lines = [
        "",
        "=" * 100,
        f"ilink-fixproxy benchmark: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, mitmproxy {info['mitmproxy']}",
        f"command: {s.command}",
        f"rounds {s.rounds} (paths interleaved), warm-up {s.warmup:g} s + window {s.window:g} s per case and"
        f" path; load average before: {info['loadavg']}, after: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + f"; took {elapsed:.0f} s; request errors: {res.errors()}",
        f"ilink-fixproxy rules: {s.rules}"
        + (" (peer state on: every sendmessage is sent by the proxy itself)" if s.rules == "shipped" else ""),
        *([f"before = ilink-fixproxy imported from {s.baseline}"] if s.baseline else []),
        "",
        fmt(head),
        fmt(tuple("-" * w for w in widths)),
        *(fmt(r) for r in rows),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def rules_file(choice: str, tmp: Path) -> Path:
    """The rules file for --rules: the shipped one, or it without peer state ('plain')."""
    shipped = ROOT / "rules.yaml"
    if choice == "shipped":
        return shipped
    if choice != "plain":
        return Path(choice)
    import yaml

    doc = yaml.safe_load(shipped.read_text())
    doc.pop("updates", None)  # only peer state reads getupdates
    for rule in doc.get("rules", []):
        rule.pop("peer_state", None)
    plain = tmp / "rules-plain.yaml"
    plain.write_text(yaml.safe_dump(doc, sort_keys=False))
    return plain


def start_all(s: Settings, tmp: Path) -> tuple[ProxyProcess, dict[str, ProxyProcess]]:
    fake = ProxyProcess(
        [sys.executable, "-m", "bench.fake_ilink", "--port", "0", "--poll-hold", str(s.poll_hold)],
        ready=READY_FAKE,
        cwd=str(ROOT),
    )
    procs: dict[str, ProxyProcess] = {}
    rules = rules_file(s.rules, tmp)
    try:
        if "mitmdump" in s.paths:
            mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or shutil.which(
                "mitmdump"
            )
            if not mitmdump:
                raise RuntimeError("mitmdump not found next to this Python or on PATH")
            procs["mitmdump"] = ProxyProcess(
                [
                    mitmdump,
                    "--listen-host",
                    "127.0.0.1",
                    "--listen-port",
                    "0",
                    "--mode",
                    f"reverse:{fake.url}",
                    "--set",
                    f"confdir={tmp / 'mitmdump'}",
                    # like `mitmdump -q` for flows (the baseline in mitmproxy-notes.md §7), while still
                    # logging the "listening at" line we wait for; ilink-fixproxy defaults to 0 too
                    "--set",
                    "flow_detail=0",
                ],
                ready=READY_MITMDUMP,
            )
        for name in ("before", "ours"):
            if name not in s.paths:
                continue
            env = None
            if name == "before":
                assert s.baseline is not None
                if not (s.baseline / "ilink_fixproxy" / "__init__.py").is_file():
                    raise RuntimeError(f"--baseline {s.baseline}: no ilink_fixproxy package in it")
                # Found before the installed (editable) package: PYTHONPATH precedes site-packages.
                env = clean_env({"PYTHONPATH": str(s.baseline.resolve())})
            procs[name] = ProxyProcess(
                ilink_fixproxy_argv(
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    fake.url,
                    "--confdir",
                    str(tmp / name),
                    "--rules",
                    str(rules),
                ),
                env=env,
                cwd=str(tmp),  # not the checkout: nothing there may shadow the package under test
            )
    except BaseException:
        for p in procs.values():
            p.stop()
        fake.stop()
        raise
    return fake, procs


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    info = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ilink-bench-") as tmpdir:
        fake_proc, procs = start_all(s, Path(tmpdir))
        try:
            fake_t = Target.from_url("direct", fake_proc.url, None)
            targets = {"direct": fake_t}
            for name, p in procs.items():
                targets[name] = Target.from_url(name, p.url, p.proc.pid)
            print(
                f"fake iLink {fake_proc.url} (pid {fake_proc.proc.pid}); "
                + "; ".join(f"{n} {p.url} (pid {p.proc.pid})" for n, p in procs.items()),
                flush=True,
            )
            bench = Bench(s, Fake(fake_t.host, fake_t.port), targets)
            results = asyncio.run(bench.run())
        finally:
            for p in procs.values():
                p.stop()
            fake_proc.stop()
    text = report(s, results, info, time.perf_counter() - started)
    print(text, flush=True)
    if s.json_out:
        s.json_out.write_text(
            json.dumps({"command": s.command, "machine": info, "results": results.to_json()}, indent=2)
        )
    return 1 if results.errors() else 0


if __name__ == "__main__":
    sys.exit(main())

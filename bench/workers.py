"""Scale-out benchmark: ``--workers 2`` vs one worker vs bare mitmdump, and two replicas behind a
load balancer (haproxy on loopback) vs one.

    python -m bench.workers                 # 3 interleaved rounds, 5 s windows (about 2 minutes)
    python -m bench.workers --quick         # 1 round, 2 s windows
    python -m bench.workers --rules shipped --state redis://127.0.0.1:6379/0   # with a shared store

Everything on 127.0.0.1: the fast fake iLink (bench/fake_ilink.py), and this process as the load
generator (bench/loadgen.py): ``--concurrency`` keep-alive connections sending back to back (the
kernel hands each new connection to one worker, so it takes many connections to spread them).
Each round measures every path in a rotating order, so drift hits all of them; the ratios are of
throughputs measured in the same run. The load generator and the fake iLink run on the same
machine and take CPU the workers would otherwise get: on a 2-core machine that bounds what two
workers can gain, which the "proxy CPU per send" column shows.

Paths: ``mitmdump`` (bare, reverse mode), ``w1`` (``ilink-fixproxy``, one process), ``w2``
(``--workers 2``), ``lb1`` / ``lb2`` (haproxy in front of one / two ``ilink-fixproxy`` replicas).
Case: sendmessage with a token iLink accepts (pass-through: the proxy buffers and inspects every
send), or ``--case repair`` (a stale token: the proxy re-issues every send).

``--rules plain`` (the default) is the shipped rules without peer state, which need no shared
store; ``--rules shipped`` needs ``--state`` naming a store every process shares (Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ilink_fixproxy.launcher import READY_MITMDUMP, ProxyProcess, clean_env, ilink_fixproxy_argv

from .loadgen import Conn, Sample, closed_loop, cpu_seconds, percentile
from .run import FRESH_TOKEN, READY_FAKE, SEND, is_ok, rules_file, send_body

PATHS = ("mitmdump", "w1", "w2", "lb1", "lb2")
RATIOS = (("w2", "w1"), ("w2", "mitmdump"), ("w1", "mitmdump"), ("lb2", "lb1"))


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup: float
    window: float
    concurrency: int
    case: str
    rules: str
    state: str | None
    paths: tuple[str, ...]


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round with 2 s windows")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per window (default 1, --quick 0.3)")
    p.add_argument("--window", type=float, help="measured seconds per path (default 5, --quick 2)")
    p.add_argument("--concurrency", type=int, default=32, help="keep-alive connections (default 32)")
    p.add_argument("--case", choices=["pass", "repair"], default="pass")
    p.add_argument("--rules", default="plain", help="'plain' (default), 'shipped' or a path")
    p.add_argument(
        "--state", default=None, help="--state for every ilink-fixproxy process (e.g. redis://...)"
    )
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    a = p.parse_args(argv)
    paths = tuple(x for x in a.paths.split(",") if x)
    if bad := [x for x in paths if x not in PATHS]:
        p.error(f"unknown path: {', '.join(bad)}")
    if any(x.startswith("lb") for x in paths) and not shutil.which(
        "haproxy", path="/usr/sbin:/usr/bin:/sbin"
    ):
        p.error("the lb1/lb2 paths need haproxy (Debian package haproxy); leave them out with --paths")
    return Settings(
        rounds=max(1, min(20, a.rounds or (1 if a.quick else 3))),
        warmup=a.warmup if a.warmup is not None else (0.3 if a.quick else 1.0),
        window=a.window if a.window is not None else (2.0 if a.quick else 5.0),
        concurrency=max(1, a.concurrency),
        case=a.case,
        rules=a.rules,
        state=a.state,
        paths=paths,
    )


@dataclass
class Target:
    name: str
    host: str
    port: int
    pids: list[int] = field(default_factory=list)  # processes whose CPU is the path's cost
    samples: list[Sample] = field(default_factory=list)
    cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # the load generator's and the fake iLink's, in the same windows
    sends: int = 0

    @property
    def rps(self) -> float:
        secs = sum(s.seconds for s in self.samples)
        return sum(s.requests for s in self.samples) / secs if secs else 0.0

    def pct(self, q: float) -> float:
        return percentile([v for s in self.samples for v in s.latencies_ms], q)


def tree_pids(root: int) -> list[int]:
    """`root` and its descendants (the workers of --workers N are the parent's children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_config(frontends: dict[int, list[int]]) -> str:
    """One haproxy process, one frontend per listen port, each in front of its backend ports."""
    out = [
        "global",
        "    nbthread 1",  # a load balancer uses little CPU; one thread keeps it to one core at most
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
    ]
    for listen, servers in frontends.items():
        out += [f"frontend f{listen}", f"    bind 127.0.0.1:{listen}", f"    default_backend b{listen}"]
        out += [f"backend b{listen}", "    balance roundrobin"]
        out += [f"    server s{port} 127.0.0.1:{port}" for port in servers]
    return "\n".join(out) + "\n"


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"haproxy did not listen on {port} within {timeout:.0f} s")


class Setup(contextlib.ExitStack):
    def __init__(self, s: Settings, tmp: Path) -> None:
        super().__init__()
        self.s, self.tmp = s, tmp
        self.paths: dict[str, Target] = {}

    def proxy(self, name: str, *extra: str) -> ProxyProcess:
        args = ["--listen", "127.0.0.1:0", "--upstream", self.fake.url, "--confdir", str(self.tmp / name)]
        args += ["--rules", str(rules_file(self.s.rules, self.tmp)), *extra]
        if self.s.state:
            args += ["--state", self.s.state]
        return self.enter_context(ProxyProcess(ilink_fixproxy_argv(*args), cwd=str(self.tmp)))

    def start(self) -> None:
        s = self.s
        self.fake = self.enter_context(
            ProxyProcess(
                [sys.executable, "-m", "bench.fake_ilink", "--port", "0"],
                ready=READY_FAKE,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        )
        if "mitmdump" in s.paths:
            mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or "mitmdump"
            argv = [mitmdump, "--listen-host", "127.0.0.1", "--listen-port", "0"]
            argv += ["--mode", f"reverse:{self.fake.url}", "--set", f"confdir={self.tmp / 'mitmdump'}"]
            argv += ["--set", "flow_detail=0"]
            p = self.enter_context(ProxyProcess(argv, ready=READY_MITMDUMP))
            self.add("mitmdump", p.url, [p.proc.pid])
        for name, n in (("w1", 1), ("w2", 2)):
            if name in s.paths:
                p = self.proxy(name, "--workers", str(n))
                self.add(name, p.url, tree_pids(p.proc.pid))
        if {"lb1", "lb2"} & set(s.paths):
            replicas = [self.proxy(f"replica{i}") for i in (0, 1)]
            ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
            fronts = {free_port(): ports[:1], free_port(): ports}
            cfg = self.tmp / "haproxy.cfg"
            cfg.write_text(haproxy_config(fronts))
            haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin") or "haproxy"
            proc = subprocess.Popen(
                [haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, env=clean_env()
            )
            self.callback(lambda: (proc.terminate(), proc.wait(10)))
            for port in fronts:
                wait_listening(port, proc)
            (lb1, lb2) = fronts
            pids = [proc.pid, *(r.proc.pid for r in replicas)]
            self.add("lb1", f"http://127.0.0.1:{lb1}", [proc.pid, replicas[0].proc.pid])
            self.add("lb2", f"http://127.0.0.1:{lb2}", pids)

    def add(self, name: str, url: str, pids: list[int]) -> None:
        if name in self.s.paths:
            host, _, port = url.split("://", 1)[1].rpartition(":")
            self.paths[name] = Target(name, host, int(port), pids)


async def measure(s: Settings, paths: dict[str, Target], fake_pid: int) -> None:
    order = [p for p in PATHS if p in paths]
    for rnd in range(s.rounds):
        k = rnd % len(order)
        for name in order[k:] + order[:k]:
            t = paths[name]
            token = FRESH_TOKEN if s.case == "pass" else "stale-bench-token"

            async def step(
                conn: Conn, w: int, i: int, t: Target = t, rnd: int = rnd, token: str = token
            ) -> bool:
                body = send_body(token, f"{t.name}-{rnd}-{w}-{i}", f"wxid_w{w}")
                answer = await conn.request("POST", SEND, body)
                return answer.status == 200 and is_ok(answer.body)  # a repair ends delivered too

            before, other_before = cpu_of(t.pids), time.process_time() + cpu_of([fake_pid])
            sample = await closed_loop(
                t.host, t.port, step, concurrency=s.concurrency, warmup=s.warmup, window=s.window
            )
            t.cpu_s += cpu_of(t.pids) - before
            t.other_cpu_s += time.process_time() + cpu_of([fake_pid]) - other_before
            t.sends += sample.issued
            t.samples.append(sample)
            print(f"  round {rnd + 1} {name:8} {sample.rps:8.0f} sends/s  errors {sample.errors}", flush=True)


def report(s: Settings, paths: dict[str, Target], command: str) -> str:
    lines = [
        f"scale-out benchmark: {command}",
        f"case {s.case}, rules {s.rules}, state {s.state or '(none needed)'}, {s.concurrency} connections, "
        f"{s.rounds} round(s) x {s.window:g} s, {len(os.sched_getaffinity(0))} CPU(s)",
        "",
        f"{'path':10} {'sends/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU ms/send':>18} "
        f"{'other CPU ms/send':>18} {'errors':>7}",
    ]
    for name in PATHS:
        if (t := paths.get(name)) is None:
            continue
        cpu = t.cpu_s * 1000 / t.sends if t.sends else float("nan")
        other = t.other_cpu_s * 1000 / t.sends if t.sends else float("nan")
        errors = sum(x.errors for x in t.samples)
        lines.append(
            f"{name:10} {t.rps:9.0f} {t.pct(50):8.1f} {t.pct(99):8.1f} {cpu:18.2f} {other:18.2f} {errors:7d}"
        )
    lines.append("(other CPU: this load generator and the fake iLink, which share the machine's cores)")
    lines.append("")
    for a, b in RATIOS:
        if a in paths and b in paths and paths[b].rps:
            lines.append(f"{a}/{b} throughput: {paths[a].rps / paths[b].rps:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    command = "python -m bench.workers " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="ilink-bench-workers-") as tmp, Setup(s, Path(tmp)) as setup:
        setup.start()
        print("; ".join(f"{t.name} http://{t.host}:{t.port} (pids {t.pids})" for t in setup.paths.values()))
        asyncio.run(measure(s, setup.paths, setup.fake.proc.pid))
        text = report(s, setup.paths, command)
    print(text, flush=True)
    return 1 if any(x.errors for t in setup.paths.values() for x in t.samples) else 0


if __name__ == "__main__":
    sys.exit(main())

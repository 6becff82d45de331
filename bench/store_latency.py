"""Send latency with the shared Redis store vs the SQLite file, in one run.

    python -m bench.store_latency                 # 3 interleaved rounds, 4 s windows
    python -m bench.store_latency --rounds 1 --window 2

Two ilink-fixproxy processes with the shipped rules (peer state on) in front of the fast fake
iLink (bench/fake_ilink.py): one with its SQLite state file, one with `--state redis://...` on a
local redis-server (no persistence: the proxy's calls, not the disk, are measured). Each round
measures both cases on both stores, alternating which store goes first, so drift on the machine
hits both. Cases: `pass` (a send with the fresh token: the engine reads its snapshot, stores the
attempt, then what it taught us) and `repair` (a stale token for a new peer: one re-issue, and
more to store). Prints p50/mean latency per store and the ratio Redis / SQLite (goal <= 1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv

from .loadgen import Conn, closed_loop, percentile
from .run import _TOKEN_PAD, FRESH_TOKEN, READY_FAKE, ROOT, SEND, is_ok, send_body

STATE_KEY = "bench-state-key-" + "0" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench.store_latency: redis-server is not installed (Debian package redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    proc = subprocess.Popen(
        [*argv, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("bench.store_latency: redis-server did not start")


async def measure(url: str, case: str, tag: str, warmup: float, window: float) -> list[float]:
    host, _, port = url.split("://", 1)[1].rstrip("/").rpartition(":")

    async def step(conn: Conn, w: int, i: int) -> bool:
        unique = f"{tag}-{w}-{i}"
        if case == "pass":
            body = send_body(FRESH_TOKEN, f"p-{unique}", "wxid_pass")
        else:  # a token never seen, for a peer never seen: the proxy must re-issue
            body = send_body(f"stale-{unique}-{_TOKEN_PAD}", f"r-{unique}", f"wxid_r-{unique}")
        answer = await conn.request("POST", SEND, body)
        return answer.status == 200 and is_ok(answer.body)

    sample = await closed_loop(host, int(port), step, concurrency=1, warmup=warmup, window=window)
    if sample.errors:
        raise RuntimeError(f"{case} via {url}: {sample.errors} error(s)")
    return sample.latencies_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--window", type=float, default=4.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ilink-store-bench-") as tmpdir:
        tmp = Path(tmpdir)
        fake = ProxyProcess(
            [sys.executable, "-m", "bench.fake_ilink", "--port", "0"], ready=READY_FAKE, cwd=str(ROOT)
        )
        redis, port = start_redis(tmp)
        procs: dict[str, ProxyProcess] = {}
        try:
            for name, state in (
                ("sqlite", str(tmp / "state.sqlite3")),
                ("redis", f"redis://127.0.0.1:{port}/0"),
            ):
                procs[name] = ProxyProcess(
                    ilink_fixproxy_argv(
                        "--listen",
                        "127.0.0.1:0",
                        "--upstream",
                        fake.url,
                        "--confdir",
                        str(tmp / name),
                        "--rules",
                        str(ROOT / "rules.yaml"),
                        "--state",
                        state,
                    ),
                    env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
                    cwd=str(tmp),
                )
            lat: dict[tuple[str, str], list[float]] = {}
            for rnd in range(args.rounds):
                order = ("sqlite", "redis") if rnd % 2 == 0 else ("redis", "sqlite")
                for case in ("pass", "repair"):
                    for name in order:
                        got = asyncio.run(
                            measure(procs[name].url, case, f"{name}-{rnd}", args.warmup, args.window)
                        )
                        lat.setdefault((case, name), []).extend(got)
                        print(
                            f"round {rnd + 1} {case:6} {name:6}: {len(got)} sends, "
                            f"p50 {percentile(got, 50):.2f} ms",
                            flush=True,
                        )
            print()
            print(f"{'case':8}{'store':8}{'sends':>7}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
            for case in ("pass", "repair"):
                for name in ("sqlite", "redis"):
                    v = lat[(case, name)]
                    print(
                        f"{case:8}{name:8}{len(v):7}{percentile(v, 50):9.2f}{percentile(v, 99):9.2f}"
                        f"{statistics.fmean(v):9.2f}"
                    )
            print()
            for case in ("pass", "repair"):
                s, r = lat[(case, "sqlite")], lat[(case, "redis")]
                p50 = percentile(r, 50) / percentile(s, 50)
                mean = statistics.fmean(r) / statistics.fmean(s)
                verdict = "ok" if p50 <= 1.3 else "OVER the 1.3x goal"
                print(f"{case}: Redis / SQLite = {p50:.2f}x (p50), {mean:.2f}x (mean): {verdict}")
        finally:
            for proc in procs.values():
                proc.stop()
            fake.stop()
            redis.terminate()
            redis.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

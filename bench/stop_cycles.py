"""Start/repair/stop cycles: does the real proxy always stop cleanly on SIGTERM?

    python bench/stop_cycles.py                     # 100 cycles, shipped rules (peer state on)
    python bench/stop_cycles.py --cycles 20 --load 1   # with one CPU burner competing for a core
    python bench/stop_cycles.py --cores DIR         # keep core dumps of crashed proxies in DIR

Each cycle starts ``ilink-fixproxy`` (reverse mode, port 0, a fresh confdir) in front of a fake
iLink over TLS (in this process, with a throw-away CA), sends one ``sendmessage`` with a stale
context_token through it and checks that the proxy repaired it, then sends SIGTERM and checks:
exit status 0, and nothing in the output that says something went wrong ("Traceback",
"Fatal Python error", "Addon error", "Segmentation fault"). The proxy runs with
``PYTHONFAULTHANDLER=1`` so that a native crash leaves its stacks in the output.

``--load N`` runs N busy-looping processes for the whole run: the SIGSEGV this script was
written for (issue 12) showed up on a busy machine. They are this script's own children and are
stopped at the end.

Prints one line per failed cycle, then one summary line; exit status 0 when every cycle was
clean, 1 when any failed, 2 when the run could not start.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import SEND_PATH, FakeILink, make_pki

ROOT = Path(__file__).resolve().parent.parent
BAD_SIGNS = ("Traceback", "Fatal Python error", "Addon error", "Segmentation fault")
BOT_TOKEN = "cycle-bot@im.bot:cycle-secret"
HEADERS = {
    "Content-Type": "application/json",
    "AuthorizationType": "ilink_bot_token",
    "Authorization": f"Bearer {BOT_TOKEN}",
}


@dataclass
class Cycle:
    number: int
    returncode: int | None = None
    repaired: bool = False
    problem: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problem


def _burn() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


def stale_send(i: int) -> bytes:
    msg = {
        "to_user_id": "wxid_cycle@im.wechat",
        "client_id": f"cycle-{i}",
        "message_type": 2,
        "message_state": 2,
        "context_token": f"stale-{i}",  # the fake knows no fresh tokens: every token is stale
        "item_list": [{"type": 1, "text_item": {"text": "cycle"}}],
    }
    return json.dumps({"msg": msg}).encode()


def one_cycle(i: int, fake: FakeILink, ca: Path, rules: Path, work: Path, cwd: Path | None) -> Cycle:
    cycle = Cycle(i)
    started = time.monotonic()
    confdir = work / f"conf-{i}"
    argv = ilink_fixproxy_argv(
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        fake.url,
        "--upstream-ca",
        str(ca),
        "--confdir",
        str(confdir),
        "--rules",
        str(rules),
    )
    env = clean_env({"PYTHONFAULTHANDLER": "1"})
    try:
        proxy = ProxyProcess(argv, env=env, cwd=str(cwd) if cwd else None)
    except RuntimeError as e:
        cycle.problem = f"did not start: {str(e).splitlines()[0]}"
        return cycle
    with proxy:
        try:
            with httpx.Client(trust_env=False, timeout=30) as client:
                r = client.post(proxy.url + SEND_PATH, content=stale_send(i), headers=HEADERS)
            cycle.repaired = r.status_code == 200 and r.headers.get("x-ilink-fixproxy", "").startswith(
                "repaired"
            )
        except httpx.HTTPError as e:
            cycle.problem = f"send failed: {type(e).__name__}: {e}"
        cycle.returncode = proxy.stop()
    cycle.seconds = time.monotonic() - started
    output = proxy.output
    bad = [s for s in BAD_SIGNS if s in output]
    if cycle.returncode != 0:
        cycle.problem = f"exit status {cycle.returncode}" + (f"; {cycle.problem}" if cycle.problem else "")
    elif bad:
        cycle.problem = f"output contains {', '.join(repr(b) for b in bad)}"
    elif not cycle.repaired and not cycle.problem:
        cycle.problem = "the stale send was not repaired"
    if cycle.problem:
        cycle.problem += "\n    " + "\n    ".join(output.splitlines()[-40:])
    return cycle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/stop_cycles.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=100, help="start/repair/stop cycles (default 100)")
    p.add_argument(
        "--rules",
        default="shipped",
        help="shipped: rules.yaml (peer state on, the default); or a path to a rules file",
    )
    p.add_argument("--load", type=int, default=0, help="busy-looping processes to run meanwhile (default 0)")
    p.add_argument("--cores", type=Path, help="allow core dumps; crashed proxies leave them in DIR")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failed cycle")
    args = p.parse_args(argv)
    rules = ROOT / "rules.yaml" if args.rules == "shipped" else Path(args.rules)
    if not rules.is_file():
        print(f"stop_cycles: no rules file at {rules}", file=sys.stderr)
        return 2
    if args.cores:
        args.cores.mkdir(parents=True, exist_ok=True)
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    failed: list[Cycle] = []
    done = 0
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="stop-cycles-") as tmp:
            work = Path(tmp)
            pki = make_pki(work / "pki")
            with FakeILink(pki) as fake:
                for i in range(1, args.cycles + 1):
                    cycle = one_cycle(i, fake, pki.ca_cert, rules, work, args.cores)
                    done += 1
                    if not cycle.ok:
                        failed.append(cycle)
                        print(f"cycle {i}: FAIL: {cycle.problem}", flush=True)
                        if not args.keep_going:
                            break
    finally:
        for b in burners:
            b.terminate()
        for b in burners:
            b.join(5)
    elapsed = time.monotonic() - started
    codes = sorted({c.returncode for c in failed if c.returncode not in (0, None)})
    print(
        f"stop cycles: {done - len(failed)}/{done} clean (exit 0, repaired, no traceback) of "
        f"{args.cycles} asked; failed: {len(failed)}{f' (exit statuses {codes})' if codes else ''}; "
        f"load {args.load}; Python {sys.version.split()[0]}; {elapsed:.0f} s "
        f"({elapsed / max(done, 1):.2f} s per cycle); pid {os.getpid()}",
        flush=True,
    )
    return 1 if failed or done < args.cycles else 0


if __name__ == "__main__":
    sys.exit(main())

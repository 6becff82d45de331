"""Soak test: many mixed ``sendmessage`` calls through the real ``ilink-fixproxy`` process.

    python bench/soak.py                          # 10,000 messages, plain re-issue rules
    python bench/soak.py --messages 300 --concurrency 4 --json out.json   # the CI smoke size
    python bench/soak.py --rules shipped          # with the shipped rules (peer state on)

Everything runs on 127.0.0.1: a fake iLink over TLS (in this process, with a throw-away CA),
the proxy as a child process in reverse mode in front of it, and a thread pool of gateway-like
clients. Every message has its own ``client_id`` (and peer); its kind decides how the fake
treats it: fresh and stale tokens, tokenless sends refused too ("limited"), sends without a
token, and upstream faults on the first attempt or on the re-issue (resets, 5xx, truncation,
compression, chunking, slowness, a client that gives up while the re-issue is in flight).

At the end it counts, per ``client_id``, how often the fake delivered the message and checks:

- no message was delivered twice;
- no message was lost: every message the fake would accept (its kind says so) was delivered,
  and every message whose caller was told "success" was delivered;
- no message reached iLink more than twice (the rule allows one re-issue);
- the proxy is still running and never logged a traceback.

It samples the proxy's resident memory (VmRSS in /proc/<pid>/status) over time; the goal is
flat over the second half of the run (``--max-rss-growth-mb`` makes that a failure too). Bounded by
``--messages`` and ``--max-seconds``. Exit status: 0 all invariants hold, 1 an invariant was
violated, 2 the run was incomplete (time bound hit) or could not start.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import SEND_PATH, Answer, Delivery, FakeILink, make_pki

ROOT = Path(__file__).resolve().parent.parent
STALE_ANSWER = b'{"ret":-2,"errmsg":"prepare failed"}'
SUCCESS_ANSWER = b'{"ret":0}'
MAIN_BOT = "soak-bot@im.bot:soak-secret"
GIVE_UP_S = 0.6  # the "client-gives-up" kind's client timeout; its re-issue answer takes longer
SLOW_REISSUE_S = 1.5
REISSUE_FAILED = re.compile(r"re-issue (without \S+ )?failed")


@dataclass(frozen=True)
class Kind:
    """How the fake treats one kind of message, and what a correct proxy achieves with it."""

    name: str
    weight: float  # share of the messages
    with_token: bool  # the gateway sends a context_token
    first: str  # the fake's answer to the attempt with the token: fresh, stale, or a fault
    reissue: str = "deliver"  # ... and to the tokenless attempt (the re-issue)
    delivered: int = 1  # deliveries a correct proxy ends with


# Answers (see SoakILink.answer): "deliver" delivers; "refuse" is the stale answer; anything
# else is a fault, delivering first where the name says "-after-delivery".
KINDS = (
    Kind("fresh", 30, True, "deliver"),
    Kind("stale", 30, True, "refuse"),
    Kind("limited", 8, True, "refuse", reissue="refuse", delivered=0),
    Kind("tokenless", 4, False, "-", reissue="deliver"),
    Kind("tokenless-refused", 2, False, "-", reissue="refuse", delivered=0),
    Kind("first-reset", 2, True, "reset", delivered=0),
    Kind("first-503", 2, True, "http-503", delivered=0),
    Kind("first-non-json", 2, True, "non-json", delivered=0),
    Kind("first-truncated", 1, True, "truncate", delivered=0),
    Kind("reissue-reset", 3, True, "refuse", reissue="reset", delivered=0),
    Kind("reissue-502", 2, True, "refuse", reissue="http-502", delivered=0),
    Kind("reissue-truncated-after-delivery", 2, True, "refuse", reissue="truncate-after-delivery"),
    Kind("reissue-reset-after-delivery", 2, True, "refuse", reissue="reset-after-delivery"),
    Kind("gzip", 3, True, "refuse-gzip", reissue="deliver-gzip"),
    Kind("deflate", 2, True, "refuse-deflate", reissue="deliver-deflate"),
    Kind("chunked", 2, True, "refuse-chunked", reissue="deliver-chunked"),
    Kind("slow-reissue", 2, True, "refuse", reissue="deliver-slow"),
    Kind("client-gives-up", 2, True, "refuse", reissue="deliver-slower-than-client"),
)
KIND_BY_NAME = {k.name: k for k in KINDS}


def client_id(i: int, kind: Kind) -> str:
    return f"soak-{i:06d}-{kind.name}"


def kind_of(cid: str | None) -> Kind | None:
    if not cid or not cid.startswith("soak-"):
        return None
    return KIND_BY_NAME.get(cid.split("-", 2)[2])


# ------------------------------------------------------------------------------ the fake


class SoakILink(FakeILink):
    """The sandbox's fake iLink, answering each ``sendmessage`` by its client_id's kind.

    Stateless per request (whether the token is present tells the first attempt from the
    re-issue), so any concurrency and any order of arrival give the same outcome.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: Counter[str] = Counter()

    def _respond(
        self, method: str, raw_path: str, headers: tuple[tuple[str, str], ...], body: bytes
    ) -> Answer | None:
        if raw_path.split("?", 1)[0] != SEND_PATH:
            return super()._respond(method, raw_path, headers, body)
        try:
            msg = json.loads(body)["msg"]
            cid = msg["client_id"]
        except (ValueError, KeyError, TypeError):
            return Answer(status=400, body=b'{"ret":-1,"errmsg":"bad request"}')
        kind = kind_of(cid)
        if kind is None:
            return super()._respond(method, raw_path, headers, body)
        token = msg.get("context_token") or None
        with self._lock:
            self.attempts[cid] += 1
        plan = kind.first if token is not None else kind.reissue
        return self.answer(plan, msg, cid, token, body)

    def _deliver(self, msg: dict[str, Any], cid: str, token: str | None, body: bytes) -> None:
        with self._lock:
            self._deliveries.append(
                Delivery(
                    to_user_id=msg.get("to_user_id", ""),
                    client_id=cid,
                    text="",
                    context_token=token,
                    body=b"",
                )
            )

    def answer(self, plan: str, msg: dict[str, Any], cid: str, token: str | None, body: bytes) -> Answer:
        refuse, ok = STALE_ANSWER, SUCCESS_ANSWER
        if plan.startswith("deliver") or plan.endswith("-after-delivery"):
            self._deliver(msg, cid, token, body)
        match plan:
            case "deliver":
                return Answer(body=ok)
            case "refuse":
                return Answer(body=refuse)
            case "refuse-gzip" | "refuse-deflate" | "deliver-gzip" | "deliver-deflate":
                return Answer(body=ok if plan.startswith("deliver") else refuse, encoding=plan.split("-")[1])
            case "refuse-chunked" | "deliver-chunked":
                return Answer(body=ok if plan.startswith("deliver") else refuse, chunked=True)
            case "deliver-slow":
                return Answer(body=ok, delay=0.3)
            case "deliver-slower-than-client":
                return Answer(body=ok, delay=SLOW_REISSUE_S)
            case "reset" | "reset-after-delivery":
                return Answer(fault="reset")
            case "truncate" | "truncate-after-delivery":
                return Answer(body=ok if plan.startswith("truncate-after") else refuse, fault="truncate")
            case "http-503" | "http-502":
                return Answer(
                    status=int(plan[5:]), body=b"<html>busy</html>", headers=(("Content-Type", "text/html"),)
                )
            case "non-json":
                return Answer(body=b"<html>oops</html>", headers=(("Content-Type", "text/html"),))
        raise AssertionError(f"unknown plan {plan!r}")


# ------------------------------------------------------------------------------ the run


@dataclass
class Outcome:
    cid: str
    kind: str
    caller: str  # what the gateway saw: success, refused, repaired, still-failing, http-502, error:...
    seconds: float


@dataclass
class RssSample:
    t: float  # seconds since the load started
    done: int  # messages answered so far
    rss_mb: float
    cpu_s: float  # the proxy's user+system CPU time so far


@dataclass
class Report:
    messages: int
    sent: int
    rules: str
    concurrency: int
    seconds: float
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    over_sent: list[str] = field(default_factory=list)
    accepted_caller_not_told: int = 0
    proxy_alive: bool = True
    tracebacks: int = 0
    log_lines: dict[str, int] = field(default_factory=dict)  # the proxy's log, by first word
    rss: list[RssSample] = field(default_factory=list)
    incomplete: bool = False

    @property
    def ok(self) -> bool:
        return not (
            self.duplicates
            or self.lost
            or self.unexpected
            or self.over_sent
            or self.tracebacks
            or not self.proxy_alive
        )


def plan_messages(n: int, seed: int) -> list[Kind]:
    """`n` kinds in proportion to their weights (each at least once), shuffled by `seed`."""
    total = sum(k.weight for k in KINDS)
    counts = {k.name: max(1, round(n * k.weight / total)) for k in KINDS}
    # Trim or pad the biggest kinds so the total is exactly n.
    order = sorted(KINDS, key=lambda k: -k.weight)
    i = 0
    while sum(counts.values()) != n:
        k = order[i % 2]  # fresh and stale absorb the rounding
        counts[k.name] += 1 if sum(counts.values()) < n else -1
        i += 1
    plan = [KIND_BY_NAME[name] for name, c in counts.items() for _ in range(c)]
    random.Random(seed).shuffle(plan)
    return plan


def rules_file(choice: str, directory: Path) -> Path:
    if choice == "shipped":
        return ROOT / "rules.yaml"
    if choice == "plain":
        doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
        doc.pop("updates", None)
        for rule in doc["rules"]:
            rule.pop("peer_state", None)
        path = directory / "plain-rules.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path
    return Path(choice)


def read_proc(pid: int) -> tuple[float, float]:
    """(VmRSS in MB, user+system CPU seconds) of a process, from /proc."""
    rss_kb = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
                break
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def caller_view(r: httpx.Response) -> str:
    note = r.headers.get("x-ilink-fixproxy")
    if note:
        return note.split(";", 1)[0]
    if r.status_code != 200:
        return f"http-{r.status_code}"
    try:
        doc = json.loads(r.content) if r.content else {}
    except ValueError:
        return "non-json"
    if not isinstance(doc, dict):
        return "non-json"
    return "success" if not doc.get("ret") and not doc.get("errcode") else "refused"


def run(args: argparse.Namespace) -> Report:
    plan = plan_messages(args.messages, args.seed)
    with tempfile.TemporaryDirectory(prefix="ilink-soak-") as tmp_name:
        tmp = Path(tmp_name)
        pki = make_pki(tmp / "pki")
        with SoakILink(pki, success_answer=SUCCESS_ANSWER) as fake:
            argv = ilink_fixproxy_argv(
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                fake.url,
                "--upstream-ca",
                str(pki.ca_cert),
                "--confdir",
                str(tmp / "conf"),
                "--rules",
                str(rules_file(args.rules, tmp)),
            )
            with ProxyProcess(argv, env=clean_env()) as proxy:
                return load(args, plan, fake, proxy)


def load(args: argparse.Namespace, plan: list[Kind], fake: SoakILink, proxy: ProxyProcess) -> Report:
    pid = proxy.proc.pid
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    local = threading.local()
    stop = threading.Event()
    started = time.monotonic()
    deadline = started + args.max_seconds
    report = Report(messages=len(plan), sent=0, rules=args.rules, concurrency=args.concurrency, seconds=0.0)

    def sample() -> None:
        try:
            rss, cpu = read_proc(pid)
        except OSError:
            return
        with lock:
            done = len(outcomes)
        report.rss.append(RssSample(round(time.monotonic() - started, 2), done, round(rss, 1), round(cpu, 2)))

    def sampler() -> None:
        while not stop.wait(args.sample_interval):
            sample()

    def one(i: int, kind: Kind) -> None:
        if time.monotonic() > deadline:
            return
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(trust_env=False, timeout=30)
        cid = client_id(i, kind)
        msg: dict[str, Any] = {
            "from_user_id": "",
            "to_user_id": f"wxid_soak_{i}@im.wechat",  # one peer per message: no coupling
            "client_id": cid,
            "message_type": 2,
            "message_state": 2,
            "item_list": [{"type": 1, "text_item": {"text": f"soak message {i}"}}],
        }
        if kind.with_token:
            msg["context_token"] = f"AARzJWAFAAABAAAAAAA-soak-{i}-{secrets.token_hex(6)}"
        # Refused tokenless sends are what peer state counts as genuine rate limits; each comes
        # from its own bot so no cooldown couples unrelated messages.
        bot = f"soak-limited-{i}@im.bot:x" if kind.name == "tokenless-refused" else MAIN_BOT
        headers = {
            "Content-Type": "application/json",
            "AuthorizationType": "ilink_bot_token",
            "Authorization": f"Bearer {bot}",
        }
        timeout = GIVE_UP_S if kind.name == "client-gives-up" else 30
        t0 = time.monotonic()
        try:
            r = client.post(
                proxy.url + SEND_PATH,
                content=json.dumps({"msg": msg, "base_info": {"channel_version": "2.2.0"}}).encode(),
                headers=headers,
                timeout=timeout,
            )
            seen = caller_view(r)
        except httpx.HTTPError as e:
            seen = f"error:{type(e).__name__}"
        with lock:
            outcomes.append(Outcome(cid, kind.name, seen, time.monotonic() - t0))

    sample()
    threading.Thread(target=sampler, daemon=True).start()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        for future in [pool.submit(one, i, kind) for i, kind in enumerate(plan)]:
            future.result()
    report.incomplete = len(outcomes) < len(plan)

    # Let abandoned re-issues land: wait until the fake has seen no new attempt for a while.
    quiet_since, seen_total = time.monotonic(), -1
    while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline + SLOW_REISSUE_S + 5:
        total = sum(fake.attempts.values())
        if total != seen_total:
            quiet_since, seen_total = time.monotonic(), total
        time.sleep(0.1)
    stop.set()
    sample()
    report.seconds = round(time.monotonic() - started, 1)
    report.sent = len(outcomes)
    evaluate(report, outcomes, fake, proxy)
    return report


def evaluate(report: Report, outcomes: list[Outcome], fake: SoakILink, proxy: ProxyProcess) -> None:
    delivered = Counter(d.client_id for d in fake.deliveries)
    by_kind: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"sent": 0, "delivered": Counter(), "caller": Counter(), "seconds": []}
    )
    for o in outcomes:
        kind = KIND_BY_NAME[o.kind]
        n = delivered.get(o.cid, 0)
        row = by_kind[o.kind]
        row["sent"] += 1
        row["delivered"]["2+" if n > 1 else str(n)] += 1
        row["caller"][o.caller] += 1
        row["seconds"].append(o.seconds)
        if n > 1:
            report.duplicates.append(o.cid)
        if n == 0 and (kind.delivered == 1 or o.caller in ("success", "repaired")):
            report.lost.append(o.cid)
        if n == 1 and kind.delivered == 0:
            report.unexpected.append(o.cid)
        if n == 1 and o.caller not in ("success", "repaired"):
            report.accepted_caller_not_told += 1
        if fake.attempts.get(o.cid, 0) > 2:
            report.over_sent.append(o.cid)
    for name, row in sorted(by_kind.items(), key=lambda kv: -kv[1]["sent"]):
        secs = sorted(row.pop("seconds"))
        row["p50_ms"] = round(secs[len(secs) // 2] * 1000, 1)
        row["max_ms"] = round(secs[-1] * 1000, 1)
        row["delivered"] = dict(row["delivered"])
        row["caller"] = dict(row["caller"].most_common())
        row["expected_deliveries"] = KIND_BY_NAME[name].delivered
        report.per_kind[name] = row
    report.proxy_alive = proxy.proc.poll() is None
    out = proxy.output
    report.tracebacks = out.count("Traceback")
    words: Counter[str] = Counter()
    for line in out.splitlines():
        # "[12:00:00.000] repaired: sendmessage ..." -> "repaired"; mitmproxy's own lines likewise
        text = line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line
        word = text.split(":", 1)[0] if ":" in text[:40] else text[:40]
        if REISSUE_FAILED.search(text):  # logged as a warning, after the decision word if any
            word = "re-issue failed"
        words[word.strip()] += 1
    report.log_lines = dict(words.most_common(12))


# ------------------------------------------------------------------------------ output


def rss_summary(samples: list[RssSample], messages: int) -> dict[str, float]:
    """Memory at half-time against the end: the first half is warm-up (allocator arenas, pools,
    caches fill; on a 40,000-message run RSS stopped rising after about 14,000), so a leak shows
    as growth over the second half."""
    if not samples:
        return {}
    warm = next((s for s in samples if s.done >= messages * 0.5), samples[0])
    return {
        "start_mb": samples[0].rss_mb,
        "half_time_mb": warm.rss_mb,
        "end_mb": samples[-1].rss_mb,
        "max_mb": max(s.rss_mb for s in samples),
        "growth_second_half_mb": round(samples[-1].rss_mb - warm.rss_mb, 1),
        "cpu_s": samples[-1].cpu_s,
    }


def render(report: Report, args: argparse.Namespace) -> str:
    lines = [
        f"soak: {report.sent}/{report.messages} messages, rules={report.rules}, "
        f"concurrency {report.concurrency}, {report.seconds} s "
        f"({report.sent / max(report.seconds, 0.001):.0f} msg/s)",
        "",
        f"{'kind':34} {'sent':>6} {'deliveries 0/1/2+':>18} {'expect':>6} {'p50 ms':>7} {'max ms':>8}"
        "  caller saw",
    ]
    for name, row in report.per_kind.items():
        d = row["delivered"]
        counts = f"{d.get('0', 0)}/{d.get('1', 0)}/{d.get('2+', 0)}"
        caller = ", ".join(f"{k} {v}" for k, v in row["caller"].items())
        lines.append(
            f"{name:34} {row['sent']:>6} {counts:>18} {row['expected_deliveries']:>6} "
            f"{row['p50_ms']:>7} {row['max_ms']:>8}  {caller}"
        )
    lines += [
        "",
        f"delivered twice: {len(report.duplicates)}   lost: {len(report.lost)}   "
        f"unexpected deliveries: {len(report.unexpected)}   "
        f"over 2 upstream attempts: {len(report.over_sent)}",
        f"accepted by iLink but the caller was not told success (faults after delivery, give-ups): "
        f"{report.accepted_caller_not_told}",
        f"proxy alive: {report.proxy_alive}   tracebacks: {report.tracebacks}",
        "proxy log lines: " + ", ".join(f"{k!r} {v}" for k, v in report.log_lines.items()),
    ]
    for label, ids in (
        ("twice", report.duplicates),
        ("lost", report.lost),
        ("unexpected", report.unexpected),
    ):
        if ids:
            lines.append(f"  {label}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    summary = rss_summary(report.rss, report.messages)
    if summary:
        step = max(1, len(report.rss) // 12)
        shown = report.rss[::step] + ([report.rss[-1]] if (len(report.rss) - 1) % step else [])
        lines += [
            "",
            "proxy RSS over time:  " + "  ".join(f"{s.t:.0f}s/{s.done}:{s.rss_mb:.1f}MB" for s in shown),
        ]
        lines.append(
            f"RSS: start {summary['start_mb']} MB, at half-time {summary['half_time_mb']} MB, "
            f"end {summary['end_mb']} MB, "
            f"max {summary['max_mb']} MB; "
            f"growth over the second half {summary['growth_second_half_mb']:+} MB; "
            f"proxy CPU {summary['cpu_s']} s"
        )
    verdict = "PASS" if report.ok else "FAIL"
    if report.incomplete:
        verdict = "INCOMPLETE (--max-seconds reached)" if report.ok else verdict
    if args.max_rss_growth_mb and summary and summary["growth_second_half_mb"] > args.max_rss_growth_mb:
        verdict = f"FAIL (RSS grew more than {args.max_rss_growth_mb} MB)"
    lines += ["", f"RESULT: {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10_000, help="messages to send (default 10000)")
    p.add_argument("--concurrency", type=int, default=8, help="gateway threads (default 8)")
    p.add_argument("--max-seconds", type=float, default=900, help="stop sending after this (default 900)")
    p.add_argument(
        "--rules",
        default="plain",
        help="plain: the shipped rules without peer state (default); shipped: rules.yaml as is; or a path",
    )
    p.add_argument("--seed", type=int, default=1, help="shuffle seed for the mix (default 1)")
    p.add_argument("--sample-interval", type=float, default=1.0, help="RSS sampling period in s (default 1)")
    p.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=0,
        help="fail if RSS grows more than this over the second half (0: report only)",
    )
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.messages < len(KINDS):
        p.error(f"--messages must be at least {len(KINDS)} (one of each kind)")
    try:
        report = run(args)
    except RuntimeError as e:  # the proxy did not start
        print(f"soak: {e}", file=sys.stderr)
        return 2
    text = render(report, args)
    print(text, flush=True)
    if args.json:
        data = asdict(report)
        data["ok"] = report.ok
        data["rss_summary"] = rss_summary(report.rss, report.messages)
        data["result"] = text.rsplit("RESULT: ", 1)[1]
        args.json.write_text(json.dumps(data, indent=1))
    if not report.ok or "FAIL" in text.rsplit("RESULT: ", 1)[1]:
        return 1
    return 2 if report.incomplete else 0


if __name__ == "__main__":
    sys.exit(main())

"""`--workers N` through the real command: N proxy processes on one port under one parent.

Which worker answered is observed in the parent's /metrics, where every worker's counters carry a
`worker` label; the workers' process ids are the parent's children (/proc). Every test checks
that no worker outlives it: workers are grandchildren of pytest, out of conftest's guard's sight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import HEADERS, ROOT, SEND, UPDATES, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from test_e2e_faults import wait_for

METRICS = re.compile(r"metrics of all workers on (http://\S+)/metrics")


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            found.add(int(stat.parent.name))
    return found


def running_with(argument: str) -> list[int]:
    """Live processes whose command line has `argument` (each test's confdir is its own)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if argument.encode() in cmdline.read_bytes().split(b"\0") and alive(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def workers_proxy(fake: FakeILink, pki: TestPKI, tmp_path: Path, *extra: str) -> Iterator[ProxyProcess]:
    """The real command with --workers 2 (core rules: no peer state) and --metrics; afterwards,
    whatever happened, no worker is left running."""
    seen: set[int] = set()
    p = start_proxy(
        "--workers",
        "2",
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(core_rules(tmp_path)),
        "--metrics",
        "127.0.0.1:0",
        *extra,
    )
    try:
        # (logged just after the line that says it is listening: it may still be on its way)
        assert p.wait_output("metrics of all workers on"), p.output
        p.metrics = METRICS.search(p.output).group(1)  # type: ignore[attr-defined,union-attr]
        p.seen = seen  # type: ignore[attr-defined]
        seen.update(children(p.proc.pid))
        yield p
    finally:
        seen.update(children(p.proc.pid))
        p.stop()
        left = [pid for pid in seen if alive(pid)]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"workers left running: {left}\n{p.output}"


def per_worker(metrics_url: str, family: str) -> dict[str, float]:
    text = httpx.get(metrics_url + "/metrics", trust_env=False).text
    totals: dict[str, float] = {}
    for m in re.finditer(rf"^{family}\{{(.*?)\}} (\S+)$", text, re.M):
        worker = re.search(r'worker="(\d+)"', m.group(1))
        assert worker, m.group(0)
        totals[worker.group(1)] = totals.get(worker.group(1), 0.0) + float(m.group(2))
    return totals


def udp_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
    return ports


def poll_on_new_connection(url: str) -> int:
    # A new connection each time: the kernel chooses a worker per connection (SO_REUSEPORT).
    with httpx.Client(trust_env=False, timeout=30) as c:
        return c.post(url + UPDATES, content=b'{"get_updates_buf":""}', headers=HEADERS).status_code


def test_two_workers_answer_on_one_port_and_stop_cleanly(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with workers_proxy(fake, pki, tmp_path) as p:
        workers = children(p.proc.pid)
        assert len(workers) == 2, p.output
        assert f"pids {', '.join(map(str, sorted(workers)))}" in p.output or all(
            str(pid) in p.output for pid in workers
        )
        assert p.output.count(" listening on http://") == 1, p.output  # the start line, once
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(poll_on_new_connection, [p.url] * 40))
        assert codes == [200] * 40
        counts = per_worker(p.metrics, "ilink_fixproxy_requests_total")  # type: ignore[attr-defined]
        assert set(counts) == {"0", "1"} and all(n > 0 for n in counts.values()), counts
        assert sum(counts.values()) == 40, counts
        assert per_worker(p.metrics, "ilink_fixproxy_worker_up") == {"0": 1.0, "1": 1.0}  # type: ignore[attr-defined]
        health = httpx.get(p.metrics + "/healthz", trust_env=False)  # type: ignore[attr-defined]
        assert (health.status_code, health.text) == (200, "ok\n")
        # The upstream is https: a single proxy would also listen on UDP (HTTP/3); workers do not.
        port = int(p.url.rsplit(":", 1)[1])
        assert port not in udp_ports()
        assert p.stop() == 0, p.output
        assert not [pid for pid in workers if alive(pid)]
    assert "Traceback" not in p.output


@pytest.mark.parametrize("to", ["parent", "every process"])
def test_sigterm_lets_every_worker_finish_its_in_flight_repairs(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, to: str
):
    # As a single proxy (test_e2e_ops): a repair whose re-issue is under way when SIGTERM arrives
    # still hands the gateway its answer. Four of them on new connections, spread by the kernel.
    # "every process": as systemd stops a service (KillMode=control-group), SIGTERM to the parent
    # and to each worker; a worker must not take the parent's SIGTERM as a second, hurried one.
    with workers_proxy(fake, pki, tmp_path) as p:
        workers = children(p.proc.pid)

        def send(i: int) -> httpx.Response:
            with httpx.Client(trust_env=False, timeout=30) as c:
                return c.post(p.url + SEND, content=send_body("stale", client_id=f"c-{i}"), headers=HEADERS)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = []
            for i in range(4):  # one at a time, so each original meets its own scripted answers
                fake.script(SEND, Answer(body=b'{"ret":-2}'), Answer(body=b"{}", delay=4.0))
                futures.append(pool.submit(send, i))
                want = 2 * (i + 1)  # the re-issue is on its way
                assert wait_for(lambda n=want: len(fake.sends()) == n, 20.0), fake.sends()
            for pid in [p.proc.pid, *(workers if to == "every process" else ())]:
                os.kill(pid, signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [(a.status_code, a.content) for a in answers] == [(200, b"{}")] * 4
        assert all(a.headers["x-ilink-fixproxy"].startswith("repaired") for a in answers)
        assert p.proc.wait(30) == 0, p.output
        assert "Traceback" not in p.output


def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with workers_proxy(fake, pki, tmp_path) as p:
        victim = min(children(p.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert p.wait_output(f"(pid {victim}) exited with signal SIGKILL; restarted it as pid"), p.output
        line = next(ln for ln in p.output.splitlines() if f"(pid {victim}) exited" in ln)
        new = int(line.rsplit(" ", 1)[1])
        p.seen.add(new)  # type: ignore[attr-defined]
        now = children(p.proc.pid)
        assert victim not in now and new in now and len(now) == 2, (victim, new, now)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(poll_on_new_connection, [p.url] * 20)) == [200] * 20
        restarts = per_worker(p.metrics, "ilink_fixproxy_worker_restarts_total")  # type: ignore[attr-defined]
        assert sorted(restarts.values()) == [0.0, 1.0], restarts
        assert httpx.get(p.metrics + "/healthz", trust_env=False).status_code == 200  # type: ignore[attr-defined]
        assert p.stop() == 0, p.output


def test_workers_that_keep_dying_stop_the_parent_with_a_non_zero_status(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with workers_proxy(fake, pki, tmp_path) as p:
        for n in range(6):  # MAX_RESTARTS (5) within a minute are restarted, the 6th is not
            victim = max(children(p.proc.pid))
            os.kill(victim, signal.SIGKILL)
            if n < 5:
                assert p.wait_output(f"(pid {victim}) exited with signal SIGKILL; restarted"), p.output
                p.seen.update(children(p.proc.pid))  # type: ignore[attr-defined]
                assert wait_for(lambda: len(children(p.proc.pid)) == 2, 20.0), p.output
        p.proc.wait(40)
        assert p.proc.returncode == 1, p.output
        assert p.wait_output("5 restarts within 60 s, stopping all workers"), p.output


def test_a_killed_parent_takes_its_workers_with_it(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with workers_proxy(fake, pki, tmp_path) as p:
        workers = children(p.proc.pid)
        p.proc.kill()  # no chance to stop them: the kernel tells them (PR_SET_PDEATHSIG)
        p.proc.wait(10)
        assert wait_for(lambda: not any(alive(pid) for pid in workers), 30), workers


def run_command(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ilink_fixproxy_argv("--listen", "127.0.0.1:0", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "extra, says",
    [
        ([], "the SQLite state file belongs to one process"),
        (["--state", ":memory:"], "':memory:' belongs to one process"),
        (["--defer", "--rules", "CORE"], "the SQLite state file belongs to one process"),
    ],
)
def test_workers_with_a_store_of_one_process_are_refused_in_one_line(
    tmp_path: Path, extra: list[str], says: str
):
    extra = [str(core_rules(tmp_path)) if a == "CORE" else a for a in extra]
    rules = [] if "--rules" in extra else ["--rules", str(ROOT / "rules.yaml")]
    p = run_command("--workers", "2", "--confdir", str(tmp_path / "conf"), *rules, *extra)
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert says in p.stderr and "--state redis://HOST:PORT/DB" in p.stderr, p.stderr
    assert not (tmp_path / "conf").exists()  # refused before anything was created


@pytest.mark.parametrize("flag, says", [("--capture", "cannot be combined with --capture"), ("--ui", "--ui")])
def test_workers_with_a_one_process_feature_are_refused_in_one_line(tmp_path: Path, flag: str, says: str):
    extra = [flag, str(tmp_path / "cap")] if flag == "--capture" else [flag]
    p = run_command(
        "--workers", "2", "--rules", str(core_rules(tmp_path)), "--confdir", str(tmp_path / "c"), *extra
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr


def test_a_taken_port_is_refused_in_one_line(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            ilink_fixproxy_argv(
                "--workers",
                "2",
                "--listen",
                f"127.0.0.1:{port}",
                "--rules",
                str(core_rules(tmp_path)),
                "--confdir",
                str(tmp_path / "c"),
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
    assert (
        p.returncode == 2
        and p.stderr == f"ilink-fixproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


def test_a_bad_worker_count_is_one_line():
    p = subprocess.run(
        ilink_fixproxy_argv("--workers", "0"), capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--workers" in p.stderr, p.stderr


def test_the_readme_shows_the_refusal_as_the_command_prints_it(tmp_path: Path):
    p = run_command("--workers", "2", "--rules", str(ROOT / "rules.yaml"), "--confdir", str(tmp_path / "c"))
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```", readme.index("`--workers 2` is refused before anything starts:"))
    shown = readme[readme.index("\n", start) + 1 : readme.index("```", start + 3)]
    assert p.returncode == 2 and p.stderr == shown, (p.stderr, shown)


def test_a_worker_that_fails_before_listening_stops_all_with_one_line(tmp_path: Path):
    # The fault is injected into worker 1 only, from outside the proxy: a sitecustomize module on
    # PYTHONPATH that ends the process when it is worker 1 (test code; the proxy has no switch).
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('_ILINK_FIXPROXY_WORKER', '').startswith('1:'):\n    os._exit(3)\n"
    )
    argv = ilink_fixproxy_argv(
        "--listen", "127.0.0.1:0", "--workers", "2", "--rules", str(core_rules(tmp_path))
    )
    argv += ["--confdir", str(tmp_path / "c"), "--upstream", "http://127.0.0.1:9"]
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env({"PYTHONPATH": str(fault)}),
    )
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 1, (out, err)
    assert re.fullmatch(
        r"ilink-fixproxy: worker 1 \(pid \d+\) exited with status 3 before listening: stopping all workers\n",
        err,
    ), err
    assert "listening on" not in out  # never announced
    assert not running_with(str(tmp_path / "c"))  # worker 0 was stopped too


def test_in_forward_mode_workers_refuse_the_parents_metrics_listener(tmp_path: Path):
    from test_e2e_egress import connect_through

    argv = ["--mode", "forward", "--allow-private-destinations", "--workers", "2"]
    argv += [
        "--rules",
        str(core_rules(tmp_path)),
        "--confdir",
        str(tmp_path / "c"),
        "--metrics",
        "127.0.0.1:0",
    ]
    with start_proxy(*argv) as p:
        seen = children(p.proc.pid)
        try:
            assert p.wait_output("metrics of all workers on"), p.output
            port = int(METRICS.search(p.output).group(1).rsplit(":", 1)[1])  # type: ignore[union-attr]
            for _ in range(6):  # new connections: whichever worker takes them
                status, _, body = connect_through(p, f"127.0.0.1:{port}")
                assert status == 403 and b"this proxy's own metrics listener" in body, body
        finally:
            assert p.stop() == 0
            assert not [pid for pid in seen if alive(pid)]

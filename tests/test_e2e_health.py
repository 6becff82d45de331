"""End to end: `/healthz` (on `--metrics`) and `python -m ilink_fixproxy.healthcheck` turn unhealthy
when the proxy cannot do its job, and healthy again when the condition clears: the state file
gone, the state store failing on use, the event loop stuck, repairs failing for internal
reasons. Each condition is a real one made in the real proxy process, except the last, made by a
fault injected into the real command (conftest.argv_with_fault)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from conftest import HEADERS, ROOT, SEND, Gateway, argv_with_fault, core_rules, send_body, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from test_e2e_faults import wait_for

STALE = "AARzJWAFAAABAAAAAAA-stale-token-health"


def start(
    *args: str, env: dict[str, str] | None = None, fault: tuple[Path, str] | None = None
) -> ProxyProcess:
    args = ("--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *args)
    argv = argv_with_fault(*fault, *args) if fault else ilink_fixproxy_argv(*args)
    return ProxyProcess(argv, env=clean_env(env))


# The re-issue raises the bare AssertionError of CPython's eager-task race (Python 3.12.1) while
# the flag file exists.
REISSUE_FAULT = """
from pathlib import Path
from ilink_fixproxy import netbackend

_connect = netbackend.connect_tcp

async def connect_tcp(host, port):
    if (Path(__file__).parent / "broken").exists():
        raise AssertionError
    return await _connect(host, port)

netbackend.connect_tcp = connect_tcp
"""


def health_url(p: ProxyProcess) -> str:
    m = re.search(r"metrics on (http://\S+)/metrics", p.output)
    assert m, p.output
    return m.group(1) + "/healthz"


def health(p: ProxyProcess) -> tuple[int, str]:
    r = httpx.get(health_url(p), trust_env=False, timeout=30)
    return r.status_code, r.text


def healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ilink_fixproxy.healthcheck", url],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def test_a_state_file_moved_away_is_unhealthy_until_it_is_back(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    state_dir = tmp_path / "state"
    state = state_dir / "peers.sqlite3"
    with start(
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(state),
    ) as p:
        url = health_url(p)
        assert wait_for(lambda: health(p) == (200, "ok\n"))
        ok = healthcheck(url)
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, "ok\n", "")
        state_dir.rename(tmp_path / "elsewhere")
        status, text = health(p)
        assert status == 503
        assert text == (
            f"unhealthy: state file {state} is gone (deleted or moved away): what the proxy learns now is "
            "lost at its next restart; put the file back or restart the proxy\n"
        )
        bad = healthcheck(url)
        assert bad.returncode == 1 and bad.stderr == text and bad.stdout == ""
        (tmp_path / "elsewhere").rename(state_dir)
        assert health(p) == (200, "ok\n")
    down = healthcheck(url)  # nothing listens any more
    assert down.returncode == 1 and down.stderr.startswith(f"cannot reach {url}: ")


def test_a_state_store_failing_on_use_is_unhealthy_until_a_write_succeeds(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    state = tmp_path / "peers.sqlite3"
    with start(
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(state),
    ) as p:
        gw = Gateway(p)
        assert gw.send(STALE).status_code == 200
        assert wait_for(lambda: health(p)[0] == 200)
        # Another process holds SQLite's write lock (what `state forget` does for a moment, here
        # for good): the proxy's writes give up after SQLite's busy timeout.
        holder = sqlite3.connect(state, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            assert gw.send(STALE).status_code == 200  # the gateway is served all the same
            assert wait_for(lambda: "peer-state store failing" in health(p)[1], timeout=30)
            status, text = health(p)
            assert status == 503 and "(OperationalError: database is locked)" in text
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert gw.send(STALE).status_code == 200
        assert wait_for(lambda: health(p) == (200, "ok\n"), timeout=30)
        gw.client.close()


def test_a_stuck_event_loop_is_unhealthy_until_it_runs_again(tmp_path: Path):
    rules = tmp_path / "rules.yaml"
    text = (ROOT / "rules.yaml").read_text()
    rules.write_text(text)
    with start(
        "--rules",
        str(rules),
        "--state",
        ":memory:",
        "--confdir",
        str(tmp_path / "conf"),
        "--set",
        "ilink_health_stall_s=1",
    ) as p:
        assert wait_for(lambda: health(p) == (200, "ok\n"))
        # The proxy re-reads an edited rules file on its event loop: a rules file that is a FIFO
        # with no writer (a hung network mount behaves alike) blocks the loop in open().
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.replace(fifo, rules)
        released = threading.Event()

        def release() -> None:
            with open(rules, "w") as writer:  # blocks until the proxy opens its end
                writer.write(text)
            released.set()

        try:
            assert wait_for(lambda: health(p)[1].startswith("unhealthy: event loop stuck"), timeout=30)
            assert health(p)[0] == 503
        finally:
            threading.Thread(target=release, daemon=True).start()
            assert released.wait(30)
        assert wait_for(lambda: health(p) == (200, "ok\n"), timeout=30)


def test_repairs_failing_internally_are_unhealthy_until_one_succeeds(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    with (
        start(
            *upstream_args(fake, pki, tmp_path / "conf"),
            "--rules",
            str(core_rules(tmp_path)),
            fault=(tmp_path, REISSUE_FAULT),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        assert wait_for(lambda: health(p) == (200, "ok\n"))
        (tmp_path / "broken").touch()
        broken = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        (tmp_path / "broken").unlink()
        assert broken.json()["ret"] == -2  # the original answer kept
        status, text = health(p)
        assert status == 503
        assert re.fullmatch(
            r"unhealthy: repairs failing: 1 internal error\(s\) in the last 300 s, the last \d+ s ago "
            r"\(AssertionError\)\n",
            text,
        ), text
        repaired = c.post(p.url + SEND, content=send_body(STALE, client_id="c-2"), headers=HEADERS)
        assert repaired.headers["x-ilink-fixproxy"].startswith("repaired")
        assert health(p) == (200, "ok\n")

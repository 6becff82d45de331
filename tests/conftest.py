"""Shared real parts for the tests: a fake iLink over TLS with its own CA, and the real proxy
process in front of it. Nothing here mocks mitmproxy or the network path."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from ilink_fixproxy.launcher import READY_MITMDUMP, ProxyProcess, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI, make_pki

ROOT = Path(__file__).resolve().parent.parent

# The tests never touch the real home directory (the command's default confdir is ~/.mitmproxy):
# HOME is an empty directory of its own for the whole run, inherited by every proxy process, and
# a test that leaves anything in it fails (see `nothing_written_to_home`).
HOME = Path(tempfile.mkdtemp(prefix="ilink-fixproxy-tests-home-"))
os.environ["HOME"] = str(HOME)


@pytest.fixture(autouse=True)
def nothing_written_to_home() -> Iterator[None]:
    yield
    written = sorted(str(p.relative_to(HOME)) for p in HOME.rglob("*"))
    for child in HOME.iterdir():  # the next test starts from an empty home again
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    assert not written, f"the test wrote into the home directory (give it its own --confdir): {written}"


def pytest_sessionfinish() -> None:
    shutil.rmtree(HOME, ignore_errors=True)


SEND = "/ilink/bot/sendmessage"
BOT_TOKEN = "e2e-bot@im.bot:S3cr3tB0tT0ken-do-not-log"
HEADERS = {
    "Content-Type": "application/json",
    "AuthorizationType": "ilink_bot_token",
    "Authorization": f"Bearer {BOT_TOKEN}",
    "iLink-App-Id": "bot",
}


def send_body(token: str | None, *, text: str = "cron: daily report", client_id: str = "c-1") -> bytes:
    """A sendmessage body shaped like hermes' (json.dumps defaults: ", " separators, \\u escapes)."""
    msg: dict[str, object] = {
        "from_user_id": "",
        "to_user_id": "wxid_peer@im.wechat",
        "client_id": client_id,
        "message_type": 2,
        "message_state": 2,
        "item_list": [{"type": 1, "text_item": {"text": text}}],
    }
    if token is not None:
        msg["context_token"] = token
    return json.dumps({"msg": msg, "base_info": {"channel_version": "2.2.0"}}).encode()


def live_children() -> dict[int, str]:
    """This process's child processes that are still running (not zombies): pid -> command line."""
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == os.getpid() and state != "Z":
                found[int(stat.parent.name)] = (
                    (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except (OSError, ValueError, IndexError):  # it exited while we looked
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every proxy a test starts is stopped by the end of the run, also when the test failed
    (issue 12: a failing test left its proxy running). Torn down last, after every fixture's
    proxy; kills what is left so the run ends clean, then fails naming it."""
    yield
    if not Path("/proc/self/stat").is_file():
        return
    leaked = live_children()
    for pid in leaked:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, "processes left running by the tests: " + "; ".join(
        f"{pid}: {cmd[:200]}" for pid, cmd in leaked.items()
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def fake_server(pki: TestPKI) -> Iterator[FakeILink]:
    with FakeILink(pki) as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeILink) -> FakeILink:
    """The module's fake iLink, reset to its defaults for this test."""
    fake_server.reset()
    return fake_server


def upstream_args(fake: FakeILink, pki: TestPKI, confdir: str | Path) -> list[str]:
    """The flags that put a proxy in front of the fake iLink, trusting its CA, with its own confdir."""
    return ["--upstream", fake.url, "--upstream-ca", str(pki.ca_cert), "--confdir", str(confdir)]


def start_proxy(*args: str, cwd: Path | None = None) -> ProxyProcess:
    return ProxyProcess(ilink_fixproxy_argv("--listen", "127.0.0.1:0", *args), cwd=str(cwd) if cwd else None)


def start_mitmdump(*args: str) -> ProxyProcess:
    mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent))
    assert mitmdump, "mitmdump is installed with mitmproxy"
    argv = [
        mitmdump,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        "-s",
        str(ROOT / "addon" / "ilink_fixproxy_addon.py"),
        *args,
    ]
    return ProxyProcess(argv, ready=READY_MITMDUMP)


# The real command, with a fault injected first (`source`, written to DIR/fault.py and imported
# before the command runs): an internal failure cannot be provoked from outside, which is what
# makes it internal. Test code only: the proxy itself has no switch for it.
FAULT_LAUNCH = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import fault; "
    "from ilink_fixproxy.cli import main; sys.exit(main())"
)


def argv_with_fault(directory: Path, source: str, *args: str) -> list[str]:
    (directory / "fault.py").write_text(source)
    return [sys.executable, "-c", FAULT_LAUNCH, str(directory), *args]


def core_rules(directory: Path, *, deadline: float | None = None) -> Path:
    """The shipped rules without their peer_state section: the plain re-issue, no memory between
    requests, so tests sharing one proxy cannot influence each other; optionally another deadline."""
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    for rule in doc["rules"]:
        rule.pop("peer_state", None)
        if deadline is not None:
            rule["action"]["deadline_s"] = deadline
    doc.pop("updates", None)
    path = directory / "core-rules.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def proxy(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """ilink-fixproxy in reverse mode (the default) in front of the fake, with the shipped rules
    minus peer state (tested on its own in test_e2e_peers.py)."""
    conf = tmp_path_factory.mktemp("conf")
    rules = core_rules(conf)
    with start_proxy(
        *upstream_args(fake_server, pki, conf),
        "--rules",
        str(rules),
    ) as p:
        yield p


@pytest.fixture(scope="module")
def peer_proxy(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """ilink-fixproxy with the shipped rules, peer state included (state file in its confdir)."""
    conf = tmp_path_factory.mktemp("peers")
    with start_proxy(
        *upstream_args(fake_server, pki, conf),
        "--rules",
        str(ROOT / "rules.yaml"),
    ) as p:
        assert p.wait_output("peer state in")  # the shipped rules really run with peer state
        p.confdir = conf  # type: ignore[attr-defined]
        yield p


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=30) as c:
        yield c


def tls_context(*ca_files: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_files[0]))
    for extra in ca_files[1:]:
        ctx.load_verify_locations(cafile=str(extra))
    return ctx


UPDATES = "/ilink/bot/getupdates"


class Gateway:
    """A gateway-like client with its own bot token, sending to one peer."""

    def __init__(self, proxy: ProxyProcess) -> None:
        tag = secrets.token_hex(4)
        self.url = proxy.url
        self.bot_token = f"bot-{tag}@im.bot:secret-{tag}"
        self.peer = f"wxid_{tag}@im.wechat"
        self.headers = {
            "Content-Type": "application/json",
            "AuthorizationType": "ilink_bot_token",
            "Authorization": f"Bearer {self.bot_token}",
        }
        self.client = httpx.Client(trust_env=False, timeout=30)
        self._n = 0

    def body(self, token: str | None, client_id: str | None = None, text: str = "hello") -> bytes:
        self._n += 1
        msg = {
            "to_user_id": self.peer,
            "client_id": client_id or f"cid-{self._n}-{secrets.token_hex(3)}",
            "message_type": 2,
            "message_state": 2,
            "item_list": [{"type": 1, "text_item": {"text": text}}],
        }
        if token:
            msg["context_token"] = token
        return json.dumps({"msg": msg}).encode()

    def send(
        self, token: str | None, client_id: str | None = None, timeout: float = 30, text: str = "hello"
    ) -> httpx.Response:
        return self.client.post(
            self.url + SEND, content=self.body(token, client_id, text), headers=self.headers, timeout=timeout
        )

    def poll(self) -> httpx.Response:
        return self.client.post(self.url + UPDATES, content=b'{"get_updates_buf":""}', headers=self.headers)


def sends_to(fake: FakeILink, gw: Gateway) -> list:
    return [s for s in fake.sends() if s.json and s.json["msg"].get("to_user_id") == gw.peer]

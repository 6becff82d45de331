"""End to end: the README's per-gateway recipes, run as the gateway runs them.

openclaw-weixin calls Node's global fetch(), which ignores HTTPS_PROXY. The README's forward-mode
recipe for it is the preload shipped in deploy/node/ (a global undici EnvHttpProxyAgent), loaded
with NODE_OPTIONS=--import, plus NODE_EXTRA_CA_CERTS for the proxy's CA. These tests run a real
Node process doing the plugin's fetch() POST of a stale sendmessage, through the real proxy in
forward mode, to the fake iLink by host name; and the same process without the preload, to show
that the variable alone does not route fetch() through the proxy.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BOT_TOKEN, ROOT, SEND, send_body, start_proxy
from ilink_fixproxy.launcher import ProxyProcess, clean_env
from ilink_fixproxy.sandbox import FakeILink, TestPKI

PRELOAD = ROOT / "deploy" / "node" / "env-proxy-preload.mjs"
STALE = "AARzJWAFAAABAAAAAAA-stale-token-node"
# undici 7 is the newest major that supports Node 20 (undici 8 needs Node >= 22.19); the README
# and the preload's own comment say to install this one.
UNDICI = "undici@7"

# What openclaw-weixin's sendMessage does (src/api/api.ts): the global fetch, a JSON POST with
# its headers; the answer's status, our header and body go back to the test on stdout.
FETCH_SCRIPT = """
const res = await fetch(process.env.SEND_URL, {
  method: "POST",
  headers: {
    "Content-Type": "application/json",
    "AuthorizationType": "ilink_bot_token",
    "Authorization": "Bearer " + process.env.BOT_TOKEN,
    "iLink-App-Id": "bot",
    "iLink-App-ClientVersion": "132105",
  },
  body: process.env.SEND_BODY,
});
const body = await res.text();
console.log(JSON.stringify({ status: res.status, fixproxy: res.headers.get("x-ilink-fixproxy"), body }));
"""


def _missing(what: str) -> None:
    # In CI a missing tool is a broken CI image, not a reason to skip the recipe's only test.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI for the openclaw forward-mode recipe test")
    pytest.skip(f"{what} not found: the openclaw forward-mode recipe (Node fetch + preload) is not tested")


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's setup: the shipped preload in a directory with undici installed next to it."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node:
        _missing("node")
    if not npm:
        _missing("npm")
    work = tmp_path_factory.mktemp("node")
    shutil.copy(PRELOAD, work / PRELOAD.name)
    (work / "fetch-send.mjs").write_text(FETCH_SCRIPT)
    # npm keeps its proxy and registry settings from the environment: it must reach the registry.
    p = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", UNDICI],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        # its cache and logs beside the install, not in HOME (the tests' HOME stays empty)
        env={**os.environ, "npm_config_cache": str(work / ".npm"), "npm_config_update_notifier": "false"},
    )
    assert p.returncode == 0, f"npm install {UNDICI} failed:\n{p.stdout}{p.stderr}"
    return work


def forward_args(rules: Path, conf: Path, pki: TestPKI) -> list[str]:
    # The fake iLink listens on loopback, which forward mode refuses by default.
    return [
        "--mode",
        "forward",
        "--allow-private-destinations",
        "--rules",
        str(rules),
        "--confdir",
        str(conf),
        "--upstream-ca",
        str(pki.ca_cert),
    ]


@pytest.fixture(scope="module")
def forward(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Forward mode with the shipped rules (peer state included), intercepting the fake's host
    name instead of ilinkai.weixin.qq.com."""
    tmp = tmp_path_factory.mktemp("gw-fwd")
    rules = tmp / "rules.yaml"
    rules.write_text((ROOT / "rules.yaml").read_text().replace("  - ilinkai.weixin.qq.com", "  - localhost"))
    with start_proxy(*forward_args(rules, tmp / "conf", pki)) as p:
        p.confdir = tmp / "conf"  # type: ignore[attr-defined]
        yield p


def run_node(node_dir: Path, fake: FakeILink, env: dict[str, str]) -> dict:
    """Run the fetch() in Node with `env` on top of a clean environment; its answer as a dict."""
    # Each send its own token and client_id: with peer state the proxy remembers a token proven
    # stale and answers a repeated client_id from memory, which would hide what this send did.
    token = f"{STALE}-{secrets.token_hex(4)}"
    full = clean_env()
    full.pop("NODE_OPTIONS", None)  # only what the test gives: an inherited preload would blur it
    full.update(
        {
            "SEND_URL": fake.url + SEND,  # https://localhost:PORT: a host name, as iLink's is
            "SEND_BODY": send_body(token, client_id=secrets.token_hex(6)).decode(),
            "BOT_TOKEN": BOT_TOKEN,
            **env,
        }
    )
    p = subprocess.run(
        ["node", str(node_dir / "fetch-send.mjs")],
        cwd=node_dir,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "token": token}


def trust_both(tmp: Path, forward: ProxyProcess, pki: TestPKI) -> str:
    """A CA file trusting the proxy's CA and the fake's own: with it, a fetch() that bypasses the
    proxy still succeeds, so only the answer tells whether the proxy was in the path."""
    bundle = tmp / "extra-ca.pem"
    bundle.write_bytes((forward.confdir / "mitmproxy-ca-cert.pem").read_bytes() + pki.ca_cert.read_bytes())  # type: ignore[attr-defined]
    return str(bundle)


def test_openclaw_forward_recipe_routes_node_fetch_through_the_proxy(
    node_dir: Path, forward: ProxyProcess, fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    answer = run_node(
        node_dir,
        fake,
        {
            "HTTPS_PROXY": forward.url,
            "NODE_OPTIONS": f"--import {node_dir / PRELOAD.name}",
            "NODE_EXTRA_CA_CERTS": trust_both(tmp_path, forward, pki),
        },
    )
    assert answer["status"] == 200
    assert answer["fixproxy"].startswith("repaired; rule=stale-context-token; attempts=2")
    assert answer["body"] == fake.success_answer.decode()
    sends = fake.sends()
    assert len(sends) == 2
    assert sends[0].json["msg"]["context_token"] == answer["token"]
    assert "context_token" not in sends[1].json["msg"]


def test_openclaw_forward_recipe_works_with_only_the_proxys_ca_trusted(
    node_dir: Path, forward: ProxyProcess, fake: FakeILink
):
    # What an operator sets: NODE_EXTRA_CA_CERTS is the proxy's CA and nothing else.
    answer = run_node(
        node_dir,
        fake,
        {
            "HTTPS_PROXY": forward.url,
            "NODE_OPTIONS": f"--import {node_dir / PRELOAD.name}",
            "NODE_EXTRA_CA_CERTS": str(forward.confdir / "mitmproxy-ca-cert.pem"),  # type: ignore[attr-defined]
        },
    )
    assert answer["status"] == 200 and answer["fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2


def test_without_the_preload_node_fetch_ignores_https_proxy(
    node_dir: Path, forward: ProxyProcess, fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    # The same process and variables minus the preload: fetch() goes straight to the fake iLink,
    # which refuses the stale send, and the proxy never sees it.
    answer = run_node(
        node_dir,
        fake,
        {"HTTPS_PROXY": forward.url, "NODE_EXTRA_CA_CERTS": trust_both(tmp_path, forward, pki)},
    )
    assert answer["status"] == 200
    assert answer["fixproxy"] is None
    assert answer["body"] == fake.stale_answer.decode()
    assert len(fake.sends()) == 1


def test_ca_tells_openclaw_users_about_the_preload(tmp_path: Path):
    # `ilink-fixproxy ca` is where forward-mode users look: the CA alone does not route Node's fetch.
    p = subprocess.run(
        [sys.executable, "-m", "ilink_fixproxy", "ca", "--confdir", str(tmp_path / "conf")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert p.returncode == 0, p.stderr
    assert "NODE_EXTRA_CA_CERTS" in p.stdout and "deploy/node/env-proxy-preload.mjs" in p.stdout
    assert PRELOAD.is_file()

"""The command's lean addon chain: nothing an operator can configure is lost, addons join the
chain in mitmdump's order when an option needs them, and the real command honours such options."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HEADERS, SEND, send_body, start_proxy, upstream_args
from ilink_fixproxy.addon import IlinkFixProxy
from ilink_fixproxy.chain import full_chain, proxy_addons
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from mitmproxy import addonmanager, exceptions, hooks, master, options

ROOT = Path(__file__).resolve().parent.parent
STALE = "AARzJWAFAAABAAAAAAA-stale-token-chain"


class Extra:
    """Stands in for the command's start-up report (an `extra` addon)."""

    def running(self) -> None:
        pass


def names(chain: list[Any]) -> list[str]:
    return [type(a).__name__ for a in chain]


def flattened(m: master.Master) -> list[str]:
    """Every addon in dispatch order, sub-addons included (what mitmproxy actually calls)."""
    return [type(a).__name__ for a in addonmanager.traverse(m.addons.chain)]


@pytest.fixture
def lean() -> Iterator[master.Master]:
    async def make() -> master.Master:
        m = master.Master(options.Options(), with_termlog=False)
        m.addons.add(*proxy_addons(IlinkFixProxy(), Extra()))
        m.options.update(flow_detail=0)  # what the command sets
        return m

    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete(make())
    finally:
        loop.close()


def full_master() -> master.Master:
    async def make() -> master.Master:
        m = master.Master(options.Options(), with_termlog=False)
        m.addons.add(*full_chain(IlinkFixProxy(), Extra()))
        return m

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(make())
    finally:
        loop.close()


def test_every_option_command_and_addon_of_the_full_chain_exists(lean: master.Master):
    full = full_master()
    assert set(lean.options.keys()) == set(full.options.keys())
    for name in sorted(full.options.keys()):
        assert lean.options.default(name) == full.options.default(name), name
    assert set(lean.commands.commands) == set(full.commands.commands)
    for name in full.addons.lookup:
        assert lean.addons.get(name) is not None, name


def test_the_idle_chain_is_short_and_keeps_mitmdumps_order(lean: master.Master):
    assert len(lean.addons.chain) <= 4
    order = flattened(lean)
    full = [n for n in names(full_chain(IlinkFixProxy(), Extra())) if n in order]
    # Moved only where no hook is shared (see chain.py): ours still precedes next_layer and TLS,
    # and proxyserver still precedes ours.
    assert order.index("Proxyserver") < order.index("IlinkFixProxy") < order.index("NextLayer")
    assert order.index("IlinkFixProxy") < order.index("TlsConfig") < order.index("UpdateAltSvc")
    assert set(order) == set(full) | {"LeanChain", "_Bundle"}
    assert "Dumper" not in order and "Save" not in order  # nothing to do while options are default


@pytest.mark.parametrize(
    ("option", "value", "addon"),
    [
        ("save_stream_file", "/tmp/ilink-chain-test.mitm", "Save"),
        ("flow_detail", 2, "Dumper"),
        ("proxyauth", "user:pass", "ProxyAuth"),
        ("upstream_auth", "user:pass", "UpstreamAuth"),
        ("map_remote", ["|~q|example.com|example.org"], "MapRemote"),
        ("modify_headers", ["/~s/X-Test/1"], "ModifyHeaders"),
        ("block_list", ["/~u evil/404"], "BlockList"),
        ("hardump", "/tmp/ilink-chain-test.har", "SaveHar"),
    ],
)
def test_an_option_brings_its_addon_into_the_chain_in_mitmdumps_order(
    lean: master.Master, option: str, value: Any, addon: str
):
    lean.options.update(**{option: value})
    order = flattened(lean)
    assert addon in order
    full = [n for n in names(full_chain(IlinkFixProxy(), Extra())) if n in order]
    # The relative order of the real addons is mitmdump's, except the bundled ones that share
    # no hook with the newcomer; check the pairs that matter.
    at = order.index(addon)
    if full.index(addon) < full.index("IlinkFixProxy"):
        assert at < order.index("IlinkFixProxy")
    else:
        assert order.index("IlinkFixProxy") < at
    if addon == "ModifyHeaders":  # both rewrite response headers: mitmdump's order
        assert at < order.index("UpdateAltSvc")
    if addon == "Dumper":  # prints the final (repaired) answer
        assert order.index("UpdateAltSvc") < at


def test_an_invalid_value_is_rejected_and_the_addon_keeps_waiting(lean: master.Master):
    with pytest.raises(exceptions.OptionsError, match="map_remote"):
        lean.options.update(map_remote=["|~bad(|a|b"])
    assert "MapRemote" not in flattened(lean)
    assert lean.options.map_remote == []


def test_a_script_brings_in_every_addon(tmp_path: Path):
    script = tmp_path / "noop.py"
    script.write_text("def request(flow):\n    pass\n")

    async def run() -> list[str]:
        m = master.Master(options.Options(), with_termlog=False)
        m.addons.add(*proxy_addons(IlinkFixProxy(), Extra()))
        m.options.update(flow_detail=0, scripts=[str(script)])  # scripts load on the running loop
        order = flattened(m)
        for loaded in m.addons.get("scriptloader").addons:
            loaded.done()  # stop its file watcher
        return order

    loop = asyncio.new_event_loop()
    try:
        order = loop.run_until_complete(run())
    finally:
        loop.close()
    full = names(full_chain(IlinkFixProxy(), Extra()))
    assert set(full) <= set(order)
    assert order.index("ScriptLoader") < order.index("IlinkFixProxy")
    assert order.index("IlinkFixProxy") < order.index("Save") < order.index("TlsConfig")


def test_an_embedder_keeping_mitmproxys_flow_detail_gets_the_dumper_at_running(tmp_path: Path):
    async def run() -> list[str]:
        # Its own confdir: at `running` the addon opens its state file and the CA is made there.
        m = master.Master(options.Options(confdir=str(tmp_path)), with_termlog=False)
        m.addons.add(*proxy_addons(IlinkFixProxy()))
        await m.addons.trigger_event(hooks.RunningHook())
        return flattened(m)

    loop = asyncio.new_event_loop()
    try:
        assert "Dumper" in loop.run_until_complete(run())
    finally:
        loop.close()


# ------------------------------------------------------------------ the real command


def test_the_command_honours_save_stream_file_flow_detail_and_proxyauth(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    flows = tmp_path / "flows.mitm"
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--set",
        f"save_stream_file={flows}",
        "--set",
        "flow_detail=1",
    ) as p:
        with httpx.Client(trust_env=False, timeout=30) as c:
            r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert r.status_code == 200
        assert p.wait_output("POST") and p.wait_output(SEND)  # the dumper's flow line
    assert flows.stat().st_size > 0
    with (
        start_proxy(
            "--mode",
            "forward",
            "--confdir",
            str(tmp_path / "conf"),
            "--set",
            "proxyauth=user:secret",
        ) as p,
        httpx.Client(trust_env=False, timeout=30, proxy=p.url) as c,
    ):
        r = c.get("http://example.invalid/")
    assert r.status_code == 407


def test_onboarding_leaves_the_dispatch_only_where_no_request_can_ask_for_it(lean: master.Master):
    assert "Onboarding" in flattened(lean)  # regular (forward) mode: mitm.it serves the CA
    lean.options.update(mode=["reverse:https://ilinkai.weixin.qq.com"])
    assert "Onboarding" not in flattened(lean)  # mitmproxy rewrites Host to the upstream's
    assert lean.addons.get("onboarding") is not None and lean.options.onboarding_host == "mitm.it"
    lean.options.update(onboarding_host="ca.example")
    lean.options.update(keep_host_header=True)  # now a request's Host is the client's again
    order = flattened(lean)
    assert "Onboarding" in order
    assert order.index("DisableH2C") < order.index("Onboarding") < order.index("Proxyserver")
    assert lean.addons.get("onboarding").host == "ca.example"  # configured with what it missed
    lean.options.update(keep_host_header=False, onboarding=False)
    assert "Onboarding" not in flattened(lean)

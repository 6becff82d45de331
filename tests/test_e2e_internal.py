"""End to end through the real proxy process: the re-issue's own connections on every supported
Python and mitmproxy (mitmproxy 12 runs asyncio with eager tasks), and what the operator reads
when a repair fails for a reason of the proxy's own."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
from conftest import BOT_TOKEN, HEADERS, SEND, argv_with_fault, core_rules, send_body, upstream_args
from ilink_fixproxy.launcher import ProxyProcess
from ilink_fixproxy.redact import token_hash
from ilink_fixproxy.sandbox import FakeILink, TestPKI

STALE = "AARzJWAFAAABAAAAAAA-stale-token-internal"
TEXT = "cron: daily report"  # send_body's message text


def test_a_repair_reaches_an_upstream_named_by_host_name(proxy, fake: FakeILink, client: httpx.Client):
    # The re-issue resolves and connects itself (netbackend); with mitmproxy 12's eager tasks,
    # asyncio's own happy-eyeballs race failed an assertion there on Python 3.12.1 / 3.13.0.
    assert urlsplit(fake.url).hostname == "localhost"  # a name, not an address
    r = client.post(proxy.url + SEND, content=send_body(STALE), headers=HEADERS)

    assert r.content == fake.success_answer
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert [s.context_token for s in fake.sends()] == [STALE, None]
    assert "internal error" not in proxy.output


FAULT = f"""
from ilink_fixproxy import netbackend

async def connect_tcp(host, port):
    raise AssertionError(
        "invariant broken\\nwhile sending {STALE!s} ({TEXT!s})\\nfor {BOT_TOKEN!s}"
    )

netbackend.connect_tcp = connect_tcp
"""

# The re-issue's connect raises like asyncio's did (see conftest.argv_with_fault).


def test_an_internal_failure_of_a_repair_is_one_clear_line_without_secrets(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, client: httpx.Client
):
    argv = argv_with_fault(tmp_path, FAULT, "--listen", "127.0.0.1:0")
    argv += [*upstream_args(fake, pki, tmp_path), "--rules", str(core_rules(tmp_path))]
    with ProxyProcess(argv) as proxy:
        r = client.post(proxy.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert proxy.wait_output("original answer kept"), proxy.output
        output = proxy.output

    assert r.content == fake.stale_answer  # the gateway keeps iLink's own answer
    [line] = [line for line in output.splitlines() if "original answer kept" in line]
    assert line.endswith(
        "sendmessage: repair by rule 'stale-context-token' failed, original answer kept: "
        f"internal error AssertionError: invariant broken while sending {token_hash(STALE)} "
        f"({token_hash(TEXT)}) for {token_hash(BOT_TOKEN)} at {tmp_path.name}/fault.py:5"
    )
    for secret in (STALE, TEXT, BOT_TOKEN, BOT_TOKEN.split(":")[1]):
        assert secret not in output
    assert "Traceback" not in output


CLASSIFY_FAULT = f"""
from ilink_fixproxy.core import policy

def delivery(status, content, doc):
    raise ValueError("cannot classify {STALE!s} ({TEXT!s}) for {BOT_TOKEN!s}")

policy.delivery = delivery
"""


def test_a_failure_to_classify_an_answer_passes_it_on_and_logs_no_secret(
    fake: FakeILink, pki: TestPKI, tmp_path: Path, client: httpx.Client
):
    argv = argv_with_fault(tmp_path, CLASSIFY_FAULT, "--listen", "127.0.0.1:0")
    argv += [*upstream_args(fake, pki, tmp_path), "--rules", str(core_rules(tmp_path))]
    with ProxyProcess(argv) as proxy:
        r = client.post(proxy.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert proxy.wait_output("could not classify the answer"), proxy.output
        output = proxy.output

    assert r.content == fake.stale_answer  # iLink's own answer passes on (the repair hit the fault too)
    [line] = [line for line in output.splitlines() if "could not classify the answer" in line]
    assert f"ValueError: cannot classify {token_hash(STALE)} ({token_hash(TEXT)})" in line
    for secret in (STALE, TEXT, BOT_TOKEN, BOT_TOKEN.split(":")[1]):
        assert secret not in output

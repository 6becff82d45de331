"""PeerTracker in-process against the real fake iLink over TLS: what a send taught us is stored
after its answer is handed over (write_back_later), and until then its client_id stays in flight."""

from __future__ import annotations

import asyncio
import json

from conftest import HEADERS, SEND, send_body
from ilink_fixproxy import rules as rules_mod
from ilink_fixproxy import state as state_mod
from ilink_fixproxy.peers import PeerTracker
from ilink_fixproxy.reissue import Reissuer, UpstreamTrust
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from mitmproxy import http
from mitmproxy.test import tflow


def tracker_for(pki: TestPKI) -> PeerTracker:
    reissuer = Reissuer(max_answer_bytes=1 << 20)
    reissuer.configure(UpstreamTrust(ca_file=str(pki.ca_cert)))
    return PeerTracker(state_mod.StateStore(state_mod.MEMORY), reissuer)


def send_flow(url: str, client_id: str) -> tuple[http.HTTPFlow, dict]:
    body = send_body(None, client_id=client_id)
    flow = tflow.tflow()
    flow.request = http.Request.make("POST", url + SEND, body, HEADERS)
    return flow, json.loads(body)


def test_a_send_is_stored_only_at_write_back_and_its_client_id_waits_until_then(
    fake: FakeILink, pki: TestPKI
):
    rule = rules_mod.load_default().rules[0]

    async def go() -> None:
        tracker = tracker_for(pki)
        bot = tracker.bot_of(send_flow(fake.url, "c-1")[0].request)
        flow, doc = send_flow(fake.url, "c-1")
        outcome = await tracker.handle(flow, rule, doc, write_back_later=True)
        assert outcome.decision == "passed" and outcome.response is not None
        # answered, not yet settled: only the attempt itself was stored, before it was sent
        pending = await tracker.store.message(bot, "c-1", since=0)
        assert pending is not None and pending.state == "in-flight" and pending.status is None
        assert tracker.busy()  # a graceful shutdown waits for it

        # a retry of the same client_id waits for the write-back, then is answered from memory
        retry_flow, retry_doc = send_flow(fake.url, "c-1")
        retry = asyncio.ensure_future(tracker.handle(retry_flow, rule, retry_doc, write_back_later=True))
        await asyncio.sleep(0.05)
        assert not retry.done()
        await tracker.write_back(flow.id)
        assert (await retry).decision == "replayed"
        stored = await tracker.store.message(bot, "c-1", since=0)
        assert stored is not None and stored.accepted and stored.attempts == 1

        await tracker.write_back(retry_flow.id)  # nothing pending for it (answered locally): no-op
        other, other_doc = send_flow(fake.url, "c-2")
        await tracker.handle(other, rule, other_doc, write_back_later=True)
        await tracker.aclose()  # shutdown stores whatever is left

    asyncio.run(go())
    assert len(fake.sends()) == 2  # c-1 once, c-2 once: the retry never went upstream


def test_without_write_back_later_a_send_is_stored_before_handle_returns(fake: FakeILink, pki: TestPKI):
    rule = rules_mod.load_default().rules[0]

    async def go() -> None:
        tracker = tracker_for(pki)
        flow, doc = send_flow(fake.url, "c-9")
        await tracker.handle(flow, rule, doc)
        stored = await tracker.store.message(tracker.bot_of(flow.request), "c-9", since=0)
        assert stored is not None and stored.accepted
        assert not tracker.busy()
        await tracker.aclose()

    asyncio.run(go())

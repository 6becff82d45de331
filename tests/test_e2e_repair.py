"""End to end through the real `ilink-fixproxy` process (reverse mode) against a fake iLink over
TLS with its own CA: the repair, what is left alone, and failures of the re-issue itself."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import pytest
import yaml
from conftest import BOT_TOKEN, HEADERS, SEND, core_rules, send_body, start_proxy, upstream_args
from ilink_fixproxy.sandbox import Answer, FakeILink

STALE = "AARzJWAFAAABAAAAAAA-stale-token-0001"
FRESH = "AARzJWAFAAABAAAAAAA-fresh-token-0002"

# ilink-protocol.md §3.1: what iLink answers a stale context_token with.
STALE_SHAPES = [
    b'{"ret":-2}',
    b'{"ret":-2,"errmsg":""}',
    b'{"ret":-2,"errmsg":"unknown error"}',
    b'{"ret":-2,"errmsg":"prepare failed"}',
    b'{"ret":-2,"errmsg":"rate limited"}',
    b'{"errcode":-14,"errmsg":"session timeout"}',
    b'{"ret":-2,"errcode":0,"errmsg":""}',
]


def post(client: httpx.Client, proxy, body: bytes, **headers: str) -> httpx.Response:
    return client.post(proxy.url + SEND, content=body, headers={**HEADERS, **headers})


@pytest.mark.parametrize("stale_answer", STALE_SHAPES, ids=lambda b: b.decode())
def test_each_stale_shape_is_repaired_by_a_tokenless_reissue(
    proxy, fake: FakeILink, client, stale_answer: bytes
):
    fake.stale_answer = stale_answer
    body = send_body(STALE)
    r = post(client, proxy, body)

    assert r.status_code == 200
    assert r.content == fake.success_answer
    assert r.headers["x-ilink-fixproxy"].startswith("repaired; rule=stale-context-token")
    first, second = fake.sends()
    assert first.body == body
    assert first.context_token == STALE and second.context_token is None
    assert second.body == send_body(None)  # identical but for the removed member
    assert [d.text for d in fake.deliveries] == ["cron: daily report"]


def test_fresh_token_passes_through_byte_for_byte_in_one_attempt(proxy, fake: FakeILink, client):
    fake.fresh_tokens.add(FRESH)
    fake.success_answer = b'{"ret":0, "message_id": 7489534892789344264}'
    body = send_body(FRESH)
    r = post(client, proxy, body)

    assert r.content == b'{"ret":0, "message_id": 7489534892789344264}'
    assert "x-ilink-fixproxy" not in r.headers
    (only,) = fake.sends()
    assert only.body == body
    assert only.context_token == FRESH


def test_genuine_rate_limit_reaches_the_caller_after_exactly_two_attempts(proxy, fake: FakeILink, client):
    fake.tokenless_delivers = False  # iLink refuses the tokenless send too
    r = post(client, proxy, send_body(STALE))

    assert r.json() == {"ret": -2, "errmsg": "prepare failed"}
    assert r.headers["x-ilink-fixproxy"].startswith("still-failing;")
    assert len(fake.sends()) == 2
    assert not fake.deliveries


def test_a_tokenless_send_is_never_reissued(proxy, fake: FakeILink, client):
    fake.tokenless_delivers = False
    body = send_body(None)
    r = post(client, proxy, body)

    assert r.content == fake.stale_answer
    assert "x-ilink-fixproxy" not in r.headers
    assert len(fake.sends()) == 1


def test_empty_token_counts_as_no_token(proxy, fake: FakeILink, client):
    fake.tokenless_delivers = False
    r = post(client, proxy, send_body(""))
    assert "x-ilink-fixproxy" not in r.headers
    assert len(fake.sends()) == 1


def test_reissue_keeps_every_byte_but_the_token(proxy, fake: FakeILink, client):
    # Spacing, \u escapes next to raw UTF-8, a uint64 and float spellings must all survive.
    body = (
        '{ "msg" : {"to_user_id":"wxid_peer", "context_token" : "' + STALE + '",\n'
        '  "item_list":[{"type":1,"text_item":{"text":"\\u4f60\\u597d 你好 😀"}}]},'
        ' "seq": 7489534892789344264, "ratio": 1e5, "f": 1.0 }'
    ).encode()
    expected = (
        '{ "msg" : {"to_user_id":"wxid_peer",\n'
        '  "item_list":[{"type":1,"text_item":{"text":"\\u4f60\\u597d 你好 😀"}}]},'
        ' "seq": 7489534892789344264, "ratio": 1e5, "f": 1.0 }'
    ).encode()
    r = post(client, proxy, body)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    first, second = fake.sends()
    assert first.body == body
    assert second.body == expected
    # Every end-to-end header is sent again as it was (length and connection are per message/hop).
    h1 = {k.lower(): v for k, v in first.headers if k.lower() not in ("content-length", "connection")}
    h2 = {k.lower(): v for k, v in second.headers if k.lower() not in ("content-length", "connection")}
    assert h1 == h2
    assert h2["authorization"] == f"Bearer {BOT_TOKEN}"
    assert h2["host"] == h1["host"]
    assert dict(second.headers)["Content-Length"] == str(len(expected))


def test_gzip_answers_are_understood_and_handed_back_as_sent(proxy, fake: FakeILink, client):
    fake.script(
        SEND,
        Answer(body=b'{"ret":-2,"errmsg":"prepare failed"}', gzip=True),
        Answer(body=b'{"ret":0,"message_id":"42"}', gzip=True),
    )
    with httpx.Client(trust_env=False, timeout=30) as raw_client:
        req = raw_client.build_request(
            "POST", proxy.url + SEND, content=send_body(STALE), headers={**HEADERS, "Accept-Encoding": "gzip"}
        )
        r = raw_client.send(req, stream=True)
        wire = b"".join(r.iter_raw())
        r.close()
    assert r.headers["content-encoding"] == "gzip"
    assert gzip.decompress(wire) == b'{"ret":0,"message_id":"42"}'
    assert int(r.headers["content-length"]) == len(wire)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2


def test_chunked_answers_are_repaired(proxy, fake: FakeILink, client):
    fake.script(SEND, Answer(body=b'{"ret":-2}', chunked=True), Answer(body=b"{}", chunked=True))
    r = post(client, proxy, send_body(STALE))
    assert r.content == b"{}"
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")


def test_empty_body_success_on_reissue_is_handed_back(proxy, fake: FakeILink, client):
    # iLink sometimes acknowledges with HTTP 200 and no body at all.
    fake.script(SEND, Answer(body=b'{"ret":-2}'), Answer(body=b""))
    r = post(client, proxy, send_body(STALE))
    assert r.status_code == 200 and r.content == b""
    assert "now=200 empty body" in r.headers["x-ilink-fixproxy"]


@pytest.mark.parametrize(
    "reissue_answer",
    [
        Answer(fault="reset"),
        Answer(fault="truncate", body=b'{"ret":0,"message_id":"1"}'),
        Answer(status=502, body=b"<html>bad gateway</html>", headers=(("Content-Type", "text/html"),)),
        Answer(body=b"<html>not json</html>"),
        Answer(body=b"\x1f\x8b not really gzip", headers=(("Content-Encoding", "gzip"),)),
    ],
    ids=["reset", "truncated", "http-502", "non-json", "broken-gzip"],
)
def test_a_failed_reissue_hands_back_the_original_answer_unchanged(
    proxy, fake: FakeILink, client, reissue_answer: Answer
):
    original = b'{"ret":-2,"errmsg":"prepare failed"}'
    fake.script(
        SEND,
        Answer(body=original, headers=(("Content-Type", "application/json"), ("X-Upstream", "first"))),
        reissue_answer,
    )
    r = post(client, proxy, send_body(STALE))
    assert r.status_code == 200
    assert r.content == original
    assert r.headers["x-upstream"] == "first"
    assert "x-ilink-fixproxy" not in r.headers
    assert len(fake.sends()) == 2
    assert proxy.wait_output("repair", "re-issue")


def test_other_endpoints_are_left_alone(proxy, fake: FakeILink, client):
    body = json.dumps({"ilink_user_id": "wxid_peer", "context_token": STALE}).encode()
    fake.script("/ilink/bot/getconfig", Answer(body=b'{"ret":-2}'))
    r = client.post(proxy.url + "/ilink/bot/getconfig", content=body, headers=HEADERS)
    assert r.content == b'{"ret":-2}'
    assert "x-ilink-fixproxy" not in r.headers
    (only,) = fake.requests
    assert only.body == body


def test_getupdates_passes_through_byte_for_byte(proxy, fake: FakeILink, client):
    fake.push_inbound("wxid_peer@im.wechat", "你好")
    r = client.post(proxy.url + "/ilink/bot/getupdates", content=b'{"get_updates_buf":""}', headers=HEADERS)
    assert b'"message_id":74895348927893' in r.content  # a bare uint64, not a float
    assert r.json()["msgs"][0]["item_list"][0]["text_item"]["text"] == "你好"


def test_large_upload_streams_through_intact(proxy, fake: FakeILink, client):
    blob = bytes(range(256)) * (5 * 4096)  # 5 MiB, well above the buffer limit
    r = client.post(
        proxy.url + "/upload?encrypted_query_param=x",
        content=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 404  # the fake has no such endpoint; the body still arrived
    (only,) = fake.requests
    assert only.body == blob


def test_secrets_never_appear_in_the_proxy_output(proxy, fake: FakeILink, client):
    fake.tokenless_delivers = False
    post(client, proxy, send_body(STALE))
    fake.script(SEND, Answer(body=b'{"ret":-2}'), Answer(fault="reset"))
    post(client, proxy, send_body(STALE))
    time.sleep(0.2)
    out = proxy.output
    assert "still-failing" in out and "re-issue" in out
    assert STALE not in out
    assert BOT_TOKEN not in out and "S3cr3t" not in out


def test_a_header_filter_is_evaluated_for_every_request_on_one_url(fake: FakeILink, pki, client, tmp_path):
    # The proxy remembers which rules a request line selects only when every filter reads just
    # the request line; a filter on a header must still decide per request.
    doc = yaml.safe_load(core_rules(tmp_path).read_text())
    doc["rules"][0]["match"]["filter"] = "~m POST & ~u /ilink/bot/sendmessage & ~h X-Repair"
    rules = tmp_path / "header-rules.yaml"
    rules.write_text(yaml.safe_dump(doc))
    with start_proxy(*upstream_args(fake, pki, tmp_path / "c"), "--rules", str(rules)) as p:
        repaired = [
            "x-ilink-fixproxy" in post(client, p, send_body(STALE), **extra).headers
            for extra in ({"X-Repair": "1"}, {}, {"X-Repair": "1"}, {})
        ]
    assert repaired == [True, False, True, False]

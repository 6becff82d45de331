"""Property-based tests (hypothesis) of the decision and rewrite code, in process.

- `jsonedit.remove_member`: whatever the JSON shape, spacing, escapes or number spellings, the
  re-issued body is the original with exactly the member cut out, and garbage never raises;
- `matching.first_rule` with the shipped rules agrees with an independent statement of the rule;
- the addon's `response` hook (mitmproxy's `taddons`/`tflow`, a stub in place of the network):
  arbitrary request/answer shapes, headers and content-encodings never raise out of it, a flow
  the rule does not select is never touched, and a selected one is re-issued with only the field
  removed and ends with either the original answer (unchanged) or a readable re-issue answer;
- `reissue.Reissuer` against a real loopback server: every end-to-end header the gateway sent
  is sent again in order, hop-by-hop ones never are, nothing is added but Host (if missing) and
  the new body's Content-Length.

Examples are derandomized so a run is reproducible; the database is off so nothing is written.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import brotli
import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ilink_fixproxy import rules as rules_mod
from ilink_fixproxy.addon import HEADER, IlinkFixProxy
from ilink_fixproxy.jsonedit import remove_member
from ilink_fixproxy.matching import first_rule
from ilink_fixproxy.reissue import ReissueError, Reissuer
from ilink_fixproxy.sandbox import FakeILink
from mitmproxy import http
from mitmproxy.test import taddons, tflow

PATH = ("msg", "context_token")
SEND_URL = "https://ilinkai.weixin.qq.com/ilink/bot/sendmessage"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}

PROPS = settings(
    max_examples=150,
    deadline=None,  # the first examples pay for imports and loop start-up
    derandomize=True,  # reproducible: the same examples on every run and machine
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ------------------------------------------------------------------------------ strategies

# Keys and strings: mostly ASCII, but also escapes, quotes, non-BMP characters and the member
# name itself nested elsewhere (it must only be removed at the exact path).
_key_text = st.one_of(
    st.sampled_from(["msg", "context_token", "client_id", "to_user_id", "item_list", "ret", "", "\\", '"']),
    st.text(max_size=8),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 2**53 and beyond uint64
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_key_text, children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(_key_text, json_values, max_size=5)
tokens = st.one_of(st.text(min_size=1, max_size=40), json_values)


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    """`usual` nine times in ten: most flows are selected or miss by one detail, which is where
    selection bugs hide (fully random flows almost never come near the rule)."""
    return draw(other) if draw(st.integers(0, 9)) == 0 else draw(usual)


@st.composite
def send_docs(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """(document with msg.context_token at a random position, the same document without it)."""
    top = draw(json_objects)
    msg = draw(json_objects)
    msg.pop("context_token", None)
    items = list(msg.items())
    at = draw(st.integers(0, len(items)))
    with_token = dict([*items[:at], ("context_token", draw(tokens)), *items[at:]])
    top.pop("msg", None)
    top_items = list(top.items())
    top_at = draw(st.integers(0, len(top_items)))
    return (
        dict([*top_items[:top_at], ("msg", with_token), *top_items[top_at:]]),
        dict([*top_items[:top_at], ("msg", dict(items)), *top_items[top_at:]]),
    )


_WS = st.text(alphabet=" \t\n\r", max_size=3)
# Spellings json.dumps never produces but iLink or a gateway might: they must survive verbatim.
_ODD_NUMBERS = st.sampled_from(["1e5", "1.0E2", "-0", "0.10", "7489534892789344264", "1E-7", "-0.0e+0"])


@dataclass
class Raw:
    """A leaf whose JSON text is given (an odd number spelling)."""

    text: str


def _render(draw: st.DrawFn, value: Any) -> str:
    """JSON text for `value` with random whitespace, escapes and number spellings."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        if not value:
            return "{" + draw(_WS) + "}"
        members = [
            draw(_WS)
            + json.dumps(k, ensure_ascii=draw(st.booleans()))
            + draw(_WS)
            + ":"
            + draw(_WS)
            + _render(draw, v)
            + draw(_WS)
            for k, v in value.items()
        ]
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        if not value:
            return "[" + draw(_WS) + "]"
        return "[" + ",".join(draw(_WS) + _render(draw, v) + draw(_WS) for v in value) + "]"
    return json.dumps(value, ensure_ascii=draw(st.booleans()))


def _plain(value: Any) -> Any:
    """What json.loads makes of a rendered value."""
    if isinstance(value, Raw):
        return json.loads(value.text)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def assert_one_cut(original: str, edited: str) -> None:
    """`edited` is `original` with one contiguous span deleted (where exactly can be ambiguous:
    in `{"a":{"context_token":"0","a":1}}` the cut may be said to start at either `"`)."""
    assert len(edited) < len(original)
    prefix = 0
    while prefix < len(edited) and edited[prefix] == original[prefix]:
        prefix += 1
    suffix = 0
    while suffix < len(edited) - prefix and edited[-1 - suffix] == original[-1 - suffix]:
        suffix += 1
    assert prefix + suffix == len(edited), "more than the member changed"


# ------------------------------------------------------------------------------ jsonedit


@PROPS
@given(
    docs=send_docs(),
    indent=st.sampled_from([None, 0, 2, "\t"]),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
    ensure_ascii=st.booleans(),
)
def test_removing_the_member_is_serialising_without_it(docs, indent, separators, ensure_ascii):
    with_token, without = docs
    fmt = {"indent": indent, "separators": separators, "ensure_ascii": ensure_ascii}
    original = json.dumps(with_token, **fmt).encode()
    edited = remove_member(original, PATH)
    assert edited is not None
    assert json.loads(edited) == json.loads(json.dumps(without))
    assert_one_cut(original.decode(), edited.decode())
    if without["msg"] or indent is None:
        # Every other byte, spacing included, is what the serialiser would have written.
        assert edited == json.dumps(without, **fmt).encode()


@st.composite
def rendered_send_docs(draw: st.DrawFn) -> tuple[str, Any]:
    """(JSON text with odd spacing/escapes/numbers, the expected document after the removal)."""
    with_token, without = draw(send_docs())
    odd = draw(st.lists(st.tuples(_key_text, _ODD_NUMBERS.map(Raw)), max_size=2))
    for key, raw in odd:  # odd number spellings next to the token
        if key != "context_token":
            with_token["msg"][key] = raw
            without["msg"][key] = raw
    return _render(draw, with_token), _plain(without)


@PROPS
@given(rendered_send_docs())
def test_removal_keeps_every_other_byte_of_any_spelling(case):
    text, expected = case
    edited = remove_member(text.encode(), PATH)
    assert edited is not None
    assert json.loads(edited) == expected
    assert_one_cut(text, edited.decode())


@PROPS
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_remove_member_never_raises_and_only_removes(body):
    edited = remove_member(body, PATH)
    if edited is None:
        return
    doc = json.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("msg"), dict) and "context_token" in doc["msg"]
    del doc["msg"]["context_token"]
    assert json.loads(edited) == doc


# ------------------------------------------------------------------------------ matching


def plain_rules_text() -> str:
    """The shipped rules minus peer state: the plain re-issue these properties are about."""
    doc = yaml.safe_load((ROOT / "rules.yaml").read_text())
    doc.pop("updates", None)
    for rule in doc["rules"]:
        rule.pop("peer_state", None)
    return yaml.safe_dump(doc, sort_keys=False)


RULES = rules_mod.parse(plain_rules_text(), "plain-rules.yaml")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def rule_says_stale(request_doc: Any, status: int, response_doc: Any) -> bool:
    """rules.yaml in words: the request carries a non-empty msg.context_token, and the answer is
    HTTP 200 whose ret or errcode is the number -2 or -14."""
    msg = request_doc.get("msg") if isinstance(request_doc, dict) else None
    carries = isinstance(msg, dict) and "context_token" in msg and msg["context_token"] not in (None, "")
    refused = isinstance(response_doc, dict) and any(
        _number(response_doc.get(k)) and response_doc.get(k) in (-2, -14) for k in ("ret", "errcode")
    )
    return carries and status == 200 and refused


_codes = st.sampled_from([-2, -14, -2.0, -14.0, 0, 2, 14, -1, "-2", True, False, None, [-2], {"x": -2}])


@st.composite
def answer_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(json_objects)
    for key in ("ret", "errcode"):
        if draw(st.booleans()):
            doc[key] = draw(_codes)
    return doc


@st.composite
def request_docs(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return draw(send_docs())[draw(st.sampled_from([0, 1]))]
    doc = draw(json_objects)
    if draw(st.booleans()):
        doc["msg"] = {"context_token": draw(st.sampled_from(["", None, 0, False, [], "tok"]))}
    return doc


_statuses = st.one_of(st.sampled_from([200, 200, 200, 201, 204, 400, 500, 502]), st.integers(100, 599))


@PROPS
@given(request_docs(), _statuses, st.one_of(answer_docs(), st.none()))
def test_first_rule_agrees_with_the_rule_in_words(request_doc, status, response_doc):
    chosen = first_rule(RULES.rules, request_doc, status, response_doc)
    assert (chosen is not None) == rule_says_stale(request_doc, status, response_doc)


# ------------------------------------------------------------------------------ the addon


_ENCODERS = {
    "gzip": lambda b: gzip.compress(b, mtime=0),
    "deflate": zlib.compress,
    "br": brotli.compress,
}


@dataclass(frozen=True)
class Body:
    """A body as sent (`raw`, with `coding` in Content-Encoding) and what it says (`plain`:
    None when it cannot be decoded)."""

    raw: bytes
    coding: str | None
    plain: bytes | None


@st.composite
def bodies(draw: st.DrawFn, docs: st.SearchStrategy[Any]) -> Body:
    plain = _mostly(
        draw,
        docs.map(lambda d: json.dumps(d).encode()),
        st.sampled_from([b"", b"<html>", b'{"ret":-2', b"[]", b'"x"', b"\xff\xfe"]),
    )
    coding = _mostly(
        draw,
        st.sampled_from([None, "identity", "gzip", "deflate", "br", "x-unknown"]),
        st.just("broken-gzip"),
    )
    if coding in _ENCODERS:
        return Body(_ENCODERS[coding](plain), coding, plain)
    if coding == "broken-gzip":  # says gzip, is not: undecodable (unless empty: nothing to decode)
        return Body(plain + b"\x00garbage", "gzip", None)
    if coding == "x-unknown":  # mitmproxy cannot decode it (strict): the body says nothing
        return Body(plain, coding, None)
    return Body(plain, coding, plain)


@dataclass
class StubReissuer:
    """Stands in for the network: records what would be sent and returns a scripted answer."""

    answer: http.Response | Exception
    calls: list[tuple[http.Request, bytes]] = field(default_factory=list)
    max_answer_bytes: int = 1024 * 1024

    async def send(self, request: http.Request, body: bytes, via: Any, timeout: float) -> http.Response:
        self.calls.append((request, body))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _headers(fields: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields])


def make_response(status: int, body: Body, extra: list[tuple[str, str]]) -> http.Response:
    response = http.Response.make(status, b"", _headers([("Content-Type", "application/json"), *extra]))
    _set_raw(response, body.raw, body.coding)
    return response


def _set_raw(message: http.Message, raw: bytes, coding: str | None) -> None:
    """The body exactly as it came over the wire. The header goes on afterwards: mitmproxy's
    make()/content setter would drop a Content-Encoding it cannot encode (x-unknown)."""
    message.raw_content = raw
    message.headers["content-length"] = str(len(raw))
    if coding:
        message.headers["Content-Encoding"] = coding


_header_sets = st.lists(
    st.tuples(
        st.sampled_from(["X-Trace", "Accept", "User-Agent", "Cookie", "X-Wechat-Uin", "Via"]),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10),
    ),
    max_size=3,
)


@st.composite
def stale_answer_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc = draw(json_objects)
    doc[draw(st.sampled_from(["ret", "errcode"]))] = draw(st.sampled_from([-2, -14, -2.0]))
    return doc


@st.composite
def flows(draw: st.DrawFn) -> tuple[http.HTTPFlow, Body, Body, bool]:
    """A flow after the upstream answered: (flow, request body, answer body, the rule selects it)."""
    method = _mostly(draw, st.just("POST"), st.sampled_from(["GET", "PUT", "PATCH"]))
    url = _mostly(
        draw,
        st.sampled_from([SEND_URL, SEND_URL + "?x=1"]),
        st.sampled_from(
            [
                "https://ilinkai.weixin.qq.com/ilink/bot/getupdates",
                "https://ilinkai.weixin.qq.com/ilink/bot/getconfig",
                "https://ilinkai.weixin.qq.com/ilink/bot/sendtyping",
            ]
        ),
    )
    request_coding = _mostly(
        draw, st.sampled_from([None, "identity"]), st.sampled_from(["gzip", "br", "x-unknown"])
    )
    request_raw = _mostly(
        draw,
        send_docs().map(lambda docs: json.dumps(docs[0]).encode()),
        st.one_of(request_docs().map(lambda d: json.dumps(d).encode()), st.binary(max_size=40)),
    )
    f = tflow.tflow(resp=True)
    f.request = http.Request.make(
        method, url, b"", _headers([("Content-Type", "application/json"), *draw(_header_sets)])
    )
    _set_raw(f.request, request_raw, request_coding)
    status = _mostly(draw, st.just(200), _statuses)
    answer = draw(bodies(answer_docs() if draw(st.integers(0, 9)) == 0 else stale_answer_docs()))
    f.response = make_response(status, answer, draw(_header_sets))

    try:
        request_json = json.loads(request_raw)
    except ValueError:
        request_json = None
    try:
        answer_json = json.loads(answer.plain) if answer.plain else None
    except ValueError:
        answer_json = None
    selects = (
        method == "POST"
        and "/ilink/bot/sendmessage" in url
        and request_coding in (None, "identity")
        and rule_says_stale(request_json, status, answer_json)
    )
    return f, Body(request_raw, request_coding, request_raw), answer, selects


@pytest.fixture(scope="module")
def addon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IlinkFixProxy]:
    tmp = tmp_path_factory.mktemp("props")
    rules = tmp / "plain-rules.yaml"
    rules.write_text(plain_rules_text())
    ours = IlinkFixProxy()
    with taddons.context(ours) as tctx:
        # confdir too: nothing of ours may ever land in the real ~/.mitmproxy
        tctx.configure(ours, ilink_rules=str(rules), confdir=str(tmp))
        yield ours


@PROPS
@given(flows())
def test_the_selection_is_exactly_the_rule(addon: IlinkFixProxy, case):
    f, _, _, selects = case
    chosen = addon._selected(f)
    assert (chosen is not None) == selects


@st.composite
def reissue_answers(draw: st.DrawFn) -> http.Response | Exception:
    """What the re-issue brings back: an answer of any status, body and encoding, or a failure.
    The kind is drawn first and evenly, so each kind shows up in every run."""
    kind = draw(st.sampled_from(["ok", "other-status", "failure"]))
    if kind == "failure":
        return draw(
            st.sampled_from([ReissueError("connection reset"), RuntimeError("surprise"), ValueError("odd")])
        )
    status = 200 if kind == "ok" else draw(st.sampled_from([500, 502, 201, 204, 404]))
    body = draw(bodies(st.one_of(answer_docs(), st.just({}))))
    return make_response(status, body, [("X-Upstream", "second")])


_reissue_answers = reissue_answers()


def _readable(answer: http.Response | Exception) -> bool:
    """A re-issue answer the proxy may hand back: 200 with an empty or JSON-object body."""
    if isinstance(answer, Exception) or answer.status_code != 200:
        return False
    try:
        body = answer.get_content(strict=True) or b""
    except ValueError:
        return False
    if not body:
        return True
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


@PROPS
@given(flows(), _reissue_answers)
def test_the_response_hook_never_raises_and_touches_only_what_it_repairs(addon: IlinkFixProxy, case, answer):
    f, request_body, _, selects = case
    original = f.response
    assert original is not None
    before = original.get_state()
    request_before = f.request.get_state()
    stub = StubReissuer(answer)
    addon.reissuer = stub  # type: ignore[assignment]

    asyncio.run(addon.response(f))  # must not raise, whatever the flow and the answer

    assert f.request.get_state() == request_before  # the gateway's request is never modified
    if not selects:
        assert stub.calls == []
        assert f.response is original
        meta = f.metadata.get("ilink_fixproxy")
        if meta is not None:  # a send the rule's filter selects: only its answer is classified
            assert set(meta) == {"delivery"}
            if meta["delivery"] == "unconfirmed":  # ... and an unconfirmed one marked, nothing else
                assert f.response.headers.pop(HEADER).startswith("unconfirmed; rule=")
        assert f.response.get_state() == before
        assert not f.comment and not f.marked
        return

    (sent_request, sent_body) = stub.calls[0]
    assert len(stub.calls) == 1  # retries: 1
    assert sent_request is f.request
    # The only difference between the original and the re-issued body is the removed member.
    assert sent_body == remove_member(request_body.raw, PATH)
    expected = json.loads(request_body.raw)
    del expected["msg"]["context_token"]
    assert json.loads(sent_body) == expected
    assert_one_cut(request_body.raw.decode(), sent_body.decode())

    if _readable(answer):
        assert f.response is answer
        assert f.response.headers[HEADER].startswith(("repaired;", "still-failing;"))
    else:
        assert f.response is original and f.response.get_state() == before
        assert HEADER not in f.response.headers


# ------------------------------------------------------------------------------ the re-issue request


_header_names = st.one_of(
    st.sampled_from(
        [
            "Authorization",
            "AuthorizationType",
            "iLink-App-Id",
            "X-WECHAT-UIN",
            "Host",
            "Cookie",
            "Accept-Language",
            *sorted(h.title() for h in HOP_BY_HOP),
        ]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
        lambda n: n.strip("-") == n
    ),
)
_header_values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


@dataclass
class Upstream:
    """A real HTTP/1.1 server on loopback that records exactly what it received, and one
    Reissuer on one event loop for all examples (building either per example costs more than
    the example: the Reissuer loads certifi's CA bundle)."""

    fake: FakeILink
    loop: asyncio.AbstractEventLoop
    reissuer: Reissuer


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[Upstream]:
    loop = asyncio.new_event_loop()
    reissuer = Reissuer(max_answer_bytes=1024)
    with FakeILink() as fake:
        try:
            yield Upstream(fake, loop, reissuer)
        finally:
            loop.run_until_complete(reissuer.aclose())
            loop.close()


def reissue_through(upstream: Upstream, header_list: list[tuple[str, str]], body: bytes):
    """Re-issue a request with these headers to a real loopback server: (the request the proxy
    held, what the server received as (lower name, value) pairs)."""
    upstream.fake.reset()
    headers = [(k, v) for k, v in header_list if k.lower() != "content-length"]
    request = http.Request.make("POST", upstream.fake.url + "/props/reissue", b"", _headers(headers))
    request.raw_content = b"original"
    answer = upstream.loop.run_until_complete(upstream.reissuer.send(request, body, None, 10.0))
    assert answer.status_code == 404  # the fake's answer to an unknown path, whatever it is
    (got,) = upstream.fake.requests
    assert got.body == body
    return request, [(k.lower(), v) for k, v in got.headers]


def _end_to_end(request: http.Request) -> list[tuple[str, str]]:
    # What the proxy holds (mitmproxy keeps Host in step with the URL), not what was generated;
    # "Connection: keep-alive" may pass on as mitmproxy passes it, other hop-by-hop ones never.
    fields = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.fields]
    return [
        (k, v)
        for k, v in fields
        if k not in HOP_BY_HOP or (k == "connection" and v.strip().lower() == "keep-alive")
    ]


_header_lists = st.lists(st.tuples(_header_names, _header_values), max_size=8)


@PROPS
@given(_header_lists, st.binary(max_size=100))
def test_the_reissue_sends_every_gateway_header_and_no_hop_by_hop_one(
    plain_upstream: Upstream, header_list, body
):
    request, received = reissue_through(plain_upstream, header_list, body)
    assert ("content-length", str(len(body))) in received
    expected = _end_to_end(request)
    for pair in expected:
        assert pair in received, f"{pair[0]} was not sent again"
    dropped = {k.lower() for k in request.headers} - {k for k, _ in expected}
    for name in dropped - {"content-length", "connection"}:
        assert name not in {k for k, _ in received}, f"hop-by-hop {name} was passed on"


@PROPS
@given(_header_lists, st.binary(max_size=100))
def test_the_reissue_adds_nothing_but_host_and_length(plain_upstream: Upstream, header_list, body):
    request, received = reissue_through(plain_upstream, header_list, body)
    received.remove(("content-length", str(len(body))))
    expected = _end_to_end(request)
    if not any(k == "host" for k, _ in expected):
        hosts = [h for h in received if h[0] == "host"]
        assert len(hosts) == 1
        received.remove(hosts[0])
    # The gateway's end-to-end headers and nothing else. httpx moves Host to the front; the order
    # of differently named fields carries no meaning in HTTP, the order of same-named ones does.
    assert sorted(received) == sorted(expected)
    for name in {k for k, _ in expected}:
        assert [v for k, v in received if k == name] == [v for k, v in expected if k == name]

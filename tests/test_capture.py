"""Capture and observability through the real proxy process: the journal's content, redaction of
every file written (and of the proxy's own output), owner-only modes, rotation, HAR export read
back by mitmproxy's own reader, redacted flow files, JSON logs and the mitmweb UI. The redaction
and rotation building blocks are also tested on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, core_rules, start_proxy, upstream_args
from ilink_fixproxy.capture import Capture, RotatingFile, buffer_small_api_flow, rotated_files, summarize
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.redact import (
    OMITTED,
    redact_header,
    redact_json,
    redact_text,
    redact_url,
    redact_value,
    safe_text_body,
    token_hash,
)
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from mitmproxy import exceptions, io
from mitmproxy.test import taddons, tflow
from mitmproxy.tools.web import webaddons
from obs_helpers import Gateway, files_under, free_port, journal, leaks

HASH = re.compile(r"^#[0-9a-f]{10}$")


# --------------------------------------------------------------------------- building blocks


def test_redaction_hashes_secrets_and_ids_and_omits_message_content():
    doc = {
        "msg": {
            "to_user_id": "wxid_peer",
            "context_token": "ctx-secret",
            "item_list": [
                {"type": 1, "text_item": {"text": "hello"}},
                {"type": 2, "image_item": {"media": {"aes_key": "k", "encrypt_query_param": "q"}}},
            ],
        },
        "typing_ticket": "tt",
        "local_token_list": ["a", "b"],
        "upload_full_url": "https://cdn/upload?x",
        "ret": -2,
        "errmsg": "prepare failed",
    }
    out = redact_json(doc)
    text = json.dumps(out)
    for secret in ("ctx-secret", "hello", '"k"', '"q"', '"tt"', "wxid_peer", "cdn/upload"):
        assert secret not in text
    assert out["msg"]["context_token"] == token_hash("ctx-secret")
    assert out["msg"]["to_user_id"] == token_hash("wxid_peer")
    assert out["msg"]["item_list"] == [{"type": 1, "text_item": OMITTED}, {"type": 2, "image_item": OMITTED}]
    assert out["local_token_list"] == [token_hash("a"), token_hash("b")]
    assert (out["ret"], out["errmsg"]) == (-2, "prepare failed")
    # with bodies and ids: the text and the peer stay, secrets (media keys included) do not
    full = redact_json(doc, bodies=True, ids=True)
    assert full["msg"]["item_list"][0]["text_item"]["text"] == "hello"
    assert full["msg"]["to_user_id"] == "wxid_peer"
    assert full["msg"]["item_list"][1]["image_item"]["media"]["aes_key"] == token_hash("k")
    assert redact_json(out) == out  # idempotent: redacting a capture again changes nothing


def test_malformed_and_unlisted_credential_headers_are_hashed():
    from ilink_fixproxy.redact import redact_field

    # a line mitmproxy folded into the previous value, or a name with a space in it: hashed whole
    assert redact_field("X-Note", "hi\r\n Authorization Bearer tok-1") == (
        "X-Note",
        token_hash("hi\r\n Authorization Bearer tok-1"),
    )
    assert redact_field("Authorization Bearer", "tok-2") == ("Authorization Bearer", token_hash("tok-2"))
    name, _ = redact_field("Authorization Bearer tok-3", "x")
    assert "tok-3" not in name
    # names that say credential, and a credential scheme under any name
    assert redact_field("X-Auth-Token", "tok-4") == ("X-Auth-Token", token_hash("tok-4"))
    assert redact_field("X-Copy", "Bearer tok-5") == ("X-Copy", f"Bearer {token_hash('tok-5')}")
    # what is not a credential stays readable
    assert redact_field("AuthorizationType", "ilink_bot_token") == ("AuthorizationType", "ilink_bot_token")
    assert redact_field("User-Agent", "hermes/1.0") == ("User-Agent", "hermes/1.0")


def test_redaction_of_headers_urls_and_free_text():
    assert redact_header("Authorization", "Bearer bot@im.bot:sec") == f"Bearer {token_hash('bot@im.bot:sec')}"
    assert redact_header("Content-Type", "application/json") == "application/json"
    url = redact_url("https://cdn.example/c2c/download?encrypted_query_param=abc%2Bdef&filekey=f1")
    assert "abc" not in url and "filekey=f1" in url
    assert redact_url(url) == url
    line = 'Bearer s3cr3t {"context_token": "ctx-1", "ret": -2} typing_ticket=tt-9&x=1'
    scrubbed = redact_text(line)
    for secret in ("s3cr3t", "ctx-1", "tt-9"):
        assert secret not in scrubbed
    assert '"ret": -2' in scrubbed and "x=1" in scrubbed
    assert HASH.match(redact_value("anything"))


def test_a_body_that_is_not_json_is_kept_only_when_no_secret_can_hide_in_it():
    cut = '{"msg":{"context_token":"AARzJWAFAAAB-cut-short'
    assert "AARz" not in redact_text(cut)  # no closing quote: still scrubbed
    assert safe_text_body(cut) is None  # and not stored at all
    assert safe_text_body("<html>502 bad gateway</html>") == "<html>502 bad gateway</html>"


def test_rotating_file_is_owner_only_and_rotates(tmp_path: Path):
    path = tmp_path / "journal.jsonl"
    f = RotatingFile(path, max_bytes=100, backups=2)
    for i in range(12):
        f.write(f"{i:040d}\n".encode())  # 41 bytes: two records per file
    f.close()
    assert [p.name for p in rotated_files(tmp_path, "journal.jsonl")] == [
        "journal.jsonl.2",
        "journal.jsonl.1",
        "journal.jsonl",
    ]
    lines = [line for p in rotated_files(tmp_path, "journal.jsonl") for line in p.read_text().splitlines()]
    assert [int(x) for x in lines] == [6, 7, 8, 9, 10, 11]  # oldest dropped, order kept
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())


def test_small_api_requests_are_buffered_for_capture_large_ones_stream():
    small = tflow.tflow()
    small.request.path = "/ilink/bot/getconfig"
    small.request.stream = True
    buffer_small_api_flow(small, 1024)
    assert small.request.stream is False
    large = tflow.tflow()
    large.request.path = "/ilink/bot/getconfig"
    large.request.headers["content-length"] = "5000"
    large.request.stream = True
    buffer_small_api_flow(large, 1024)
    assert large.request.stream is True
    cdn = tflow.tflow()
    cdn.request.path = "/upload?encrypted_query_param=x"
    cdn.request.stream = True
    buffer_small_api_flow(cdn, 1024)
    assert cdn.request.stream is True


def test_a_passed_through_exchange_is_summarized_from_the_flow():
    f = tflow.tflow(resp=True)
    f.request.path = "/ilink/bot/getconfig"
    f.request.content = b'{"ilink_user_id":"wxid_x","context_token":"ctx-2"}'
    f.response.content = b'{"ret":0,"typing_ticket":"tt"}'
    x = summarize(f, f.request.timestamp_start + 0.5)
    assert (x.endpoint, x.decision, x.peer, x.token) == ("getconfig", "passed", "wxid_x", token_hash("ctx-2"))
    (attempt,) = x.attempts
    assert (attempt["status"], attempt["ret"], attempt["token"]) == (200, 0, "original")
    assert x.total_ms == 500.0 and x.added_ms <= x.total_ms


def test_capture_options_are_validated(tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    capture = Capture()
    with taddons.context(capture) as tctx:
        with pytest.raises(exceptions.OptionsError, match="ilink_capture_max_bytes"):
            tctx.configure(capture, ilink_capture_max_bytes="lots")
        with pytest.raises(exceptions.OptionsError, match="cannot write captures in"):
            tctx.configure(capture, ilink_capture=str(not_a_dir / "sub"))
        tctx.configure(capture, ilink_capture=str(tmp_path / "cap"))
        assert (tmp_path / "cap").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "cap" / "journal.jsonl").stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- through the proxy


@dataclass
class Captured:
    proxy: ProxyProcess
    dir: Path
    gw: Gateway
    expected: list[tuple[str, str]]  # (endpoint, decision) in order
    cdn_secret: str


@pytest.fixture(scope="module")
def captured(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Captured]:
    """One proxy with the shipped rules (peer state), capture with flow files and JSON logs, and
    traffic that takes every kind of decision."""
    fake = fake_server
    fake.reset()
    fake.longpoll_seconds = 0.05
    base = tmp_path_factory.mktemp("capture")
    cap = base / "cap"  # does not exist yet: the proxy creates it
    with start_proxy(
        *upstream_args(fake, pki, base / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        ":memory:",
        "--capture",
        str(cap),
        "--capture-flows",
        "--log-format",
        "json",
    ) as proxy:
        gw = Gateway(proxy.url)
        stale_a, stale_b = gw.token("stale-a"), gw.token("stale-b")
        gw.poll()
        assert gw.send(stale_a, "c1").headers["x-ilink-fixproxy"].startswith("repaired")
        assert gw.send(stale_a, "c1").headers["x-ilink-fixproxy"].startswith("replayed")
        fake.tokenless_delivers = False
        assert gw.send(stale_b, "c2").headers["x-ilink-fixproxy"].startswith("window-closed")
        assert gw.send(stale_b, "c3").headers["x-ilink-fixproxy"].startswith("answered-locally")
        fake.push_inbound(gw.peer, f"inbound text {os.urandom(4).hex()}")
        gw.poll()
        assert gw.send(stale_b, "c4").headers["x-ilink-fixproxy"].startswith("substituted")
        gw.getconfig(next(t for t in gw.tokens if t.startswith("ctx-")))
        cdn_secret = f"cdn-param-{os.urandom(6).hex()}"
        gw.client.post(proxy.url + f"/upload?encrypted_query_param={cdn_secret}", content=b"\0" * 4096)
        expected = [
            ("getupdates", "passed"),
            ("sendmessage", "repaired"),
            ("sendmessage", "replayed"),
            ("sendmessage", "window-closed"),
            ("sendmessage", "answered-locally"),
            ("getupdates", "passed"),
            ("sendmessage", "substituted"),
            ("getconfig", "passed"),
        ]
        yield Captured(proxy, cap, gw, expected, cdn_secret)
        gw.close()


def test_the_journal_has_one_line_per_ilink_exchange_with_what_happened(captured: Captured):
    records = journal(captured.dir)
    assert [(r["endpoint"], r["decision"]) for r in records] == captured.expected  # CDN not journaled
    gw = captured.gw
    for r in records:
        assert r["v"] == 1 and r["time"].endswith("Z") and r["method"] == "POST"
        assert r["bot"] and r["added_ms"] >= 0 and r["total_ms"] >= r["added_ms"]
    repaired = records[1]
    assert repaired["peer"] == token_hash(gw.peer)
    assert repaired["client_id"] == "c1"
    assert repaired["token_sent"] is True and HASH.match(repaired["token"])
    first, second = repaired["attempts"]
    assert (first["status"], first["ret"], first["errmsg"], first["token"]) == (
        200,
        -2,
        "prepare failed",
        "original",
    )
    assert (second["status"], second["ret"], second["token"]) == (200, 0, "none")
    # what iLink's answer said about delivery, for each send that reached it (None: no answer
    # from iLink was handed back, or not a send)
    assert [r["delivery"] for r in records] == [
        None,
        "confirmed",
        None,
        "refused",
        None,
        None,
        "confirmed",
        None,
    ]
    assert first["ms"] >= 0 and repaired["upstream_ms"] >= first["ms"]
    assert repaired["note"].startswith("repaired; rule=stale-context-token")
    assert records[2]["attempts"] == [] and records[4]["attempts"] == []  # answered by the proxy
    assert records[6]["attempts"][0]["token"] == "fresh"
    config = records[7]
    assert config["attempts"][0]["ret"] == 0  # an unselected exchange's answer is read too
    assert config["response"]["json"]["typing_ticket"].startswith("#")
    # message content is left out without --capture-bodies
    assert repaired["request"]["json"]["msg"]["item_list"] == [{"type": 1, "text_item": OMITTED}]
    # the bot hash matches between exchanges and differs from the token's
    assert len({r["bot"] for r in records}) == 1


def test_no_secret_or_message_text_in_any_capture_file_or_the_output(captured: Captured, tmp_path: Path):
    out = tmp_path / "export.har"
    p = subprocess.run(
        ilink_fixproxy_argv("capture", "export", "--har", str(out), str(captured.dir)),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert p.returncode == 0, p.stderr
    written = [*files_under(captured.dir), out]
    assert {f.name for f in written} >= {"journal.jsonl", "flows.mitm", "export.har"}
    needles = [*captured.gw.secrets(), *captured.gw.texts, captured.gw.peer, captured.cdn_secret]
    for f in written:
        assert leaks(f.read_bytes(), needles) == [], f
    assert leaks(captured.proxy.output.encode(), needles) == []
    assert leaks((p.stdout + p.stderr).encode(), needles) == []


def test_capture_files_and_folder_are_owner_only(captured: Captured):
    assert captured.dir.stat().st_mode & 0o777 == 0o700
    for f in files_under(captured.dir):
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_har_export_is_read_back_by_mitmproxy_with_every_exchange(captured: Captured, tmp_path: Path):
    # from the flow files (mitmproxy's own HAR writer) and, without them, from the journal
    journal_only = tmp_path / "journal-only"
    journal_only.mkdir()
    shutil.copy(captured.dir / "journal.jsonl", journal_only / "journal.jsonl")
    for source in (captured.dir, journal_only):
        out = tmp_path / f"{source.name}.har"
        p = subprocess.run(
            ilink_fixproxy_argv("capture", "export", "--har", str(out), str(source)),
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
        )
        assert p.returncode == 0, p.stderr
        assert out.stat().st_mode & 0o777 == 0o600
        doc = json.loads(out.read_text())
        assert doc["log"]["version"] == "1.2"
        flows = io.read_flows_from_paths([str(out)])
        assert len(flows) == len(captured.expected)
        assert [f.request.path for f in flows][1] == "/ilink/bot/sendmessage"
        assert flows[1].response.status_code == 200
        entries = doc["log"]["entries"]
        assert [e["_ilink_fixproxy"]["decision"] for e in entries] == [d for _, d in captured.expected]
        assert entries[1]["comment"].startswith("ilink-fixproxy repaired")


def test_flow_files_are_redacted_and_readable_by_mitmproxy(captured: Captured):
    flows = io.read_flows_from_paths([str(captured.dir / "flows.mitm")])
    assert len(flows) == len(captured.expected)
    repaired = flows[1]
    assert repaired.request.headers["authorization"].startswith("Bearer #")
    assert repaired.comment.startswith("ilink-fixproxy repaired")
    assert repaired.metadata["ilink_fixproxy"]["decision"] == "repaired"
    assert json.loads(repaired.request.content)["msg"]["context_token"].startswith("#")


def test_json_logs_one_object_per_line_and_a_line_per_decision(captured: Captured):
    lines = [line for line in captured.proxy.output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if not line.startswith("ilink-fixproxy listening on")]
    assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)
    decisions = [r["decision"] for r in records if "decision" in r]
    assert decisions == [d for e, d in captured.expected if e == "sendmessage"]


def test_capture_bodies_and_ids_keep_text_and_ids_but_never_secrets(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    cap = tmp_path / "cap"
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(core_rules(tmp_path)),
        "--capture",
        str(cap),
        "--capture-bodies",
        "--capture-ids",
        "--set",
        "ilink_capture_max_bytes=8k",
    ) as proxy:
        gw = Gateway(proxy.url)
        for i in range(6):
            assert gw.send(gw.token(f"stale{i}")).headers["x-ilink-fixproxy"].startswith("repaired")
        gw.close()
    files = files_under(cap)
    assert [f.name for f in files if f.name.startswith("journal")] == ["journal.jsonl", "journal.jsonl.1"]
    everything = b"".join(f.read_bytes() for f in files)
    assert all(text.encode() in everything for text in gw.texts[-2:])  # kept with --capture-bodies
    assert gw.peer.encode() in everything  # --capture-ids
    assert leaks(everything + proxy.output.encode(), gw.secrets()) == []
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)


def test_capture_flags_need_a_capture_dir():
    p = subprocess.run(
        ilink_fixproxy_argv("--capture-bodies"), capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert p.returncode == 2
    assert p.stderr.strip() == "ilink-fixproxy: --capture-bodies only applies with --capture DIR"


@pytest.mark.skipif(
    not hasattr(webaddons, "WebAuth"), reason="--ui needs mitmweb with authentication (mitmproxy >= 11.1.2)"
)
def test_ui_shows_repaired_and_locally_answered_flows_marked_with_a_comment(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    web_port = free_port()
    with start_proxy(
        *upstream_args(fake, pki, tmp_path / "conf"),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        ":memory:",
        "--ui",
        "--set",
        f"web_port={web_port}",
    ) as proxy:
        gw = Gateway(proxy.url)
        gw.send(gw.token("stale"))
        fake.tokenless_delivers = False
        gw.send(gw.token("stale2"), "w1")
        gw.send(gw.token("stale2"), "w2")
        password = (tmp_path / "conf" / "ilink-fixproxy-ui-password").read_text().strip()
        auth = {"Authorization": f"Bearer {password}"}
        deadline = time.monotonic() + 5
        while True:
            flows = httpx.get(f"http://127.0.0.1:{web_port}/flows", headers=auth, trust_env=False).json()
            if len(flows) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        gw.close()
    marked = {f["comment"].split(" ")[1]: f["marked"] for f in flows if f["comment"]}
    assert marked["repaired"] and marked["answered-locally"] and marked["window-closed"]
    assert all(f["comment"].startswith("ilink-fixproxy ") for f in flows)

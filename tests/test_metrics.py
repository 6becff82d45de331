"""Prometheus metrics through the real proxy process: /metrics parsed with prometheus-client's own
parser, counters moving as traffic flows, /healthz, and the option's validation. The bounded label
functions are tested on their own."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, SEND, start_proxy, upstream_args
from ilink_fixproxy.capture import Exchange
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.metrics import Metrics, code_label, errmsg_class, parse_hostport, repair_outcome
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI
from mitmproxy import exceptions
from mitmproxy.test import taddons
from obs_helpers import Gateway
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def test_labels_are_bounded():
    assert [code_label(v) for v in (None, -2, "-14", 0, True, 10**12, "x")] == [
        "none",
        "-2",
        "-14",
        "0",
        "other",
        "other",
        "other",
    ]
    assert [
        errmsg_class(v) for v in (None, "", "prepare failed", "Unknown Error", "session timeout", "eh")
    ] == [
        "none",
        "empty",
        "prepare_failed",
        "unknown_error",
        "session_timeout",
        "other",
    ]


def _exchange(decision: str, attempts: list[dict], token_sent: bool = True) -> Exchange:
    return Exchange(
        endpoint="sendmessage",
        decision=decision,
        rule="r",
        handled=True,
        bot="b",
        peer="p",
        client_id="c",
        token="#0123456789" if token_sent else None,
        token_sent=token_sent,
        attempts=attempts,
        status=200,
        upstream_ms=1.0,
        total_ms=2.0,
        added_ms=1.0,
        note=None,
        error=None,
        request_doc=None,
        response_doc=None,
    )


def test_repair_outcomes():
    stale = {"status": 200, "ret": -2, "token": "original", "empty": False}
    ok = {"status": 200, "ret": None, "token": "none", "empty": False}
    empty = {"status": 200, "ret": None, "token": "none", "empty": True}
    refused = {"status": 200, "ret": -2, "token": "none", "empty": False}
    failed = {"status": None, "error": "reset", "token": "none"}
    assert repair_outcome(_exchange("repaired", [stale, ok])) == "delivered"
    assert repair_outcome(_exchange("repaired", [stale, empty])) == "unconfirmed_empty_body"
    assert repair_outcome(_exchange("window-closed", [stale, refused])) == "still_failing"
    assert repair_outcome(_exchange("reissue-failed", [stale, failed])) == "still_failing"
    assert repair_outcome(_exchange("substituted", [{**ok, "token": "fresh"}])) == "delivered"
    assert repair_outcome(_exchange("passed", [{**ok, "token": "original"}])) is None
    assert repair_outcome(_exchange("passed", [ok], token_sent=False)) is None  # nothing was changed
    assert repair_outcome(_exchange("answered-locally", [])) is None


def test_metrics_option_is_validated():
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport("[::1]:9464") == ("::1", 9464)
    metrics = Metrics()
    with taddons.context(metrics) as tctx:
        for bad in ("9464", ":9464", "localhost:http", "127.0.0.1:70000"):
            with pytest.raises(exceptions.OptionsError, match="HOST:PORT"):
                tctx.configure(metrics, ilink_metrics=bad)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(exceptions.OptionsError, match=f"cannot listen on 127.0.0.1:{port}"):
                tctx.configure(metrics, ilink_metrics=f"127.0.0.1:{port}")
        tctx.configure(metrics, ilink_metrics="127.0.0.1:0")
        assert metrics.server is not None
        tctx.configure(metrics, ilink_metrics="")
        assert metrics.server is None


# --------------------------------------------------------------------------- through the proxy


@pytest.fixture(scope="module")
def metered(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, str]]:
    conf = tmp_path_factory.mktemp("metrics")
    with start_proxy(
        *upstream_args(fake_server, pki, conf),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        ":memory:",
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        m = re.search(r"metrics on (http://\S+)/metrics", p.output)
        assert m, p.output
        yield p, m.group(1)


def scrape(base: str) -> Samples:
    r = httpx.get(base + "/metrics", trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


OUTCOMES = ("confirmed", "unconfirmed", "refused", "failed")


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_move_as_traffic_flows(metered: tuple[ProxyProcess, str], fake: FakeILink):
    proxy, base = metered
    gw = Gateway(proxy.url)
    s0 = scrape(base)
    assert value(s0, "ilink_fixproxy_repairs_total", outcome="delivered") >= 0

    assert gw.send(gw.token("stale")).headers["x-ilink-fixproxy"].startswith("repaired")
    s1 = scrape(base)
    assert moved(s0, s1, "ilink_fixproxy_requests_total", endpoint="sendmessage", decision="repaired") == 1
    answer = {"endpoint": "sendmessage", "status": "200", "errcode": "none"}
    assert (
        moved(
            s0, s1, "ilink_fixproxy_upstream_answers_total", **answer, ret="-2", errmsg_class="prepare_failed"
        )
        == 1
    )
    assert moved(s0, s1, "ilink_fixproxy_upstream_answers_total", **answer, ret="0", errmsg_class="none") == 1
    assert moved(s0, s1, "ilink_fixproxy_repairs_total", outcome="delivered") == 1
    # one send, one outcome: iLink's final answer carried a message_id
    assert moved(s0, s1, "ilink_fixproxy_send_outcomes_total", outcome="confirmed") == 1
    assert value(s0, "ilink_fixproxy_send_outcomes_total", outcome="unconfirmed") >= 0  # present at 0
    assert moved(s0, s1, "ilink_fixproxy_upstream_seconds_count", endpoint="sendmessage") == 2
    assert moved(s0, s1, "ilink_fixproxy_added_seconds_count", endpoint="sendmessage") == 1
    assert value(s1, "ilink_fixproxy_added_seconds_bucket", endpoint="sendmessage", le="+Inf") >= 1
    assert value(s1, "ilink_fixproxy_state_rows", table="messages") >= 1

    fake.tokenless_delivers = False  # the tokenless re-issue is refused too: window closed
    gw.send(gw.token("stale2"))
    gw.send(gw.token("stale2"))  # answered locally: no upstream answer counted
    s2 = scrape(base)
    assert moved(s1, s2, "ilink_fixproxy_repairs_total", outcome="still_failing") == 1
    assert (
        moved(s1, s2, "ilink_fixproxy_requests_total", endpoint="sendmessage", decision="window-closed") == 1
    )
    assert (
        moved(s1, s2, "ilink_fixproxy_requests_total", endpoint="sendmessage", decision="answered-locally")
        == 1
    )
    assert moved(s1, s2, "ilink_fixproxy_upstream_seconds_count", endpoint="sendmessage") == 2
    # the refused send counts once; the one answered from memory never reached iLink
    outcomes = {o: moved(s1, s2, "ilink_fixproxy_send_outcomes_total", outcome=o) for o in OUTCOMES}
    assert outcomes == {"confirmed": 0, "unconfirmed": 0, "refused": 1, "failed": 0}
    gw.close()


def test_an_empty_answer_to_a_repair_counts_as_unconfirmed(
    metered: tuple[ProxyProcess, str], fake: FakeILink
):
    proxy, base = metered
    gw = Gateway(proxy.url)
    fake.script(SEND, Answer(body=b'{"ret":-2}'), Answer(body=b""))
    before = scrape(base)
    r = gw.send(gw.token("stale"))
    assert r.status_code == 200 and r.content == b""
    after = scrape(base)
    assert moved(before, after, "ilink_fixproxy_repairs_total", outcome="unconfirmed_empty_body") == 1
    assert moved(before, after, "ilink_fixproxy_send_outcomes_total", outcome="unconfirmed") == 1
    assert r.headers["x-ilink-fixproxy"].startswith("repaired; ")
    assert r.headers["x-ilink-fixproxy"].endswith("; delivery=unconfirmed; handed=as-is")
    gw.getconfig(gw.token("ctx"))  # an exchange no rule selects: counted with iLink's ret
    final = scrape(base)
    assert moved(after, final, "ilink_fixproxy_requests_total", endpoint="getconfig", decision="passed") == 1
    config = {"endpoint": "getconfig", "status": "200", "ret": "0", "errcode": "none", "errmsg_class": "none"}
    assert moved(after, final, "ilink_fixproxy_upstream_answers_total", **config) == 1
    gw.close()


def test_healthz_and_unknown_paths(metered: tuple[ProxyProcess, str]):
    _, base = metered
    health = httpx.get(base + "/healthz", trust_env=False)
    assert (health.status_code, health.text) == (200, "ok\n")
    assert httpx.get(base + "/nope", trust_env=False).status_code == 404


def test_metrics_address_mistakes_end_in_one_line(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for spec, expected in (
            ("9464", "--metrics '9464' is not HOST:PORT"),
            (f"127.0.0.1:{port}", f"ilink_metrics: cannot listen on 127.0.0.1:{port}"),
        ):
            p = subprocess.run(
                ilink_fixproxy_argv("--listen", "127.0.0.1:0", "--confdir", str(tmp_path), "--metrics", spec),
                capture_output=True,
                text=True,
                timeout=60,
                env=clean_env(),
            )
            assert p.returncode == 2, p.stdout + p.stderr
            assert expected in p.stderr and "Traceback" not in p.stderr
            assert len(p.stderr.strip().splitlines()) == 1, p.stderr

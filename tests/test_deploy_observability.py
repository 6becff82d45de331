"""The shipped Grafana dashboard and Prometheus alert rules (deploy/grafana, deploy/prometheus):
`promtool check rules` and `promtool test rules` pass, every dashboard expression is PromQL
Prometheus's own parser accepts, and every metric a panel or a rule names is one the real proxy
exposes after real traffic (scraped from its /metrics), and the reverse: every family the proxy
exposes is on the dashboard.

Metric names are read out of PromQL with `metric_names` below, a small tokenizer aware of the
language (string literals, label matchers, ranges, grouping clauses, functions, keywords): no
PromQL parser is packaged for Python that we could rely on, and promtool cannot list names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, Gateway, start_proxy, upstream_args
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI
from prometheus_client.parser import text_string_to_metric_families
from redis_helpers import STATE_KEY, RedisServer, redis_binary
from test_e2e_outbox import wait_for

DASHBOARD = ROOT / "deploy" / "grafana" / "ilink-fixproxy-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "ilink-fixproxy-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "ilink-fixproxy-rules.test.yml"

# Series Prometheus makes itself for every target.
FROM_PROMETHEUS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# ------------------------------------------------------------------ PromQL names

FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_sum",
        "histogram_avg",
        "histogram_stddev",
        "histogram_stdvar",
        "holt_winters",
        "double_exponential_smoothing",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_desc",
        "sort_by_label",
        "sort_by_label_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"})
KEYWORDS |= {"unless", "offset", "atan2", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once string literals, label
    matchers `{…}`, ranges and subqueries `[…]`, grouping clauses `by (…)` and the like, Grafana's
    variables (`$job`, `${x}`, `$__rate_interval`), function calls and keywords are set aside."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call:
            assert name in FUNCTIONS, f"unknown PromQL function {name!r} in {expr!r}"
            continue
        if name.lower() in KEYWORDS or name in FUNCTIONS:
            continue
        names.add(name)
    return names


def test_metric_names_reads_promql_as_prometheus_does():
    expr = (
        'sum by (le, endpoint) (rate(a_bucket{job=~"$job", x="rate(not_me{}) by"}[$__rate_interval])) '
        "/ on (instance) group_left (zone) b_total offset 5m > bool 0.8 * c:recorded "
        "and ignoring(x) histogram_quantile(0.99, d_seconds_bucket[5m:1m]) unless max without(y) (e)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded", "d_seconds_bucket", "e"}
    assert metric_names("up == 0") == {"up"}
    assert metric_names("sum(rate(x_total[1h])) by (instance)") == {"x_total"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("made_up(x)")


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for v in doc["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        if m := re.fullmatch(r"label_values\((.*),\s*\w+\)", q):
            exprs.append(m.group(1))
    return exprs


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


# ------------------------------------------------------------------ promtool


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    reason = "promtool is not installed (Debian: apt-get install prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the rule checks cannot run: {reason}", pytrace=False)
    pytest.skip(f"{reason} (with CI=true this fails)")


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    tool = promtool()
    checked = run(tool, "check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(tool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts == tested


def test_dashboard_queries_parse_as_promql(tmp_path: Path):
    """Each panel's query, with Grafana's variables given values, through Prometheus's parser."""
    tool = promtool()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    concrete = [
        e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*") for e in exprs
    ]
    rules = [{"record": f"dashboard:query:{i}", "expr": e} for i, e in enumerate(concrete)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = run(tool, "check", "rules", path.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_is_importable():
    doc = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in doc["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            assert p["targets"], p["title"]


# ------------------------------------------------------------------ against the real proxy


@pytest.fixture(scope="module")
def exposed(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[set[str]]:
    """The sample names real proxies expose: one on the SQLite store once it has repaired a
    send, deferred two to a closed window and delivered them late, passed an exchange no rule
    selects, and learnt and spent a peer's send budget; and, as Redis has families of its own (the
    failed operations), one on a Redis store after the same traffic and a send while Redis was down."""
    fake_server.reset()
    conf = tmp_path_factory.mktemp("deploy")
    with start_proxy(
        *upstream_args(fake_server, pki, conf),
        "--rules",
        str(ROOT / "rules.yaml"),
        "--state",
        str(conf / "state.sqlite3"),
        "--defer",
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        names = _traffic_and_scrape(p, fake_server)
    fake_server.reset()
    redis_binary()
    with (
        RedisServer(conf / "redis") as redis,
        ProxyProcess(
            ilink_fixproxy_argv(
                "--listen",
                "127.0.0.1:0",
                *upstream_args(fake_server, pki, conf / "on-redis"),
                "--rules",
                str(ROOT / "rules.yaml"),
                "--state",
                redis.url,
                "--defer",
                "--metrics",
                "127.0.0.1:0",
            ),
            env=clean_env({"ILINK_FIXPROXY_STATE_KEY": STATE_KEY}),
        ) as p,
    ):
        on_redis = _traffic_and_scrape(p, fake_server)
        redis.kill()
        gw = Gateway(p)
        assert gw.send("stale-while-redis-is-down").status_code == 200
        gw.client.close()
        on_redis |= _scrape(p, "ilink_fixproxy_store_unavailable_total")
    fake_server.reset()
    yield names | on_redis


def _traffic_and_scrape(p: ProxyProcess, fake: FakeILink) -> set[str]:
    gw = Gateway(p)
    assert gw.send("stale-token").headers["x-ilink-fixproxy"].startswith("repaired")
    fake.tokenless_delivers = False
    assert gw.send("stale-token").headers["x-ilink-fixproxy"].startswith("deferred")
    fake.tokenless_delivers = True
    fake.push_inbound(gw.peer)
    gw.poll()
    wait_for(lambda: len(fake.deliveries) == 2)
    gw.client.post(p.url + "/ilink/bot/getconfig", content=b"{}", headers=gw.headers)
    # A peer whose send budget is 1 per inbound message: the 2nd send is refused (the budget is
    # learnt and spent), the 3rd is deferred without reaching iLink.
    budgeted = Gateway(p)
    fake.budget_peers[budgeted.peer] = 1
    token = fake.push_inbound(budgeted.peer)
    budgeted.poll()
    assert budgeted.send(token).headers.get("x-ilink-fixproxy") is None
    assert budgeted.send(token).headers["x-ilink-fixproxy"].endswith("reason=budget-spent")
    held = budgeted.send(token).headers["x-ilink-fixproxy"]
    assert held.startswith("deferred; ") and held.endswith("reason=budget-spent")
    budgeted.client.close()
    gw.client.close()
    # the late delivery's event is counted once its exchange ends
    names = _scrape(p, "ilink_fixproxy_outbox_events_total")
    text = httpx.get(_metrics_base(p) + "/metrics", trust_env=False).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("ilink_fixproxy_budget_events_total", (("event", "learnt"),))] == 1
    assert samples[("ilink_fixproxy_budget_events_total", (("event", "exhausted"),))] == 1
    assert samples[("ilink_fixproxy_peers_budget_spent", ())] == 1
    return names


def _metrics_base(p: ProxyProcess) -> str:
    base = re.search(r"metrics on (http://\S+)/metrics", p.output)
    assert base, p.output
    return base.group(1)


def _scrape(p: ProxyProcess, awaited: str) -> set[str]:
    """The sample names on the proxy's /metrics, once `awaited` is among them (or after 10 s)."""
    base = _metrics_base(p)
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(base + "/metrics", trust_env=False).text
        names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        if awaited in names or time.monotonic() > deadline:
            return names
        time.sleep(0.05)


def test_every_metric_the_dashboard_and_rules_name_is_exposed(exposed: set[str], workers_text: str):
    # (with --workers the parent adds families of its own: the workers')
    exposed = exposed | {s.name for f in text_string_to_metric_families(workers_text) for s in f.samples}
    named = {n for e in dashboard_exprs() + rule_exprs() for n in metric_names(e)}
    assert "ilink_fixproxy_send_outcomes_total" in named and "up" in named  # the parser found them
    missing = named - exposed - FROM_PROMETHEUS
    assert not missing, f"named on the dashboard or in a rule but not exposed by the proxy: {sorted(missing)}"


def test_every_family_the_proxy_exposes_is_on_the_dashboard(exposed: set[str]):
    on_dashboard = {n for e in dashboard_exprs() for n in metric_names(e)}
    # (prometheus-client's `_created` samples say when a counter started: nothing to chart)
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed if not n.endswith("_created")}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in on_dashboard}
    not_shown = {f for f in families if f.startswith("ilink_fixproxy_")} - shown
    assert not not_shown, f"exposed but on no panel: {sorted(not_shown)}"


# ------------------------------------------------------------------ with --workers


@pytest.fixture(scope="module")
def workers_text(
    fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The parent's /metrics of `--workers 2` on a shared Redis store, once both workers have
    answered requests and one send is deferred (the outbox, a shared gauge every worker reports)."""
    from test_e2e_scale import pinned, workers_on_redis

    fake_server.reset()
    tmp = tmp_path_factory.mktemp("workers-metrics")
    with RedisServer(tmp / "redis") as redis, workers_on_redis(fake_server, pki, tmp, redis, "--defer") as p:
        on = pinned(p, Gateway(p))  # a request answered by each worker
        fake_server.tokenless_delivers = False
        assert on["1"].send("stale").headers["x-ilink-fixproxy"].startswith("deferred")
        for g in on.values():
            g.client.close()
        yield httpx.get(p.metrics + "/metrics", trust_env=False).text  # type: ignore[attr-defined]
    fake_server.reset()


def test_the_workers_families_are_on_the_dashboard_and_in_the_rules(workers_text: str):
    names = {s.name for f in text_string_to_metric_families(workers_text) for s in f.samples}
    worker_families = {"ilink_fixproxy_worker_up", "ilink_fixproxy_worker_restarts_total"}
    assert worker_families <= names
    on_dashboard = {n for e in dashboard_exprs() for n in metric_names(e)}
    in_rules = {n for e in rule_exprs() for n in metric_names(e)}
    assert worker_families <= on_dashboard, "the workers' own families are on no panel"
    assert "ilink_fixproxy_worker_restarts_total" in in_rules
    # every series of the parent's exposition says its worker (one scrape target per machine)
    for family in text_string_to_metric_families(workers_text):
        for sample in family.samples:
            assert "worker" in sample.labels, sample


def test_the_dashboards_per_replica_queries_add_up_a_machines_workers(workers_text: str, tmp_path: Path):
    """The parent's real series (each with its `worker` label), as Prometheus would store them
    for one target, through the dashboard's own queries in `promtool test rules`: "Requests per
    replica" sums the workers into one series per machine, and the shared outbox depth (which
    every worker reports) is taken once (max), not once per worker."""
    tool = promtool()
    target = {"job": "ilink-fixproxy", "instance": "m:9464"}
    series, requests = [], 0
    for family in text_string_to_metric_families(workers_text):
        for s in family.samples:
            labels = {**s.labels, **target}
            text = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
            if s.name == "ilink_fixproxy_requests_total":
                requests += 1  # each series counts 60 per minute: 1/s
                series.append({"series": s.name + text, "values": "0+60x10"})
            elif s.name == "ilink_fixproxy_outbox_depth":
                assert s.value == 1, s
                series.append({"series": s.name + text, "values": f"{s.value:g}x10"})
    workers = {
        ln.split('worker="')[1][0]
        for ln in workers_text.splitlines()
        if ln.startswith("ilink_fixproxy_outbox_depth{")
    }
    assert workers == {"0", "1"} and requests >= 2
    panels = {
        p["title"]: p["targets"][0]["expr"]
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if p.get("targets")
    }

    def concrete(title: str) -> str:
        e = panels[title]
        return e.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")

    expect = [
        (concrete("Requests per replica"), requests),  # one series for the machine: the sum
        (concrete("Outbox depth"), 1),  # the shared depth, once
    ]
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": e,
                        "eval_time": "10m",
                        "exp_samples": [{"labels": '{instance="m:9464"}', "value": v}],
                    }
                    for e, v in expect
                ],
            }
        ],
    }
    path = tmp_path / "workers.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    tested = run(tool, "test", "rules", path.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr

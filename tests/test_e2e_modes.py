"""End to end: forward mode with selective TLS interception, `mitmdump -s`, HTTP/2 clients,
deadlines and upstream TLS trust, each through a real proxy process."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import HEADERS, ROOT, SEND, send_body, start_mitmdump, start_proxy, tls_context, upstream_args
from ilink_fixproxy.launcher import READY_MITMDUMP, ProxyProcess, clean_env
from ilink_fixproxy.sandbox import Answer, FakeILink, TestPKI

STALE = "AARzJWAFAAABAAAAAAA-stale-token-0003"


def write_rules(path: Path, *, hosts: str = "[localhost]", deadline: float = 10) -> Path:
    text = (ROOT / "rules.yaml").read_text()
    text = text.replace("  - ilinkai.weixin.qq.com", f"  - {hosts[1:-1]}")
    text = text.replace("deadline_s: 10 ", f"deadline_s: {deadline} ")
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def forward(fake_server: FakeILink, pki: TestPKI, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fwd")
    rules = write_rules(tmp / "rules.yaml")
    conf = tmp / "conf"
    # The fake's CA is trusted for the upstream side; clients trust the proxy's own CA.
    with start_proxy(
        "--mode",
        "forward",
        "--allow-private-destinations",  # the fake listens on loopback
        "--rules",
        str(rules),
        "--confdir",
        str(conf),
        "--upstream-ca",
        str(pki.ca_cert),
    ) as p:
        p.confdir = conf  # type: ignore[attr-defined]
        yield p


def test_forward_mode_repairs_listed_hosts_through_our_ca(forward, fake: FakeILink):
    assert forward.wait_output("forward mode, TLS intercepted only for localhost")
    ca = forward.confdir / "mitmproxy-ca-cert.pem"
    with httpx.Client(proxy=forward.url, verify=tls_context(ca), trust_env=False, timeout=30) as c:
        r = c.post(fake.url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2


def test_forward_mode_tunnels_other_hosts_untouched(forward, fake: FakeILink, pki: TestPKI):
    # 127.0.0.1 is not in the rules' hosts: the client talks TLS to the fake itself, so only the
    # fake's CA is trusted here. Interception would present mitmproxy's certificate and fail.
    with FakeILink(pki) as other:
        other.tokenless_delivers = False
        url = f"https://127.0.0.1:{other.port}"
        with httpx.Client(
            proxy=forward.url, verify=tls_context(pki.ca_cert), trust_env=False, timeout=30
        ) as c:
            r = c.post(url + SEND, content=send_body(STALE), headers=HEADERS)
        assert r.json() == {"ret": -2, "errmsg": "prepare failed"}
        assert "x-ilink-fixproxy" not in r.headers
        assert len(other.sends()) == 1


def test_forward_mode_serves_mitm_it_with_our_ca(forward):
    # the onboarding page is how a gateway's machine gets the CA to trust
    with httpx.Client(proxy=forward.url, trust_env=False, timeout=30) as c:
        r = c.get("http://mitm.it/cert/pem")
    assert r.status_code == 200
    assert r.content == (forward.confdir / "mitmproxy-ca-cert.pem").read_bytes()


def test_reverse_mode_passes_a_mitm_it_host_on_to_the_upstream(proxy, fake: FakeILink):
    # mitmproxy rewrites Host to the upstream's in reverse mode: onboarding is not in the path
    r = httpx.get(proxy.url + "/cert/pem", headers={"Host": "mitm.it"}, trust_env=False, timeout=30)
    assert b"BEGIN CERTIFICATE" not in r.content
    assert [req.path for req in fake.requests] == ["/cert/pem"]


class H2OnlyContext(ssl.SSLContext):
    """httpcore always offers ALPN "http/1.1, h2" in that order and mitmproxy honours the
    client's order; offering only h2 makes the client really speak HTTP/2."""

    def set_alpn_protocols(self, alpn_protocols):
        super().set_alpn_protocols(["h2"])


def test_http2_client_gets_the_repaired_answer(proxy, fake: FakeILink, tmp_path: Path):
    # Reverse mode also accepts TLS from the client, with our CA's certificate.
    conf = Path(proxy.argv[proxy.argv.index("--confdir") + 1])
    ctx = H2OnlyContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(conf / "mitmproxy-ca-cert.pem"))
    url = proxy.url.replace("http://127.0.0.1", "https://localhost")
    with httpx.Client(http1=False, http2=True, verify=ctx, trust_env=False, timeout=30) as c:
        r = c.post(url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200 and r.content == fake.success_answer
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2


def test_mitmdump_script_loads_the_same_addon(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    with (
        start_mitmdump(
            "--mode",
            f"reverse:{fake.url}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={pki.ca_cert}",
            "--set",
            f"confdir={tmp_path / 'conf'}",
            "--set",
            f"ilink_rules={ROOT / 'rules.yaml'}",
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")
    assert len(fake.sends()) == 2


def test_mitmdump_reports_a_broken_rules_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: {}\n")
    mitmdump = str(Path(sys.executable).parent / "mitmdump")
    p = subprocess.run(
        [
            mitmdump,
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "-s",
            str(ROOT / "addon" / "ilink_fixproxy_addon.py"),
            "--mode",
            "reverse:https://127.0.0.1:9",
            "--set",
            f"ilink_rules={bad}",
            "--set",
            f"confdir={tmp_path / 'conf'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 1
    assert f"{bad}:2:8: rules: expected a list of rules" in p.stdout + p.stderr


def test_deadline_hands_back_the_original_when_the_reissue_is_too_slow(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    rules = write_rules(tmp_path / "rules.yaml", deadline=1.5)
    fake.script(SEND, Answer(body=b'{"ret":-2,"errmsg":"prepare failed"}'), Answer(body=b"{}", delay=4))
    with (
        start_proxy(
            *upstream_args(fake, pki, tmp_path / "conf"),
            "--rules",
            str(rules),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        started = time.monotonic()
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
        took = time.monotonic() - started
    assert r.content == b'{"ret":-2,"errmsg":"prepare failed"}'
    assert "x-ilink-fixproxy" not in r.headers
    assert took < 3.5, f"the caller was held {took:.1f} s past a 1.5 s deadline"
    assert p.wait_output("no answer within")


def test_no_reissue_when_the_first_answer_already_used_the_deadline(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    rules = write_rules(tmp_path / "rules.yaml", deadline=1)
    fake.script(SEND, Answer(body=b'{"ret":-2}', delay=1.3))
    with (
        start_proxy(
            *upstream_args(fake, pki, tmp_path / "conf"),
            "--rules",
            str(rules),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.content == b'{"ret":-2}'
    assert len(fake.sends()) == 1


def test_ssl_insecure_reaches_an_untrusted_upstream(fake: FakeILink, tmp_path: Path):
    with (
        start_proxy(
            "--upstream",
            fake.url,
            "--ssl-insecure",
            "--confdir",
            str(tmp_path / "c"),
            "--rules",
            str(ROOT / "rules.yaml"),
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.headers["x-ilink-fixproxy"].startswith("repaired")


def test_untrusted_upstream_is_refused_without_the_ca(fake: FakeILink, tmp_path: Path):
    with (
        start_proxy(
            "--upstream", fake.url, "--confdir", str(tmp_path / "c"), "--rules", str(ROOT / "rules.yaml")
        ) as p,
        httpx.Client(trust_env=False, timeout=30) as c,
    ):
        r = c.post(p.url + SEND, content=send_body(STALE), headers=HEADERS)
    assert r.status_code == 502
    assert not fake.sends()  # TLS failed before any request reached it


def test_upstream_mode_reissues_through_the_same_upstream_proxy(
    fake: FakeILink, pki: TestPKI, tmp_path: Path
):
    # gateway -> ilink-fixproxy (upstream mode) -> a second mitmdump (the corporate proxy) -> iLink.
    # The re-issue must take the same way: the inner proxy sees both attempts.
    inner_conf = tmp_path / "inner"
    mitmdump = str(Path(sys.executable).parent / "mitmdump")
    with ProxyProcess(
        [
            mitmdump,
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--set",
            f"confdir={inner_conf}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={pki.ca_cert}",
        ],
        ready=READY_MITMDUMP,
    ) as inner:
        rules = write_rules(tmp_path / "rules.yaml")
        outer_conf = tmp_path / "outer"
        with (
            start_proxy(
                "--mode",
                "forward",
                "--allow-private-destinations",  # the fake listens on loopback
                "--set",
                f"mode=upstream:{inner.url}",
                "--rules",
                str(rules),
                "--confdir",
                str(outer_conf),
                "--upstream-ca",
                str(inner_conf / "mitmproxy-ca-cert.pem"),
            ) as outer,
            httpx.Client(
                proxy=outer.url,
                verify=tls_context(outer_conf / "mitmproxy-ca-cert.pem"),
                trust_env=False,
                timeout=30,
            ) as c,
        ):
            r = c.post(fake.url + SEND, content=send_body(STALE), headers=HEADERS)
        assert r.headers["x-ilink-fixproxy"].startswith("repaired")
        assert len(fake.sends()) == 2
        time.sleep(0.3)
        assert inner.output.count("POST " + fake.url + SEND) == 2, inner.output

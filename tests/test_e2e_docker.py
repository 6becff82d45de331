"""The container image, built from the shipped Dockerfile unchanged and run as an operator runs it,
plus the two things the image relies on from the command (checked without Docker too).

The Docker test needs a Docker engine (and, when the Dockerfile's base image is missing and no
registry is reachable, root and debootstrap: tests/docker/make_base_image.sh builds it). Without
one it is skipped, saying why, except in CI (CI=true), where that is a failure.

Networking: the container runs on Docker's default bridge with its port published on the host's
loopback, as the README says. The fake iLink listens on the bridge's gateway address (the host as
the container sees it), with a certificate for that address from a CA the test makes; the container
gets the CA through --upstream-ca. Nothing needs iptables or a registry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, Gateway, sends_to, start_proxy, upstream_args
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ilink_fixproxy.launcher import ProxyProcess, clean_env, ilink_fixproxy_argv
from ilink_fixproxy.sandbox import FakeILink, TestPKI

IMAGE = "ilink-fixproxy:e2e-test"
MAKE_BASE = ROOT / "tests" / "docker" / "make_base_image.sh"
STATE_FILE = "ilink-fixproxy-state.sqlite3"


# --------------------------------------------------------------------------- what the image relies on


def test_a_wildcard_listen_tells_gateways_a_loopback_url(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    """In the container the proxy listens on 0.0.0.0; telling gateways WEIXIN_BASE_URL=http://0.0.0.0
    was wrong: they need an address to connect to."""
    with start_proxy(*upstream_args(fake, pki, tmp_path / "c"), "--listen", "0.0.0.0:0") as p:
        line = next(ln for ln in p.output.splitlines() if "listening on" in ln)
        port = p.url.rsplit(":", 1)[1]
        told = f"http://127.0.0.1:{port}"
        assert p.url == f"http://0.0.0.0:{port}"  # where it listens, as it is
        assert f"WEIXIN_BASE_URL={told} " in line and f'"baseUrl": "{told}"' in line
        assert "published with docker run -p" in line
        # the advertised URL works
        gw = Gateway(p)
        gw.url = told
        assert gw.send("stale-token").headers["x-ilink-fixproxy"].startswith("repaired")
        assert p.stop() == 0


def test_confdir_comes_from_the_environment_when_not_given(fake: FakeILink, pki: TestPKI, tmp_path: Path):
    """The image sets ILINK_FIXPROXY_CONFDIR=/data/mitmproxy so that the proxy and `docker exec C
    ilink-fixproxy state|outbox` agree on the state file without --confdir."""
    conf = tmp_path / "from-env"
    env = clean_env({"ILINK_FIXPROXY_CONFDIR": str(conf), "HOME": str(tmp_path / "home")})
    args = ("--listen", "127.0.0.1:0", "--upstream", fake.url, "--upstream-ca", str(pki.ca_cert))
    with ProxyProcess(ilink_fixproxy_argv(*args, "--rules", str(ROOT / "rules.yaml")), env=env) as p:
        gw = Gateway(p)
        assert gw.send("proven-stale").headers["x-ilink-fixproxy"].startswith("repaired")
        assert (conf / STATE_FILE).is_file()
        assert not (tmp_path / "home" / ".mitmproxy").exists()

        def command(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ilink_fixproxy_argv(*argv), capture_output=True, text=True, timeout=60, env=env
            )

        listing = command("state")
        assert listing.returncode == 0, listing.stderr
        # the file the proxy wrote: it remembers the dead token
        assert listing.stdout.startswith(f"{conf / STATE_FILE}: ")
        assert '"stale_tokens": 1' in listing.stdout
        outbox = command("outbox")
        assert outbox.returncode == 0, outbox.stderr
        assert outbox.stdout.startswith(f"{conf / STATE_FILE}: 0 deferred send(s)")
        assert p.stop() == 0


# --------------------------------------------------------------------------- Docker


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def unavailable(reason: str) -> None:
    """Skip outside CI; in CI a Docker test that cannot run is a failure, not a silent pass."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the Docker test cannot run: {reason}", pytrace=False)
    pytest.skip(f"Docker test skipped: {reason} (with CI=true this fails)")


@pytest.fixture(scope="module")
def image() -> str:
    """The shipped Dockerfile built as it is (its base image built locally when missing)."""
    if shutil.which("docker") is None:
        unavailable("no docker command (apt-get install docker.io)")
    info = docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False)
    if info.returncode != 0:
        said = (info.stderr.strip().splitlines() or ["no output"])[-1]
        unavailable(f"no Docker engine answers (`docker info`: {said})")
    base = subprocess.run([str(MAKE_BASE)], capture_output=True, text=True, timeout=900)
    if base.returncode != 0:
        unavailable(f"cannot build the base image: {(base.stderr or base.stdout).strip()[-500:]}")
    # --network host: with dockerd's --iptables=false, the default bridge has no route out for apt
    # and pip; it changes nothing in the image.
    built = docker("build", "--network", "host", "--quiet", "-t", IMAGE, str(ROOT), timeout=1800, check=False)
    assert built.returncode == 0, f"docker build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    return IMAGE


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge, which containers on it can reach."""
    (net,) = json.loads(docker("network", "inspect", "bridge").stdout)
    config = net["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return config["Gateway"]
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))  # Docker's default choice


def pki_for(directory: Path, address: str) -> TestPKI:
    """A throw-away CA and a server certificate for ``address`` (sandbox.make_pki's are for
    loopback only, which a container cannot reach on the host)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=2)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ilink-fixproxy docker test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = TestPKI(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.ca_cert.chmod(0o644)  # read by the container's unprivileged user through the bind mount
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pki


def wait_for(what: str, probe: Callable[[], object], timeout: float = 120) -> object:
    """Poll until probe() returns something truthy; the timeout only bounds a failure."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := probe():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def inspect(name: str) -> dict:
    (data,) = json.loads(docker("inspect", name).stdout)
    return data


def healthy(name: str) -> bool:
    state = inspect(name)["State"]
    assert state["Running"], f"the container stopped: {state}\n{docker('logs', name).stderr}"
    return state["Health"]["Status"] == "healthy"


def published_url(name: str) -> str:
    # `docker port` names the host side of the published port (it can change on restart).
    line = docker("port", name, "8765/tcp").stdout.splitlines()[0].strip()
    assert line.startswith("127.0.0.1:"), line  # published on the host's loopback only
    return f"http://{line}"


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[tuple[str, FakeILink]]:
    """The image running in front of a fake iLink on the host, /data on a fresh named volume."""
    gateway = bridge_gateway()
    pki = pki_for(tmp_path / "pki", gateway)
    tag = secrets.token_hex(4)
    name, volume = f"ilink-fixproxy-e2e-{tag}", f"ilink-fixproxy-e2e-data-{tag}"
    with FakeILink(pki, host=gateway) as fake:
        try:
            docker(
                "run",
                "--detach",
                "--name",
                name,
                "--publish",
                "127.0.0.1::8765",
                "--volume",
                f"{volume}:/data",
                "--volume",
                f"{pki.ca_cert}:/run/ilink-upstream-ca.pem:ro",
                # Only how often Docker asks: the check itself is the image's HEALTHCHECK.
                "--health-interval",
                "1s",
                image,
                "--upstream",
                f"https://{gateway}:{fake.port}",
                "--upstream-ca",
                "/run/ilink-upstream-ca.pem",
            )
            yield name, fake
        finally:
            docker("rm", "--force", "--volumes", name, check=False)
            docker("volume", "rm", "--force", volume, check=False)


@pytest.mark.docker
@pytest.mark.timeout(1800)  # includes building the image (minutes on the vfs storage driver)
def test_the_image_repairs_keeps_state_and_stops_cleanly(container: tuple[str, FakeILink]):
    name, fake = container
    config = inspect(name)["Config"]
    assert config["Healthcheck"]["Test"] == ["CMD", "ilink-fixproxy-healthcheck"]
    assert not config.get("Volumes", {}).keys() - {"/data"}  # no anonymous volume but /data

    wait_for("the HEALTHCHECK to report healthy", lambda: healthy(name))
    assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
    assert "ilink-fixproxy" in docker("exec", name, "cat", "/proc/1/cmdline").stdout  # PID 1: gets SIGTERM
    assert docker("exec", name, "ilink-fixproxy-healthcheck").stdout.strip() == "ok"  # exit 0: healthy
    logs = docker("logs", name)
    assert "WEIXIN_BASE_URL=http://127.0.0.1:8765 " in logs.stdout, logs.stdout + logs.stderr

    # A stale send through the published port is repaired; the peer state goes to /data.
    gw = Gateway(SimpleNamespace(url=published_url(name)))  # type: ignore[arg-type]
    first = gw.send("proven-stale")
    assert first.status_code == 200 and first.content == fake.success_answer
    assert first.headers["x-ilink-fixproxy"].startswith("repaired")
    assert [s.context_token for s in sends_to(fake, gw)] == ["proven-stale", None]
    listing = docker("exec", name, "ilink-fixproxy", "state").stdout  # no --confdir: the image's default
    assert listing.startswith(f"/data/mitmproxy/{STATE_FILE}: ") and '"stale_tokens": 1' in listing, listing
    assert docker("exec", name, "ilink-fixproxy", "outbox").stdout.startswith(
        f"/data/mitmproxy/{STATE_FILE}: "
    )

    # Across a restart (SIGTERM, then a new process) the /data volume keeps what it learned:
    # the dead token is left out at once, in one attempt.
    docker("restart", "--time", "30", name)
    wait_for("the HEALTHCHECK to report healthy after the restart", lambda: healthy(name))
    gw.url = published_url(name)
    again = gw.send("proven-stale")
    assert again.content == fake.success_answer
    assert again.headers["x-ilink-fixproxy"].startswith("stripped"), again.headers
    assert [s.context_token for s in sends_to(fake, gw)] == ["proven-stale", None, None]

    docker("stop", "--time", "30", name)
    state = inspect(name)["State"]
    logs = docker("logs", name)
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), logs.stdout + logs.stderr
    assert "Traceback" not in logs.stdout + logs.stderr
    assert gw.bot_token not in logs.stdout + logs.stderr

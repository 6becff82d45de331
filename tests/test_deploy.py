"""deploy/: the docker-compose file, its haproxy configuration and the Kubernetes manifests, checked
with the tools an operator would use, offline: `docker-compose config`, `haproxy -c -f`, and the
Kubernetes API schemas bundled in the kubernetes-validate package. None of them is started here
(no image registry is reachable); the arguments they give the proxy are parsed by its real parser.

A check whose tool is missing is skipped, saying why, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from ilink_fixproxy.cli import build_parser

COMPOSE = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = ["deployment.yaml", "service.yaml", "pdb.yaml", "redis.yaml", "secret.yaml"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and the deploy check cannot run: {reason}", pytrace=False)
    pytest.skip(f"deploy check skipped: {reason} (with CI=true this fails)")


def entrypoint_args() -> list[str]:
    """The arguments the Dockerfile's ENTRYPOINT gives the command (before the container's own)."""
    line = next(ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT"))
    return yaml.safe_load(line.split(" ", 1)[1])[1:]


def parsed(container_args: list[str]) -> Any:
    return build_parser().parse_args([*entrypoint_args(), *container_args])


# --------------------------------------------------------------------------- docker-compose


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        _unavailable("docker-compose is not installed (Debian package docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k != "ILINK_FIXPROXY_STATE_KEY"}
    return subprocess.run(
        [str(tool), "--project-directory", str(COMPOSE), "-f", str(COMPOSE / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
        cwd=COMPOSE,
    )


def test_the_compose_file_is_valid_and_runs_two_replicas_on_redis_with_aof_behind_haproxy():
    p = compose_config({"ILINK_FIXPROXY_STATE_KEY": "test-key"})
    assert p.returncode == 0, p.stderr
    services = yaml.safe_load(p.stdout)["services"]
    assert set(services) == {"redis", "proxy-a", "proxy-b", "lb"}
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    for name in ("proxy-a", "proxy-b"):
        proxy = services[name]
        assert Path(proxy["build"]["context"]) == ROOT and proxy["build"]["dockerfile"] == "Dockerfile"
        args = parsed(proxy["command"])
        assert args.state == "redis://redis:6379/0" and args.metrics == "0.0.0.0:9464"
        assert args.listen == "0.0.0.0:8765"
        assert proxy["environment"]["ILINK_FIXPROXY_STATE_KEY"] == "test-key"
        assert "ports" not in proxy  # only the load balancer is published
    assert services["proxy-a"]["volumes"] != services["proxy-b"]["volumes"]
    lb = services["lb"]
    assert any(str(port).startswith("127.0.0.1:8765:8765") for port in lb["ports"]), lb["ports"]


def test_the_compose_file_refuses_to_run_without_a_state_key():
    p = compose_config({})
    assert p.returncode != 0
    assert "set ILINK_FIXPROXY_STATE_KEY in deploy/compose/.env" in p.stderr, p.stderr


def test_the_env_example_names_the_key_and_env_is_ignored():
    assert "ILINK_FIXPROXY_STATE_KEY=" in (COMPOSE / ".env.example").read_text()
    assert (COMPOSE / ".gitignore").read_text().split() == [".env"]


# --------------------------------------------------------------------------- haproxy


def haproxy_check(config: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if tool is None:
        _unavailable("haproxy is not installed (Debian package haproxy)")
    return subprocess.run([str(tool), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)


def test_the_haproxy_config_is_valid_and_checks_livez_on_the_metrics_port(tmp_path: Path):
    p = haproxy_check(COMPOSE / "haproxy.cfg")
    assert p.returncode == 0 and "Configuration file is valid" in p.stdout + p.stderr, p.stdout + p.stderr
    text = (COMPOSE / "haproxy.cfg").read_text()
    # /livez, not /healthz: Redis down makes every replica's /healthz 503 (test_e2e_scale.py)
    assert "option httpchk GET /livez" in text and "check port 9464" in text
    assert not re.search(
        r"^\s*retry-on", text, re.M
    )  # only connection failures are retried (a send is never re-sent)
    # the check is not vacuous: a broken file fails it
    broken = tmp_path / "broken.cfg"
    broken.write_text(text.replace("balance roundrobin", "balance nonsense"))
    assert haproxy_check(broken).returncode != 0


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs() -> dict[str, list[dict[str, Any]]]:
    return {name: [d for d in yaml.safe_load_all((K8S / name).read_text()) if d] for name in MANIFESTS}


def k8s_validate(doc: dict[str, Any]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        _unavailable("kubernetes-validate is not installed (a test dependency: pip install -e '.[test]')")
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_kubernetes_manifests_match_the_api_schemas():
    for name, docs in k8s_docs().items():
        assert docs, name
        for doc in docs:
            k8s_validate(doc)
    import kubernetes_validate

    # not vacuous: a misspelt field and a wrong type are caught
    deployment = k8s_docs()["deployment.yaml"][0]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            k8s_validate(bad)


def test_the_deployment_runs_two_replicas_probed_on_livez_with_the_key_from_a_secret():
    docs = k8s_docs()
    deployment = docs["deployment.yaml"][0]
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = parsed(container["args"])
    assert args.metrics == "0.0.0.0:9464"  # the kubelet reaches the pod's address, not its loopback
    assert args.state.startswith("redis://ilink-fixproxy-redis:6379/")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"proxy": 8765, "metrics": 9464}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/livez", "port": "metrics"}, probe
    secret = docs["secret.yaml"][0]
    (env,) = container["env"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert env["name"] == "ILINK_FIXPROXY_STATE_KEY" and ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["spec"]["terminationGracePeriodSeconds"] > 12  # the proxy's graceful stop fits
    # the Service and the disruption budget select these pods
    labels = pod["metadata"]["labels"]
    service = docs["service.yaml"][0]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"proxy", "metrics"}
    assert docs["pdb.yaml"][0]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Redis: AOF on a persistent volume, reachable under the name --state uses
    redis_service, statefulset = docs["redis.yaml"]
    assert redis_service["metadata"]["name"] == "ilink-fixproxy-redis"
    redis_args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert statefulset["spec"]["volumeClaimTemplates"]
    # kubectl apply -k applies everything but the placeholder Secret
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(set(MANIFESTS) - {"secret.yaml"})

#!/usr/bin/env bash
# What tests/test_e2e_docker.py needs, for CI (.ci/run calls this before the tests and
# .ci/docker-down.sh after them): docker.io and debootstrap installed, a Docker engine running,
# and the Dockerfile's base image (built locally: no registry is reachable from CI).
# Starts dockerd only when none answers, and records its pid so docker-down.sh stops only that one.
set -euo pipefail
cd "$(dirname "$0")/.."
PIDFILE=${ILINK_CI_DOCKERD_PIDFILE:-/tmp/ilink-fixproxy-ci-dockerd.pid}
LOG=${ILINK_CI_DOCKERD_LOG:-/tmp/ilink-fixproxy-ci-dockerd.log}

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap debian-archive-keyring)
if [ ${#missing[@]} -gt 0 ]; then
    echo "docker-up: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    # vfs: works on any filesystem, including overlay-on-overlay inside a CI container;
    # --iptables=false: CI may not allow changing the firewall (the test needs no NAT).
    echo "docker-up: starting dockerd (log: $LOG)"
    setsid dockerd --storage-driver=vfs --iptables=false >"$LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    for _ in $(seq 120); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$LOG" >&2; exit 1; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { echo "docker-up: dockerd did not answer within 60 s" >&2; tail -20 "$LOG" >&2; exit 1; }
fi

time tests/docker/make_base_image.sh

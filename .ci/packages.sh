#!/usr/bin/env bash
# The Debian packages the tests run for real, installed when missing (.ci/run calls this first):
#   redis-server   the shared store's tests start their own redis-server processes on free ports
#   prometheus     promtool checks and unit-tests deploy/prometheus/ alerting rules
#   chromium       the /status page is loaded and checked in headless Chromium
#   docker-compose validates deploy/compose/ (docker-compose config)
#   haproxy        the load balancer of deploy/compose/ (haproxy -c) and of the replicas benchmark
# Packages must not start their services: the tests start what they need, on free ports, and stop
# it; a policy-rc.d refusing every start is in place only while apt-get runs.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v haproxy >/dev/null || missing+=(haproxy)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "packages: installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
fi
trap 'if [ -n "$made_policy" ]; then rm -f "$policy"; fi' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Stops the dockerd .ci/docker-up.sh started (none if it found one running), and only that one.
set -euo pipefail
PIDFILE=${ILINK_CI_DOCKERD_PIDFILE:-/tmp/ilink-fixproxy-ci-dockerd.pid}
[ -f "$PIDFILE" ] || exit 0
pid=$(cat "$PIDFILE")
rm -f "$PIDFILE"
kill -0 "$pid" 2>/dev/null || exit 0
kill -TERM "$pid"
for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || exit 0
    sleep 0.5
done
echo "docker-down: dockerd (pid $pid) still running after 30 s; killing it" >&2
kill -KILL "$pid"

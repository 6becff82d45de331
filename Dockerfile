# ilink-fixproxy container: Debian's Python 3.11 in a virtualenv (so mitmproxy 11.0.x, the
# combination the test suite proves), run as an unprivileged user. tests/test_e2e_docker.py builds
# this file unchanged and runs it; without a registry, tests/docker/make_base_image.sh builds the
# base image locally from Debian's packages.
FROM debian:bookworm-slim

# The settings come before the install: every instruction after a large layer costs a copy of
# the whole image on some storage drivers (vfs), so only what must follow it does.
ENV PATH=/opt/ilink-fixproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ILINK_FIXPROXY_CONFDIR=/data/mitmproxy \
    ILINK_FIXPROXY_HEALTH_URL=http://127.0.0.1:9464/healthz

# Inside the container it must listen on all interfaces to be reachable; publish it only on the
# host's loopback: docker run -p 127.0.0.1:8765:8765 ...  /healthz (--metrics) stays inside.
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["ilink-fixproxy-healthcheck"]

# The proxy is PID 1 (exec form, no shell): `docker stop`'s SIGTERM reaches its own handler,
# which lets in-flight repairs finish and exits 0. Extra arguments go after the image name.
ENTRYPOINT ["ilink-fixproxy", "--listen", "0.0.0.0:8765", "--rules", "/rules/rules.yaml", "--metrics", "127.0.0.1:9464"]
CMD []
WORKDIR /data

# One layer for the install. Debian's python3 packages are not pinned to a version: security
# updates replace them in the archive. /data (mitmproxy's CA, the peer-state file) belongs to the
# unprivileged user; the default rules are root-owned, read-only for it: mount a file over
# /rules/rules.yaml to use other rules. pip and setuptools are only needed to install.
COPY . /src/
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/ilink-fixproxy \
    && pip install --no-cache-dir /src \
    && pip uninstall --yes --quiet pip setuptools \
    && install -D -m 0644 /src/rules.yaml /rules/rules.yaml \
    && rm -rf /src \
    && groupadd --system --gid 10001 fixproxy \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fixproxy fixproxy \
    && install -d -m 0700 -o 10001 -g 10001 /data

USER 10001:10001
VOLUME ["/data"]

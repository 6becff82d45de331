# ilink-fixproxy container. No Docker engine runs in this project's CI, so the tests lint this
# file with hadolint instead of building it.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md rules.yaml ./
COPY addon ./addon

# Install, then run as an unprivileged user; /data holds mitmproxy's CA (forward mode) and
# /rules the rules file, both mountable volumes.
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 fixproxy \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/fixproxy fixproxy \
    && mkdir -p /data /rules \
    && cp rules.yaml /rules/rules.yaml \
    && chown -R fixproxy:fixproxy /data /rules \
    && chmod 0700 /data

USER 10001:10001
WORKDIR /data
VOLUME ["/data", "/rules"]

# Inside the container it must listen on all interfaces to be reachable; publish it only on the
# host's loopback: docker run -p 127.0.0.1:8765:8765 ...
EXPOSE 8765
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8765), 3).close()"]

ENTRYPOINT ["ilink-fixproxy", "--listen", "0.0.0.0:8765", "--confdir", "/data/mitmproxy", "--rules", "/rules/rules.yaml"]
CMD []

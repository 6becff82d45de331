#!/usr/bin/env python3
"""The image's HEALTHCHECK: exit 0 when the proxy's /healthz answers 200, else 1, with one line.

Installed as ``ilink-fixproxy-healthcheck``, so ``docker exec CONTAINER ilink-fixproxy-healthcheck``
asks the same question Docker asks. The URL comes from ILINK_FIXPROXY_HEALTH_URL (the image sets
it to the ``--metrics`` listener its entrypoint starts). http.client, not urllib: urllib would send
the request through HTTP_PROXY if the container's environment sets one.
"""

from __future__ import annotations

import http.client
import os
import sys
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:9464/healthz"


def main() -> int:
    url = os.environ.get("ILINK_FIXPROXY_HEALTH_URL") or DEFAULT_URL
    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=4)
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        text = resp.read(200).decode("utf-8", "replace").strip()
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    print(f"{'healthy' if resp.status == 200 else 'unhealthy'}: {url}: {resp.status} {text}")
    return 0 if resp.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())

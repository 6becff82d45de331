"""``ilink-fixproxy-healthcheck [URL]`` (or ``python -m ilink_fixproxy.healthcheck [URL]``): exit 0
when the proxy's ``/healthz`` says ok.

For Docker's HEALTHCHECK and similar probes: prints the endpoint's one-line answer (or why it
could not be asked) and exits 0 for HTTP 200, 1 otherwise. Only the standard library, so a probe
every few seconds costs no mitmproxy import. The endpoint is served by ``--metrics HOST:PORT``.
Without URL: ``$ILINK_FIXPROXY_HEALTH_URL`` (the Docker image sets it), else the default below.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:9464/healthz"
USAGE = f"usage: ilink-fixproxy-healthcheck [URL]  (default $ILINK_FIXPROXY_HEALTH_URL, else {DEFAULT_URL})"
TIMEOUT_S = 4.0  # under Docker HEALTHCHECK's usual --timeout=5s, so the reason still gets printed


def check(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    # No proxy from the environment: the probe asks this machine's listener directly.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as answer:
            return answer.status == 200, answer.read(4096).decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as e:
        return False, e.read(4096).decode("utf-8", "replace").strip() or f"HTTP {e.code}"
    except (OSError, ValueError) as e:  # URLError is an OSError
        reason = getattr(e, "reason", None) or e
        return False, f"cannot reach {url}: {reason}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(USAGE)
        return 0 if args and args[0] in ("-h", "--help") else 2
    ok, text = check(args[0] if args else os.environ.get("ILINK_FIXPROXY_HEALTH_URL") or DEFAULT_URL)
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

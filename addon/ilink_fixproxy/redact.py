"""Keep secrets out of logs, headers and flow comments.

Bot tokens and context tokens are bearer secrets: anyone holding one can send as the bot. We
only ever show a short one-way hash, enough to tell two tokens apart in a log.
"""

from __future__ import annotations

import hashlib

_LABEL = b"ilink-fixproxy/v1:"


def token_hash(token: object) -> str:
    """A short, stable, one-way tag for a secret, e.g. ``#3fa2c91b07``; "-" when there is none."""
    if token is None or token == "":
        return "-"
    return "#" + hashlib.sha256(_LABEL + str(token).encode("utf-8", "replace")).hexdigest()[:10]

"""Which mitmproxy addons the ``ilink-fixproxy`` command runs, and in what order.

``mitmdump -s`` stays the full-featured path (every default addon). The command builds its own
chain so that our addon sits exactly where ``-s`` scripts sit: after the script loader and before
the save/HAR addons, which therefore record the repaired answer.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import addons
from mitmproxy.addons import dumper, errorcheck, script


def proxy_addons(ours: Any, *extra: Any) -> list[Any]:
    """mitmproxy's default addons with `ours` right after the script loader, then `extra`."""
    chain = addons.default_addons()
    at = next(i for i, a in enumerate(chain) if isinstance(a, script.ScriptLoader)) + 1
    chain.insert(at, ours)
    return [*chain, dumper.Dumper(), errorcheck.ErrorCheck(), *extra]

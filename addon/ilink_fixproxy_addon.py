"""Load ilink-fixproxy into stock mitmproxy tools:

    mitmdump -s addon/ilink_fixproxy_addon.py --mode reverse:https://ilinkai.weixin.qq.com \
        --set ilink_rules=rules.yaml
    mitmweb  -s addon/ilink_fixproxy_addon.py ...

Options are the addons' ``ilink_*`` options (``--set``): the repair itself, plus capture
(``ilink_capture=DIR``), metrics (``ilink_metrics=HOST:PORT``) and ``ilink_log_format``.
The package must be importable by the mitmproxy that runs this (``pip install ilink-fixproxy``
into its environment); from a source checkout, the package next to this file is used.
"""

import sys
from pathlib import Path

try:
    from ilink_fixproxy.addon import IlinkFixProxy
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ilink_fixproxy.addon import IlinkFixProxy
from ilink_fixproxy.capture import Capture
from ilink_fixproxy.metrics import Metrics

# Capture and Metrics come after IlinkFixProxy: they record each flow as it left our addon.
addons = [IlinkFixProxy(), Capture(), Metrics()]

"""``python -m ilink_fixproxy`` is the ``ilink-fixproxy`` command."""

import sys

from .cli import main

sys.exit(main())

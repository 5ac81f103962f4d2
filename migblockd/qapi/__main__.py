"""``python -m migblockd.qapi``: the same as ``migblockd-qapi-gen``."""

import sys

from .main import main

sys.exit(main())

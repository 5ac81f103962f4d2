"""``python -m migblockd``: the daemon."""

from migblockd.cli import main

main()

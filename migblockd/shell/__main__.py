"""``python -m migblockd.shell``."""

from migblockd.shell.main import main

main()

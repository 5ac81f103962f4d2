"""``python -m migblockd.vacant PATH``: the socket units' check before systemd binds.

systemd removes whatever is at a socket unit's ``ListenStream=`` before it binds,
a socket another daemon serves included (``migblockd@migblockd.socket`` has
``migblockd.socket``'s path): that daemon's clients would reach the new one, and
its blockers would stop refusing.  So the units run this first (``ExecStartPre=``)
and do not start while something answers at the path, or while something other
than a socket is there.  A socket nobody answers on is the start's to replace, as
the daemon replaces its own (:func:`migblockd.listen.stale_socket`): one left by a
daemon or a service manager that died, or by the unit itself when its
``ListenStream=`` changed while it listened (a daemon-reload closes the old socket
without removing its file).  The check connects, as the daemon's does: a socket
unit listening there starts its service.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from migblockd.listen import stale_socket
from migblockd.startup import StartupError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    # The journal's module is imported only on failure: this runs before every start.
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        from migblockd.logs.journal import marked  # noqa: PLC0415

        # An ExecStartPre= edited wrong: an error in the journal, not info.
        sys.exit(marked(logging.ERROR, ["usage: python -m migblockd.vacant PATH"]))
    try:
        stale_socket(Path(args[0]), "ListenStream=")
    except StartupError as exc:
        from migblockd.logs.journal import for_stderr  # noqa: PLC0415

        sys.exit(for_stderr(logging.ERROR, [str(exc)]))


if __name__ == "__main__":
    main()

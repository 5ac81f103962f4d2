"""``python -m migblockd`` and the ``migblockd`` command: the daemon.

SIGHUP, SIGTERM and SIGINT are caught first, before the daemon's modules load
(a third of a second, longer on a busy machine): what comes before the event
loop handles them is kept and acted on once the start gets to it
(``migblockd.early``).  Descriptors 0, 1 and 2 are held first too.
"""

import os

from migblockd.early import EarlySignals


def hold_standard_descriptors() -> None:
    """Open ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed
    (``migblockd 2>&-``): else the next file the daemon opens takes its number,
    and the log, written to descriptor 2, goes into an epoll descriptor, a socket
    of the daemon's own or a file."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main() -> None:
    early = EarlySignals()
    early.install()
    hold_standard_descriptors()
    from migblockd.cli import main as run  # noqa: PLC0415 - after the handlers, on purpose

    run(early=early)


if __name__ == "__main__":
    main()

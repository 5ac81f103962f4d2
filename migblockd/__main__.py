"""``python -m migblockd`` and the ``migblockd`` command: the daemon.

SIGHUP, SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are blocked by the first line of
the entry point, before anything else loads, and then caught: what comes before
the event loop handles them is kept and acted on once the start gets to it
(``migblockd.early``).  Descriptors 0, 1 and 2 are held first too.
"""

# Blocked before anything else is imported, as a C daemon's main() blocks them
# before it does anything: ``signal`` itself loads ``enum`` (14 ms, more on a busy
# machine), long enough for a SIGHUP sent at a restart (a log rotation's, an
# operator's) to end the process by its default action.  ``_signal`` is the C
# module that ``signal`` wraps, there from the interpreter's own start.  What
# comes meanwhile the kernel keeps pending, for the handlers that
# ``EarlySignals.install`` sets, and unblocks, a few milliseconds later.
import _signal

_signal.pthread_sigmask(_signal.SIG_BLOCK, (_signal.SIGHUP, _signal.SIGTERM, _signal.SIGINT,
                                            _signal.SIGUSR1, _signal.SIGUSR2))

import os  # noqa: E402 - after the signals are blocked, on purpose

from migblockd.early import EarlySignals  # noqa: E402 - likewise


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

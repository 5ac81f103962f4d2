"""The daemon's stop signals are taken by its main thread alone.

SIGTERM, SIGINT and SIGHUP go to whichever thread of the process does not
block them.  While the event loop handles them that is harmless: the handler
is the process's, whichever thread runs it.  But as the stop hands them back
(``remove_signal_handler`` sets ``SIG_DFL`` before ``SIG_IGN`` can follow), a
signal taken in between by any thread ends the process, the log's last lines
unwritten.  So the daemon's threads are started with the three blocked
(:func:`start`: a thread inherits the mask of the thread that starts it), and
the main thread blocks them while it hands them back (:func:`stops_blocked`):
one pending then is dropped when ``SIG_IGN`` is set, as POSIX says.
SIGUSR1 and SIGUSR2, which the loop handles only to say that they are ignored
(``migblockd.early``), are handed back alike (:data:`HANDLED`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Final

from migblockd.early import UNUSED

__all__ = ["HANDLED", "STOPS", "UNUSED", "start", "stops_blocked"]

STOPS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Every signal the event loop handles: the stop signals, and those it ignores.
HANDLED: Final = (*STOPS, *UNUSED)


@contextlib.contextmanager
def stops_blocked() -> Iterator[None]:
    """The calling thread blocks :data:`HANDLED` for the block."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start(thread: threading.Thread) -> None:
    """Start ``thread`` with :data:`HANDLED` blocked in it (and in the threads it starts)."""
    with stops_blocked():
        thread.start()

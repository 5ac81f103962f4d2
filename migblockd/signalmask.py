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

asyncio hears of a signal only through the byte CPython writes for it to the
loop's wakeup descriptor, which a flood of signals faster than the loop reads
them fills (SIGUSR1 or SIGHUP sent in a loop): the byte of a SIGTERM that comes
then is dropped, and the daemon never stopped.  So :func:`handle` also catches
the signal in Python, which CPython runs in the main thread whatever the
descriptor holds, and has the loop run the callback from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Final

from migblockd.early import UNUSED

__all__ = ["HANDLED", "STOPS", "UNUSED", "handle", "quiet_wakeup", "start", "stops_blocked"]

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


def handle(loop: asyncio.AbstractEventLoop, sig: signal.Signals,
           callback: Callable[..., object], *args: object) -> None:
    """``loop.add_signal_handler(sig, callback, *args)``, and the signal handled even
    when its byte finds the loop's wakeup descriptor full (see the module doc).

    Caught in Python, it has the loop call ``callback`` (``call_soon_threadsafe``);
    the byte, when it gets through, finds that done.  Signals that come before the
    loop gets to them are handled once, as the kernel merges a pending signal's
    repeats (a reload reads the file after them all)."""
    pending = False

    def take() -> None:
        nonlocal pending
        if pending:
            pending = False
            callback(*args)

    def caught(_signum: int, _frame: FrameType | None) -> None:
        nonlocal pending
        pending = True
        loop.call_soon_threadsafe(take)

    # Blocked meanwhile: none comes while asyncio's handler, or its warning on a
    # full descriptor, is set.
    with stops_blocked():
        loop.add_signal_handler(sig, take)
        signal.signal(sig, caught)
        signal.siginterrupt(sig, False)  # as asyncio sets it: system calls restarted
        quiet_wakeup()


def quiet_wakeup() -> None:
    """No traceback on stderr for a signal that finds the event loop's wakeup
    descriptor full.

    asyncio's loop sets the descriptor (``signal.set_wakeup_fd``) at each
    ``add_signal_handler``, with CPython's default of a warning when a signal's
    byte does not fit: a flood of signals faster than the loop reads them (a
    SIGHUP sent in a loop for a second) wrote 337 ``Exception ignored when
    trying to write to the signal wakeup fd`` tracebacks among the log's lines.
    The descriptor is set again, the same, without the warning (as uvloop sets
    its own); the signals are blocked meanwhile, so none comes while there is none.
    """
    with stops_blocked():
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)

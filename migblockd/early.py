"""Signals that come while the daemon starts, before its event loop handles them.

Loading the daemon's modules takes a third of a second, and restoring a large
state seconds.  Until the event loop installs its handlers, the default actions
would apply: SIGHUP and SIGTERM end the process without a log line (and for
SIGHUP that is wrong: systemd sends it to reload), SIGINT raises
KeyboardInterrupt wherever the main thread is, printing a traceback.

So the entry point blocks these signals with its first line and installs these
handlers next, before it imports anything else; then it unblocks them, and one
that came in between, which the kernel kept pending, reaches the handler.  They
are unblocked whoever blocked them: a parent may start the daemon with them
blocked (``env --block-signal``) to close the window before the entry point's
first line too (the interpreter's own start, some 30 ms), and a daemon that kept
them blocked would never hear its SIGTERM.

The handlers only keep what came: a SIGHUP is carried out as a reload once the
daemon is ready; a SIGTERM or SIGINT stops the start once the restore is over
(so a stop never interrupts the restore's reads or its migration of an older
database), without serving.  That is a wait of seconds for 100,000 blockers
(about three), minutes for 1,000,000 on a loaded machine, which systemd's
TimeoutStopSec= bounds (migblockd.progress asks no more time once a stop came);
SIGKILL does not wait.  Meanwhile the daemon holds its socket's and its state
directory's locks, and a second start is refused them: the first stop also has
:meth:`EarlySignals.when_stopping`'s callback run at once (the locks then say
that their holder is stopping before serving, ``migblockd.pidlock``), not once
the start gets to it.

SIGUSR1 and SIGUSR2 mean nothing to the daemon, and their default action
would end it without a line, leaving its socket behind: someone who sends one
expecting a log reopened or a status dump (as other daemons do) would stop
every blocker's enforcement instead.  They are ignored from here on, and the
event loop says so once it handles them (``migblockd.serving``).
"""

import signal
from collections.abc import Callable
from types import FrameType

_STOPS = (signal.SIGTERM, signal.SIGINT)
#: Signals the daemon gives no meaning: ignored, never their default action (the end).
UNUSED = (signal.SIGUSR1, signal.SIGUSR2)


class EarlySignals:
    """What came; :meth:`install` makes this the handler of SIGHUP, SIGTERM and SIGINT."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._on_stop: Callable[[], object] | None = None

    def install(self) -> None:
        for sig in (signal.SIGHUP, *_STOPS):
            signal.signal(sig, self._keep)
        for sig in UNUSED:
            signal.signal(sig, signal.SIG_IGN)  # one pending is dropped, as POSIX says
        # Blocked until now (the entry point's first line, or the parent's mask):
        # one that came meanwhile is taken now, by the handler just set.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGHUP, *_STOPS, *UNUSED))

    def _keep(self, signum: int, _frame: FrameType | None) -> None:
        first = signum in _STOPS and self._first_stop() is None
        self.received.append(signum)
        if first:
            self._stopping()

    def when_stopping(self, callback: Callable[[], object]) -> None:
        """Have ``callback`` run by the first SIGTERM or SIGINT's handler, in the main
        thread between two of its steps; at once if one came already."""
        self._on_stop = callback
        if self._first_stop() is not None:
            self._stopping()

    def _stopping(self) -> None:
        if self._on_stop is not None:
            # Never raised into whatever the main thread was doing when the signal came
            # (and not contextlib.suppress: this module loads before anything else).
            try:  # noqa: SIM105
                self._on_stop()
            except Exception:
                pass

    def reload(self) -> bool:
        """Whether a SIGHUP came."""
        return signal.SIGHUP in self.received

    def stop(self) -> str | None:
        """The name of the first SIGTERM or SIGINT that came, if one did."""
        first = self._first_stop()
        return None if first is None else first.name

    def _first_stop(self) -> signal.Signals | None:
        return next((signal.Signals(s) for s in self.received if s in _STOPS), None)

    def uninstall(self) -> None:
        """Default actions again; a stop that came is acted on now, as it would
        have been (for a run that starts no daemon: --check-config, --help, --version,
        a bad option)."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in UNUSED:
            signal.signal(sig, signal.SIG_DFL)
        if (signum := self._first_stop()) is not None:
            # SIG_DFL for SIGINT too: ended by the signal, as a shell expects,
            # rather than by a KeyboardInterrupt raised wherever the thread is.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

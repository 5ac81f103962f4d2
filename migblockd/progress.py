"""A long start's progress, as systemd hears it: ``EXTEND_TIMEOUT_USEC=`` and ``STATUS=``.

A start's time grows with the state it restores: 1,000,000 blockers took
3 minutes on a loaded 2-core machine (reading the rows, checking them, freezing
them out of the collector, encoding the first listing), past the unit's
``TimeoutStartSec=`` (90 s by default), after which systemd killed a daemon that
was getting there, and ``Restart=`` began it all again.  Rather than a longer
timeout in the unit (too short for a bigger state, and a start that hangs is
then waited for as long), each step and every :data:`~migblockd.state.rows.CHUNK`
rows of the restore give the start :data:`~migblockd.notify.EXTEND_SEC` more
(sd_notify(3)): a start that moves on is not killed, one that stops still is.
``systemctl status`` says which step, e.g. ``restoring 250000 of 1000000
blockers``.  At most one message a :data:`INTERVAL`, but for a new step: the
manager reads every one on its own loop.

What the daemon does once it serves is the watchdog's; its stop is bounded by the
drain's own limit (migblockd.drain), inside ``TimeoutStopSec=``.  A stop that comes
during the start (SIGTERM while it restores) gets no more time either: from then
on nothing is extended, and ``STATUS=`` says the start is stopping.  systemd reads
an ``EXTEND_TIMEOUT_USEC=`` sent while it stops the unit as more time for the stop,
so a restore of minutes went on extending ``TimeoutStopSec=`` for as long, under a
status that still said it was restoring, then "preparing to serve".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from migblockd.notify import Notifier

__all__ = ["INTERVAL", "StartProgress"]

#: Seconds between two messages of one step (the first of a step goes at once).
INTERVAL = 1.0


class StartProgress:
    """Tells systemd, through ``notifier``, that the start makes progress, and how far."""

    def __init__(self, notifier: Notifier, stop: Callable[[], str | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._stop = stop  # the name of a SIGTERM or SIGINT that came (EarlySignals.stop)
        self._clock = clock
        self._sent: float | None = None  # when the last message went

    def step(self, status: str) -> None:
        """A new step, ``status`` saying what it does: always said (until a stop)."""
        self._sent = self._clock()
        self._tell(status)

    def _tell(self, status: str) -> None:
        if (name := self._stop()) is not None:
            # Said once (say() sends no status twice), and no more time asked for.
            self._notifier.say(f"stopping: {name} received while starting; the start "
                               "ends once the restore is over")
            return
        self._notifier.extend(status)

    def counting(self, doing: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` for a step that goes through the blockers, whose
        status is ``doing`` with the counts: ``restoring 20000 of 50000 blockers``."""
        first = True

        def progress(done: int, total: int) -> None:
            nonlocal first
            now = self._clock()
            if first or self._sent is None or now - self._sent >= INTERVAL or done == total:
                first = False
                self._sent = now
                self._tell(f"{doing} {done} of {total} "
                           f"{'blocker' if total == 1 else 'blockers'}")

        return progress

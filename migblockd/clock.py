"""Time sources for the registry: the real one and a hand-driven one for tests.

The registry never reads time itself.  It needs two clocks, like QEMU:

* wall time (``time``), for the ``added`` stamp of a blocker and for event
  timestamps, which clients compare with their own clocks;
* monotonic time (``monotonic``), for the simulated migration's deadlines, so
  that a wall-clock step (NTP, an administrator) cannot make a migration finish
  early or hang.  QEMU uses ``QEMU_CLOCK_REALTIME`` for ``total-time``, which is
  monotonic on Linux hosts as well.

The wall times the daemon stores and reports are those from the epoch (1970) to
the end of year 9999, which clients turn into dates (:data:`FIRST_TIME`,
:data:`LAST_TIME`); the restore refuses a stored ``added`` outside them as a
file edited by hand.  So the system clock's reading is clamped into them: a
wall clock set before 1970 (or past 9999) stamps blockers with the range's end
and logs one warning, rather than store what the next start refuses.
"""

from __future__ import annotations

import logging
import time
from typing import Final, Protocol

__all__ = ["FIRST_TIME", "LAST_TIME", "SYSTEM_CLOCK", "Clock", "FakeClock", "in_range",
           "within_range"]

log = logging.getLogger("migblockd")

#: The epoch: the first wall time the daemon stores or reports.
FIRST_TIME: Final = 0.0
#: Year 10000 begins: the end of what a date holds (Python's datetime, the
#: client's).  The wall times the daemon stores or reports are below it.
LAST_TIME: Final = 253402300800.0
#: The last second of year 9999, where a later clock is clamped: a time nearer
#: LAST_TIME would round, in microseconds, to LAST_TIME itself.
_LAST_SECOND = LAST_TIME - 1.0


def in_range(when: float) -> bool:
    """Whether ``when`` is a wall time the daemon may store: from 1970 to 9999."""
    return FIRST_TIME <= when < LAST_TIME


def within_range(when: float) -> float:
    """``when``, or the nearest time the daemon stamps: the epoch, or the last second
    of 9999 (for a time within a second of the range's end too)."""
    return min(max(when, FIRST_TIME), _LAST_SECOND)


class Clock(Protocol):
    """What the registry needs from a clock."""

    def time(self) -> float:
        """Wall time, seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""
        ...


class _SystemClock:
    __slots__ = ("_out",)

    def __init__(self) -> None:
        #: The last reading was out of range (and the warning logged).
        self._out = False

    def time(self) -> float:
        """``time.time()``, clamped into the range (see the module's doc)."""
        now = time.time()
        stamp = within_range(now)
        if stamp == now:
            self._out = False
            return now
        if not self._out:
            self._out = True
            end = "1970-01-01 00:00:00" if now < FIRST_TIME else "9999-12-31 23:59:59"
            log.warning("the wall clock reads %.6f seconds since the epoch, not a time from "
                        "1970 to 9999: blockers and events are stamped %s UTC instead, until "
                        "it is set right", now, end)
        return stamp

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"


SYSTEM_CLOCK: Final[Clock] = _SystemClock()


class FakeClock:
    """A clock that moves only when told to, for deterministic tests.

    Both readings move together, so an event stamped with ``time()`` and a
    deadline compared with ``monotonic()`` stay consistent.  The defaults are
    arbitrary but chosen so that a wrong clock in a formula shows up (wall
    time around November 2023, monotonic time near 1000 s).
    """

    __slots__ = ("_mono", "_wall")

    def __init__(self, wall: float = 1_700_000_000.25, monotonic: float = 1000.0) -> None:
        self._wall = wall
        self._mono = monotonic

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds`` (which must not be negative)."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self._wall += seconds
        self._mono += seconds

    def __repr__(self) -> str:
        return f"FakeClock(wall={self._wall!r}, monotonic={self._mono!r})"

"""Time sources for the registry: the real one and a hand-driven one for tests.

The registry never reads time itself.  It needs two clocks, like QEMU:

* wall time (``time``), for the ``added`` stamp of a blocker and for event
  timestamps, which clients compare with their own clocks;
* monotonic time (``monotonic``), for the simulated migration's deadlines, so
  that a wall-clock step (NTP, an administrator) cannot make a migration finish
  early or hang.  QEMU uses ``QEMU_CLOCK_REALTIME`` for ``total-time``, which is
  monotonic on Linux hosts as well.
"""

from __future__ import annotations

import time
from typing import Final, Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock"]


class Clock(Protocol):
    """What the registry needs from a clock."""

    def time(self) -> float:
        """Wall time, seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""
        ...


class _SystemClock:
    __slots__ = ()

    def time(self) -> float:
        return time.time()

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

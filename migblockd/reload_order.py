"""The order of reloads: which SIGHUP reads the file, which waits, which may apply.

A reload reads the TOML file and asks the user and group databases on threads
(:mod:`migblockd.server`).  Two facts shape the order:

* SIGHUPs come in storms (a script's loop, a configuration manager that sends
  one per file it writes).  A reload that has not started reading yet will read
  the file after every SIGHUP that comes meanwhile, so such a SIGHUP joins it: at
  most one reload reads and one waits, however many signals came.  One reload per
  signal kept the daemon re-reading the same file for half a minute after 200
  SIGHUPs, and slowed every client meanwhile.
* A reload may never finish reading: an NFS file system or a directory server
  that does not answer.  The one waiting behind it waits ``HELD`` seconds from its
  start at most, says so, and then reads on its own, so that an operator who fixed
  the file or the databases can reload while the earlier one hangs.

Reloads are numbered in the order of their signals, and the newest read wins:
a reload that finishes after a later one applied its file applies nothing, since
an earlier file must never be applied over a later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

__all__ = ["HELD", "ReloadOrder"]

log = logging.getLogger("migblockd")

#: Seconds from a reload's start after which the reload waiting behind it stops
#: waiting and reads the file on its own.
HELD = 5.0


class ReloadOrder:
    """Numbers reloads, lets at most one wait for its turn, and says which may apply."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._asked = 0
        #: The number of the reload whose file is applied (0: none since the start).
        self.applied = 0
        #: The newest reload still reading: set once it has read (or given up), and
        #: when it started (loop time).
        self._reading: tuple[asyncio.Event, float] | None = None
        self._waiting = False

    def ask(self) -> int | None:
        """A new reload's number, in the order of the signals; None when a reload
        waits for its turn already, which this SIGHUP joins (said at debug level)."""
        if self._waiting:
            log.debug("reload: SIGHUP received while a reload waits for its turn: that "
                      "one reads the file after this signal too")
            return None
        self._asked += 1
        self._waiting = self._reading is not None
        return self._asked

    async def take_turn(self, what: str) -> None:
        """Wait until the newest reload still reading has read, ``HELD`` seconds
        from its start at most (``what`` names the file in the warning then).
        Cancelled (the stop), the turn is given up all the same."""
        reading = self._reading
        try:
            if reading is None:
                return
            done, started = reading
            log.debug("reload: waiting for the reload before to finish reading %s (%g s "
                      "from its start at most)", what, HELD)
            try:
                async with asyncio.timeout_at(started + HELD):
                    await done.wait()
            except TimeoutError:
                log.warning("reload: the reload before has been reading %s or asking the "
                            "user and group databases for more than %g s (they do not "
                            "answer); this one does not wait for it, and once it applies "
                            "the file, that one applies nothing", what, HELD)
        finally:
            self._waiting = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around a reload's reading of the file and look-ups: the next SIGHUP waits
        for its end (``HELD`` seconds at most)."""
        mine = (asyncio.Event(), self._loop.time())
        self._reading = mine
        try:
            yield
        finally:
            mine[0].set()
            if self._reading is mine:
                self._reading = None

    def superseded(self, number: int) -> bool:
        """Whether a reload later than ``number`` applied its file: said, if so."""
        if self.applied < number:
            return False
        log.info("reload: not applied: a later reload read the file again and applied it "
                 "first (this one was held by its file system or the user and group "
                 "databases)")
        return True

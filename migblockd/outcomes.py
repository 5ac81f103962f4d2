"""Durability's held output: what a group's commit, or its failure, does to it.

Part of :class:`migblockd.core.Core` (a base class of it, with no state of its
own).  With ``durable=True`` a command whose changes must outlive the daemon
gets a stamp (:mod:`migblockd.ledger` keeps the numbers), and its events and
reply, and all output after them, wait in the sessions until those changes
are on disk.  The server takes the changes in groups (:meth:`Outcomes.take_group`),
commits each off the event loop, and reports how it went:

* :meth:`Outcomes.committed`: the held output of the group is released, in the
  order it was queued, and the commands that wait to read state may run;
* :meth:`Outcomes.commit_failed`: every change not on disk is undone (the
  group's and any made on top of it since), those commands' replies become
  errors, their events are dropped, and the ``query-blockers`` listings start
  over.

Either way the connections that may go on are returned (:meth:`Outcomes._wake`):
those waiting to read state (or a gate handler's ``SETTLE``), and those whose
held output had stopped them.  A connection gone meanwhile is finished off here.
"""

from __future__ import annotations

import logging
from time import perf_counter_ns
from typing import TYPE_CHECKING

from migblockd.commands import Handlers
from migblockd.connection import Connection
from migblockd.guard import Guard
from migblockd.ledger import Group, Ledger
from migblockd.logs import about
from migblockd.qmp.errors import QMPError
from migblockd.registry import Event, Registry
from migblockd.stats import Stats

__all__ = ["Outcomes"]

log = logging.getLogger("migblockd")

#: What the first of failed commits in a row with a reason adds: what it means, then
#: what to do (the failure's own remedy, or this, about the disk, which most are).
_UNTIL = "; every change fails until a commit succeeds: "
_REMEDY = ("free space on the state directory's file system, or look for its errors in "
           "the kernel's log")


class Outcomes:
    """What a :class:`~migblockd.core.Core`'s commits mean for its sessions."""

    # The core's, set in Core.__init__:
    registry: Registry
    handlers: Handlers
    ledger: Ledger
    connections: dict[Connection, None]
    guard: Guard
    _dirty: dict[Connection, None]
    stats: Stats
    #: Commands whose replies wait for a commit: (stamp, name, started, ok, durable,
    #: starts: a migrate that starts a migration), and the events of durable ones:
    #: counted once the commit is done or has failed.
    _unsettled: list[tuple[int, str, int, bool, bool, bool]]
    _unsettled_events: list[tuple[int, Event]]
    #: Commits failed since the last that succeeded, and the last one's reason.
    _failed_commits: int
    _failed_reason: str
    #: The log's last line on commits said they succeed again.
    _said_succeeding: bool
    #: The reasons of this row of failed commits whose remedy the log has given.
    _remedied: set[str]

    if TYPE_CHECKING:
        def _finish(self, conn: Connection) -> None: ...

    def has_uncommitted(self) -> bool:
        """Some change is not on disk yet (nor has its commit failed)."""
        return self.ledger.uncommitted

    def take_group(self, wait: bool = True) -> Group | None:
        """The changes to commit next, if any and if no commit is in flight;
        while ``wait``, only once the last commit's cohort is in (see
        :mod:`migblockd.ledger`) or its wait is over."""
        return self.ledger.take_group(self.registry.clock.monotonic() if wait else None)

    def committed(self, group: Group) -> list[Connection]:
        """``group`` is on disk: release what waited for it.

        Returns the connections whose next request may run now.
        """
        self.ledger.done(group)
        self._settle(group.stamp, failed=False)
        if self._failed_commits:
            # Bounded too: a disk at the edge of full can fail every other commit.
            more = self.guard.throttle.admit("commit", None, self.registry.clock.monotonic())
            if more is not None:
                log.info("commits succeed again, after %d failed (the last: %s)%s",
                         self._failed_commits, self._failed_reason, more)
            self._said_succeeding = more is not None
            self._failed_commits = 0
            self._remedied.clear()
        holding = self.ledger.holding
        released = []
        for conn in list(holding):
            if conn.session.release(group.stamp):
                self._dirty[conn] = None
                released.append(conn)
            if not conn.session.holding:
                del holding[conn]
        # Writers now answered whose next request is still to come: not those
        # with a later request of their own already waiting (for this commit's
        # successor, for QEMU, or to read state).
        self.ledger.expect([conn for conn in group.writers
                            if not conn.closed and conn.waiting is None
                            and not conn.session.holds_reply],
                           self.registry.clock.monotonic())
        return self._wake(released)

    def commit_failed(self, group: Group, reason: str,
                      remedy: str | None = None) -> list[Connection]:
        """``group`` could not be committed: back to what is on disk.

        Every change not yet on disk is undone (``group``'s and any made since),
        those commands' replies become errors saying ``reason``, their events are
        dropped.  The log says ``reason`` and, the first time in a row of
        failures that it says this ``reason``, ``remedy`` (what the operator should
        do; None: see to the disk).
        Returns the connections whose next request may run now.
        """
        undone = [(conn, self.registry.undo(changes, alive=self.connections.__contains__))
                  for conn, changes in self.ledger.failed()]
        self._settle(None, failed=True)
        self.handlers.listings.reset()
        error = QMPError(f"{reason}; nothing was changed")
        released = list(self.ledger.holding)
        # Commands of clients gone since: their replies were dropped with them.
        failed = sum(1 for conn, _ in undone if conn not in self.ledger.holding)
        # What QEMU applied of a command stays: QEMU's own commands apply all or
        # nothing, after their checks, and cannot be asked to take it back here.
        kept: list[tuple[Connection, str]] = []
        for conn in released:
            def partly(applied: str, conn: Connection = conn) -> QMPError:
                kept.append((conn, applied))
                return QMPError(f"{reason}; migblockd changed nothing, but QEMU has "
                                f"applied {applied}")

            failed += conn.session.fail_held(error, partly)
            self._dirty[conn] = None
        self.ledger.holding.clear()
        # A client retrying on a full disk makes a failed commit of each retry:
        # the first says what to do, the guard's throttle bounds the others.  A
        # reason new within the row (the disk full, then another program's write
        # lock) says its own remedy too: the first one's would not end it.
        self._failed_commits += 1
        self._failed_reason = reason
        more = self.guard.throttle.admit("commit", reason, self.registry.clock.monotonic())
        if self._failed_commits == 1 and self._said_succeeding:
            # The log's last word on commits said they succeed: the first of a new
            # row goes out whatever its reason's window holds (as many as those).
            more = more or ""
            self._said_succeeding = False
        if more is not None:
            until = ""
            if reason not in self._remedied:
                self._remedied.add(reason)
                until = _UNTIL + (remedy or _REMEDY)
            log.error("%s; %d command(s) failed, their changes undone%s%s", reason, failed,
                      until, more)
        for conn, applied in kept:
            log.warning("%s: QEMU keeps what it was sent before the commit failed: %s",
                        conn.label, applied, extra=about(conn))
        # The log said "added" and "deleted" as each ran: say which did not last.
        for conn, changes in reversed(undone):
            self.handlers.undone(conn, changes)
        return self._wake(released)

    def _settle(self, stamp: int | None, *, failed: bool) -> None:
        """Count the commands (and events) that waited for the commits up to
        ``stamp`` (None: all of them): a durable command failed with a failed
        commit, and its events never happened; the others are as they were."""
        now = perf_counter_ns()
        stats = self.stats
        left = []
        for entry in self._unsettled:
            held, name, started, ok, durable, starts = entry
            if stamp is None or held <= stamp:
                stats.command(name, now - started, ok and not (failed and durable),
                              starts=starts)
            else:
                left.append(entry)
        self._unsettled = left
        events = []
        for held, event in self._unsettled_events:
            if stamp is None or held <= stamp:
                if not failed:
                    stats.event(event)
            else:
                events.append((held, event))
        self._unsettled_events = events

    def _wake(self, released: list[Connection]) -> list[Connection]:
        """Who may go on after a commit: those waiting to read state, and those
        of ``released`` that their held output had stopped
        (:func:`~migblockd.roster.held_full`)."""
        woken = self.ledger.wake()
        for conn in woken:
            if conn.closed:
                self._finish(conn)
        woken = [conn for conn in woken if not conn.closed]
        woken += [conn for conn in released if conn.session.has_pending()
                  and not conn.closed and conn not in woken]
        return woken

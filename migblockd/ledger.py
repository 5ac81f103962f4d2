"""Which changes are not on disk yet, and who waits for them (sans-I/O).

With durable state, a command that changes what outlives the daemon gets a
*stamp*: the number of the group it will be committed in (one per group, not
per command, so that a session releases a group's output in one run).  Its
events and reply, and everything any client is sent after them, are held
until the changes up to that stamp are on disk; commands that read the
blockers or settings wait until nothing is pending, so no client acts on a
change that a crash could take back.

The server commits in groups: :meth:`Ledger.take_group` hands it every
durable change since the last group (one transaction per loop turn), at most
one group in flight; the core then reports :meth:`Ledger.done` or
:meth:`Ledger.failed`.  The core owns what those outcomes mean for sessions
(:meth:`migblockd.outcomes.Outcomes.committed`,
:meth:`~migblockd.outcomes.Outcomes.commit_failed`); the ledger only keeps the
numbers and the sets of connections straight.

A group also waits for the *cohort*: the connections whose changes the last
commit carried, now answered.  Clients that keep changing state (agents
registering many blockers, one at a time) answer a reply with their next
request within a fraction of a millisecond; a group that closed before they
did would commit a few of them, and the rest would pay for a commit of their
own.  So the next group is committed once each of them has sent its next
request (or has gone, or waits itself: for QEMU, or to read state), once none
of them has for :data:`COHORT_WAIT`, once the group carries
:data:`COHORT_ENOUGH` changes, or :data:`COHORT_LIMIT` after the release,
whichever comes first: a client that went quiet costs the others that once,
and a lone client never waits.  With many writers this is what sizes groups,
as a database's commit delay does, and each ``fsync`` carries several times
the changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from migblockd.connection import Connection
from migblockd.registry import Change

__all__ = ["COHORT_ENOUGH", "COHORT_LIMIT", "COHORT_WAIT", "Group", "Ledger"]

#: Seconds a group waits for the cohort's next requests after the last one
#: came.  A client in a loop answers within a few hundred microseconds; one
#: that has not by then is doing something else.  (The event loop's timers
#: have millisecond resolution: less would not be kept when it is idle.)
COHORT_WAIT: Final = 0.001
#: Changes at which a group stops waiting for the cohort: its ``fsync`` is
#: shared enough, and waiting longer would only delay its replies and make the
#: burst of events its commit releases to every client bigger.
COHORT_ENOUGH: Final = 64
#: Seconds after its release at which a cohort is no longer waited for, however
#: steadily it trickles in: what a group's first writer may lose, at most.
COHORT_LIMIT: Final = 0.005


@dataclass(frozen=True, slots=True)
class Group:
    """Changes to commit in one transaction: all the durable ones up to ``stamp``."""

    stamp: int
    changes: list[Change]
    #: The connections whose commands made them, in order.
    writers: list[Connection]


class Ledger:
    """Stamps handed out, committed and in flight; who holds output, who waits."""

    __slots__ = ("_cohort_limit", "_committed", "_grouped", "_open", "_pending", "_stamp",
                 "cohort", "cohort_until", "holding", "waiting")

    def __init__(self) -> None:
        self._stamp = 0  # the last stamp handed out
        self._committed = 0  # everything up to this stamp is on disk
        self._grouped = 0  # ... or in the group being committed
        self._pending: list[tuple[int, Connection, list[Change]]] = []
        self._open = 0  # changes in the group not taken yet
        #: Connections with output held for a stamp (an ordered set).
        self.holding: dict[Connection, None] = {}
        #: Connections whose next request reads state and waits for every commit.
        self.waiting: dict[Connection, None] = {}
        #: Connections answered by the last commit whose next request has not
        #: come yet (an ordered set), and until when the next group waits for them.
        self.cohort: dict[Connection, None] = {}
        self.cohort_until = 0.0
        self._cohort_limit = 0.0

    @property
    def uncommitted(self) -> bool:
        """Some change is not on disk yet (nor has its commit failed)."""
        return self._stamp > self._committed

    @property
    def open_stamp(self) -> int:
        """The stamp output queued now must wait for; 0 when it need not wait."""
        return self._stamp if self._stamp > self._committed else 0

    @property
    def pending(self) -> int:
        """How many commands' changes are not on disk yet."""
        return len(self._pending)

    def unsettled(self) -> list[Change]:
        """Every change not on disk yet (its commit under way, or not taken), oldest first."""
        return [change for _, _, changes in self._pending for change in changes]

    def record(self, conn: Connection, changes: list[Change]) -> None:
        """A command of ``conn`` made durable ``changes``: they get the open group's stamp."""
        self._stamp = self._grouped + 1  # the group after the one taken last
        self._pending.append((self._stamp, conn, changes))
        self._open += len(changes)

    def expect(self, conns: Iterable[Connection], now: float) -> None:
        """A commit answered ``conns``: the next group waits for them (see above)."""
        self.cohort = dict.fromkeys(conns)
        self.cohort_until = now + COHORT_WAIT
        self._cohort_limit = now + COHORT_LIMIT

    def arrived(self, conn: Connection, now: float) -> None:
        """``conn`` of the cohort sent its next request: the group need not wait
        for it, and waits :data:`COHORT_WAIT` more for the others, which are
        still coming in (a turn that runs many of them can take longer than that)."""
        del self.cohort[conn]
        self.cohort_until = min(now + COHORT_WAIT, self._cohort_limit)

    @property
    def _awaits_cohort(self) -> bool:
        """The open group would wait for the cohort (until ``cohort_until``)."""
        return bool(self.cohort) and self._open < COHORT_ENOUGH

    def deadline(self) -> float | None:
        """When a group that waits for the cohort is due anyway, if one does."""
        if self._stamp > self._grouped == self._committed and self._awaits_cohort:
            return self.cohort_until
        return None

    def take_group(self, now: float | None = None) -> Group | None:
        """The changes to commit next, if any and if no commit is in flight,
        and, unless ``now`` is None, if the cohort is in or its wait is over."""
        if self._grouped > self._committed or self._stamp == self._grouped:
            return None
        if now is not None and now < self.cohort_until and self._awaits_cohort:
            return None
        self.cohort.clear()
        self._open = 0
        grouped = self._grouped
        entries = [(conn, batch) for stamp, conn, batch in self._pending if stamp > grouped]
        changes = [change for _, batch in entries for change in batch if change.durable]
        self._grouped = self._stamp
        return Group(self._stamp, changes, list(dict.fromkeys(conn for conn, _ in entries)))

    def done(self, group: Group) -> None:
        """``group`` is on disk."""
        self._committed = group.stamp
        self._pending = [entry for entry in self._pending if entry[0] > group.stamp]

    def failed(self) -> list[tuple[Connection, list[Change]]]:
        """A commit failed: every change not on disk, newest first, for undoing,
        with the connection whose command made it.

        Changes made after the failed group are given up too: they were made on
        top of it, and their replies are still held.
        """
        undo = [(conn, changes) for _, conn, changes in reversed(self._pending)]
        self._pending.clear()
        self._open = 0
        self.cohort.clear()
        self._committed = self._grouped = self._stamp
        return undo

    def wake(self) -> list[Connection]:
        """The connections waiting to read state, once nothing is uncommitted."""
        if self._stamp > self._committed or not self.waiting:
            return []
        woken = list(self.waiting)
        self.waiting.clear()
        return woken

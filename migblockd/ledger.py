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
(:meth:`migblockd.core.Core.committed`, :meth:`~migblockd.core.Core.commit_failed`);
the ledger only keeps the numbers and the two sets of connections straight.
"""

from __future__ import annotations

from dataclasses import dataclass

from migblockd.connection import Connection
from migblockd.registry import Change

__all__ = ["Group", "Ledger"]


@dataclass(frozen=True, slots=True)
class Group:
    """Changes to commit in one transaction: all the durable ones up to ``stamp``."""

    stamp: int
    changes: list[Change]


class Ledger:
    """Stamps handed out, committed and in flight; who holds output, who waits."""

    __slots__ = ("_committed", "_grouped", "_pending", "_stamp", "holding", "waiting")

    def __init__(self) -> None:
        self._stamp = 0  # the last stamp handed out
        self._committed = 0  # everything up to this stamp is on disk
        self._grouped = 0  # ... or in the group being committed
        self._pending: list[tuple[int, list[Change]]] = []
        #: Connections with output held for a stamp (an ordered set).
        self.holding: dict[Connection, None] = {}
        #: Connections whose next request reads state and waits for every commit.
        self.waiting: dict[Connection, None] = {}

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

    def record(self, changes: list[Change]) -> None:
        """A command made durable ``changes``: they get the open group's stamp."""
        self._stamp = self._grouped + 1  # the group after the one taken last
        self._pending.append((self._stamp, changes))

    def take_group(self) -> Group | None:
        """The changes to commit next, if any and if no commit is in flight."""
        if self._grouped > self._committed or self._stamp == self._grouped:
            return None
        changes = [change for stamp, batch in self._pending if stamp > self._grouped
                   for change in batch if change.durable]
        self._grouped = self._stamp
        return Group(self._stamp, changes)

    def done(self, group: Group) -> None:
        """``group`` is on disk."""
        self._committed = group.stamp
        self._pending = [entry for entry in self._pending if entry[0] > group.stamp]

    def failed(self) -> list[list[Change]]:
        """A commit failed: every change not on disk, newest first, for undoing.

        Changes made after the failed group are given up too: they were made on
        top of it, and their replies are still held.
        """
        undo = [changes for _, changes in reversed(self._pending)]
        self._pending.clear()
        self._committed = self._grouped = self._stamp
        return undo

    def wake(self) -> list[Connection]:
        """The connections waiting to read state, once nothing is uncommitted."""
        if self._stamp > self._committed or not self.waiting:
            return []
        woken = list(self.waiting)
        self.waiting.clear()
        return woken

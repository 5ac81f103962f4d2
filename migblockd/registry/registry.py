"""QEMU's blocker rules over the store, and what the registry gives the core.

Device code in QEMU calls ``migrate_add_blocker*()`` to prepend its reason to
the lists of the modes it cannot support and ``migrate_del_blocker()`` to
remove it from every list again; ``qmp_migrate()`` refuses to start while the
current mode's list is non-empty, quoting the head of that list (the newest
blocker), and ``query-migrate`` shows the whole list as ``blocked-reasons``
(``migration/migration.c``).

:class:`Registry` reproduces those rules with exact error texts and adds what a
daemon needs: ids for blockers (QEMU identifies them by pointer),
connection-scoped blockers released on disconnect, and events.  It does no I/O
and reads no clock of its own accord: time comes from an injected clock, and
the simulated migration moves only when the core calls :meth:`Registry.advance`
(before every command, and when :meth:`Registry.next_deadline` passes).  The
migration parameters and the ``migrate`` commands are its other half,
:class:`~migblockd.registry.control.MigrationControl`; here are the
blockers, the events and changes the core takes, and the undoing of changes
a commit could not keep.

Versions followed: the blocker rules and per-mode lists are QEMU 8.2 to 10.2
(MigMode exists since 8.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Final

from migblockd.clock import SYSTEM_CLOCK, Clock
from migblockd.registry.blockers import Blocker, BlockerStore, Owner
from migblockd.registry.changes import Change, Event
from migblockd.registry.control import MigrationControl
from migblockd.registry.errors import (
    DuplicateId,
    EmptyModes,
    EmptyReason,
    MigrationBusy,
    NotFound,
    OnlyMigratable,
)
from migblockd.registry.ids import IdSource, check_id
from migblockd.registry.migration import MIGRATION_STATUSES, SimulatedMigration

__all__ = ["DEFAULT_MODE", "SCOPES", "Change", "Event", "Registry"]

#: ``BlockerScope``: a daemon blocker lives until deleted; a connection blocker
#: also goes when the connection that added it closes.
SCOPES: Final[tuple[str, ...]] = ("daemon", "connection")

#: The ``mode`` migration parameter's default, and the mode that
#: ``-only-migratable`` protects (``MIG_MODE_NORMAL`` in QEMU).
DEFAULT_MODE: Final = "normal"


def only_migratable_refuses(internal: bool, modes: Collection[str]) -> bool:
    """Whether ``-only-migratable`` refuses a blocker: one that blocks the normal mode,
    unless it is internal (``is_only_migratable()``, which
    ``migrate_add_blocker_internal()`` skips, migration/migration.c).  The rule a
    stored blocker is judged by at a start, and a reload by for the next one."""
    return not internal and DEFAULT_MODE in modes


#: QEMU's defaults for the parameters the simulation only reports.
PARAMETER_DEFAULTS: Final[Mapping[str, object]] = {"max-bandwidth": 134217728,
                                                   "downtime-limit": 300}


class Registry(MigrationControl):
    """The blockers of one daemon and the state of its (simulated) migration.

    ``modes`` are the MigMode members in schema order, taken from the schema
    so that a new mode needs no change here; it must include ``normal``.
    ``only_migratable`` is QEMU's ``-only-migratable``, fixed for the
    registry's life.  ``migration_time`` is how long a simulated migration
    takes from ``setup`` to ``completed``, in seconds.
    """

    __slots__ = ("_clock", "_events", "_ids", "_journal", "_modes", "_only_migratable",
                 "_seq", "_store", "_version")

    def __init__(
        self,
        modes: Sequence[str],
        *,
        only_migratable: bool = False,
        migration_time: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._modes: tuple[str, ...] = tuple(modes)
        if len(set(self._modes)) != len(self._modes):
            raise ValueError(f"duplicate MigMode members: {self._modes!r}")
        if DEFAULT_MODE not in self._modes:
            raise ValueError(f"MigMode must include {DEFAULT_MODE!r}: {self._modes!r}")
        if not (math.isfinite(migration_time) and migration_time >= 0):
            raise ValueError(f"migration_time must be finite and >= 0, not {migration_time!r}")
        self._only_migratable = only_migratable
        self._clock = clock
        self._store = BlockerStore(self._modes)
        self._migration = SimulatedMigration(float(migration_time))
        self._entered = dict.fromkeys(MIGRATION_STATUSES, 0)
        self._ids = IdSource()
        self._seq = 0  # the age rank of the next blocker
        self._version = 0
        self._journal: list[Change] = []
        self._mode = DEFAULT_MODE
        self._mode_chain = self._store.chain(DEFAULT_MODE)
        self._events_enabled = False
        self._parameters = dict(PARAMETER_DEFAULTS)
        self._events: list[Event] = []

    # ----------------------------------------------------------------- settings

    @property
    def clock(self) -> Clock:
        """The clock this registry reads (the core arms its timer with it)."""
        return self._clock

    @property
    def modes(self) -> tuple[str, ...]:
        """The MigMode members this registry was built with, in schema order."""
        return self._modes

    @property
    def only_migratable(self) -> bool:
        """QEMU's ``-only-migratable``: refuse non-internal ``normal`` blockers."""
        return self._only_migratable

    # ----------------------------------------------------------------- blockers

    def add(
        self,
        reason: str,
        *,
        modes: Sequence[str] | None = None,
        internal: bool = False,
        id: str | None = None,
        scope: str = "daemon",
        owner: Owner | None = None,
        connection: object | None = None,
    ) -> Blocker:
        """Register a blocker: ``migrate_add_blocker_modes()`` /
        ``migrate_add_blocker_internal()``.

        Argument errors come first (:class:`EmptyReason`, :class:`EmptyModes`,
        :class:`IdTooLong`, :class:`InvalidId`, :class:`DuplicateId`), as QMP reports
        them before a command has any effect; then QEMU's own order:
        :class:`OnlyMigratable` (only for a non-internal blocker whose modes include
        ``normal``), then :class:`MigrationBusy` (internal blockers too).  A refused
        blocker is not registered.  ``modes=None`` means every mode
        (:attr:`Blocker.every_mode`, kept as such on disk); duplicates in
        ``modes`` collapse, as in QEMU's bit set.  Queues BLOCKER_ADDED.
        """
        wanted = self.check_add(reason, modes=modes, internal=internal, id=id, scope=scope,
                                connection=connection)
        if id is None:
            id, reserve = self._ids.take()
            if reserve is not None:
                self._journal.append(reserve)
        blocker = Blocker(id, reason, wanted, internal, scope, owner, self._clock.time(),
                          self._seq, connection if scope == "connection" else None,
                          every_mode=modes is None)
        self._seq += 1
        self._store.add(blocker)
        self._version += 1
        self._journal.append(Change("add", scope == "daemon", blocker))
        self._events.append(Event("BLOCKER_ADDED", blocker.added, blocker))
        return blocker

    def check_add(
        self,
        reason: str,
        *,
        modes: Sequence[str] | None = None,
        internal: bool = False,
        id: str | None = None,
        scope: str = "daemon",
        connection: object | None = None,
    ) -> tuple[str, ...]:
        """Raise what :meth:`add` would raise, change nothing; the modes it would block."""
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        if scope == "connection" and connection is None:
            raise ValueError("a connection-scoped blocker needs its connection")
        if not reason:
            raise EmptyReason()
        if modes is None:
            wanted = self._modes
        else:
            if not modes:
                raise EmptyModes()
            requested = set(modes)
            unknown = requested.difference(self._modes)
            if unknown:
                raise ValueError(f"unknown MigMode {sorted(unknown)!r}")
            wanted = tuple(mode for mode in self._modes if mode in requested)
        if id is not None:
            check_id(id)
            if id in self._store:
                raise DuplicateId(id)
        if self._only_migratable and only_migratable_refuses(internal, wanted):
            raise OnlyMigratable(reason)
        if self._migration.running:
            raise MigrationBusy(reason)
        return wanted

    def delete(self, id: str) -> Blocker:
        """``migrate_del_blocker()``: remove a blocker from every mode's list.

        Allowed while a migration runs.  Unknown id: :class:`NotFound`.
        Queues BLOCKER_DELETED with cause ``command``.
        """
        blocker = self._store.get(id)
        if blocker is None:
            raise NotFound(id)
        self._remove(blocker, "command")
        return blocker

    def release(self, connection: object) -> list[Blocker]:
        """Remove the connection-scoped blockers ``connection`` added, oldest first.

        Called when the connection closes.  Queues one BLOCKER_DELETED per
        blocker, with cause ``connection-closed``.  Daemon-scoped blockers the
        connection added stay.
        """
        released = self._store.owned_by(connection)
        for blocker in released:
            self._remove(blocker, "connection-closed")
        return released

    def held_by(self, connection: object) -> list[str]:
        """The ids of the connection-scoped blockers ``connection`` holds, oldest
        first: what its disconnection would release."""
        return [blocker.id for blocker in self._store.owned_by(connection)]

    def get(self, id: str) -> Blocker | None:
        """The blocker with this id, if registered."""
        return self._store.get(id)

    def count_owned(self, uid: int | None) -> int:
        """How many registered blockers were added by ``uid`` (None: by no known uid).  O(1)."""
        return self._store.count_owned(uid)

    def share_counts(self, owner_of: Callable[[int], int | None] | None) -> None:
        """Count each subordinate uid's blockers for the user it belongs to too,
        as ``owner_of`` says (None: nobody's are shared); :meth:`count_held`."""
        self._store.share_counts(owner_of)

    def count_held(self, user: int | None) -> int:
        """How many blockers ``user`` and its subordinate uids own (as
        :meth:`share_counts` was told): what counts against its quota.  O(1)."""
        return self._store.count_held(user)

    def owners(self) -> list[int | None]:
        """The uids that own registered blockers (None: for those with no known owner)."""
        return self._store.owners()

    def blockers(self, mode: str | None = None) -> list[Blocker]:
        """Registered blockers, oldest first; with ``mode``, only those blocking it."""
        if mode is not None and mode not in self._modes:
            raise ValueError(f"unknown MigMode {mode!r}")
        return list(self._store.chain(mode))

    def count(self, mode: str | None = None) -> int:
        """How many blockers are registered (with ``mode``: how many block it).  O(1)."""
        return len(self._store) if mode is None else self._store.chain(mode).count

    def oldest(self, mode: str | None = None) -> Blocker | None:
        """The longest-registered blocker of ``mode`` (default: current mode).  O(1)."""
        chain = self._mode_chain if mode is None else self._store.chain(mode)
        return chain.oldest

    def newest(self, mode: str | None = None) -> Blocker | None:
        """The blocker ``migrate`` would quote in ``mode`` (default: current mode)."""
        chain = self._mode_chain if mode is None else self._store.chain(mode)
        return chain.newest

    @property
    def version(self) -> int:
        """Counts every addition and removal: a cached listing is stale once it moves."""
        return self._version

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, id: object) -> bool:
        return id in self._store

    def _remove(self, blocker: Blocker, cause: str) -> None:
        self._store.remove(blocker)
        self._version += 1
        self._journal.append(Change("delete", blocker.scope == "daemon", blocker))
        self._events.append(Event("BLOCKER_DELETED", self._clock.time(), blocker, cause))

    # ----------------------------------------------------------------- events

    def take_events(self) -> list[Event]:
        """Drain the queued events, oldest first."""
        if not self._events:  # most commands cause none: allocate nothing
            return []
        events, self._events = self._events, []
        return events

    # ----------------------------------------------------------------- durability

    def take_changes(self) -> list[Change]:
        """The mutations since the last call, oldest first."""
        if not self._journal:
            return []
        changes, self._journal = self._journal, []
        return changes

    def undo(self, changes: list[Change], alive: Callable[[object], bool]) -> list[Change]:
        """Take ``changes`` back, newest first, without events; those it took back.

        For a commit that failed: the registry returns to what is on disk.  A
        change that no longer applies is skipped: its blocker since went with
        its connection, or was deleted from a connection no longer ``alive``
        (restored, it would have nothing left to end it).
        """
        undone = []
        for change in reversed(changes):
            blocker = change.blocker
            if change.kind == "add":
                assert blocker is not None
                if self._store.get(blocker.id) is not blocker:
                    continue
                self._store.remove(blocker)
                self._version += 1
            elif change.kind == "delete":
                assert blocker is not None
                gone = blocker.connection is not None and not alive(blocker.connection)
                if blocker.id in self._store or gone:
                    continue
                self._store.add(blocker)
                self._version += 1
            elif change.kind == "mode":
                self._set_mode(str(change.old))
            elif change.kind == "events":
                self._events_enabled = bool(change.old)
            elif change.kind == "parameters":
                assert isinstance(change.old, dict)
                self._parameters = dict(change.old)
            else:
                assert isinstance(change.old, int)
                self._ids.floor = change.old
            undone.append(change)
        undone.reverse()
        return undone

    def restore(self, blockers: Sequence[Blocker], *, mode: str, events: bool,
                id_floor: int) -> None:
        """Load what a previous run stored (an empty registry only), oldest first.

        Generated ids continue from ``id_floor``: the ones below it may have
        been handed out before a crash.
        """
        assert not self._store, "restore into an empty registry"
        for blocker in blockers:
            self._store.add(blocker)
            self._seq = max(self._seq, blocker.seq + 1)
        self._set_mode(mode if mode in self._modes else DEFAULT_MODE)
        self._events_enabled = events
        self._ids.restart(id_floor)
        self._version += 1

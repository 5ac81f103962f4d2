"""The registry's migration side: the migration parameters and the ``migrate`` commands.

The ``mode`` parameter (``migrate-set-parameters``) picks the list of blockers
that ``migrate`` and ``query-migrate`` consult; the ``events`` capability
(``migrate-set-capabilities``) says whether ``MIGRATION`` events are sent.
``migrate``, ``migrate_cancel`` and ``query-migrate`` drive and show the
simulated migration (:mod:`migblockd.registry.migration`, the state machine).

:class:`MigrationControl` is a part of :class:`~migblockd.registry.registry.Registry`,
apart because the blocker rules need only whether a migration runs.  Its slots
hold the parameters and the migration; :class:`Registry`'s ``__init__`` sets
them with the rest, and the registry's attributes it reads are named here.

Versions followed: ``migration_is_running()`` is the 10.x set; ``migrate``
checks where to before anything else, in QEMU master's order and words
(``migration_channel_parse_input()`` runs before ``migrate_prepare()``; an
unknown URI scheme is ``unknown migration protocol: URI``, as since 8.2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from migblockd.clock import Clock
from migblockd.registry.blockers import BlockerStore, Chain
from migblockd.registry.changes import Change, Event
from migblockd.registry.errors import MigrationBlocked, MigrationInProgress, NoPausedMigration
from migblockd.registry.migration import SimulatedMigration, check_destination

__all__ = ["MigrationControl"]


class MigrationControl:
    """The migration parameters, capabilities and commands of a :class:`Registry`."""

    # Its own state; Registry.__init__ sets it, with the rest.
    __slots__ = ("_entered", "_events_enabled", "_migration", "_mode", "_mode_chain",
                 "_parameters")

    _entered: dict[str, int]
    _events_enabled: bool
    _migration: SimulatedMigration
    _mode: str
    _mode_chain: Chain
    _parameters: dict[str, object]
    # The registry's, which it reads or appends to.
    _clock: Clock
    _modes: tuple[str, ...]
    _store: BlockerStore
    _journal: list[Change]
    _events: list[Event]

    # ----------------------------------------------------------------- parameters

    @property
    def migration_time(self) -> float:
        return self._migration.duration

    @property
    def mode(self) -> str:
        """The ``mode`` migration parameter: whose list ``migrate`` consults."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """``migrate-set-parameters {"mode": ...}``.

        Takes effect at once for ``migrate`` and ``query-migrate``.  QEMU does
        not refuse a parameter change during a migration; the running
        (simulated) migration is not affected.
        """
        if mode not in self._modes:
            raise ValueError(f"unknown MigMode {mode!r}")
        # Setting the value it has is journaled too, as no change to store: when
        # that value waits for its commit, the command stands on it, and must
        # fail with it (the core joins it to the group).
        self._journal.append(Change("mode", mode != self._mode, old=self._mode, new=mode))
        self._set_mode(mode)

    @property
    def parameters(self) -> Mapping[str, object]:
        """The migration parameters other than ``mode``: reported by
        ``query-migrate-parameters``, with no effect on the simulation."""
        return self._parameters

    def set_parameters(self, values: Mapping[str, object]) -> None:
        """``migrate-set-parameters`` of parameters other than ``mode``.

        Not stored (QEMU too starts from its defaults), but journaled as no
        change to store: a command made while a change waits for its commit (its
        own ``mode``, or another client's) shares that commit's outcome, and a
        failed one takes these back too, so that its "nothing was changed" holds.
        """
        if values:
            old = dict(self._parameters)
            self._parameters.update(values)
            self._journal.append(Change("parameters", False, old=old,
                                        new=dict(self._parameters)))

    def _set_mode(self, mode: str) -> None:
        self._mode = mode
        self._mode_chain = self._store.chain(mode)

    @property
    def events_enabled(self) -> bool:
        """The ``events`` migration capability: whether MIGRATION events are sent."""
        return self._events_enabled

    def check_capabilities_settable(self) -> None:
        """Raise :class:`MigrationInProgress` if ``migrate-set-capabilities``
        must be refused now.

        QEMU's ``qmp_migrate_set_capabilities()`` refuses any change while a
        migration runs, before looking at the list; a handler that sets several
        capabilities calls this first so the command is all or nothing.
        """
        if self._migration.running:
            raise MigrationInProgress()

    def set_events(self, on: bool) -> None:
        """``migrate-set-capabilities`` for ``events``; refused while a migration runs."""
        self.check_capabilities_settable()
        # Journaled when unchanged too (not to store): see set_mode.
        self._journal.append(Change("events", on != self._events_enabled,
                                    old=self._events_enabled, new=on))
        self._events_enabled = on

    # ----------------------------------------------------------------- migration

    @property
    def status(self) -> str | None:
        """The migration's ``MigrationStatus``; None before the first migration."""
        return self._migration.status

    @property
    def entered(self) -> Mapping[str, int]:
        """How often the simulated migration entered each status (every ``MigrationStatus``
        is a key) since start-up, whether or not MIGRATION events were sent."""
        return self._entered

    @property
    def migrating(self) -> bool:
        """Whether a migration runs (``migration_is_running()``)."""
        return self._migration.running

    def check_migrate(self, resume: bool = False) -> None:
        """``migrate``'s refusals once its destination passed (QEMU's
        ``migrate_prepare()``), in QEMU 8.2+'s order, without starting anything.

        A resume (:class:`NoPausedMigration`: the simulation never pauses a
        postcopy migration, the only kind QEMU resumes), a migration already
        running (:class:`MigrationInProgress`), then the current mode's list
        (:class:`MigrationBlocked`, quoting the newest).  QEMU 10.2 refuses a
        ``cpr-exec`` migrate before the blockers until ``cpr-exec-command`` is set;
        the simulation has no such parameter and judges it as set.
        """
        if resume:
            raise NoPausedMigration()
        if self._migration.running:
            raise MigrationInProgress()
        newest = self._mode_chain.newest
        if newest is not None:
            raise MigrationBlocked(newest)

    def migrate(self, uri: str | None, resume: bool = False,
                channels: Sequence[Mapping[str, Any]] | None = None) -> None:
        """``migrate``: start a simulated migration to ``uri`` or ``channels``.

        Every refusal (see :func:`~migblockd.registry.migration.check_destination`
        and :meth:`check_migrate`)
        leaves the state untouched and queues nothing.  On success the status
        becomes ``setup`` (MIGRATION event when enabled).
        """
        check_destination(uri, channels, self._mode)
        self.check_migrate(resume)
        self._announce(self._migration.start(self._clock.monotonic()))

    def cancel(self) -> None:
        """``migrate_cancel``: a running migration goes through ``cancelling``."""
        self._announce(self._migration.cancel(self._clock.monotonic()))

    def blocked_reasons(self) -> list[str]:
        """The current mode's reasons, oldest first (``query-migrate``'s list)."""
        return [blocker.reason for blocker in self._mode_chain]

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``'s ``MigrationInfo``.

        ``blocked-reasons`` (oldest first) is present exactly when the current
        mode's list is non-empty, whatever the status.
        """
        info = self._migration.info(self._clock.monotonic())
        if self._mode_chain.count:
            info["blocked-reasons"] = self.blocked_reasons()
        return info

    def next_deadline(self) -> float | None:
        """Monotonic time of the next simulated-migration transition, if any."""
        return self._migration.deadline

    def advance(self) -> None:
        """Apply every transition due at ``clock.monotonic()``, queueing events."""
        if self._migration.deadline is not None:
            self._announce(self._migration.advance(self._clock.monotonic()))

    def _announce(self, statuses: list[str]) -> None:
        entered = self._entered
        for status in statuses:
            entered[status] += 1
        # migrate_generate_event() reads the capability at each transition.
        if self._events_enabled:
            when = self._clock.time()
            for status in statuses:
                self._events.append(Event("MIGRATION", when, detail=status))

"""The daemon's own counters: plain integers the core bumps where an outcome is decided.

Nothing here knows Prometheus: :mod:`migblockd.metrics` reads these counters
when it is scraped and builds the metric families from them (and from live
state: the registry's lists, the connections, the QEMU link).  So a request
costs the same whether ``--metrics`` is on or off: one
``time.perf_counter_ns()`` pair, one ``bisect`` into a fixed list of bucket
bounds and a few integer increments, with no lock and no allocation.

The scrape reads them on the event loop's thread, between two turns
(:mod:`migblockd.scrape`), so nothing here needs a lock.  The containers get
all their keys at start-up (one :class:`CommandStats` per command of the
table, one entry per refusal reason): every series a label can take is
exported from the start, at zero, as Prometheus prefers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Final

from migblockd.guard import AccessDenied, OverQuota
from migblockd.qemu_facts import ModeMismatch, QemuError, QemuUnavailable
from migblockd.qmp.errors import QMPError
from migblockd.registry import (
    DuplicateId,
    EmptyModes,
    EmptyReason,
    Event,
    InvalidDestination,
    InvalidId,
    InvalidUri,
    MigrationBlocked,
    MigrationBusy,
    MigrationInProgress,
    NoPausedMigration,
    OnlyMigratable,
)

__all__ = ["ADD_REFUSALS", "COMMAND_BUCKETS", "COMMIT_BUCKETS", "CONNECTION_REFUSALS",
           "DELETE_CAUSES", "MIGRATE_REFUSALS", "CommandStats", "Histogram", "Stats",
           "refusal_reason"]

#: Why ``add-blocker`` was refused: the ``reason`` label of its refusal counter.
#: ``internal`` is a bug (the traceback is in the log).
ADD_REFUSALS: Final[tuple[str, ...]] = (
    "access", "quota", "invalid", "duplicate-id", "only-migratable", "busy", "qemu",
    "qemu-unavailable", "internal",
)
#: Why a connection was turned away: a limit, or no file descriptor to serve it with.
CONNECTION_REFUSALS: Final[tuple[str, ...]] = ("max-clients", "max-clients-per-uid",
                                               "descriptors")
#: Why ``migrate`` was refused.
MIGRATE_REFUSALS: Final[tuple[str, ...]] = (
    "access", "invalid", "blocked", "in-progress", "not-paused", "mode", "qemu",
    "qemu-unavailable", "internal",
)

# The most specific class first: OverQuota and AccessDenied are QMPErrors.
_REASON_OF: Final[dict[type[BaseException], str]] = {
    AccessDenied: "access",
    OverQuota: "quota",
    EmptyModes: "invalid",
    EmptyReason: "invalid",
    InvalidId: "invalid",
    InvalidUri: "invalid",
    InvalidDestination: "invalid",
    DuplicateId: "duplicate-id",
    OnlyMigratable: "only-migratable",
    MigrationBusy: "busy",
    MigrationBlocked: "blocked",
    MigrationInProgress: "in-progress",
    NoPausedMigration: "not-paused",
    ModeMismatch: "mode",
    QemuError: "qemu",
    QemuUnavailable: "qemu-unavailable",
    QMPError: "invalid",  # a handler's own refusal of its arguments
}


def refusal_reason(exc: BaseException) -> str:
    """The ``reason`` label of a refusal, from the type of what refused it (the one place)."""
    for cls in type(exc).__mro__:
        reason = _REASON_OF.get(cls)
        if reason is not None:
            return reason
    return "internal"


#: BLOCKER_DELETED's causes: the ``cause`` label of the deletions counter.
DELETE_CAUSES: Final[tuple[str, ...]] = ("command", "connection-closed")

#: Upper bounds of the command latency buckets, in seconds: a command that only
#: touches the registry takes tens of microseconds; one that asks QEMU, milliseconds.
COMMAND_BUCKETS: Final[tuple[float, ...]] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)
#: Upper bounds of the group commit latency buckets, in seconds (an fdatasync or two).
COMMIT_BUCKETS: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Histogram:
    """Observations in fixed buckets: ``counts[i]`` is how many fell in bucket ``i`` alone.

    Bucket ``i`` holds the values ``<= bounds[i]`` (and above the bound before
    it); the last one, past every bound, is ``+Inf``.  Not cumulative, so one
    observation is one increment; the scrape adds them up.
    """

    __slots__ = ("bounds", "bounds_ns", "counts", "total_ns")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.bounds_ns = tuple(round(bound * 1e9) for bound in bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.total_ns = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(self.bounds_ns, ns)] += 1
        self.total_ns += ns


class CommandStats:
    """One command's outcomes and latency."""

    __slots__ = ("errors", "latency", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.latency = Histogram(COMMAND_BUCKETS)


class Stats:
    """Everything the daemon counts about itself since it started.

    ``commands`` are the names in the core's command table.  Counters of what
    happened (commands, refusals, connections, commits); the gauges (blockers,
    clients, the QEMU link) are read from live state at scrape time instead.
    """

    __slots__ = ("blockers_added", "blockers_deleted", "blockers_refused", "commands",
                 "commit_failures", "commits", "connections", "connections_refused",
                 "dropped", "events_discarded", "migrations_refused", "migrations_started",
                 "protocol_replies")

    def __init__(self, commands: Iterable[str]) -> None:
        self.commands = {name: CommandStats() for name in commands}
        #: Requests the QMP session answered itself: ``qmp_capabilities`` and
        #: those refused before a command could run (JSON, envelope, arguments).
        self.protocol_replies = 0
        self.blockers_added = 0
        self.blockers_deleted = dict.fromkeys(DELETE_CAUSES, 0)
        self.blockers_refused = dict.fromkeys(ADD_REFUSALS, 0)
        #: migrate accepted, a resume of a paused one not counted (the same migration).
        self.migrations_started = 0
        self.migrations_refused = dict.fromkeys(MIGRATE_REFUSALS, 0)
        self.connections = 0  # accepted, including those turned away
        #: Connections turned away, by why (CONNECTION_REFUSALS).
        self.connections_refused = dict.fromkeys(CONNECTION_REFUSALS, 0)
        self.dropped = 0  # disconnected past max-output
        #: Events not sent to clients kept past max-output (they hold
        #: connection-scoped blockers), one per event and client.
        self.events_discarded = 0
        self.commits = Histogram(COMMIT_BUCKETS)
        self.commit_failures = 0

    def command(self, name: str, ns: int, ok: bool, *, starts: bool = False) -> None:
        """A command of the table was answered, ``ns`` after it started; ``starts``:
        it is a ``migrate`` that starts a migration if it succeeds (not a resume)."""
        stats = self.commands[name]
        if ok:
            stats.ok += 1
            if starts:
                self.migrations_started += 1
        else:
            stats.errors += 1
        latency = stats.latency  # Histogram.observe, inlined: this runs for every request
        latency.counts[bisect_left(latency.bounds_ns, ns)] += 1
        latency.total_ns += ns

    def refused(self, name: str, exc: BaseException) -> None:
        """Command ``name`` was refused by ``exc``: counted when it adds or migrates."""
        if name == "add-blocker":
            counts = self.blockers_refused
        elif name == "migrate":
            counts = self.migrations_refused
        else:
            return
        reason = refusal_reason(exc)
        # A reason this command cannot meet today would be a new bug: it counts as one.
        counts[reason if reason in counts else "internal"] += 1

    def event(self, event: Event) -> None:
        """A registry event was published (blockers come and go through these only)."""
        if event.name == "BLOCKER_ADDED":
            self.blockers_added += 1
        elif event.name == "BLOCKER_DELETED" and event.detail in self.blockers_deleted:
            self.blockers_deleted[event.detail] += 1

    def commit(self, ns: int, ok: bool) -> None:
        """A group commit took ``ns``, and succeeded or not."""
        self.commits.observe(ns)
        if not ok:
            self.commit_failures += 1

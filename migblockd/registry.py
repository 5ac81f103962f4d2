"""QEMU's migration blocker registry and a simulated migration, as pure domain logic.

QEMU keeps one singly linked list of ``Error`` objects per migration mode
(``static GSList *migration_blockers[MIG_MODE__MAX]`` in migration/migration.c).
Device code calls ``migrate_add_blocker*()`` to prepend its reason to the lists
of the modes it cannot support and ``migrate_del_blocker()`` to remove it from
every list again.  ``qmp_migrate()`` refuses to start while the current mode's
list is non-empty, quoting the head of that list (the newest blocker), and
``query-migrate`` shows the whole list as ``blocked-reasons``.

This module reproduces those rules for migblockd, with exact error texts, and
adds what a daemon needs: ids for blockers (QEMU identifies them by pointer),
connection-scoped blockers released on disconnect, and events.  It does no I/O:
the server calls it from its command handlers, asks :meth:`Registry.next_deadline`
when to call :meth:`Registry.advance`, and delivers what
:meth:`Registry.take_events` returns.

Versions followed (see ``docs/registry.md``): the blocker rules and per-mode
lists are QEMU 8.2 to 10.2 (MigMode exists since 8.2); ``migration_is_running()``
is the 10.x set; ``migrate`` checks its URI before anything else, as 8.2+ does
(``migrate_uri_parse()`` runs before ``migrate_prepare()``), but words the error
as QEMU 7.2 did, ``Parameter 'uri' expects a valid migration protocol``, which is
the wording migblockd's contract promises.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from migblockd.clock import SYSTEM_CLOCK, Clock, FakeClock

__all__ = [
    "DEFAULT_MODE",
    "MIGRATION_STATUSES",
    "RUNNING_STATUSES",
    "SCOPES",
    "SETUP_SHARE",
    "SYSTEM_CLOCK",
    "URI_SCHEMES",
    "Blocker",
    "BlockerError",
    "Clock",
    "DuplicateId",
    "EmptyModes",
    "Event",
    "FakeClock",
    "InvalidId",
    "InvalidUri",
    "MigrationBlocked",
    "MigrationBusy",
    "MigrationInProgress",
    "NotFound",
    "OnlyMigratable",
    "Owner",
    "Registry",
]

#: QEMU's ``MigrationStatus`` members, in QEMU's order.
MIGRATION_STATUSES: Final[tuple[str, ...]] = (
    "none",
    "setup",
    "cancelling",
    "cancelled",
    "active",
    "postcopy-device",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "completed",
    "failed",
    "colo",
    "pre-switchover",
    "device",
    "wait-unplug",
)

#: ``migration_is_running()`` as of QEMU 10.x: every status but the four at
#: rest.  QEMU 9.0 refused blockers with ``!migration_is_idle()``, which also
#: counted ``colo``; 9.1 merged the two predicates, so one set serves both the
#: add-blocker busy check and the ``migrate`` in-progress check.
RUNNING_STATUSES: Final[frozenset[str]] = frozenset(MIGRATION_STATUSES) - {
    "none",
    "cancelled",
    "completed",
    "failed",
}

#: URI prefixes ``migrate_uri_parse()`` recognises.  migblockd checks only the
#: scheme: nothing is connected to, so what follows the colon is not parsed.
URI_SCHEMES: Final[tuple[str, ...]] = ("tcp:", "unix:", "exec:", "fd:", "file:", "rdma:", "vsock:")

#: ``BlockerScope``: a daemon blocker lives until deleted; a connection blocker
#: also goes when the connection that added it closes.
SCOPES: Final[tuple[str, ...]] = ("daemon", "connection")

#: The ``mode`` migration parameter's default, and the mode that
#: ``-only-migratable`` protects (``MIG_MODE_NORMAL`` in QEMU).
DEFAULT_MODE: Final = "normal"

#: Fraction of ``migration_time`` spent in ``setup`` before ``active``.  A real
#: setup phase (connecting, sending the device list) is short next to RAM
#: transfer; a tenth keeps both phases observable in tests.
SETUP_SHARE: Final = 0.1

# util/id.c id_wellformed(): qemu_isalpha()/qemu_isalnum() are ASCII-only.
_IDENTIFIER: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")

# util/id.c id_generate() starts generated ids with '#', which id_wellformed()
# rejects, so no client can ever choose an id that we generate later.
_GENERATED_PREFIX: Final = "#blocker"


# --------------------------------------------------------------------------- errors


class BlockerError(Exception):
    """A refused request.  ``str(exc)`` is QEMU's exact error desc.

    The registry knows nothing of the wire: the QMP session reports every
    ``BlockerError`` as class ``GenericError``, which is what QEMU uses for all
    of these refusals (``error_setg`` never sets another class on these paths).
    """

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class EmptyModes(BlockerError):
    """``modes: []``.  QEMU's C API cannot express an empty set of modes
    (``migrate_add_blocker_modes()`` needs at least one), so the QMP
    command rejects it in QEMU's ``QERR_INVALID_PARAMETER_VALUE`` style."""

    def __init__(self) -> None:
        super().__init__("Parameter 'modes' expects a non-empty list")


class InvalidId(BlockerError):
    """A client-chosen id that ``id_wellformed()`` rejects."""

    def __init__(self, id: str) -> None:
        super().__init__("Parameter 'id' expects an identifier")
        self.id = id


class DuplicateId(BlockerError):
    """A client-chosen id already in use (worded like ``Duplicate ID`` of qdev)."""

    def __init__(self, id: str) -> None:
        super().__init__(f"Duplicate blocker ID '{id}'")
        self.id = id


class OnlyMigratable(BlockerError):
    """``-only-migratable`` refuses a non-internal blocker of the ``normal``
    mode (``is_only_migratable()``, return ``-EACCES``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"disallowing migration blocker (--only-migratable) for: {reason}")
        self.reason = reason


class MigrationBusy(BlockerError):
    """A blocker cannot be added while a migration runs (``is_busy()``,
    return ``-EBUSY``); this applies to internal blockers too."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"disallowing migration blocker (migration/snapshot in progress) for: {reason}"
        )
        self.reason = reason


class NotFound(BlockerError):
    """``del-blocker`` of an id that is not registered."""

    def __init__(self, id: str) -> None:
        super().__init__(f"Blocker '{id}' not found")
        self.id = id


class MigrationBlocked(BlockerError):
    """``migrate`` refused: desc is the newest blocker's reason, verbatim
    (``migration_is_blocked()`` copies the head of the mode's list)."""

    def __init__(self, blocker: Blocker) -> None:
        super().__init__(blocker.reason)
        self.blocker = blocker


class MigrationInProgress(BlockerError):
    """``migrate`` or ``migrate-set-capabilities`` while a migration runs
    (``QERR_MIGRATION_ACTIVE``)."""

    def __init__(self) -> None:
        super().__init__("There's a migration process in progress")


class InvalidUri(BlockerError):
    """A migration URI with no scheme QEMU knows."""

    def __init__(self, uri: str) -> None:
        super().__init__("Parameter 'uri' expects a valid migration protocol")
        self.uri = uri


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Owner:
    """Peer credentials (``SO_PEERCRED``) of the connection that added a blocker."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Event:
    """A QMP event for the server to deliver.

    ``data`` is exactly the event's wire ``data`` member; ``timestamp`` is the
    wall time at which the registry queued it.
    """

    name: str
    data: dict[str, Any]
    timestamp: float


class _Link:
    """One blocker's place in one ordered list (a mode's, or the list of all).

    A doubly linked list gives O(1) worst-case insertion, removal and "newest"
    lookup; a dict keyed by id would leave dead slots that ``reversed()`` must
    skip after deletions, making "newest" O(deleted) until the next resize.
    """

    __slots__ = ("blocker", "newer", "older")

    def __init__(self, blocker: Blocker) -> None:
        self.blocker = blocker
        self.older: _Link | None = None
        self.newer: _Link | None = None


class _Chain:
    """An ordered list of blockers, oldest at one end, newest at the other."""

    __slots__ = ("count", "newest", "oldest")

    def __init__(self) -> None:
        self.oldest: _Link | None = None
        self.newest: _Link | None = None
        self.count = 0

    def push(self, link: _Link) -> None:
        link.older = self.newest
        link.newer = None
        if self.newest is None:
            self.oldest = link
        else:
            self.newest.newer = link
        self.newest = link
        self.count += 1

    def unlink(self, link: _Link) -> None:
        if link.older is None:
            self.oldest = link.newer
        else:
            link.older.newer = link.newer
        if link.newer is None:
            self.newest = link.older
        else:
            link.newer.older = link.older
        link.older = link.newer = None
        self.count -= 1

    def __iter__(self) -> Iterator[Blocker]:
        link = self.oldest
        while link is not None:
            yield link.blocker
            link = link.newer


@dataclass(slots=True, eq=False)
class Blocker:
    """One registered blocker.  Treat it as read-only: the registry indexes it.

    ``modes`` lists the modes it blocks in MigMode order.  ``internal`` only
    exempts it from ``-only-migratable`` (QEMU's ``migrate_add_blocker_internal``
    is for QEMU's own temporary blockers, such as dump-guest-memory's).
    ``connection`` is the server's connection object, kept so that a
    connection-scoped blocker can be released with it; identity, not equality,
    is what counts.
    """

    id: str
    reason: str
    modes: tuple[str, ...]
    internal: bool
    scope: str
    owner: Owner | None
    added: float
    connection: object | None = field(default=None, repr=False)
    # Index 0 is the link in the list of all blockers; then one per mode.
    _links: tuple[_Link, ...] = field(default=(), init=False, repr=False)

    def info(self) -> dict[str, Any]:
        """The blocker as ``BlockerInfo`` on the wire (members in schema order)."""
        info: dict[str, Any] = {
            "id": self.id,
            "reason": self.reason,
            "modes": list(self.modes),
            "internal": self.internal,
            "scope": self.scope,
        }
        if self.owner is not None:
            info["owner"] = {"pid": self.owner.pid, "uid": self.owner.uid, "gid": self.owner.gid}
        info["added"] = _timestamp(self.added)
        return info


def _timestamp(when: float) -> dict[str, int]:
    # Round to whole microseconds first and split afterwards, so that a value
    # such as 1.9999999 gives {2, 0} rather than {1, 1000000}.
    seconds, micro = divmod(round(when * 1_000_000), 1_000_000)
    return {"seconds": seconds, "microseconds": micro}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


# --------------------------------------------------------------------------- registry


class Registry:
    """The blockers of one daemon and the state of its (simulated) migration.

    ``modes`` are the MigMode members in schema order, taken from the generated
    schema so that a new mode needs no change here; it must include
    ``normal``.  ``only_migratable`` is QEMU's ``-only-migratable``, fixed for
    the registry's life.  ``migration_time`` is how long a simulated migration
    takes from ``setup`` to ``completed``, in seconds.

    Every command-level operation (``add``, ``delete``, ``release``,
    ``migrate``, ``cancel``, ``query_migrate``, ``set_mode``, ``set_events``,
    ``check_capabilities_settable`` and the ``status`` property) first applies
    the transitions already due, exactly as :meth:`advance`, so answers never
    depend on how promptly the server's timer fired, and the events of those
    transitions are queued before the operation's own.  Plain reads
    (``blockers``, ``newest``, ``get``, ``len``, ``mode``, ``events_enabled``,
    ``next_deadline``, ``take_events``) do not.
    """

    __slots__ = (
        "_all",
        "_by_connection",
        "_by_id",
        "_chains",
        "_changes",
        "_clock",
        "_complete_at",
        "_deadline",
        "_events",
        "_events_enabled",
        "_mode",
        "_mode_chain",
        "_modes",
        "_only_migratable",
        "_serial",
        "_setup_end",
        "_setup_ms",
        "_start",
        "_status",
        "_total_ms",
        "migration_time",
    )

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
        self.migration_time = float(migration_time)
        self._clock = clock

        self._all = _Chain()
        self._chains: dict[str, _Chain] = {mode: _Chain() for mode in self._modes}
        self._by_id: dict[str, Blocker] = {}
        # Keyed by id(connection): the server's connection objects need not be
        # hashable, and each indexed blocker holds a reference to its
        # connection, so the id cannot be reused while the entry exists.
        self._by_connection: dict[int, dict[str, Blocker]] = {}
        self._serial = 0
        self._changes = 0

        self._mode = DEFAULT_MODE
        self._mode_chain = self._chains[DEFAULT_MODE]
        self._events_enabled = False
        self._events: list[Event] = []

        self._status: str | None = None
        self._start = 0.0
        self._setup_end = 0.0
        self._complete_at = 0.0
        self._setup_ms = 0
        self._total_ms = 0
        self._deadline: float | None = None

    # ----------------------------------------------------------------- settings

    @property
    def clock(self) -> Clock:
        """The clock this registry reads (the server arms its timer with it)."""
        return self._clock

    @property
    def modes(self) -> tuple[str, ...]:
        """The MigMode members this registry was built with, in schema order."""
        return self._modes

    @property
    def only_migratable(self) -> bool:
        """QEMU's ``-only-migratable``: refuse non-internal ``normal`` blockers."""
        return self._only_migratable

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
        self.advance()
        chain = self._chains.get(mode)
        if chain is None:
            raise ValueError(f"unknown MigMode {mode!r}")
        self._mode = mode
        self._mode_chain = chain

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
        self.advance()
        if self._status in RUNNING_STATUSES:
            raise MigrationInProgress()

    def set_events(self, on: bool) -> None:
        """``migrate-set-capabilities`` for ``events``.

        Like QEMU, refused while a migration runs (:class:`MigrationInProgress`).
        """
        self.check_capabilities_settable()
        self._events_enabled = on

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

        Argument errors come first (:class:`EmptyModes`, :class:`InvalidId`,
        :class:`DuplicateId`), as QMP reports them before a command has any
        effect; then QEMU's own order: :class:`OnlyMigratable` (only for a
        non-internal blocker whose modes include ``normal``), then
        :class:`MigrationBusy` (internal blockers too).  A refused blocker is not
        registered.  ``modes=None`` means every mode; duplicates in ``modes``
        collapse, as in QEMU's bit set.  Queues BLOCKER_ADDED.
        """
        self.advance()
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        if scope == "connection" and connection is None:
            raise ValueError("a connection-scoped blocker needs its connection")
        if modes is None:
            wanted = self._modes
        else:
            if not modes:
                raise EmptyModes()
            requested = set(modes)
            unknown = requested.difference(self._chains)
            if unknown:
                raise ValueError(f"unknown MigMode {sorted(unknown)!r}")
            wanted = tuple(mode for mode in self._modes if mode in requested)
        if id is not None:
            if _IDENTIFIER.fullmatch(id) is None:
                raise InvalidId(id)
            if id in self._by_id:
                raise DuplicateId(id)
        if self._only_migratable and not internal and DEFAULT_MODE in wanted:
            raise OnlyMigratable(reason)
        if self._status in RUNNING_STATUSES:
            raise MigrationBusy(reason)

        if id is None:
            id = f"{_GENERATED_PREFIX}{self._serial}"
            self._serial += 1
        blocker = Blocker(
            id=id,
            reason=reason,
            modes=wanted,
            internal=internal,
            scope=scope,
            owner=owner,
            added=self._clock.time(),
            connection=connection,
        )
        links = [_Link(blocker)]
        self._all.push(links[0])
        for mode in wanted:
            link = _Link(blocker)
            self._chains[mode].push(link)
            links.append(link)
        blocker._links = tuple(links)
        self._by_id[id] = blocker
        self._changes += 1
        if scope == "connection":
            self._by_connection.setdefault(_key(connection), {})[id] = blocker
        self._emit("BLOCKER_ADDED", blocker.info())
        return blocker

    def delete(self, id: str) -> Blocker:
        """``migrate_del_blocker()``: remove a blocker from every mode's list.

        Allowed while a migration runs.  Unknown id: :class:`NotFound`.
        Queues BLOCKER_DELETED with cause ``command``.
        """
        self.advance()
        blocker = self._by_id.get(id)
        if blocker is None:
            raise NotFound(id)
        self._remove(blocker, "command")
        return blocker

    def release(self, connection: object) -> list[Blocker]:
        """Remove the connection-scoped blockers ``connection`` added, oldest first.

        The server calls this when the connection closes.  Queues one
        BLOCKER_DELETED per blocker, with cause ``connection-closed``.
        Daemon-scoped blockers the connection added stay.
        """
        self.advance()
        owned = self._by_connection.get(_key(connection))
        if not owned:
            return []
        released = list(owned.values())
        for blocker in released:
            self._remove(blocker, "connection-closed")
        return released

    def get(self, id: str) -> Blocker | None:
        """The blocker with this id, if registered."""
        return self._by_id.get(id)

    def blockers(self, mode: str | None = None) -> list[Blocker]:
        """Registered blockers, oldest first; with ``mode``, only those blocking it."""
        if mode is None:
            return list(self._all)
        chain = self._chains.get(mode)
        if chain is None:
            raise ValueError(f"unknown MigMode {mode!r}")
        return list(chain)

    def newest(self, mode: str | None = None) -> Blocker | None:
        """The blocker ``migrate`` would quote in ``mode`` (default: current mode)."""
        chain = self._mode_chain if mode is None else self._chains[mode]
        return None if chain.newest is None else chain.newest.blocker

    @property
    def changes(self) -> int:
        """Counts every addition and removal: a cached listing is stale once it moves."""
        return self._changes

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, id: object) -> bool:
        return id in self._by_id

    def _remove(self, blocker: Blocker, cause: str) -> None:
        del self._by_id[blocker.id]
        self._changes += 1
        links = blocker._links
        self._all.unlink(links[0])
        for mode, link in zip(blocker.modes, links[1:], strict=True):
            self._chains[mode].unlink(link)
        blocker._links = ()
        if blocker.scope == "connection":
            key = _key(blocker.connection)
            owned = self._by_connection[key]
            del owned[blocker.id]
            if not owned:
                del self._by_connection[key]
        self._emit("BLOCKER_DELETED", {"id": blocker.id, "cause": cause})

    # ----------------------------------------------------------------- migration

    @property
    def status(self) -> str | None:
        """The migration's ``MigrationStatus``; None before the first migration
        (QEMU's ``none``, which ``query-migrate`` does not show)."""
        self.advance()
        return self._status

    def migrate(self, uri: str) -> None:
        """``migrate``: start a simulated migration to ``uri``.

        Checks, in QEMU 8.2+'s order: the URI's scheme (:class:`InvalidUri`),
        a migration already running (:class:`MigrationInProgress`), then the
        current mode's list (:class:`MigrationBlocked`, quoting the newest
        blocker).  Every refusal leaves the state untouched and queues nothing.
        On success the status becomes ``setup`` (MIGRATION event when enabled).
        """
        self.advance()
        if not uri.startswith(URI_SCHEMES):
            raise InvalidUri(uri)
        if self._status in RUNNING_STATUSES:
            raise MigrationInProgress()
        newest = self._mode_chain.newest
        if newest is not None:
            raise MigrationBlocked(newest.blocker)
        now = self._clock.monotonic()
        self._start = now
        self._setup_end = now + self.migration_time * SETUP_SHARE
        self._complete_at = now + self.migration_time
        # QEMU resets setup_time in migrate_init(); it is 0 until setup ends.
        self._setup_ms = 0
        self._total_ms = 0
        self._deadline = self._setup_end
        self._set_status("setup")

    def cancel(self) -> None:
        """``migrate_cancel``: nothing happens unless a migration runs.

        A running migration goes to ``cancelling`` at once (its MIGRATION event
        precedes the command's reply, as in QEMU) and to ``cancelled`` at the
        next :meth:`advance`: the deadline is now, because nothing real has to
        be torn down.  Since every operation advances first, ``cancelling`` is
        never seen by a later command, and QEMU's repeated ``cancelling`` event
        for a second cancel cannot occur.
        """
        self.advance()
        if self._status not in RUNNING_STATUSES:
            return
        self._deadline = self._clock.monotonic()
        self._set_status("cancelling")

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``'s ``MigrationInfo``, like ``fill_source_migration_info()``.

        ``status`` is absent before the first migration.  ``setup`` shows only
        the status; ``active`` adds ``total-time`` (elapsed so far) and
        ``setup-time``; ``completed`` adds the final ``total-time`` and
        ``setup-time``; ``cancelled`` and ``failed`` show only the status.
        (QEMU shows times for ``cancelling`` too, but no command here can
        observe that status: see :meth:`cancel`.)  ``blocked-reasons``
        (oldest first) is present exactly when the current mode's list is
        non-empty, whatever the status.  Times are in milliseconds.
        """
        self.advance()
        info: dict[str, Any] = {}
        status = self._status
        if status is not None:
            info["status"] = status
            if status == "completed":
                info["total-time"] = self._total_ms
                info["setup-time"] = self._setup_ms
            elif status == "active":
                info["total-time"] = _ms(self._clock.monotonic() - self._start)
                info["setup-time"] = self._setup_ms
        if self._mode_chain.count:
            info["blocked-reasons"] = [blocker.reason for blocker in self._mode_chain]
        return info

    def next_deadline(self) -> float | None:
        """Monotonic time of the next simulated-migration transition, if any."""
        return self._deadline

    def advance(self) -> None:
        """Apply every transition due at ``clock.monotonic()``, queueing events.

        Each transition happens at its own deadline, so ``setup-time`` and
        ``total-time`` do not depend on how late this is called.
        """
        deadline = self._deadline
        if deadline is None:
            return
        now = self._clock.monotonic()
        while deadline is not None and deadline <= now:
            if self._status == "setup":
                self._setup_ms = _ms(deadline - self._start)
                deadline = self._complete_at
                self._set_status("active")
            elif self._status == "active":
                self._total_ms = _ms(deadline - self._start)
                deadline = None
                self._set_status("completed")
            else:
                # Only "cancelling" has a deadline besides the two above.
                deadline = None
                self._set_status("cancelled")
            self._deadline = deadline

    def take_events(self) -> list[Event]:
        """Drain the queued events, oldest first."""
        if not self._events:  # most commands cause none: allocate nothing
            return []
        events, self._events = self._events, []
        return events

    def _set_status(self, status: str) -> None:
        self._status = status
        # migrate_generate_event() reads the capability at each transition.
        if self._events_enabled:
            self._emit("MIGRATION", {"status": status})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self._events.append(Event(name, data, self._clock.time()))


def _key(connection: object) -> int:
    return id(connection)

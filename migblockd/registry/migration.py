"""The simulated migration: QEMU's ``MigrationStatus`` state machine, driven by a clock.

Without ``--qemu`` nothing real is migrated: ``migrate`` runs this simulation
(``setup`` -> ``active`` -> ``completed``, or through ``cancelling`` to
``cancelled``) so that blockers, ``query-migrate`` and ``MIGRATION`` events
behave as QEMU's do.  Time only moves when the caller says so
(:meth:`SimulatedMigration.advance`); reads never change anything.
:func:`check_destination` judges where a ``migrate`` would go, as QEMU does
before it starts one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from migblockd.registry.errors import InvalidDestination, InvalidUri

__all__ = [
    "AT_REST",
    "MIGRATION_STATUSES",
    "RUNNING_STATUSES",
    "SETUP_SHARE",
    "URI_SCHEMES",
    "SimulatedMigration",
    "check_destination",
    "is_running",
]

#: QEMU's ``MigrationStatus`` members, in QEMU's order (``qapi/migration.json``).
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

#: The statuses at rest: no migration, or one that has ended.
AT_REST: Final[frozenset[str]] = frozenset({"none", "cancelled", "completed", "failed"})

#: ``migration_is_running()`` as of QEMU 10.x: every status but the four at
#: rest.  QEMU 9.0 refused blockers with ``!migration_is_idle()``, which also
#: counted ``colo``; 9.1 merged the two predicates, so one set serves both the
#: add-blocker busy check and the ``migrate`` in-progress check.
RUNNING_STATUSES: Final[frozenset[str]] = frozenset(MIGRATION_STATUSES) - AT_REST


def is_running(status: str | None) -> bool:
    """Whether a migration in ``status`` runs, as ``migration_is_running()`` judges
    it; None (QEMU's ``none``, which ``query-migrate`` leaves out) is at rest.

    A status not in ``MIGRATION_STATUSES`` (one a newer QEMU added) counts as
    running: judged wrongly the other way, it would let a blocker be refused no
    more, or a second migration start, while QEMU migrates; this way, an
    ``add-blocker`` is refused until that migration is seen to end."""
    return status is not None and status not in AT_REST

#: URI prefixes ``migrate_uri_parse()`` recognises.  The simulation checks only
#: the scheme: nothing is connected to, so what follows the colon is not parsed.
URI_SCHEMES: Final[tuple[str, ...]] = ("tcp:", "unix:", "exec:", "fd:", "file:", "rdma:", "vsock:")

_NO_CPR: Final = "missing 'cpr' migration channel"


def check_destination(uri: str | None, channels: Sequence[Mapping[str, Any]] | None,
                      mode: str) -> None:
    """Where to, as QEMU's ``qmp_migrate()`` checks it before ``migrate_prepare()``
    (``migration_channel_parse_input()`` in ``migration/channel.c``, then
    ``migration_transport_compatible()`` in ``migration/migration.c``): exactly one
    of ``uri`` and ``channels`` (an empty list is none, as in QEMU); of channels, at
    most one of each type, in ``cpr-transfer`` ``mode`` a ``cpr`` one, then a
    ``main`` one; of a URI, a scheme QEMU knows (:class:`InvalidUri`); then, in
    ``cpr-transfer`` mode, a main address that is not a file (a ``file:`` URI or
    ``transport: file``).  ``channels``' addresses are QEMU's QAPI shapes
    (:mod:`migblockd.qmp.addresses` checked them); the rest of an address, and of a
    URI after its scheme, is QEMU's to judge: the simulation goes nowhere.
    """
    channels = channels or None
    if (uri is None) == (channels is None):
        raise InvalidDestination("need either 'uri' or 'channels' argument")
    transport: object = None  # the main address's, as far as the simulation needs it
    if channels is not None:
        types: list[str] = []
        for channel in channels:
            kind = str(channel["channel-type"])
            if kind in types:
                raise InvalidDestination(f"Channel list has more than one {kind} entry")
            types.append(kind)
            addr = channel.get("addr")
            if kind == "main" and isinstance(addr, Mapping):
                transport = addr.get("transport")
        if mode == "cpr-transfer" and "cpr" not in types:
            raise InvalidDestination(_NO_CPR)
        # QEMU 10.0 and later dereference the absent main channel first (master's
        # QAPI_CLONE() of NULL is NULL) and crash: its message is what it means.
        if "main" not in types:
            raise InvalidDestination("Channel list has no main entry")
    elif uri is not None:
        if not uri.startswith(URI_SCHEMES):
            raise InvalidUri(uri)
        transport = "file" if uri.startswith("file:") else None
    # migration_channels_and_transport_compatible(): cpr-transfer leaves guest RAM
    # in place for a QEMU that runs at the same time, so the stream cannot go to a file.
    if mode == "cpr-transfer" and transport == "file":
        raise InvalidDestination("Migration requires streamable transport (eg unix)")
    # A URI names no cpr channel.  QEMU 10.x says so here; master no longer checks,
    # and asserts in cpr_state_save() once migrate_prepare() passed.
    if mode == "cpr-transfer" and uri is not None:
        raise InvalidDestination(_NO_CPR)


#: Fraction of the migration time spent in ``setup`` before ``active``.  A real
#: setup phase (connecting, sending the device list) is short next to RAM
#: transfer; a tenth keeps both phases observable in tests.
SETUP_SHARE: Final = 0.1


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class SimulatedMigration:
    """One migration at a time, on monotonic time.

    ``duration`` is how long a migration takes from ``setup`` to
    ``completed``, in seconds.  Every method that changes the status returns
    the statuses it went through, oldest first, for the caller to announce.
    """

    __slots__ = ("_complete_at", "_deadline", "_setup_ms", "_start", "_status", "_total_ms",
                 "duration")

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self._status: str | None = None
        self._start = 0.0
        self._complete_at = 0.0
        self._setup_ms = 0
        self._total_ms = 0
        self._deadline: float | None = None

    @property
    def status(self) -> str | None:
        """The ``MigrationStatus``; None before the first migration (QEMU's
        ``none``, which ``query-migrate`` does not show)."""
        return self._status

    @property
    def running(self) -> bool:
        return is_running(self._status)

    @property
    def deadline(self) -> float | None:
        """Monotonic time of the next transition, if any."""
        return self._deadline

    def start(self, now: float) -> list[str]:
        """Enter ``setup`` (the caller checked that nothing runs)."""
        self._start = now
        self._complete_at = now + self.duration
        # QEMU resets setup_time in migrate_init(); it is 0 until setup ends.
        self._setup_ms = 0
        self._total_ms = 0
        self._deadline = now + self.duration * SETUP_SHARE
        self._status = "setup"
        return ["setup"]

    def cancel(self, now: float) -> list[str]:
        """``migrate_cancel``: nothing happens unless a migration runs.

        A running migration goes to ``cancelling`` at once and to ``cancelled``
        at the next :meth:`advance`: the deadline is now, because nothing real
        has to be torn down.  Since the core advances before every command,
        ``cancelling`` is never seen by a later command, and QEMU's repeated
        ``cancelling`` event for a second cancel cannot occur.
        """
        if not self.running:
            return []
        self._deadline = now
        self._status = "cancelling"
        return ["cancelling"]

    def advance(self, now: float) -> list[str]:
        """Apply every transition due at ``now``.

        Each transition happens at its own deadline, so ``setup-time`` and
        ``total-time`` do not depend on how late this is called.
        """
        passed: list[str] = []
        deadline = self._deadline
        while deadline is not None and deadline <= now:
            if self._status == "setup":
                self._setup_ms = _ms(deadline - self._start)
                deadline = self._complete_at
                self._status = "active"
            elif self._status == "active":
                self._total_ms = _ms(deadline - self._start)
                deadline = None
                self._status = "completed"
            else:
                # Only "cancelling" has a deadline besides the two above.
                deadline = None
                self._status = "cancelled"
            self._deadline = deadline
            passed.append(self._status)
        return passed

    def info(self, now: float) -> dict[str, Any]:
        """The status part of ``query-migrate``'s ``MigrationInfo``
        (``fill_source_migration_info()``).

        No ``status`` before the first migration.  ``setup`` shows only the
        status; ``active`` adds ``total-time`` (elapsed so far) and
        ``setup-time``; ``completed`` the final ``total-time`` and
        ``setup-time``; ``cancelled`` and ``failed`` only the status.  (QEMU
        shows times for ``cancelling`` too, but no command can observe that
        status: see :meth:`cancel`.)  Times are in milliseconds.
        """
        info: dict[str, Any] = {}
        status = self._status
        if status is not None:
            info["status"] = status
            if status == "completed":
                info["total-time"] = self._total_ms
                info["setup-time"] = self._setup_ms
            elif status == "active":
                info["total-time"] = _ms(now - self._start)
                info["setup-time"] = self._setup_ms
        return info

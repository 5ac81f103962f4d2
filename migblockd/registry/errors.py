"""The registry's refusals.  ``str(exc)`` of each is QEMU's exact error desc.

The registry knows nothing of the wire: the core reports every
:class:`BlockerError` as class ``GenericError``, which is what QEMU uses for
all of these refusals (``error_setg`` never sets another class on these
paths, ``migration/migration.c``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from migblockd.registry.blockers import Blocker

__all__ = [
    "BlockerError",
    "DuplicateId",
    "EmptyModes",
    "EmptyReason",
    "IdTooLong",
    "InvalidId",
    "InvalidUri",
    "MigrationBlocked",
    "MigrationBusy",
    "MigrationInProgress",
    "NoPausedMigration",
    "NotFound",
    "OnlyMigratable",
]


class BlockerError(Exception):
    """A refused request.  ``str(exc)`` is QEMU's exact error desc."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class EmptyModes(BlockerError):
    """``modes: []``.  QEMU's C API cannot express an empty set of modes
    (``migrate_add_blocker_modes()`` needs at least one), so the QMP
    command rejects it in QEMU's ``QERR_INVALID_PARAMETER_VALUE`` style."""

    def __init__(self) -> None:
        super().__init__("Parameter 'modes' expects a non-empty list")


class EmptyReason(BlockerError):
    """``reason: ""``: ``migrate`` would then fail with an empty desc, which
    tells the operator nothing (QEMU's callers always pass a message)."""

    def __init__(self) -> None:
        super().__init__("Parameter 'reason' expects a non-empty string")


class InvalidId(BlockerError):
    """A client-chosen id that ``id_wellformed()`` rejects."""

    def __init__(self, id: str) -> None:
        super().__init__("Parameter 'id' expects an identifier")
        self.id = id


class IdTooLong(InvalidId):
    """A client-chosen id longer than ``MAX_ID_LENGTH``.  QEMU's ids have no
    bound, but ours are logged, listed and stored: a megabyte id costs every
    reader.  Worded like QEMU's ``QERR_INVALID_PARAMETER_VALUE``."""

    def __init__(self, id: str, limit: int) -> None:
        BlockerError.__init__(
            self, f"Parameter 'id' expects an identifier of at most {limit} characters")
        self.id = id


class DuplicateId(BlockerError):
    """A client-chosen id already in use (worded like ``Duplicate ID`` of qdev).

    ``holder``: whose it is, when not the asking uid's (the server words it),
    so that an agent re-adding its blocker after a reconnection can tell its
    own from one another uid took first.
    """

    def __init__(self, id: str, holder: str | None = None) -> None:
        super().__init__(f"Duplicate blocker ID '{id}'"
                         + (f", which belongs to {holder}" if holder else ""))
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


class NoPausedMigration(BlockerError):
    """``migrate`` with ``resume`` when no postcopy migration is paused (QEMU's
    migrate_prepare(); the simulation never pauses one)."""

    def __init__(self) -> None:
        super().__init__("Cannot resume if there is no paused migration")


class InvalidDestination(BlockerError):
    """``migrate``'s ``uri`` and ``channels`` do not name one destination
    (``qmp_migrate()``'s checks before ``migrate_prepare()``, QEMU 10)."""


class InvalidUri(BlockerError):
    """A migration URI with no scheme QEMU knows (``migrate_uri_parse()``, QEMU 8.2
    and later; 7.2 said ``Parameter 'uri' expects a valid migration protocol``, once
    ``migrate_prepare()``'s checks had passed)."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"unknown migration protocol: {uri}")
        self.uri = uri

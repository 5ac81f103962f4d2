"""QEMU's migration blocker registry and a simulated migration, as pure domain logic.

``errors``: the refusals, worded as QEMU words them; ``blockers``: the store
of per-mode lists; ``ids``: chosen and generated blocker ids; ``migration``:
the simulated migration's state machine; ``changes``: events for clients and
changes for the disk; ``registry``: QEMU's rules over all of them, with
``control``: the registry's migration parameters and commands.  Nothing here
does I/O.
"""

from migblockd.clock import SYSTEM_CLOCK, Clock, FakeClock
from migblockd.registry.blockers import Blocker, Owner
from migblockd.registry.changes import Change, Event
from migblockd.registry.errors import (
    BlockerError,
    DuplicateId,
    EmptyModes,
    EmptyReason,
    IdTooLong,
    InvalidDestination,
    InvalidId,
    InvalidUri,
    MigrationBlocked,
    MigrationBusy,
    MigrationInProgress,
    NoPausedMigration,
    NotFound,
    OnlyMigratable,
)
from migblockd.registry.ids import ID_CHUNK, MAX_ID_LENGTH
from migblockd.registry.migration import (
    MIGRATION_STATUSES,
    RUNNING_STATUSES,
    SETUP_SHARE,
    URI_SCHEMES,
    is_running,
)
from migblockd.registry.registry import DEFAULT_MODE, SCOPES, Registry, only_migratable_refuses

__all__ = [
    "DEFAULT_MODE",
    "ID_CHUNK",
    "MAX_ID_LENGTH",
    "MIGRATION_STATUSES",
    "RUNNING_STATUSES",
    "SCOPES",
    "SETUP_SHARE",
    "SYSTEM_CLOCK",
    "URI_SCHEMES",
    "Blocker",
    "BlockerError",
    "Change",
    "Clock",
    "DuplicateId",
    "EmptyModes",
    "EmptyReason",
    "Event",
    "FakeClock",
    "IdTooLong",
    "InvalidDestination",
    "InvalidId",
    "InvalidUri",
    "MigrationBlocked",
    "MigrationBusy",
    "MigrationInProgress",
    "NoPausedMigration",
    "NotFound",
    "OnlyMigratable",
    "Owner",
    "Registry",
    "is_running",
    "only_migratable_refuses",
]

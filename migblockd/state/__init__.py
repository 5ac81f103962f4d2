"""The daemon's durable state: daemon-scoped blockers and client settings in SQLite.

``records``: the rows and changes, as plain values; ``schema``: the file's
format and its versions; ``lock``: one daemon per state directory;
``opening``: the directory and the file checked at start, and
``migration``: created or migrated then; ``store``: :class:`Store`, which
opens, loads and commits, and recovers from a commit that failed.  Pure
storage: no asyncio and no registry rules (the core decides what to store).
"""

from migblockd.state.directory import DATABASE_NAME
from migblockd.state.errors import StateError, Unsettled
from migblockd.state.records import BlockerRow, Change, Delete, Put, Setting, Snapshot
from migblockd.state.store import Store

__all__ = [
    "DATABASE_NAME",
    "BlockerRow",
    "Change",
    "Delete",
    "Put",
    "Setting",
    "Snapshot",
    "StateError",
    "Store",
    "Unsettled",
]

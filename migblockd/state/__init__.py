"""The daemon's durable state: daemon-scoped blockers and client settings in SQLite.

``records``: the rows and changes, as plain values; ``schema``: the file's
format and its versions; ``lock``: one daemon per state directory;
``store``: :class:`Store`, which opens, checks, loads and commits.  Pure
storage: no asyncio and no registry rules (the core decides what to store).
"""

from migblockd.state.errors import StateError
from migblockd.state.records import BlockerRow, Change, Delete, Put, Setting, Snapshot
from migblockd.state.store import DATABASE_NAME, Store

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
]

"""The database's format: its tables, how rows are encoded, and its versions.

The file identifies itself with ``PRAGMA application_id`` (so a database of
another program is never mistaken for ours) and carries its format version
in ``PRAGMA user_version``.  :data:`MIGRATIONS` holds one step per version:
``MIGRATIONS[n]`` takes a version-``n`` database to version ``n + 1``, and
version 0 is SQLite's empty database, so creating a new state file is simply
migrating it from 0.  A later format appends a step (``ALTER TABLE``, data
fixes) and never edits an old one.

Tables are ``WITHOUT ROWID``: keyed by their text key, one B-tree each, so a
change writes fewer pages than a rowid table with a separate key index.
Modes and setting values are JSON text, readable with the ``sqlite3`` shell.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
from collections.abc import Callable, Sequence
from typing import Final

from migblockd.state.records import BlockerRow

__all__ = [
    "APPLICATION_ID",
    "DELETE_SQL",
    "MIGRATIONS",
    "PUT_SQL",
    "SELECT_BLOCKERS_SQL",
    "SELECT_SETTINGS_SQL",
    "SETTING_SQL",
    "Migration",
    "Params",
    "decode_row",
    "decode_setting",
    "encode_row",
]

#: ``PRAGMA application_id``: "mgbd" in ASCII.
APPLICATION_ID: Final = 0x6D676264

#: A step from one format version to the next, run inside the migration's
#: transaction (the caller sets ``user_version``).
Migration = Callable[[sqlite3.Connection], None]


def _create_v1(conn: sqlite3.Connection) -> None:
    """Version 1, from an empty database."""
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("""
        CREATE TABLE blocker (
            id        TEXT PRIMARY KEY NOT NULL,
            seq       INTEGER NOT NULL,
            reason    TEXT NOT NULL,
            modes     TEXT NOT NULL CHECK (modes <> '[]'),
            internal  INTEGER NOT NULL CHECK (internal IN (0, 1)),
            owner_pid INTEGER,
            owner_uid INTEGER,
            owner_gid INTEGER,
            added     REAL NOT NULL,
            CHECK ((owner_pid IS NULL) = (owner_uid IS NULL)
                   AND (owner_uid IS NULL) = (owner_gid IS NULL))
        ) WITHOUT ROWID""")
    conn.execute("""
        CREATE TABLE setting (
            key   TEXT PRIMARY KEY NOT NULL,
            value TEXT NOT NULL
        ) WITHOUT ROWID""")


MIGRATIONS: Final[Sequence[Migration]] = (_create_v1,)

_COLUMNS = "id, seq, reason, modes, internal, owner_pid, owner_uid, owner_gid, added"
PUT_SQL: Final = f"INSERT OR REPLACE INTO blocker ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
DELETE_SQL: Final = "DELETE FROM blocker WHERE id = ?"
SETTING_SQL: Final = "INSERT OR REPLACE INTO setting (key, value) VALUES (?, ?)"
SELECT_BLOCKERS_SQL: Final = f"SELECT {_COLUMNS} FROM blocker ORDER BY seq, id"
SELECT_SETTINGS_SQL: Final = "SELECT key, value FROM setting ORDER BY key"

Params = tuple[object, ...]


def encode_row(row: BlockerRow) -> Params:
    """``row`` as the parameters of :data:`PUT_SQL`."""
    pid, uid, gid = row.owner if row.owner is not None else (None, None, None)
    return (row.id, row.seq, row.reason, _modes_json(row.modes), int(row.internal),
            pid, uid, gid, row.added)


@functools.lru_cache(maxsize=64)
def _modes_json(modes: tuple[str, ...]) -> str:
    # A group encodes a row per change: a json.dumps each was a fifth of the
    # commit thread's Python time.  Modes are names of one enum: few lists.
    return json.dumps(list(modes))


def decode_row(values: Sequence[object]) -> BlockerRow:
    """A row of :data:`SELECT_BLOCKERS_SQL`; ValueError says what is wrong with it.

    SQLite keeps whatever type a value was written with, so a file edited by
    hand could hold anything: check every field rather than trust it.
    """
    id, seq, reason, modes_json, internal, pid, uid, gid, added = values
    if not isinstance(id, str):
        raise ValueError(f"blocker id {id!r} is not text")
    where = f"blocker {id!r}"
    if not isinstance(seq, int):
        raise ValueError(f"{where}: seq {seq!r} is not an integer")
    if not isinstance(reason, str):
        raise ValueError(f"{where}: reason is not text")
    try:
        modes = json.loads(modes_json) if isinstance(modes_json, str) else None
    except ValueError:
        modes = None
    if not (isinstance(modes, list) and modes and all(isinstance(m, str) for m in modes)):
        raise ValueError(f"{where}: modes {modes_json!r} is not a list of names")
    if internal not in (0, 1):
        raise ValueError(f"{where}: internal {internal!r} is not 0 or 1")
    owner: tuple[int, int, int] | None
    if pid is None and uid is None and gid is None:
        owner = None
    elif isinstance(pid, int) and isinstance(uid, int) and isinstance(gid, int):
        owner = (pid, uid, gid)
    else:
        raise ValueError(f"{where}: owner {(pid, uid, gid)!r} is not three integers")
    if not (isinstance(added, (int, float)) and math.isfinite(added)):
        raise ValueError(f"{where}: added {added!r} is not a time")
    return BlockerRow(id=id, reason=reason, modes=tuple(modes), internal=bool(internal),
                      owner=owner, added=float(added), seq=seq)


def decode_setting(key: object, value: object) -> tuple[str, object]:
    """A row of :data:`SELECT_SETTINGS_SQL`; ValueError says what is wrong with it."""
    if not isinstance(key, str):
        raise ValueError(f"setting key {key!r} is not text")
    if not isinstance(value, str):
        raise ValueError(f"setting {key!r} is not JSON text")
    try:
        return key, json.loads(value)
    except ValueError:
        raise ValueError(f"setting {key!r} is not JSON: {value!r}") from None

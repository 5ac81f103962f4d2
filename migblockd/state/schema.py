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

Formats: 1, the first; 2 (:func:`_every_mode_v2`), a blocker's ``modes`` NULL
for one that blocks every mode (QEMU's ``MIG_MODE_ALL``, ``add-blocker``
without ``modes``): every mode of the schema it is restored with, including
modes added since.  Format 1 stored such a blocker as the list of the modes
of its day, so one of its rows that names all of :data:`FORMAT_1_MODES` is
read as every mode: the reading that blocks more, for a gate.
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
    "COUNT_BLOCKERS_SQL",
    "DELETE_SQL",
    "FORMAT_1_MODES",
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

_COLUMNS = "id, seq, reason, modes, internal, owner_pid, owner_uid, owner_gid, added"

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


#: MigMode of migblockd's schema while it wrote format 1 (schema/migration.json
#: from 0.1.0 on, until format 2).
FORMAT_1_MODES: Final = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")


def _every_mode_v2(conn: sqlite3.Connection) -> None:
    """Version 2: ``modes`` may be NULL, for a blocker of every mode.

    The table is made again, as SQLite's ALTER TABLE cannot drop a NOT NULL
    (https://sqlite.org/lang_altertable.html#otheralter).  A row whose modes
    are a JSON list naming each of :data:`FORMAT_1_MODES` once (and maybe
    modes a custom schema added) becomes NULL: format 1 kept "every mode" and
    "these modes, all of them" alike.  Any other value is copied as it is, for
    the start to refuse or take as before.
    """
    conn.execute("""
        CREATE TABLE blocker_v2 (
            id        TEXT PRIMARY KEY NOT NULL,
            seq       INTEGER NOT NULL,
            reason    TEXT NOT NULL,
            modes     TEXT CHECK (modes <> '[]'),  -- NULL (which passes): every mode
            internal  INTEGER NOT NULL CHECK (internal IN (0, 1)),
            owner_pid INTEGER,
            owner_uid INTEGER,
            owner_gid INTEGER,
            added     REAL NOT NULL,
            CHECK ((owner_pid IS NULL) = (owner_uid IS NULL)
                   AND (owner_uid IS NULL) = (owner_gid IS NULL))
        ) WITHOUT ROWID""")
    conn.execute(f"INSERT INTO blocker_v2 ({_COLUMNS}) SELECT {_COLUMNS} FROM blocker")
    # As bytes: text a hand edit left that is not UTF-8 is the start's to refuse.
    every = [(key,) for key, modes in conn.execute(
        "SELECT CAST(id AS BLOB), CAST(modes AS BLOB) FROM blocker_v2 "
        "WHERE typeof(modes) = 'text'") if _names_every_format_1_mode(modes)]
    conn.executemany("UPDATE blocker_v2 SET modes = NULL WHERE id = CAST(? AS TEXT)", every)
    conn.execute("DROP TABLE blocker")
    conn.execute("ALTER TABLE blocker_v2 RENAME TO blocker")


def _names_every_format_1_mode(modes: bytes) -> bool:
    try:
        names = json.loads(modes)
    except ValueError:  # also UnicodeDecodeError
        return False
    return (isinstance(names, list) and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names) and set(FORMAT_1_MODES) <= set(names))


MIGRATIONS: Final[Sequence[Migration]] = (_create_v1, _every_mode_v2)

PUT_SQL: Final = f"INSERT OR REPLACE INTO blocker ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
DELETE_SQL: Final = "DELETE FROM blocker WHERE id = ?"
SETTING_SQL: Final = "INSERT OR REPLACE INTO setting (key, value) VALUES (?, ?)"
SELECT_BLOCKERS_SQL: Final = f"SELECT {_COLUMNS} FROM blocker ORDER BY seq, id"
SELECT_SETTINGS_SQL: Final = "SELECT key, value FROM setting ORDER BY key"
COUNT_BLOCKERS_SQL: Final = "SELECT count(*) FROM blocker"

Params = tuple[object, ...]


def encode_row(row: BlockerRow) -> Params:
    """``row`` as the parameters of :data:`PUT_SQL`."""
    pid, uid, gid = row.owner if row.owner is not None else (None, None, None)
    modes = None if row.modes is None else _modes_json(row.modes)
    return (row.id, row.seq, row.reason, modes, int(row.internal),
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
    modes: tuple[str, ...] | None = None  # NULL: every mode
    if modes_json is not None:
        try:
            names = json.loads(modes_json) if isinstance(modes_json, str) else None
        except ValueError:
            names = None
        if not (isinstance(names, list) and names and all(isinstance(m, str) for m in names)):
            raise ValueError(f"{where}: modes {modes_json!r} is not a list of names")
        modes = tuple(names)
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
    return BlockerRow(id=id, reason=reason, modes=modes, internal=bool(internal),
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

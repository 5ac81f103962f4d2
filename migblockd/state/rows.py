"""What the store reads and writes, as SQL: everything stored, read as one
:class:`~migblockd.state.records.Snapshot`, and a group of changes turned
into the fewest statements that apply it.

Both are here, apart from the store's handling of commits and of its files,
because both are only the format (:mod:`migblockd.state.schema`) put to use:
reading turns what is not the daemon's (text that is not UTF-8, a value the
format does not allow) into a :class:`StateError` that names the file and
what to do, and encoding happens before the transaction begins, so that a
bad value fails without touching the database.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

from migblockd.state import schema
from migblockd.state.errors import StateError, one_line, open_failed
from migblockd.state.records import BlockerRow, Change, Delete, Put, Setting, Snapshot

__all__ = ["CHUNK", "Progress", "Statements", "read_snapshot", "statements"]

#: SQL statements, each with the rows of parameters it is run with.
Statements: TypeAlias = list[tuple[str, list[schema.Params]]]


#: Rows read and decoded between two calls of :func:`read_snapshot`'s ``progress``.
CHUNK = 10_000

#: ``progress(done, total)``: rows read so far, of how many.
Progress: TypeAlias = Callable[[int, int], None]


def read_snapshot(conn: sqlite3.Connection, path: Path,
                  progress: Progress | None = None) -> Snapshot:
    """Everything the database at ``path`` stores, read through ``conn``.

    ``progress`` is told how many rows have been read, of how many, every
    :data:`CHUNK` rows: a million take tens of seconds on a loaded machine, which
    a start under systemd says it is making progress through (migblockd.progress).
    """
    blockers: list[BlockerRow] = []
    try:
        conn.execute("BEGIN")  # both reads (and the count) from one snapshot
        try:
            total = (conn.execute(schema.COUNT_BLOCKERS_SQL).fetchone()[0]
                     if progress is not None else 0)
            if progress is not None:
                progress(0, total)
            cursor = conn.execute(schema.SELECT_BLOCKERS_SQL)
            while rows := cursor.fetchmany(CHUNK):
                try:
                    blockers.extend(schema.decode_row(row) for row in rows)
                except ValueError as e:
                    raise _corrupt(path, e) from e
                if progress is not None:
                    progress(len(blockers), total)
            settings = conn.execute(schema.SELECT_SETTINGS_SQL).fetchall()
        finally:
            conn.execute("COMMIT")
    except sqlite3.OperationalError as e:
        if str(e).startswith("Could not decode"):  # text that is not UTF-8
            column = str(e).split("'")[1] if str(e).count("'") >= 2 else "?"
            raise StateError(f"{path} is corrupt (text in column {column!r} is not "
                             "UTF-8); restore it from a backup, or move it away to "
                             "start from scratch", lasting=True) from e
        raise open_failed(path, e) from e
    except sqlite3.Error as e:
        raise open_failed(path, e) from e
    try:
        decoded = dict(schema.decode_setting(key, value) for key, value in settings)
    except ValueError as e:
        raise _corrupt(path, e) from e
    return Snapshot(blockers=blockers, settings=decoded)


def _corrupt(path: Path, e: ValueError) -> StateError:
    return StateError(f"{path} is corrupt ({one_line(str(e))}); restore it from "
                      "a backup, or move it away to start from scratch", lasting=True)


def statements(changes: Sequence[Change]) -> Statements:
    """The group as at most three ``executemany``: the rows to delete, to put,
    and the settings.  Only each id's (and each key's) last change counts, as
    applying them in order would leave it; rows of different ids do not
    interact, so the order between them does not matter."""
    rows: dict[str, Put | Delete] = {}
    settings: dict[str, object] = {}
    for change in changes:
        if isinstance(change, (Put, Delete)):
            key = change.row.id if isinstance(change, Put) else change.id
            rows[key] = change
        elif isinstance(change, Setting):
            settings[change.key] = change.value
        else:
            raise TypeError(f"not a state change: {change!r}")
    deletes: list[schema.Params] = [(change.id,) for change in rows.values()
                                    if isinstance(change, Delete)]
    puts = [schema.encode_row(change.row) for change in rows.values()
            if isinstance(change, Put)]
    values: list[schema.Params] = [
        (key, json.dumps(value, ensure_ascii=False, allow_nan=False))
        for key, value in settings.items()]
    return [(sql, params) for sql, params in ((schema.DELETE_SQL, deletes),
                                              (schema.PUT_SQL, puts),
                                              (schema.SETTING_SQL, values)) if params]

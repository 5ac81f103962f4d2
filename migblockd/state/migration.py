"""Making the state database, and migrating an older one forward.

A new database is made whole under another name (``state.db.new``), synced,
then renamed into place, so that a crash leaves either no ``state.db`` or a
complete empty one.  An older format is copied to ``state.db.format-N`` (for
going back to the migblockd that wrote it), then migrated in one transaction,
so that a failed migration leaves the file as it was.

Apart from :mod:`migblockd.state.opening`, which decides when: these are the
steps that write files, and what makes each survive a crash.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from migblockd.startup import passing
from migblockd.state import schema
from migblockd.state.errors import StateError, one_line, open_failed
from migblockd.state.rescue import sync_path

__all__ = ["backup", "create", "migrate", "sync_directory"]

log = logging.getLogger("migblockd")


def create(path: Path, migrations: Sequence[schema.Migration]) -> None:
    """Make a new database whole, under another name, then put it in place: a
    crash leaves either no ``state.db`` or a complete empty one, never a
    partial file that the next start would have to guess about.  Mode 0600."""
    new = path.with_name(path.name + ".new")
    # An earlier attempt that did not finish.
    _remove_stale(new, *(new.with_name(new.name + s) for s in ("-journal", "-wal", "-shm")))
    try:
        _make_private(new)
        conn = sqlite3.connect(new, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")  # a rollback journal: all in the file
            migrate(conn, new, 0, migrations)
        finally:
            conn.close()
        sync_path(new)
        os.rename(new, path)
        # Said apart from "restored 0 blockers": a first start, or a --state-dir
        # that is not where the state is (a typo, a volume not mounted).
        log.info("created %s: there was no state database", path)
    except sqlite3.Error as e:
        raise open_failed(path, e) from e
    except OSError as e:
        raise StateError(f"cannot create {path}: {e.strerror}; "
                         "check its directory, or choose another --state-dir",
                         lasting=not passing(e.errno)) from e
    sync_directory(path.parent)


def backup(conn: sqlite3.Connection, path: Path, version: int) -> Path:
    """Copy the database as it is before migrating it, for going back to an
    older migblockd (which cannot read the new format); the copy's path
    (mode 0600, as the database), on disk with its name before returning.

    The migration's commit comes after, and survives a power cut: so must the
    copy, or the file as it was would be gone.  SQLite syncs the copy's pages,
    but its commit into it is the removal of the copy's journal, which it does
    not sync (only ``synchronous = EXTRA`` does): a cut after the migration's
    commit could bring that journal back, and the first program to open the
    copy would roll it back to nothing.  So the copy, then its directory (its
    name, and the journal's removal), are synced here."""
    target = path.with_name(f"{path.name}.format-{version}")
    # A copy from an earlier attempt: same format, older.
    _remove_stale(target, target.with_name(target.name + "-journal"))
    try:
        _make_private(target)
    except OSError as e:
        raise StateError(f"cannot make {target}, the copy kept before migrating {path}: "
                         f"{e.strerror}; check its directory", lasting=not passing(e.errno)) from e
    copy = sqlite3.connect(target, isolation_level=None)
    try:
        conn.backup(copy)
    finally:
        copy.close()
    try:
        sync_path(target)
    except OSError as e:
        raise StateError(f"cannot sync {target}, the copy kept before migrating {path}: "
                         f"{e.strerror}; check its disk and file system",
                         lasting=not passing(e.errno)) from e
    sync_directory(path.parent)
    return target


def _make_private(path: Path) -> None:
    """Make ``path`` a new, empty file of mode 0600 for SQLite to fill: it would make
    it with the umask's mode, and the file holds every blocker."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))


def _remove_stale(*paths: Path) -> None:
    """Remove what an earlier start left half made; StateError for what is not
    such a file (a directory of that name, say), which is not ours to remove."""
    for stale in paths:
        try:
            stale.unlink(missing_ok=True)
        except OSError as e:
            raise StateError(f"cannot remove {stale}, left by an earlier start, to make it "
                             f"again: {e.strerror}; move it away",
                             lasting=not passing(e.errno)) from e


def sync_directory(directory: Path) -> None:
    """Make the names made or removed in ``directory`` (and its own, in its
    parent) survive a power cut: SQLite syncs the directory for a journal it
    makes, not for the database file, nor for a journal it removes."""
    for d in (directory, directory.parent):
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # a parent we may not read: nothing we can do
        try:
            os.fsync(fd)
        except OSError:
            pass  # some file systems cannot sync a directory; the data is synced
        finally:
            os.close(fd)


def migrate(conn: sqlite3.Connection, path: Path, version: int,
            migrations: Sequence[schema.Migration],
            begin: Callable[[], None] | None = None) -> None:
    """Run the steps from ``version`` up, all in one transaction, which ``begin()``
    begins (a daemon's start waits for another program's lock in it: in_slices)."""
    if begin is None:
        conn.execute("BEGIN IMMEDIATE")
    else:
        begin()
    try:
        for step in range(version, len(migrations)):
            migrations[step](conn)
        conn.execute(f"PRAGMA user_version = {len(migrations)}")
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(e, (sqlite3.Error, ValueError)) and version > 0:
            raise StateError(f"cannot migrate {path} from format {version} to "
                             f"{len(migrations)} ({one_line(str(e))}); it is unchanged: "
                             "report this, and use the migblockd that wrote it",
                             lasting=True) from e
        raise

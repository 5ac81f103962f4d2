"""Opening the state database, before the store takes it.

The database, its log and the log's index are first judged as files, before
SQLite opens them (:mod:`migblockd.state.files`).  Then the file is checked
before anything is written to it, through a view that writes nothing
(:func:`_view`): it must be ours (``application_id``), of a format this
version reads (``user_version``), and pass ``PRAGMA quick_check``; and what it
holds must pass the caller's ``examine`` (the daemon restores it: a stored
value it refuses).  Only then is it opened for writing, which after a crash
rebuilds the log's index, and whose closing folds the log into the database:
a refused start leaves the files as they were (but for a transaction that a
program writing the file left unfinished in its rollback journal, rolled back
first: :func:`_roll_back_unfinished`).  A new database is made, and an older
one migrated (and examined then), by :mod:`migblockd.state.migration`, unless
its directory is append-only, which would fail the migration half done
(:func:`check_migration_room`).
Bad state stops the daemon with a :class:`StateError`; it is never replaced.

Apart from committing (:mod:`migblockd.state.store`) because all of it runs
once, at start, and none of it on the commit path but :func:`connect` and
:func:`configure`, which the store calls again after dropping a connection.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

from migblockd.pidlock import PidLock
from migblockd.state import schema
from migblockd.state.directory import check_file_room, check_migration_room
from migblockd.state.errors import StateError, one_line, open_failed
from migblockd.state.files import check_existing_database, hot_journal
from migblockd.state.lock import DatabaseLock, in_slices, lock_database
from migblockd.state.logcheck import check_log
from migblockd.state.migration import backup, create, migrate, sync_directory
from migblockd.state.whose_log import check_whose_log, note_for

__all__ = ["check_and_open", "configure", "connect"]

log = logging.getLogger("migblockd")

# How long a statement waits for another program holding the database (an
# operator's sqlite3 shell) before failing with "database is locked".
_BUSY_TIMEOUT = 5.0
#: The log's header (https://sqlite.org/walformat.html): a log no longer than it
#: holds no frame, so nothing the database file lacks.
_LOG_HEADER_SIZE = 32


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; commit() says BEGIN itself.
    return sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)


def configure(conn: sqlite3.Connection) -> None:
    """WAL with a synced commit; raises sqlite3.Error if the file cannot have it."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot use a WAL journal (journal_mode is {mode})")
    conn.execute("PRAGMA synchronous = FULL")


#: What the caller checks the database's content with (a connection in a
#: transaction-free state, reading only): StateError refuses the database.
Examine = Callable[[sqlite3.Connection], None]


def check_and_open(path: Path, migrations: Sequence[schema.Migration],
                   examine: Examine | None = None, *, noting: PidLock | None = None,
                   stop: Callable[[], str | None] | None = None,
                   ) -> tuple[sqlite3.Connection, DatabaseLock]:
    """The database, checked (created, migrated, and its content passed to
    ``examine``), and the lock on its file, taken before SQLite opens it:
    release the lock after closing the connection.  ``noting``: the state
    directory's lock, whose note says which file the last daemon opened (its log
    is refused beside another) and is then made this file's, before SQLite
    writes a frame of its log.  ``stop()``: the name of a SIGTERM or SIGINT that
    came (``EarlySignals.stop``); one that comes while another program's write
    lock is waited for raises :class:`.StoppedStarting`, nothing written."""
    if _check_file(path):
        create(path, migrations)
    lock = lock_database(path)
    try:
        if noting is not None:
            check_whose_log(path, noting.previous)
            _note(noting, path)
        _roll_back_unfinished(path)
        version = _check_before_writing(path, migrations, examine)
        check_migration_room(path, version, len(migrations))
    except BaseException:
        lock.release()
        raise
    try:
        conn = connect(path)
    except sqlite3.Error as e:
        lock.release()
        raise open_failed(path, e) from e
    try:
        _open_for_writing(conn, path, version, migrations, stop)
        if version < len(migrations) and examine is not None:
            examine(conn)  # only now in the format it reads
        if noting is not None:
            _note(noting, path)  # with the log SQLite has made by now
    except BaseException:
        conn.close()
        lock.release()
        raise
    return conn, lock


def _note(lock: PidLock, path: Path) -> None:
    try:
        lock.note(note_for(path))
    except OSError as e:
        log.warning("cannot note in %s which file the daemon opens (%s): should %s be "
                    "replaced while the daemon runs, and the daemon be killed before it "
                    "commits again, the next start will not tell its log from the new "
                    "file's", lock.path, e.strerror, path)


def _view(path: Path) -> sqlite3.Connection:
    """A read-only connection to the database that writes no file, for what the
    start checks before it opens it for writing.

    Read-only is not enough: after a crash the first connection rebuilds the
    log's index (``state.db-shm``) in place, and with no log it makes one.  So
    with no log (or one without a frame: empty, or its header alone) the
    database file alone is read (``immutable``), and with a log and its index
    the index is opened read-only (``readonly_shm``: SQLite then reads the log
    into memory rather than rebuild the index).  Not a header alone that way:
    SQLite's recovery skips the salts of a log no longer than its header, the
    read then finds them changed, and retries until it gives up with
    ``SQLITE_PROTOCOL`` (after about 10 s); a kill in the first commit after a
    clean stop leaves such a log.  A log whose index is gone is left to SQLite, which
    makes the index anew from it (the log and the database are not written).
    """
    real = os.path.realpath(path)
    try:
        logged = os.stat(real + "-wal").st_size > _LOG_HEADER_SIZE
    except FileNotFoundError:
        logged = False
    if not logged:
        params = "mode=ro&immutable=1"
    elif os.path.lexists(real + "-shm"):
        params = "mode=ro&readonly_shm=1"
    else:
        params = "mode=ro"
    # The path's bytes, percent-encoded: one that is not UTF-8 (Linux allows any
    # bytes; Python holds them as surrogates, which str.encode() refuses).
    return sqlite3.connect(f"file:{quote(os.fsencode(path))}?{params}", uri=True,
                           timeout=_BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)


def _roll_back_unfinished(path: Path) -> None:
    """Roll back what a program that wrote the database in rollback-journal mode
    left unfinished: its journal (``state.db-journal``, beside the file a link leads
    to) "hot", after a kill or a crash in a transaction.  Some of that transaction's
    pages may be in the file already (SQLite writes them there before the commit
    once its cache is full), and :func:`_view` reads the file alone: the restore
    would take them, then the opening for writing roll them back, and the daemon
    would serve blockers and settings the disk does not hold.  SQLite rolls it back
    at the first read of a connection that may write; nothing is opened when there
    is no such journal (none, empty, or its header zeroed, as SQLite leaves a
    finished one), so that a start leaves the files as they were."""
    journal = os.path.realpath(path) + "-journal"
    if not hot_journal(journal):
        return
    conn = connect(path)
    try:
        conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as e:
        raise open_failed(path, e) from e
    finally:
        conn.close()
    if not hot_journal(journal):
        log.warning("%s: rolled back a transaction that a program writing it left unfinished "
                    "(its journal %s: an sqlite3 shell killed in a transaction, or a crash); "
                    "nothing of that transaction is kept", path, journal)


def _check_file(path: Path) -> bool:
    """Refuse files we cannot read and write, with the system's reason, which
    SQLite would report only as "unable to open database file" (or blame on
    the database when it is its log): :func:`check_existing_database`, then the
    log's frames and the room for the files SQLite makes.  True: there is no
    database yet."""
    if check_existing_database(path):
        check_file_room(path)
        return True
    real = Path(os.path.realpath(path))
    # Before SQLite opens it: the first connection after a crash rebuilds the
    # index from the log, and what the index said the log held is gone.
    check_log(*(real.with_name(real.name + suffix) for suffix in ("-wal", "-shm")))
    check_file_room(path)
    return False



def _check_before_writing(path: Path, migrations: Sequence[schema.Migration],
                          examine: Examine | None) -> int:
    """Identify and check the database through :func:`_view`, and let ``examine``
    read it when it is of the current format, before anything writes to it, so
    that a file we refuse is left as it was; its format."""
    current = len(migrations)
    try:
        conn = _view(path)
    except sqlite3.Error as e:
        raise open_failed(path, e) from e
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        fresh = app_id == 0 and version == 0 and objects == 0
        if not fresh and app_id != schema.APPLICATION_ID:
            raise StateError(f"{path} is not a migblockd state database (it belongs to "
                             "another program); move it away to start from scratch",
                             lasting=True)
        if not fresh and version < 1:  # migblockd sets both in one transaction
            raise StateError(f"{path} is corrupt (format {version}); restore it from a "
                             "backup, or move it away to start from scratch", lasting=True)
        if version > current:
            copy = path.with_name(f"{path.name}.format-{current}")
            back = (f", or go back to {copy}, the copy the upgrade kept (changes made since "
                    "are lost)" if copy.exists() else "")
            raise StateError(f"{path} was written by a newer migblockd (format {version}; "
                             f"this one reads up to {current}); upgrade migblockd{back}",
                             lasting=True)
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            found = one_line("\n".join(problems).replace("*** in database main ***", ""))
            raise StateError(f"{path} is corrupt ({found}); restore it from a backup, "
                             "or move it away to start from scratch", lasting=True)
        if version == current and examine is not None:
            examine(conn)
    except sqlite3.Error as e:
        raise open_failed(path, e) from e
    finally:
        conn.close()
    return version


def _open_for_writing(conn: sqlite3.Connection, path: Path, version: int,
                      migrations: Sequence[schema.Migration],
                      stop: Callable[[], str | None] | None = None) -> None:
    """Put the checked database (of format ``version``) in WAL mode and migrate it
    if new or older; else prove it writable.  ``stop``: as :func:`check_and_open`'s."""
    current = len(migrations)
    fresh = version == 0  # format 0 passed the check only empty

    def begin() -> None:
        in_slices(conn, _BUSY_TIMEOUT, stop, lambda: conn.execute("BEGIN IMMEDIATE"))

    try:
        # The switch to WAL, which a reader of a file in rollback-journal mode holds
        # up as a writer does; in WAL mode it takes no lock.
        in_slices(conn, _BUSY_TIMEOUT, stop, lambda: configure(conn))
        if version < current:
            if fresh:  # made by an older migblockd that created it in place
                migrate(conn, path, version, migrations, begin)
                sync_directory(path.parent)
            else:
                copy = backup(conn, path, version)
                migrate(conn, path, version, migrations, begin)
                log.info("migrated %s from format %d to %d; the file as it was is kept as %s",
                         path, version, current, copy)
        else:
            # Prove the file is writable now rather than at the first commit.
            begin()
            conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise open_failed(path, e) from e

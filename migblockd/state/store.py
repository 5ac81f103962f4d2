"""The daemon's durable state: one SQLite file in a locked state directory.

:meth:`Store.open` takes the directory's lock before it touches the
database, then checks the file, and locks it (:mod:`migblockd.state.lock`),
and has the caller restore what it holds, before writing anything to it
(:mod:`migblockd.state.opening`).  Bad state stops the daemon with a
:class:`StateError`; it is never replaced.

The journal is WAL with ``synchronous=FULL``: a commit appends its pages to
the WAL and syncs it once, so a group of changes costs about one ``fsync``
and is durable when :meth:`Store.commit` returns (a commit that takes
:data:`SLOW_COMMIT` or more is logged as slow).  A commit that fails (disk
full, I/O error, read-only file system, another program holding the write
lock past the busy timeout) leaves the file as it was, and the store keeps
working: the next commit succeeds once the disk (or that program) does.  Here too
is what makes that so: writing over a failed group's pages, cutting the log
where the last good commit ends, and folding the log back on a nearly full
disk (or at the daemon's file size limit).  When a failed sync left a group
whole in the log and neither works (a file system gone read-only), the commit
raises :class:`Unsettled`: the next start may replay the group, so it can be
reported neither failed nor done.

Threads: the connection is made with ``check_same_thread=False`` so that the
daemon can open the store on one thread and use it from a worker thread; the
caller must serialise all calls (one worker thread, or one at a time).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from migblockd.pidlock import PidLock
from migblockd.state import schema
from migblockd.state.directory import DATABASE_NAME, check_directory, make_directory
from migblockd.state.errors import (
    StateError,
    Unsettled,
    commit_failed,
    free_space,
    io_error,
    no_space,
    size_limit,
)
from migblockd.state.lock import DatabaseLock, lock_directory
from migblockd.state.opening import check_and_open, configure, connect
from migblockd.state.records import Change, Snapshot
from migblockd.state.rescue import let_go
from migblockd.state.rows import Progress, Statements, read_snapshot, statements
from migblockd.state.watch import Watched

__all__ = ["SLOW_COMMIT", "Store"]

log = logging.getLogger("migblockd")

#: Seconds past which a commit is logged as slow (etcd warns of a "slow
#: fdatasync" at the same mark): every client whose change it carries waits
#: that long for its reply, and the log is where an operator looks for why.
SLOW_COMMIT = 1.0

# Free space below which the log is emptied after every commit: twice what
# SQLite lets it grow to by itself (1000 pages of 4 KiB).
_LOG_ROOM = 8 << 20
# SQLITE_IOERR_FSYNC (sqlite3.h): a write that was made, then not synced.
_IOERR_FSYNC = 10 | (4 << 8)


class Store:
    """An open state directory.  Make one with :meth:`open`; :meth:`close` it."""

    __slots__ = ("_conn", "_database", "_database_lock", "_files", "_folded", "_lock",
                 "_log", "_watched", "directory", "path")

    def __init__(self, directory: Path, lock: PidLock, conn: sqlite3.Connection,
                 database_lock: DatabaseLock) -> None:
        self.directory = directory
        self.path = directory / DATABASE_NAME
        # Where the database and its log really are (state.db may be a link),
        # on the file system whose free space matters.
        self._database = Path(os.path.realpath(self.path))
        self._files = self._database.parent
        self._log = Path(f"{self._database}-wal")
        self._lock: PidLock | None = lock
        self._database_lock: DatabaseLock | None = database_lock
        self._conn: sqlite3.Connection | None = conn
        self._watched = Watched(self.path, self._log)
        #: Whether the log of a database that left its name is folded (commit).
        self._folded = False

    @classmethod
    def open(cls, directory: Path,
             migrations: Sequence[schema.Migration] = schema.MIGRATIONS, *,
             restore: Callable[[Snapshot], None] | None = None,
             progress: Progress | None = None,
             stop: Callable[[], str | None] | None = None) -> Store:
        """Lock ``directory`` (made 0700 if missing) and open its database,
        creating it when new and migrating it when older.

        ``migrations`` is the format's history (:data:`schema.MIGRATIONS`);
        tests pass a longer one to play a future version.  ``restore`` is given
        everything stored (as :meth:`load` reads it) before anything is written
        to the database; a StateError or ValueError it raises refuses it, and
        leaves the files as they were (but a database migrated from an older
        format: the copy as it was is kept).  A ValueError says what is wrong
        with a stored value, and is reported as ``PATH: why``.  ``progress`` is
        told how many rows have been read for it, of how many (:func:`read_snapshot`).
        ``stop()``: a starting daemon's stop signal, which ends the wait for another
        program's write lock with :class:`.StoppedStarting` (:func:`check_and_open`).
        """
        # Absolute, so that the log and every message say where the state is: a
        # relative --state-dir depends on the working directory the daemon started in.
        # (Not normalised: "link/.." is where the kernel says, not where the text says.)
        directory = Path(directory).absolute()
        make_directory(directory)
        check_directory(directory)
        lock = lock_directory(directory)
        path = directory / DATABASE_NAME

        def examine(conn: sqlite3.Connection) -> None:
            if restore is None:
                return
            snapshot = read_snapshot(conn, path, progress)
            try:
                restore(snapshot)
            except ValueError as exc:
                raise StateError(f"{path}: {exc}", lasting=True) from None

        try:
            conn, database_lock = check_and_open(path, migrations, examine, noting=lock,
                                                  stop=stop)
        except BaseException:
            lock.release()
            raise
        return cls(directory, lock, conn, database_lock)

    def stopping(self, *, before_serving: bool = False) -> None:
        """Say in the directory's lock file that this daemon is stopping (before it
        served: ``before_serving``), for a start refused the directory meanwhile
        (:meth:`PidLock.stopping`)."""
        if self._lock is not None:
            self._lock.stopping(before_serving=before_serving)

    def load(self) -> Snapshot:
        """Everything stored: blockers oldest first, and the settings."""
        return read_snapshot(self._connection(), self.path)

    def commit(self, changes: Sequence[Change]) -> None:
        """Apply ``changes`` in order, in one transaction: all or nothing,
        durable on return.  StateError (with the file unchanged) if it fails."""
        if not changes:
            return
        started = time.monotonic()
        batches = statements(changes)  # encoded first: a bad value fails before BEGIN
        fd = None if self._database_lock is None else self._database_lock.fd
        try:
            self._watched.check(fd)
        except StateError:
            if not self._folded and self._watched.departed(fd) is not None:
                # Its log, left at the name, would be replayed into the file there at
                # the next start, should this daemon be killed before its stop folds
                # it (migblockd.state.rescue): folded into its own file now, once,
                # and without waiting for a reader (each refused commit would wait).
                self._folded = self._fold_now()
            raise
        try:
            self._commit(batches, len(changes), started)
        finally:
            self._watched.committed()

    def _commit(self, batches: Statements, count: int,
                started: float) -> None:
        """:meth:`commit`'s work, once the files are known to be the daemon's."""
        try:
            self._apply(batches)
        except sqlite3.Error as e:
            failed: sqlite3.Error | None = e
            read = False  # another program's reading kept the log from being emptied
            # The log may be what fills the disk, or what reaches the daemon's file
            # size limit (SQLite empties it only once it holds about 4 MiB, so under
            # a smaller limit it would fail every commit): empty it, and try once more.
            if no_space(e, self._files) or size_limit(e, self._log) is not None:
                busy = self._checkpoint("TRUNCATE")
                read = busy == 1
                if busy == 0:
                    try:
                        self._apply(batches)
                        failed = None
                    except sqlite3.Error as again:
                        failed = again
            if failed is not None:
                # Before the seal, which may cut the log below the limit.
                limit = size_limit(failed, self._log, self._database)
                # A full disk too: the seal's page goes where the failed group's
                # first one is, in a block the log already has.
                if io_error(failed) and not self._seal() and (
                        getattr(failed, "sqlite_errorcode", None) == _IOERR_FSYNC):
                    # Only a failed sync leaves the group whole, its commit frame
                    # written: a failed write stops before it.
                    raise Unsettled(f"{commit_failed(self.path, failed)}, and the log "
                                    "could be neither written over nor cut where its last "
                                    "good commit ends: the next start may find the "
                                    "changes") from failed
                error = commit_failed(self.path, failed, limit)
                if read and no_space(failed, self._files):
                    # A reader's transaction keeps SQLite from writing the log again from
                    # its start: it grew to fill the disk, and only ending that read helps.
                    error = StateError(
                        f"{error} (another program reading it keeps its log {self._log} "
                        "from being emptied)",
                        f"end the read of the program that holds {self.path} open (an "
                        "sqlite3 shell left in a transaction?): until it does, the log "
                        "cannot be emptied, and grows with every commit")
                raise error from failed
        if free_space(self._files) < _LOG_ROOM:
            # Left to SQLite, the log grows to about 4 MiB before it is folded
            # back and written again from its start: on a disk with less room
            # than that it would take the last of it, leave the database none
            # to grow into, and no commit would succeed again.
            self._fold_log("PASSIVE")
        took = time.monotonic() - started
        if took >= SLOW_COMMIT:
            log.warning("a commit to %s took %.1f s (%d change%s): its disk or the machine is "
                        "slow, and the clients whose changes it carried waited as long for "
                        "their replies", self.path, took, count, "" if count == 1 else "s")

    def _apply(self, batches: Statements) -> None:
        """One transaction; rolled back if it fails."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in batches:
                conn.executemany(sql, params)
            conn.execute("COMMIT")
        except BaseException:  # also e.g. OverflowError: an integer too large for SQLite
            self._abandon(conn)
            raise

    def _seal(self) -> bool:
        """Write over what a commit that failed with an I/O error left in the log.

        When syncing the log fails, the group's pages are in it all the same (in
        the page cache at least): SQLite no longer counts them, but its recovery
        at the next start would find them whole and replay a change that every
        client was told failed.  A commit writes from the end of the last good
        one, so this one, which changes nothing (it sets the format to what it
        is), breaks the failed group's chain of checksums.

        Whether the failed group can no longer be replayed: False when neither
        this commit nor cutting the log could be written.
        """
        conn = self._conn
        if conn is None:
            # Dropped by a rollback that failed (not after an I/O error: SQLite has
            # rolled back by itself then).  Not a new connection: the first one to
            # open the log after the last one closed rebuilds its index from it,
            # and would take the failed group, whole, for the last commit.
            return self._cut_log()
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._abandon(conn)
            # Its page is written over the failed group's even when its own sync
            # fails; when its write fails too, the failed group is cut off instead
            # (not when another program held the database: the log is its too).
            if (io_error(e) or no_space(e, self._files)) and (
                    getattr(e, "sqlite_errorcode", None) != _IOERR_FSYNC):
                return self._cut_log()
        return True

    def _cut_log(self) -> bool:
        """Cut the log where its last good commit ends, as the header of its index
        says (https://sqlite.org/walformat.html): the failed group's frames go
        without a block written."""
        try:
            header = self._watched.index_header()
            if len(header) < 20:
                return False
            code = int.from_bytes(header[14:16], sys.byteorder)  # 65536 is 1
            page = (code & 0xFF00) | ((code & 1) << 16)
            frames = int.from_bytes(header[16:20], sys.byteorder)
            # 32 bytes of header, then frames of 24 bytes and a page; none: nothing.
            os.truncate(self._log, 32 + frames * (24 + page) if frames else 0)
        except OSError:
            return False
        return True

    def _fold_now(self) -> bool:
        """:meth:`_fold_log` with ``TRUNCATE``, failing at once rather than waiting
        out the busy timeout when another program reads the database."""
        conn = self._conn
        if conn is None:
            return False
        try:
            timeout = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
            conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error:
            return False
        try:
            return self._fold_log("TRUNCATE")
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout = {timeout}")

    def _fold_log(self, mode: str) -> bool:
        """Copy the log back into the database, so that the next commit writes
        it from its start (``PASSIVE``: as far as readers allow, without
        waiting), or also cut it to nothing, freeing its space (``TRUNCATE``:
        waiting for readers, as any statement does); whether that worked."""
        return self._checkpoint(mode) == 0

    def _checkpoint(self, mode: str) -> int | None:
        """``PRAGMA wal_checkpoint(mode)``: 0 when it did all it is for, 1 when
        another connection held it back (a reader in a transaction, which keeps the
        log from being written again from its start); None when it failed."""
        if self._conn is None:
            return None
        try:
            busy: int = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
        except sqlite3.Error:
            return None
        return busy

    def close(self) -> None:
        """Close the database (SQLite folds the WAL back into it) and release the locks."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            fd = None if self._database_lock is None else self._database_lock.fd
            departed = self._watched.departed(fd)
            if departed is not None:  # SQLite would leave its log to the next start
                let_go(conn, self.path, *departed, discard_log=self._watched.discard_log)
            # What is committed is in the WAL even if folding it back fails:
            # the next open replays it.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._watched.close()  # after the connection, as the lock below
        if self._database_lock is not None:  # after the connection: see state.lock
            self._database_lock.release()
            self._database_lock = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._lock is None:
            raise StateError(f"{self.path} is closed")
        if self._conn is None:  # dropped after a failure it could not roll back
            self._watched.reconnecting()
            try:
                self._conn = connect(self.path)
                configure(self._conn)
            except sqlite3.Error as e:
                self._conn = None
                raise commit_failed(self.path, e) from e
        return self._conn

    def _abandon(self, conn: sqlite3.Connection) -> None:
        """Undo a failed transaction.  SQLite has often rolled it back already
        (it does on a full disk or an I/O error); if rolling back fails too,
        drop the connection and make a new one at the next call."""
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._conn = None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

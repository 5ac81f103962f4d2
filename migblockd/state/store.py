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
working: the next commit succeeds once the disk (or that program) does
(:mod:`migblockd.state.recovery`).

Threads: the connection is made with ``check_same_thread=False`` so that the
daemon can open the store on one thread and use it from a worker thread; the
caller must serialise all calls (one worker thread, or one at a time).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from migblockd.pidlock import PidLock
from migblockd.state import schema
from migblockd.state.directory import DATABASE_NAME, check_directory, make_directory
from migblockd.state.errors import StateError, commit_failed
from migblockd.state.lock import DatabaseLock, lock_directory
from migblockd.state.opening import check_and_open, configure, connect
from migblockd.state.records import Change, Snapshot
from migblockd.state.recovery import Recovery
from migblockd.state.rescue import let_go
from migblockd.state.rows import Progress, Statements, read_snapshot, statements
from migblockd.state.watch import Watched

__all__ = ["SLOW_COMMIT", "Store"]

log = logging.getLogger("migblockd")

#: Seconds past which a commit is logged as slow (etcd warns of a "slow
#: fdatasync" at the same mark): every client whose change it carries waits
#: that long for its reply, and the log is where an operator looks for why.
SLOW_COMMIT = 1.0


class Store:
    """An open state directory.  Make one with :meth:`open`; :meth:`close` it."""

    __slots__ = ("_conn", "_database_lock", "_folded", "_lock", "_recovery", "_watched",
                 "directory", "path")

    def __init__(self, directory: Path, lock: PidLock, conn: sqlite3.Connection,
                 database_lock: DatabaseLock) -> None:
        self.directory = directory
        self.path = directory / DATABASE_NAME
        # Where the database and its log really are (state.db may be a link),
        # on the file system whose free space matters.
        database = Path(os.path.realpath(self.path))
        wal = Path(f"{database}-wal")
        self._lock: PidLock | None = lock
        self._database_lock: DatabaseLock | None = database_lock
        self._conn: sqlite3.Connection | None = conn
        self._watched = Watched(self.path, wal)
        self._recovery = Recovery(self.path, database, wal, self._watched,
                                  lambda: self._conn, self._abandon)
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
                self._folded = self._recovery.fold_now()
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
            self._recovery.failed(e, retry=lambda: self._apply(batches))
        self._recovery.make_room()
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

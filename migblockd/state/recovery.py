"""The store's recovery from a failed commit, and the room its log keeps on disk.

A commit that fails (disk full, I/O error, read-only file system, another
program holding the write lock past the busy timeout) leaves the file as it
was, and the store keeps working: the next commit succeeds once the disk (or
that program) does.  What makes that so is here: writing over a failed
group's pages, cutting the log where the last good commit ends, and folding
the log back on a nearly full disk (or at the daemon's file size limit, or a
disk quota).
When a failed sync left a group whole in the log and neither works (a file
system gone read-only), the commit raises :class:`Unsettled`: the next start
may replay the group, so it can be reported neither failed nor done.

:class:`Recovery` acts through the store's connection as it is at each call
(a failed rollback drops it), and never makes a new one: see :meth:`Recovery._seal`.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from migblockd.state.errors import (
    StateError,
    Unsettled,
    commit_failed,
    free_space,
    io_error,
    no_space,
    over_quota,
    size_limit,
)
from migblockd.state.watch import Watched

__all__ = ["Recovery"]

# Free space below which the log is emptied after every commit: twice what
# SQLite lets it grow to by itself (1000 pages of 4 KiB).
_LOG_ROOM = 8 << 20
# SQLITE_IOERR_FSYNC (sqlite3.h): a write that was made, then not synced.
_IOERR_FSYNC = 10 | (4 << 8)


class Recovery:
    """The recovery of one store's failed commits.  ``connection()``: the store's
    connection, None once dropped; ``abandon(conn)``: the store's rollback of a
    failed transaction, which drops the connection when it fails too."""

    __slots__ = ("_abandon", "_connection", "_database", "_files", "_log", "_path",
                 "_watched")

    def __init__(self, path: Path, database: Path, log: Path, watched: Watched,
                 connection: Callable[[], sqlite3.Connection | None],
                 abandon: Callable[[sqlite3.Connection], None]) -> None:
        self._path = path
        self._database = database
        # The file system whose free space matters: the database's own, as the
        # name (state.db) may be a link to another.
        self._files = database.parent
        self._log = log
        self._watched = watched
        self._connection = connection
        self._abandon = abandon

    def failed(self, error: sqlite3.Error, retry: Callable[[], None]) -> None:
        """After ``error`` failed a commit: make room and ``retry`` it once when the
        log filled the disk or a disk quota, or reached the file size limit;
        returns if that worked.
        Otherwise leave the log without the failed group, and raise the StateError
        to report (:class:`Unsettled` when the group could not be taken out)."""
        failed: sqlite3.Error | None = error
        read = False  # another program's reading kept the log from being emptied
        # The log may be what fills the disk or a quota, or what reaches the
        # daemon's file size limit (SQLite empties it only once it holds about
        # 4 MiB, so with less room than that it would fail every commit): empty
        # it, and try once more.
        if (no_space(error, self._files) or size_limit(error, self._log) is not None
                or over_quota(error, self._files)):
            busy = self._checkpoint("TRUNCATE")
            read = busy == 1
            if busy == 0:
                try:
                    retry()
                    failed = None
                except sqlite3.Error as again:
                    failed = again
        if failed is not None:
            self._refuse(failed, read)

    def _refuse(self, failed: sqlite3.Error, read: bool) -> NoReturn:
        """:meth:`failed`'s error, once the failed group is out of the log."""
        # Before the seal, which may cut the log below the limit, or free a block
        # under the quota.
        limit = size_limit(failed, self._log, self._database)
        quota = limit is None and over_quota(failed, self._files)
        # A full disk too: the seal's page goes where the failed group's
        # first one is, in a block the log already has.
        if io_error(failed) and not self._seal() and (
                getattr(failed, "sqlite_errorcode", None) == _IOERR_FSYNC):
            # Only a failed sync leaves the group whole, its commit frame
            # written: a failed write stops before it.
            raise Unsettled(f"{commit_failed(self._path, failed)}, and the log "
                            "could be neither written over nor cut where its last "
                            "good commit ends: the next start may find the "
                            "changes") from failed
        error = commit_failed(self._path, failed, limit, quota=quota)
        if read and no_space(failed, self._files):
            # A reader's transaction keeps SQLite from writing the log again from
            # its start: it grew to fill the disk, and only ending that read helps.
            error = StateError(
                f"{error} (another program reading it keeps its log {self._log} "
                "from being emptied)",
                f"end the read of the program that holds {self._path} open (an "
                "sqlite3 shell left in a transaction?): until it does, the log "
                "cannot be emptied, and grows with every commit")
        raise error from failed

    def make_room(self) -> None:
        """After a commit: on a disk with little room left, fold the log back."""
        if free_space(self._files) < _LOG_ROOM:
            # Left to SQLite, the log grows to about 4 MiB before it is folded
            # back and written again from its start: on a disk with less room
            # than that it would take the last of it, leave the database none
            # to grow into, and no commit would succeed again.
            self._fold_log("PASSIVE")

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
        conn = self._connection()
        if conn is None:
            # Dropped by a rollback that failed (not after an I/O error: SQLite has
            # rolled back by itself then).  Not a new connection: the first one to
            # open the log after the last one closed rebuilds its index from it,
            # and would take the failed group, whole, for the last commit.
            return self.cut_log()
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
                return self.cut_log()
        return True

    def cut_log(self) -> bool:
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

    def fold_now(self) -> bool:
        """:meth:`_fold_log` with ``TRUNCATE``, failing at once rather than waiting
        out the busy timeout when another program reads the database."""
        conn = self._connection()
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
        conn = self._connection()
        if conn is None:
            return None
        try:
            busy: int = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
        except sqlite3.Error:
            return None
        return busy

"""The daemon's durable state: one SQLite file in a locked state directory.

:meth:`Store.open` takes the directory's lock before it touches the
database, then checks the file before writing anything to it: it must be
ours (``application_id``), of a format this version reads (``user_version``),
and pass ``PRAGMA quick_check``.  Bad state stops the daemon with a
:class:`StateError`; it is never replaced.

The journal is WAL with ``synchronous=FULL``: a commit appends its pages to
the WAL and syncs it once, so a group of changes costs about one ``fsync``
and is durable when :meth:`Store.commit` returns.  A commit that fails (disk
full, I/O error, read-only file system) leaves the file as it was, and the
store keeps working: the next commit succeeds once the disk does.

Threads: the connection is made with ``check_same_thread=False`` so that the
daemon can open the store on one thread and use it from a worker thread; the
caller must serialise all calls (one worker thread, or one at a time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from migblockd.pidlock import PidLock
from migblockd.state import schema
from migblockd.state.errors import (
    StateError,
    commit_failed,
    describe_open_error,
    free_space,
    io_error,
    no_space,
    one_line,
)
from migblockd.state.lock import lock_directory
from migblockd.state.records import Change, Delete, Put, Setting, Snapshot
from migblockd.trust import refusal

__all__ = ["DATABASE_NAME", "Store"]

log = logging.getLogger("migblockd")

DATABASE_NAME = "state.db"
# How long a statement waits for another program holding the database (an
# operator's sqlite3 shell) before failing with "database is locked".
_BUSY_TIMEOUT = 5.0
# Free space below which the log is emptied after every commit: twice what
# SQLite lets it grow to by itself (1000 pages of 4 KiB).
_LOG_ROOM = 8 << 20
# SQLITE_IOERR_FSYNC (sqlite3.h): a write that was made, then not synced.
_IOERR_FSYNC = 10 | (4 << 8)


class Store:
    """An open state directory.  Make one with :meth:`open`; :meth:`close` it."""

    __slots__ = ("_conn", "_files", "_lock", "directory", "path")

    def __init__(self, directory: Path, lock: PidLock, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self.path = directory / DATABASE_NAME
        # Where the database and its log really are (state.db may be a link),
        # on the file system whose free space matters.
        self._files = Path(os.path.realpath(self.path)).parent
        self._lock: PidLock | None = lock
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    def open(cls, directory: Path,
             migrations: Sequence[schema.Migration] = schema.MIGRATIONS) -> Store:
        """Lock ``directory`` (made 0700 if missing) and open its database,
        creating it when new and migrating it when older.

        ``migrations`` is the format's history (:data:`schema.MIGRATIONS`);
        tests pass a longer one to play a future version.
        """
        # Absolute, so that the log and every message say where the state is: a
        # relative --state-dir depends on the working directory the daemon started in.
        # (Not normalised: "link/.." is where the kernel says, not where the text says.)
        directory = Path(directory).absolute()
        _make_directory(directory)
        _check_directory(directory)
        lock = lock_directory(directory)
        path = directory / DATABASE_NAME
        try:
            conn = _check_and_open(path, migrations)
        except BaseException:
            lock.release()
            raise
        return cls(directory, lock, conn)

    def load(self) -> Snapshot:
        """Everything stored: blockers oldest first, and the settings."""
        conn = self._connection()
        try:
            conn.execute("BEGIN")  # both reads from one snapshot
            try:
                rows = conn.execute(schema.SELECT_BLOCKERS_SQL).fetchall()
                settings = conn.execute(schema.SELECT_SETTINGS_SQL).fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if str(e).startswith("Could not decode"):  # text that is not UTF-8
                column = str(e).split("'")[1] if str(e).count("'") >= 2 else "?"
                raise StateError(f"{self.path} is corrupt (text in column {column!r} is not "
                                 "UTF-8); restore it from a backup, or move it away to "
                                 "start from scratch") from e
            raise StateError(describe_open_error(self.path, e)) from e
        except sqlite3.Error as e:
            raise StateError(describe_open_error(self.path, e)) from e
        try:
            blockers = [schema.decode_row(row) for row in rows]
            decoded = dict(schema.decode_setting(key, value) for key, value in settings)
        except ValueError as e:
            raise StateError(f"{self.path} is corrupt ({one_line(str(e))}); restore it from "
                             "a backup, or move it away to start from scratch") from e
        return Snapshot(blockers=blockers, settings=decoded)

    def commit(self, changes: Sequence[Change]) -> None:
        """Apply ``changes`` in order, in one transaction: all or nothing,
        durable on return.  StateError (with the file unchanged) if it fails."""
        if not changes:
            return
        batches = _batches(changes)  # encoded first: a bad value fails before BEGIN
        try:
            self._apply(batches)
        except sqlite3.Error as e:
            failed: sqlite3.Error | None = e
            # The log may be what fills the disk: empty it, and try once more.
            if no_space(e, self._files) and self._fold_log("TRUNCATE"):
                try:
                    self._apply(batches)
                    failed = None
                except sqlite3.Error as again:
                    failed = again
            if failed is not None:
                # A full disk too: the seal's page goes where the failed group's
                # first one is, in a block the log already has.
                if io_error(failed):
                    self._seal()
                raise commit_failed(self.path, failed) from failed
        if free_space(self._files) < _LOG_ROOM:
            # Left to SQLite, the log grows to about 4 MiB before it is folded
            # back and written again from its start: on a disk with less room
            # than that it would take the last of it, leave the database none
            # to grow into, and no commit would succeed again.
            self._fold_log("PASSIVE")

    def _apply(self, batches: Sequence[tuple[str, list[schema.Params]]]) -> None:
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

    def _seal(self) -> None:
        """Write over what a commit that failed with an I/O error left in the log.

        When syncing the log fails, the group's pages are in it all the same (in
        the page cache at least): SQLite no longer counts them, but its recovery
        at the next start would find them whole and replay a change that every
        client was told failed.  A commit writes from the end of the last good
        one, so this one, which changes nothing (it sets the format to what it
        is), breaks the failed group's chain of checksums.
        """
        conn = self._conn
        if conn is None:
            return
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
                self._cut_log()

    def _cut_log(self) -> None:
        """Cut the log where its last good commit ends, as the header of its index
        says (https://sqlite.org/walformat.html): the failed group's frames go
        without a block written."""
        real = os.path.realpath(self.path)
        with contextlib.suppress(OSError):
            with open(f"{real}-shm", "rb") as index:
                header = index.read(20)
            if len(header) < 20:
                return
            code = int.from_bytes(header[14:16], sys.byteorder)  # 65536 is 1
            page = (code & 0xFF00) | ((code & 1) << 16)
            frames = int.from_bytes(header[16:20], sys.byteorder)
            # 32 bytes of header, then frames of 24 bytes and a page; none: nothing.
            os.truncate(f"{real}-wal", 32 + frames * (24 + page) if frames else 0)

    def _fold_log(self, mode: str) -> bool:
        """Copy the log back into the database, so that the next commit writes
        it from its start (``PASSIVE``: as far as readers allow, without
        waiting), or also cut it to nothing, freeing its space (``TRUNCATE``:
        waiting for readers, as any statement does); whether that worked."""
        if self._conn is None:
            return False
        try:
            busy: int = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()[0]
        except sqlite3.Error:
            return False
        return busy == 0

    def close(self) -> None:
        """Close the database (SQLite folds the WAL back into it) and release the lock."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            # What is committed is in the WAL even if folding it back fails:
            # the next open replays it.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
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
            try:
                self._conn = _connect(self.path)
                _configure(self._conn)
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


def _make_directory(directory: Path) -> None:
    try:
        # Missing parents are made 0700 too: with mkdir's own, the umask's mode
        # (0775 under umask 002) would fail the directory check that follows.
        for missing in reversed([d for d in directory.parents if not d.exists()]):
            missing.mkdir(mode=0o700, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError as e:  # exists, and is not a directory
        if directory.name == DATABASE_NAME and directory.is_file():
            # The database given for its directory: moving it away would lose it.
            raise StateError(f"state directory {directory} is a file, the database itself; "
                             f"--state-dir names the directory that holds it "
                             f"({directory.parent})") from e
        raise StateError(f"state directory {directory} is not a directory; "
                         "move it away, or choose another --state-dir") from e
    except OSError as e:
        raise StateError(f"cannot create state directory {directory}: {e.strerror}; "
                         "create it, or choose another --state-dir") from e


def _check_directory(directory: Path) -> None:
    """Refuse a directory that anyone but this user and root could change: they
    could swap the database that the next start restores.  The same for the
    directory that ``state.db`` links to, if it is a link: SQLite keeps the
    database's log and index beside the file the link leads to."""
    _check_trusted(directory, directory, "state directory")
    database = directory / DATABASE_NAME
    if database.is_symlink() and database.exists():
        target = Path(os.path.realpath(database)).parent
        _check_trusted(directory, target, f"the directory of {DATABASE_NAME}'s target")


def _check_trusted(directory: Path, place: Path, kind: str) -> None:
    try:
        why = refusal(place, kind=kind, asset="the database", option="--state-dir")
    except OSError as e:
        raise StateError(f"cannot check state directory {directory}: "
                         f"{e.filename}: {e.strerror}") from None
    if why is not None:
        raise StateError(f"refusing to keep state in {directory}: {why}")


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; commit() says BEGIN itself.
    return sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)


def _configure(conn: sqlite3.Connection) -> None:
    """WAL with a synced commit; raises sqlite3.Error if the file cannot have it."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot use a WAL journal (journal_mode is {mode})")
    conn.execute("PRAGMA synchronous = FULL")


def _check_and_open(path: Path, migrations: Sequence[schema.Migration]) -> sqlite3.Connection:
    if _check_file(path):
        _create(path, migrations)
    try:
        conn = _connect(path)
    except sqlite3.Error as e:
        raise StateError(describe_open_error(path, e)) from e
    try:
        _check_and_migrate(conn, path, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_file(path: Path) -> bool:
    """Refuse files we cannot read and write, with the system's reason, which
    SQLite would report only as "unable to open database file" (or blame on
    the database when it is its log).  True: there is no database yet."""
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            # Say, a volume not mounted yet: starting empty would drop its state.
            raise StateError(f"{path} is a symbolic link to {os.readlink(path)}, which does "
                             "not exist; make it reachable (a file system not mounted?), or "
                             "remove the link to start from scratch") from None
        # SQLite would replay a leftover log into the new, empty database.
        if os.path.lexists(wal):
            raise StateError(f"{wal} exists without {path.name}; put {path.name} back, or "
                             "move the whole directory away to start from scratch") from None
        return True
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir") from e
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"{path} is not a regular file; move it away to start from scratch")
    if st.st_size == 0:
        # migblockd creates the file whole (see _create): this one was cut short.
        raise StateError(f"{path} is empty (0 bytes): it was truncated; restore it from a "
                         "backup, or move it away to start from scratch")
    for each in (path, wal, shm):
        _check_companion(each, path)
    return False


def _check_companion(each: Path, path: Path) -> None:
    """``each`` (the database, its log or the log's index) must be a regular file
    this user can read and write, if it exists."""
    try:
        st = each.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot read {each}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir") from e
    if each != path and not stat.S_ISREG(st.st_mode):
        raise StateError(f"{each} is not a regular file; move it away (it is not "
                         f"{path.name}'s log), or restore the directory from a backup")
    if each == path:
        st = each.stat()  # the file a link leads to: its owner and mode count
    # As for the directory (sshd's StrictModes): whoever else may write the file
    # could change what the next start restores.
    if st.st_uid not in (os.geteuid(), 0):
        raise StateError(f"refusing to keep state in {path.parent}: {each} is owned by uid "
                         f"{st.st_uid}, not by this user (uid {os.geteuid()}) or root, so "
                         "its owner could change the blockers; chown it, or choose another "
                         "--state-dir")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(f"refusing to keep state in {path.parent}: {each} is writable by "
                         f"others (mode {stat.S_IMODE(st.st_mode):04o}), so they could change "
                         f"the blockers; chmod go-w {each}, or choose another --state-dir")
    try:
        # The log and its index are SQLite's to create: a link there is not theirs.
        nofollow = os.O_NOFOLLOW if each != path else 0
        os.close(os.open(each, os.O_RDWR | os.O_CLOEXEC | nofollow | os.O_NONBLOCK))
    except OSError as e:
        raise StateError(f"cannot read and write {each}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir") from e


def _create(path: Path, migrations: Sequence[schema.Migration]) -> None:
    """Make a new database whole, under another name, then put it in place: a
    crash leaves either no ``state.db`` or a complete empty one, never a
    partial file that the next start would have to guess about.  Mode 0600."""
    new = path.with_name(path.name + ".new")
    for stale in (new, *(new.with_name(new.name + s) for s in ("-journal", "-wal", "-shm"))):
        stale.unlink(missing_ok=True)  # an earlier attempt that did not finish
    try:
        os.close(os.open(new, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        conn = sqlite3.connect(new, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")  # a rollback journal: all in the file
            _migrate(conn, new, 0, migrations)
        finally:
            conn.close()
        fd = os.open(new, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(new, path)
        # Said apart from "restored 0 blockers": a first start, or a --state-dir
        # that is not where the state is (a typo, a volume not mounted).
        log.info("created %s: there was no state database", path)
    except sqlite3.Error as e:
        raise StateError(describe_open_error(path, e)) from e
    except OSError as e:
        raise StateError(f"cannot create {path}: {e.strerror}; "
                         "check its directory, or choose another --state-dir") from e
    _sync_directory(path.parent)


def _check_and_migrate(conn: sqlite3.Connection, path: Path,
                       migrations: Sequence[schema.Migration]) -> None:
    """Identify, check and (if new or older) migrate the database, reading
    before writing anything, so that a file we refuse is left untouched."""
    current = len(migrations)
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        fresh = app_id == 0 and version == 0 and objects == 0
        if not fresh and app_id != schema.APPLICATION_ID:
            raise StateError(f"{path} is not a migblockd state database (it belongs to "
                             "another program); move it away to start from scratch")
        if not fresh and version < 1:  # migblockd sets both in one transaction
            raise StateError(f"{path} is corrupt (format {version}); restore it from a "
                             "backup, or move it away to start from scratch")
        if version > current:
            copy = path.with_name(f"{path.name}.format-{current}")
            back = (f", or go back to {copy}, the copy the upgrade kept (changes made since "
                    "are lost)" if copy.exists() else "")
            raise StateError(f"{path} was written by a newer migblockd (format {version}; "
                             f"this one reads up to {current}); upgrade migblockd{back}")
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            found = one_line("\n".join(problems).replace("*** in database main ***", ""))
            raise StateError(f"{path} is corrupt ({found}); restore it from a backup, "
                             "or move it away to start from scratch")
        _configure(conn)
        if version < current:
            if fresh:  # made by an older migblockd that created it in place
                _migrate(conn, path, version, migrations)
                _sync_directory(path.parent)
            else:
                copy = _backup(conn, path, version)
                _migrate(conn, path, version, migrations)
                log.info("migrated %s from format %d to %d; the file as it was is kept as %s",
                         path, version, current, copy)
        else:
            # Prove the file is writable now rather than at the first commit.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise StateError(describe_open_error(path, e)) from e


def _backup(conn: sqlite3.Connection, path: Path, version: int) -> Path:
    """Copy the database as it is before migrating it, for going back to an
    older migblockd (which cannot read the new format); the copy's path."""
    target = path.with_name(f"{path.name}.format-{version}")
    for stale in (target, target.with_name(target.name + "-journal")):
        stale.unlink(missing_ok=True)  # a copy from an earlier attempt: same format, older
    copy = sqlite3.connect(target, isolation_level=None)
    try:
        conn.backup(copy)
    finally:
        copy.close()
    return target


def _sync_directory(directory: Path) -> None:
    """Make a new database's name (and its directory's) survive a power cut:
    SQLite syncs the directory for its log, not for the database file."""
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


def _migrate(conn: sqlite3.Connection, path: Path, version: int,
             migrations: Sequence[schema.Migration]) -> None:
    """Run the steps from ``version`` up, all in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
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
                             "report this, and use the migblockd that wrote it") from e
        raise


def _batches(changes: Sequence[Change]) -> list[tuple[str, list[schema.Params]]]:
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

"""Opening the state database, before the store takes it.

The database, its log and the log's index are held to sshd's StrictModes, as
their directory is (:mod:`migblockd.state.directory`).  Then the file is
checked before anything is written to it, through a view that writes nothing
(:func:`_view`): it must be ours (``application_id``), of a format this
version reads (``user_version``), and pass ``PRAGMA quick_check``; and what it
holds must pass the caller's ``examine`` (the daemon restores it: a stored
value it refuses).  Only then is it opened for writing, which after a crash
rebuilds the log's index, and whose closing folds the log into the database:
a refused start leaves the files as they were.  A new database is made whole
under another name and then renamed; an older one is copied to
``state.db.format-N`` and migrated in one transaction (and examined then),
unless its directory is append-only, which would fail the migration half
done (:func:`check_migration_room`).
Bad state stops the daemon with a :class:`StateError`; it is never replaced.

Apart from committing (:mod:`migblockd.state.store`) because all of it runs
once, at start, and none of it on the commit path but :func:`connect` and
:func:`configure`, which the store calls again after dropping a connection.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

from migblockd.state import schema
from migblockd.state.directory import check_file_room, check_migration_room
from migblockd.state.errors import (
    StateError,
    describe_open_error,
    one_line,
    owner_mismatch,
    read_only,
)
from migblockd.state.lock import DatabaseLock, lock_database
from migblockd.state.logcheck import check_log
from migblockd.state.rescue import rescued_copies
from migblockd.trust import named_uid
from migblockd.writable import attribute_fix

__all__ = ["check_and_open", "check_existing_database", "configure", "connect"]

log = logging.getLogger("migblockd")

# How long a statement waits for another program holding the database (an
# operator's sqlite3 shell) before failing with "database is locked".
_BUSY_TIMEOUT = 5.0
# The first bytes of every SQLite database file (its file format's header string).
_SQLITE_HEADER = b"SQLite format 3\x00"


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
                   examine: Examine | None = None) -> tuple[sqlite3.Connection, DatabaseLock]:
    """The database, checked (created, migrated, and its content passed to
    ``examine``), and the lock on its file, taken before SQLite opens it:
    release the lock after closing the connection."""
    if _check_file(path):
        _create(path, migrations)
    lock = lock_database(path)
    try:
        version = _check_before_writing(path, migrations, examine)
        check_migration_room(path, version, len(migrations))
    except BaseException:
        lock.release()
        raise
    try:
        conn = connect(path)
    except sqlite3.Error as e:
        lock.release()
        raise StateError(describe_open_error(path, e)) from e
    try:
        _open_for_writing(conn, path, version, migrations)
        if version < len(migrations) and examine is not None:
            examine(conn)  # only now in the format it reads
    except BaseException:
        conn.close()
        lock.release()
        raise
    return conn, lock


def _view(path: Path) -> sqlite3.Connection:
    """A read-only connection to the database that writes no file, for what the
    start checks before it opens it for writing.

    Read-only is not enough: after a crash the first connection rebuilds the
    log's index (``state.db-shm``) in place, and with no log it makes one.  So
    with no log (or an empty one) the database file alone is read
    (``immutable``), and with a log and its index the index is opened read-only
    (``readonly_shm``: SQLite then reads the log into memory rather than
    rebuild the index).  A log whose index is gone is left to SQLite, which
    makes the index anew from it (the log and the database are not written).
    """
    real = os.path.realpath(path)
    try:
        logged = os.stat(real + "-wal").st_size > 0
    except FileNotFoundError:
        logged = False
    if not logged:
        params = "mode=ro&immutable=1"
    elif os.path.lexists(real + "-shm"):
        params = "mode=ro&readonly_shm=1"
    else:
        params = "mode=ro"
    return sqlite3.connect(f"file:{quote(str(path))}?{params}", uri=True,
                           timeout=_BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)


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


def check_existing_database(path: Path, *, owner: int | None = None) -> bool:
    """What the start refuses of the database, its log and the log's index before
    SQLite opens them (what they are, their owner, mode and access, the file's
    first bytes), found with stat(2), open(2) and a plain read, without SQLite and
    without making or locking anything: ``--check-config`` runs it beside the
    daemon, where SQLite could make the index or take the file's locks.  Not the
    log's frames (:func:`check_log`): a running daemon's log changes as it is read.

    ``owner``: a uid whose files are trusted as this user's, as
    :func:`migblockd.state.directory.check_existing_directory`'s: root checking for
    a daemon that runs as that user, whose access it leaves to the start.  True:
    there is no database yet."""
    wal = path.with_name(path.name + "-wal")
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            # Say, a volume not mounted yet: starting empty would drop its state.
            raise StateError(f"{path} is a symbolic link to {os.readlink(path)}, which does "
                             "not exist; make it reachable (a file system not mounted?), or "
                             "remove the link to start from scratch") from None
        # SQLite would replay a leftover log into the new, empty database, or into
        # a backup put in its place: it cannot tell that the log is another file's.
        # A database removed under a daemon leaves this too (SQLite does not fold
        # the log into a file whose name is gone): the copy its stop saved
        # (migblockd.state.rescue) is the way back; killed, it saved none.
        copies = rescued_copies(path)
        if os.path.lexists(wal) and copies:
            raise StateError(
                f"{wal} exists without {path.name}, which was removed while "
                f"the daemon ran; the stop saved what it kept as {copies[-1]}: rename that "
                f"to {path} to use it, or move the whole directory away to restore a "
                "backup or to start from scratch") from None
        if os.path.lexists(wal):
            raise StateError(
                f"{wal} exists without {path.name}; put back the {path.name} it is the log "
                "of (the file moved away), not a backup, into which SQLite would replay it; "
                "or move the whole directory away to restore a backup or to start from "
                "scratch") from None
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
    # SQLite keeps the log and its index beside the file a link leads to.
    real = Path(os.path.realpath(path))
    log_file, index_file = (real.with_name(real.name + suffix) for suffix in ("-wal", "-shm"))
    _check_left_log(wal, path, real, log_file)
    for each in (path, log_file, index_file):
        _check_companion(each, path, owner)
    _check_header(path)
    return False


def _check_header(path: Path) -> None:
    """Refuse a file that does not start as every SQLite database does.  SQLite
    itself takes a file of one byte for an empty database (its Unix VFS reports
    such a file's size as 0), which would be written over as a first start."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir") from e
    if header != _SQLITE_HEADER:
        raise StateError(f"{path} is not a migblockd state database (file is not a "
                         "database); move it away to start from scratch")


def _check_left_log(wal: Path, path: Path, real: Path, log_file: Path) -> None:
    """Refuse a log beside ``path`` that SQLite would not read, because ``path``
    links to ``real``: left there when the database was moved and linked to
    after a crash, it holds changes committed since the last checkpoint, which
    starting without it would drop."""
    try:
        size = wal.lstat().st_size
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot read {wal}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir") from e
    if size == 0 or os.path.realpath(wal) == str(log_file):  # empty, or the one SQLite reads
        return
    raise StateError(f"{wal} holds changes that SQLite would not read: {path} links to "
                     f"{real}, whose log is {log_file}; move {wal} there, or put the database "
                     "back in place of the link")


def _check_companion(each: Path, path: Path, owner: int | None) -> None:
    """``each`` (the database, its log or the log's index) must be a regular file
    this user (or ``owner``: :func:`check_existing_database`) can read and write,
    if it exists."""
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
    if st.st_uid not in (os.geteuid(), 0, owner):
        # Judged for ``owner`` too, as the trust rule words it: a daemon running as
        # either refuses the other's.
        also = "" if owner is None else f", {named_uid(owner)}"
        raise StateError(f"refusing to keep state in {path.parent}: {each} is owned by "
                         f"{named_uid(st.st_uid)}, not by this user (uid {os.geteuid()})"
                         f"{also} or root, so its owner could change the blockers; chown it, "
                         "or choose another --state-dir")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(f"refusing to keep state in {path.parent}: {each} is writable by "
                         f"others (mode {stat.S_IMODE(st.st_mode):04o}), so they could change "
                         f"the blockers; chmod go-w {each}, or choose another --state-dir")
    if owner is not None:
        return  # root opens what that user's daemon may not: its access is the start's
    try:
        # The log and its index are SQLite's to create: a link there is not theirs.
        nofollow = os.O_NOFOLLOW if each != path else 0
        os.close(os.open(each, os.O_RDWR | os.O_CLOEXEC | nofollow | os.O_NONBLOCK))
    except OSError as e:
        raise StateError(f"cannot read and write {each}: {e.strerror}"
                         f"{_fix(each, st, e)}, or choose another --state-dir") from e


def _fix(each: Path, st: os.stat_result, e: OSError) -> str:
    """What to do about a file this user may not open: whose it is, when not ours;
    its file system, when that is read-only.

    The usual case is a restore done as root with ``cp``: the copy is root's,
    and "fix its permissions" does not say that the owner is what is wrong.
    """
    if e.errno == errno.EROFS:  # a link to another volume, read-only under the units
        return f"; {read_only(Path(os.path.realpath(each)).parent)}"
    if e.errno == errno.EPERM and (fix := attribute_fix(each, None)):
        return f"; {fix}"
    if not isinstance(e, PermissionError) or st.st_uid == os.geteuid():
        return "; fix its permissions"
    held, fix = owner_mismatch(each, st)
    return f" ({held}: a copy made as root belongs to root); {fix}"


def _create(path: Path, migrations: Sequence[schema.Migration]) -> None:
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


def _check_before_writing(path: Path, migrations: Sequence[schema.Migration],
                          examine: Examine | None) -> int:
    """Identify and check the database through :func:`_view`, and let ``examine``
    read it when it is of the current format, before anything writes to it, so
    that a file we refuse is left as it was; its format."""
    current = len(migrations)
    try:
        conn = _view(path)
    except sqlite3.Error as e:
        raise StateError(describe_open_error(path, e)) from e
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
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
        if version == current and examine is not None:
            examine(conn)
    except sqlite3.Error as e:
        raise StateError(describe_open_error(path, e)) from e
    finally:
        conn.close()
    return version


def _open_for_writing(conn: sqlite3.Connection, path: Path, version: int,
                      migrations: Sequence[schema.Migration]) -> None:
    """Put the checked database (of format ``version``) in WAL mode and migrate it
    if new or older; else prove it writable."""
    current = len(migrations)
    fresh = version == 0  # format 0 passed the check only empty
    try:
        configure(conn)
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
    older migblockd (which cannot read the new format); the copy's path
    (mode 0600, as the database)."""
    target = path.with_name(f"{path.name}.format-{version}")
    # A copy from an earlier attempt: same format, older.
    _remove_stale(target, target.with_name(target.name + "-journal"))
    try:
        _make_private(target)
    except OSError as e:
        raise StateError(f"cannot make {target}, the copy kept before migrating {path}: "
                         f"{e.strerror}; check its directory") from e
    copy = sqlite3.connect(target, isolation_level=None)
    try:
        conn.backup(copy)
    finally:
        copy.close()
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
                             f"again: {e.strerror}; move it away") from e


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

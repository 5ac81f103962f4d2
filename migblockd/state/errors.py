"""The one-line messages the state store fails with.

Each names the file or directory and says what to do, because the daemon
prints it as the only line before it exits (or returns it to the client whose
command could not be saved).
"""

from __future__ import annotations

import errno
import os
import pwd
import resource
import sqlite3
from pathlib import Path
from typing import Final

from migblockd.trust import ownership

__all__ = [
    "StateError",
    "Unsettled",
    "account",
    "busy",
    "commit_failed",
    "describe_open_error",
    "free_space",
    "io_error",
    "no_space",
    "one_line",
    "open_failed",
    "over_quota",
    "owner_mismatch",
    "read_only",
    "size_limit",
]

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT = 3, 5, 6, 8, 10, 11
_FULL, _CANTOPEN, _NOTADB, _AUTH = 13, 14, 26, 23
_NOMEM, _INTERRUPT, _PROTOCOL = 7, 9, 15
_ERROR, _CONSTRAINT = 1, 19


#: How this package's messages name the setting that chose the directory.
STATE_DIR_OPTION: Final = "--state-dir"


class StateError(Exception):
    """The state directory or database cannot be used; ``str()`` is one line
    naming the file and what to do about it.

    ``remedy``: for a failed commit, what the operator should do, when this
    layer knows better than the daemon's general advice (which is about the
    disk); the daemon logs it, and the client hears only ``str()``.

    ``lasting``: nothing but an operator changes it (a database that is corrupt,
    no database, a newer migblockd's, or others may write), so a start refused
    for it is not tried again (the daemon's exit status says so); otherwise (the
    disk, a lock another process holds) a later start may get past it.
    """

    def __init__(self, message: str, remedy: str | None = None, *,
                 lasting: bool = False) -> None:
        super().__init__(message)
        self.remedy = remedy
        self.lasting = lasting

    def naming(self, choice: str) -> str:
        """``str()``, the setting to change named as ``choice`` (``state-dir in
        FILE`` when the ``--config`` file set it: see ``Sources.choice``).  This
        layer knows the directory, not where it was given."""
        return str(self).replace(STATE_DIR_OPTION, choice)


class Unsettled(StateError):
    """A commit failed after its group reached the log whole (its sync failed), and
    the log could be neither written over nor cut (a file system gone read-only):
    the next start may replay the group.  Neither answer would be true: the
    daemon must not say the commands failed, nor that they succeeded."""


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so a message stays one line."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()) or "?"


def _reason(error: sqlite3.Error) -> str:
    return one_line(str(error))


def describe_open_error(path: Path, error: sqlite3.Error) -> str:
    """What opening (or checking, or migrating) the database at ``path`` failing
    with ``error`` means, and what the operator should do."""
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    why = _reason(error)
    directory = path.parent
    if primary == _NOTADB:
        return (f"{path} is not a migblockd state database ({why}); "
                "move it away to start from scratch")
    if primary == _CORRUPT:
        return (f"{path} is corrupt ({why}); restore it from a backup, "
                "or move it away to start from scratch")
    if primary in (_READONLY, _CANTOPEN, _PERM, _AUTH):
        if primary == _CANTOPEN and _no_inodes(directory):  # no new log, nor its index
            return (f"cannot write {path} ({why}); its file system has no free inodes: "
                    "delete some files on it")
        return (f"cannot write {path} ({why}); make it and {directory} writable "
                "by this user, or choose another --state-dir")
    if primary == _FULL:
        return f"cannot write {path} ({why}); free some space on its file system"
    if primary in (_BUSY, _LOCKED):
        return (f"{path} is in use by another program ({why}); "
                "close it (a sqlite3 shell?) and start again")
    if primary == _IOERR:
        if _no_space(directory):  # SQLite reports some writes to a full disk as I/O errors
            return f"cannot write {path} ({why}); its file system is full: free some space on it"
        return (f"cannot read or write {path} ({why}); check its disk and file system, "
                "or choose another --state-dir")
    name = getattr(error, "sqlite_errorname", type(error).__name__)
    return f"cannot use {path} ({name}: {why}); move it away to start from scratch"


#: SQLite's failures that a later start may not meet: another connection's lock,
#: memory, the disk.  Any other (not a database, corrupt, not writable, a schema
#: it does not know) is the file's, and lasts until an operator acts.
_PASSING = frozenset({_BUSY, _LOCKED, _NOMEM, _INTERRUPT, _IOERR, _FULL, _PROTOCOL})


def open_failed(path: Path, error: sqlite3.Error) -> StateError:
    """The StateError of opening (or checking, or migrating) the database at
    ``path`` failing with ``error``: :func:`describe_open_error`'s message,
    lasting unless a later start may get past it."""
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    passing = primary in _PASSING or (primary == _CANTOPEN and _no_inodes(path.parent))
    return StateError(describe_open_error(path, error), lasting=not passing)


def free_space(directory: Path) -> int:
    """Bytes left for this user on the file system of ``directory`` (or a
    lot, when it cannot be told)."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return 1 << 62
    return (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize


def _no_space(directory: Path) -> bool:
    """Whether the file system of ``directory`` has no block left for this user."""
    return free_space(directory) == 0


def _no_inodes(directory: Path) -> bool:
    """Whether the file system of ``directory`` has no file left to make for this
    user (False when it cannot be told, or it has no fixed number of files)."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return False
    return fs.f_files > 0 and (fs.f_ffree if os.geteuid() == 0 else fs.f_favail) == 0


def busy(error: sqlite3.Error) -> bool:
    """Whether ``error`` is another connection holding a lock (``database is locked``)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_BUSY, _LOCKED)


def io_error(error: sqlite3.Error) -> bool:
    """Whether ``error`` is an I/O error (reading, writing or syncing a file)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _IOERR


def no_space(error: sqlite3.Error, directory: Path) -> bool:
    """Whether ``error`` came from ``directory``'s file system being full."""
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    return primary == _FULL or (primary == _IOERR and _no_space(directory))


#: What :func:`over_quota` writes to find out: a page, as SQLite's writes are.
_PROBE = bytes(4096)


def over_quota(error: sqlite3.Error, directory: Path) -> bool:
    """Whether ``error`` is an I/O error and a disk quota on the file system of
    ``directory`` refuses this user a new block (EDQUOT).  SQLite tells ENOSPC
    apart (``SQLITE_FULL``) but reports EDQUOT as a plain I/O error
    (``SQLITE_IOERR_WRITE``: os_unix.c, ``unixWrite()``), and a quota does not
    show in the file system's free space (``statvfs``): so a page is written
    to a file made for it in ``directory`` with no name (``O_TMPFILE``, which
    leaves nothing behind, even after a crash), and the system says."""
    if not io_error(error):
        return False
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        return e.errno == errno.EDQUOT  # an inode quota; else it cannot be told
    try:
        os.pwrite(fd, _PROBE, 0)
    except OSError as e:
        return e.errno == errno.EDQUOT
    finally:
        os.close(fd)
    return False


def size_limit(error: sqlite3.Error, *files: Path) -> int | None:
    """The daemon's file size limit (RLIMIT_FSIZE: ``ulimit -f``, systemd's
    ``LimitFSIZE=``) when ``error`` is an I/O error and one of ``files`` has
    reached it, else None.  A write that would pass the limit is cut at it, and
    the rest fails (EFBIG), which SQLite reports as an I/O error: the file is
    then as long as the limit."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY or not io_error(error):
        return None
    for file in files:
        try:
            if os.stat(file).st_size >= limit:
                return limit
        except OSError:
            continue
    return None


def commit_failed(path: Path, error: sqlite3.Error, limit: int | None = None, *,
                  quota: bool = False) -> StateError:
    """The error for a group of changes that did not reach ``path``; ``limit``:
    the file size limit its files reached (:func:`size_limit`), if they did;
    ``quota``: a disk quota refused the write (:func:`over_quota`)."""
    why = _reason(error)
    code = getattr(error, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    remedy = None
    if limit is not None:
        # Not the disk: the database holds all it may under the limit (its log, which
        # cannot be emptied into it, takes no more; deletes fail too), or the group
        # alone is more than the limit.
        why += f" (the daemon's file size limit, {limit} bytes, is reached)"
        remedy = ("raise the daemon's file size limit (LimitFSIZE= under systemd, ulimit -f "
                  f"in the shell that starts it; prlimit --pid {os.getpid()} "
                  "--fsize=unlimited raises it now)")
    elif quota:
        # Not the disk's free space, which may be ample: the quota of the daemon's
        # user, its group, or the state directory's project, on that file system.
        why += " (a disk quota on its file system is exceeded)"
        remedy = (f"free space under the disk quota that {path.parent} is under (of "
                  f"{account(os.geteuid())}, the user the daemon runs as, of its group, or "
                  "of the directory's project), or raise that quota")
    elif primary == _IOERR and _no_space(path.parent):
        why += " (its file system is full)"
    elif primary in (_BUSY, _LOCKED):
        # The daemon has one connection, used by one thread: whoever holds the
        # write lock past the busy timeout is another program (an operator's
        # sqlite3 shell left in a transaction), and only closing it helps.
        why += " (another program is writing to it)"
        remedy = (f"close the program that holds {path} open for writing "
                  "(an sqlite3 shell in a transaction?)")
    elif primary in (_CONSTRAINT, _ERROR):
        # The daemon's own statements fit the schema it made: a refusal, or a
        # statement the file no longer understands, means the schema was edited
        # (a trigger, a constraint, a table changed), and no free space would help.
        remedy = (f"{path} refuses what the daemon writes, so it was changed by hand? "
                  "undo the change (a trigger or constraint added with an sqlite3 shell?), "
                  "or stop the daemon and restore it from a backup")
    return StateError(f"cannot commit to {path}: {why}", remedy)


def owner_mismatch(path: Path, st: os.stat_result) -> tuple[str, str]:
    """Whose ``path`` is (from ``st``) against the user this daemon runs as, and
    the ``chown`` that makes it this user's: for a file the daemon may not open
    because another user owns it (a copy made as root, a directory chowned
    without ``-R``), where "fix its permissions" would not say what is wrong."""
    uid = os.geteuid()
    return f"it {ownership(st)}", f"chown {account(uid)}: {path}"


def account(uid: int) -> str:
    """The name ``uid`` is known by, for a command line (``chown``, ``install -o``);
    the number when the user database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def read_only(place: Path, *, to_be_made: bool = False) -> str:
    """What to do about ``place`` (a directory the daemon writes in, or makes when
    ``to_be_made``) on a file system mounted read-only.  Under the units that is
    what ``ProtectSystem=strict`` does to every path but ``StateDirectory=``'s:
    a ``--state-dir`` elsewhere, or a ``state.db`` linked to another volume."""
    what = f"make {place} and add it" if to_be_made else f"add {place}"
    return (f"remount that file system read-write, or, under systemd, {what} to "
            "ReadWritePaths= (the units' ProtectSystem=strict makes every path outside "
            "StateDirectory= read-only)")

"""One daemon per state directory, and per database.

A :class:`~migblockd.pidlock.PidLock` on ``DIRECTORY/lock``, then an exclusive
``flock`` on the database file itself: ``state.db`` may be a link (to a file on
another volume), and two directories whose links (or hard links) lead to one
file are one state, whatever their names.  SQLite's own locks are not enough:
two daemons could both read the same state and then take turns writing, each
handing out the ids the other did and overwriting the other's rows.

SQLite's own locks, which another program may hold (an operator's ``sqlite3``
shell in a transaction), are waited for at start, by each step that takes one, in
slices that a stop can end (:func:`in_slices`).

The database's lock is a ``flock``, which on Linux does not touch the ``fcntl``
locks SQLite takes on the same file.  Its descriptor must outlive the
process's SQLite connections to the file: closing any descriptor of a file
drops every ``fcntl`` lock the process holds on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from migblockd.pidlock import RESTORE_LEFT, Held, LockFailed, PidLock
from migblockd.startup import StoppedStarting, passing
from migblockd.state.errors import StateError, busy, owner_mismatch, read_only
from migblockd.writable import attribute_fix, denied

__all__ = ["DATABASE_NAME", "LOCK_NAME", "DatabaseLock", "check_lockable", "in_slices",
           "lock_database", "lock_directory"]

LOCK_NAME = "lock"
#: The database's name in the state directory.
DATABASE_NAME = "state.db"
#: Seconds between two looks at whether a stop was asked while the start waits for
#: another program's lock (:func:`in_slices`).
POLL = 0.1

_T = TypeVar("_T")


def lock_directory(directory: Path) -> PidLock:
    """The state directory's lock, or :class:`StateError` saying why not."""
    path = directory / LOCK_NAME
    with contextlib.suppress(OSError):  # else the open says why
        if not stat.S_ISREG(os.lstat(path).st_mode):
            # Refused as --check-config refuses it (check_lockable), before it is
            # opened: a FIFO or a device opens read-write, and would take the lock.
            raise _open_failed(directory, path, LockFailed(
                os.strerror(errno.EINVAL), opening=True, errno=errno.EINVAL))
    _refuse_other_names(path)
    try:
        return PidLock.acquire(path)
    except Held as held:
        if held.before_serving:  # as a socket's lock says it (migblockd.bindable)
            raise StateError(f"state directory {directory} is locked by another migblockd "
                             f"({held.holder}), which is stopping before serving "
                             f"({RESTORE_LEFT}); start again once it has exited, or use "
                             "another --state-dir") from None
        if held.stopping:
            raise StateError(f"state directory {directory} is locked by another migblockd "
                             f"({held.holder}), which is stopping; start again once it has "
                             "exited, or use another --state-dir") from None
        raise StateError(f"state directory {directory} is locked by another migblockd "
                         f"({held.holder}); stop it, or use another --state-dir") from None
    except LockFailed as exc:
        if exc.opening:
            raise _open_failed(directory, path, exc) from None
        raise StateError(f"cannot lock {path}: {exc.strerror}; "
                         "choose another --state-dir", lasting=not passing(exc.errno)) from None


def check_lockable(directory: Path) -> None:
    """The StateError :func:`lock_directory` would raise for a lock file it could
    not open, found without opening anything (``--check-config``): one this
    user may not read and write, or a directory it may not make it in."""
    path = directory / LOCK_NAME
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        code = errno.ELOOP  # refused for what it is, whatever the errno
    elif os.path.isfile(path):
        _refuse_other_names(path)
        code = denied(path, os.R_OK | os.W_OK)
    else:
        code = denied(directory, os.W_OK | os.X_OK)
    if code:
        raise _open_failed(directory, path, LockFailed(os.strerror(code), opening=True,
                                                       errno=code))


def _refuse_other_names(path: Path) -> None:
    """Refuse a lock file that is the database, its log or the log's index too
    (a hard link): the holder empties it and writes its pid in it, which would
    empty that file (``state.db``: every blocker).  Other names are left alone: a
    snapshot of the directory made with ``cp -al`` links every file."""
    with contextlib.suppress(OSError):  # none: made anew; else the open says why
        lock = os.lstat(path)
        if lock.st_nlink < 2:
            return
        database = os.path.realpath(path.with_name(DATABASE_NAME))
        for each in (path.with_name(DATABASE_NAME), Path(database + "-wal"),
                     Path(database + "-shm")):
            with contextlib.suppress(OSError):
                st = os.stat(each)
                if (st.st_dev, st.st_ino) == (lock.st_dev, lock.st_ino):
                    raise StateError(f"{path} is {each} too (a hard link), which the daemon "
                                     "would empty to write its pid in its lock; remove "
                                     f"{path} (the daemon makes its lock file itself)",
                                     lasting=True)


def _open_failed(directory: Path, path: Path, exc: LockFailed) -> StateError:
    if path.is_symlink():
        return StateError(f"{path} is a symbolic link, which migblockd never follows; "
                          "remove it (the daemon makes its lock file itself)", lasting=True)
    if path.exists() and not path.is_file():
        return StateError(f"{path} is not a regular file; remove it "
                          "(the daemon makes its lock file itself)", lasting=True)
    if exc.errno == errno.EACCES and path.is_file():
        # The file is in the way, not the directory: say so, and whose it is
        # (a directory chowned to the daemon's user without -R, say).
        return StateError(f"cannot open {path}: {exc.strerror} ({_whose(path)}, or "
                          "choose another --state-dir", lasting=not passing(exc.errno))
    if exc.errno == errno.EROFS:
        return StateError(f"cannot open {path}: {exc.strerror}; {read_only(directory)}, "
                          "or choose another --state-dir", lasting=not passing(exc.errno))
    if exc.errno == errno.EPERM and (
            fix := attribute_fix(path, "--state-dir") or attribute_fix(directory, "--state-dir")):
        return StateError(f"cannot open {path}: {exc.strerror}; {fix}",
                          lasting=not passing(exc.errno))
    return StateError(f"cannot open {path}: {exc.strerror}; make {directory} writable "
                      "by this user, or choose another --state-dir", lasting=not passing(exc.errno))


class DatabaseLock:
    """The held lock on a database file; :meth:`release` gives it up (after the
    process's SQLite connections to the file are closed)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int | None:
        """The descriptor holding the file open (None once released): the way back
        to its blockers when the file is removed while the daemon runs."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_database(path: Path) -> DatabaseLock:
    """An exclusive lock on the file ``path`` is (through a link: the file it leads
    to), or :class:`StateError` naming the daemon that has it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise StateError(f"cannot open {path}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir", lasting=not passing(e.errno)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        st = os.fstat(fd)
        os.close(fd)  # before this process's SQLite opens the file: no lock of its to drop
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateError(f"cannot lock {path}: {e.strerror}; "
                             "choose another --state-dir", lasting=not passing(e.errno)) from None
        real = os.path.realpath(path)
        shown = f"{path} (which is {real})" if real != str(path) else str(path)
        holder = _flock_holder(st)
        lock = path.with_name(LOCK_NAME)
        if _holds_removed(holder, lock):
            raise StateError(f"state database {shown} is in use by another migblockd "
                             f"({holder}), which serves this state directory: its lock file "
                             f"{lock} was removed while it ran; stop that daemon, and leave "
                             f"{lock} in place (no daemon leaves a stale one)") from None
        raise StateError(f"state database {shown} is in use by another migblockd "
                         f"({holder}), whose state directory holds the same "
                         "file; stop it, or give each daemon a database of its own") from None
    return DatabaseLock(fd)


def _holds_removed(holder: str, lock: Path) -> bool:
    """Whether ``holder`` (``pid N``, as :func:`_flock_holder` says it) holds
    ``lock`` open under no name: removed while it ran (a clean-up of "stale"
    lock files), the state directory looked free to this start, which took a new
    lock file there and was refused only at the database's own lock.  Told apart
    so that the refusal does not send the operator looking for another
    directory; False when it cannot be told (another user's process)."""
    pid = holder.removeprefix("pid ")
    removed = f"{os.path.realpath(lock.parent)}/{lock.name} (deleted)"
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(fd.path) == removed:
                    return True
    except OSError:
        pass
    return False


def _flock_holder(st: os.stat_result) -> str:
    """``pid N`` of the process holding a ``flock`` on the file ``st`` describes,
    as the kernel lists it (``/proc/locks``); ``pid unknown`` if it cannot say."""
    # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF" (a waiter's has "->" first).
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return "pid unknown"


def _whose(path: Path) -> str:
    """Why this user may not open the lock file ``path``, and the command that fixes it."""
    st = path.stat()
    if st.st_uid == os.geteuid():
        return f"mode {stat.S_IMODE(st.st_mode):04o}); chmod u+rw {path}"
    held, fix = owner_mismatch(path, st)
    return f"{held}); {fix}"


def in_slices(conn: sqlite3.Connection, seconds: float,
              stop: Callable[[], str | None] | None, step: Callable[[], _T]) -> _T:
    """``step()``, a step of the start that takes one of the database's locks (the
    switch to WAL, which in rollback-journal mode waits for readers too; the
    migration's or the proof of writing's ``BEGIN IMMEDIATE``), waiting ``seconds``
    at most while another program holds it (an operator's sqlite3 shell in a
    transaction); sqlite3.Error (``database is locked``) when it still does.  In
    slices of :data:`POLL` (the connection's busy timeout meanwhile, set back to
    ``seconds`` after), looking at ``stop()`` between them (:class:`.StoppedStarting`):
    SQLite's own wait is one call that no signal ends (the handler that keeps a
    SIGTERM runs once it returns), so a stop asked meanwhile waited the busy timeout
    out, and the start then ended as refused (exit 1), not as the stop asked for.
    Each step waits so, not a look before them: the other program may take the lock
    again between the look and the step (one that writes in a loop).  A try that
    fails sooner is followed by a sleep to the slice's end: SQLite calls no busy
    handler for a connection that reads and asks to write (btree.c,
    ``sqlite3BtreeBeginTrans``: it could be waiting on a writer that waits on it),
    which the switch to WAL does, so against a writer of a rollback-journal file
    each try fails at once, and tried again at once they would spin a CPU."""
    deadline = time.monotonic() + seconds
    conn.execute(f"PRAGMA busy_timeout = {int(POLL * 1000)}")
    try:
        while True:
            began = time.monotonic()
            try:
                return step()
            except sqlite3.Error as e:
                if not busy(e) or time.monotonic() >= deadline:
                    raise
                if stop is not None and (name := stop()) is not None:
                    raise StoppedStarting(name) from None
            # A signal's handler runs meanwhile (the sleep goes on after it): the
            # stop it keeps is looked at after the next try, a slice from now.
            time.sleep(max(0.0, min(began + POLL, deadline) - time.monotonic()))
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

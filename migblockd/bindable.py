"""Whether a socket can be claimed at a path: its lock, and why binding there fails.

A daemon's socket path is claimed with an exclusive ``flock`` on ``SOCKET.lock``
beside it (:func:`lock_socket`), which makes one daemon per path; what a start by
this user would meet there, its lock and its binding, is also told without making,
opening or binding anything (:func:`check_socket_writable`, for ``--check-config``
and a reload's look ahead), in the start's own words.  Binding is
:mod:`migblockd.listen`'s.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from migblockd.paths import fallback_socket_dir
from migblockd.pidlock import RESTORE_LEFT, Held, LockFailed, PidLock
from migblockd.socketdir import (
    cannot_create,
    check_fallback,
    check_socket_directory,
    socket_dir_exists,
    whose,
)
from migblockd.startup import StartupError, status_of
from migblockd.trust import unsearchable
from migblockd.writable import attribute_fix, denied, first_missing, in_the_way

__all__ = ["cannot_bind", "check_socket_writable", "lock_failed", "lock_path", "lock_socket"]


def lock_path(socket_path: Path) -> Path:
    """``SOCKET.lock``, beside the socket: the file whose lock makes it one daemon's."""
    return socket_path.with_name(socket_path.name + ".lock")


def lock_socket(socket_path: Path, option: str = "--socket") -> PidLock:
    """The lock on ``SOCKET.lock`` that makes one daemon per socket path."""
    path = lock_path(socket_path)
    try:
        return PidLock.acquire(path)
    except Held as held:
        if held.before_serving:
            # Stopped while it started: no clients to drain, but a restore under way
            # goes on to its end (migblockd.early), which for a big state is longer
            # than any drain.
            raise StartupError(
                f"another migblockd ({held.holder}) is stopping before serving, and holds "
                f"{socket_path} until its start is over (no clients to drain; {RESTORE_LEFT}"
                f"); start again once it has exited, or choose another {option}") from None
        if held.stopping:
            # Not "stop it first": it is stopping already, and its drain may take a
            # while (30 s at most); told apart, the operator waits rather than kills.
            raise StartupError(
                f"another migblockd ({held.holder}) is stopping, and holds {socket_path} "
                "until its stop is over (it drains its clients, 30 s at most); start "
                f"again once it has exited, or choose another {option}") from None
        raise StartupError(
            f"another migblockd ({held.holder}) is already serving {socket_path}; "
            f"refusing to start a second one (stop it first, or choose another "
            f"{option})") from None
    except LockFailed as exc:
        raise StartupError(lock_failed(path, exc, option), status_of(exc.errno)) from None


def lock_failed(path: Path, exc: LockFailed, option: str) -> str:
    what = "open the socket's lock file" if exc.opening else "lock"
    return f"cannot {what} {path}: {exc.strerror}; {_lock_remedy(path, exc, option)}"


def _lock_remedy(path: Path, exc: LockFailed, option: str) -> str:
    """What to do when ``SOCKET.lock`` cannot be opened or locked: whose file or
    directory is in the way (a socket directory made by root for a daemon that
    runs as another user, say), else another socket path."""
    if exc.opening and exc.errno == errno.EPERM:
        fix = attribute_fix(path, option) or attribute_fix(path.parent, option)
        if fix is not None:
            return fix
    if (exc.opening and exc.errno == errno.EACCES
            and not os.access(path.parent, os.X_OK, effective_ids=True)):
        return unsearchable(path.parent, option)
    if exc.opening and exc.errno in (errno.EACCES, errno.EPERM):
        place, fix = (path, "remove it") if path.is_file() else (path.parent, "let this user "
                                                                  "write in it")
        owned = whose(place)
        if owned is not None:
            return f"{owned}: {fix}, or choose another {option}"
    return f"choose another {option}"


def check_socket_writable(socket_path: Path, option: str = "--socket") -> None:
    """The StartupError a start by this user would give at ``socket_path``, found
    without making, opening or binding anything (``--check-config``): a
    directory it could not make on the way, a lock file it could not open, a
    directory it could not take the lock or bind the socket in; with the status
    the start's system call would fail with (the check exits with it)."""
    directory = socket_path.parent
    is_dir = socket_dir_exists(directory, option)
    if os.path.lexists(directory) and not is_dir:
        # A file, where the start opens the lock file; a link to nothing, which the
        # start's mkdir finds there and its judging of the directory refuses.
        if not os.path.exists(directory):
            check_socket_directory(directory, option)
        raise StartupError(lock_failed(lock_path(socket_path), LockFailed(
            os.strerror(errno.ENOTDIR), opening=True, errno=errno.ENOTDIR), option),
            status_of(errno.ENOTDIR))
    if is_dir and directory == fallback_socket_dir():
        check_fallback(directory)  # the start refuses it before it tries to write there
    if not is_dir:
        first = first_missing(directory)
        if not first.parent.is_dir():
            if in_the_way(directory) is not None:  # a file, or a link to nothing, above it
                raise StartupError(cannot_create(directory, OSError(
                    errno.ENOTDIR, os.strerror(errno.ENOTDIR)), option), status_of(errno.ENOTDIR))
            return
        code = denied(first.parent, os.W_OK | os.X_OK)
        if code:
            raise StartupError(cannot_create(directory, OSError(
                code, os.strerror(code), str(first)), option), status_of(code))
        return
    lock = lock_path(socket_path)
    if os.path.islink(lock):
        code = errno.ELOOP  # opened with O_NOFOLLOW
    elif os.path.isdir(lock):
        code = errno.EISDIR
    elif os.path.isfile(lock):
        code = denied(lock, os.R_OK | os.W_OK)
    else:
        code = denied(directory, os.W_OK | os.X_OK)
    if code:
        raise StartupError(lock_failed(lock, LockFailed(
            os.strerror(code), opening=True, errno=code), option), status_of(code))
    code = denied(directory, os.W_OK | os.X_OK)
    if code:
        raise StartupError(cannot_bind(socket_path, OSError(code, os.strerror(code)), option),
                           status_of(code))


def cannot_bind(path: Path, exc: OSError, option: str) -> str:
    fix = attribute_fix(path.parent, option) if exc.errno == errno.EPERM else None
    return f"cannot bind {path}: {exc.strerror or exc}" + (f"; {fix}" if fix else "")

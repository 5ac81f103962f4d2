"""One daemon per state directory: an exclusive ``flock`` on ``DIRECTORY/lock``.

``flock`` locks belong to the open file description, so a second open of the
same directory is refused from another process and from this one alike, and
the kernel drops the lock when the holder exits however it exits: no stale
lock to clean up after a crash.  The holder writes its pid in the file so
that the refusal can say who holds it.  SQLite's own locks are not enough:
two daemons could both read the same state and then take turns writing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from migblockd.state.errors import StateError

__all__ = ["DirectoryLock"]

LOCK_NAME = "lock"


class DirectoryLock:
    """A held lock on a state directory; :meth:`release` gives it up."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path) -> DirectoryLock:
        path = directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"cannot open {path}: {e.strerror}; make {directory} writable "
                             "by this user, or choose another --state-dir") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(f"state directory {directory} is locked by another "
                                 f"migblockd ({holder}); stop it, or use another "
                                 "--state-dir") from e
            raise StateError(f"cannot lock {path}: {e.strerror}; "
                             "choose another --state-dir") from e
        with contextlib.suppress(OSError):  # the pid is a courtesy to whoever is refused
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            # Forget our pid first, so that nobody refused later names a stale one.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    """``pid N`` as the holder wrote it, when it did."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"

"""An exclusive ``flock`` on a file that names its holder: one daemon per resource.

The daemon takes one on its socket's ``SOCKET.lock`` (:mod:`migblockd.listen`)
and one on its state directory's ``lock`` (:mod:`migblockd.state.lock`).
``flock`` locks belong to the open file description, so a second take is
refused from another process and from this one alike, and the kernel drops
the lock when the holder exits however it exits: there is never a stale lock
to clean up after a crash.  The holder writes its pid in the file so that a
refusal can say who holds it.  The file itself is never removed: a holder
that unlinked it on exit could leave a second process holding a lock on the
removed file while a third takes one on a new file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["Held", "LockFailed", "PidLock"]


class Held(Exception):
    """Another process holds the lock; ``holder`` is ``pid N`` (or ``pid unknown``)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class LockFailed(Exception):
    """The lock file could not be opened (``opening``) or locked; ``strerror``
    says why, and ``errno`` is the system's code for it."""

    def __init__(self, strerror: str, *, opening: bool, errno: int | None = None) -> None:
        super().__init__(strerror)
        self.strerror = strerror
        self.opening = opening
        self.errno = errno


class PidLock:
    """A held lock; :meth:`release` gives it up."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> PidLock:
        """Take the lock on ``path`` (created 0600 if missing; never through a symlink)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LockFailed(exc.strerror or str(exc), opening=True, errno=exc.errno) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Held(holder) from None
            raise LockFailed(exc.strerror or str(exc), opening=False, errno=exc.errno) from None
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

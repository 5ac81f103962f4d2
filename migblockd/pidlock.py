"""An exclusive ``flock`` on a file that names its holder: one daemon per resource.

The daemon takes one on its socket's ``SOCKET.lock`` (:mod:`migblockd.listen`)
and one on its state directory's ``lock`` (:mod:`migblockd.state.lock`).
``flock`` locks belong to the open file description, so a second take is
refused from another process and from this one alike, and the kernel drops
the lock when the holder exits however it exits: there is never a stale lock
to clean up after a crash.  The holder writes its pid in the file so that a
refusal can say who holds it, and may add a note after it (:meth:`PidLock.note`)
for the next holder, which finds what the last one wrote in :attr:`PidLock.previous`.
The file itself is never removed: a holder
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

    __slots__ = ("_fd", "_pid", "path", "previous")

    def __init__(self, path: Path, fd: int, previous: bytes = b"") -> None:
        self.path = path
        self._fd: int | None = fd
        self._pid = b""  # the pid as written before a note, while there is one
        #: What the file held when the lock was taken: the last holder's pid and
        #: note (which it leaves behind when it is killed), or nothing.
        self.previous = previous

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
        previous = b""
        with contextlib.suppress(OSError):
            previous = os.pread(fd, _MOST, 0)
        lock = cls(path, fd, previous)
        # The pid is a courtesy to whoever is refused; the note before stays until
        # this holder writes its own (a refused start leaves it for the next one).
        kept = previous.partition(b"\n")[2].partition(b"\n")[0]
        with contextlib.suppress(OSError):
            lock._write(kept)
        return lock

    def note(self, text: str) -> None:
        """Leave ``text`` (one line) after the pid, on disk before returning, for
        the next holder; if it cannot be written, leave no note at all rather
        than the one before (``OSError`` says why)."""
        assert self._fd is not None and "\n" not in text
        try:
            self._write(text.encode("utf-8", "surrogateescape"))
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._write(b"")
            raise

    def _write(self, note: bytes) -> None:
        """The pid, then ``note`` on a line of its own unless it is empty: written
        first, then the file cut to it, so that it is never without a note there was."""
        assert self._fd is not None
        pid = f"{os.getpid()}\n".encode()
        content = pid + note + b"\n" if note else pid
        self._pid = b""
        os.pwrite(self._fd, content, 0)
        os.ftruncate(self._fd, len(content))
        self._pid = pid if note else b""

    def release(self) -> None:
        if self._fd is not None:
            # Forget our pid first, so that nobody refused later names a stale one;
            # a note stays for the next holder (blanks over the pid, in one write).
            with contextlib.suppress(OSError):
                if self._pid:
                    os.pwrite(self._fd, b" " * (len(self._pid) - 1), 0)
                else:
                    os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


#: The most of a lock file read: a pid and a note, a path among them.
_MOST = 1 << 16


def _holder(fd: int) -> str:
    """``pid N`` as the holder wrote it (its first line), when it did."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").split("\n", 1)[0].strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"

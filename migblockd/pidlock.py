"""An exclusive ``flock`` on a file that names its holder: one daemon per resource.

The daemon takes one on its socket's ``SOCKET.lock`` (:mod:`migblockd.listen`)
and one on its state directory's ``lock`` (:mod:`migblockd.state.lock`).
``flock`` locks belong to the open file description, so a second take is
refused from another process and from this one alike, and the kernel drops
the lock when the holder exits however it exits: there is never a stale lock
to clean up after a crash.  The holder writes its pid in the file so that a
refusal can say who holds it, and may add a note after it (:meth:`PidLock.note`)
for the next holder, which finds what the last one wrote in :attr:`PidLock.previous`.
A holder that is stopping says so on a line after them (:meth:`PidLock.stopping`):
its stop may take a while (a drain of 30 s at most, or the rest of a restore of a
big state when the stop came while it started), and a second start refused
meanwhile is to hear that the first is on its way out, not that it serves, and
what it waits for: a holder stopped before it served, which has no clients to
drain, adds a line saying so.  The process's own stop says it in every lock it
holds (:func:`say_stopping`), from the signal's handler, so that no step of the
start has to be reached first.
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

__all__ = ["RESTORE_LEFT", "Held", "LockFailed", "PidLock", "say_stopping"]

#: What a holder stopped before it served (:attr:`Held.before_serving`) still does
#: before it lets go, in the words of the refusals of its socket and its state
#: directory: the stop never cuts a restore short (``migblockd.early``).
RESTORE_LEFT = "a restore of its state under way is finished first, minutes for a large one"


class Held(Exception):
    """Another process holds the lock; ``holder`` is ``pid N`` (or ``pid unknown``);
    ``stopping``: whether it has said that it is stopping (:meth:`PidLock.stopping`),
    and ``before_serving``: that it said so before it served (its start's stop)."""

    def __init__(self, holder: str, *, stopping: bool = False,
                 before_serving: bool = False) -> None:
        super().__init__(holder)
        self.holder = holder
        self.stopping = stopping
        self.before_serving = stopping and before_serving


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

    __slots__ = ("_fd", "_note", "_pid", "_said", "path", "previous")

    def __init__(self, path: Path, fd: int, previous: bytes = b"") -> None:
        self.path = path
        self._fd: int | None = fd
        self._pid = b""  # the pid as written before a note, while there is one
        self._note = b""  # the note written after the pid, if any
        self._said = b""  # the lines saying that the holder is stopping, once it is
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
            holder, stopping, before_serving = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Held(holder, stopping=stopping, before_serving=before_serving) from None
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
        _held.add(lock)
        if _stopping:  # taken by a start whose stop came already: it ends after its step
            lock.stopping(before_serving=True)
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
        self._note = note
        if self._said:
            # The stop's signal came while this was written (its handler runs between
            # any two steps of the main thread): the cut may have taken its line.
            self._say()

    def stopping(self, *, before_serving: bool = False) -> None:
        """Say, on a line after the pid and the note (empty if there is none), that
        the holder is stopping, for whoever is refused the lock until it lets go;
        a note written later keeps the line.  ``before_serving``: the stop came
        before the holder served, so it has no clients to drain, and what keeps the
        lock is the rest of its start (a restore under way); said on one more line,
        after a ``stopping`` line as a drain's, so that a reader that knows only that
        one still hears that the holder stops.  The last said holds.  Best effort: a
        file that cannot be written leaves the refusal as it was.  The next holder
        drops the lines (it keeps the note alone)."""
        self._said = _STOPPING + b"\n" + (_BEFORE_SERVING + b"\n" if before_serving else b"")
        self._say()

    def _say(self) -> None:
        fd = self._fd
        if fd is None:
            return
        content = f"{os.getpid()}\n".encode() + self._note + b"\n" + self._said
        with contextlib.suppress(OSError):
            os.pwrite(fd, content, 0)
            # Cut to it: the note may be shorter than the one there.  The stop's
            # handler, run between _write's cut and its taking the new note, writes
            # the old note (and _write says it again after, with the new one): over
            # a longer old one without a cut, the end of it stayed after the line.
            os.ftruncate(fd, len(content))

    def release(self) -> None:
        fd, self._fd = self._fd, None  # first: a stop's handler then writes nothing
        _held.discard(self)
        if fd is not None:
            # Forget our pid first, so that nobody refused later names a stale one;
            # a note stays for the next holder (blanks over the pid, in one write).
            # The lines saying that the holder is stopping go after it: it has
            # stopped, and an operator reading the file is not to think otherwise.
            with contextlib.suppress(OSError):
                if self._pid:
                    os.pwrite(fd, b" " * (len(self._pid) - 1), 0)
                    if self._said:
                        os.ftruncate(fd, len(self._pid) + len(self._note) + 1)
                else:
                    os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock


def say_stopping() -> None:
    """Say in every lock this process holds, and in each it takes from now on, that
    it is stopping before serving (:meth:`PidLock.stopping`).  For the handler of the
    stop's signal while a daemon starts (``migblockd.early``): it runs in the main
    thread between two of its steps, whatever the start is doing (restoring a big
    state, which a stop does not cut short), so a second start refused meanwhile
    hears at once that this one is on its way out, once its start is over.  Once
    said, it holds for the rest of the process."""
    global _stopping  # noqa: PLW0603 - the process's own stop, one per process
    _stopping = True
    for lock in list(_held):
        lock.stopping(before_serving=True)


#: The locks this process holds (each leaves at its release), for :func:`say_stopping`.
_held: set[PidLock] = set()
#: Whether :func:`say_stopping` was called: a lock taken after it says so at once.
_stopping = False

#: The most of a lock file read: a pid and a note, a path among them.
_MOST = 1 << 16
#: The line a holder that is stopping writes after its pid and its note.
_STOPPING = b"stopping"
#: The line after it of a holder stopped before it served (its start's stop).
_BEFORE_SERVING = b"before serving"


def _holder(fd: int) -> tuple[str, bool, bool]:
    """``pid N`` as the holder wrote it (its first line), when it did, whether it
    says it is stopping (its third line), and before it served (its fourth)."""
    try:
        lines = os.pread(fd, _MOST, 0).split(b"\n")
    except OSError:
        lines = [b""]
    text = lines[0].decode("ascii", "replace").strip()
    if not text.isdigit():
        return "pid unknown", False, False
    stopping = len(lines) > 2 and lines[2] == _STOPPING
    return f"pid {text}", stopping, stopping and len(lines) > 3 and lines[3] == _BEFORE_SERVING

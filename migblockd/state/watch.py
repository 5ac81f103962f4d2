"""The files SQLite has open for a :class:`~migblockd.state.store.Store`, watched.

SQLite goes on writing to the files it has open whatever happens to their
names: a state.db replaced (a backup restored, a copy linked to) or a log
removed ("cleaning up") while the daemon runs would take every change
acknowledged from then on, and the next start would not find them.  Nor does it
notice the file it has open written by another program (a backup copied over
it, the file truncated): what it commits then goes into pages it no longer
knows, and the next start finds a corrupt file.  :meth:`Watched.check` runs
before each group (not after: a group found afterwards to be in such a file
could be reported neither failed nor done) and raises :class:`StateError` for
each case, with the advice that fits it.

What it reads of the files it reads through descriptors kept open, never new
ones: closing any descriptor of a file drops every POSIX lock this process holds
on it, SQLite's included, and another connection (an operator's ``sqlite3``)
would then take itself for the only one: remove the log, or rebuild its index
under the daemon's mapping of it (SIGBUS).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from pathlib import Path

from migblockd.state import schema
from migblockd.state.errors import StateError
from migblockd.state.rescue import RESCUED

__all__ = ["Watched"]

# A file that this user may not look at any more: see _look.
_HIDDEN = (-1, -1)
#: An SQLite database file's header (https://sqlite.org/fileformat.html).
_HEADER_SIZE = 100
#: The log's index up to the end of its checkpoint's counts (walformat.html).
_MARKS_END = 132
#: The byte of the log's index that SQLite's unix VFS locks while a connection folds
#: the log back (UNIX_SHM_BASE, 120, plus WAL_CKPT_LOCK, 1: sqlite3.c).
_CHECKPOINT_LOCK = 121
#: How long, and how often, to wait for another connection's fold to end.
_FOLD_WAIT, _FOLD_WAITS = 0.01, 500


class Watched:
    """The database at ``path`` and its log ``log`` (its real path's), as opened."""

    __slots__ = ("_index", "_index_file", "_index_name", "_largest", "_left", "_log_name",
                 "_marks", "_name", "_opened", "log", "path")

    def __init__(self, path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        # The names as text, for the system calls of every commit: a Path makes its
        # text in Python each time it is handed to one.
        self._name = os.fspath(path)
        self._log_name = os.fspath(log)
        self._index_name = self._log_name.removesuffix("-wal") + "-shm"
        identity, left = _look(self._name)
        # The database and log files SQLite has open (the log: once it exists).
        self._opened = (identity, _look(self._log_name)[0])
        # The database's size and time of change as the daemon last left it, and
        # the largest it has been: SQLite never shrinks it here (no auto_vacuum).
        self._left = left
        self._largest = 0 if left is None else left[0]
        #: The log's index, once read (see index_header), and which file it is.
        self._index: int | None = None
        self._index_file = _HIDDEN
        #: What of the log's index SQLite changes with each write to the database, as
        #: the daemon last left it (see _index_marks); None: not known.
        self._marks = self._index_marks()

    def check(self, fd: int | None) -> None:
        """Refuse (StateError) to commit to files that the next start would not
        read, or that another program wrote to; ``fd``: the database, as the
        database lock holds it open (None: not to be read)."""
        database, log_file = self._opened
        identity, left = _look(self._name)
        departure = self._departure(identity, fd)
        if departure is not None:
            replaced, _ = departure
            if not replaced:
                raise self._removed(fd)
            raise StateError(f"cannot commit to {self.path}: it is not the file the daemon "
                             "opened (it was replaced, moved or removed), and the next start "
                             "would not read what is committed now; put that file back, or "
                             "restart the daemon to use this one",
                             f"put the file the daemon opened back as {self.path}, or "
                             "restart the daemon to use the one there now")
        # Not when either look was refused (a directory's mode changed meanwhile).
        if left is not None and self._left is not None and left != self._left:
            written = _written_over(fd, left[0], self._largest)
            marks = self._index_marks() if self._marks is not None else None
            if written is None and marks is not None and marks == self._marks:
                # SQLite writes the database only to fold the log back into it, and
                # says so in the log's index: a copy of this database's backup, as
                # large as the file, passes every look at the file itself.
                written = ("not through SQLite, which leaves a mark in the log's index "
                           "when it writes there: a copy of a backup written over it?")
            if written is not None:
                raise StateError(
                    f"cannot commit to {self.path}: another program wrote to it since the "
                    f"daemon's last commit ({written}), and what the daemon commits now "
                    "would be mixed with what that program wrote",
                    f"stop the daemon, then restore {self.path} from a backup: the stop "
                    "folds the daemon's log into the file, over what that program wrote")
            # Another SQLite connection folding the log back, say: the file as it is
            # now, looked at after its marks, which a fold sets after writing the file.
            self._leave(left if marks is None else _look(self._name)[1])
            self._marks = marks
        now = _look(self._log_name)[0]
        if log_file is None:
            self._opened = (database, now)  # made since: SQLite makes it at the first read
        elif now not in (log_file, _HIDDEN):
            restart = ("stop the daemon (not with SIGKILL: a clean stop folds that log into "
                       "the database) and start it again")
            raise StateError(f"cannot commit to {self.path}: its log {self.log} was removed "
                             "or replaced while the daemon ran, and SQLite writes on to the "
                             "one it has open, which the next start would not find; "
                             f"{restart}", restart)

    def departed(self, fd: int | None) -> tuple[bool, bool] | None:
        """Whether the database opened (``fd``, as :meth:`check`'s) has left ``path``:
        whether another file is there, and whether a name still holds the one
        opened; None: it is still there."""
        return self._departure(_look(self._name)[0], fd)

    def _departure(self, identity: tuple[int, int] | None,
                   fd: int | None) -> tuple[bool, bool] | None:
        """:meth:`departed`, the path's identity looked up; the descriptor is asked
        only then (never on a commit's way), and tells where the directory may no
        longer be looked in."""
        if identity == self._opened[0]:
            return None
        linked = _linked(fd, identity)
        if identity == _HIDDEN and linked:
            return None
        return identity not in (None, _HIDDEN), linked

    def discard_log(self) -> bool:
        """Remove the log and its index from beside the database's name, if the log
        is still the one the daemon opened: whether it was.  For a database that
        left its name, whose log another program's reading kept from being
        emptied: the next start must not replay it into the file there."""
        log_file = self._opened[1]
        if log_file is None or _look(self._log_name)[0] != log_file:
            return False
        try:
            os.unlink(self._log_name)
        except OSError:
            return False
        with contextlib.suppress(OSError):
            os.unlink(self._index_name)
        return True

    def committed(self) -> None:
        """A commit (or what a failed one did) may have written the database: SQLite
        folds the log back into it once the log is long enough."""
        self._marks = self._index_marks()  # first: see check
        self._leave(_look(self._name)[1])

    def reconnecting(self) -> None:
        """The connection is made again: it may make the log anew."""
        self._opened = (self._opened[0], None)
        self._marks = None

    def index_header(self, size: int = 20) -> bytes:
        """The first ``size`` bytes of the log's index (``state.db-shm``), read
        through a descriptor kept open until :meth:`close`."""
        return os.pread(self._index_open(), size, 0)

    def _index_open(self) -> int:
        """The descriptor of the log's index: the file now at its name."""
        st = os.stat(self._index_name)
        if self._index is None or self._index_file != (st.st_ino, st.st_dev):
            # Another file (SQLite made it anew): no lock of this process is on the
            # old one's inode through SQLite any more, so it may be closed.
            fd = os.open(self._index_name, os.O_RDONLY | os.O_CLOEXEC)
            old, self._index = self._index, fd
            if old is not None:
                os.close(old)
            # The file opened, which may be newer than the one looked at.
            st = os.fstat(fd)
            self._index_file = (st.st_ino, st.st_dev)
        return self._index

    def _index_marks(self) -> bytes | None:
        """What of the log's index (https://sqlite.org/walformat.html) any SQLite
        connection's write to the database changes: the header (a log begun anew
        takes new salts) and the checkpoint's count of frames folded back and of
        frames it tried to fold (``nBackfill``, ``nBackfillAttempted``), not the
        readers' marks, which a mere read moves.  None: not to be read."""
        try:
            fd = self._index_open()
            # A fold under way has written the file, and sets its count after: it
            # holds the checkpoint lock until then (a busy timeout's worth at most).
            # So the index is read once no fold is under way.
            for _ in range(_FOLD_WAITS):
                if not _locked(fd, _CHECKPOINT_LOCK):
                    break
                time.sleep(_FOLD_WAIT)
            index = os.pread(fd, _MARKS_END, 0)
        except OSError:
            return None
        return index[:48] + index[96:100] + index[128:132] if len(index) == _MARKS_END else None

    def close(self) -> None:
        """Let go of the index's descriptor: after SQLite's connection is closed."""
        if self._index is not None:
            os.close(self._index)
            self._index = None

    def _leave(self, left: tuple[int, int] | None) -> None:
        """Remember the database as the daemon (or SQLite) leaves it."""
        self._left = left
        if left is not None and left[0] > self._largest:
            self._largest = left[0]

    def _removed(self, fd: int | None) -> StateError:
        """The error for a database removed while the daemon runs.

        Neither the client's "put that file back" (a removed file has no name
        to link it back by) nor a restart alone would do: SQLite does not fold
        the log into a file whose name is gone, and the next start refuses the
        log without its database.  What was committed is still in the file this
        process holds open (the database lock's descriptor), which the stop
        saves (:mod:`migblockd.state.rescue`) where there is room: on a full
        disk only a copy taken before, to another, keeps it.
        """
        message = (f"cannot commit to {self.path}: it was removed (or moved away) while the "
                   "daemon ran, and the next start would not read what is committed now")
        if fd is None:
            return StateError(message)
        copy = f"cp -p /proc/{os.getpid()}/fd/{fd} DIR/{self.path.name}"
        return StateError(message, (
            "move it back if it was moved; else stop the daemon, which saves its blockers "
            "from the file it holds open as "
            f"{self.path.with_name(self.path.name + RESCUED)}TIME, and rename that to "
            f"{self.path} before starting it again; if its file system is full, copy them "
            f"out before the stop instead ({copy} && cp -p {self.log} DIR/"
            f"{self.path.name}-wal, to a directory DIR with room), and put those in place"))


def _linked(fd: int | None, identity: tuple[int, int] | None) -> bool:
    """Whether a name still holds the database open as ``fd``, which ``identity``
    (the path's, as :func:`_look` gives it) may or may not be: it tells even where
    the directory may no longer be looked in.  Without ``fd``, whether the path
    names a file at all."""
    if fd is None:
        return identity is not None
    try:
        return os.fstat(fd).st_nlink > 0
    except OSError:
        return identity is not None


def _look(path: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Which file ``path`` names (following links), as device and inode, and its
    size and time of last change (any write changes one or the other, a chmod
    neither, as it does the inode's change time), from one ``stat``.  None, None:
    there is none; :data:`_HIDDEN`, None: this user may no longer look (a
    directory's mode changed), which the open files do not mind."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError:
        return _HIDDEN, None
    return (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)


def _locked(fd: int, byte: int) -> bool:
    """Whether another process holds a POSIX lock on ``byte`` of the file open as
    ``fd`` (``F_GETLK``: nothing is taken, so none of SQLite's locks is touched)."""
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, probe)
    except OSError:
        return False
    return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)


#: Linux's struct flock: l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = "hhqqi4x"


def _written_over(fd: int | None, size: int, largest: int) -> str | None:
    """How the database (open as ``fd``), now ``size`` bytes, shows that a program
    other than SQLite wrote to it, or None when it does not.

    Other SQLite connections write to it too, and rightly: an operator's ``PRAGMA
    wal_checkpoint`` folds what the daemon committed back into it (and any later
    connection rewrites the log's index, so that leaves no trace to tell it by).
    So only what no SQLite write here does counts: the file shorter than its
    header, no SQLite header, another application's id, or the file smaller than
    it has been (without auto_vacuum SQLite never shrinks it; an operator's
    ``VACUUM`` would, and is taken for this).  A copy of an older backup of this
    database, no smaller than the file was, passes: the next start then finds
    what it can.
    """
    if size < _HEADER_SIZE:
        return f"it is {size} bytes long, too short for a database: truncated?"
    if fd is None:
        return None
    try:
        header = os.pread(fd, _HEADER_SIZE, 0)  # never a new descriptor: see above
    except OSError:
        return None  # not to be read now: the commit tells
    if not header.startswith(b"SQLite format 3\0"):
        return "it is no longer an SQLite database"
    if int.from_bytes(header[68:72], "big") != schema.APPLICATION_ID:
        return "it is another program's database now: a file copied over it?"
    if size < largest:
        return (f"it is {size} bytes long, smaller than the {largest} the daemon left: "
                "truncated, or an older copy written over it?")
    return None

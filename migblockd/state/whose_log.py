"""Whose log is beside ``state.db``: the file the last daemon here opened, or another's.

SQLite ties its log (``state.db-wal``) to a database by name alone: the first
connection after a crash replays the commits the log holds into whatever file the
name leads to then.  A ``state.db`` replaced while a daemon runs (a backup restored
under it, ``install`` or ``mv`` over the name) is seen by that daemon at its next
commit, which folds its log into its own file and empties it
(:mod:`migblockd.state.store`), and at its stop (:mod:`migblockd.state.rescue`); a
daemon killed before either leaves its log at the name, and the next start would
replay the old file's changes into the one there now: a restored backup's blockers
silently replaced by the old ones, a file of another size corrupted.

So each start notes, in the state directory's lock file (:meth:`PidLock.note`),
which file it opens: the path the kernel resolves ``state.db`` to, that file's
device and inode, and those of the directory holding it, where the log is; and,
once SQLite has made it, the log's.  The next start refuses a log holding commits
when that path, in that same directory, now leads to another file and the log is
the one noted.  A lock with no note (an older migblockd's, or a new directory's), a
database reached through a link that now leads elsewhere, a database moved in with
its own log, and a directory copied or moved to another place whole, note and all
(``cp -a``, which copies a log with its database), tell nothing, and are left to
SQLite as before.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from migblockd.state.errors import StateError
from migblockd.state.logcheck import holds_commits

__all__ = ["check_whose_log", "note_for"]


def note_for(path: Path) -> str:
    """The lock file's note for the database ``path`` (which exists), with its log's
    identity once SQLite has made the log: one line."""
    real = os.path.realpath(path)
    noted: dict[str, object] = {"database": real, "file": _identity(real),
                                "directory": _identity(os.path.dirname(real))}
    with contextlib.suppress(FileNotFoundError):
        noted["log"] = _identity(real + "-wal")
    return json.dumps(noted)


def check_whose_log(path: Path, previous: bytes) -> None:
    """Refuse (StateError) a log beside ``path`` that holds commits for the file
    the note in ``previous`` (the lock file as the last daemon left it) names,
    when ``path`` now leads to another file in the same directory."""
    noted = _read(previous)
    real = os.path.realpath(path)
    if noted is None or noted.get("database") != real:
        return
    try:
        directory = _identity(os.path.dirname(real))
        file = _identity(real)
    except OSError:
        return  # opening it says why
    if noted.get("directory") != directory or noted.get("file") == file:
        return
    log = Path(real + "-wal")
    try:
        # A log moved in with its database (a state-dir moved, as a reload's warning
        # says) is another file than the one the last daemon here wrote.
        if "log" in noted and noted["log"] != _identity(str(log)):
            return
    except FileNotFoundError:
        return
    if not holds_commits(log):
        return
    raise StateError(
        f"{path} is not the file that the last daemon here opened (it was replaced while "
        f"that daemon ran, a backup restored under it, say, and the daemon was killed "
        f"before it saw it), and {log} holds that daemon's changes to the file it "
        "opened, which SQLite would replay into this one; to use "
        f"{path} as it is, move {log} and {real}-shm away; to go on with what the daemon "
        f"kept, put the file it opened back as {path}, if it was moved away rather than "
        "removed", lasting=True)


def _identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


def _read(previous: bytes) -> dict[str, object] | None:
    """The note after the pid in a lock file's content, if it holds one."""
    lines = previous.split(b"\n")
    if len(lines) < 2 or not lines[1]:
        return None
    try:
        noted = json.loads(lines[1].decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        # RecursionError: garbage that json reads as arrays or objects nested past
        # what its decoder recurses.  Unread, a note tells nothing, as no note does:
        # a start that failed on it would keep it for the next one, for ever.
        return None
    return noted if isinstance(noted, dict) else None

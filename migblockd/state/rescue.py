"""The stop of a daemon whose ``state.db`` left its name while it ran.

SQLite does not fold its log back into a database whose name no longer leads
to the file it opened (``databaseIsUnmoved()`` in its pager), nor remove that
log: it leaves ``state.db-wal`` beside the name.  Left so, the next start would
have SQLite replay it into whatever ``state.db`` is then: a backup the
operator restored, or a file made anew, whose pages it overwrites with another
database's (a silent mix of two states, or a corrupt file).  And a file
removed, or replaced by a rename, is gone for good once the daemon lets go of
it, with every blocker it acknowledged.

So before closing such a database the daemon copies it, if no name holds it
any more, to ``state.db.rescued-TIME`` beside it (SQLite's online backup,
through the connection that has it open: the log's changes included), and
folds the log into the file it belongs to and empties it, through the same
connection, so that the log left at the name replays nothing.  A file moved
away (still linked) is thus whole where it went.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path

__all__ = ["RESCUED", "let_go", "rescued_copies"]

log = logging.getLogger("migblockd")

#: What a copy's name adds to the database's, before its time.
RESCUED = ".rescued-"


def rescued_copies(path: Path) -> list[Path]:
    """The copies a stop saved of the database at ``path``, newest last."""
    return sorted(path.parent.glob(path.name + RESCUED + "*"), key=_saved_at)


def _saved_at(copy: Path) -> tuple[str, int]:
    """When ``copy`` was saved, from its name: its time, then its number in that second."""
    stamp, _, n = copy.name.rpartition(RESCUED)[2].partition("-")
    return stamp, int(n) if n.isdecimal() else 1


def let_go(conn: sqlite3.Connection, path: Path, replaced: bool, linked: bool) -> None:
    """Ready ``conn``, the database that left ``path`` while the daemon ran, for
    its close: saved when no name holds it (``linked`` False), and its log
    emptied.  ``replaced``: another file is at ``path`` now."""
    if linked:
        # Not said where: the daemon knows the file, not the name it has now.
        saved = ("the file it opened, under the name it has now, holds every change the "
                 "daemon acknowledged")
    else:
        saved = _save(conn, path, replaced)
    # TRUNCATE: the log, at its name still, must replay nothing into another file.
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as e:
        emptied = f"its log could not be emptied ({e})"
    else:
        emptied = "its log is emptied" if busy == 0 else (
            "its log could not be emptied (another program reads the database)")
    what = "replaced" if replaced else "moved away" if linked else "removed"
    log.warning("stopping: %s was %s while the daemon ran: %s; %s, so that the next start "
                "replays nothing into another file", path, what, saved, emptied)


def _save(conn: sqlite3.Connection, path: Path, replaced: bool) -> str:
    """Copy the database ``conn`` has open beside ``path``; what became of it."""
    copy, made = _made(path)
    if made is not None:
        return f"what it kept could not be saved ({copy}: {made}) and is lost"
    try:
        target = sqlite3.connect(copy)
        try:
            conn.backup(target)
            blockers = target.execute("SELECT count(*) FROM blocker").fetchone()[0]
        finally:
            target.close()
        directory = os.open(copy.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the copy's name too must outlive a crash
        finally:
            os.close(directory)
    except (sqlite3.Error, OSError) as e:
        with contextlib.suppress(OSError):
            os.unlink(copy)
        return f"what it kept could not be saved ({copy}: {e}) and is lost"
    kept = f"{blockers} blocker{'' if blockers == 1 else 's'}"
    if replaced:
        # The file there now may have a log of its own, which SQLite would replay
        # into the copy renamed in its place.
        return (f"what it kept ({kept}) is saved as {copy}; the next start uses the file "
                f"there now; to use the copy instead, stop the daemon, move {path.name}, "
                f"{path.name}-wal and {path.name}-shm away, and rename the copy to {path}")
    return (f"what it kept ({kept}) is saved as {copy}, which the next start names; "
            f"rename that to {path} to use it")


def _made(path: Path) -> tuple[Path, str | None]:
    """A new file for the copy of the database at ``path``: its name, and why it could
    not be made (None: it was).  Made first, and exclusively, so that it is the
    daemon's user's, mode 0600, and no file already there (a copy an earlier stop
    saved in the same second, or the operator's)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1, 100):
        copy = path.with_name(path.name + RESCUED + stamp + ("" if n == 1 else f"-{n}"))
        try:
            os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
        except FileExistsError:
            continue
        except OSError as e:
            return copy, e.strerror or str(e)
        return copy, None
    return copy, "too many copies saved in this second"

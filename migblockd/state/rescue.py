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
    return sorted(path.parent.glob(path.name + RESCUED + "*"))


def let_go(conn: sqlite3.Connection, path: Path, linked: bool, replaced: bool) -> None:
    """Ready ``conn``, the database that left ``path`` while the daemon ran, for
    its close: saved when no name holds it (``linked`` False), and its log
    emptied.  ``replaced``: another file is at ``path`` now."""
    if linked:
        saved = "the file moved away holds every change the daemon acknowledged"
    else:
        saved = _save(conn, path)
    # TRUNCATE: the log, at its name still, must replay nothing into another file.
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as e:
        emptied = f"its log could not be emptied ({e})"
    else:
        emptied = "its log is emptied" if busy == 0 else (
            "its log could not be emptied (another program reads the database)")
    what = "replaced" if replaced else "moved away" if linked else "removed"
    next_start = ("the next start uses the file there now" if replaced else
                  f"the next start refuses the log left without {path.name}")
    log.warning("stopping: %s was %s while the daemon ran: %s; %s, so that the next start "
                "replays nothing into another file; %s", path, what, saved, emptied,
                next_start)


def _save(conn: sqlite3.Connection, path: Path) -> str:
    """Copy the database ``conn`` has open beside ``path``; what became of it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = path.with_name(path.name + RESCUED + stamp)
    try:
        # Made first, so that it is the daemon's user's, mode 0600, and not a
        # file already there.
        os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as e:
        return f"what it kept could not be saved ({copy}: {e.strerror or e}) and is lost"
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
    return (f"what it kept ({blockers} blocker{'' if blockers == 1 else 's'}) is saved as "
            f"{copy}; rename that to {path} to use it")

"""The stop of a daemon whose ``state.db`` left its name while it ran.

SQLite does not fold its log back into a database whose name no longer leads
to the file it opened (``databaseIsUnmoved()`` in its pager), nor remove that
log: it leaves ``state.db-wal`` beside the name.  Left so, the next start would
have SQLite replay it into whatever ``state.db`` is then: a backup the
operator restored, or a file made anew, whose pages it overwrites with another
database's (a silent mix of two states, or a corrupt file).  And a file
removed, or replaced by a rename, is gone for good once the daemon lets go of
it, with every blocker it acknowledged.

So before closing such a database the daemon first folds the log into the file
it belongs to and empties it, through the connection that has that file open:
from then on the log left at the name replays nothing, however the rest of the
stop ends (a second kill, a timeout).  Then, if no name holds the file any
more, it copies it to ``state.db.rescued-TIME`` beside it (SQLite's online
backup through the same connection), made whole under a name of its own and
linked into place, so that a copy by that name is always whole.  A file moved
away (still linked) is whole where it went.  A state directory removed whole
(``rm -rf``, starting from scratch without stopping the daemon) is made again
for the copy: otherwise the copy, and every blocker acknowledged, is lost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["RESCUED", "let_go", "rescued_copies", "sync_path"]

log = logging.getLogger("migblockd")

#: What a copy's name adds to the database's, before its time.
RESCUED = ".rescued-"
#: A copy's time (UTC, to the second), and its number within that second.
_STAMP = re.compile(r"(\d{8}T\d{6}Z)(?:-(\d+))?")


def rescued_copies(path: Path) -> list[Path]:
    """The copies a stop saved of the database at ``path``, oldest first."""
    found = []
    for each in path.parent.glob(path.name + RESCUED + "*"):
        stamp = _STAMP.fullmatch(each.name.removeprefix(path.name + RESCUED))
        if stamp is not None:  # not a copy being made (.partial), nor its journal
            found.append((stamp.group(1), int(stamp.group(2) or 1), each))
    return [each for *_, each in sorted(found)]


def let_go(conn: sqlite3.Connection, path: Path, replaced: bool, linked: bool, *,
           discard_log: Callable[[], bool]) -> None:
    """Ready ``conn``, the database that left ``path`` while the daemon ran, for
    its close: its log emptied, then the file saved when no name holds it
    (``linked`` False), or when the log could not be emptied (the file, wherever
    it went, lacks what the log holds).  ``replaced``: another file is at
    ``path`` now.  ``discard_log()`` removes the log from beside the name, if it
    is still the daemon's: once saved, one another program's reading keeps from
    being emptied must not be replayed into the file there."""
    # TRUNCATE: the log, at its name still, must replay nothing into another file.
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as e:
        why: str | None = str(e)
    else:
        why = None if busy == 0 else "another program reads the database"
    if linked and why is None:
        # Not said where: the daemon knows the file, not the name it has now.
        saved, copied = ("the file it opened is under another name now: move it back to "
                         "use it"), False
    else:
        # Read through the connection: the log's changes are in the copy.
        saved, copied = _save(conn, path, replaced)
    if why is None:
        emptied = "its log is emptied"
    elif copied and discard_log():
        emptied = f"its log, which could not be emptied ({why}), is removed from there"
    else:
        emptied = (f"its log could not be emptied ({why}): move {path.name}-wal and "
                   f"{path.name}-shm away before the next start")
    what = "replaced" if replaced else "moved away" if linked else "removed"
    log.warning("stopping: %s was %s while the daemon ran: %s, so that the next start "
                "replays nothing into another file; %s", path, what, emptied, saved)


def _save(conn: sqlite3.Connection, path: Path, replaced: bool) -> tuple[str, bool]:
    """Copy the database ``conn`` has open beside ``path``: what became of it, and
    whether the copy was made."""
    remade = _remade(path.parent)
    copy, partial, made = _made(path)
    if made is not None:
        return f"what it kept could not be saved ({copy}: {made}) and is lost", False
    try:
        # Counted through the daemon's connection: opening the copy to count would
        # make its log and index, which a nearly full disk may not have room for.
        blockers = conn.execute("SELECT count(*) FROM blocker").fetchone()[0]
        target = sqlite3.connect(partial)
        try:
            conn.backup(target)
        finally:
            target.close()
        sync_path(partial)
        try:
            os.link(partial, copy)  # never over another file
            os.unlink(partial)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            os.rename(partial, copy)  # a file system without hard links: named, free
        sync_path(copy.parent)  # the copy's name too must outlive a crash
    except (sqlite3.Error, OSError) as e:
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(partial.with_name(partial.name + suffix))
        return f"what it kept could not be saved ({copy}: {e}) and is lost", False
    kept = f"{blockers} blocker{'' if blockers == 1 else 's'}"
    if replaced:
        # The file there now may have a log of its own, which SQLite would replay
        # into the copy renamed in its place.
        return (f"what it kept ({kept}) is saved as {copy}; the next start uses the file "
                f"there now; to use the copy instead, stop the daemon, move {path.name}, "
                f"{path.name}-wal and {path.name}-shm away, and rename the copy to {path}"
                ), True
    if remade:
        return (f"what it kept ({kept}) is saved as {copy}, in {copy.parent}, which was "
                "removed too and is made again for it; the next start names it; rename that "
                f"to {path} to use it"), True
    return (f"what it kept ({kept}) is saved as {copy}, which the next start names; "
            f"rename that to {path} to use it"), True


def _remade(directory: Path) -> bool:
    """Make the state ``directory`` again (mode 0700, as a start makes it) when it
    is gone: whether it was made.  Removed whole while the daemon ran (``rm -rf``
    to start from scratch without a stop first), it would otherwise take the only
    copy of what the daemon acknowledged with it; made again, it holds the copy,
    which the next start names rather than starting empty.  Only the directory
    itself: the one above it was judged at the start, and one gone too is not
    guessed at."""
    if os.path.lexists(directory):
        return False
    try:
        os.mkdir(directory, 0o700)
    except OSError:
        return False  # the copy's open then says why
    with contextlib.suppress(OSError):
        sync_path(directory.parent)  # its name, as the copy's, must outlive a crash
    return True


def _made(path: Path) -> tuple[Path, Path, str | None]:
    """Names for the copy of the database at ``path``, and the file it is made in
    (made exclusively: the daemon's user's, mode 0600); why that could not be
    made (None: it was).  Neither is a file already there: a copy an earlier
    stop saved in the same second, or the operator's."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in range(1, 100):
        copy = path.with_name(path.name + RESCUED + stamp + ("" if n == 1 else f"-{n}"))
        partial = copy.with_name(copy.name + ".partial")
        # Nor beside what a stop killed while it made one left: SQLite would
        # read a log left there into the new copy.
        if any(os.path.lexists(copy.with_name(copy.name + suffix)) for suffix in
               ("", ".partial-wal", ".partial-shm", ".partial-journal")):
            continue
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600))
        except FileExistsError:
            continue
        except OSError as e:
            return copy, partial, e.strerror or str(e)
        return copy, partial, None
    return copy, partial, "too many copies saved in this second"


def sync_path(path: Path) -> None:
    """fsync ``path`` (a file SQLite has let go of, or a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

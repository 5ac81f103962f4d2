"""Room on the state directory's disk: what a group that adds blockers must leave.

A commit appends its pages to SQLite's log, which is folded back into the
database after it; the fold needs the database to grow into the disk first.
A group of adds that took the last of the disk left a log that could not be
folded back, and then every commit, a delete too, needed the log to grow and
failed, also after a restart.  So a group that adds blockers measures itself in
its own transaction, before ``COMMIT`` (:meth:`Room.check`), and is rolled
back unless the disk holds it, the database's growth for the fold, and
:data:`KEPT_PAGES` of the log for a group of deletes, which is never refused
here and may use what is kept for it.
"""
from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

from migblockd.state.errors import StateError, free_space
from migblockd.state.watch import Watched

__all__ = ["KEPT_PAGES", "NoRoom", "Room", "file_size", "pages"]

# The log's pages that a group which adds blockers must leave room for on the
# disk: what a group of deletes writes to the log (a leaf of the table, the
# pages a rebalance touches, the freelist's, the header's), so that deleting
# blockers always works on a disk that adds filled, and frees pages for more.
KEPT_PAGES = 16
# Pages a group writes besides those it adds or takes from the freelist: the
# header, the freelist's, a parent and a sibling a split changes; and one more for
# each row (the leaf it goes in).  Rebalances can touch more: the kept pages absorb that.
TOUCHED_PAGES = 4
# The log's header, and the header of each of its frames (https://sqlite.org/walformat.html).
_LOG_HEADER, _FRAME_HEADER = 32, 24


class NoRoom(Exception):
    """A group that adds blockers would leave less free space than :data:`KEPT_PAGES`
    of the log: its transaction is rolled back before it commits."""

    def __init__(self, free: int, needed: int, kept: int) -> None:
        super().__init__(free, needed, kept)
        self.free, self.needed, self.kept = free, needed, kept

    def error(self, path: Path) -> StateError:
        remedy = ("delete blockers (deletes may use the space kept for them, and free pages "
                  "for new blockers), or free space on the state directory's file system")
        if self.needed > self.free:
            return StateError(f"cannot commit to {path}: database or disk is full", remedy)
        return StateError(f"cannot commit to {path}: database or disk is full ({_kib(self.free)} "
                          f"free, and the last {_kib(self.kept)} are kept for deleting "
                          "blockers)", remedy)


def _kib(size: int) -> str:
    return f"{max(0, size) // 1024} KiB"


class Room:
    """The disk room a store's commits need: its database, its log, and the file
    system they are on (the real one: ``state.db`` may be a link)."""

    __slots__ = ("_database", "_files", "_log", "_page_size", "_watched")

    def __init__(self, database: Path, log: Path, page_size: int, watched: Watched) -> None:
        self._database = database
        self._files = database.parent
        self._log = log
        self._page_size = page_size
        self._watched = watched

    def check(self, conn: sqlite3.Connection, before: tuple[int, int], puts: int, *,
              folded: bool) -> None:
        """Raise :class:`NoRoom` unless the group in ``conn``'s transaction, which
        adds ``puts`` rows to a database of ``before`` pages (all, free), leaves
        room on the disk for a group of deletes (:data:`KEPT_PAGES` of the log).
        ``folded``: the log is known to be folded back whole.

        It needs room twice: for its pages in the log, where they do not fit in
        space the log has, and, to fold the log back, for the database to grow
        into.  Without the second a commit could take the last of the disk and
        leave the log unfoldable: then every commit, a delete too, would need the
        log to grow, and fail.  So the group must fit, the database's growth with
        it (and a few pages more, for a bound that falls short); and what stays
        for deletes after it, free space and a folded log's (which the next commit
        writes over from its start), must be the kept pages at least: the log's
        growth is for deletes too, the database's never comes back.  Deletes need
        no room of their own (the pages they free go to the table's freelist), and
        are never refused here: they may use what is kept for them.
        """
        total, free_pages = pages(conn)
        size = self._page_size
        frames = max(0, total - before[0]) + max(0, before[1] - free_pages) + (
            TOUCHED_PAGES + puts)
        written = _LOG_HEADER + frames * (_FRAME_HEADER + size)
        log_size = file_size(self._log)
        reusable = log_size
        if not folded:
            # After what the log holds, as its index says (https://sqlite.org/walformat.html).
            try:
                held = int.from_bytes(self._watched.index_header()[16:20], sys.byteorder)
            except OSError:
                held = log_size // (_FRAME_HEADER + size) + 1
            written += held * (_FRAME_HEADER + size)
            reusable = 0
        grows = max(0, total * size - file_size(self._database))
        needed = max(0, written - log_size) + grows
        if needed == 0:
            return
        kept = _LOG_HEADER + KEPT_PAGES * (_FRAME_HEADER + size)
        free = free_space(self._files)
        if free - needed < TOUCHED_PAGES * size or free + reusable - grows < kept:
            raise NoRoom(free, needed, kept)


def pages(conn: sqlite3.Connection) -> tuple[int, int]:
    """The database's size in pages, and how many of them are free, as ``conn`` sees it."""
    pages: int = conn.execute("PRAGMA page_count").fetchone()[0]
    free: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return pages, free


def file_size(path: Path) -> int:
    """The size of the file at ``path``; 0 if there is none."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0

"""The log checked against its index before SQLite rebuilds the index from it.

After a crash, the first connection to open the database throws away the log's
index (``state.db-shm``) and rebuilds it from the log (``state.db-wal``),
keeping every commit up to the first frame that is missing, does not belong to
the log or fails its checksum: a log cut short (by hand, or by a tool "cleaning
up" after the crash), removed or damaged silently takes the commits after that
point with it, and the daemon would restore fewer blockers than it
acknowledged.  The index still says how far the log went: its header records
the last committed frame, and how many frames were already copied into the
database.  So before SQLite opens the file, the log must still hold every
frame the index records, whole (the formats: https://sqlite.org/walformat.html
and https://sqlite.org/fileformat2.html#walformat).  Checking each frame's
checksum costs about 0.1 ms a page here, so about 0.1 s at a start after a
crash with a full log (it is folded back at 1000 pages); a clean stop leaves
no index, and then nothing is read.

An index that cannot be read, whose two copies of the header differ or whose
checksum fails tells nothing (SQLite ignores it too); so does one whose salts
are not the log's: the log was begun again after the index was last written to
the disk (a power cut then keeps an older index), and its frames are all in
the database.

A log removed or emptied is refused too, although it is what a program whose
SQLite keeps the index in its own memory (exclusive locking mode, the
unix-excl VFS) leaves when it opens the database after the crash: it folds the
log into the database, then removes or empties it, and leaves the index as it
was.  Nothing on disk tells that from a log removed by hand, so the refusal
says both, and what to do then.

:func:`stored_format` reads the log too, for ``--check-config``, which opens no
database but must tell a database that needs a migration: its format is in
the first page, which the log's last commit may hold newer than the file.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

from migblockd.state.errors import StateError

__all__ = ["check_log", "holds_commits", "stored_format"]

# The index's header (two copies, 48 bytes each, in the machine's byte order),
# then the checkpoint's: how many frames are in the database already.
_HEADER = struct.Struct("=IIIBBHII8s8sII")
_VERSION = 3007000
_BACKFILLED = struct.Struct("=I")
# The log's header (32 bytes, big-endian), and each frame's (24, then a page).
_LOG_HEADER = struct.Struct(">IIII8sII")
_MAGIC = 0x377F0682  # | 1: checksums of big-endian words
_FRAME = struct.Struct(">II8sII")
# In the database's first page (its file header): user_version, then application_id.
_FORMAT = struct.Struct(">I4xI")
_FORMAT_AT = 60
_GONE, _EMPTY = "it is missing", "it is empty"


def check_log(log: Path, index: Path) -> None:
    """Refuse (StateError) a log that no longer holds, whole, the frames its index
    records as committed: SQLite would replay only those before the first one
    missing.  (None of it left is fine when the database has every frame.)"""
    recorded = _recorded(index)
    if recorded is None:
        return
    frames, backfilled, salts = recorded
    why = _missing(log, frames, salts)
    if why is None or (why[0] == 0 and frames <= backfilled):
        return  # whole; or nothing of it left, and the database has every frame
    # Gone or empty: maybe folded into the database by another program (see
    # the module's doc), which only the operator can know.
    folded = (f"; if a program opened {log.with_name(log.name.removesuffix('-wal'))} in "
              "exclusive locking mode since the crash, it folded the log into the "
              "database and left the index behind: then nothing is lost, and removing "
              f"{index} is all there is to do") if why[1] in (_GONE, _EMPTY) else ""
    raise StateError(f"{log} has lost changes that its index {index} records as committed "
                     f"({why[1]}), so starting would drop blockers that were acknowledged; "
                     "restore the state directory from a backup, or remove "
                     f"{index} to start with what the log still holds (the rest is lost)"
                     f"{folded}", lasting=True)


def stored_format(database: Path) -> tuple[int, int] | None:
    """The database's (``application_id``, ``user_version``) as SQLite would read
    them, without opening it: from its first page as the log's last commit holds
    it (a migration not yet folded back when a crash came), else from the file;
    None when they cannot be read."""
    real = os.path.realpath(database)
    try:
        with open(real, "rb") as f:
            first = f.read(_FORMAT_AT + _FORMAT.size)
    except OSError:
        return None
    first = _committed_first_page(Path(real + "-wal")) or first
    if len(first) < _FORMAT_AT + _FORMAT.size:
        return None
    version, app_id = _FORMAT.unpack_from(first, _FORMAT_AT)
    return app_id, version


def holds_commits(log: Path) -> bool:
    """Whether ``log`` holds a commit that SQLite's recovery would replay into the
    database the name beside it leads to (False when it cannot be read)."""
    return any(commit for _, commit, _ in _frames(log))


def _committed_first_page(log: Path) -> bytes | None:
    """The database's first page as the last commit in ``log`` that wrote it has it."""
    pending, committed = None, None
    for number, commit, data in _frames(log):
        pending = data if number == 1 else pending
        if commit:  # the last frame of a transaction: what it wrote counts
            committed, pending = pending or committed, None
    return committed


def _frames(log: Path) -> Iterator[tuple[int, int, bytes]]:
    """Each frame of ``log`` (its page's number, its commit field, the page), read
    as SQLite's recovery reads them: up to the first that is cut short, not of
    this log or fails its checksum."""
    try:
        with open(log, "rb") as f:
            valid = _valid_header(f.read(_LOG_HEADER.size))
            if valid is None:
                return
            big, page, salts, chained = valid
            while len(head := f.read(_FRAME.size)) == _FRAME.size:
                data = f.read(page)
                number, commit, frame_salts, sum1, sum2 = _FRAME.unpack(head)
                if len(data) < page or frame_salts != salts:
                    return
                chained = _checksum(head[:8] + data, big, *chained)
                if chained != (sum1, sum2):
                    return
                yield number, commit, data
    except OSError:
        return


def _recorded(index: Path) -> tuple[int, int, bytes] | None:
    """The last committed frame the index records, how many are in the database
    already, and the log's salts; None when the index tells nothing."""
    try:
        with open(index, "rb") as f:
            data = f.read(_HEADER.size * 2 + _BACKFILLED.size)
    except OSError:
        return None
    if len(data) < _HEADER.size * 2 + _BACKFILLED.size:
        return None
    first, second = data[:_HEADER.size], data[_HEADER.size:_HEADER.size * 2]
    version, _, _, initialised, _, _, frames, _, _, salts, sum1, sum2 = _HEADER.unpack(first)
    if first != second or version != _VERSION or not initialised:
        return None
    if _checksum(first[:40], sys.byteorder == "big", 0, 0) != (sum1, sum2):
        return None
    (backfilled,) = _BACKFILLED.unpack_from(data, _HEADER.size * 2)
    return frames, backfilled, salts


def _missing(log: Path, frames: int, salts: bytes) -> tuple[int, str] | None:
    """None if ``log`` holds its first ``frames`` frames whole: each with ``salts``
    and its checksum right; else how many it holds before the first that is
    not, and what is wrong."""
    try:
        with open(log, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = f.read(_LOG_HEADER.size)
            if len(header) < _LOG_HEADER.size:
                return 0, _EMPTY if not header else "its header is cut short"
            valid = _valid_header(header)
            if valid is None:
                return 0, "its header is damaged"
            # Each frame's checksum goes on from the one before, the header's first.
            big, page, its_salts, chained = valid
            if its_salts != salts:
                return None  # begun again since the index was written: see the module's doc
            whole = (size - _LOG_HEADER.size) // (_FRAME.size + page)
            for n in range(min(frames, whole)):
                head = f.read(_FRAME.size)
                number, _, frame_salts, sum1, sum2 = _FRAME.unpack(head)
                if number == 0 or frame_salts != salts:
                    return n, f"frame {n + 1} of {frames} is not one of its frames"
                chained = _checksum(head[:8] + f.read(page), big, *chained)
                if chained != (sum1, sum2):
                    return n, f"frame {n + 1} of {frames} is damaged"
    except FileNotFoundError:
        return 0, _GONE
    except OSError as e:
        return 0, f"it cannot be read: {e.strerror}"
    if whole < frames:
        return whole, f"it holds {whole} of the {frames} frames"
    return None


def _valid_header(header: bytes) -> tuple[bool, int, bytes, tuple[int, int]] | None:
    """The log's header, when whole and sound: whether its checksums read the words
    big-endian, its page size, its salts and its own checksum; None otherwise."""
    if len(header) < _LOG_HEADER.size:
        return None
    magic, _, page, _, salts, sum1, sum2 = _LOG_HEADER.unpack(header)
    big = magic & 1 == 1
    if (magic | 1 != _MAGIC | 1 or page < 512 or page > 65536 or page & (page - 1)
            or _checksum(header[:24], big, 0, 0) != (sum1, sum2)):
        return None
    return big, page, salts, (sum1, sum2)


def _checksum(data: bytes, big: bool, s1: int, s2: int) -> tuple[int, int]:
    """SQLite's checksum of the log and its index (walChecksumBytes), going on
    from ``s1`` and ``s2``: the words in pairs, in order."""
    order = ">" if big else "<"
    bulk = len(data) - len(data) % 32
    # Four pairs a turn, masked once: a third less time than a pair a turn.
    for a, b, c, d, e, f, g, h in struct.iter_unpack(f"{order}8I", data[:bulk]):
        s1 += a + s2
        s2 += b + s1
        s1 += c + s2
        s2 += d + s1
        s1 += e + s2
        s2 += f + s1
        s1 += g + s2
        s2 += h + s1
        s1 &= 0xFFFFFFFF
        s2 &= 0xFFFFFFFF
    for x0, x1 in struct.iter_unpack(f"{order}2I", data[bulk:]):
        s1 = (s1 + x0 + s2) & 0xFFFFFFFF
        s2 = (s2 + x1 + s1) & 0xFFFFFFFF
    return s1, s2

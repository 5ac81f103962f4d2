"""The database's files as files, checked before SQLite opens them.

``state.db``, its log (``-wal``) and the log's index (``-shm``) are judged
with stat(2), open(2) and a plain read of the file's first bytes: what they
are, whose, their mode (sshd's StrictModes, as for their directory,
:mod:`migblockd.state.directory`), whether this user may open them, and
whether the file starts as SQLite's do.

Before SQLite, because SQLite says too little of these files or acts on them
before it fails: of a file it may not open it says only "unable to open
database file" (and of its log, blames the database); SQLite has no rule on
whose a file is or who may write it; a log left without its database it
replays into whatever file takes that name (a backup put there); and a file of
one byte it takes for an empty database, which a first start would write over.

Without SQLite, because ``--check-config`` runs these checks beside a running
daemon, where SQLite could make the log's index or take the file's locks.  The
log's frames are judged by the start alone (:mod:`migblockd.state.logcheck`):
a running daemon's log changes as it is read.  Opening a file with open(2) and
closing it drops every POSIX lock this process holds on it, SQLite's included,
so the daemon never runs these checks on a database it has open (``database``
of :func:`migblockd.state.directory.check_existing_directory`).  The start runs
them from :mod:`migblockd.state.opening`, which then lets SQLite open the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from pathlib import Path

from migblockd.databases import group_name
from migblockd.startup import passing
from migblockd.state.errors import StateError, owner_mismatch, read_only
from migblockd.state.rescue import RESCUED, rescued_copies
from migblockd.trust import named_uid, writers, writers_named
from migblockd.writable import attribute_fix

__all__ = ["check_existing_database", "hot_journal"]

# The first bytes of every SQLite database file (its file format's header string).
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_existing_database(path: Path, *, owner: int | None = None) -> bool:
    """What the start refuses of the database, its log and the log's index before
    SQLite opens them (what they are, their owner, mode and access, the file's
    first bytes), found with stat(2), open(2) and a plain read, without SQLite and
    without making or locking anything: ``--check-config`` runs it beside the
    daemon, where SQLite could make the index or take the file's locks.  Not the
    log's frames (:func:`migblockd.state.logcheck.check_log`): a running daemon's
    log changes as it is read.

    ``owner``: a uid whose files are trusted as this user's, as
    :func:`migblockd.state.directory.check_existing_directory`'s: root checking for
    a daemon that runs as that user, whose access it leaves to the start.  True:
    there is no database yet."""
    wal = path.with_name(path.name + "-wal")
    try:
        st = path.stat()
    except FileNotFoundError:
        # A copy a stop saved of a state.db that left its name (migblockd.state.rescue)
        # is the state: never a start without it, empty, nor one that ignores it.
        copies = rescued_copies(path)
        saved = ""
        if copies:
            # Which stop saved it, the start cannot tell: it says when.
            others = (f", the newest by name of {len(copies)} copies there (compare their "
                      "times: a clock set back orders names wrong)" if len(copies) > 1 else "")
            saved = (f"; a stop saved what a daemon kept as {copies[-1]} "
                     f"({_when(copies[-1])}){others}, which may be older than the "
                     f"{path.name} there was")
        if path.is_symlink():
            # Say, a volume not mounted yet: starting empty would drop its state.
            raise StateError(f"{path} is a symbolic link to {os.readlink(path)}, which does "
                             f"not exist{saved}; make it reachable (a file system not "
                             "mounted?), or remove the link to start from scratch") from None
        # SQLite would replay a leftover log into the new, empty database, or into
        # a backup put in its place: it cannot tell that the log is another file's.
        # A database removed under a daemon leaves this too (SQLite does not fold
        # the log into a file whose name is gone).  A stop that saved a copy left
        # the log empty before it made the copy; a log with frames, or emptied
        # after the copy (by the daemon on a full disk, by an operator), is of a
        # daemon killed since: a copy then holds an earlier state.
        copy = _saved_with(wal, copies)
        if copy is not None:
            raise StateError(
                f"{wal} exists without {path.name}, which was removed while "
                f"the daemon ran; the stop saved what it kept as {copy}: rename that "
                f"to {path} to use it, or move the whole directory away to restore a "
                "backup or to start from scratch", lasting=True) from None
        if os.path.lexists(wal):
            raise StateError(
                f"{wal} exists without {path.name}{saved}; put back the {path.name} it is "
                "the log of (the file moved away), not a backup, into which SQLite would "
                "replay it; or move the whole directory away to restore a backup or to start "
                "from scratch", lasting=True) from None
        journal = path.with_name(path.name + "-journal")
        if hot_journal(str(journal)):
            # Likewise a rollback journal: SQLite rolls it back into whatever file
            # takes the name, writing the old file's pages over it.
            raise StateError(
                f"{journal} exists without {path.name}, and holds a transaction to roll "
                f"back{saved}; put back the {path.name} it is the journal of (the file "
                "moved away), not a backup, into which SQLite would roll it back; or move "
                "the whole directory away to restore a backup or to start from scratch"
                , lasting=True) from None
        if copies:
            raise StateError(
                f"{path} does not exist{saved}: rename that to {path} to use it, or move "
                f"the copies ({path.name}{RESCUED}*) away to start from scratch",
                             lasting=True) from None
        return True
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir", lasting=not passing(e.errno)) from e
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"{path} is not a regular file; move it away to start from scratch",
                         lasting=True)
    if st.st_size == 0:
        # migblockd creates the file whole (see opening._create): this one was cut short.
        raise StateError(f"{path} is empty (0 bytes): it was truncated; restore it from a "
                         "backup, or move it away to start from scratch", lasting=True)
    # SQLite keeps the log and its index beside the file a link leads to.
    real = Path(os.path.realpath(path))
    log_file, index_file = (real.with_name(real.name + suffix) for suffix in ("-wal", "-shm"))
    _check_left_log(wal, path, real, log_file)
    companions = [path, log_file, index_file]
    journal = real.with_name(real.name + "-journal")
    with contextlib.suppress(OSError):
        # SQLite opens a rollback journal that is not empty (a hot one, to roll it back):
        # one it may not open fails the start as "unable to open database file".
        st = journal.lstat()
        if st.st_size or not stat.S_ISREG(st.st_mode):
            companions.append(journal)
    for each in companions:
        _check_companion(each, path, owner)
    _check_header(path)
    return False


def hot_journal(journal: str) -> bool:
    """Whether ``journal`` may hold a transaction to roll back, as SQLite tells
    (``hasHotJournal()``, but for the locks): a file whose first byte is not 0."""
    try:
        fd = os.open(journal, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # none (or not one SQLite would open either)
    try:
        return os.pread(fd, 1, 0) not in (b"", b"\0")
    except OSError:
        return False
    finally:
        os.close(fd)


def _saved_with(wal: Path, copies: list[Path]) -> Path | None:
    """The copy the stop that left ``wal`` saved, if it left it as such a stop does:
    empty, and not written since.  The first copy made after the log was emptied
    (by time of change, not by name: a clock set back since orders names wrong)."""
    try:
        log = wal.lstat()
    except OSError:
        return None
    if log.st_size != 0:
        return None
    made = []
    for copy in copies:
        with contextlib.suppress(OSError):
            if (changed := copy.lstat().st_mtime_ns) >= log.st_mtime_ns:
                made.append((changed, copy))
    return min(made)[1] if made else None


def _when(copy: Path) -> str:
    """When ``copy`` was made, as its time of change says (UTC)."""
    try:
        changed = copy.lstat().st_mtime
    except OSError:
        return "when, unknown"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(changed))


def _check_header(path: Path) -> None:
    """Refuse a file that does not start as every SQLite database does.  SQLite
    itself takes a file of one byte for an empty database (its Unix VFS reports
    such a file's size as 0), which would be written over as a first start."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir", lasting=not passing(e.errno)) from e
    if header != _SQLITE_HEADER:
        raise StateError(f"{path} is not a migblockd state database (file is not a "
                         "database); move it away to start from scratch", lasting=True)


def _check_left_log(wal: Path, path: Path, real: Path, log_file: Path) -> None:
    """Refuse a log beside ``path`` that SQLite would not read, because ``path``
    links to ``real``: left there when the database was moved and linked to
    after a crash, it holds changes committed since the last checkpoint, which
    starting without it would drop."""
    try:
        size = wal.lstat().st_size
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot read {wal}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir", lasting=not passing(e.errno)) from e
    if size == 0 or os.path.realpath(wal) == str(log_file):  # empty, or the one SQLite reads
        return
    raise StateError(f"{wal} holds changes that SQLite would not read: {path} links to "
                     f"{real}, whose log is {log_file}; move {wal} there, or put the database "
                     "back in place of the link", lasting=True)


def _check_companion(each: Path, path: Path, owner: int | None) -> None:
    """``each`` (the database, its log, the log's index or a rollback journal that is
    not empty) must be a regular file
    this user (or ``owner``: :func:`check_existing_database`) can read and write,
    if it exists."""
    try:
        st = each.lstat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot read {each}: {e.strerror}; fix its permissions, "
                         "or choose another --state-dir", lasting=not passing(e.errno)) from e
    if each.name.endswith("-journal") and not stat.S_ISREG(st.st_mode):
        raise StateError(f"{each} is not a regular file, which SQLite would have to open as "
                         f"{path.name}'s rollback journal; put the journal itself there (a "
                         "link is never followed), or restore the directory from a backup",
                         lasting=True)
    if each != path and not stat.S_ISREG(st.st_mode):
        raise StateError(f"{each} is not a regular file; move it away (it is not "
                         f"{path.name}'s log), or restore the directory from a backup",
                         lasting=True)
    if each == path:
        st = each.stat()  # the file a link leads to: its owner and mode count
    # As for the directory (sshd's StrictModes): whoever else may write the file
    # could change what the next start restores.
    if st.st_uid not in (os.geteuid(), 0, owner):
        # Judged for ``owner`` too, as the trust rule words it: a daemon running as
        # either refuses the other's.
        also = "" if owner is None else f", {named_uid(owner)}"
        raise StateError(f"refusing to keep state in {path.parent}: {each} is owned by "
                         f"{named_uid(st.st_uid)}, not by this user (uid {os.geteuid()})"
                         f"{also} or root, so its owner could change the blockers; chown it, "
                         "or choose another --state-dir", lasting=True)
    # Under an access ACL its entries say who may write, as for the directory.
    trusted = (os.geteuid(), 0) if owner is None else (os.geteuid(), 0, owner)
    entries = writers(each, st, trusted)
    if entries:
        fix = ",".join(entry.without_write for entry in entries)
        raise StateError(f"refusing to keep state in {path.parent}: {each} has an ACL that "
                         f"lets {writers_named(entries, named_uid, group_name)} write to it "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}, whose group bits are the "
                         f"ACL's mask), so they could change the blockers; setfacl -n -m "
                         f"{fix} {each}, or choose another --state-dir", lasting=True)
    if entries is None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(f"refusing to keep state in {path.parent}: {each} is writable by "
                         f"others (mode {stat.S_IMODE(st.st_mode):04o}), so they could change "
                         f"the blockers; chmod go-w {each}, or choose another --state-dir",
                         lasting=True)
    if owner is not None:
        return  # root opens what that user's daemon may not: its access is the start's
    try:
        # The log and its index are SQLite's to create: a link there is not theirs.
        nofollow = os.O_NOFOLLOW if each != path else 0
        os.close(os.open(each, os.O_RDWR | os.O_CLOEXEC | nofollow | os.O_NONBLOCK))
    except OSError as e:
        raise StateError(f"cannot read and write {each}: {e.strerror}"
                         f"{_fix(each, st, e)}, or choose another --state-dir",
                         lasting=not passing(e.errno)) from e


def _fix(each: Path, st: os.stat_result, e: OSError) -> str:
    """What to do about a file this user may not open: whose it is, when not ours;
    its file system, when that is read-only.

    The usual case is a restore done as root with ``cp``: the copy is root's,
    and "fix its permissions" does not say that the owner is what is wrong.
    """
    if e.errno == errno.EROFS:  # a link to another volume, read-only under the units
        return f"; {read_only(Path(os.path.realpath(each)).parent)}"
    if e.errno == errno.EPERM and (fix := attribute_fix(each, None)):
        return f"; {fix}"
    if not isinstance(e, PermissionError) or st.st_uid == os.geteuid():
        return "; fix its permissions"
    held, fix = owner_mismatch(each, st)
    return f" ({held}: a copy made as root belongs to root); {fix}"

"""The state directory: made 0700 when missing, and held to sshd's StrictModes.

A missing one is made only where it would pass: what exists of its path is
judged first, as the directories above it are once it exists, so that a start
that would refuse it neither makes it nor leaves it behind.

The directory, and the directory ``state.db`` links to if it is a link, must
be changeable by nobody but this user and root: anyone else could swap the
database that the next start restores.  The database file itself is checked
before SQLite opens it (:mod:`migblockd.state.files`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path

from migblockd.paths import NoDefault, default_state_dir, make_private_directory
from migblockd.startup import passing
from migblockd.state import schema
from migblockd.state.errors import StateError, account, owner_mismatch, read_only
from migblockd.state.files import check_existing_database
from migblockd.state.lock import DATABASE_NAME, check_lockable
from migblockd.state.logcheck import stored_format
from migblockd.trust import ownership, refusal, search_fix
from migblockd.writable import attribute, attribute_fix, denied, first_missing, in_the_way

__all__ = ["DATABASE_NAME", "check_directory", "check_existing_directory",
           "check_file_room", "check_migration_room", "holds_database", "home_problem",
           "make_directory"]


def make_directory(directory: Path) -> None:
    if not os.path.lexists(directory):
        _check_trusted(directory, directory, "state directory", to_be_made=True)
    try:
        make_private_directory(directory)  # its missing parents 0700 too
    except FileExistsError as e:  # it, or a link to nothing above it, is no directory
        if in_the_way(directory) is not None:
            raise _cannot_create(directory, OSError(errno.ENOTDIR, e.strerror)) from e
        raise _not_a_directory(directory) from e
    except OSError as e:
        raise _cannot_create(directory, e) from e


def _cannot_create(directory: Path, e: OSError) -> StateError:
    if e.errno == errno.ENOTDIR and (blocker := in_the_way(directory)) is not None:
        return StateError(f"cannot create state directory {directory}: {blocker} is not a "
                          "directory; move it away, or choose another --state-dir", lasting=True)
    if e.errno == errno.EROFS:
        why = f"; {read_only(directory, to_be_made=True)}"
    elif e.errno == errno.EPERM and e.filename and (fix := attribute_fix(
            Path(os.fsdecode(e.filename)).parent, "--state-dir")):
        return StateError(f"cannot create state directory {directory}: {e.strerror}; {fix}",
                          lasting=not passing(e.errno))
    else:
        why = _create_fix(directory, e)
    return StateError(f"cannot create state directory {directory}: {e.strerror}{why}, "
                      "or choose another --state-dir", lasting=not passing(e.errno))


def _check_creatable(directory: Path) -> None:
    """Raise the StateError :func:`make_directory` would, when this user could not
    make ``directory``: the directory its first missing one goes in is on a
    read-only file system, or not one this user may write in."""
    first = first_missing(directory)
    if not first.parent.is_dir():
        if in_the_way(directory) is not None:  # a file, or a link to nothing, above it
            raise _cannot_create(directory, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
        return  # in the way: the start says what is (a loop)
    code = denied(first.parent, os.W_OK | os.X_OK)
    if code:
        raise _cannot_create(directory, OSError(code, os.strerror(code), str(first)))


def _create_fix(directory: Path, e: OSError) -> str:
    """What lets this user make ``directory`` when it may not write in the
    directory the first missing one goes in (the default ``~/.local/state`` of an
    account whose home is ``/nonexistent``, a parent made by root): whose that is."""
    if e.errno not in (errno.EACCES, errno.EPERM) or not e.filename:
        return "; create it"
    place = Path(os.fsdecode(e.filename)).parent
    try:
        st = place.stat()
    except OSError:
        return "; create it"
    mode, me = stat.S_IMODE(st.st_mode), os.geteuid()
    if st.st_uid == me:
        return f" (this user may not write in {place}, mode {mode:04o}); chmod u+w {place}"
    return (f" ({place} {ownership(st)}); as {account(st.st_uid)}, make it for this user: "
            f"install -d -m 0700 -o {account(me)} {directory}")


def _not_a_directory(directory: Path) -> StateError:
    if directory.name == DATABASE_NAME and directory.is_file():
        # The database given for its directory: moving it away would lose it.
        return StateError(f"state directory {directory} is a file, the database itself; "
                          f"--state-dir names the directory that holds it "
                          f"({directory.parent})", lasting=True)
    if directory.is_symlink() and not directory.exists():
        # A link to nothing: the fix is the link's target, not moving a file away.
        return StateError(f"state directory {directory} is a symbolic link to "
                          f"{os.readlink(directory)}, which does not exist; create that "
                          "directory, or choose another --state-dir")
    return StateError(f"state directory {directory} is not a directory; "
                      "move it away, or choose another --state-dir", lasting=True)


def check_existing_directory(directory: Path, *, owner: int | None = None,
                             database: bool = True) -> None:
    """What :func:`make_directory` and :func:`check_directory` would refuse, found
    without making, locking or opening anything (``--check-config``): of a
    directory still to be made, the directories above it that exist, and whether
    this user may make it there.  ``owner``: a uid trusted as this user is
    (:func:`migblockd.trust.distrust`): root checking for a daemon that runs as
    that user, whose permissions it does not have, leaves making it to the start.

    ``database``: also what the start refuses of ``state.db``, its log and index
    (:func:`migblockd.state.files.check_existing_database`), which opens them (not
    with SQLite): never in the daemon itself (a reload's look ahead), where the
    directory may hold its own database, and closing a descriptor of that file
    would drop every lock it holds on it, SQLite's included."""
    directory = Path(directory).absolute()
    if not os.path.lexists(directory):
        _check_trusted(directory, directory, "state directory", to_be_made=True, owner=owner)
        if owner is None:  # else root checks for the daemon's user, which it cannot play
            _check_creatable(directory)
        return
    if not directory.is_dir():
        raise _not_a_directory(directory)
    check_directory(directory, owner=owner)
    if owner is None:  # as above
        check_lockable(directory)
    if database:
        # In the start's order: its lock, the files, then the room for SQLite's.
        check_existing_database(directory / DATABASE_NAME, owner=owner)
    if owner is None:
        check_file_room(directory / DATABASE_NAME)
        if database:  # it reads the file: as above, never in the daemon itself
            _check_stored_format(directory / DATABASE_NAME)


def holds_database(directory: Path) -> bool:
    """Whether a start with ``directory`` finds a database there rather than
    creating an empty one: anything named ``state.db`` counts, since the start
    refuses what is not a database (a link to nothing) rather than replace it."""
    return os.path.lexists(directory / DATABASE_NAME)


def check_file_room(database: Path) -> None:
    """Refuse a directory where the database, its log or the log's index is
    missing and could not be made (the database, also where it could not be
    renamed into place: an append-only directory).

    SQLite makes the log (``state.db-wal``) and its index beside the file
    ``database`` is or links to at every start after a clean stop, which
    removes them, and says only "unable to open database file" when it cannot.
    Nothing is made here (``--check-config`` runs this too)."""
    if os.path.islink(database) and not os.path.exists(database):
        return  # a link to nothing: refused for that, as such
    real = Path(os.path.realpath(database))
    missing = next((each for each in (real, *(real.with_name(real.name + suffix)
                                              for suffix in ("-wal", "-shm")))
                    if not os.path.lexists(each)), None)
    if missing is None:
        return
    found = attribute(real.parent) if missing == real else None
    if found is not None and found[0] == "append-only":
        # Making files there is allowed; the rename that puts a new one in place is not.
        raise StateError(f"cannot create {real} (made under another name, then renamed "
                         f"into place); {attribute_fix(real.parent, '--state-dir')}", lasting=True)
    code = denied(real.parent, os.W_OK | os.X_OK)
    if not code:
        return
    if code == errno.EROFS:
        fix = f"{read_only(real.parent)}, or choose another --state-dir"
    else:
        fix = ((attribute_fix(real.parent, "--state-dir") if code == errno.EPERM else None)
               or f"make {real.parent} writable by this user, or choose another --state-dir")
    raise StateError(f"cannot create {missing}: {os.strerror(code)}; {fix}",
                     lasting=not passing(code))


def check_migration_room(database: Path, version: int, current: int) -> None:
    """Refuse to migrate ``database`` from format ``version`` to ``current`` where
    the migration would write in an append-only directory, before anything is
    written: SQLite removes the journal it writes there (to turn a database of
    format 0 to WAL, to fill the copy kept as ``state.db.format-N``), which the
    attribute forbids, so it would fail half done ("disk I/O error") and leave
    files that no later start could remove or move away."""
    if version >= current:
        return
    place = _append_only(database, version)
    if place is None:
        return
    made = " (empty, as an older migblockd made it)" if version == 0 else ""
    raise StateError(f"cannot migrate {database} from format {version}{made} to {current}: "
                     f"the migration removes the journals it writes in {place}; "
                     f"{attribute_fix(place, '--state-dir')}", lasting=True)


def _append_only(database: Path, version: int) -> Path | None:
    """The first append-only directory a migration from ``version`` writes in: the
    one holding the file ``database`` is or links to (SQLite's journals), and for
    a format above 0 the one holding ``database`` (the copy kept beside it)."""
    real = Path(os.path.realpath(database)).parent
    places = (real,) if version == 0 else dict.fromkeys((database.parent, real))
    return next((place for place in places
                 if (found := attribute(place)) is not None and found[0] == "append-only"),
                None)


def _check_stored_format(database: Path) -> None:
    """:func:`check_migration_room` for ``--check-config``, which opens no database:
    its format read from its header (only where a directory is append-only).  One
    of another program's is left to the start, which refuses it as such."""
    if not os.path.isfile(database) or _append_only(database, 1) is None:
        return
    stored = stored_format(database)
    if stored is None:
        return
    app_id, version = stored
    if app_id == schema.APPLICATION_ID or (app_id, version) == (0, 0):
        check_migration_room(database, version, len(schema.MIGRATIONS))


def check_directory(directory: Path, *, owner: int | None = None) -> None:
    """Refuse a directory that anyone but this user and root (and ``owner``, if
    given) could change: they could swap the database that the next start
    restores.  The same for the directory that ``state.db`` links to, if it is
    a link: SQLite keeps the database's log and index beside the file the link
    leads to."""
    _check_trusted(directory, directory, "state directory", owner=owner)
    database = directory / DATABASE_NAME
    try:
        linked = database.is_symlink()
    except OSError as e:  # a directory this user may not search (mode 0 or 0600)
        raise StateError(f"cannot look in state directory {directory}: {e.strerror}"
                         f"{_search_fix(directory)}, or choose another --state-dir",
                         lasting=not passing(e.errno)) from None
    if not linked:
        return
    try:
        database.stat()
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there: _check_file says so, naming the link
    except OSError as e:  # a directory on the way this user may not search, a loop
        raise StateError(f"cannot reach {database}, a symbolic link to "
                         f"{os.readlink(database)}: {e.strerror}; make where it leads "
                         "reachable by this user, or choose another --state-dir",
                         lasting=not passing(e.errno)) from None
    target = Path(os.path.realpath(database)).parent
    _check_trusted(directory, target, f"the directory of {DATABASE_NAME}'s target",
                   owner=owner)


def _search_fix(directory: Path) -> str:
    """What lets this user look in ``directory``: its mode, when it is this user's;
    else its owner (root's, as the trust rule has it: a directory made as root,
    or chowned back), which a chmod of the owner's bits would not change."""
    try:
        st = directory.stat()
    except OSError:
        return f"; chmod u+rwx {directory}"
    if st.st_uid == os.geteuid():
        return f"; chmod u+rwx {directory}"
    held, fix = owner_mismatch(directory, st)
    return f" ({held}); {fix}"


def _check_trusted(directory: Path, place: Path, kind: str, *,
                   to_be_made: bool = False, owner: int | None = None) -> None:
    try:
        why = refusal(place, kind=kind, asset="the database", option="--state-dir",
                      to_be_made=to_be_made, owner=owner, mendable=place == directory)
    except OSError as e:
        raise StateError(f"cannot check state directory {directory}: "
                         f"{e.filename}: {e.strerror}; {search_fix(e, '--state-dir')}",
                         lasting=not passing(e.errno)) from None
    if why is not None:
        raise StateError(f"refusing to keep state in {directory}: {why}", lasting=True)


def home_problem(directory: Path) -> str | None:
    """Why ``directory``, when it is the default state directory under ``$HOME``
    and could not be used, is the home's fault, in place of the remedy the
    failure alone would suggest (``install -d`` under ``/nonexistent``, a
    ``chown`` of root's own state): a home that does not exist (nobody's), or
    one that is another user's (``su`` and ``setpriv`` keep the caller's
    ``HOME``).  None otherwise, as for a default directory of this user's."""
    if (os.environ.get("STATE_DIRECTORY") or os.geteuid() == 0
            or os.path.isabs(os.environ.get("XDG_STATE_HOME", ""))):
        return None
    try:
        if directory != default_state_dir():
            return None
        home = Path.home()
        st = os.stat(home)
    except (NoDefault, RuntimeError):
        return None
    except FileNotFoundError:
        return (f"the default state directory {directory} is under HOME ({home}), which "
                "does not exist (an account without a home, such as nobody); give "
                "--state-dir DIR, a directory this user may write, or --ephemeral to keep "
                "nothing")
    except OSError:
        return None
    if st.st_uid == os.geteuid():
        return None
    with contextlib.suppress(KeyError):
        if pwd.getpwuid(os.geteuid()).pw_dir == str(home):
            return None  # its own home, root's (a system account's): not borrowed
    with contextlib.suppress(OSError):
        if os.lstat(directory).st_uid == os.geteuid():
            return None  # this user's own: what failed is not the home's doing
    return (f"the default state directory {directory} is under HOME ({home}), which "
            f"{ownership(st)} (a HOME kept from another user, as su and setpriv keep "
            "it?); set HOME to this user's home, or give --state-dir DIR, or --ephemeral "
            "to keep nothing")

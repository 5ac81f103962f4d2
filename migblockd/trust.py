"""Whether anyone but this user and root could change what a directory holds.

The rule is sshd's StrictModes, as it has it for ``~/.ssh``: the directory is
owned by the daemon's effective uid or root and writable by nobody else, and
every directory above it is owned by one of those two and writable by nobody
else unless it is sticky (``/tmp``: others may add entries there but not
rename ours).  A directory the daemon created itself (mode 0700) passes by
construction.  Under an access ACL (acl(5)) the mode's group bits are only its
mask, and it is the entries that say who may write, as the kernel reads them
(posix_acl_permission() in fs/posix_acl.c): a named user's entry that lets a
trusted user write is not "others" (:func:`writers`).  A group is never
trusted: who is in it is the group database's to say, and may change.

What is checked is what the kernel meets when it opens the path: every
directory it looks a name up in and every symlink it follows, in the order
it does (``..`` after a symlink leads above the link's target, not back
beside the link, so the path is never folded lexically as
``os.path.abspath`` would).  So a symlink cannot lead around the rule, nor
can whoever may write the directory holding one (they could point it
elsewhere), and a directory the path only seems to name is not judged.

The socket directory (whoever could write there could bind an impostor that
clients trust) and the state directory (whoever could write there could
replace the database the daemon restores) are held to it, and so is the path
of the ``--config`` and ``--schema`` files (:mod:`migblockd.trusted_file`).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from migblockd import acl as acls

__all__ = ["MAX_SYMLINKS", "Distrust", "Writer", "distrust", "gid_name", "named_uid",
           "ownership", "refusal", "search_fix", "unsearchable", "walk", "writers",
           "writers_named"]

#: Group and world write bits.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True, slots=True)
class Writer:
    """An entry of a directory's access ACL that lets someone not trusted write to it."""

    tag: int
    """:data:`migblockd.acl.USER`, ``GROUP_OBJ``, ``GROUP`` or ``OTHER``."""
    id: int
    """The uid or gid it names: the directory's group for ``GROUP_OBJ``; -1 for ``OTHER``."""
    perm: int
    """Its permissions, as the ACL holds them (before the mask)."""

    @property
    def without_write(self) -> str:
        """The entry as ``setfacl -m`` takes it, less the write: ``u:1002:rx``."""
        kind = {acls.USER: "u", acls.GROUP: "g", acls.GROUP_OBJ: "g"}.get(self.tag, "o")
        who = str(self.id) if self.tag in (acls.USER, acls.GROUP) else ""
        kept = "".join(c for c, bit in (("r", 4), ("x", 1)) if self.perm & bit)
        return f"{kind}:{who}:{kept or '-'}"


@dataclass(frozen=True, slots=True)
class Distrust:
    """Why ``place`` (the directory itself, or one met on the way to it) is not safe.

    Exactly one of ``owner`` (another uid owns it) and ``mode`` (others may
    write it: its permission bits, or under an ACL the entries in ``acl``) is set.
    """

    place: Path
    itself: bool
    arrived: Path
    """The directory the path leads to (symlinks followed, ``..`` taken)."""
    owner: int | None = None
    mode: int | None = None
    acl: tuple[Writer, ...] = ()
    """Where ``place`` has an access ACL the kernel reads, the entries that let others
    write to it (``mode``'s group bits are then its mask); empty where the mode says so."""


def distrust(directory: Path, *, to_be_made: bool = False,
             owner: int | None = None) -> Distrust | None:
    """The first reason not to trust ``directory``, or None.

    ``to_be_made``: ``directory`` may be missing, to be made (0700) by the
    caller: what exists of the path is judged, each directory of it as one
    above ``directory`` (sticky passes), before anything is made there, and
    ``arrived`` is where the path would lead.  What cannot be made (a file on
    the way) is the making's to say.  ``owner``: a uid trusted as this
    process's is, judging for a daemon that runs as that user (root's
    ``--check-config``).

    Raises OSError (its ``filename`` the path that could not be examined).
    """
    trusted = (os.geteuid(), 0) if owner is None else (os.geteuid(), 0, owner)
    met, arrived = walk(directory, to_be_made=to_be_made)
    for place, st in met.items():
        itself = place == arrived
        if st.st_uid not in trusted:
            return Distrust(place, itself, arrived, owner=st.st_uid)
        if stat.S_ISLNK(st.st_mode):
            continue  # its target is met further on the walk
        if st.st_mode & stat.S_ISVTX and not itself:
            continue
        entries = writers(place, st, trusted)
        if entries or (entries is None and st.st_mode & _OTHERS_WRITE):
            return Distrust(place, itself, arrived, mode=stat.S_IMODE(st.st_mode),
                            acl=entries or ())
    return None


def writers(place: Path | int, st: os.stat_result,
            trusted: Collection[int]) -> tuple[Writer, ...] | None:
    """The entries of ``place``'s access ACL (``st``: its status; ``place`` a path, or a
    descriptor open on it, as :func:`migblockd.acl.read_acl` takes) that let anyone
    but the ``trusted`` uids write to it, as the kernel judges them; None where it
    has no ACL the kernel reads, and its mode's bits alone say.

    posix_acl_permission() in fs/posix_acl.c: a named user's entry, the owning
    group's and a named group's count through the mask, the others' entry without
    it.  ``setfacl -m u:UID:rx`` makes a 0755 directory 0775, its mask ``rwx``,
    though nobody but its owner may write: its group bits alone would refuse it.
    A mask that is empty (group bits 0) is not read: the kernel takes the mode
    alone (acl_permission_check() in fs/namei.c), which then says the same.
    """
    acl = acls.read_acl(place) if st.st_mode & 0o070 else ()
    if not acl:
        return None
    mask = acls.entry(acl, acls.MASK)
    through = 7 if mask is None else mask
    found = []
    for tag, perm, id in acl:
        if tag == acls.OTHER and perm & 2:
            found.append(Writer(tag, -1, perm))
        elif tag == acls.USER and perm & through & 2 and id not in trusted:
            found.append(Writer(tag, id, perm))
        elif tag in (acls.GROUP_OBJ, acls.GROUP) and perm & through & 2:
            found.append(Writer(tag, st.st_gid if tag == acls.GROUP_OBJ else id, perm))
    return tuple(found)


def writers_named(found: Collection[Writer], user: Callable[[int], str],
                  group: Callable[[int], str | None]) -> str:
    """``uid 1002, the members of gid 100 (users), everyone``: who ``found`` let
    write, users named by ``user`` and groups by ``group`` (None: no name)."""
    named = []
    for each in found:
        if each.tag == acls.USER:
            named.append(user(each.id))
        elif each.tag == acls.OTHER:
            named.append("everyone")
        else:
            name = group(each.id)
            named.append(f"the members of gid {each.id}" + ("" if name is None else f" ({name})"))
    return ", ".join(named)


# Linux's limit on the symlinks one lookup follows (ELOOP past it).
MAX_SYMLINKS = 40


def walk(path: Path, *,
         to_be_made: bool = False) -> tuple[dict[Path, os.stat_result], Path]:
    """What the kernel meets resolving ``path`` (every directory from ``/`` on,
    and every symlink, each with its ``lstat``, in the order met) and the
    directory it arrives at.

    ``to_be_made``: the walk ends at the first name missing (or below a file),
    and arrives where the rest of the path would lead.

    Raises OSError as ``lstat`` and ``readlink`` do (ELOOP for a symlink loop).
    """
    pending = list(reversed(Path(os.getcwd(), path).parts[1:]))  # getcwd() is resolved
    here = Path("/")
    met: dict[Path, os.stat_result] = {here: os.lstat(here)}
    hops = 0
    while pending:
        name = pending.pop()
        if name == "..":
            here = here.parent  # met already: the walk came down through it
            continue
        place = here / name
        try:
            st = met[place] if place in met else os.lstat(place)
        except (FileNotFoundError, NotADirectoryError):
            if not to_be_made:
                raise
            return met, here.joinpath(name, *reversed(pending))
        met[place] = st
        if not stat.S_ISLNK(st.st_mode):
            here = place
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
        target = Path(os.readlink(place))
        if target.is_absolute():
            here = Path("/")
        pending.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
    return met, here


def refusal(directory: Path, *, kind: str, asset: str, option: str,
            to_be_made: bool = False, owner: int | None = None,
            mendable: bool = False) -> str | None:
    """Why ``directory`` (a ``kind``, such as "state directory") is refused, in
    words that say what is at stake (``asset``) and what to do (``option``), or None.
    ``to_be_made`` and ``owner`` as for :func:`distrust`.  ``mendable``: the
    directory is the daemon's alone (its state directory), so one owned by another
    user may be a mistake to ``chown``; a socket's may be a user's home.

    Raises OSError as :func:`distrust` does.
    """
    found = distrust(directory, to_be_made=to_be_made, owner=owner)
    if found is None:
        return None
    arrived = found.arrived
    named = f"{kind} {directory}"
    if arrived != Path(os.path.join(os.getcwd(), directory)):
        named += f" (which is {arrived})"  # what the symlinks and ".." lead to
    if found.itself:
        what = named
    elif found.place in arrived.parents:
        what = f"{found.place}, above {named},"
    else:
        what = f"{found.place}, on the way to {named},"
    if found.owner is not None:
        # Judged for another user too: a daemon running as either refuses the other's.
        also = "" if owner is None else f", {named_uid(owner)}"
        # Its own owner may be a mistake (made by hand as another user, restored from a
        # backup); one above it is the other user's place, not to be taken from them.
        fix = "chown it, or " if found.itself and mendable else ""
        return (f"{what} is owned by {named_uid(found.owner)}, not by this user "
                f"(uid {os.geteuid()}){also} or root, so its owner could replace {asset}; "
                f"{fix}choose another {option}")
    if found.acl:
        # chmod go-w would take the write from the trusted users' entries too.  -n:
        # left to itself, setfacl recomputes the mask from every entry, which could
        # give an entry the mask keeps from reading or searching what it may not now.
        entries = ",".join(each.without_write for each in found.acl)
        return (f"{what} has an ACL that lets {writers_named(found.acl, named_uid, gid_name)} "
                f"write to it (mode {found.mode:04o}, whose group bits are the ACL's mask), "
                f"so they could replace {asset}; setfacl -n -m {entries} {found.place}, or "
                f"choose another {option}")
    return (f"{what} is writable by others (mode {found.mode:04o}), so they could replace "
            f"{asset}; chmod go-w {found.place}, or choose another {option}")


def ownership(st: os.stat_result) -> str:
    """``belongs to uid 0 (root), mode 0755, and this daemon runs as uid 65534
    (nobody)``: what a message says of a file or directory in the daemon's way."""
    return (f"belongs to {named_uid(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}, "
            f"and this daemon runs as {named_uid(os.geteuid())}")


def named_uid(uid: int) -> str:
    """``uid 986 (migblockd)``: the number the kernel reports and, when the user
    database has one, the name an operator knows the account by (the units' user)."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def gid_name(gid: int) -> str | None:
    """The group database's name for ``gid``; None when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def search_fix(e: OSError, option: str) -> str:
    """What to do when a path given by ``option`` could not be examined
    (``e``): let this user search the directory on the way that it may not
    (the one holding the name that could not be looked up), or, for another
    error (a loop of symbolic links), choose another path."""
    if e.errno != errno.EACCES or not e.filename:
        return f"choose another {option}"
    named = Path(os.path.realpath(os.fsdecode(e.filename)))
    # The name may be the whole path (stat), not where the lookup stopped (lstat
    # of each part), and through symlinks: the first directory from / on, where
    # they lead, that this user may not search.
    closed = next((p for p in reversed(named.parents)
                   if not os.access(p, os.X_OK, effective_ids=True)), named.parent)
    return unsearchable(closed, option)


def unsearchable(closed: Path, option: str) -> str:
    """``this daemon, running as ..., may not search CLOSED (...): let it ...``:
    what lets this user through ``closed``, a directory it may not search."""
    try:
        st = closed.stat()
    except OSError:
        return f"let this user search {closed}, or choose another {option}"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid():
        return (f"this user may not search {closed} (mode {mode:04o}): chmod u+x {closed}, "
                f"or choose another {option}")
    return (f"this daemon, running as {named_uid(os.geteuid())}, may not search {closed} "
            f"({named_uid(st.st_uid)}'s, mode {mode:04o}): let it (chmod o+x {closed}, say), "
            f"or choose another {option}")

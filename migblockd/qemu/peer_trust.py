"""Whether the process that answers at ``--qemu`` may be taken for QEMU.

migblockd connects to a path and believes what answers there: QEMU's blockers,
its migration's status and events go to every client, and the commands it
forwards (``migrate`` and its URI, ``qemu-passthrough``'s, HMP command lines
with their passwords included) go to it.  While QEMU is away (restarted, not
started yet), its socket file is gone, and whoever may write the directory can
bind one of their own there: in ``/tmp``, which is sticky, that is every local
user.  The kernel names the listener (``SO_PEERCRED``), so the rule is the one
the socket and state directories are held to (:mod:`migblockd.trust`), with
QEMU's user trusted as well: a listener that is neither root nor migblockd's
user is taken for QEMU only where no one but root, migblockd's user and the
listener's user could have put a socket (as libvirt's per-domain directories
are).  Root's and migblockd's own user's listeners are trusted anywhere: nobody
else can run as them.

A sticky directory (``/tmp``) passes above a socket directory of root's or
migblockd's user, whose names others may not rename; not above one of the
listener's: in ``/tmp`` every user may make ``/tmp/vm1`` as themselves while it
is missing (before QEMU's user made it, or after it was removed), and a
directory of theirs is all the listener's uid says.  So nothing of the
listener's user may be met on the way in a directory others may write.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from migblockd.databases import caches, named
from migblockd.trust import MAX_SYMLINKS, Distrust, distrust, walk, writers, writers_named

__all__ = ["untrusted_listener"]


def untrusted_listener(path: Path, uid: int | None) -> str | None:
    """Why the listener at ``path``, of ``uid`` (``SO_PEERCRED``; None: not
    reported), is not taken for QEMU; None when it is.  On the event loop: users are
    named as known by now, never looked up (a user database may hang)."""
    if uid is not None and uid in (0, os.geteuid()):
        return None
    if uid is None:
        return (f"the kernel did not say which user listens at {path}, so it cannot be "
                "told from another user's socket put there while QEMU was away")
    try:
        where = None
        for directory in _holding(path):
            found = distrust(directory, owner=uid)
            if found is not None:
                why = (f"belongs to {named(found.owner)}" if found.owner is not None
                       else _writable(found))
                where = f"{found.place} {why}"
            else:
                where = _made_by_anyone(directory, uid)
            if where is not None:
                break
    except OSError as exc:
        return f"{exc.filename or path} cannot be examined ({exc.strerror})"
    if where is None:
        return None
    return (f"what listens there runs as {named(uid)}, and {where}, so another "
            f"user could have put that socket there while QEMU was away: migblockd takes "
            f"a listener that is neither root nor its own user for QEMU only in a "
            f"directory that no one but root, migblockd's user and QEMU's user may write "
            f"or could have made; "
            f"put QEMU's -qmp socket in such a directory")


def _holding(path: Path) -> list[Path]:
    """The directories the socket's name is looked up in: the one ``path`` names, and,
    when its last name is a symlink, the one each link leads to in turn.  Not folded
    as written (``link/../qmp.sock`` is above where link leads): each is walked as the
    kernel walks it.

    Raises OSError as ``readlink`` does (ELOOP past Linux's limit of links)."""
    name = Path(os.getcwd(), path)
    held = [name.parent]
    for _ in range(MAX_SYMLINKS):
        if not name.is_symlink():
            return held
        # Relative to the directory the link is in, as the kernel reached it.
        name = Path(os.path.realpath(name.parent), os.readlink(name))
        held.append(name.parent)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))


def _made_by_anyone(directory: Path, uid: int) -> str | None:
    """``/tmp/vm1, of that user, is in /tmp, where others may make a name as
    themselves (mode 1777)``: a directory or symlink of ``uid`` met on the way to
    ``directory`` where every user could have made their own; None if there is none.

    Raises OSError as :func:`migblockd.trust.walk` does."""
    met, _ = walk(directory)
    for place, st in met.items():
        # Each name is looked up in the directory met just before it (the walk's).
        holder = met.get(place.parent)
        if st.st_uid != uid or holder is None or place == place.parent:
            continue
        mode = stat.S_IMODE(holder.st_mode)
        # Read as distrust() reads it: an ACL's entries for these users are not others.
        entries = writers(place.parent, holder, (os.geteuid(), 0, uid))
        if entries:
            return (f"{place}, of that user, is in {place.parent}, whose ACL lets "
                    f"{writers_named(entries, named, caches().groups.get)} make a name "
                    f"there as themselves (mode {mode:04o}, whose group bits are the ACL's "
                    "mask)")
        if entries is None and mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"{place}, of that user, is in {place.parent}, where others may make "
                    f"a name as themselves (mode {mode:04o})")
    return None


def _writable(found: Distrust) -> str:
    """Who else may write to ``found.place``: ``others may write to it (mode 1777)``,
    or, under an access ACL (acl(5)), ``has an ACL that lets uid 1001 write to it
    (mode 0775, ...)``: the entries that let them, which only ``getfacl`` shows.

    There the mode's group bits are only the ACL's mask: "others may write to it
    (mode 0775)" read as the write bit of its group, which may not write.  Groups
    are named as known by now: never looked up on the loop."""
    if not found.acl:
        return f"others may write to it (mode {found.mode or 0:04o})"
    return (f"has an ACL that lets {writers_named(found.acl, named, caches().groups.get)} "
            f"write to it (mode {found.mode or 0:04o}, whose group bits are the ACL's mask)")

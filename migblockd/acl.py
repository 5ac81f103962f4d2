"""POSIX access ACLs (acl(5)) as Linux stores them, for the files clients reach.

An access ACL is the extended attribute ``system.posix_acl_access``: a version
(2), then one ``(tag, perm, id)`` entry of 8 bytes per user or group it names,
little-endian (``include/uapi/linux/posix_acl_xattr.h``).  Where a file has one,
the mode's group bits are only its mask, and it is the entries that decide who
may do what: :mod:`migblockd.denied` reads them to say why a client is refused.

A new file takes the default ACL of its directory, if it has one, in place of
the umask: a socket bound there would let in whom the directory's default
names, whatever ``--socket-mode`` and ``--socket-group`` say, and one naming no
one still narrows its mode (its ``group::r-x`` keeps the group from writing).
:func:`mode_only` makes the socket's permissions its mode again.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import TypeAlias

__all__ = ["GROUP", "GROUP_OBJ", "MASK", "OTHER", "USER", "USER_OBJ", "Acl", "entry",
           "mode_only", "read_acl"]

ACCESS = "system.posix_acl_access"
# The entries' tags (include/uapi/linux/posix_acl.h).
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_VERSION = 2
_UNDEFINED_ID = 0xFFFFFFFF  # the id of the entries that name no one (the owner's, the others')

#: An access ACL's entries, ``(tag, perm, id)``; empty for a file with its mode alone.
Acl: TypeAlias = tuple[tuple[int, int, int], ...]


def read_acl(file: Path | int) -> Acl:
    """The entries of the access ACL of ``file`` (a path, or a descriptor open on the
    file: then the file judged is the file read); none for a file that has only its mode."""
    try:
        raw = os.getxattr(file, ACCESS)
    except OSError:  # ENODATA: the mode alone; ENOTSUP: a file system without ACLs
        return ()
    if len(raw) < 4 or (len(raw) - 4) % 8 or int.from_bytes(raw[:4], "little") != _VERSION:
        return ()
    return tuple(struct.iter_unpack("<HHI", raw[4:]))


def entry(acl: Acl, tag: int, id: int | None = None) -> int | None:
    """The permissions of ``acl``'s entry ``tag`` (for ``id``, of a named one); None
    when it has none."""
    return next((perm for t, perm, i in acl if t == tag and (id is None or i == id)), None)


def mode_only(path: Path, mode: int) -> bool:
    """Give ``path`` (not followed if a link) exactly ``mode``, dropping an access ACL it
    was created with, or the mode a default ACL naming no one narrowed; whether either
    was so.  Raises OSError when it cannot be made so.

    Written as the ACL that names no one, which the kernel stores as the mode alone
    (``posix_acl_update_mode()`` in fs/posix_acl.c): one system call, on the name,
    and no ``chmod``, which has no form that leaves a symbolic link alone.
    """
    try:
        os.getxattr(path, ACCESS, follow_symlinks=False)
    except OSError as exc:
        # None, or no ACLs on this file system: the umask made the mode, unless a
        # default ACL naming no one narrowed it (``g::r-x`` makes 0660 0640), which
        # the new file keeps as its mode alone (posix_acl_create()).
        if exc.errno != errno.ENODATA or stat.S_IMODE(os.lstat(path).st_mode) == mode:
            return False
    minimal = struct.pack("<I", _VERSION) + b"".join(
        struct.pack("<HHI", tag, mode >> shift & 7, _UNDEFINED_ID)
        for tag, shift in ((USER_OBJ, 6), (GROUP_OBJ, 3), (OTHER, 0)))
    os.setxattr(path, ACCESS, minimal, follow_symlinks=False)
    return True

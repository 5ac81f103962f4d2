"""The user namespace this process runs in (user_namespaces(7)): which ids it maps.

A process in a user namespace of its own (a rootless container, ``unshare
--user``) sees only the uids and gids its namespace maps.  The kernel shows
every other as the overflow uid or gid (65534): ``SO_PEERCRED`` so reports a
peer (:mod:`migblockd.peer`), and ``stat()`` a file's owner and group
(:mod:`migblockd.denied`).  That number names no one, whoever has it here.  Nor
is the namespace's root the host's: its capabilities count over a file only
when the namespace maps both the file's owner and its group
(``privileged_wrt_inode_uidgid()``, kernel/capability.c); for the others the
kernel judges it as the uid it is outside, by their mode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

__all__ = ["DEFAULT_OVERFLOW_GID", "DEFAULT_OVERFLOW_UID", "GID_MAP", "OVERFLOW_GID",
           "OVERFLOW_UID", "UID_MAP", "Namespace", "own_namespace", "unmapped_gid",
           "unmapped_uid"]

#: Where the kernel says which ids this process's namespace maps, and what it
#: reports for the others (``from_kuid_munged()``, kernel/user_namespace.c).
UID_MAP: Final = "/proc/self/uid_map"
GID_MAP: Final = "/proc/self/gid_map"
OVERFLOW_UID: Final = "/proc/sys/kernel/overflowuid"
OVERFLOW_GID: Final = "/proc/sys/kernel/overflowgid"
#: What the kernel reports unless an administrator set the sysctl otherwise
#: (DEFAULT_OVERFLOWUID and DEFAULT_OVERFLOWGID, include/linux/highuid.h).
DEFAULT_OVERFLOW_UID: Final = 65534
DEFAULT_OVERFLOW_GID: Final = 65534
_ALL_IDS: Final = 2**32 - 1  # the initial namespace's one line: 0 0 4294967295

#: One line of a map: the first id inside, the first outside (in the parent
#: namespace), and how many.
Range = tuple[int, int, int]


@dataclass(frozen=True)
class Namespace:
    """The maps of a user namespace that does not map every id (not the host's)."""

    uids: tuple[Range, ...]
    gids: tuple[Range, ...]

    def maps(self, uid: int, gid: int) -> bool:
        """Whether a file of owner ``uid`` and group ``gid``, as ``stat()`` shows them
        here, is one this namespace maps both of (its root's powers count there).  The
        overflow ids are taken for unmapped even where the namespace maps them too
        (0-65535 of a container): a file that refused root is likelier not mapped."""
        return (uid != unmapped_uid() and gid != unmapped_gid()
                and _outside(uid, self.uids) is not None
                and _outside(gid, self.gids) is not None)

    def maps_group(self, gid: int) -> bool:
        """Whether a file's group ``gid``, as ``stat()`` shows it here, is one this
        namespace maps (the overflow gid taken for unmapped, as in :meth:`maps`)."""
        return gid != unmapped_gid() and _outside(gid, self.gids) is not None

    def uid_outside(self, uid: int) -> int | None:
        """The uid that ``uid`` is in the parent namespace (the host's, unless nested)."""
        return _outside(uid, self.uids)


def _outside(id: int, ranges: tuple[Range, ...]) -> int | None:
    for inside, outside, count in ranges:
        if inside <= id < inside + count:
            return outside + id - inside
    return None


@functools.cache
def _map(path: str) -> tuple[Range, ...] | None:
    """The lines of a map, or None when it cannot be read (no /proc)."""
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.split() for line in f if line.strip()]
        return tuple((int(a), int(b), int(c)) for a, b, c in lines)
    except (OSError, ValueError):
        return None


def _partial(ranges: tuple[Range, ...] | None) -> bool:
    return ranges is not None and sum(count for _, _, count in ranges) < _ALL_IDS


def own_namespace() -> Namespace | None:
    """This process's user namespace when it maps fewer than all uids or gids, else
    None (the host's, or maps that cannot be read)."""
    uids, gids = _map(UID_MAP), _map(GID_MAP)
    if uids is None or gids is None or not (_partial(uids) or _partial(gids)):
        return None
    return Namespace(uids, gids)


def unmapped_uid() -> int | None:
    """The uid ``SO_PEERCRED`` reports for every peer whose uid this process's user
    namespace does not map (the overflow uid, 65534), or None in a namespace that maps
    them all (the host's).  In a user namespace of its own (a rootless container with
    the socket shared to the host) every such peer, root included, would be one uid:
    each could delete the others' blockers and use up their quotas."""
    return _overflow(UID_MAP, OVERFLOW_UID, DEFAULT_OVERFLOW_UID)


def unmapped_gid() -> int | None:
    """The gid reported for a peer whose gid this namespace does not map, or None: it
    names no group (a mapped uid's process may run as a group the namespace does not
    map), so it must not get the role of the group that has that number here."""
    return _overflow(GID_MAP, OVERFLOW_GID, DEFAULT_OVERFLOW_GID)


@functools.cache
def _overflow(map_file: str, overflow_file: str, default: int) -> int | None:
    if not _partial(_map(map_file)):
        return None
    # /proc/sys is not there under the shipped units (ProcSubset=pid): the kernel's
    # default then, not "none", which made every unmapped user one uid again.
    try:
        with open(overflow_file, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


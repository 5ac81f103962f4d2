"""The user and group databases: the look-ups access control makes, and what they said.

Three ways to ask (each a :class:`migblockd.resolver.Source`):

* the process's caches, looking up what they lack (:func:`user_name`, and the
  resolver's :meth:`~migblockd.resolver.Resolver.role`): for the start-up, before
  the daemon serves, ``--check-config``, and threads;
* :class:`Said`: the caches only, raising :class:`NeedsLookup` for anything else
  (the event loop's: a database that does not answer must not hold it);
* :class:`Live`: the databases themselves, recording what they say for the loop
  to keep (:func:`learn`): on a worker thread (:mod:`migblockd.lookups`).

The caches are the event loop's: only the loop writes them once the daemon serves.
``os.getgrouplist()`` keeps Python's global lock while the C library looks
(CPython calls it without releasing it): a group database that does not answer
would hold every thread, the loop too.  The worker calls the C library's
``getgrouplist()`` through :mod:`ctypes`, which lets go of the lock meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
from collections.abc import Callable
from typing import Final, TypeVar

from migblockd.access import is_number

__all__ = [
    "CACHE_SIZE",
    "Facts",
    "Live",
    "NeedsLookup",
    "Said",
    "caches",
    "clear_caches",
    "group_id",
    "group_name",
    "install",
    "known_name",
    "learn",
    "named",
    "named_like",
    "uid_of",
    "user_name",
    "who",
]

#: Distinct entries remembered before a cache starts over: a bound,
#: not a tuning knob (each entry is a few dozen bytes).
CACHE_SIZE: Final = 4096

V = TypeVar("V")


class NeedsLookup(Exception):
    """The answer rests on what the user and group databases have not said yet:
    ask them off the event loop (:class:`Live`)."""


class Facts:
    """Names found in the user and group databases, kept; misses, only counted.

    A miss is not kept: ``getpwuid()`` reports a failure to look (no file
    descriptor left to open ``/etc/passwd``) as "no such user", and a cached
    miss would outlive it until the next reload.  ``nameless``: uids looked up
    and found nameless, for what the log and the refusals say only (a name
    is never waited for twice; a role is judged afresh).
    """

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}
        #: uid -> its primary and supplementary groups.
        self.members: dict[int, frozenset[int]] = {}
        self.nameless: set[int] = set()
        self.misses = 0

    def user(self, uid: int) -> str | None:
        name = self._name(self.users, uid, lambda: pwd.getpwuid(uid).pw_name)
        if name is None:
            self._nameless(uid)
        return name

    def _nameless(self, uid: int) -> None:
        if len(self.nameless) >= CACHE_SIZE:
            self.nameless.clear()
        self.nameless.add(uid)

    def group(self, gid: int) -> str | None:
        return self._name(self.groups, gid, lambda: grp.getgrgid(gid).gr_name)

    def groups_of(self, uid: int) -> set[int]:
        gids = self.members.get(uid)
        if gids is None:
            try:
                entry = pwd.getpwuid(uid)
            except (KeyError, OverflowError):
                self.misses += 1
                self._nameless(uid)
                return set()
            gids = frozenset(_member_of(entry))
            _keep(self.members, uid, gids)
            _keep(self.users, uid, entry.pw_name)
        return set(gids)

    def _name(self, cache: dict[int, str], key: int, look: Callable[[], str]) -> str | None:
        name = cache.get(key)
        if name is None:
            try:
                name = look()
            except (KeyError, OverflowError):
                self.misses += 1
                return None
            _keep(cache, key, name)
        return name

    def knows_name(self, uid: int) -> bool:
        """Whether ``uid`` was looked up (named, or found nameless)."""
        return uid in self.users or uid in self.nameless


def _keep(cache: dict[int, V], key: int, value: V) -> None:
    if len(cache) >= CACHE_SIZE:
        cache.clear()
    cache[key] = value


_lookups = Facts()


class Said:
    """What the databases said, kept in ``facts``: :class:`NeedsLookup` for the rest."""

    misses = 0

    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    def user(self, uid: int) -> str | None:
        name = self.facts.users.get(uid)
        if name is None:
            raise NeedsLookup
        return name

    def group(self, gid: int) -> str | None:
        name = self.facts.groups.get(gid)
        if name is None:
            raise NeedsLookup
        return name

    def groups_of(self, uid: int) -> set[int]:
        gids = self.facts.members.get(uid)
        if gids is None:
            raise NeedsLookup
        return set(gids)


class Live:
    """The databases, asked afresh (off the loop), each answer recorded for
    :func:`learn`; ``doing`` says which call runs now, for the log."""

    def __init__(self) -> None:
        self.misses = 0
        self.users: dict[int, str | None] = {}
        self.groups: dict[int, str | None] = {}
        self.members: dict[int, frozenset[int] | None] = {}
        self.doing = "nothing yet"

    def user(self, uid: int) -> str | None:
        if uid not in self.users:
            self.doing = f"getpwuid({uid})"
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except (KeyError, OverflowError):
                self.users[uid] = None
        name = self.users[uid]
        if name is None:
            self.misses += 1
        return name

    def group(self, gid: int) -> str | None:
        if gid not in self.groups:
            self.doing = f"getgrgid({gid})"
            try:
                self.groups[gid] = grp.getgrgid(gid).gr_name
            except (KeyError, OverflowError):
                self.groups[gid] = None
        name = self.groups[gid]
        if name is None:
            self.misses += 1
        return name

    def groups_of(self, uid: int) -> set[int]:
        if uid not in self.members:
            self.doing = f"getpwuid({uid})"
            try:
                entry = pwd.getpwuid(uid)
            except (KeyError, OverflowError):
                self.members[uid] = self.users[uid] = None
            else:
                self.users[uid] = entry.pw_name
                self.doing = f"getgrouplist({entry.pw_name!r}, {entry.pw_gid})"
                self.members[uid] = frozenset(_member_of(entry))
        gids = self.members[uid]
        if gids is None:
            self.misses += 1
            return set()
        return set(gids)


def learn(live: Live, facts: Facts | None = None) -> list[int]:
    """Keep what ``live`` found in ``facts`` (by default the process's; on the loop):
    its names, and the uids it found nameless (for the log only: see :class:`Facts`).
    Returns the uids whose name it learned or changed."""
    facts = _lookups if facts is None else facts
    changed = []
    for uid, name in live.users.items():
        if name is None:
            facts._nameless(uid)
        else:
            facts.nameless.discard(uid)
            if facts.users.get(uid) != name:
                changed.append(uid)
                _keep(facts.users, uid, name)
    for gid, group in live.groups.items():
        if group is not None:
            _keep(facts.groups, gid, group)
    for uid, gids in live.members.items():
        if gids is not None:
            _keep(facts.members, uid, gids)
    return changed


def known_name(uid: int) -> str | bool | None:
    """``uid``'s name as last looked up; None: found nameless; False: not looked up."""
    name = _lookups.users.get(uid)
    if name is not None:
        return name
    return None if uid in _lookups.nameless else False


def _member_of(entry: pwd.struct_passwd) -> set[int]:
    gids = {entry.pw_gid}
    with contextlib.suppress(OSError):
        gids.update(_grouplist(entry.pw_name, entry.pw_gid))
    return gids


def _libc_getgrouplist() -> Callable[..., int] | None:
    try:
        call = ctypes.CDLL(None, use_errno=True).getgrouplist
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32),
                     ctypes.POINTER(ctypes.c_int)]
    call.restype = ctypes.c_int
    return call


_getgrouplist = _libc_getgrouplist()


def _grouplist(name: str, gid: int) -> list[int]:
    """``getgrouplist(3)`` through :mod:`ctypes`, which releases the global lock
    (``os.getgrouplist()`` does not)."""
    if _getgrouplist is None:
        return os.getgrouplist(name, gid)
    size = 64
    while size <= 1 << 20:
        found = (ctypes.c_uint32 * size)()
        count = ctypes.c_int(size)
        if _getgrouplist(os.fsencode(name), gid, found, ctypes.byref(count)) >= 0:
            return list(found[:count.value])
        size = max(count.value, size * 2)
    raise OSError(f"getgrouplist({name!r}): too many groups")


def user_name(uid: int) -> str | None:
    """The name of ``uid`` in the user database, or None (looked up: not on the loop)."""
    return _lookups.user(uid)


def who(uid: int | None) -> str:
    """A uid as refusals and the log name it: ``uid 65534 (nobody)`` (looked up:
    not on the loop, whose lines say :func:`named`)."""
    if uid is None:
        return "a client whose uid the kernel did not report"
    name = user_name(uid)
    return f"uid {uid} ({name})" if name is not None else f"uid {uid}"


def named(uid: int | None) -> str:
    """:func:`who` with the name known by now, or none: never a look-up (the loop's)."""
    if uid is None:
        return "a client whose uid the kernel did not report"
    name = _lookups.users.get(uid)
    return f"uid {uid} ({name})" if name is not None else f"uid {uid}"


def group_name(gid: int) -> str | None:
    return _lookups.group(gid)


def group_id(name: str) -> int | None:
    """A group given by name or decimal number, as a gid; None when there is no such name."""
    if is_number(name):
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def named_like(number: str, kind: str) -> int | None:
    """The id of the ``kind`` ("user" or "group") *named* ``number``, when that is
    not the number itself: the daemon reads a number as an id (as systemd's
    ``SocketGroup=`` does), where chown(1) tries the name first."""
    if not is_number(number):
        return None
    try:
        found = (pwd.getpwnam(number).pw_uid if kind == "user"
                 else grp.getgrnam(number).gr_gid)
    except KeyError:
        return None
    return None if found == int(number) else found


def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def clear_caches() -> dict[int, str]:
    """Forget the names looked up so far (the databases may have changed).

    Returns the user names known until now, for whoever showed them to tell
    which are no longer right.
    """
    users, _lookups.users = _lookups.users, {}
    _lookups.groups.clear()
    _lookups.members.clear()
    _lookups.nameless.clear()
    return users


def install(facts: Facts) -> dict[int, str]:
    """Make ``facts`` (a reload's look-ups) the process's, at once (on the loop);
    returns the user names known until now, as :func:`clear_caches` does.  The
    names of uids the reload did not ask about (clients connected meanwhile) are
    kept until their own look-up answers: a blocker's owner is never shown
    nameless for want of a look-up."""
    global _lookups
    users, _lookups = _lookups.users, facts
    for uid, name in users.items():
        if not facts.knows_name(uid):
            _keep(facts.users, uid, name)
    return users


def caches() -> Facts:
    """The process's caches (the sources the resolver asks read them)."""
    return _lookups

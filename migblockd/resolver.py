"""How a uid gets its role: the ``[access]`` policy applied to the host's users and groups.

The only outside world access control reads is here: the system's user and
group databases (``pwd``, ``grp``, ``os.getgrouplist``), through cached
look-ups.  It is apart from :mod:`migblockd.access`, which says what the roles
and the policy are, because it is the part that depends on the host and on
when it is asked: its answers are cached, and start over on reload.

How a uid gets its role (:meth:`Resolver.role`):

1. root and the uid the daemon runs as are always ``admin``;
2. else an entry for the user in ``users`` (by number, then by name) decides,
   so that one user can be given less (or more) than their groups;
3. else the highest role among the ``groups`` entries for any of its groups:
   the gid the kernel reported for the connection, the user's primary group
   and its supplementary groups in the group database.  A reported gid that is
   none of those, and a subordinate gid of a user (``/etc/subgid``), gives at
   most that user's role (of each such user, when ranges overlap): the user can
   make it theirs with ``newgidmap``;
4. else ``default-role``;
5. and a subordinate uid (``/etc/subuid``, see subuid(5)) that no ``users``
   entry names gets at most what the user it belongs to gets: that user can
   ``setuid()`` to it in a user namespace of their own (``newuidmap``), and must
   not shed a role the policy lowered for them by doing so.

A connection whose credentials the kernel did not give has ``default-role``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from migblockd.access import Policy, Role, is_number
from migblockd.subordinates import SUBGID_FILE, SUBUID_FILE, Subordinates

__all__ = [
    "CACHE_SIZE",
    "Resolver",
    "clear_caches",
    "group_id",
    "group_name",
    "groups_of",
    "named_like",
    "user_name",
    "who",
]


#: Distinct (uid, gid) pairs remembered before the cache starts over: a bound,
#: not a tuning knob (each entry is a few dozen bytes).
CACHE_SIZE: Final = 4096


@dataclass
class Resolver:
    """A policy applied to the host's users and groups, with each answer cached.

    ``daemon_uid`` is the uid the daemon runs as (always admin).  Build a new
    resolver (and call :func:`clear_caches`) when the policy or the user and
    group databases may have changed: on reload.
    """

    policy: Policy
    daemon_uid: int
    #: Where the subordinate uids and gids are granted (read once, as the databases'
    #: names are).
    subuid_file: str = SUBUID_FILE
    subgid_file: str = SUBGID_FILE
    _users_by_id: dict[int, Role] = field(init=False, repr=False)
    _users_by_name: dict[str, Role] = field(init=False, repr=False)
    _groups_by_id: dict[int, Role] = field(init=False, repr=False)
    _groups_by_name: dict[str, Role] = field(init=False, repr=False)
    _cache: dict[tuple[int, int | None], Role] = field(init=False, repr=False)
    _subuids: Subordinates = field(init=False, repr=False)
    _subgids: Subordinates = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._users_by_id, self._users_by_name = _split(self.policy.users)
        self._groups_by_id, self._groups_by_name = _split(self.policy.groups)
        self._cache = {}
        self._subuids = Subordinates(self.subuid_file, _uid_of)
        self._subgids = Subordinates(self.subgid_file, _uid_of)

    def role(self, uid: int | None, gid: int | None = None) -> Role:
        """The role of a peer with this uid (and, from ``SO_PEERCRED``, gid).

        An answer that rests on a lookup that found nothing is not kept: the
        C library says "not found" when it could not look (out of file
        descriptors), and such an answer must not outlive the moment.
        """
        if uid is None:
            return self.policy.default_role
        key = (uid, gid)
        role = self._cache.get(key)
        if role is None:
            misses = _lookups.misses
            role = self._resolve(uid, gid)
            if _lookups.misses == misses:
                if len(self._cache) >= CACHE_SIZE:
                    self._cache.clear()
                self._cache[key] = role
        return role

    def _resolve(self, uid: int, gid: int | None, *, own: bool = False) -> Role:
        if uid in (0, self.daemon_uid):
            return Role.ADMIN
        role = self._users_by_id.get(uid)
        if role is None and self._users_by_name:
            name = user_name(uid)
            if name is not None:
                role = self._users_by_name.get(name)
        if role is not None:
            return role
        role = self.policy.default_role
        if self._groups_by_id or self._groups_by_name:
            listed = groups_of(uid, None)
            roles = [r for g in listed if (r := self._group_role(g)) is not None]
            if gid is not None and gid not in listed:
                reported = self._group_role(gid)
                if reported is not None:
                    # Not a member: the gid may be an owner's by newgidmap.
                    for owner in self._subgids.owners_of(gid):
                        reported = min(reported, self._resolve(owner, None, own=True))
                    roles.append(reported)
            if roles:
                role = max(roles)
        if not own:
            # Every user whose range holds it can setuid() to it.
            for owner in self._subuids.owners_of(uid):
                if owner != uid:
                    role = min(role, self._resolve(owner, None, own=True))
        return role

    def owner_of(self, uid: int) -> int | None:
        """The uid of the user that ``/etc/subuid`` grants ``uid`` to (not ``uid``
        itself), or None."""
        owner = self._subuids.owner_of(uid)
        return owner if owner != uid else None

    @property
    def has_subordinates(self) -> bool:
        """Whether any user has subordinate uids (else nobody's count is shared)."""
        return bool(self._subuids)

    def _group_role(self, gid: int) -> Role | None:
        role = self._groups_by_id.get(gid)
        if self._groups_by_name:
            # Named by number and by name, a group has two entries: the higher
            # wins, as among the user's groups (unlike users, where one entry
            # is the more specific).
            name = group_name(gid)
            by_name = None if name is None else self._groups_by_name.get(name)
            if by_name is not None and (role is None or by_name > role):
                role = by_name
        return role

    def overruled(self) -> list[str]:
        """``users`` entries that give root or the daemon's user less than admin,
        which they always are (to warn: the policy does not do what it says)."""
        admins = {0, self.daemon_uid}
        return [f"user {key!r} role {role}" for key, role in self.policy.users
                if role < Role.ADMIN
                and (int(key) if is_number(key) else _uid_of(key)) in admins]

    def shadowed(self) -> list[str]:
        """``users`` entries by name that an entry by number for the same uid
        overrides with another role (to warn: the name's entry never applies,
        however specific it looks, since the number is looked up first)."""
        shadowed = []
        for name, role in self._users_by_name.items():
            uid = _uid_of(name)
            by_number = None if uid is None else self._users_by_id.get(uid)
            if by_number is not None and by_number != role and uid not in (0, self.daemon_uid):
                shadowed.append(f"user {name!r} role {role} and its uid {uid} role {by_number}")
        return shadowed

    def named_like_numbers(self) -> list[str]:
        """Entries by number that are also the name of another user or group (to
        warn: the entry applies to the id, not to the one so named)."""
        found = []
        for kind, pairs in (("user", self.policy.users), ("group", self.policy.groups)):
            for key, role in pairs:
                other = named_like(key, kind)
                if other is not None:
                    found.append(f"{kind} {key!r} role {role}: a number is read as an id, "
                                 f"but a {kind} is named {key!r} (id {other}); to mean "
                                 f"that {kind}, give {other}")
        return found

    def unknown_names(self) -> list[str]:
        """Names in the policy that the user and group databases do not know (to warn)."""
        missing = [f"user {n!r}" for n in self._users_by_name if _uid_of(n) is None]
        missing += [f"group {n!r}" for n in self._groups_by_name if group_id(n) is None]
        return missing


def _split(pairs: Iterable[tuple[str, Role]]) -> tuple[dict[int, Role], dict[str, Role]]:
    by_id: dict[int, Role] = {}
    by_name: dict[str, Role] = {}
    for key, role in pairs:
        if is_number(key):
            by_id[int(key)] = role
        else:
            by_name[key] = role
    return by_id, by_name


# --------------------------------------------------------------------------- the databases


class _Lookups:
    """Names found in the user and group databases, kept; misses, only counted.

    A miss is not kept: ``getpwuid()`` reports a failure to look (no file
    descriptor left to open ``/etc/passwd``) as "no such user", and a cached
    miss would outlive it until the next reload.
    """

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}
        self.misses = 0

    def user(self, uid: int) -> str | None:
        return self._name(self.users, uid, lambda: pwd.getpwuid(uid).pw_name)

    def group(self, gid: int) -> str | None:
        return self._name(self.groups, gid, lambda: grp.getgrgid(gid).gr_name)

    def _name(self, cache: dict[int, str], key: int, look: Callable[[], str]) -> str | None:
        name = cache.get(key)
        if name is None:
            try:
                name = look()
            except (KeyError, OverflowError):
                self.misses += 1
                return None
            if len(cache) >= CACHE_SIZE:
                cache.clear()
            cache[key] = name
        return name


_lookups = _Lookups()


def user_name(uid: int) -> str | None:
    """The name of ``uid`` in the user database, or None."""
    return _lookups.user(uid)


def who(uid: int | None) -> str:
    """A uid as refusals and the log name it: ``uid 65534 (nobody)``."""
    if uid is None:
        return "a client whose uid the kernel did not report"
    name = user_name(uid)
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


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def groups_of(uid: int, gid: int | None) -> set[int]:
    """``gid`` (the connection's), the user's primary group and its supplementary groups."""
    gids = set() if gid is None else {gid}
    try:
        entry = pwd.getpwuid(uid)
    except (KeyError, OverflowError):
        _lookups.misses += 1
        return gids
    gids.add(entry.pw_gid)
    with contextlib.suppress(OSError):
        gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return gids


def clear_caches() -> dict[int, str]:
    """Forget the names looked up so far (the databases may have changed).

    Returns the user names known until now, for whoever showed them to tell
    which are no longer right.
    """
    users, _lookups.users = _lookups.users, {}
    _lookups.groups.clear()
    return users

"""Who may do what: roles, the role each command needs, and the policy that gives uids roles.

Pure domain logic: no sockets, no logging; the only outside world it reads is
the system's user and group databases (``pwd``, ``grp``,
``os.getgrouplist``), through the cached look-ups at the bottom.  The guard
(:mod:`migblockd.guard`) applies it to each request.

Roles are ordered, each including the one before::

    observer   the query-* commands, qmp_capabilities, query-qmp-schema
    client     + add-blocker, and del-blocker of the blockers its own uid added
    operator   + migrate, migrate_cancel, migrate-set-parameters,
                 migrate-set-capabilities
    admin      everything, including del-blocker of anyone's blocker

The command table is derived, not listed: a command whose name starts with
``query-`` needs ``observer``, so a new query is readable at once; a command
named nowhere here needs ``admin``, so a new command that changes something is
closed until someone decides otherwise.

How a uid gets its role (:meth:`Resolver.role`):

1. root and the uid the daemon runs as are always ``admin``;
2. else an entry for the user in ``users`` (by number, then by name) decides,
   so that one user can be given less (or more) than their groups;
3. else the highest role among the ``groups`` entries for any of its groups:
   the gid the kernel reported for the connection, the user's primary group
   and its supplementary groups in the group database;
4. else ``default-role``.

A connection whose credentials the kernel did not give has ``default-role``.
"""

from __future__ import annotations

import contextlib
import enum
import grp
import json
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from migblockd.kinds import Kind, describe

__all__ = [
    "DEFAULT_MAX_BLOCKERS",
    "DEFAULT_MAX_BLOCKERS_PER_UID",
    "DEFAULT_MAX_REASON_LENGTH",
    "AccessTable",
    "GroupName",
    "Policy",
    "Quotas",
    "Resolver",
    "Role",
    "clear_caches",
    "group_id",
    "needed_role",
    "user_name",
]


class Role(enum.IntEnum):
    """A role; a larger one may do everything a smaller one may."""

    OBSERVER = 0
    CLIENT = 1
    OPERATOR = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()


ROLE_NAMES: Final = tuple(str(r) for r in Role)

#: What each role adds to the one below it (observer's are the ``query-*`` commands).
_GRANTS: Final[Mapping[str, Role]] = {
    "qmp_capabilities": Role.OBSERVER,
    "add-blocker": Role.CLIENT,
    "del-blocker": Role.CLIENT,  # and only of the uid's own blockers: see the guard
    "migrate": Role.OPERATOR,
    "migrate_cancel": Role.OPERATOR,
    "migrate-set-parameters": Role.OPERATOR,
    "migrate-set-capabilities": Role.OPERATOR,
}


def needed_role(command: str) -> Role:
    """The least role that may run ``command``: unknown commands need ``admin``."""
    granted = _GRANTS.get(command)
    if granted is not None:
        return granted
    if command.startswith("query-"):
        return Role.OBSERVER
    return Role.ADMIN


# --------------------------------------------------------------------------- quotas

DEFAULT_MAX_BLOCKERS: Final = 100_000
DEFAULT_MAX_BLOCKERS_PER_UID: Final = 1_000
DEFAULT_MAX_REASON_LENGTH: Final = 1_024


@dataclass(frozen=True, slots=True)
class Quotas:
    """Bounds on what clients may register (the ``max-blockers*`` and
    ``max-reason-length`` settings).  ``max_blockers_per_uid`` does not apply
    to admins; the other two apply to everyone."""

    max_blockers: int = DEFAULT_MAX_BLOCKERS
    max_blockers_per_uid: int = DEFAULT_MAX_BLOCKERS_PER_UID
    max_reason_length: int = DEFAULT_MAX_REASON_LENGTH


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Policy:
    """The ``[access]`` table: roles by user and by group, and everyone else's.

    ``users`` and ``groups`` are (name or decimal number, role) pairs, sorted,
    so that two policies that say the same thing compare equal.
    """

    default_role: Role = Role.CLIENT
    users: tuple[tuple[str, Role], ...] = ()
    groups: tuple[tuple[str, Role], ...] = ()

    @classmethod
    def of(cls, default_role: Role = Role.CLIENT,
           users: Mapping[str | int, Role] | None = None,
           groups: Mapping[str | int, Role] | None = None) -> Policy:
        """A policy from plain mappings (keys are names or numbers)."""
        return cls(default_role, _pairs(users or {}), _pairs(groups or {}))

    def __str__(self) -> str:
        """The policy as a TOML inline table (which :class:`AccessTable` reads back)."""
        def table(pairs: tuple[tuple[str, Role], ...]) -> str:
            return "{" + ", ".join(f"{_toml_key(k)} = '{r}'" for k, r in pairs) + "}"

        return (f"{{default-role = '{self.default_role}', users = {table(self.users)}, "
                f"groups = {table(self.groups)}}}")


def _toml_key(key: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    if re.fullmatch(r"[^'\x00-\x1f\x7f]*", key):
        return f"'{key}'"  # a literal string: no escapes to get wrong
    return json.dumps(key)


def _pairs(mapping: Mapping[str | int, Role]) -> tuple[tuple[str, Role], ...]:
    return tuple(sorted((str(k), Role(r)) for k, r in mapping.items()))


_KEYS: Final = ("default-role", "users", "groups")

#: The greatest uid or gid: 2**32 - 1 is the kernel's "no id" (chown()'s "no change").
MAX_ID: Final = 2**32 - 2


def _role(value: object, where: str) -> Role:
    if isinstance(value, str) and value in ROLE_NAMES:
        return Role[value.upper()]
    raise ValueError(f"{where} must be one of {', '.join(ROLE_NAMES)}, not {describe(value)}")


def _entries(value: object, where: str) -> tuple[tuple[str, Role], ...]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table of names or numbers to roles, "
                         f"not {describe(value)}")
    what = "uid" if where == "users" else "gid"
    pairs: dict[str, tuple[str, Role]] = {}
    for key, role in value.items():
        if not key or "\0" in key or key != key.strip():
            raise ValueError(f"{where} has an invalid name {describe(key)}")
        name = key
        if _is_number(key):
            if int(key) > MAX_ID:  # no process has one: the entry could never apply
                raise ValueError(f"{where}.{key} must be a {what} of at most {MAX_ID}")
            name = str(int(key))  # "0100" and "100": one uid
        if name in pairs:
            # Two roles for one uid: one of them would win without a word.
            raise ValueError(f"{where}.{key} is {where}.{pairs[name][0]} again (both are "
                             f"{what} {name}); give it once")
        pairs[name] = (key, _role(role, f"{where}.{key}"))
    return tuple(sorted((name, role) for name, (_, role) in pairs.items()))


@dataclass(frozen=True)
class AccessTable(Kind[Policy]):
    """Reads the ``[access]`` TOML table into a :class:`Policy`."""

    toml_doc = ('a table, [access], with a default-role (observer, client, operator or '
                'admin) and users and groups tables mapping names or numbers to roles')

    def __call__(self, value: object) -> Policy:
        if isinstance(value, str):  # an inline table, as show() writes it
            try:
                value = tomllib.loads(f"access = {value}")["access"]
            except tomllib.TOMLDecodeError:
                raise ValueError(f"must be a table ([access]), not {describe(value)}") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be a table ([access]), not {describe(value)}")
        unknown = [k for k in value if k.replace("_", "-") not in _KEYS]
        if unknown:
            raise ValueError(f"has an unknown key {unknown[0]!r} "
                             f"(it takes {', '.join(_KEYS)})")
        raw: dict[str, object] = {}
        given: dict[str, str] = {}
        for key, item in value.items():
            name = key.replace("_", "-")
            if name in given:
                raise ValueError(f"{key} is {given[name]} again (an underscore stands for a "
                                 "dash); give it once")
            given[name] = key
            raw[name] = item
        default = _role(raw["default-role"], "default-role") if "default-role" in raw \
            else Role.CLIENT
        return Policy(default, _entries(raw.get("users", {}), "users"),
                      _entries(raw.get("groups", {}), "groups"))

    def show(self, value: Policy) -> str:
        return str(value)


@dataclass(frozen=True)
class GroupName(Kind[str]):
    """A group, by name or number (``--socket-group``); resolved when it is used."""

    def __call__(self, value: object) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if (not isinstance(value, str) or not value or value != value.strip()
                or any(c in value for c in "\0:\n")):
            raise ValueError(f"must be a group name or number, not {describe(value)}")
        # (gid_t)-1 tells chown() to leave the group alone.
        if value.isdecimal() and int(value) > MAX_ID:
            raise ValueError(f"must be a group number of at most {MAX_ID}, not {value}")
        return value


# --------------------------------------------------------------------------- resolving

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
    _users_by_id: dict[int, Role] = field(init=False, repr=False)
    _users_by_name: dict[str, Role] = field(init=False, repr=False)
    _groups_by_id: dict[int, Role] = field(init=False, repr=False)
    _groups_by_name: dict[str, Role] = field(init=False, repr=False)
    _cache: dict[tuple[int, int | None], Role] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._users_by_id, self._users_by_name = _split(self.policy.users)
        self._groups_by_id, self._groups_by_name = _split(self.policy.groups)
        self._cache = {}

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

    def _resolve(self, uid: int, gid: int | None) -> Role:
        if uid in (0, self.daemon_uid):
            return Role.ADMIN
        role = self._users_by_id.get(uid)
        if role is None and self._users_by_name:
            name = user_name(uid)
            if name is not None:
                role = self._users_by_name.get(name)
        if role is not None:
            return role
        if self._groups_by_id or self._groups_by_name:
            roles = [r for g in groups_of(uid, gid) if (r := self._group_role(g)) is not None]
            if roles:
                return max(roles)
        return self.policy.default_role

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
                and (int(key) if _is_number(key) else _uid_of(key)) in admins]

    def unknown_names(self) -> list[str]:
        """Names in the policy that the user and group databases do not know (to warn)."""
        missing = [f"user {n!r}" for n in self._users_by_name if _uid_of(n) is None]
        missing += [f"group {n!r}" for n in self._groups_by_name if group_id(n) is None]
        return missing


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _split(pairs: Iterable[tuple[str, Role]]) -> tuple[dict[int, Role], dict[str, Role]]:
    by_id: dict[int, Role] = {}
    by_name: dict[str, Role] = {}
    for key, role in pairs:
        if _is_number(key):
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


def group_name(gid: int) -> str | None:
    return _lookups.group(gid)


def group_id(name: str) -> int | None:
    """A group given by name or decimal number, as a gid; None when there is no such name."""
    if _is_number(name):
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


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

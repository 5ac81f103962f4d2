"""Who may do what: roles, the role each command needs, and the ``[access]`` policy.

Pure domain logic: no sockets, no logging, no user or group database.  How a
uid gets its role under a policy, through the host's user and group databases,
is :mod:`migblockd.resolver`'s.  The guard (:mod:`migblockd.guard`) applies
both to each request.

Roles are ordered, each including the one before::

    observer   the query-* commands, qmp_capabilities, query-qmp-schema
    client     + add-blocker (not internal), and del-blocker of the blockers its
                 own uid added
    operator   + add-blocker with internal: true, migrate, migrate_cancel,
                 migrate-set-parameters, migrate-set-capabilities
    admin      everything, including del-blocker of anyone's blocker

The command table is derived, not listed: a command whose name starts with
``query-`` needs ``observer``, so a new query is readable at once; a command
named nowhere here needs ``admin``, so a new command that changes something is
closed until someone decides otherwise.

The policy (:class:`Policy`) gives users and groups, by name or number, a
role, and everyone else ``default-role``; :class:`AccessTable` reads it from
the ``[access]`` table of the configuration and checks it.
"""

from __future__ import annotations

import enum
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from migblockd.kinds import KeyedError, Kind, describe

__all__ = [
    "DEFAULT_MAX_BLOCKERS",
    "DEFAULT_MAX_BLOCKERS_PER_UID",
    "DEFAULT_MAX_REASON_LENGTH",
    "AccessTable",
    "GroupName",
    "Policy",
    "Quotas",
    "Role",
    "is_number",
    "needed_role",
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


def is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


def _role(value: object, where: str, keys: tuple[str, ...]) -> Role:
    if isinstance(value, str) and value in ROLE_NAMES:
        return Role[value.upper()]
    raise KeyedError(f"{where} must be one of {', '.join(ROLE_NAMES)}, not {describe(value)}",
                     keys)


def _entries(value: object, where: str, spelled: str) -> tuple[tuple[str, Role], ...]:
    """``spelled``: the key ``where`` as the file spells it."""
    if not isinstance(value, dict):
        raise KeyedError(f"{where} must be a table of names or numbers to roles, "
                         f"not {describe(value)}", (spelled,))
    what = "uid" if where == "users" else "gid"
    pairs: dict[str, tuple[str, Role]] = {}
    for key, role in value.items():
        if not key or "\0" in key or key != key.strip():
            raise KeyedError(f"{where} has an invalid name {describe(key)}", (spelled, key))
        name = key
        if is_number(key):
            if int(key) > MAX_ID:  # no process has one: the entry could never apply
                raise KeyedError(f"{where}.{key} must be a {what} of at most {MAX_ID}",
                                 (spelled, key))
            name = str(int(key))  # "0100" and "100": one uid
        if name in pairs:
            # Two roles for one uid: one of them would win without a word.
            raise KeyedError(f"{where}.{key} is {where}.{pairs[name][0]} again (both are "
                             f"{what} {name}); give it once", (spelled, key))
        pairs[name] = (key, _role(role, f"{where}.{key}", (spelled, key)))
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
            raise KeyedError(f"has an unknown key {describe(unknown[0])} "
                             f"(it takes {', '.join(_KEYS)})", (unknown[0],))
        raw: dict[str, object] = {}
        given: dict[str, str] = {}
        for key, item in value.items():
            name = key.replace("_", "-")
            if name in given:
                raise KeyedError(f"{key} is {given[name]} again (an underscore stands for a "
                                 "dash); give it once", (key,))
            given[name] = key
            raw[name] = item
        default = (_role(raw["default-role"], "default-role", (given["default-role"],))
                   if "default-role" in raw else Role.CLIENT)
        return Policy(default, _entries(raw.get("users", {}), "users", given.get("users", "")),
                      _entries(raw.get("groups", {}), "groups", given.get("groups", "")))

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

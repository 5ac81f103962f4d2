"""How a uid gets its role: the ``[access]`` policy applied to the host's users and groups.

The only outside world access control reads is here: the system's user and
group databases (``pwd``, ``grp``, ``os.getgrouplist``), through cached
look-ups, ``/etc/subuid`` and ``/etc/subgid``, and which ids the daemon's user
namespace maps (:mod:`migblockd.userns`).  It is apart from
:mod:`migblockd.access`, which says what the roles and the policy are, because
it is the part that depends on the host and on when it is asked: its answers
are cached, and start over on reload.

How a uid gets its role (:meth:`Resolver.role`):

1. root and the uid the daemon runs as are always ``admin``;
2. else an entry for the user in ``users`` (by number, then by name) decides,
   so that one user can be given less (or more) than their groups;
3. else the highest role among the ``groups`` entries for any of its groups:
   the gid the kernel reported for the connection, the user's primary group
   and its supplementary groups in the group database.  A reported gid that is
   none of those, and a subordinate gid of a user (``/etc/subgid``), gives at
   most that user's role (of each such user, when ranges overlap): the user can
   make it theirs with ``newgidmap``.  A reported gid that this process's user
   namespace reports for every gid it does not map (the overflow gid) names no
   group and gives nothing;
4. else ``default-role``;
5. and a subordinate uid (``/etc/subuid``, see subuid(5)) that no ``users``
   entry names gets at most what the user it belongs to gets: that user can
   ``setuid()`` to it in a user namespace of their own (``newuidmap``), and must
   not shed a role the policy lowered for them by doing so.

A connection whose credentials the kernel did not give has ``default-role``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from migblockd.access import Policy, Role, is_number
from migblockd.databases import (
    CACHE_SIZE,
    Facts,
    Live,
    NeedsLookup,
    Said,
    caches,
    clear_caches,
    group_id,
    group_name,
    known_name,
    learn,
    named,
    named_like,
    uid_of,
    user_name,
    who,
)
from migblockd.subordinates import SUBGID_FILE, SUBUID_FILE, Subordinates
from migblockd.userns import unmapped_gid, unmapped_uid

__all__ = [
    "CACHE_SIZE",
    "Facts",
    "Key",
    "Live",
    "NeedsLookup",
    "Resolver",
    "clear_caches",
    "group_id",
    "group_name",
    "known_name",
    "learn",
    "named",
    "named_like",
    "user_name",
    "who",
]


#: A role asked for: (uid, gid), the gid None when only the uid counts.
Key = tuple[int, int | None]


class Source(Protocol):
    """Where a resolver's answers come from: the databases, or what they said."""

    misses: int

    def user(self, uid: int) -> str | None: ...
    def group(self, gid: int) -> str | None: ...
    def groups_of(self, uid: int) -> set[int]: ...


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
    #: What the databases said, that :meth:`known` reads: the process's, or a
    #: reload's own until it applies them (:func:`migblockd.databases.install`).
    facts: Facts = field(default_factory=caches, repr=False, compare=False)
    #: The uid and gid the kernel reports for every peer's that this process's user
    #: namespace does not map (None: it maps them all).
    unmapped: tuple[int | None, int | None] = field(
        default_factory=lambda: (unmapped_uid(), unmapped_gid()), repr=False, compare=False)
    _users_by_id: dict[int, Role] = field(init=False, repr=False)
    _users_by_name: dict[str, Role] = field(init=False, repr=False)
    _groups_by_id: dict[int, Role] = field(init=False, repr=False)
    _groups_by_name: dict[str, Role] = field(init=False, repr=False)
    _cache: dict[Key, Role] = field(init=False, repr=False)
    #: Answers that rest on a look-up that found nothing: not for the next
    #: connection (judged afresh), but for what the quotas ask meanwhile.
    _provisional: dict[Key, Role] = field(init=False, repr=False)
    _subuids: Subordinates = field(init=False, repr=False)
    _subgids: Subordinates = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._users_by_id, self._users_by_name = _split(self.policy.users)
        self._groups_by_id, self._groups_by_name = _split(self.policy.groups)
        self._cache = {}
        self._provisional = {}
        self._subuids = Subordinates(self.subuid_file, uid_of)
        self._subgids = Subordinates(self.subgid_file, uid_of)

    def role(self, uid: int | None, gid: int | None = None) -> Role:
        """The role of a peer with this uid (and, from ``SO_PEERCRED``, gid).

        An answer that rests on a lookup that found nothing is not kept for the
        next connection: the C library says "not found" when it could not look
        (out of file descriptors), and such an answer must not outlive the
        moment (the quotas take it, :meth:`known` with ``provisional``).
        """
        if uid is None:
            return self.policy.default_role
        key = (uid, gid)
        role = self._cache.get(key)
        if role is None:
            role, firm = self._answer(key, self.facts)
            self.learn({key: (role, firm)})
        return role

    def known(self, uid: int | None, gid: int | None = None, *,
              provisional: bool = False) -> Role | None:
        """What :meth:`role` says, when it needs nothing the databases have not said
        yet; else None (:meth:`answers` asks them, off the loop).  Never blocks:
        the event loop's.  ``provisional``: an answer that rested on a look-up
        that found nothing does too (not for a connection: each is judged afresh)."""
        if uid is None:
            return self.policy.default_role
        key = (uid, gid)
        role = self._cache.get(key)
        if role is None:
            if provisional and (role := self._provisional.get(key)) is not None:
                return role
            try:
                role, _ = self._answer(key, Said(self.facts))
            except NeedsLookup:
                return None
            self._keep(key, role)
        return role

    def answers(self, keys: Iterable[Key], source: Source) -> dict[Key, tuple[Role, bool]]:
        """Each key's role from ``source``, and whether it is firm (no look-up found
        nothing): off the loop, for :meth:`learn` to keep on it."""
        return {key: self._answer(key, source) for key in keys}

    def learn(self, answers: dict[Key, tuple[Role, bool]]) -> None:
        """Keep what :meth:`answers` found."""
        for key, (role, firm) in answers.items():
            if firm:
                self._provisional.pop(key, None)
                self._keep(key, role)
            else:
                if len(self._provisional) >= CACHE_SIZE:
                    self._provisional.clear()
                self._provisional[key] = role

    def keys_of(self, uid: int, gid: int | None) -> list[Key]:
        """The roles asked about a connection of ``uid`` and ``gid``: its own and, for
        a subordinate uid, those the quotas ask (the uid's alone, its user's)."""
        keys: list[Key] = [(uid, gid)]
        owner = self.owner_of(uid) if self._subuids else None
        if owner is not None:
            keys += [(uid, None), (owner, None)]
        return keys

    def _keep(self, key: Key, role: Role) -> None:
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = role

    def _answer(self, key: Key, source: Source) -> tuple[Role, bool]:
        misses = source.misses
        role = self._resolve(key[0], key[1], source)
        return role, source.misses == misses

    def _resolve(self, uid: int, gid: int | None, source: Source, *,
                 own: bool = False) -> Role:
        if uid in (0, self.daemon_uid):
            return Role.ADMIN
        role = self._users_by_id.get(uid)
        if role is None and self._users_by_name:
            name = source.user(uid)
            if name is not None:
                role = self._users_by_name.get(name)
        if role is not None:
            return role
        role = self.policy.default_role
        if self._groups_by_id or self._groups_by_name:
            listed = source.groups_of(uid)
            roles = [r for g in listed if (r := self._group_role(g, source)) is not None]
            if gid is not None and gid not in listed and gid != self.unmapped[1]:
                reported = self._group_role(gid, source)
                if reported is not None:
                    # Not a member: the gid may be an owner's by newgidmap.
                    for owner in self._subgids.owners_of(gid):
                        reported = min(reported, self._resolve(owner, None, source, own=True))
                    roles.append(reported)
            if roles:
                role = max(roles)
        if not own:
            # Every user whose range holds it can setuid() to it.
            for owner in self._subuids.owners_of(uid):
                if owner != uid:
                    role = min(role, self._resolve(owner, None, source, own=True))
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

    def _group_role(self, gid: int, source: Source) -> Role | None:
        role = self._groups_by_id.get(gid)
        if self._groups_by_name:
            # Named by number and by name, a group has two entries: the higher
            # wins, as among the user's groups (unlike users, where one entry
            # is the more specific).
            name = source.group(gid)
            by_name = None if name is None else self._groups_by_name.get(name)
            if by_name is not None and (role is None or by_name > role):
                role = by_name
        return role

    def overruled(self) -> list[Flagged]:
        """``users`` entries that give root or the daemon's user less than admin,
        which they always are (to warn: the policy does not do what it says)."""
        admins = {0, self.daemon_uid}
        return [(("users", key), f"user {key!r} role {role}") for key, role in self.policy.users
                if role < Role.ADMIN
                and (int(key) if is_number(key) else uid_of(key)) in admins]

    def shadowed(self) -> list[Flagged]:
        """``users`` entries by name that an entry by number for the same uid
        overrides with another role (to warn: the name's entry never applies,
        however specific it looks, since the number is looked up first)."""
        shadowed = []
        for name, role in self._users_by_name.items():
            uid = uid_of(name)
            by_number = None if uid is None else self._users_by_id.get(uid)
            if by_number is not None and by_number != role and uid not in (0, self.daemon_uid):
                shadowed.append((("users", name), f"user {name!r} role {role} and its uid "
                                 f"{uid} role {by_number}"))
        return shadowed

    def named_like_numbers(self) -> list[Flagged]:
        """Entries by number that are also the name of another user or group (to
        warn: the entry applies to the id, not to the one so named)."""
        found = []
        for kind, pairs in (("user", self.policy.users), ("group", self.policy.groups)):
            for key, role in pairs:
                other = named_like(key, kind)
                if other is not None:
                    found.append(((f"{kind}s", key),
                                  f"{kind} {key!r} role {role}: a number is read as an id, "
                                  f"but a {kind} is named {key!r} (id {other}); to mean "
                                  f"that {kind}, give {other}"))
        return found

    def unmapped_entries(self) -> list[Flagged]:
        """Entries for the id the kernel reports for every unmapped user, or group (to
        warn: the entry never applies to a peer's reported id, which names no one)."""
        found = []
        for kind, pairs, id_of, unmapped in (
                ("user", self.policy.users, uid_of, self.unmapped[0]),
                ("group", self.policy.groups, group_id, self.unmapped[1])):
            found += [((f"{kind}s", key), f"{kind} {key!r} role {role}, but this daemon's "
                       f"user namespace does not map every {kind[0]}id, and the kernel "
                       f"reports {kind[0]}id {unmapped} for each it does not map")
                      for key, role in pairs if unmapped is not None
                      and (int(key) if is_number(key) else id_of(key)) == unmapped]
        return found

    def unknown_names(self) -> list[Flagged]:
        """Names in the policy that the user and group databases do not know (to warn)."""
        missing = [(("users", n), f"user {n!r}") for n in self._users_by_name
                   if uid_of(n) is None]
        missing += [(("groups", n), f"group {n!r}") for n in self._groups_by_name
                    if group_id(n) is None]
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


#: An entry of the policy (its table, ``users`` or ``groups``, and its key as the
#: file gives it) and what is said of it.
Flagged = tuple[tuple[str, str], str]

"""The quotas' part of the access guard: what counts against whom, and what is over.

Part of :class:`migblockd.guard.Guard` (a base class of it, with no state of its own).
Blockers count against the uid that added them, or, for a subordinate uid of a
user's (``/etc/subuid``: a rootless container's), against that user, as the uid
can ``setuid()`` to any of them; an admin's count against nobody.  An
``add-blocker`` is refused past ``max-reason-length``, ``max-blockers`` and
``max-blockers-per-uid``; what the registry already holds past them (restored, or
kept when a reload lowered them) is warned of, and nothing is removed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NoReturn

from migblockd.access import Quotas, Role
from migblockd.connection import Connection
from migblockd.qmp.errors import QMPError
from migblockd.registry import Owner, Registry
from migblockd.resolver import Resolver
from migblockd.resolver import named as who

__all__ = ["OverQuota", "QuotaRules"]

log = logging.getLogger("migblockd")

Args = dict[str, Any]


class OverQuota(QMPError):
    """An ``add-blocker`` past a quota or a limit (count, per-uid count, reason length)."""


#: The uids a line about quotas names; it counts the others.
_NAMED = 5


def _count(n: int) -> str:
    return f"{n} blocker" if n == 1 else f"{n} blockers"


class QuotaRules:
    """What a :class:`~migblockd.guard.Guard` counts, and refuses for it."""

    # The guard's, set in Guard.__init__ and Guard.configure:
    registry: Registry
    quotas: Quotas
    resolver: Resolver

    if TYPE_CHECKING:
        def _refuse(self, conn: Connection, name: str, desc: str, kind: type[QMPError],
                    args: Args, *, named: bool = False) -> NoReturn: ...

    def _share_counts(self) -> None:
        # A user can setuid() to any of their subordinate uids in a user namespace
        # of their own: what those hold is the user's, for the quotas.
        resolver = self.resolver

        # Decided once per uid until the next reload: a blocker's removal must find
        # it counted where its addition counted it (a look-up that failed once
        # would answer otherwise the next time).
        decided: dict[int, int | None] = {}

        def shared_with(uid: int) -> int | None:
            if uid not in decided:
                # Not an admin's: what an admin holds counts against nobody.
                owner = resolver.owner_of(uid)
                decided[uid] = (None if owner is None or self._admin(uid) else owner)
            return decided[uid]

        self.registry.share_counts(shared_with if resolver.has_subordinates else None)

    def counted_uid(self, owner: Owner | None) -> int | None:
        """The uid whose per-uid limits ``owner``'s connections and blockers count
        against: the user a subordinate uid belongs to, else its own."""
        return None if owner is None else self._user_of(owner.uid)

    def _admin(self, uid: int | None) -> bool:
        """Whether ``uid`` is an admin, as the databases said (looked up when its
        connection came, at the start, or at the reload: never here, on the
        loop); not known: not taken for one."""
        return self.resolver.known(uid, provisional=True) is Role.ADMIN

    def _user_of(self, uid: int) -> int:
        user = self.resolver.owner_of(uid) if self.resolver.has_subordinates else None
        return uid if user is None else user

    def _warn_about_quotas(self) -> None:
        for line in self.over_quotas():
            log.warning("%s", line)

    def over_quotas(self) -> list[str]:
        """What the registry holds past the quotas (restored, or kept when a reload
        lowered them): nothing is removed, but the adds they count are refused until
        enough are deleted, which the operator should hear of before a refusal."""
        quotas, registry = self.quotas, self.registry
        lines = []
        total = len(registry)
        if total > quotas.max_blockers:
            lines.append(f"{_count(total)} registered, more than max-blockers="
                         f"{quotas.max_blockers}: adds are refused until "
                         f"{total - quotas.max_blockers + 1} are deleted")
        limit = quotas.max_blockers_per_uid
        users = {None if uid is None else self._user_of(uid) for uid in registry.owners()}
        over = sorted(((registry.count_held(user), user) for user in users
                       if not self._admin(user)
                       and registry.count_held(user) > limit),
                      key=lambda held: (-held[0], -1 if held[1] is None else held[1]))
        if len(over) == 1:
            held, user = over[0]
            whose = (f"{who(user)} and its subordinate uids hold"
                     if held != registry.count_owned(user) else f"{who(user)} holds")
            lines.append(f"{whose} {_count(held)}, more than max-blockers-per-uid={limit}: "
                         f"its adds are refused until {held - limit + 1} are deleted")
        elif over:
            shown_ = ", ".join(f"{who(user)} {held}" for held, user in over[:_NAMED])
            more = f" and {len(over) - _NAMED} more" if len(over) > _NAMED else ""
            lines.append(f"{len(over)} uids hold more than max-blockers-per-uid={limit} "
                         f"blockers ({shown_}{more}): their adds are refused until they "
                         "delete enough")
        return lines

    def _check_quotas(self, conn: Connection, role: Role, args: Args) -> None:
        """Refuse an ``add-blocker`` past a quota or a limit."""
        quotas = self.quotas
        length = len(args["reason"])
        if length > quotas.max_reason_length:
            self._refuse(conn, "add-blocker",
                         f"Parameter 'reason' is too long: {length} characters, "
                         f"max-reason-length is {quotas.max_reason_length}", OverQuota, args)
        registry = self.registry
        total = len(registry)
        if total >= quotas.max_blockers:
            self._refuse(conn, "add-blocker",
                         f"Too many migration blockers: {total} registered, "
                         f"max-blockers is {quotas.max_blockers}", OverQuota, args)
        if role < Role.ADMIN:
            owner = conn.owner
            uid = None if owner is None else owner.uid
            user = self.counted_uid(owner)
            owned = registry.count_held(user)
            if user != uid and self._admin(user):
                # An admin's own blockers are exempt, and must not use up the quota
                # of its subordinate uids (root's are every rootful container's).
                owned -= registry.count_owned(user)
            if owned >= quotas.max_blockers_per_uid:
                if user == uid and owned == registry.count_owned(uid):
                    whom = f"{who(uid)}: it owns"
                else:
                    whom = f"{who(user)} and its subordinate uids: they own"
                self._refuse(conn, "add-blocker",
                             f"Too many migration blockers for {whom} {owned}, "
                             f"max-blockers-per-uid is {quotas.max_blockers_per_uid}",
                             OverQuota, args)

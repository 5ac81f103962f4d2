"""The access guard: each request's role check, quotas and limits, worded and logged here only.

:meth:`Guard.check` runs first in :meth:`migblockd.core.Core._run`, before the
handler and before the simulated migration advances, so a refused request
changes nothing and causes no event.  A request that waits for QEMU before its
change (``add-blocker`` with ``--qemu`` asks whether QEMU migrates, ``migrate``
asks several things) is judged again, role, quotas and ownership, each time it
goes on (:meth:`Guard.recheck`): requests sent together all wait, and each must
count the ones before it; and a reload meanwhile may have narrowed its role.

A refusal is a ``GenericError`` whose desc says what was refused and why (the
command, the uid, the role it has and the one it needs; for ``del-blocker``,
whose blocker it is; for ``migrate``, the kind of URI or channel and what QEMU
would do with it), and a warning in the log with the peer's pid and uid: at most
a burst of them per uid, command and class of refusal (:func:`refusal_kind`) in a
window (:mod:`migblockd.logs.throttle`), so that a client repeating one refused
request in a loop neither floods the journal nor hides its other refusals.

An ``add-blocker`` with ``internal: true`` needs ``operator``: such a blocker is
exempt from ``--only-migratable`` (QEMU's ``migrate_add_blocker_internal()``,
which only QEMU's own code calls), and a client must not be able to set aside
what the daemon's administrator promised.

A ``migrate`` by a role below admin may not make QEMU run a command or write a
file as its own user (an ``exec:`` or ``file:`` URI, and channels that say the
same): which ones, and why, is :mod:`migblockd.migrate_admin`'s.

What counts against whom, and the quotas' refusals and warnings, are
:mod:`migblockd.quota_rules`'s (a base class of :class:`Guard`); their lines are
worded and logged here too.

Cost per request, once a connection's role is known: one dict look-up for the
command's rule and an integer comparison; ``add-blocker`` adds a look-up of
``internal`` and three comparisons (reason length, total count, the uid's count, each O(1)), a
``del-blocker`` by a non-admin one registry look-up, and a ``migrate`` by a
non-admin two prefix tests on its URI and a few look-ups per channel.  A
connection's role is resolved when it is accepted (admission asks whether it
is an admin) and again at each reload, whose line names the uids whose role changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NoReturn

from migblockd.access import Policy, Quotas, Role, needed_role
from migblockd.connection import Connection
from migblockd.databases import NeedsLookup, Said, caches, install
from migblockd.judge import Judge, Prepared
from migblockd.logs import about, shown
from migblockd.logs.throttle import Throttle
from migblockd.migrate_admin import needs_admin
from migblockd.policy_notes import policy_warnings
from migblockd.qmp.errors import QMPError
from migblockd.quota_rules import OverQuota, QuotaRules
from migblockd.registry import Owner, Registry
from migblockd.resolver import Resolver, clear_caches, named, user_name

__all__ = ["AccessDenied", "Guard", "NotOwner", "OverQuota", "policy_warnings", "refusal_kind",
           "same_uid", "whose"]

log = logging.getLogger("migblockd")

Args = dict[str, Any]
Extra = Callable[[Connection, Role, Args], None]
#: The rule of a command the schema does not define: one forwarded to QEMU.
_FORWARDED: tuple[Role, Extra | None] = (Role.ADMIN, None)


class AccessDenied(QMPError):
    """The client's role does not allow this command (or this blocker)."""


class NotOwner(AccessDenied):
    """A ``del-blocker`` of a blocker another uid added (judged, like a quota, by
    what the registry holds)."""


def refusal_kind(name: str, refusal: type[BaseException]) -> tuple[str, str, str]:
    """The throttle's kind of a refusal's log line: the command and the class that
    refused it (:class:`NotOwner`, :class:`OverQuota`, ``DuplicateId``...).  Both are
    the code's (a command of the table), so there are few kinds."""
    return ("refused", name, refusal.__name__)


def whose(owner: Owner | None) -> str:
    """Whose a blocker is, as refusals and the log say it: ``uid 1001 (alice)``."""
    return "no known uid" if owner is None else named(owner.uid)


def same_uid(owner: Owner | None, other: Owner | None) -> bool:
    """Both are the same known uid: a blocker of one is the other's own."""
    return owner is not None and other is not None and owner.uid == other.uid


class Guard(QuotaRules):
    """The access policy and the quotas, applied to the requests of one daemon.

    ``commands`` are the names of the schema's commands (their rules are
    computed once); any other command (one forwarded to QEMU) needs ``admin``,
    whatever its name.  ``daemon_uid`` is the uid the daemon runs as, always admin.
    """

    def __init__(self, commands: Iterable[str], registry: Registry, policy: Policy,
                 quotas: Quotas, *, daemon_uid: int | None = None,
                 deferred: bool = False) -> None:
        self.registry = registry
        self.daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
        extras: dict[str, Extra] = {"add-blocker": self._check_add,
                                    "del-blocker": self._check_del,
                                    "migrate": self._check_migrate}
        self._rules: dict[str, tuple[Role, Extra | None]] = {
            name: (needed_role(name), extras.get(name)) for name in commands}
        self.policy = policy
        self.quotas = quotas
        self.judge = Judge(self)
        # A client may repeat a refused request in a loop: its lines are bounded.
        self.throttle = Throttle()
        if deferred:
            # The daemon's start: nothing looked up here (a database that does not
            # answer would hold the start, root's clients too).  Until the judge's
            # look-ups apply (migblockd.connection_roles.ConnectionRoles.start_access),
            # only what needs none is judged: even /etc/subuid names its users (getpwnam()).
            self.resolver = Resolver(policy, self.daemon_uid, subuid_file=os.devnull,
                                     subgid_file=os.devnull)
            self.judge.defer()
            self._share_counts()
            return
        self.resolver = Resolver(policy, self.daemon_uid)
        self._look_up_owners()
        self._share_counts()
        self._warn_about_policy()
        self._warn_about_quotas()

    def configure(self, policy: Policy, quotas: Quotas,
                  connections: Iterable[Connection] = ()) -> tuple[set[int], list[str]]:
        """Apply a (re)loaded policy and quotas from the next request of every connection.

        The user and group databases are read afresh too: a user added to a
        group since gets that group's role after a reload.  Returns the uids
        that own blockers and whose user name is not the one known before
        (renamed, created or removed since): their blockers show a stale one;
        and, for the reload's line, each connected uid whose role changed
        (``uid 1001 (alice) is operator (was client)``, once per change).
        """
        before = {conn: self.role_of(conn) for conn in connections}
        known = clear_caches()
        self.policy = policy
        self.quotas = quotas
        self.resolver = Resolver(policy, self.daemon_uid)
        self._look_up_owners()
        self._share_counts()
        changes: dict[str, None] = {}  # in the connections' order, each once
        for conn, was in before.items():
            conn.role = None
            now = self.role_of(conn)
            if now is not was:
                changes[f"{self._who(conn)} is {now} (was {was})"] = None
        self._warn_about_policy()
        self._warn_about_quotas()
        return {uid for uid in self.registry.owners()
                if uid is not None and user_name(uid) != known.get(uid)}, list(changes)

    def _look_up_owners(self) -> None:
        """At the start, before serving (or a reload without an event loop: tests):
        the names of root, of the daemon's user and of the blockers' owners, and
        the roles the quotas ask of the owners, looked up here."""
        for uid in (0, self.daemon_uid):
            user_name(uid)
        for owner in self.registry.owners():
            if owner is not None:
                user_name(owner)
                for key in {*self.resolver.keys_of(owner, None), (owner, None)}:
                    self.resolver.role(*key)

    def apply(self, prepared: Prepared, policy: Policy, quotas: Quotas,
              connections: Iterable[Connection]) -> tuple[set[int], list[str], list[Connection]]:
        """:meth:`configure` with what the reload looked up off the loop
        (:meth:`Judge.prepare`), all at once.  Also returns the connections whose
        new role it did not ask for (connected meanwhile): they are judged again."""
        before = {conn: self.role_of(conn) for conn in connections}
        # What the running roles rest on: a connection the reload did not ask about
        # has the new policy's role from it until its own look-up answers, never
        # the old policy's (a demoted user must not stay an admin meanwhile).
        said = Said(caches())
        known = install(prepared.resolver.facts)
        self.policy, self.quotas, self.resolver = policy, quotas, prepared.resolver
        self._share_counts()
        changes: dict[str, None] = {}  # in the connections' order, each once
        late = []
        for conn, was in before.items():
            owner = conn.owner
            now = (self.resolver.known(None) if owner is None else
                   self.resolver.known(owner.uid, owner.gid, provisional=True))
            if now is None:
                assert owner is not None  # one without credentials needs no look-up
                late.append(conn)
                now = self._meanwhile(owner, said)
            conn.role = now
            if now is not was:
                changes[f"{self._who(conn)} is {now} (was {was})"] = None
        for line in prepared.warnings:
            log.warning("%s", line)
        self._warn_about_quotas()
        users = caches().users
        return ({uid for uid in self.registry.owners()
                 if uid is not None and users.get(uid) != known.get(uid)}, list(changes), late)

    def _meanwhile(self, owner: Owner, said: Said) -> Role:
        """The new policy's role of a connection of ``owner`` from what the databases
        said before the reload (judged again when its look-up answers); the least
        role when they said too little."""
        key = (owner.uid, owner.gid)
        try:
            return self.resolver.answers([key], said)[key][0]
        except NeedsLookup:
            return Role.OBSERVER

    def _warn_about_policy(self) -> None:
        for line in policy_warnings(self.resolver):
            log.warning("%s", line)

    def role_of(self, conn: Connection) -> Role:
        role = conn.role
        if role is None:
            owner = conn.owner
            if owner is None:
                role = self.resolver.role(None)
            else:
                role = self.resolver.role(owner.uid, owner.gid)
            conn.role = role
        return role

    def check(self, conn: Connection, name: str, args: Args) -> None:
        """Raise :class:`QMPError` (and log) if ``conn`` may not run ``name`` with ``args``."""
        role = conn.role
        if role is None:
            role = self.role_of(conn)
        needed, extra = self._rules.get(name, _FORWARDED)
        if role < needed:
            self._refuse(conn, name, f"Permission denied: {name} needs role {needed}, "
                         f"but {self._who(conn)} has role {role}", AccessDenied, args)
        if extra is not None:
            extra(conn, role, args)

    def recheck(self, conn: Connection, name: str, args: Args) -> None:
        """Judge again, as :meth:`check` does, a request that waited for QEMU (or for a
        commit) before its change: others may have added or deleted blockers
        meanwhile, and each must count; and a reload may have changed its role,
        which the reload's line has named, and which every rule sees (not one the
        old role and another the new: an internal add refused, a plain one let in)."""
        self.check(conn, name, args)

    # -- the rules of particular commands ------------------------------------------
    def _check_add(self, conn: Connection, role: Role, args: Args) -> None:
        if args.get("internal") and role < Role.OPERATOR:
            # In QEMU only QEMU's own code registers internal blockers; here one
            # would let any client override --only-migratable, the admin's promise.
            self._refuse(conn, "add-blocker",
                         f"Permission denied: add-blocker with internal: true needs role "
                         f"{Role.OPERATOR} (it is exempt from --only-migratable), but "
                         f"{self._who(conn)} has role {role}", AccessDenied, args)
        self._check_quotas(conn, role, args)

    def _check_del(self, conn: Connection, role: Role, args: Args) -> None:
        if role >= Role.ADMIN:
            return
        blocker = self.registry.get(args["id"])
        if blocker is None:
            return  # the handler says it is not found
        owner = blocker.owner
        if same_uid(owner, conn.owner):
            return
        self._refuse(conn, "del-blocker",
                     f"Permission denied: del-blocker of blocker '{blocker.id}', which "
                     f"belongs to {whose(owner)}, needs role {Role.ADMIN}, but {self._who(conn)} "
                     f"has role {role}", NotOwner, args, named=True)

    def _check_migrate(self, conn: Connection, role: Role, args: Args) -> None:
        if role >= Role.ADMIN:
            return
        what = needs_admin(args)
        if what is not None:
            self._refuse(conn, "migrate", f"Permission denied: {what}, but {self._who(conn)} "
                         f"has role {role}", AccessDenied, args)

    # -- wording -----------------------------------------------------------------------
    @staticmethod
    def _who(conn: Connection) -> str:
        return named(None if conn.owner is None else conn.owner.uid)

    def bounded(self, kind: Hashable, owner: Owner | None) -> str | None:
        """Whether a line of ``kind`` about ``owner``'s uid goes out now, and what
        it adds: :meth:`migblockd.logs.throttle.Throttle.admit` of the guard's throttle."""
        # A user's subordinate uids share its window, as they share its limits.
        return self.throttle.admit(kind, self.counted_uid(owner),
                                   self.registry.clock.monotonic())

    def _refuse(self, conn: Connection, name: str, desc: str, kind: type[QMPError],
                args: Args, *, named: bool = False) -> NoReturn:
        """Log (bounded) and raise the refusal ``desc`` of ``name`` with ``args``.  The
        line says after the command's name what it was aimed at (:func:`_target`: the
        URI an audit of refused ``exec:`` migrates looks for), unless ``desc`` already
        ``named`` it, and a blocker's id puts the line in that blocker's history (its
        journal field)."""
        # desc names blocker ids, which clients choose: shown() bounds them.  Each
        # command's refusals of each class are bounded apart: a loop of refused
        # migrates must not hide the same uid's del-blocker of another's blocker.
        more = self.bounded(refusal_kind(name, kind), conn.owner)
        if more is not None:
            log.warning("%s: refused %s%s: %s%s", conn.label, name,
                        "" if named else _target(name, args), shown(desc, 400, quoted=False),
                        more, extra=about(conn, blocker_id=_blocker_id(name, args)))
        raise kind(desc)


def _target(name: str, args: Args) -> str:
    """What a refused command was aimed at, for its log line: a migrate's URI and its
    channels, those given; the blocker id of an add-blocker or del-blocker; the
    parameters or capabilities a migrate-set-* asked for; a human-monitor-command's
    HMP command, without its arguments; nothing for other commands.  Shown and
    bounded: clients choose them."""
    blocker_id = _blocker_id(name, args)
    if blocker_id is not None:
        return f" of {shown(blocker_id)}"
    if name == "migrate-set-parameters" and args:
        return f" with {shown(args)}"  # checked against the schema: a few numbers
    if name == "migrate-set-capabilities" and "capabilities" in args:
        return f" with {shown(args['capabilities'])}"
    if name == "human-monitor-command" and isinstance(args.get("command-line"), str):
        # Its name only: HMP takes passwords and keys as arguments (set_password,
        # object_add secret,data=...), which must not reach the journal.
        words = args["command-line"].split(maxsplit=1)
        rest = " (its arguments not logged, as they may hold secrets)" if len(words) > 1 else ""
        return f" {shown(words[0]) if words else repr('')}{rest}"
    if name != "migrate":
        return ""
    uri, channels = args.get("uri"), args.get("channels")
    # Both, when both are given: the refusal may be a channel's.
    return ("" if uri is None else f" to {shown(uri)}") + (
        "" if channels is None else f" with channels {shown(channels)}")


def _blocker_id(name: str, args: Args) -> str | None:
    """The blocker a refused ``add-blocker`` or ``del-blocker`` was aimed at, for its
    line's ``blocker_id`` field (the blocker's history); None for other commands, and
    for an add-blocker that lets the daemon choose the id."""
    blocker_id = args.get("id") if name in ("add-blocker", "del-blocker") else None
    return blocker_id if isinstance(blocker_id, str) else None

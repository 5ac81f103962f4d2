"""Judging roles off the event loop: a connection's when it comes, every one's at a reload.

Part of :class:`migblockd.guard.Guard` (its ``judge``).  What the user and group
databases said is kept (:mod:`migblockd.databases`); a connection whose role
(and user name) rests on nothing else is judged at once (:meth:`Judge.judged`:
root's and the daemon's own uid's always are), and the others wait for a
look-up on a worker thread (:meth:`Judge.wait`, :mod:`migblockd.lookups`)
before they are admitted: their role decides ``--max-clients-per-uid``.
Everyone else is served meanwhile.

A reload (:meth:`Judge.prepare`) builds its resolver and asks the databases
afresh on a worker thread, for the roles of the connected uids and of the
blockers' owners and for their names, into facts of its own: the loop serves
meanwhile, under the running policy, and :meth:`migblockd.guard.Guard.apply`
puts the answers in place at once.  A client connected meanwhile whose new
role the reload did not ask for gets it when its own look-up answers.

The daemon's start is such a reload (:meth:`Judge.defer`, then :meth:`Judge.prepare`
with ``start``): the daemon does not wait for the databases to answer (3 s at
most: :mod:`migblockd.serving`), and serves root and its own uid (their roles need
nothing looked up), while every other client waits for the start's look-ups, then
for its own; a reload waits for the start's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from migblockd.access import Policy, Role
from migblockd.connection import Connection
from migblockd.databases import Facts, Live, learn
from migblockd.lookups import Lookups
from migblockd.registry import Owner
from migblockd.resolver import Key, Resolver

if TYPE_CHECKING:
    from migblockd.guard import Guard

__all__ = ["Judge", "Prepared"]

log = logging.getLogger("migblockd")

Answers = dict[Key, tuple[Role, bool]]


@dataclass(frozen=True)
class Prepared:
    """A reload's resolver, its answers in its own facts, and its policy's warnings."""

    resolver: Resolver
    warnings: list[str]


class _Waiter:
    __slots__ = ("cancelled", "leave", "owner", "then")

    def __init__(self, owner: Owner, then: Callable[[Role | None], None]) -> None:
        self.owner, self.then, self.cancelled = owner, then, False
        self.leave: Callable[[], None] = lambda: None  # its look-up's, once asked

    def cancel(self) -> None:
        self.cancelled = True
        self.leave()


class Judge:
    """The guard's look-ups that must not hold the loop."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.lookups = Lookups()
        #: Called on the loop with the uids whose user name a look-up learned or
        #: changed: blockers encoded without it are encoded again.
        self.on_names: Callable[[list[int]], None] = lambda uids: None
        self._reloads = 0
        #: Done once the start's look-ups are applied (None: the start made them).
        self._start: asyncio.Future[None] | None = None

    # -- the start ---------------------------------------------------------------------
    def defer(self) -> None:
        """The start looks up nothing on the loop: until :meth:`started`, only root,
        the daemon's own uid and clients without credentials are judged; the others
        wait (on the loop that runs now)."""
        self._start = asyncio.get_running_loop().create_future()

    @property
    def starting(self) -> bool:
        """The start's look-ups are not applied yet."""
        return self._start is not None and not self._start.done()

    def started(self) -> None:
        """The start's look-ups are applied: the clients waiting for them ask their own."""
        if self._start is not None and not self._start.done():
            self._start.set_result(None)

    # -- a connection ------------------------------------------------------------------
    def judged(self, owner: Owner | None) -> Role | None:
        """The role of a connection of ``owner`` when nothing need be looked up for it
        (its role, its user name, what the quotas ask of it); else None: :meth:`wait`."""
        resolver = self.guard.resolver
        if owner is None:
            return resolver.policy.default_role
        uid = owner.uid
        if uid in (0, self.guard.daemon_uid):
            return Role.ADMIN
        if self.starting:
            return None  # the start's resolver knows no one's users or groups yet
        role = resolver.known(uid, owner.gid)
        if role is None or not resolver.facts.knows_name(uid):
            return None
        for key in resolver.keys_of(uid, owner.gid)[1:]:
            if resolver.known(*key, provisional=True) is None:
                return None
        return role

    def wait(self, owner: Owner, then: Callable[[Role | None], None]) -> Callable[[], None]:
        """Look up what :meth:`judged` lacks, then ``then(role)`` on the loop (None: no
        look-up could be made); returns what cancels the call (the look-up goes on)."""
        waiter = _Waiter(owner, then)
        self._ask(waiter)
        return waiter.cancel

    def _ask(self, waiter: _Waiter) -> None:
        start = self._start
        if start is not None and not start.done():
            # Asked with the start's resolver, its role would miss what the start
            # looks up (/etc/subuid's users): asked once the start's answers apply.
            def then(_: asyncio.Future[None]) -> None:
                if not waiter.cancelled:
                    self._ask(waiter)

            def leave() -> None:
                start.remove_done_callback(then)

            start.add_done_callback(then)
            waiter.leave = leave
            return
        resolver = self.guard.resolver
        uid, gid = waiter.owner.uid, waiter.owner.gid
        key = ("role", id(resolver), uid, gid)
        future = self.lookups.ask(
            key,
            functools.partial(_look, resolver, resolver.keys_of(uid, gid), [uid]),
            f"for uid {uid} (gid {gid})", f"clients of uid {uid} wait to be admitted")
        waiter.leave = functools.partial(self.lookups.leave, key, future)
        future.add_done_callback(functools.partial(self._answered, resolver, waiter))

    def _answered(self, resolver: Resolver, waiter: _Waiter,
                  future: asyncio.Future[tuple[Answers, Live]]) -> None:
        if future.cancelled():
            return
        failed = future.exception()
        if failed is None:
            answers, live = future.result()
            self._learn(resolver, answers, live)
        if waiter.cancelled:
            return
        if failed is not None:
            waiter.then(None)
        elif resolver is not self.guard.resolver:
            self._ask(waiter)  # a reload applied meanwhile: its role is the new policy's
        else:
            waiter.then(answers[waiter.owner.uid, waiter.owner.gid][0])

    def _learn(self, resolver: Resolver, answers: Answers, live: Live) -> None:
        changed = learn(live)
        if resolver is self.guard.resolver:
            resolver.learn(answers)
        if changed:
            self.on_names(changed)

    # -- a reload ----------------------------------------------------------------------
    async def prepare(self, policy: Policy, connections: Iterable[Connection],
                      warnings_of: Callable[[Resolver], list[str]], *,
                      start: bool = False) -> Prepared:
        """``policy``'s resolver, with what it says of ``connections`` (those there
        once it is built) and of the blockers' owners looked up afresh: on a worker
        thread, the loop serving on.  ``start``: the start's (:meth:`defer`); a
        reload's waits for it, else the start's policy would apply after it."""
        if not start and self._start is not None and not self._start.done():
            log.info("reload: waiting for the start's look-ups in the user and group "
                     "databases")
            await asyncio.shield(self._start)
        self._reloads += 1
        number = self._reloads
        daemon_uid = self.guard.daemon_uid
        what = "the start" if start else "a reload"
        waits = ("clients of uids other than 0 and the daemon's own wait to be admitted"
                 if start else "the reload waits")

        def build(live: Live) -> tuple[Resolver, list[str]]:
            live.doing = "reading the policy's users and groups (getpwnam, getgrnam)"
            resolver = Resolver(policy, daemon_uid, facts=Facts())
            return resolver, warnings_of(resolver)

        resolver, warnings = await asyncio.shield(self.lookups.ask(
            ("reload", number), build, f"for {what}'s policy", waits))
        keys, uids = self._needed(resolver, connections)
        answers, live = await asyncio.shield(self.lookups.ask(
            ("reload-roles", number), functools.partial(_look, resolver, keys, uids),
            f"for {what} ({len(uids)} uids)", waits if start else
            "the reload waits (clients are served meanwhile, under the running policy)"))
        learn(live, resolver.facts)
        resolver.learn(answers)
        return Prepared(resolver, warnings)

    def _needed(self, resolver: Resolver,
                connections: Iterable[Connection]) -> tuple[set[Key], list[int]]:
        """The roles and names a reload asks for: the connections', and those of the
        blockers' owners (their names for ``query-blockers``, their roles and their
        users' for the quotas), and root's and the daemon's names."""
        daemon_uid = self.guard.daemon_uid
        keys: set[Key] = set()
        uids: dict[int, None] = {0: None, daemon_uid: None}
        for conn in connections:
            if conn.owner is not None:
                uid = conn.owner.uid
                uids[uid] = None
                if uid not in (0, daemon_uid):
                    keys.update(resolver.keys_of(uid, conn.owner.gid))
        for owner in self.guard.registry.owners():
            if owner is not None:
                uids[owner] = None
                keys.update(resolver.keys_of(owner, None))
                keys.add((owner, None))
        return keys, list(uids)


def _look(resolver: Resolver, keys: Iterable[Key], uids: Iterable[int],
          live: Live) -> tuple[Answers, Live]:
    """On a worker thread: the names of ``uids`` and ``resolver``'s ``keys``."""
    for uid in uids:
        live.user(uid)
    return resolver.answers(keys, live), live

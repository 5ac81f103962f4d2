"""The open connections' roles as the access policy changes: a reload's, and the start's.

Part of :class:`migblockd.core.Core` (a base class of :class:`~migblockd.roster.Roster`,
with no state of its own).  A (re)loaded policy and its quotas reach the open
connections here (:meth:`ConnectionRoles.configure_access`, or
:meth:`ConnectionRoles.apply_access` with what a reload looked up off the loop), and
so do the start's look-ups (:meth:`ConnectionRoles.start_access`): each connection's
role judged again and counted against its uid's bound as that role says, and the
blockers of a uid whose user name changed encoded again (:meth:`ConnectionRoles.renamed`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

from migblockd import logs
from migblockd.access import Policy, Quotas, Role
from migblockd.admission import Admission
from migblockd.commands import Handlers
from migblockd.connection import Connection
from migblockd.guard import Guard
from migblockd.judge import Prepared
from migblockd.logs import about
from migblockd.policy_notes import policy_warnings
from migblockd.registry import Registry

__all__ = ["ConnectionRoles"]

log = logging.getLogger("migblockd")


class ConnectionRoles:
    """The roles of a :class:`~migblockd.core.Core`'s connections, as the policy changes."""

    # The core's, set in Core.__init__:
    registry: Registry
    handlers: Handlers
    admission: Admission
    guard: Guard
    connections: dict[Connection, None]  # an ordered set

    def configure_access(self, policy: Policy, quotas: Quotas) -> list[str]:
        """Apply a (re)loaded access policy and quotas (see :meth:`Guard.configure`);
        returns each connected uid's change of role, worded for the reload's line.

        A blocker is encoded once, its owner's user name with it: those of a
        uid whose name the reload found changed are encoded again, so that
        ``query-blockers`` shows every blocker of a uid under its name of now.
        """
        renamed, roles = self.guard.configure(policy, quotas, self.connections)
        self._repool()
        self.renamed(renamed)
        return roles

    def apply_access(self, prepared: Prepared, policy: Policy, quotas: Quotas) -> list[str]:
        """:meth:`configure_access` with what a reload looked up off the loop
        (:meth:`migblockd.guard.Guard.apply`)."""
        renamed, roles, late = self.guard.apply(prepared, policy, quotas, self.connections)
        self._repool()
        self.renamed(renamed)
        for conn in late:
            assert conn.owner is not None  # one without credentials needs no look-up
            self.guard.judge.wait(conn.owner, functools.partial(self._rejudged, conn))
        return roles

    async def start_access(self, where: Callable[..., str] | None = None) -> None:
        """The start's look-ups, for a core made ``deferred``: the policy's names, and
        the names and roles of the restored blockers' owners, asked off the loop and
        applied at once when they answer, as a reload's are.  The daemon serves
        meanwhile: root and its own uid at once, the others once these answer (then
        their own look-ups).  ``where``: how the policy's warnings name an entry
        (:func:`migblockd.policy_notes.policy_warnings`), at its line of the file."""
        guard = self.guard
        policy, quotas = guard.policy, guard.quotas
        try:
            warnings_of = (policy_warnings if where is None
                           else functools.partial(policy_warnings, where=where))
            prepared = await guard.judge.prepare(policy, self.connections, warnings_of,
                                                 start=True)
        except Exception:
            # A bug (a look-up with no thread to run on is made on the loop already):
            # looked up here, as the start did before, rather than judging no one.
            log.exception("the start's look-ups in the user and group databases failed: "
                          "made on the event loop")
            self.configure_access(policy, quotas)
        else:
            self.apply_access(prepared, policy, quotas)
        guard.judge.started()

    def _rejudged(self, conn: Connection, role: Role | None) -> None:
        """A connection that came while a reload looked up has its new role."""
        if role is not None and conn in self.connections and role is not conn.role:
            logs.info(log, "%s is %s (was %s): the reload's policy", conn.label, role, conn.role,
                      extra=about(conn))
            conn.role = role
            self._repool()

    def renamed(self, uids: Iterable[int]) -> None:
        """The user names of ``uids`` are new (looked up, or changed at a reload): their
        blockers are encoded again, so that ``query-blockers`` shows every blocker of a
        uid under its name of now."""
        uids = set(uids)
        if not uids or not any(uid in uids for uid in self.registry.owners()):
            return
        for blocker in self.registry.blockers():
            if blocker.owner is not None and blocker.owner.uid in uids:
                blocker.cache = None
        self.handlers.listings.reset()

    def _repool(self) -> None:
        """Count each connection against its uid's bound as its role now says: one
        admitted as an admin and demoted counts from now on (else its uid would
        hold more connections than the bound), one promoted no longer does.  None
        is turned out for it, as for a lowered bound."""
        for conn in self.connections:
            pooled = self.guard.role_of(conn) is not Role.ADMIN
            if pooled != conn.pooled:
                conn.pooled = pooled
                if pooled:
                    self.admission.admit(conn.counted)
                else:
                    self.admission.release(conn.counted)

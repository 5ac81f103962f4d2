"""A connection whose role needs a look-up: held, ungreeted, until the look-up answers.

Part of :class:`migblockd.adapter.ClientProtocol` (a base class of it, with no
state of its own).  The guard's judge (:mod:`migblockd.judge`) says at once the
role of root, of the daemon's own uid and of a uid whose answers are kept; any
other connection waits here for its look-up, off the loop, before it is
admitted (its role decides ``--max-clients-per-uid``), while everyone else is
served.  It gets its greeting late, then; what it sends meanwhile is kept (one
read's worth, then reading waits) and runs once it is admitted, and an EOF
meanwhile counts then.  One that hangs up having sent nothing is let go at
once; its look-up goes on, and its answer is kept.  As many as ``max-clients``
wait at once, each on a descriptor; past that, a client that would wait too is
turned away with a line saying why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from migblockd.accept import refusal_line
from migblockd.access import Role
from migblockd.admission import admin_slots
from migblockd.notify import plural
from migblockd.peer import hung_up
from migblockd.registry import Owner

if TYPE_CHECKING:
    from migblockd.connection import Connection
    from migblockd.core import Core
    from migblockd.server import Server

__all__ = ["Admitting"]

log = logging.getLogger("migblockd")


class Admitting:
    """A :class:`~migblockd.adapter.ClientProtocol`'s wait for its role."""

    # The protocol's, set in ClientProtocol.__init__:
    server: Server
    core: Core
    conn: Connection | None
    transport: asyncio.Transport | None
    read_paused: bool
    peer_eof: bool
    #: What cancels its wait for its role's look-up; None: not waiting.
    judging: Callable[[], None] | None
    early: bytearray  # what it sent meanwhile
    owner: Owner | None
    judged_as: int | None  # the uid its waiting counts under

    if TYPE_CHECKING:
        def admit(self, transport: asyncio.Transport, owner: Owner | None,
                  role: Role) -> None: ...
        def _turn_away(self, transport: asyncio.Transport, uid: int | None) -> None: ...
        def data_received(self, data: bytes | memoryview) -> None: ...
        def eof_received(self) -> bool: ...

    def wait_for_role(self, transport: asyncio.Transport, owner: Owner) -> None:
        """Wait for the look-up ``owner``'s role needs, then :meth:`admit`."""
        server = self.server
        counted = self.core.guard.counted_uid(owner)
        refusal = self._no_room(owner, counted)
        if refusal is not None:
            limit, desc = refusal
            core = self.core
            core.stats.connections += 1
            core.stats.connections_refused[limit] += 1
            # A client may connect in a loop: the guard's throttle bounds these lines.
            more = core.guard.bounded("connection", owner)
            if more is not None:
                log.warning("a client (pid %s, uid %s, gid %s): refused: %s%s",
                            owner.pid, owner.uid, owner.gid, desc, more)
            transport.write(refusal_line(desc))
            # Lingering counted as its per-uid limits are: a user's subordinate uids
            # must not hold every lingering refusal (adapter.REFUSALS_LINGERING).
            self._turn_away(transport, counted)
            if limit == "max-clients":
                self._learn_role(owner)
            return
        server.judging[self] = None
        server.judging_per_uid[counted] += 1
        self.core.waiting += 1
        self.owner, self.judged_as = owner, counted
        self.judging = self.core.guard.judge.wait(owner, self._judged)

    def _learn_role(self, owner: Owner) -> None:
        """Turned away while only the slots kept for admins are left, as its role is not
        known: look it up all the same, so that at a retry an admin by the policy (a
        group's, or a users entry's) is judged at once and served in them.  Else no
        look-up is made, and "try again later" would never help it.  At most as many
        at once as there are such slots (a flood of uids queues no more)."""
        server, room = self.server, self._room()
        key = (owner.uid, owner.gid)
        if key in server.learning or len(server.learning) >= admin_slots(room) or \
                len(self.core.connections) + len(server.judging) >= room:
            return
        server.learning.add(key)
        self.core.guard.judge.wait(owner, lambda _: server.learning.discard(key))

    def _room(self) -> int:
        """The slots: ``--max-clients``, or fewer when the descriptors allow fewer."""
        admission = self.core.admission
        return admission.max_clients if admission.room is None else \
            min(admission.max_clients, admission.room)

    def _no_room(self, owner: Owner, counted: int | None) -> tuple[str, str] | None:
        """Why a client of ``owner``, counted under ``counted``, may not wait (None: it
        may): the limit (``migblockd_connections_refused``' reason) and its message.

        The waiting hold descriptors as the served do (the admission counts them
        with the served): together they stay within the slots of non-admins, as
        their roles are not known yet (an admin by a group is turned away too when
        only the slots kept for admins are left, until its first look-up answers),
        and one uid's waiting within ``--max-clients-per-uid``, or a flood of new
        connections from one uid would take every descriptor before its first
        look-up answered, where the bound turns it away once its role is known."""
        server, admission, room = self.server, self.core.admission, self._room()
        waiting = len(server.judging)
        if waiting + len(self.core.connections) >= room - admin_slots(room):
            if not waiting:
                # The served alone fill them: said as to a client already judged, not
                # as a wait for the databases that nobody is in.
                said = admission.refusal(owner, len(self.core.connections), counted=counted)
                if said is not None:
                    return said
            return "max-clients", _waiting(plural(waiting, "client"))
        limit = admission.max_clients_per_uid
        # Those it has served count too: a subordinate uid not looked up yet may wait
        # beside its user's served clients, and would be turned away once judged.
        held, served = server.judging_per_uid[counted], admission.serving(counted)
        if not limit or held + served < limit:
            return None
        if not held:
            # Its served clients alone are at the bound: said as once it is judged.
            said = admission.refusal(owner, 0, counted=counted)
            if said is not None:
                return said
        also = f" ({served} served)" if served else ""
        return "max-clients-per-uid", _waiting(
            f"{plural(held, 'client')} of uid {counted}{also}, max-clients-per-uid={limit}")

    def _done_waiting(self) -> None:
        self.judging = None
        server = self.server
        if server.judging.pop(self, False) is None:
            self.core.waiting -= 1
            server.judging_per_uid[self.judged_as] -= 1
            if server.judging_per_uid[self.judged_as] <= 0:
                del server.judging_per_uid[self.judged_as]

    def _judged(self, role: Role | None) -> None:
        """Its role is known (None: no look-up could be made)."""
        self._done_waiting()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if role is None:
            transport.write(refusal_line("migblockd cannot look up the user and group "
                                         "databases now; try again later"))
            self._turn_away(transport, self.core.guard.counted_uid(self.owner))
            return
        if self.read_paused:
            transport.resume_reading()
            self.read_paused = False
        self.admit(transport, self.owner, role)
        if self.early and self.conn is not None:
            early, self.early = bytes(self.early), bytearray()
            self.data_received(early)
        if self.peer_eof and self.conn is not None:
            self.eof_received()

    def held(self, data: bytes | memoryview) -> bool:
        """Keep ``data`` while it waits (True); past a read's worth, read no more."""
        if self.judging is None:
            return False
        from migblockd.adapter import READ_SIZE  # noqa: PLC0415 - the adapter imports us
        self.early += data
        if len(self.early) >= READ_SIZE and self.transport is not None:
            self.transport.pause_reading()
            self.read_paused = True
        return True

    def held_eof(self) -> bool | None:
        """Its EOF while it waits: keep the transport (True), or let it go (False:
        it hung up having sent nothing); None: not waiting."""
        if self.judging is None:
            return None
        if not self.early and self.transport is not None and hung_up(self.transport):
            return False  # asyncio closes it: connection_lost ends the wait
        self.peer_eof = True  # what it sent runs once it is admitted
        return True

    def lost_while_judged(self) -> None:
        """Gone while its look-up runs: the look-up goes on (its answer is kept)."""
        if self.judging is None:
            return
        self.judging()
        self._done_waiting()
        log.debug("a client of uid %s hung up while waiting for its role's look-up",
                  "?" if self.owner is None else self.owner.uid)


def _waiting(what: str) -> str:
    return f"migblockd is waiting for the user and group databases to judge {what}; try again later"

"""The core's connections: who is served, whose turn is worth giving, who has output.

Part of :class:`migblockd.core.Core` (a base class of it, with no state of its
own): the bookkeeping around the requests that the core runs.  A connection is
admitted or refused when it comes (:mod:`migblockd.admission`), and closed for a
timeout by :meth:`Roster.expel`; a reload reaches the open ones
(:meth:`Roster.configure`; their roles, :mod:`migblockd.connection_roles`, a base
class of :class:`Roster`).  Between turns the
server asks which connections have work it can do now (:meth:`Roster.has_pending`,
:meth:`Roster.blocked`, :meth:`Roster.awaiting`, :meth:`Roster.settled`) and which
have output to write (:meth:`Roster.take_dirty`).  A connection gone still has
what it sent run, :data:`BATCH` requests in each turn (:meth:`Roster.finish_turn`),
before its slot and its connection-scoped blockers are released
(:meth:`Roster.disconnect`; at once, if it waits for QEMU's answer); running them
is the core's (:meth:`migblockd.core.Core.execute`).

A connection whose replies wait for a commit stops once a turn's worth of them
is held (:func:`held_full`), as a slow reader does: see :mod:`migblockd.outcomes`
for what the commit's outcome does to them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from migblockd import logs
from migblockd.access import Role
from migblockd.admission import Admission
from migblockd.commands import Handlers
from migblockd.connection import Connection
from migblockd.connection_roles import ConnectionRoles
from migblockd.guard import Guard
from migblockd.ledger import Ledger
from migblockd.logs import about, shown
from migblockd.logs.throttle import Throttle
from migblockd.qmp.envelope import Command
from migblockd.qmp.errors import QMPError
from migblockd.qmp.limits import Limits
from migblockd.qmp.session import Session
from migblockd.registry import Owner, Registry
from migblockd.resolver import user_name
from migblockd.stats import Stats

__all__ = ["BATCH", "CONNECTION_BURST", "TURN_OUTPUT", "Roster", "held_full"]

log = logging.getLogger("migblockd")

#: Requests of one connection run per turn: large enough to batch pipelined
#: requests into one write, small enough to let other clients take turns (and,
#: for a connection gone, to let its answers go as they come: see ``_finish``).
BATCH = 32

#: "connected" lines of one non-admin uid logged per throttle window (10 s): an
#: agent that connects for each command stays in the log; a loop does not.
CONNECTION_BURST = 100

#: Output bytes after which a connection's turn ends early: a client that
#: pipelines requests for big answers gets them written one turn at a time
#: (and backpressure stops it there), not all built at once.
TURN_OUTPUT = 64 * 1024


def held_full(conn: Connection) -> bool:
    """``conn``'s replies held for commits are a turn's worth: its next requests
    wait for the commit.  Without this bound a client's pipelined requests would
    keep running while a slow commit holds their output, and all of it would
    arrive at once when the commit lands, past ``--max-output``."""
    session = conn.session
    # A closed connection's last requests all run now: nobody reads their replies.
    return session.holding and not conn.closed and session.held_replies > TURN_OUTPUT


class Roster(ConnectionRoles):
    """The connections of a :class:`~migblockd.core.Core` and what the server asks of them."""

    # The core's, set in Core.__init__ (and its methods, below):
    registry: Registry
    handlers: Handlers
    table: dict[str, Command]
    limits: Limits
    admission: Admission
    guard: Guard
    greeting: dict[str, Any]
    stats: Stats
    ledger: Ledger
    connections: dict[Connection, None]  # an ordered set
    waiting: int  # connections waiting for their role's look-up (the core's)
    connection_lines: Throttle  # the "connected" lines of each non-admin uid
    _dirty: dict[Connection, None]  # connections with output, in order
    #: Connections gone whose requests still run, a turn's worth each turn (_finish).
    _finishing: dict[Connection, None]
    _numbers: int

    if TYPE_CHECKING:
        def execute(self, conn: Connection, max_requests: int) -> int: ...
        def _publish(self, durable: bool) -> None: ...

    # -- connections -----------------------------------------------------------
    def connect(self, owner: Owner | None, role: Role | None = None) -> Connection:
        """A new connection; its greeting is pending at once.

        ``role``: the one the guard judged (:class:`migblockd.judge.Judge`, off the
        loop when it needed a look-up); without it, judged here (looked up, when
        need be: not on a serving loop).

        Past the admission's limits the connection is ``refused``: its only
        output is an error line saying why, and the caller closes it after
        writing that.
        """
        self._numbers += 1
        conn = Connection(self._numbers, owner, Session(self.table, self.greeting, self.limits))
        self.stats.connections += 1
        conn.role = role
        if role is None and owner is not None:
            user_name(owner.uid)  # judged here: its name too, as the judge looks it up
        admin = self.guard.role_of(conn) is Role.ADMIN
        conn.counted = self.guard.counted_uid(owner)
        refusal = self.admission.refusal(owner, len(self.connections) + self.waiting,
                                         admin=admin, counted=conn.counted)
        if refusal is not None:
            limit, desc = refusal
            self.stats.connections_refused[limit] += 1
            conn.refused = True
            conn.session.refuse(QMPError(desc))
            # A client may connect in a loop: the guard's throttle bounds these lines.
            more = self.guard.bounded("connection", owner)
            if more is not None:
                log.warning("%s: refused: %s%s", conn.label, desc, more, extra=about(conn))
        else:
            self.connections[conn] = None
            conn.pooled = not admin
            if conn.pooled:
                self.admission.admit(conn.counted)
            # A user connecting in a loop made two lines a connection (3,900 a second):
            # past a burst, neither is logged, the admins' excepted.  Its changes
            # and refusals still name it.
            more = "" if admin else self.connection_lines.admit(
                "connected", conn.counted, self.registry.clock.monotonic())
            if more is None:
                conn.quiet = True
            else:
                logs.info(log, "%s connected%s", conn.label, more, extra=about(conn))
        self._dirty[conn] = None
        return conn

    def configure(self, limits: Limits) -> None:
        """Bound every connection's input by ``limits``, the open ones' from their
        next message on (a reload)."""
        self.limits = limits
        for conn in self.connections:
            conn.session.configure(limits)

    def disconnect(self, conn: Connection, reason: str = "", *, ordinary: bool = True) -> None:
        """The connection is gone (``ordinary``: as clients end, whatever
        ``reason`` says): run what it sent, then release its blockers.

        Everything received is executed though no answer can be delivered
        (unlike QEMU); a request waiting for a commit runs once it is done,
        and the connection is finished off after that.  One waiting for QEMU
        runs once QEMU answers, but the slot and the blockers go now.
        """
        if conn not in self.connections or conn.closed:
            return
        conn.closed = True
        # A client that connects and hangs up in a loop, before reading what it
        # was sent, ends each connection with a reason: bounded all the same.
        if not conn.quiet or not ordinary:
            logs.info(log, "%s disconnected%s", conn.label, f": {reason}" if reason else "",
                      extra=about(conn))
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        # Its requests run a turn's worth at a time, one batch now and one in each
        # turn after (finish_turn), taking turns with the connections still served:
        # all at once, 15,000 pipelined query-qmp-schema of a client that hung up
        # held every other client for 13 s.  Their output is let go as it comes,
        # never joined: their sum would cost memory and copies.
        self._finishing.pop(conn, None)
        self.execute(conn, BATCH)
        conn.session.take_output()
        if conn.waiting is None and conn.session.has_pending():
            self._finishing[conn] = None
            return
        if conn.waiting is not None:
            # Finished when its commit is done, or QEMU answers.  A wait for QEMU may
            # last (a stopped QEMU, with qemu-timeout 0 forever): the client is let go
            # now, as QEMU's monitor lets go of a client that hangs up while its
            # command runs; the command, and what it sent after, still run.
            if self.awaits_qemu(conn):
                self._let_go(conn)
            return
        self._dirty.pop(conn, None)
        self.ledger.holding.pop(conn, None)
        self.ledger.cohort.pop(conn, None)
        self._let_go(conn)

    @property
    def finishing(self) -> bool:
        """Connections gone have requests to run in the next turn (:meth:`finish_turn`)."""
        return bool(self._finishing)

    def finish_turn(self) -> None:
        """A turn's worth of the requests of each connection gone that has more."""
        for conn in list(self._finishing):
            self._finish(conn)

    def _let_go(self, conn: Connection) -> None:
        """Free ``conn``'s slot (once) and release its connection-scoped blockers."""
        if conn in self.connections:
            del self.connections[conn]
            if conn.pooled:
                self.admission.release(conn.counted)
        released = self.registry.release(conn)
        if released:
            ids = [b.id for b in released]
            logs.info(log, "%s: released %d connection-scoped blocker(s): %s", conn.label,
                      len(released), shown(", ".join(ids), quoted=False),
                      extra=about(conn, blocker_id=ids))
            # Nothing durable (they were never stored), but the listings must know.
            self.handlers.track(self.registry.take_changes())
        self._publish(False)

    def expel(self, conn: Connection, reason: str) -> None:
        """Close ``conn`` for ``reason`` (a timeout): one error line saying why, after
        what is queued; the caller reads no more and closes it once :meth:`settled`."""
        conn.session.fail(None, QMPError(reason))
        self._dirty[conn] = None
        # Idle connections opened in a loop: the same line each, every timeout.
        more = self.guard.bounded("closing", conn.owner)
        if more is not None:
            log.warning("%s: closing: %s%s", conn.label, reason, more, extra=about(conn))

    # -- input -----------------------------------------------------------------
    def receive_data(self, conn: Connection, data: bytes | memoryview) -> None:
        conn.session.receive_data(data)

    def receive_eof(self, conn: Connection) -> None:
        conn.session.receive_eof()

    def has_pending(self, conn: Connection) -> bool:
        """Requests are buffered (or one waits for a commit)."""
        return conn.waiting is not None or conn.session.has_pending()

    def settled(self, conn: Connection) -> bool:
        """Everything ``conn`` sent is answered and released: a half-closed one may go."""
        return (conn.waiting is None and not conn.session.has_pending()
                and not conn.session.holding)

    def blocked(self, conn: Connection) -> bool:
        """Its next request waits for a commit or QEMU: no use giving it a turn until then."""
        if conn.waiting is not None:
            return ((conn.suspended is not None and conn.answer is None)
                    or self.ledger.uncommitted)
        return held_full(conn)

    def awaiting(self, conn: Connection) -> bool:
        """What ``conn`` is owed waits for a commit or QEMU, not for the client."""
        return conn.session.holding or self.blocked(conn)

    def awaits_qemu(self, conn: Connection) -> bool:
        """``conn``'s request waits for QEMU's answer to a call."""
        return conn.waiting is not None and conn.suspended is not None and conn.answer is None

    def awaited(self, conn: Connection) -> str | None:
        """What :meth:`awaiting` waits for, in words for the log; None: nothing."""
        if self.awaits_qemu(conn):
            return "QEMU's answer"
        return "its changes' commit to disk" if self.awaiting(conn) else None

    # -- output ----------------------------------------------------------------
    def data_to_send(self, conn: Connection) -> bytes:
        return conn.session.data_to_send()

    def take_output(self, conn: Connection) -> tuple[list[bytes], int, int]:
        """The bytes to send to ``conn``, in pieces, their size, and how many are events."""
        return conn.session.take_output()

    def others_dirty(self, conn: Connection) -> bool:
        """Some connection other than ``conn`` has output queued."""
        # Asked for every lone client's request: no generator over the set.
        dirty = self._dirty
        return len(dirty) > 1 or (bool(dirty) and conn not in dirty)

    def take_dirty(self) -> list[Connection]:
        """The connections with output queued since the last call, in order."""
        if not self._dirty:
            return []
        dirty, self._dirty = list(self._dirty), {}
        return dirty

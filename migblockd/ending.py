"""How a connection ends: dropped, or half-closed after its last reply and lingering.

Part of :class:`migblockd.adapter.ClientProtocol` (a base class of it, with no
state of its own).  The rules it applies:

* **dropping**: past ``max_output`` bytes of events left unread, the client
  alone is disconnected; what it sent before still runs (:meth:`Ending.drop`,
  :meth:`Ending.read_leftovers`).  Not one that holds connection-scoped
  blockers: its drop would release them, so another user's traffic would lift
  them.  Events to it are discarded instead until it reads
  (:meth:`Ending.over_output`, deciding by
  :meth:`migblockd.qmp.output.Output.judge_unread`);
* **ending**: once everything it sent is answered (at its EOF, a timeout,
  shutdown), a connection that may still be sending is half-closed after its
  last reply and lingers while the peer takes it (:meth:`Ending.finish`), at
  most ``LINGER_LIMIT`` seconds; the shutdown drain watches it
  (:meth:`Ending.progress`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from migblockd.logs import WIRE_LIMIT, about, shown
from migblockd.peer import discard_unread, leftovers, unread, unsent
from migblockd.qmp.output import DISCARD, DROP, RESUME

if TYPE_CHECKING:
    from migblockd.connection import Connection
    from migblockd.core import Core
    from migblockd.outbox import Outbox
    from migblockd.server import Server

__all__ = ["LINGER", "LINGER_LIMIT", "Ending"]

log = logging.getLogger("migblockd")

#: How long a connection we half-closed may go on without taking any of its last
#: output (or, once it has all, without closing) before we close it ...
LINGER = 2.0
#: ... and how long it lingers at most, however steadily it reads.
LINGER_LIMIT = 30.0


class Ending:
    """How a :class:`~migblockd.adapter.ClientProtocol`'s connection ends."""

    # The protocol's, set in ClientProtocol.__init__:
    server: Server
    core: Core
    conn: Connection | None
    transport: asyncio.Transport | None
    outbox: Outbox | None
    read_paused: bool
    peer_eof: bool
    dropped: bool
    lingering: bool  # half-closed by us: what still comes is discarded
    linger_owed: int  # what the peer had still to take at the last look
    linger_heard: int  # what it had sent meanwhile, at the last look
    discarded: int  # bytes it sent after we half-closed: never run
    linger_until: float

    if TYPE_CHECKING:
        def watch_loss(self) -> None: ...

    def read_leftovers(self, conn: Connection) -> None:
        """Feed the core what the peer sent that asyncio never read (bounded)."""
        assert self.transport is not None
        budget = self.server.config.max_message_size + 64 * 1024
        debug = log.isEnabledFor(logging.DEBUG)
        for data in leftovers(self.transport, budget):
            if debug:
                log.debug("%s <- %s (after the connection broke)", conn.label,
                          shown(data, WIRE_LIMIT))
            self.core.receive_data(conn, data)
        left = unread(self.transport)
        if left:
            log.warning("%s: %d bytes it sent were left unread (past the %d-byte bound); "
                        "whatever requests they held were not run", conn.label, left, budget)

    def over_output(self, unread: int) -> bool:
        """Apply ``--max-output`` to the ``unread`` bytes of events the client has
        not read; True if that dropped it."""
        conn = self.conn
        assert conn is not None
        session, limit, core = conn.session, self.server.config.max_output, self.core
        verdict = session.judge_unread(unread, limit, lambda: bool(core.registry.held_by(conn)))
        if verdict is DROP:
            # Counted here only: the metric is for this drop, not those of a
            # timeout's linger or of shutdown.
            core.stats.dropped += 1
            self.drop(f"more than max-output={limit} bytes of unread events")
            return True
        if verdict is DISCARD:
            ids = core.registry.held_by(conn)
            more = core.guard.bounded("kept", conn.owner)
            if more is not None:
                log.warning("%s: more than max-output=%d bytes of unread events; kept, as it "
                            "holds connection-scoped blockers (%s): events to it are "
                            "discarded until it reads%s", conn.label, limit,
                            shown(", ".join(ids), quoted=False), more,
                            extra=about(conn, blocker_id=ids))
        elif verdict is RESUME:
            more = core.guard.bounded("resumed", conn.owner)
            if more is not None:
                log.info("%s: back within max-output=%d bytes of unread events: events go "
                         "to it again; it missed %d%s", conn.label, limit, session.missed,
                         more, extra=about(conn))
        return False

    def drop(self, why: str) -> None:
        """Disconnect the peer now.  Everything it sent before runs all the same
        (see :meth:`connection_lost`); only the replies are lost."""
        if self.conn is None or self.transport is None or self.dropped:
            return
        more = self.core.guard.bounded("dropped", self.conn.owner)
        if more is not None:
            log.warning("%s: dropped: %s%s", self.conn.label, why, more, extra=about(self.conn))
        self.dropped = True
        self.transport.abort()
        self.watch_loss()

    def finish(self) -> None:
        """Everything read is answered: end the connection.

        A peer that half-closed already is simply closed.  Otherwise (shutdown,
        a timeout) it may still be sending, and closing a Unix socket with
        unread input resets the connection, which can cost the peer the replies
        it has not read yet.  So we half-close instead (EOF after the last
        reply), discard what still comes (it was never read, so it never ran),
        and close when the peer does, or once it has taken none of its output
        (or, having it all, has not closed) for ``LINGER`` seconds: closing
        sooner would throw away what the transport still holds for a peer
        that is reading it.
        """
        transport = self.transport
        assert transport is not None
        if self.peer_eof or self.lingering or not transport.can_write_eof():
            if not self.lingering:
                transport.close()
            return
        self.lingering = True
        transport.write_eof()
        if self.read_paused:
            transport.resume_reading()
            self.read_paused = False
        self.linger_owed = self._owed(transport)
        self.linger_heard = self.discarded
        self.linger_until = self.server.loop.time() + LINGER_LIMIT
        self.server.loop.call_later(LINGER, self.linger_over)

    def linger_over(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        owed, heard = self._owed(transport), self.discarded
        in_time = self.server.loop.time() < self.linger_until
        if (owed, heard) != (self.linger_owed, self.linger_heard) and in_time:
            # It reads (or has just read the last of it), or it still sends: a
            # peer busy elsewhere may read the rest in a moment, while closing
            # now would fail its next write, and asyncio's streams (qemu.qmp's)
            # then raise that error before the replies they already hold.
            self.linger_owed, self.linger_heard = owed, heard
            self.server.loop.call_later(LINGER, self.linger_over)
            return
        # Closing a Unix socket with input unread resets the peer's side, and
        # the peer's streams raise the reset before the replies they hold:
        # what it sent is never run, so it is read away first.
        discard_unread(transport)
        if owed:
            self.drop(f"took none of its last replies for {LINGER:g}s after our EOF "
                      f"({self._held(transport)})" if in_time else
                      f"still taking its last replies after {LINGER_LIMIT:g}s of lingering")
            return
        transport.abort()

    @staticmethod
    def _owed(transport: asyncio.Transport) -> int:
        """What the peer has still to read: in the transport, and in the kernel."""
        return transport.get_write_buffer_size() + unsent(transport)

    @staticmethod
    def _held(transport: asyncio.Transport) -> str:
        """What the peer's untaken output occupies, each part in its own unit: bytes
        the transport has yet to write, and the kernel's buffer memory for what it
        wrote (``SIOCOUTQ`` counts buffers, not bytes: 1280 for 306 bytes of replies)."""
        parts = []
        if waiting := transport.get_write_buffer_size():
            parts.append(f"{waiting} bytes not yet written")
        if memory := unsent(transport):
            parts.append(f"{memory} bytes of socket buffer memory")
        return ", ".join(parts) + " held for it"

    def progress(self) -> tuple[int, int, bool]:
        """What changes while the peer takes its output (for the shutdown drain)."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return (0, 0, False)
        # What the peer has read: its output may flow steadily while our buffers
        # stay as full as before (we refill them as it reads).
        taken = self.outbox.sent() - unsent(transport) if self.outbox is not None else 0
        return (taken, conn.session.buffered, self.core.has_pending(conn))

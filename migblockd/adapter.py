"""One client's connection: its asyncio transport, when to read, what to write.

:class:`ClientProtocol` is the thin adapter between one transport and the
sans-I/O core (:class:`migblockd.core.Core`): bytes received go to the core at
once, and the server's turn (:mod:`migblockd.turns`) calls :meth:`pump` to run
some of the connection's requests and :meth:`flush` to write its output
through the :class:`~migblockd.outbox.Outbox`.  Reading goes into one buffer
that the server lends every connection (``recv_into``), because asyncio's
plain protocols allocate a fresh ``READ_SIZE`` bytes object per read, which
glibc serves with an ``mmap``/``mremap``/``munmap`` each time; it stops while
requests are pending or output waits (backpressure), so a client that does
not read holds at most one read's worth of unexecuted input and nothing is
dropped.  A timeout ends it here (:meth:`expel`); how a connection ends
(dropped, or half-closed and lingering) is its base class's,
:class:`migblockd.ending.Ending`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from migblockd.access import Role
from migblockd.admitting import Admitting
from migblockd.connection import Connection
from migblockd.ending import LINGER, Ending
from migblockd.logs import WIRE_LIMIT, shown
from migblockd.outbox import HIGH_WATER, Outbox
from migblockd.peer import (
    LEFTOVER_CHUNK,
    client_owner,
    discard_unread,
    hung_up,
    lost_words,
    ordinary_loss,
)
from migblockd.registry import Owner
from migblockd.roster import BATCH

if TYPE_CHECKING:
    from migblockd.server import Server

__all__ = ["BATCH", "LINGER", "READ_SIZE", "REFUSALS_LINGERING", "REFUSALS_LINGERING_PER_UID",
           "ClientProtocol", "read_buffer"]

log = logging.getLogger("migblockd")

#: The most one read takes from a socket: asyncio's own read size.
READ_SIZE = 256 * 1024
#: Refused connections that may linger at once, each on a descriptor of the
#: daemon's own reserve (accept.OWN_DESCRIPTORS has room for them).
REFUSALS_LINGERING = 16
#: ... and of them, of one uid: a client that is refused keeps trying a few times
#: at most, and more is a flood, which must not leave others' refusals none.
REFUSALS_LINGERING_PER_UID = 2


def read_buffer() -> memoryview:
    """A buffer for :meth:`ClientProtocol.get_buffer`.  One serves every
    connection of a loop: each read is consumed before the next begins."""
    return memoryview(bytearray(READ_SIZE))


class ClientProtocol(Admitting, Ending, asyncio.BufferedProtocol):
    """The transport of one connection, and when to read from it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = server.core
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.writing_soon = False  # write_more is scheduled
        self.read_paused = False
        self.eof = False  # no more reading: the peer half-closed, or we stop reading
        self.peer_eof = False
        self.dropped = False
        self.lingering = False  # half-closed by us: what still comes is discarded
        self.linger_owed = 0  # what the peer had still to take at the last look
        self.linger_heard = 0  # what it had sent meanwhile, at the last look
        self.discarded = 0  # bytes it sent after we half-closed: never run
        self.linger_until = 0.0
        self.connected_at = 0.0
        #: Since when the peer has left a message unfinished (see migblockd.timeouts).
        self.unfinished_since: float | None = None
        self.outbox: Outbox | None = None
        #: A refused connection lingering for its peer to close (_turn_away).
        self.refusal_lingering = False
        self.refused_uid: int | None = None
        #: Waiting for its role's look-up (migblockd.admitting): what cancels the wait,
        #: what the client sent meanwhile, and its credentials.
        self.judging: Callable[[], None] | None = None
        self.early = bytearray()
        self.owner: Owner | None = None
        self.judged_as: int | None = None

    # -- asyncio.BufferedProtocol --------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.server.acceptor_arrived(self)  # a client as the roster counts them, or none
        owner = client_owner(transport)
        role = self.core.guard.judge.judged(owner)
        if role is None:
            assert owner is not None  # one without credentials needs no look-up
            self.wait_for_role(transport, owner)
            return
        self.admit(transport, owner, role)

    def admit(self, transport: asyncio.Transport, owner: Owner | None, role: Role) -> None:
        self.connected_at = self.server.loop.time()
        self.conn = conn = self.core.connect(owner, role)
        if conn.refused:
            self.conn = None
            transport.write(self.core.data_to_send(conn))
            self._turn_away(transport, conn.counted)
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.outbox = Outbox(transport)
        self.server.protocols[conn] = self
        self.server.timeouts.watch()
        self.server.schedule()

    def _turn_away(self, transport: asyncio.Transport, uid: int | None) -> None:
        """End a refused connection, its one line written.

        Half-closed, not closed, while few others linger: a client that sent a
        request at once would be reset by a close with it unread, or its write
        would fail, and either makes an asyncio stream raise before it gives the
        line.  What it sends is read away (data_received) until it closes,
        LINGER at most.  Each lingers on a descriptor the daemon's own reserve
        (accept.OWN_DESCRIPTORS) pays for, so a user flooding the socket past its
        bound cannot take the served clients' descriptors: beyond
        REFUSALS_LINGERING, what came is read away and the connection closed.
        Nor take every lingering, others' refusals left to be reset: one uid
        lingers REFUSALS_LINGERING_PER_UID at most, counted as its per-uid limits
        are (``uid``: a subordinate uid's owner's), or a rootless container's
        8 subordinate uids would hold all of them.
        """
        server = self.server
        lingering = server.refusals_lingering
        if lingering.total() < REFUSALS_LINGERING \
                and lingering[uid] < REFUSALS_LINGERING_PER_UID:
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                pass
            else:
                lingering[uid] += 1
                self.refusal_lingering, self.refused_uid = True, uid
                server.loop.call_later(LINGER, transport.close)
                return
        discard_unread(transport, LEFTOVER_CHUNK)
        transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The decoder copies what it keeps: the buffer is free again on return.
        self.data_received(self.server.read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        conn = self.conn
        if self.held(data):
            return
        if conn is None or self.lingering:
            self.discarded += len(data)
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", conn.label, shown(bytes(data), WIRE_LIMIT))
        core = self.core
        core.receive_data(conn, data)
        if core.has_pending(conn) or not conn.session.buffered:
            self.unfinished_since = None  # a message is complete: the peer made progress
        elif self.unfinished_since is None:
            self.unfinished_since = self.server.loop.time()
        self.server.received(self)

    def eof_received(self) -> bool:
        if (held := self.held_eof()) is not None:
            return held
        if self.conn is None or self.lingering:
            return False  # asyncio closes the transport
        self.eof = self.peer_eof = True
        self.core.receive_eof(self.conn)
        if self.core.awaits_qemu(self.conn) and self.transport is not None \
                and hung_up(self.transport):
            # Gone for good while QEMU holds its command: let it go now (its slot, its
            # connection-scoped blockers), not when QEMU answers, which a stopped QEMU
            # may never do.  Everything it sent still runs (Roster.disconnect).
            self.transport.abort()
            return True
        self.server.runnable(self)
        # Keep the transport open: replies to what came before EOF still go out.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_while_judged()
        self.server.losing.discard(self)
        self.server.acceptor_freed()
        if self.refusal_lingering:
            self.refusal_lingering = False
            self.server.refusals_lingering -= Counter((self.refused_uid,))
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if (exc is not None or self.dropped) and not self.lingering:
            # The peer hung up (a write failed), or we dropped it: what it sent
            # before may still sit unread in the socket, and takes effect all the same.
            self.read_leftovers(conn)
        self.server.protocols.pop(conn, None)
        self.core.disconnect(conn, lost_words(exc), ordinary=ordinary_loss(exc))
        self.core.take_output(conn)  # nobody to read it: let go, not joined
        self.server.schedule()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write_more()

    def write_more(self) -> None:
        """Hand the transport the next slice of what waits; once all is out,
        this connection's requests may run again."""
        self.writing_soon = False
        transport = self.transport
        if self.write_paused or transport is None or transport.is_closing():
            return  # resume_writing comes once the client has read more; or it is gone
        if self.outbox is not None and self.outbox.waiting:
            more = self.outbox.write_some()
            self.watch_loss()
            if more:
                self.write_soon()
            if self.outbox.waiting or self.write_paused:
                return
            # Closes a half-closed client once all is out: not from inside the
            # transport's own write callback, which calls connection_lost itself
            # after this returns when its buffer is empty and it is closing, and
            # close() has scheduled it too (a traceback in the log).
            self.server.loop.call_soon(self.flush)
        if self.conn is not None and self.conn.session.discarding and self.outbox is not None \
                and not self.server.draining:
            self.over_output(self.outbox.events_unread())  # it has read: events again?
        self.server.runnable(self)

    # -- ours ------------------------------------------------------------------
    def watch_loss(self) -> None:
        """If a write just failed (or we aborted), ``connection_lost`` comes in
        a later callback and runs what the peer sent that was never read: until
        then no other request may overtake those (:meth:`Server.received`)."""
        if self.transport is not None and self.transport.is_closing():
            self.server.losing.add(self)

    def expel(self, reason: str) -> None:
        """Close the connection for ``reason`` (a timeout), with a line saying why."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        self.core.expel(conn, reason)
        self.stop_reading()
        self.server.runnable(self)
        # A client that reads nothing never gets that far: closed regardless.
        self.server.loop.call_later(2 * LINGER, self.abort_if_open)

    def abort_if_open(self) -> None:
        if self.conn is not None and self.transport is not None:
            self.transport.abort()

    def stop_reading(self) -> None:
        """Read no more (a timeout, or shutdown): close once everything read is answered."""
        self.eof = True
        if not self.read_paused and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.pause_reading()
            self.read_paused = True

    def pump(self) -> bool:
        """This connection's turn; True when it wants another one."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return False
        core = self.core
        waiting = self.outbox is not None and self.outbox.waiting
        if core.has_pending(conn) and not self.write_paused and not waiting:
            core.execute(conn, BATCH)
        if core.has_pending(conn):
            if core.awaits_qemu(conn) and not conn.session.has_pending() and not waiting:
                # Nothing to run until QEMU answers: read on (the next read's requests
                # stop it again), so that a client hanging up meanwhile is seen, as
                # QEMU's monitor sees it (the HUP watch of chardev/char-socket.c).
                if self.read_paused and not self.eof:
                    transport.resume_reading()
                    self.read_paused = False
                return False
            # Also while its output waits (an answer bigger than one write):
            # else a client that asks for a listing and then only sends is
            # read, and its requests buffered, without bound.
            if not self.read_paused:
                transport.pause_reading()
                self.read_paused = True
            if waiting:
                return False  # write_more comes back once its output has gone
            # A paused writer is woken by resume_writing, a blocked one by its commit.
            return not self.write_paused and not core.blocked(conn)
        if waiting:
            return False
        if self.read_paused and not self.eof:
            transport.resume_reading()
            self.read_paused = False
        return False

    def flush(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        pieces, size, events = self.core.take_output(conn)
        if transport.is_closing() or self.lingering or self.outbox is None:
            return  # after our EOF (a timeout, shutdown) nothing more is said
        # While draining nobody is dropped for it: they are owed these replies.
        judged = not self.server.draining
        if pieces:
            if log.isEnabledFor(logging.DEBUG):
                for piece in pieces:
                    log.debug("%s -> %s", conn.label, shown(piece, WIRE_LIMIT))
            unread = self.outbox.put(pieces, size, events)
            if judged and (unread > self.server.config.max_output or conn.session.discarding) \
                    and self.over_output(unread):
                return
            self.watch_loss()
            if self.outbox.waiting and not self.write_paused:
                self.write_soon()
        elif judged and conn.session.discarding:  # marked by an event it was not sent
            self.over_output(self.outbox.events_unread())
        if self.eof and self.core.settled(conn) and not self.outbox.waiting:
            self.finish()

    def write_soon(self) -> None:
        """The transport takes more now: the next slice goes in a callback of its
        own, so the loop serves the other clients in between."""
        if not self.writing_soon:
            self.writing_soon = True
            self.server.loop.call_soon(self.write_more)


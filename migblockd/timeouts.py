"""Timeouts for unfinished business: one periodic sweep over the connections.

A connection that has not negotiated within ``--negotiation-timeout``, or
that leaves a message unfinished for ``--idle-timeout``, holds a client slot
for nothing: 1,024 of them locked everyone out.  Each is closed with a QMP
error line that says why (:meth:`Core.expel`), and logged.

What is *not* timed: a negotiated client idle between messages (an agent
holding a connection-scoped blocker for hours is the point of that scope),
and any client we owe work to: while it has requests pending, or we have
stopped reading from it (backpressure), its unfinished message is ours to
wait for, not its.

The core keeps no clock (it is sans-I/O): it says whether a connection has
negotiated and how many bytes of an unfinished message it holds; the times
are the event loop's.  One sweep every quarter of the shortest timeout (at
most every second, at least every 50 ms) costs nothing next to the
connections themselves, where a timer per connection would be re-armed on
every read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

from migblockd.connection import Connection
from migblockd.core import Core

__all__ = ["Timed", "Timeouts"]

#: Bounds of the sweep's period, in seconds.
MIN_PERIOD = 0.05
MAX_PERIOD = 1.0


class Timed(Protocol):
    """What the sweep needs of a connection's adapter (``adapter.ClientProtocol``)."""

    conn: Connection | None
    eof: bool
    read_paused: bool
    connected_at: float
    unfinished_since: float | None

    def expel(self, reason: str) -> None: ...


class Timeouts:
    """The sweep: arms itself while there are connections to watch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, core: Core,
                 connections: Callable[[], Iterable[Timed]], *,
                 negotiation: float, idle: float) -> None:
        self._loop = loop
        self._core = core
        self._connections = connections
        self.negotiation = negotiation
        self.idle = idle
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def configure(self, *, negotiation: float, idle: float) -> None:
        """New timeouts (a reload); they apply to connections already open too."""
        self.negotiation, self.idle = negotiation, idle
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.watch()

    @property
    def period(self) -> float:
        shortest = min((t for t in (self.negotiation, self.idle) if t > 0), default=0.0)
        return min(MAX_PERIOD, max(MIN_PERIOD, shortest / 4))

    def watch(self) -> None:
        """A connection was made: make sure the sweep runs."""
        if self._timer is None and not self._stopped and (self.negotiation or self.idle):
            self._timer = self._loop.call_later(self.period, self._sweep)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self) -> None:
        self._timer = None
        now = self._loop.time()
        watched = False
        for timed in list(self._connections()):
            watched = True
            reason = self.overdue(timed, now)
            if reason is not None:
                timed.expel(reason)
        if watched:
            self.watch()

    def overdue(self, timed: Timed, now: float) -> str | None:
        """Why ``timed`` must be closed now, if it must."""
        conn = timed.conn
        if conn is None or timed.eof:
            return None  # gone, half-closed, or closing already
        session = conn.session
        # Before what we owe it: a client that sends without reading would
        # otherwise keep its slot un-negotiated for ever (its answers, owed,
        # pause our reading of it).
        if (not session.negotiated and self.negotiation
                and now - timed.connected_at >= self.negotiation):
            return (f"Capabilities negotiation not completed within "
                        f"negotiation-timeout={self.negotiation:g}s; closing the connection")
        core = self._core
        if timed.read_paused or core.has_pending(conn):
            timed.unfinished_since = None  # we owe it work: nothing is its fault
            return None
        if not session.buffered:
            timed.unfinished_since = None
            return None
        if timed.unfinished_since is None:
            timed.unfinished_since = now
        elif self.idle and now - timed.unfinished_since >= self.idle:
            return (f"Message left unfinished for idle-timeout={self.idle:g}s; "
                    "closing the connection")
        return None

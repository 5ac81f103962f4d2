"""The daemon's core, with no I/O: bytes in per connection, bytes out per connection.

In the style of python-websockets' ``protocol.py``, one level up: the core owns
the registry, the command table, every connection's QMP session and the event
fan-out, and knows nothing of sockets or event loops.  The asyncio adapter
(:mod:`migblockd.server`) feeds it what each connection received, lets it run
requests in turns, and writes what :meth:`Core.data_to_send` returns for the
connections :meth:`Core.take_dirty` names.  Every rule from parsed request to
registry and back lives here, so it is tested with plain bytes::

    core = Core(contract, registry, limits)
    a, b = core.connect(owner_a), core.connect(owner_b)
    core.receive_data(a, b'{"execute": "qmp_capabilities"}')
    core.execute(a, 32)
    core.data_to_send(a)        # greeting, then {"return": {}}

A request runs to completion when its turn comes: the core first applies the
simulated migration's transitions that are due, runs the handler, delivers the
events it caused to every negotiated session (before the reply, QEMU's order),
then queues the reply.  Errors become replies in exactly one place,
:meth:`Core._run`.
"""

from __future__ import annotations

import logging
from typing import Any

from migblockd.commands import Handlers, version_info
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.logs import about, shown
from migblockd.qmp.errors import QMPError
from migblockd.qmp.framing import Limits
from migblockd.qmp.session import Request, Session
from migblockd.registry import BlockerError, Owner, Registry
from migblockd.render import event_line

__all__ = ["Core"]

log = logging.getLogger("migblockd")


class Core:
    """Sessions, registry and command table of one daemon (sans-I/O).

    ``limits`` bound each connection's input; ``max_clients`` how many
    connections are served at once (more are answered with one error line
    and must be closed).  Both may be changed between requests (a reload).
    """

    def __init__(self, contract: Contract, registry: Registry, limits: Limits, *,
                 max_clients: int = 1024) -> None:
        self.contract = contract
        self.registry = registry
        self.limits = limits
        self.max_clients = max_clients
        self.table = Handlers(contract, registry).table()
        self.greeting: dict[str, Any] = {
            "QMP": {"version": version_info(), "capabilities": ["oob"]}
        }
        self.connections: dict[Connection, None] = {}  # an ordered set
        self._dirty: dict[Connection, None] = {}  # connections with output, in order
        self._numbers = 0

    # -- connections -----------------------------------------------------------
    def connect(self, owner: Owner | None) -> Connection:
        """A new connection; its greeting is pending at once.

        Past ``max_clients`` the connection is ``refused``: its only output is
        an error line saying why, and the caller closes it after writing that.
        """
        self._numbers += 1
        conn = Connection(self._numbers, owner, Session(self.table, self.greeting, self.limits))
        if len(self.connections) >= self.max_clients:
            conn.refused = True
            conn.session.refuse(QMPError(
                f"migblockd is already serving max-clients={self.max_clients} clients; "
                "try again later"))
            log.warning("%s: refused: already serving max-clients=%d clients",
                        conn.label, self.max_clients, extra=about(conn))
        else:
            self.connections[conn] = None
            log.info("%s connected", conn.label, extra=about(conn))
        self._dirty[conn] = None
        return conn

    def disconnect(self, conn: Connection, reason: str = "") -> None:
        """The connection is gone: run what it sent, release its blockers.

        Everything received is executed even though the answers cannot be
        delivered (a client that hangs up right after sending still gets its
        commands run, unlike QEMU).
        """
        if conn not in self.connections:
            return
        while self.execute(conn, 1 << 30):
            pass
        del self.connections[conn]
        self._dirty.pop(conn, None)
        log.info("%s disconnected%s", conn.label, f": {reason}" if reason else "",
                 extra=about(conn))
        released = self.registry.release(conn)
        if released:
            ids = [b.id for b in released]
            log.info("%s: released %d connection-scoped blocker(s): %s", conn.label,
                     len(released), shown(", ".join(ids), quoted=False),
                     extra=about(conn, blocker_id=ids))
        self._publish()

    # -- input -----------------------------------------------------------------
    def receive_data(self, conn: Connection, data: bytes) -> None:
        conn.session.receive_data(data)

    def receive_eof(self, conn: Connection) -> None:
        conn.session.receive_eof()

    def has_pending(self, conn: Connection) -> bool:
        return conn.session.has_pending()

    def execute(self, conn: Connection, max_requests: int) -> int:
        """Run up to ``max_requests`` of ``conn``'s pending requests, in order.

        Returns how many were handled (protocol errors count: each got a reply).
        """
        if conn.refused:
            return 0
        session = conn.session
        handled = 0
        while handled < max_requests and session.has_pending():
            handled += 1
            request = session.next_request()
            if request is not None:
                self._run(conn, request)
        if session.has_output():
            self._dirty[conn] = None
        return handled

    # -- output ----------------------------------------------------------------
    def data_to_send(self, conn: Connection) -> bytes:
        return conn.session.data_to_send()

    def take_dirty(self) -> list[Connection]:
        """The connections with output queued since the last call, in order."""
        if not self._dirty:
            return []
        dirty, self._dirty = list(self._dirty), {}
        return dirty

    # -- time --------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`tick` has work to do, if any."""
        return self.registry.next_deadline()

    def tick(self) -> None:
        """Apply the simulated migration's due transitions and deliver their events."""
        self.registry.advance()
        self._publish()

    def status(self) -> tuple[int, int, str]:
        """Blockers, clients and migration status, for systemd's STATUS line."""
        return len(self.registry), len(self.connections), self.registry.status or "none"

    # -- the one place where a request meets the registry ------------------------
    def _run(self, conn: Connection, request: Request) -> None:
        session = conn.session
        name = request.command.name
        handler = request.command.handler
        assert callable(handler)
        # Transitions already due come first, so that answers never depend on
        # how promptly the timer fired, and their events precede this command's.
        self.registry.advance()
        try:
            result = handler(conn, request.args)
        except QMPError as exc:
            error: QMPError | None = exc
        except BlockerError as exc:
            error = QMPError(exc.desc)
        except Exception:
            # The client gets a generic error; the traceback belongs in the log only.
            log.exception("%s: internal error in %s", conn.label, name, extra=about(conn))
            error = QMPError(f"Internal error while executing command {name}")
        else:
            error = None
        # Events the command caused go out before its reply (QEMU's order).
        self._publish()
        if error is not None:
            session.fail(request, error)
            return
        try:
            session.reply(request, result)
        except (ValueError, TypeError, RecursionError):
            log.exception("%s: cannot encode the result of %s", conn.label, name,
                          extra=about(conn))
            session.fail(request, QMPError(f"Internal error while executing command {name}"))

    def _publish(self) -> None:
        """Deliver the registry's queued events to every negotiated session."""
        events = self.registry.take_events()
        if not events:
            return
        dirty = self._dirty
        for event in events:
            line = event_line(event)
            for conn in self.connections:
                if conn.session.negotiated:
                    conn.session.send_event(line)
                    dirty[conn] = None
            if event.name == "MIGRATION":
                log.info("migration status: %s", event.detail)

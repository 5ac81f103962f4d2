"""Requests that wait for QEMU: the calls their handlers yield, and QEMU's answers.

Part of :class:`migblockd.core.Core` (a base class of it, with no state of its own).
A gate handler (:mod:`migblockd.gate`) is a generator: :meth:`Calls._drive` runs it up
to its next ``yield``.  A :class:`~migblockd.forwarding.Call` suspends the request
until the server, which takes the calls (:meth:`Calls.take_calls`) and runs them on the
link, hands back QEMU's answer (:meth:`Calls.resume`); ``SETTLE`` suspends it until the
changes before it are committed.  Every call of one command goes to the QEMU its
first went to (a :class:`~migblockd.forwarding.Pin`).  The access check is made again
at each resumption, the role included: a reload may have narrowed it while QEMU
answered; not once the command has sent QEMU a call that may change it (``migrate``
itself, a forwarded setting, a pass-through), whose outcome is then QEMU's.  QEMU's
own events reach every client through :meth:`Calls.relay`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from migblockd.connection import Connection
from migblockd.failures import qmp_error
from migblockd.forwarding import SETTLE, Call, Pin
from migblockd.guard import Guard
from migblockd.ledger import Ledger
from migblockd.qemu_facts import QemuGivenUp
from migblockd.qmp.encoding import encode_line
from migblockd.qmp.envelope import Request
from migblockd.qmp.errors import QMPError
from migblockd.stats import Stats

__all__ = ["Calls", "Suspended"]

#: A handler that talks to QEMU, paused at its latest ``yield Call(...)``.
Suspended = Generator[object, object, object]


class Calls:
    """What a :class:`~migblockd.core.Core` does for the requests that wait for QEMU."""

    # The core's, set in Core.__init__:
    ledger: Ledger
    guard: Guard
    stats: Stats
    _dirty: dict[Connection, None]
    #: The calls yielded and not taken yet, each with the connection waiting for it.
    _calls: list[tuple[Connection, Call]]
    #: When each request now waiting (for a commit or QEMU) started: perf_counter_ns().
    _started: dict[Connection, int]

    if TYPE_CHECKING:
        def _finish(self, conn: Connection) -> None: ...
        def _fan_out(self, line: bytes, durable: bool) -> None: ...
        def _attempt(self, conn: Connection, request: Request,
                     run: Callable[[], object]) -> tuple[object, QMPError | None, bool]: ...
        def _complete(self, conn: Connection, request: Request, result: object,
                      error: QMPError | None, started: int, judged: bool = False) -> None: ...
        def _refused(self, conn: Connection, request: Request, error: QMPError,
                     started: int) -> None: ...

    def take_calls(self) -> list[tuple[Connection, Call]]:
        """Commands for QEMU, each from a request suspended until :meth:`resume`."""
        if not self._calls:
            return []
        calls, self._calls = self._calls, []
        return calls

    def resume(self, conn: Connection, value: object = None,
               error: BaseException | None = None) -> None:
        """QEMU answered ``conn``'s call (``value``), or could not (``error``)."""
        assert conn.suspended is not None and conn.answer is None
        conn.answer = (value, error)
        self._go_on(conn)
        if conn.closed and conn.waiting is None:
            self._finish(conn)
        elif conn.session.has_output():
            self._dirty[conn] = None

    def _go_on(self, conn: Connection) -> None:
        """Drive ``conn``'s suspended request on with its answer (QEMU's, or None
        after :data:`~migblockd.gate.SETTLE`)."""
        gen, request, answer = conn.suspended, conn.waiting, conn.answer
        assert gen is not None and request is not None and answer is not None
        conn.suspended = conn.waiting = conn.answer = None
        value, error = answer
        started = self._started.pop(conn, 0)
        if isinstance(error, QemuGivenUp):
            # The stop gave up waiting for QEMU: the command ends in the stop's words,
            # its handler closed rather than told, since it would make of the silence
            # what it makes of a silent or an absent QEMU (an add, a busy refusal).
            gen.close()
            self.stats.refused(request.command.name, error)
            self._complete(conn, request, None, qmp_error(error), started)
            return
        try:
            # The handler may go on to its change, answered or not (add-blocker adds
            # while QEMU is away): judged as of now, by the role a reload may have
            # given meanwhile, unless QEMU was sent something that may change it.
            if conn.pin is None or not conn.pin.changing:
                self.guard.recheck(conn, request.command.name, request.args)
        except QMPError as exc:
            gen.close()
            self._refused(conn, request, exc, started)
        else:
            self._drive(conn, request, gen, value, error, started)

    def relay(self, name: str, data: dict[str, Any], timestamp: dict[str, Any]) -> None:
        """An event from QEMU, for every negotiated client, with QEMU's own timestamp."""
        # In QEMU's own order: timestamp, event, data (encode_event's).
        event: dict[str, Any] = {"timestamp": timestamp, "event": name}
        if data:
            event["data"] = data
        self._fan_out(encode_line(event), False)

    def _drive(self, conn: Connection, request: Request, gen: Suspended, value: object,
               error: BaseException | None, started: int) -> None:
        """Run a handler that talks to QEMU up to its next call, or to its end."""
        stop: list[object] = []

        def step() -> object:
            try:
                return gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as done:
                stop.append(done.value)
                return None

        while True:
            call, failure, judged = self._attempt(conn, request, step)
            if failure is not None or stop:
                self._complete(conn, request, stop[0] if stop else None, failure, started,
                               judged)
                return
            if call is not SETTLE or self.ledger.uncommitted:
                break
            value = error = None  # nothing to wait for: on at once
        conn.waiting, conn.suspended = request, gen
        self._started[conn] = started
        if call is SETTLE:
            conn.answer = (None, None)
            self.ledger.waiting[conn] = None
        else:
            assert isinstance(call, Call)
            # Every call of one command goes to the QEMU its first went to (the
            # sender checks the pin they share).
            if conn.pin is None:
                conn.pin = Pin()
            if not call.name.startswith("query-"):
                conn.pin.changing = True
            self._calls.append((conn, Call(call.name, call.args, conn.pin)))

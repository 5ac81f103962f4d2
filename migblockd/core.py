"""The daemon's core, with no I/O: bytes in per connection, bytes out per connection.

In the style of python-websockets' ``protocol.py``, one level up: the core owns
the registry, the command table, every connection's QMP session and the event
fan-out, and knows nothing of sockets, disks or event loops.  The asyncio
adapter (:mod:`migblockd.server`) feeds it what each connection received, lets
it run requests in turns, and writes what :meth:`Core.data_to_send` returns
for the connections :meth:`Core.take_dirty` names.  Every rule from parsed
request to registry and back lives here, so it is tested with plain bytes::

    core = Core(contract, registry, limits)
    a, b = core.connect(owner_a), core.connect(owner_b)
    core.receive_data(a, b'{"execute": "qmp_capabilities"}')
    core.execute(a, 32)
    core.data_to_send(a)        # greeting, then {"return": {}}

A request runs to completion when its turn comes: the core applies the
simulated migration's transitions that are due, runs the handler, delivers the
events it caused to every negotiated session (before the reply, QEMU's order),
then queues the reply.  Whatever a handler raises becomes a reply in
:meth:`Core._attempt`, worded by :mod:`migblockd.failures`.

Durability (``durable=True``): output is held until the changes it follows
are on disk, and commands that read state wait for them (:mod:`migblockd.ledger`
keeps the stamps).  The server takes the changes in groups (:meth:`take_group`)
and reports the outcome (:meth:`committed`, :meth:`commit_failed`); a failed
commit undoes every pending change, turns the replies of those commands into
errors and drops their events.

Counting (:attr:`Core.stats`, for :mod:`migblockd.metrics`): outcomes and latencies
(a wait for a commit or QEMU included), refusals, connections, events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from time import perf_counter_ns
from types import GeneratorType
from typing import Any

from migblockd import logs
from migblockd.access import Policy, Quotas, Role
from migblockd.admission import Admission
from migblockd.commands import Handlers, version_info
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.failures import internal_error, qmp_error
from migblockd.gate import SETTLE, Call
from migblockd.guard import Guard, NotOwner, OverQuota
from migblockd.ledger import Group, Ledger
from migblockd.logs import about, shown
from migblockd.qmp.encoding import encode_line
from migblockd.qmp.errors import QMPError
from migblockd.qmp.limits import Limits
from migblockd.qmp.session import Request, Session
from migblockd.registry import BlockerError, Owner, Registry
from migblockd.render import event_line
from migblockd.stats import Stats

__all__ = ["BATCH", "Core"]

log = logging.getLogger("migblockd")

#: Output bytes after which a connection's turn ends early: a client that
#: pipelines requests for big answers gets them written one turn at a time
#: (and backpressure stops it there), not all built at once.
TURN_OUTPUT = 64 * 1024

#: Requests of one connection run per turn: large enough to batch pipelined
#: requests into one write, small enough to let other clients take turns (and,
#: for a connection gone, to let its answers go as they come: see ``_finish``).
BATCH = 32

#: A handler that talks to QEMU, paused at its latest ``yield Call(...)``.
Suspended = Generator[object, object, object]


def _held_full(conn: Connection) -> bool:
    """``conn``'s replies held for commits are a turn's worth: its next requests
    wait for the commit.  Without this bound a client's pipelined requests would
    keep running while a slow commit holds their output, and all of it would
    arrive at once when the commit lands, past ``--max-output``."""
    session = conn.session
    # A closed connection's last requests all run now: nobody reads their replies.
    return session.holding and not conn.closed and session.held_replies > TURN_OUTPUT


class Core:
    """Sessions, registry and command table of one daemon (sans-I/O).

    ``limits`` bound each connection's input, ``admission`` how many connections
    are served (in all, per uid); ``policy`` and ``quotas`` who may run what (the
    ``guard``).  A reload changes any of them between requests.  ``durable``
    holds output until its changes are committed (see above).
    """

    def __init__(self, contract: Contract, registry: Registry, limits: Limits, *,
                 max_clients: int = 1024, admission: Admission | None = None,
                 durable: bool = False, handlers: Handlers | None = None,
                 policy: Policy | None = None, quotas: Quotas | None = None) -> None:
        self.contract = contract
        self.registry = registry
        self.limits = limits
        self.admission = admission if admission is not None else Admission(max_clients)
        self.durable = durable
        self.handlers = handlers if handlers is not None else Handlers(contract, registry)
        self.table = self.handlers.table()
        # The schema's commands; the others (forwarded to QEMU) are the admins'.
        self.guard = Guard(contract.commands, registry, policy if policy is not None else Policy(),
                           quotas if quotas is not None else Quotas())
        self.greeting: dict[str, Any] = {
            "QMP": {"version": version_info(), "capabilities": ["oob"]}
        }
        self.connections: dict[Connection, None] = {}  # an ordered set
        self._dirty: dict[Connection, None] = {}  # connections with output, in order
        self._numbers = 0
        self.ledger = Ledger()
        self._calls: list[tuple[Connection, Call]] = []
        self.stats = Stats(name for name, cmd in self.table.items() if cmd.handler is not None)
        # When each request now waiting (for a commit or QEMU) started: perf_counter_ns().
        self._started: dict[Connection, int] = {}

    # -- connections -----------------------------------------------------------
    def connect(self, owner: Owner | None) -> Connection:
        """A new connection; its greeting is pending at once.

        Past the admission's limits the connection is ``refused``: its only
        output is an error line saying why, and the caller closes it after
        writing that.
        """
        self._numbers += 1
        conn = Connection(self._numbers, owner, Session(self.table, self.greeting, self.limits))
        self.stats.connections += 1
        refusal = self.admission.refusal(owner, len(self.connections),
                                         admin=self.guard.role_of(conn) is Role.ADMIN)
        if refusal is not None:
            limit, desc = refusal
            self.stats.connections_refused[limit] += 1
            conn.refused = True
            conn.session.refuse(QMPError(desc))
            log.warning("%s: refused: %s", conn.label, desc, extra=about(conn))
        else:
            self.connections[conn] = None
            self.admission.admit(owner)
            logs.info(log, "%s connected", conn.label, extra=about(conn))
        self._dirty[conn] = None
        return conn

    def configure(self, limits: Limits) -> None:
        """Bound every connection's input by ``limits``, the open ones' from their
        next message on (a reload)."""
        self.limits = limits
        for conn in self.connections:
            conn.session.configure(limits)

    def configure_access(self, policy: Policy, quotas: Quotas) -> None:
        """Apply a (re)loaded access policy and quotas (see :meth:`Guard.configure`).

        A blocker is encoded once, its owner's user name with it: those of a
        uid whose name the reload found changed are encoded again, so that
        ``query-blockers`` shows every blocker of a uid under its name of now.
        """
        renamed = self.guard.configure(policy, quotas, self.connections)
        if renamed:
            for blocker in self.registry.blockers():
                if blocker.owner is not None and blocker.owner.uid in renamed:
                    blocker.cache = None
            self.handlers.listings.reset()

    def disconnect(self, conn: Connection, reason: str = "") -> None:
        """The connection is gone: run what it sent, then release its blockers.

        Everything received is executed though no answer can be delivered
        (unlike QEMU); a request waiting for a commit runs once it is done,
        and the connection is finished off after that.
        """
        if conn not in self.connections or conn.closed:
            return
        conn.closed = True
        logs.info(log, "%s disconnected%s", conn.label, f": {reason}" if reason else "",
                  extra=about(conn))
        self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        # Its requests run, a turn's worth at a time, and their output is let go
        # as it comes, never joined: a client that pipelined thousands of big
        # answers and hung up would otherwise cost their sum in memory and copies.
        while self.execute(conn, BATCH):
            conn.session.take_output()
        if conn.waiting is not None:
            return  # finished when its commit is done
        del self.connections[conn]
        self.admission.release(conn.owner)
        self._dirty.pop(conn, None)
        self.ledger.holding.pop(conn, None)
        self.ledger.cohort.pop(conn, None)
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
        log.warning("%s: closing: %s", conn.label, reason, extra=about(conn))

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
        return _held_full(conn)

    def awaiting(self, conn: Connection) -> bool:
        """What ``conn`` is owed waits for a commit or QEMU, not for the client."""
        return conn.session.holding or self.blocked(conn)

    def execute(self, conn: Connection, max_requests: int) -> int:
        """Run up to ``max_requests`` of ``conn``'s pending requests, in order.

        Returns how many were handled (protocol errors count: each got a reply).
        """
        if conn.refused:
            return 0
        if conn in self.ledger.cohort:
            self.ledger.arrived(conn, self.registry.clock.monotonic())
        session = conn.session
        handled = 0
        while handled < max_requests:
            request = conn.waiting
            started = 0
            if request is not None:
                if conn.suspended is not None and conn.answer is None:
                    break
                if self.ledger.uncommitted:
                    # Woken, but another change came first: wait for its commit too.
                    self.ledger.waiting[conn] = None
                    break
                if conn.answer is not None:
                    self._go_on(conn)
                    continue
                conn.waiting = None
                started = self._started.pop(conn, 0)
            elif session.has_pending():
                # Past a turn's worth of held replies, in-band requests wait for
                # the commit (as for a slow reader); out-of-band ones still jump.
                in_band = not _held_full(conn)
                request = session.next_request(in_band)
                if request is None and not in_band:
                    break
                handled += 1
                if request is None:
                    self.stats.protocol_replies += 1  # answered by the session itself
                    continue
            else:
                break
            self._run(conn, request, started)
            if conn.waiting is not None or session.output_bytes > TURN_OUTPUT:
                break  # a big reply: write it before running more of this client's
        if session.has_output():
            self._dirty[conn] = None
        return handled

    # -- output ----------------------------------------------------------------
    def data_to_send(self, conn: Connection) -> bytes:
        return conn.session.data_to_send()

    def take_output(self, conn: Connection) -> tuple[list[bytes], int, int]:
        """The bytes to send to ``conn``, in pieces, their size, and how many are events."""
        return conn.session.take_output()

    def others_dirty(self, conn: Connection) -> bool:
        """Some connection other than ``conn`` has output queued."""
        return any(other is not conn for other in self._dirty)

    def take_dirty(self) -> list[Connection]:
        """The connections with output queued since the last call, in order."""
        if not self._dirty:
            return []
        dirty, self._dirty = list(self._dirty), {}
        return dirty

    # -- durability --------------------------------------------------------------
    def has_uncommitted(self) -> bool:
        """Some change is not on disk yet (nor has its commit failed)."""
        return self.ledger.uncommitted

    def take_group(self, wait: bool = True) -> Group | None:
        """The changes to commit next, if any and if no commit is in flight;
        while ``wait``, only once the last commit's cohort is in (see
        :mod:`migblockd.ledger`) or its wait is over."""
        return self.ledger.take_group(self.registry.clock.monotonic() if wait else None)

    def committed(self, group: Group) -> list[Connection]:
        """``group`` is on disk: release what waited for it.

        Returns the connections whose next request may run now.
        """
        self.ledger.done(group)
        holding = self.ledger.holding
        released = []
        for conn in list(holding):
            if conn.session.release(group.stamp):
                self._dirty[conn] = None
                released.append(conn)
            if not conn.session.holding:
                del holding[conn]
        # Writers now answered whose next request is still to come: not those
        # with a later request of their own already waiting (for this commit's
        # successor, for QEMU, or to read state).
        self.ledger.expect([conn for conn in group.writers
                            if not conn.closed and conn.waiting is None
                            and not conn.session.holds_reply],
                           self.registry.clock.monotonic())
        return self._wake(released)

    def commit_failed(self, group: Group, reason: str) -> list[Connection]:
        """``group`` could not be committed: back to what is on disk.

        Every change not yet on disk is undone (``group``'s and any made since),
        those commands' replies become errors saying ``reason``, their events are
        dropped.  Returns the connections whose next request may run now.
        """
        undone = [(conn, self.registry.undo(changes, alive=self.connections.__contains__))
                  for conn, changes in self.ledger.failed()]
        self.handlers.listings.reset()
        error = QMPError(f"{reason}; nothing was changed")
        released = list(self.ledger.holding)
        # Commands of clients gone since: their replies were dropped with them.
        failed = sum(1 for conn, _ in undone if conn not in self.ledger.holding)
        for conn in released:
            failed += conn.session.fail_held(error)
            self._dirty[conn] = None
        self.ledger.holding.clear()
        log.error("%s; %d command(s) failed, their changes undone", reason, failed)
        # The log said "added" and "deleted" as each ran: say which did not last.
        for conn, changes in reversed(undone):
            for change in changes:
                self.handlers.undone(conn, change)
        return self._wake(released)

    def _wake(self, released: list[Connection]) -> list[Connection]:
        """Who may go on after a commit: those waiting to read state, and those
        of ``released`` that their held output had stopped (:func:`_held_full`)."""
        woken = self.ledger.wake()
        for conn in woken:
            if conn.closed:
                self._finish(conn)
        woken = [conn for conn in woken if not conn.closed]
        woken += [conn for conn in released if conn.session.has_pending()
                  and not conn.closed and conn not in woken]
        return woken

    # -- QEMU --------------------------------------------------------------------
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
        try:
            # The handler may go on to its change, answered or not (add-blocker adds
            # while QEMU is away): counted as of now.
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

    # -- time --------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`tick` has work to do, if any."""
        registry, cohort = self.registry.next_deadline(), self.ledger.deadline()
        if cohort is None or (registry is not None and registry < cohort):
            return registry
        return cohort

    def tick(self) -> None:
        """Apply the simulated migration's due transitions and deliver their events."""
        self.registry.advance()
        self._publish(False)

    def status(self) -> tuple[int, int, str, str | None]:
        """Blockers, clients, migration status and QEMU link, for systemd's STATUS line."""
        handlers = self.handlers
        return (len(self.registry), len(self.connections), handlers.migration_status(),
                handlers.qemu_state())

    # -- the one place where a request meets the registry ------------------------
    def _run(self, conn: Connection, request: Request, started: int = 0) -> None:
        """Run ``request``; ``started``: when it first started, if it waited since."""
        started = started or perf_counter_ns()
        handler = request.command.handler
        assert callable(handler)
        # Access first: a refused request changes nothing and causes no event.
        try:
            self.guard.check(conn, request.command.name, request.args)
        except QMPError as exc:
            self._refused(conn, request, exc, started)
            return
        if self.ledger.uncommitted and getattr(handler, "reads_state", False):
            conn.waiting = request
            self.ledger.waiting[conn] = None
            self._started[conn] = started
            return
        # Transitions already due come first, so that answers never depend on
        # how promptly the timer fired, and their events precede this command's.
        registry = self.registry
        if registry.next_deadline() is not None:
            registry.advance()
            self._publish(False)
        result, error, judged = self._attempt(conn, request,
                                              lambda: handler(conn, request.args))
        if type(result) is GeneratorType:
            self._drive(conn, request, result, None, None, started)
        else:
            self._complete(conn, request, result, error, started, judged)

    def _refused(self, conn: Connection, request: Request, error: QMPError,
                 started: int) -> None:
        """The guard refused ``request``: nothing changed, no event."""
        self.stats.refused(request.command.name, error)
        # Quotas and ownership are judged by what the registry holds.
        self._complete(conn, request, None, error, started,
                       isinstance(error, (OverQuota, NotOwner)))

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
            self._calls.append((conn, call))

    def _attempt(self, conn: Connection, request: Request,
                 run: Callable[[], object]) -> tuple[object, QMPError | None, bool]:
        """``run()``'s result, or the QMP error the client gets instead (counted by
        cause), and whether the registry refused it (judging by what it holds)."""
        try:
            return run(), None, False
        except Exception as exc:
            name = request.command.name
            self.stats.refused(name, exc)
            error = qmp_error(exc)
            if error is None:
                log.exception("%s: internal error in %s", conn.label, name, extra=about(conn))
                error = internal_error(name)
            return None, error, isinstance(exc, BlockerError)

    def _complete(self, conn: Connection, request: Request, result: object,
                  error: QMPError | None, started: int, judged: bool = False) -> None:
        """Record the command's changes, deliver its events, then its reply.

        ``judged``: the registry refused the command, by what it holds.  While
        changes are uncommitted, a command whose changes or refusal stand on
        them joins their group: a failed commit undoes its changes too and
        turns its reply into the commit's error, as for a durable command.
        Otherwise a connection-scoped add that reused the id of an uncommitted
        delete would outlive the delete's undoing, and a refusal could report
        a blocker that the undoing takes away.
        """
        durable = False
        changes = self.registry.take_changes()
        if changes:
            self.handlers.track(changes)
        if self.durable and (changes or judged) and (
                self.ledger.uncommitted or any(change.durable for change in changes)):
            if changes:
                self.ledger.record(conn, changes)
            durable = True
        # Events the command caused go out before its reply (QEMU's order).
        self._publish(durable)
        stamp = self.ledger.open_stamp
        if stamp:
            self.ledger.holding[conn] = None
        session = conn.session
        name = request.command.name
        if error is not None:
            session.fail(request, error, stamp, durable)
        else:
            try:
                session.reply(request, result, stamp, durable)
            except (ValueError, TypeError, RecursionError):
                log.exception("%s: cannot encode the result of %s", conn.label, name,
                              extra=about(conn))
                error = internal_error(name)
                session.fail(request, error, stamp, durable)
        self.stats.command(name, perf_counter_ns() - started, error is None)

    def _publish(self, durable: bool) -> None:
        """Deliver the registry's queued events to every negotiated session."""
        for event in self.registry.take_events():
            self.stats.event(event)
            self._fan_out(event_line(event), durable)
            if event.name == "MIGRATION":
                log.info("migration status: %s", event.detail)

    def _fan_out(self, line: bytes, durable: bool) -> None:
        stamp = self.ledger.open_stamp
        # Held output waits for its commit, which marks the connection dirty.
        mark = self.ledger.holding if stamp else self._dirty
        for conn in self.connections:
            session = conn.session
            if session.negotiated and not conn.closed:
                session.send_event(line, stamp, durable)
                mark[conn] = None

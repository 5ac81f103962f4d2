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
:meth:`Core._attempt`, worded by :mod:`migblockd.failures`.  This module holds
that path; :class:`Core`'s three base classes hold the rest, and no state:
:mod:`migblockd.roster` (the connections: admission, whose turn is worth giving,
who has output, a gone one's last requests), :mod:`migblockd.outcomes` (what a
commit or a failed one does to the output held for it) and :mod:`migblockd.calls`
(the requests that wait for QEMU).

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
from collections.abc import Callable
from time import perf_counter_ns
from types import GeneratorType
from typing import Any

from migblockd.access import Policy, Quotas
from migblockd.admission import Admission
from migblockd.calls import Calls
from migblockd.commands import Handlers, version_info
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.failures import internal_error, qmp_error
from migblockd.gate import Call, Forwarded
from migblockd.guard import Guard, NotOwner, OverQuota
from migblockd.ledger import Ledger
from migblockd.logs import about
from migblockd.logs.throttle import Throttle
from migblockd.outcomes import Outcomes
from migblockd.qmp.envelope import Request
from migblockd.qmp.errors import QMPError
from migblockd.qmp.limits import Limits
from migblockd.qmp.output import fan_out
from migblockd.registry import BlockerError, Event, Registry
from migblockd.render import event_line
from migblockd.roster import CONNECTION_BURST, TURN_OUTPUT, Roster, held_full
from migblockd.stats import Stats

__all__ = ["Core", "Status"]

#: What :meth:`Core.status` returns: ``notify.format_status``'s arguments.
Status = tuple[int, int, str, str | None, str | None]

log = logging.getLogger("migblockd")

class Core(Roster, Outcomes, Calls):
    """Sessions, registry and command table of one daemon (sans-I/O).

    ``limits`` bound each connection's input, ``admission`` how many connections
    are served (in all, per uid); ``policy`` and ``quotas`` who may run what (the
    ``guard``).  A reload changes any of them between requests.  ``durable``
    holds output until its changes are committed (see above).  ``deferred``: the
    daemon's start, whose look-ups in the user and group databases run off the loop
    (:meth:`~migblockd.connection_roles.ConnectionRoles.start_access`), not here.
    """

    def __init__(self, contract: Contract, registry: Registry, limits: Limits, *,
                 max_clients: int = 1024, admission: Admission | None = None,
                 durable: bool = False, handlers: Handlers | None = None,
                 policy: Policy | None = None, quotas: Quotas | None = None,
                 deferred: bool = False) -> None:
        self.contract = contract
        self.registry = registry
        self.limits = limits
        self.admission = admission if admission is not None else Admission(max_clients)
        self.durable = durable
        self.handlers = handlers if handlers is not None else Handlers(contract, registry)
        self.table = self.handlers.table()
        # The schema's commands; the others (forwarded to QEMU) are the admins'.
        self.guard = Guard(contract.commands, registry, policy if policy is not None else Policy(),
                           quotas if quotas is not None else Quotas(), deferred=deferred)
        # One throttle for every refusal's line, the guard's and the registry's.
        self.handlers.bounded = self.guard.bounded
        self.guard.judge.on_names = self.renamed
        self.greeting: dict[str, Any] = {
            "QMP": {"version": version_info(), "capabilities": ["oob"]}
        }
        self.connections: dict[Connection, None] = {}  # an ordered set
        #: Connections waiting for their role's look-up (migblockd.admitting), not
        #: served yet: they hold descriptors, so the admission counts them too.
        self.waiting = 0
        self.connection_lines = Throttle(burst=CONNECTION_BURST)
        self._dirty: dict[Connection, None] = {}  # connections with output, in order
        self._finishing: dict[Connection, None] = {}  # gone, with requests to run
        self._numbers = 0
        self.ledger = Ledger()
        self._failed_commits = 0
        self._failed_reason = ""
        self._said_succeeding = False
        self._remedied = set()
        # Commands and events whose outcome waits for their commit: counted then.
        self._unsettled: list[tuple[int, str, int, bool, bool, bool]] = []
        self._unsettled_events: list[tuple[int, Event]] = []
        self._calls: list[tuple[Connection, Call]] = []
        self.stats = Stats(name for name, cmd in self.table.items() if cmd.handler is not None)
        # When each request now waiting (for a commit or QEMU) started: perf_counter_ns().
        self._started: dict[Connection, int] = {}

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
                in_band = not held_full(conn)
                request = session.next_request(in_band)
                if request is None and not in_band:
                    break
                handled += 1
                if request is None:
                    self.stats.protocol_replies += 1  # answered by the session itself
                    if session.limit_notice is not None:
                        # The client's error names no setting; the log does, once a
                        # connection, and a burst at a time for a uid that reconnects
                        # to send each one.
                        more = self.guard.bounded("limit", conn.owner)
                        if more is not None:
                            log.warning("%s: %s%s", conn.label, session.limit_notice, more,
                                        extra=about(conn))
                        session.limit_notice = None
                    continue
            else:
                break
            self._run(conn, request, started)
            if conn.waiting is not None or session.output_bytes > TURN_OUTPUT:
                break  # a big reply: write it before running more of this client's
        if session.has_output():
            self._dirty[conn] = None
        return handled

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

    def status(self) -> Status:
        """Blockers, clients, migration status, QEMU link and failing commits (their
        reason), for systemd's STATUS line."""
        handlers = self.handlers
        return (len(self.registry), len(self.connections), handlers.migration_status(),
                handlers.qemu_state(), self._failed_reason if self._failed_commits else None)

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
            conn.pin = None  # a new command: its first call may go to any QEMU
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
        applied = ""
        if isinstance(result, Forwarded):  # QEMU has applied part of it already
            applied = result.applied
            result = result.value
        if error is not None:
            session.fail(request, error, stamp, durable)
        else:
            try:
                session.reply(request, result, stamp, durable, applied)
            except (ValueError, TypeError, RecursionError):
                log.exception("%s: cannot encode the result of %s", conn.label, name,
                              extra=about(conn))
                error = internal_error(name)
                session.fail(request, error, stamp, durable)
        # Counted with the command's outcome, not by the handler: a counter that the
        # handler's count is taken from could go down in between, while one waits.
        starts = name == "migrate" and request.args.get("resume") is not True
        if stamp:
            # Its reply waits for the commit, and a durable one fails with it: its
            # outcome, and the time it took, are known then (outcomes.py).
            self._unsettled.append((stamp, name, started, error is None, durable, starts))
        else:
            self.stats.command(name, perf_counter_ns() - started, error is None,
                               starts=starts)

    def _publish(self, durable: bool) -> None:
        """Deliver the registry's queued events to every negotiated session."""
        stamp = self.ledger.open_stamp if durable else 0
        for event in self.registry.take_events():
            if stamp:  # it happens only if its commit succeeds
                self._unsettled_events.append((stamp, event))
            else:
                self.stats.event(event)
            self._fan_out(event_line(event), durable)
            if event.name == "MIGRATION":
                log.info("migration status: %s", event.detail)

    def _fan_out(self, line: bytes, durable: bool) -> None:
        stamp = self.ledger.open_stamp
        # Held output waits for its commit, which marks the connection dirty.
        self.stats.events_discarded += fan_out(self.connections, line, stamp, durable,
                                               self.ledger.holding if stamp else self._dirty)

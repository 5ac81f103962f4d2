"""Turns over the connections, and what each hands on: commits, calls to QEMU, the timer.

Part of :class:`migblockd.server.Server` (a base class of it, with no state of
its own).  Received bytes are buffered at once, but requests run in a *turn*,
one callback per event-loop iteration that serves every connection with
pending requests (at most ``BATCH`` of each, so clients take turns) and then
writes each connection's output once (:meth:`Turns._flush`).  A lone
connection (no turn coming) takes its turn as its bytes arrive, a loop
iteration sooner; if that turn left output for other connections or a change
to commit, the flush waits for the next turn, so that what else arrives in
the iteration joins it.  Flow control per connection (backpressure,
``max_output``, a dropped client's last words) is the adapter's
(:mod:`migblockd.adapter`).

After the writes, a flush hands on what the turn left: the core's calls to
the gated QEMU (each in a task, its answer resuming the request), the next
group of changes to the disk thread (one commit in flight at a time), the
simulated migration's timer, and the status systemd shows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from migblockd.drain import waiting_for
from migblockd.forwarding import Call
from migblockd.notify import format_status
from migblockd.qemu_facts import QemuGivenUp
from migblockd.state import StateError

if TYPE_CHECKING:
    from migblockd.adapter import ClientProtocol
    from migblockd.connection import Connection
    from migblockd.core import Core, Status
    from migblockd.disk import DiskThread
    from migblockd.ledger import Group
    from migblockd.notify import Notifier
    from migblockd.registry import Change

__all__ = ["Forward", "Turns"]

log = logging.getLogger("migblockd")

#: Runs one command on the gated QEMU: its return value, or QemuError /
#: QemuUnavailable (migblockd.qemu_facts) raised.
Forward = Callable[[Call], Awaitable[object]]


class Turns:
    """The turn scheduler of a :class:`~migblockd.server.Server`, and its hand-overs."""

    # The server's, set in Server.__init__:
    core: Core
    notifier: Notifier
    forward: Forward | None
    loop: asyncio.AbstractEventLoop
    protocols: dict[Connection, ClientProtocol]
    #: Connections whose transport failed (or that we aborted) and whose
    #: connection_lost, which runs what they sent and we never read, is
    #: still to come.
    losing: set[ClientProtocol]
    _runnable: dict[ClientProtocol, None]  # an ordered set
    _scheduled: bool
    _forwarding: set[asyncio.Task[None]]
    #: Commits the groups of a durable daemon (None: --ephemeral).
    _disk: DiskThread[list[Change]] | None
    _group: Group | None
    _group_started: int  # perf_counter_ns() when the group went to the disk thread
    _committing: asyncio.Event
    _timer: asyncio.TimerHandle | None
    _timer_deadline: float | None
    #: The status last reported, and what the stop waits for (None: not stopping).
    _status: tuple[Status, str | None] | None
    #: Shutdown has begun (the server's).
    draining: bool
    _all_gone: asyncio.Event

    # -- turns -------------------------------------------------------------------
    def runnable(self, protocol: ClientProtocol) -> None:
        self._runnable[protocol] = None
        self.schedule()

    def received(self, protocol: ClientProtocol) -> None:
        """``protocol`` has new input.

        When no turn is coming (no other connection has work), its turn is
        taken now rather than in the next loop iteration: a lone client's
        reply leaves one iteration sooner.  The flush still waits for the
        turn when this one left output for other connections (events) or a
        change to commit, so that whatever else arrives in this iteration
        joins them: one write per connection, one commit per group.  Not
        while a broken connection's unread requests wait for its
        ``connection_lost``: those came first, and run first.
        """
        conn = protocol.conn
        if conn is None or self._scheduled or self.losing or protocol.eof:
            self.runnable(protocol)
            return
        if protocol.pump():  # more than one turn's worth
            self.runnable(protocol)
        elif self.core.others_dirty(conn) or self._commit_due():
            self.schedule()
        else:
            self._flush()

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        runnable, self._runnable = self._runnable, {}
        for protocol in runnable:
            if protocol.pump():
                self._runnable[protocol] = None
        # Connections gone take their turn too: what they sent runs a batch a turn.
        self.core.finish_turn()
        self._flush()
        for protocol in runnable:
            if protocol.eof:
                protocol.flush()  # closes once everything received is answered
        if self._runnable:
            self.schedule()

    def _flush(self) -> None:
        if self.core.finishing:
            self.schedule()  # however this flush came: a commit, QEMU's answer, a turn
        protocols = self.protocols
        if self.forward is not None:
            for conn, call in self.core.take_calls():
                task = self.loop.create_task(self._call(conn, call))
                self._forwarding.add(task)
                task.add_done_callback(self._forwarding.discard)
        for conn in self.core.take_dirty():
            protocol = protocols.get(conn)
            if protocol is not None:
                protocol.flush()
        # Last: the disk thread, woken now, would contend for the GIL with
        # every write above (on one core, a context switch each time).
        # Most flushes (a read's reply) have nothing to commit: then no group
        # is looked for, nor the clock read to see whether its cohort is in.
        if self._disk is not None and self._group is None and self.core.has_uncommitted():
            self._start_commit()
        self._arm_timer()
        self._report_status()
        if not protocols:
            self._all_gone.set()
        else:
            self._all_gone.clear()

    # -- QEMU ----------------------------------------------------------------------
    async def _call(self, conn: Connection, call: Call) -> None:
        assert self.forward is not None
        try:
            value = await self.forward(call)
        except asyncio.CancelledError:
            self.core.resume(conn, error=QemuGivenUp(
                "migblockd stopped before QEMU answered; the command may or may not have "
                "taken effect"))
            protocol = self.protocols.get(conn)
            if protocol is not None:  # given up on during the drain: the client hears so
                self.runnable(protocol)
            raise
        except Exception as exc:  # QemuError, QemuUnavailable: the core words them
            self.core.resume(conn, error=exc)
        else:
            self.core.resume(conn, value)
        protocol = self.protocols.get(conn)
        if protocol is not None:
            self.runnable(protocol)
        else:
            self.schedule()

    def _give_up_on_qemu(self) -> None:
        """The drain is ending: the commands still waiting for QEMU fail now."""
        if self._forwarding:
            log.warning("stopping: giving up on %d command(s) still waiting for QEMU",
                        len(self._forwarding))
        for task in self._forwarding:
            task.cancel()

    # -- group commit ------------------------------------------------------------
    def _commit_due(self) -> bool:
        """A change waits for a commit that nothing has started yet."""
        return self._disk is not None and self._group is None and self.core.has_uncommitted()

    def committing_for(self) -> float | None:
        """How many seconds the commit under way has taken so far (None: none is):
        the watchdog asks (``serving.serve``), since every change waits for it, and
        every read after one."""
        if self._group is None:
            return None
        return (time.perf_counter_ns() - self._group_started) / 1e9

    def _start_commit(self, wait: bool = True) -> None:
        assert self._disk is not None
        group = self._group = self.core.take_group(wait)
        if group is None:
            return
        self._group_started = time.perf_counter_ns()
        self._disk.submit(group.changes)

    def _commit_done(self, exc: BaseException | None) -> None:
        group, self._group = self._group, None
        assert group is not None
        # As clients wait for it: the hand-over to the disk thread and back included.
        self.core.stats.commit(time.perf_counter_ns() - self._group_started, exc is None)
        if exc is None:
            woken = self.core.committed(group)
        else:
            remedy = exc.remedy if isinstance(exc, StateError) else None
            woken = self.core.commit_failed(group, str(exc), remedy)
        # The woken go first in the next turn: a change from a client that comes
        # before them in the turn would make their reads wait for another commit.
        first = {p: None for c in woken if (p := self.protocols.get(c)) is not None}
        self._runnable = first | self._runnable
        self._committing.set()
        self.schedule()
        self._flush()

    async def _commits_done(self) -> None:
        """Wait until every change made so far is on disk (or has failed)."""
        while self._disk is not None and self.core.has_uncommitted():
            if self._group is None:
                self._start_commit(wait=False)
            self._committing.clear()
            await self._committing.wait()

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        current = self._timer_deadline
        if deadline == current or (deadline is not None and current is not None
                                   and deadline > current):
            return  # a timer that fires early finds nothing due, and is set again
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.core.registry.clock.monotonic())
            self._timer = self.loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_deadline = None
        self.core.tick()
        self._flush()

    # -- systemd status ------------------------------------------------------------
    def status_line(self) -> str:
        return format_status(*self.core.status(), stopping=self._stopping())

    def _stopping(self) -> str | None:
        """What the stop waits for; None while the daemon is not stopping."""
        if not self.draining:
            return None
        return waiting_for(self.core, self.protocols,
                           self._group is not None or self._commit_due())

    def _report_status(self) -> None:
        if not self.notifier.active:
            return
        status = (self.core.status(), self._stopping())
        if status == self._status:
            return
        self._status = status
        task = self.loop.create_task(self.notifier.status(
            format_status(*status[0], stopping=status[1])))
        task.add_done_callback(_log_task_failure)


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sd_notify failed: %s", task.exception())


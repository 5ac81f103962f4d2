"""The asyncio side: the listening socket, turns over the connections, commits, timers.

Everything protocol- or blocker-shaped lives in :class:`migblockd.core.Core`;
each connection's transport is a :class:`migblockd.adapter.ClientProtocol`.
This module decides when requests run, hands the core's groups of changes to
the disk thread and its calls to the gated QEMU, arms the simulated
migration's timer, and owns the order of start-up and shutdown.

Turns: received bytes are buffered at once, but requests run in a *turn*, one
callback per event-loop iteration that serves every connection with pending
requests (at most ``BATCH`` of each, so clients take turns) and then writes
each connection's output once.  A lone connection (no turn coming) takes
its turn as its bytes arrive, a loop iteration sooner; if that turn left
output for other connections or a change to commit, the flush waits for
the next turn, so that what else arrives in the iteration joins it.  Flow
control per connection (backpressure, ``max_output``, a dropped client's
last words) is the adapter's.

Shutdown is a drain (:meth:`Server.stop`): no more reading, every request
already read runs in turns as usual and is answered, nobody is dropped for
``max_output`` meanwhile, and each connection closes once its replies are
written (:mod:`migblockd.drain` says how long that may take).  Accepting
(:mod:`migblockd.accept`) and the timeouts for unfinished business
(:mod:`migblockd.timeouts`) have modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from migblockd.accept import Acceptor, fit_descriptor_limit
from migblockd.adapter import ClientProtocol, read_buffer
from migblockd.config import Config, ConfigError, build
from migblockd.connection import Connection
from migblockd.core import Core
from migblockd.disk import DiskThread
from migblockd.drain import drain
from migblockd.ledger import Group
from migblockd.listen import Claim, bind_claimed
from migblockd.pidlock import PidLock
from migblockd.preflight import problems
from migblockd.qemu_facts import QemuUnavailable
from migblockd.registry import Change
from migblockd.reloading import plan
from migblockd.systemd import Notifier, format_status
from migblockd.timeouts import Timeouts

log = logging.getLogger("migblockd")

Commit = Callable[[list[Change]], None]
#: Runs one command on the gated QEMU: its return value, or QemuError /
#: QemuUnavailable (migblockd.qemu_facts) raised.
Forward = Callable[[str, dict[str, Any]], Awaitable[object]]


class Server:
    """The listening socket, its connections' transports, and the turn scheduler.

    ``commit`` writes a group of changes durably (blocking: it runs on a worker
    thread, one group at a time, so the loop keeps serving meanwhile); it
    raises an exception whose ``str()`` says why when it cannot.  ``forward``
    sends a suspended request's call to the gated QEMU.
    """

    def __init__(self, config: Config, cli: dict[str, Any], core: Core,
                 notifier: Notifier, commit: Commit | None = None,
                 forward: Forward | None = None) -> None:
        self.config = config
        self.cli = cli
        self.core = core
        self.notifier = notifier
        self.forward = forward
        self._forwarding: set[asyncio.Task[None]] = set()
        self._group: Group | None = None
        self._group_started = 0  # perf_counter_ns() when the group went to the disk thread
        self._committing = asyncio.Event()
        self.protocols: dict[Connection, ClientProtocol] = {}
        self.read_buffer = read_buffer()
        self.acceptor: Acceptor | None = None
        self.own_socket: tuple[Path, int] | None = None  # path and inode we created
        self._socket_lock: PidLock | None = None
        self.loop = asyncio.get_running_loop()
        #: Commits the groups of a durable daemon (None: --ephemeral).
        self._disk: DiskThread[list[Change]] | None = None
        if commit is not None:
            self._disk = DiskThread(self.loop, commit, self._commit_done)
        self.timeouts = Timeouts(self.loop, core, self.protocols.values,
                                 negotiation=config.negotiation_timeout,
                                 idle=config.idle_timeout)
        #: Shutdown has begun: nobody is dropped for --max-output any more.
        self.draining = False
        self._runnable: dict[ClientProtocol, None] = {}  # an ordered set
        #: Connections whose transport failed (or that we aborted) and whose
        #: connection_lost, which runs what they sent and we never read, is
        #: still to come.
        self.losing: set[ClientProtocol] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._status: tuple[int, int, str, str | None] | None = None
        self._all_gone = asyncio.Event()

    def _turned_away(self) -> None:
        self.core.stats.connections_refused["descriptors"] += 1

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
        self._flush()
        for protocol in runnable:
            if protocol.eof:
                protocol.flush()  # closes once everything received is answered
        if self._runnable:
            self.schedule()

    def _flush(self) -> None:
        protocols = self.protocols
        if self.forward is not None:
            for conn, call in self.core.take_calls():
                task = self.loop.create_task(self._call(conn, call.name, call.args))
                self._forwarding.add(task)
                task.add_done_callback(self._forwarding.discard)
        for conn in self.core.take_dirty():
            protocol = protocols.get(conn)
            if protocol is not None:
                protocol.flush()
        # Last: the disk thread, woken now, would contend for the GIL with
        # every write above (on one core, a context switch each time).
        if self._disk is not None and self._group is None:
            self._start_commit()
        self._arm_timer()
        self._report_status()
        if not protocols:
            self._all_gone.set()
        else:
            self._all_gone.clear()

    # -- QEMU ----------------------------------------------------------------------
    async def _call(self, conn: Connection, name: str, args: dict[str, Any]) -> None:
        assert self.forward is not None
        try:
            value = await self.forward(name, args)
        except asyncio.CancelledError:
            self.core.resume(conn, error=QemuUnavailable(
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
            woken = self.core.commit_failed(group, str(exc))
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
        return format_status(*self.core.status())

    def _report_status(self) -> None:
        if not self.notifier.active:
            return
        status = self.core.status()
        if status == self._status:
            return
        self._status = status
        task = self.loop.create_task(self.notifier.status(format_status(*status)))
        task.add_done_callback(_log_task_failure)

    # -- life cycle ----------------------------------------------------------------
    async def start(self, sock: socket.socket | None, claim: Claim | None) -> None:
        """Bind ``claim`` (or take the socket systemd passed) without accepting yet:
        see serve()."""
        group = self.config.socket_group
        if sock is not None:
            log.info("socket activation: serving the passed socket %s", sock.getsockname())
            if group is not None:
                log.info("socket activation: --socket-group is ignored (the socket unit's "
                         "SocketGroup= applies)")
        else:
            assert claim is not None, "the daemon claims --socket before it starts the server"
            bound = bind_claimed(claim)
            sock, self._socket_lock = bound.sock, bound.lock
            self.own_socket = (self.config.socket, bound.inode)
            log.info("listening on %s (mode %04o%s)", self.config.socket,
                     self.config.socket_mode, "" if group is None else f", group {group}")
        sock.setblocking(False)
        fit_descriptor_limit(self.config.max_clients)
        self.acceptor = Acceptor(self.loop, sock, lambda: ClientProtocol(self),
                                 lambda: len(self.protocols), self._turned_away)

    async def serve(self) -> None:
        """Start accepting.  Called after READY=1, so no client is served before it."""
        assert self.acceptor is not None
        self.acceptor.start()

    def acceptor_freed(self) -> None:
        """A connection's descriptor is about to be closed."""
        if self.acceptor is not None:
            self.acceptor.descriptor_freed()

    async def stop(self) -> None:
        """The drain: see the module's docstring."""
        log.info("stopping: closing the socket and %d client(s)", len(self.protocols))
        if self.acceptor is not None:
            await self.acceptor.close()  # connections accepted already get served too
        self.timeouts.stop()
        self.draining = True
        for protocol in list(self.protocols.values()):
            protocol.stop_reading()
            self.runnable(protocol)
        await drain(self.loop, self.core, self.protocols, self._all_gone, self._give_up_on_qemu)
        # What is still with QEMU belongs to clients the drain dropped: give up on it.
        for task in self._forwarding:
            task.cancel()
        if self._forwarding:
            await asyncio.wait(set(self._forwarding))
        # Those dropped still had what they sent run: its changes go to disk too.
        await self._commits_done()
        if self._timer is not None:
            self._timer.cancel()
        if self._disk is not None:
            self._disk.stop()
        self.remove_own_socket()

    def remove_own_socket(self) -> None:
        """Remove the socket we bound, then give up its lock (never the other way round)."""
        if self.own_socket is None:
            return
        path, inode = self.own_socket
        with contextlib.suppress(FileNotFoundError):
            # Only our own: another daemon may have replaced it in the meantime.
            if os.lstat(path).st_ino == inode:
                path.unlink()
        if self._socket_lock is not None:
            self._socket_lock.release()

    async def reload(self) -> None:
        await self.notifier.reloading()
        try:
            fresh = build(self.cli)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        except Exception:
            # A bug: said, and systemd still hears READY=1 (not stuck reloading).
            log.exception("reload failed, keeping the running configuration")
        else:
            # own_socket is None: serving the socket systemd passed.
            reload = plan(self.config, fresh, socket_passed=self.own_socket is None)
            self.config = reload.config
            self.core.configure(self.config.limits)
            self.core.admission.max_clients = self.config.max_clients
            self.core.admission.max_clients_per_uid = self.config.max_clients_per_uid
            self.timeouts.configure(negotiation=self.config.negotiation_timeout,
                                    idle=self.config.idle_timeout)
            if "max_clients" in reload.changed:
                fit_descriptor_limit(self.config.max_clients)
            # Also re-reads the user and group databases; open connections get
            # their new role at their next request.
            self.core.configure_access(self.config.access, self.config.quotas)
            logging.getLogger().setLevel(self.config.logging_level)
            for level, line in reload.messages():
                log.log(level, "%s", line)
            # Not applied now, so not seen now: said before a restart finds out.  On a
            # thread: resolving a metrics host name may wait for DNS.
            found = await asyncio.to_thread(problems, fresh,
                                            socket_passed=self.own_socket is None,
                                            as_daemon=True, keys=reload.restart_only) \
                if reload.restart_only else []
            for key, why in found:
                log.warning("reload: with %s as the file now sets it, the next start "
                            "would fail: %s", key, why)
        await self.notifier.ready(self.status_line())


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sd_notify failed: %s", task.exception())


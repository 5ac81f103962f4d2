"""The asyncio adapter: a Unix socket, bytes in and out of the core, timers, systemd.

Everything protocol- or blocker-shaped lives in :class:`migblockd.core.Core`;
this module only moves bytes, decides when to read and when to run requests,
arms the simulated migration's timer, and owns the order of start-up and
shutdown.

Turns: received bytes are buffered at once, but requests run in a *turn*, one
callback per event-loop iteration that serves every connection with pending
requests (at most ``BATCH`` of each, so clients take turns) and then writes
each connection's output once.  A connection's requests run only while its
transport buffer is below ``HIGH_WATER``; past it, or while requests are still
pending, we stop reading from it, so a client that does not read its replies
holds at most one read's worth of unexecuted input and nothing is ever
dropped.  Events still reach such a client until its unread events pass
``max_output``; then it alone is disconnected, and what it sent before that
still takes effect (:meth:`ClientProtocol.drop`).

Shutdown is a drain (:meth:`Server.stop`): no more reading, every request
already read runs in turns as usual and is answered, nobody is dropped for
``max_output`` meanwhile, and each connection closes once its replies are
written (:mod:`migblockd.drain` says how long that may take).  Accepting
(:mod:`migblockd.accept`) and the timeouts for unfinished business
(:mod:`migblockd.timeouts`) have modules of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from migblockd.accept import Acceptor, fit_descriptor_limit
from migblockd.access import group_id
from migblockd.config import RELOADABLE, Config, ConfigError, build
from migblockd.connection import Connection
from migblockd.core import Core, Group
from migblockd.drain import drain
from migblockd.gate import QemuUnavailable
from migblockd.listen import SocketLock, StartupError, bind_socket
from migblockd.logs import WIRE_LIMIT, about, shown
from migblockd.outbox import HIGH_WATER, Outbox
from migblockd.peer import leftovers, peer_owner, unread
from migblockd.registry import Change
from migblockd.systemd import Notifier, format_status
from migblockd.timeouts import Timeouts

log = logging.getLogger("migblockd")

#: Requests of one connection run per turn: large enough to batch pipelined
#: requests into one write, small enough to let other clients take turns.
BATCH = 32
#: How long a connection we half-closed may go on sending before we close it.
LINGER = 2.0


class ClientProtocol(asyncio.Protocol):
    """The transport of one connection, and when to read from it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = server.core
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_paused = False
        self.eof = False  # no more reading: the peer half-closed, or we stop reading
        self.peer_eof = False
        self.dropped = False
        self.lingering = False  # half-closed by us: what still comes is discarded
        self.connected_at = 0.0
        #: Since when the peer has left a message unfinished (see migblockd.timeouts).
        self.unfinished_since: float | None = None
        self.outbox: Outbox | None = None

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.connected_at = self.server.loop.time()
        self.conn = conn = self.core.connect(peer_owner(transport))
        if conn.refused:
            transport.write(self.core.data_to_send(conn))
            transport.close()
            self.conn = None
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.outbox = Outbox(transport)
        self.server.protocols[conn] = self
        self.server.timeouts.watch()
        self.server.schedule()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.lingering:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", conn.label, shown(data, WIRE_LIMIT))
        core = self.core
        core.receive_data(conn, data)
        if core.has_pending(conn) or not conn.session.buffered:
            self.unfinished_since = None  # a message is complete: the peer made progress
        elif self.unfinished_since is None:
            self.unfinished_since = self.server.loop.time()
        self.server.runnable(self)

    def eof_received(self) -> bool:
        if self.conn is None or self.lingering:
            return False  # asyncio closes the transport
        self.eof = self.peer_eof = True
        self.core.receive_eof(self.conn)
        self.server.runnable(self)
        # Keep the transport open: replies to what came before EOF still go out.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.acceptor_freed()
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if (exc is not None or self.dropped) and not self.lingering:
            # The peer hung up (a write failed), or we dropped it: what it sent
            # before may still sit unread in the socket, and takes effect all the same.
            self.read_leftovers(conn)
        self.server.protocols.pop(conn, None)
        self.core.disconnect(conn, str(exc) if exc is not None else "")
        self.core.data_to_send(conn)
        self.server.schedule()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.outbox is not None and self.outbox.waiting:
            self.outbox.write_some()
            if self.outbox.waiting or self.write_paused:
                return  # more when the client has read more
            self.flush()  # closes a half-closed client once all is out
        self.server.runnable(self)

    # -- ours ------------------------------------------------------------------
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

    def drop(self, why: str) -> None:
        """Disconnect the peer now.  Everything it sent before runs all the same
        (see :meth:`connection_lost`); only the replies are lost."""
        if self.conn is None or self.transport is None or self.dropped:
            return
        log.warning("%s: dropped: %s", self.conn.label, why, extra=about(self.conn))
        self.core.stats.dropped += 1
        self.dropped = True
        self.transport.abort()

    def expel(self, reason: str) -> None:
        """Close the connection for ``reason`` (a timeout), with a line saying why."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        self.core.expel(conn, reason)
        self.stop_reading()
        self.server.runnable(self)

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
        if self.outbox is not None and self.outbox.waiting:
            return False  # resume_writing comes back once its output has gone
        if core.has_pending(conn) and not self.write_paused:
            core.execute(conn, BATCH)
        if core.has_pending(conn):
            if not self.read_paused:
                transport.pause_reading()
                self.read_paused = True
            # A paused writer is woken by resume_writing, a blocked one by its commit.
            return not self.write_paused and not core.blocked(conn)
        if self.read_paused and not self.eof:
            transport.resume_reading()
            self.read_paused = False
        return False

    def flush(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        pieces, events = self.core.take_output(conn)
        if transport.is_closing() or self.lingering or self.outbox is None:
            return  # after our EOF (a timeout, shutdown) nothing more is said
        if pieces:
            if log.isEnabledFor(logging.DEBUG):
                for piece in pieces:
                    log.debug("%s -> %s", conn.label, shown(piece, WIRE_LIMIT))
            limit = self.server.config.max_output
            # While draining nobody is dropped for it: they are owed these replies.
            if self.outbox.put(pieces, events) > limit and not self.server.draining:
                self.drop(f"more than max-output={limit} bytes of unread events")
                return
        if self.eof and self.core.settled(conn) and not self.outbox.waiting:
            self.finish()

    def finish(self) -> None:
        """Everything read is answered: end the connection.

        A peer that half-closed already is simply closed.  Otherwise (shutdown,
        a timeout) it may still be sending, and closing a Unix socket with
        unread input resets the connection, which can cost the peer the replies
        it has not read yet.  So we half-close instead (EOF after the last
        reply), discard what still comes (it was never read, so it never ran),
        and close when the peer does, or after ``LINGER`` seconds.
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
        self.server.loop.call_later(LINGER, self.linger_over)

    def linger_over(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def progress(self) -> tuple[int, int, bool]:
        """What changes while the peer takes its output (for the shutdown drain)."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return (0, 0, False)
        return (transport.get_write_buffer_size(), conn.session.buffered,
                self.core.has_pending(conn))


Commit = Callable[[list[Change]], None]
#: Runs one command on the gated QEMU: its return value, or QemuError /
#: QemuUnavailable (migblockd.gate) raised.
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
        self.commit = commit
        self.forward = forward
        self._forwarding: set[asyncio.Task[None]] = set()
        self._disk = concurrent.futures.ThreadPoolExecutor(1, "migblockd-commit")
        self._group: Group | None = None
        self._group_started = 0  # perf_counter_ns() when the group went to the disk thread
        self._committing = asyncio.Event()
        self.protocols: dict[Connection, ClientProtocol] = {}
        self.acceptor: Acceptor | None = None
        self.own_socket: tuple[Path, int] | None = None  # path and inode we created
        self._socket_lock: SocketLock | None = None
        self.loop = asyncio.get_running_loop()
        self.timeouts = Timeouts(self.loop, core, self.protocols.values,
                                 negotiation=config.negotiation_timeout,
                                 idle=config.idle_timeout)
        self.draining = False
        self._runnable: dict[ClientProtocol, None] = {}  # an ordered set
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._status: tuple[int, int, str, str | None] | None = None
        self._all_gone = asyncio.Event()

    # -- turns -------------------------------------------------------------------
    def runnable(self, protocol: ClientProtocol) -> None:
        self._runnable[protocol] = None
        self.schedule()

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
        if self.commit is not None and self._group is None:
            self._start_commit()
        if self.forward is not None:
            for conn, call in self.core.take_calls():
                task = self.loop.create_task(self._call(conn, call.name, call.args))
                self._forwarding.add(task)
                task.add_done_callback(self._forwarding.discard)
        for conn in self.core.take_dirty():
            protocol = protocols.get(conn)
            if protocol is not None:
                protocol.flush()
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

    # -- group commit ------------------------------------------------------------
    def _start_commit(self) -> None:
        assert self.commit is not None
        group = self._group = self.core.take_group()
        if group is None:
            return
        self._group_started = time.perf_counter_ns()
        future = self.loop.run_in_executor(self._disk, self.commit, group.changes)
        future.add_done_callback(self._commit_done)

    def _commit_done(self, future: asyncio.Future[None]) -> None:
        group, self._group = self._group, None
        assert group is not None
        exc = future.exception()
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
        while self.commit is not None and self.core.has_uncommitted():
            if self._group is None:
                self._start_commit()
            self._committing.clear()
            await self._committing.wait()

    def _arm_timer(self) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_deadline:
            return
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
        status = self.core.status()
        if status == self._status or not self.notifier.active:
            return
        self._status = status
        task = self.loop.create_task(self.notifier.status(format_status(*status)))
        task.add_done_callback(_log_task_failure)

    # -- life cycle ----------------------------------------------------------------
    async def start(self, sock: socket.socket | None) -> None:
        """Bind (or take the socket systemd passed) without accepting yet: see serve()."""
        group = self.config.socket_group
        if sock is not None:
            log.info("socket activation: serving the passed socket %s", sock.getsockname())
            if group is not None:
                log.info("socket activation: --socket-group is ignored (the socket unit's "
                         "SocketGroup= applies)")
        else:
            gid = None
            if group is not None:
                gid = group_id(group)
                if gid is None:
                    raise StartupError(f"--socket-group: there is no group named {group!r}")
            bound = bind_socket(self.config.socket, self.config.socket_mode, gid)
            sock, self._socket_lock = bound.sock, bound.lock
            self.own_socket = (self.config.socket, bound.inode)
            log.info("listening on %s (mode %04o%s)", self.config.socket,
                     self.config.socket_mode, "" if group is None else f", group {group}")
        sock.setblocking(False)
        fit_descriptor_limit(self.config.max_clients)
        self.acceptor = Acceptor(self.loop, sock, lambda: ClientProtocol(self),
                                 lambda: len(self.protocols))

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
        await drain(self.loop, self.core, self.protocols, self._all_gone)
        # What is still with QEMU belongs to clients the drain dropped: give up on it.
        for task in self._forwarding:
            task.cancel()
        if self._forwarding:
            await asyncio.wait(set(self._forwarding))
        # Those dropped still had what they sent run: its changes go to disk too.
        await self._commits_done()
        if self._timer is not None:
            self._timer.cancel()
        self._disk.shutdown(wait=True)
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
        else:
            changes = {k: getattr(fresh, k) for k in RELOADABLE
                       if getattr(fresh, k) != getattr(self.config, k)}
            self.config = self.config.replace(**changes)
            self.core.limits = self.config.limits
            self.core.admission.max_clients = self.config.max_clients
            self.core.admission.max_clients_per_uid = self.config.max_clients_per_uid
            self.timeouts.configure(negotiation=self.config.negotiation_timeout,
                                    idle=self.config.idle_timeout)
            if "max_clients" in changes:
                fit_descriptor_limit(self.config.max_clients)
            # Also re-reads the user and group databases; open connections get
            # their new role at their next request.
            self.core.guard.configure(self.config.access, self.config.quotas,
                                      self.core.connections)
            logging.getLogger().setLevel(self.config.logging_level)
            described = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in changes.items())
            log.info("reloaded configuration: %s", described or "nothing changed")
        await self.notifier.ready(self.status_line())


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sd_notify failed: %s", task.exception())


def spawn(loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task[None]],
          factory: Callable[[], Any]) -> None:
    """Run ``factory()`` as a task kept alive in ``tasks``."""
    task = loop.create_task(factory())
    tasks.add(task)
    task.add_done_callback(tasks.discard)

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
dropped.  Events still reach such a client until its unread output passes
``max_output``; then it alone is disconnected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migblockd.config import RELOADABLE, Config, ConfigError, build
from migblockd.connection import Connection
from migblockd.core import Core, Group
from migblockd.listen import LISTEN_BACKLOG, SocketLock, bind_socket
from migblockd.registry import Change, Owner
from migblockd.systemd import Notifier, format_status

log = logging.getLogger("migblockd")

#: Requests of one connection run per turn: large enough to batch pipelined
#: requests into one write, small enough to let other clients take turns.
BATCH = 32
#: The transport buffer size at which we stop running a connection's requests.
HIGH_WATER = 64 * 1024
#: How long shutdown waits for clients to take their last replies.
SHUTDOWN_GRACE = 1.5
LEFTOVER_CHUNK = 64 * 1024
#: Bytes of one read or write shown in a debug log line: client input is
#: unbounded (a megabyte id), the log must not be.
WIRE_LOG_LIMIT = 2000

_PEERCRED = struct.Struct("3i")


def wire(data: bytes) -> str:
    """``data`` for a debug log line: escaped, and truncated past WIRE_LOG_LIMIT."""
    if len(data) <= WIRE_LOG_LIMIT:
        return repr(data)
    return f"{data[:WIRE_LOG_LIMIT]!r}... ({len(data)} bytes)"


def peer_owner(transport: asyncio.BaseTransport) -> Owner | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Owner(pid=pid, uid=uid, gid=gid)


class ClientProtocol(asyncio.Protocol):
    """The transport of one connection, and when to read from it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = server.core
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_paused = False
        self.eof = False

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn = conn = self.core.connect(peer_owner(transport))
        if conn.refused:
            transport.write(self.core.data_to_send(conn))
            transport.close()
            self.conn = None
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.server.protocols[conn] = self
        self.server.schedule()

    def data_received(self, data: bytes) -> None:
        if self.conn is None:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", self.conn.label, wire(data))
        self.core.receive_data(self.conn, data)
        self.server.runnable(self)

    def eof_received(self) -> bool:
        if self.conn is None:
            return False
        self.eof = True
        self.core.receive_eof(self.conn)
        self.server.runnable(self)
        # Keep the transport open: replies to what came before EOF still go out.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if exc is not None:
            # A write failed (the peer hung up): what it sent before hanging up
            # may still sit unread in the socket, and must take effect all the same.
            self.read_leftovers(conn)
        self.server.protocols.pop(conn, None)
        self.core.disconnect(conn, str(exc) if exc is not None else "")
        self.core.data_to_send(conn)
        self.server.schedule()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.server.runnable(self)

    # -- ours ------------------------------------------------------------------
    def read_leftovers(self, conn: Connection) -> None:
        """Read what is left in the socket of a connection asyncio has given up on.

        asyncio calls ``connection_lost`` before closing the socket, so the data
        is still there; a duplicate descriptor reads it without disturbing the
        transport.  Bounded, so a peer cannot keep us here.
        """
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with dup:
            dup.setblocking(False)
            budget = self.server.config.max_message_size + LEFTOVER_CHUNK
            while budget > 0:
                try:
                    data = dup.recv(LEFTOVER_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                budget -= len(data)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s <- %s (after the connection broke)", conn.label, wire(data))
                self.core.receive_data(conn, data)

    def pump(self) -> bool:
        """This connection's turn; True when it wants another one."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return False
        core = self.core
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
        data = self.core.data_to_send(conn)
        if transport.is_closing():
            return
        if data:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> %s", conn.label, wire(data))
            # Only output written earlier counts as unread: the client cannot have
            # read this write yet, however promptly it reads (one reply may be large).
            unread = transport.get_write_buffer_size()
            transport.write(data)
            if unread > self.server.config.max_output:
                log.warning("%s: dropped: more than max-output=%d bytes of unread output",
                            conn.label, self.server.config.max_output)
                transport.abort()
                return
        if self.eof and self.core.settled(conn):
            transport.close()


Commit = Callable[[list[Change]], None]


class Server:
    """The listening socket, its connections' transports, and the turn scheduler.

    ``commit`` writes a group of changes durably (blocking: it runs on a worker
    thread, one group at a time, so the loop keeps serving meanwhile); it
    raises an exception whose ``str()`` says why when it cannot.
    """

    def __init__(self, config: Config, cli: dict[str, Any], core: Core,
                 notifier: Notifier, commit: Commit | None = None) -> None:
        self.config = config
        self.cli = cli
        self.core = core
        self.notifier = notifier
        self.commit = commit
        self._disk = concurrent.futures.ThreadPoolExecutor(1, "migblockd-commit")
        self._group: Group | None = None
        self._committing = asyncio.Event()
        self.protocols: dict[Connection, ClientProtocol] = {}
        self.listener: asyncio.Server | None = None
        self.own_socket: tuple[Path, int] | None = None  # path and inode we created
        self._socket_lock: SocketLock | None = None
        self._loop = asyncio.get_running_loop()
        self._runnable: dict[ClientProtocol, None] = {}  # an ordered set
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._status: tuple[int, int, str] | None = None
        self._all_gone = asyncio.Event()

    # -- turns -------------------------------------------------------------------
    def runnable(self, protocol: ClientProtocol) -> None:
        self._runnable[protocol] = None
        self.schedule()

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._turn)

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

    # -- group commit ------------------------------------------------------------
    def _start_commit(self) -> None:
        assert self.commit is not None
        group = self._group = self.core.take_group()
        if group is None:
            return
        future = self._loop.run_in_executor(self._disk, self.commit, group.changes)
        future.add_done_callback(self._commit_done)

    def _commit_done(self, future: asyncio.Future[None]) -> None:
        group, self._group = self._group, None
        assert group is not None
        exc = future.exception()
        if exc is None:
            woken = self.core.committed(group)
        else:
            woken = self.core.commit_failed(group, str(exc))
        for conn in woken:
            protocol = self.protocols.get(conn)
            if protocol is not None:
                self._runnable[protocol] = None
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
            self._timer = self._loop.call_later(delay, self._tick)

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
        task = self._loop.create_task(self.notifier.status(format_status(*status)))
        task.add_done_callback(_log_task_failure)

    # -- life cycle ----------------------------------------------------------------
    async def start(self, sock: socket.socket | None) -> None:
        """Bind (or take the socket systemd passed) without accepting yet: see serve()."""
        if sock is not None:
            log.info("socket activation: serving the passed socket %s", sock.getsockname())
        else:
            bound = bind_socket(self.config.socket, self.config.socket_mode)
            sock, self._socket_lock = bound.sock, bound.lock
            self.own_socket = (self.config.socket, bound.inode)
            log.info("listening on %s (mode %04o)", self.config.socket, self.config.socket_mode)
        extra: dict[str, Any] = {}
        if sys.version_info >= (3, 13):
            # We remove our own socket ourselves, and never a passed one.
            extra["cleanup_socket"] = False
        self.listener = await self._loop.create_unix_server(
            lambda: ClientProtocol(self), sock=sock, backlog=LISTEN_BACKLOG,
            start_serving=False, **extra,
        )

    async def serve(self) -> None:
        """Start accepting.  Called after READY=1, so no client is served before it."""
        assert self.listener is not None
        await self.listener.start_serving()

    async def stop(self) -> None:
        log.info("stopping: closing the socket and %d client(s)", len(self.protocols))
        if self.listener is not None:
            self.listener.close()
        # Everything received is answered (after its commit), then each
        # connection closes once its replies are written.
        core = self.core
        for protocol in self.protocols.values():
            protocol.eof = True
            if protocol.transport is not None and not protocol.transport.is_closing():
                protocol.transport.pause_reading()
        while True:
            for conn in list(self.protocols):
                while core.execute(conn, BATCH):
                    pass
            self._flush()
            if not core.has_uncommitted():
                break
            await self._commits_done()
        for protocol in list(self.protocols.values()):
            protocol.flush()
            if protocol.transport is not None and not protocol.transport.is_closing():
                protocol.transport.close()
        if self.protocols:
            try:
                await asyncio.wait_for(self._all_gone.wait(), SHUTDOWN_GRACE)
            except TimeoutError:
                log.warning("%d client(s) did not take their last replies; dropping them",
                            len(self.protocols))
                for protocol in list(self.protocols.values()):
                    if protocol.transport is not None:
                        protocol.transport.abort()
                await asyncio.sleep(0)
        # From Python 3.12 on wait_closed() also waits for the connections, which
        # is why they were closed first.
        if self.listener is not None:
            await self.listener.wait_closed()
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
            self.core.max_clients = self.config.max_clients
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

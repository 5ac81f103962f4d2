"""The asyncio adapter: a Unix socket, one QMP session per connection.

Everything protocol-shaped lives in ``migblockd.qmp`` and everything about
blockers in ``migblockd.registry``; this module only moves bytes, decides when
to read, and owns the order of start-up and shutdown.

Flow control: a request is executed only while the client's transport buffer
is below its high-water mark, and at most ``BATCH`` of one client's requests
run per event-loop iteration, so clients take turns.  Past it we stop executing *and* stop reading,
so a client that does not read its replies holds at most one read's worth of
unexecuted input and nothing is ever dropped.  Events still reach such a client
until its unread output passes ``max_output``; then it alone is disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migblockd import __version__
from migblockd.commands import Handlers, version_info
from migblockd.config import RELOADABLE, Config, ConfigError, build
from migblockd.contract import Contract
from migblockd.qapi.error import QAPIError
from migblockd.qmp.session import Command, Session
from migblockd.registry import BlockerError, Owner, Registry
from migblockd.systemd import ActivationError, Notifier, activated_listener, format_status

log = logging.getLogger("migblockd")

#: Requests executed between two flushes: large enough to batch pipelined
#: requests into one write, small enough to notice a full buffer quickly.
BATCH = 32
#: The transport buffer size at which we stop executing a client's requests.
HIGH_WATER = 64 * 1024
#: How long shutdown waits for clients to take their last replies.
SHUTDOWN_GRACE = 1.5
LISTEN_BACKLOG = 1024
LEFTOVER_CHUNK = 64 * 1024

_PEERCRED = struct.Struct("3i")


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one-line reason for the log."""


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


class Connection(asyncio.Protocol):
    """One client.  Also the ``context`` of its session and the owner key of its blockers."""

    def __init__(self, daemon: Daemon, number: int) -> None:
        self.daemon = daemon
        self.number = number
        self.owner: Owner | None = None
        self.label = f"client {number}"
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.write_paused = False
        self.read_paused = False
        self.pump_scheduled = False
        self.eof = False

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner = peer_owner(transport)
        if self.owner is not None:
            self.label = (
                f"client {self.number} (pid {self.owner.pid}, uid {self.owner.uid}, "
                f"gid {self.owner.gid})"
            )
        daemon = self.daemon
        if len(daemon.connections) >= daemon.config.max_clients:
            log.warning("%s: refused: already serving max-clients=%d clients",
                        self.label, daemon.config.max_clients)
            transport.abort()
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self.session = Session(
            daemon.commands, daemon.greeting, daemon.config.limits, context=self,
            domain_errors=(BlockerError,), on_internal_error=_log_internal_error,
        )
        daemon.connected(self)
        log.info("%s connected", self.label)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %r", self.label, data)
        self.session.receive_data(data)
        self.pump()

    def eof_received(self) -> bool:
        if self.session is None:
            return False
        self.eof = True
        self.session.receive_eof()
        self.pump()
        # Keep the transport open: replies to what came before EOF still go out.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        session = self.session
        if session is None:
            return
        if exc is not None:
            # A write failed (the peer hung up): what it sent before hanging up
            # may still sit unread in the socket, and must take effect all the same.
            self.read_leftovers()
        # Whatever was received is executed, even when the answers cannot be delivered.
        while session.has_pending():
            session.execute(BATCH)
        session.data_to_send()
        reason = f": {exc}" if exc is not None else ""
        log.info("%s disconnected%s", self.label, reason)
        self.daemon.disconnected(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.pump()

    # -- ours ------------------------------------------------------------------
    def read_leftovers(self) -> None:
        """Read what is left in the socket of a connection asyncio has given up on.

        asyncio calls ``connection_lost`` before closing the socket, so the data
        is still there; a duplicate descriptor reads it without disturbing the
        transport.  Bounded, so a peer cannot keep us here.
        """
        assert self.session is not None and self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return
        with dup:
            dup.setblocking(False)
            budget = self.daemon.config.max_message_size + LEFTOVER_CHUNK
            while budget > 0:
                try:
                    data = dup.recv(LEFTOVER_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                budget -= len(data)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s <- %r (after the connection broke)", self.label, data)
                self.session.receive_data(data)

    def pump(self) -> None:
        """Execute a batch of what is pending, if the client keeps up with its replies.

        One batch per event-loop iteration: a client that pipelines a lot is
        served in turns with everyone else instead of holding the loop.
        """
        session, transport = self.session, self.transport
        assert session is not None and transport is not None
        self.pump_scheduled = False
        if session.has_pending() and not self.write_paused and not transport.is_closing():
            session.execute(BATCH)
            self.flush()
        if session.has_pending() and not transport.is_closing():
            if not self.read_paused:
                transport.pause_reading()
                self.read_paused = True
            if not self.write_paused and not self.pump_scheduled:
                self.pump_scheduled = True
                asyncio.get_running_loop().call_soon(self.pump)
            return
        if self.read_paused and not self.eof:
            transport.resume_reading()
            self.read_paused = False
        if self.eof and not transport.is_closing():
            transport.close()

    def flush(self) -> None:
        assert self.session is not None and self.transport is not None
        data = self.session.data_to_send()
        if not data or self.transport.is_closing():
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %r", self.label, data)
        # Only output written earlier counts as unread: the client cannot have
        # read this write yet, however promptly it reads (one reply may be large).
        unread = self.transport.get_write_buffer_size()
        self.transport.write(data)
        if unread > self.daemon.config.max_output:
            log.warning("%s: dropped: more than max-output=%d bytes of unread output",
                        self.label, self.daemon.config.max_output)
            self.transport.abort()

    def deliver(self, line: bytes) -> None:
        """An event for this client (the session drops it before negotiation).

        Queued in the session, so it still precedes the reply of the command
        that caused it; written by the daemon's next batched flush, so that a
        command costs each client one write, not one per event.
        """
        assert self.session is not None
        self.session.send_event(line)
        self.daemon.flush_later(self)

    def finish(self) -> None:
        """Shutdown: answer everything received, then close once the replies are out."""
        if self.session is None or self.transport is None or self.transport.is_closing():
            return
        while self.session.has_pending():
            self.session.execute(BATCH)
            self.flush()
        self.transport.close()


class Daemon:
    """The registry, its connections, and the listening sockets."""

    def __init__(self, config: Config, cli: dict[str, Any], contract: Contract,
                 registry: Registry, notifier: Notifier) -> None:
        self.config = config
        self.cli = cli
        self.contract = contract
        self.registry = registry
        self.notifier = notifier
        self.commands: dict[str, Command] = Handlers(contract, registry, self).table()
        self.greeting = {"QMP": {"version": version_info(), "capabilities": ["oob"]}}
        self.connections: dict[Connection, None] = {}  # an ordered set
        self.server: asyncio.Server | None = None
        self.own_socket: tuple[Path, int] | None = None  # path and inode we created
        self._numbers = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._status_pending = False
        self._all_gone = asyncio.Event()
        self._unflushed: dict[Connection, None] = {}  # an ordered set

    # -- connections -----------------------------------------------------------
    def new_connection(self) -> Connection:
        self._numbers += 1
        return Connection(self, self._numbers)

    def connected(self, conn: Connection) -> None:
        self.connections[conn] = None
        self._all_gone.clear()
        self.status_changed()

    def disconnected(self, conn: Connection) -> None:
        self.connections.pop(conn, None)
        released = self.registry.release(conn)
        if released:
            log.info("%s: released %d connection-scoped blocker(s): %s", conn.label,
                     len(released), ", ".join(b.id for b in released))
        self.publish_events()
        self.status_changed()
        if not self.connections:
            self._all_gone.set()

    # -- events and the simulated migration ------------------------------------
    def publish_events(self) -> None:
        """Deliver what the registry has queued to every connection, then re-arm the timer."""
        events = self.registry.take_events()
        if events:
            for event in events:
                line = Session.encode_event(event.name, event.data, event.timestamp)
                for conn in list(self.connections):
                    conn.deliver(line)
                if event.name == "MIGRATION":
                    log.info("migration status: %s", event.data.get("status"))
            self.status_changed()
        self._arm_timer()

    def flush_later(self, conn: Connection) -> None:
        if not self._unflushed:
            asyncio.get_running_loop().call_soon(self._flush_all)
        self._unflushed[conn] = None

    def _flush_all(self) -> None:
        unflushed, self._unflushed = self._unflushed, {}
        for conn in unflushed:
            if conn in self.connections:
                conn.flush()

    def _arm_timer(self) -> None:
        deadline = self.registry.next_deadline()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.registry.clock.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_deadline = None
        self.registry.advance()
        self.publish_events()
        self.status_changed()

    # -- systemd status ----------------------------------------------------------
    def status_line(self) -> str:
        return format_status(len(self.registry), len(self.connections),
                             self.registry.status or "none")

    def status_changed(self) -> None:
        if not self.notifier.active or self._status_pending:
            return
        self._status_pending = True
        asyncio.get_running_loop().call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        task = asyncio.get_running_loop().create_task(self.notifier.status(self.status_line()))
        task.add_done_callback(_log_task_failure)

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Bind (or take the socket systemd passed) without accepting yet: see serve()."""
        loop = asyncio.get_running_loop()
        try:
            sock = activated_listener()
        except ActivationError as exc:
            raise StartupError(f"socket activation: {exc}") from None
        if sock is not None:
            log.info("socket activation: serving the passed socket %s", sock.getsockname())
        else:
            sock = bind_socket(self.config.socket, self.config.socket_mode)
            self.own_socket = (self.config.socket, os.stat(self.config.socket).st_ino)
            log.info("listening on %s (mode %04o)", self.config.socket, self.config.socket_mode)
        extra: dict[str, Any] = {}
        if sys.version_info >= (3, 13):
            # We remove our own socket ourselves, and never a passed one.
            extra["cleanup_socket"] = False
        self.server = await loop.create_unix_server(
            self.new_connection, sock=sock, backlog=LISTEN_BACKLOG, start_serving=False, **extra
        )

    async def serve(self) -> None:
        """Start accepting.  Called after READY=1, so no client is served before it."""
        assert self.server is not None
        await self.server.start_serving()

    async def stop(self) -> None:
        log.info("stopping: closing the socket and %d client(s)", len(self.connections))
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.finish()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_gone.wait(), SHUTDOWN_GRACE)
            except TimeoutError:
                log.warning("%d client(s) did not take their last replies; dropping them",
                            len(self.connections))
                for conn in list(self.connections):
                    if conn.transport is not None:
                        conn.transport.abort()
                await asyncio.sleep(0)
        # From Python 3.12 on wait_closed() also waits for the connections, which
        # is why they were closed first.
        if self.server is not None:
            await self.server.wait_closed()
        if self._timer is not None:
            self._timer.cancel()
        self.remove_own_socket()

    def remove_own_socket(self) -> None:
        if self.own_socket is None:
            return
        path, inode = self.own_socket
        with contextlib.suppress(FileNotFoundError):
            # Only our own: another daemon may have replaced it in the meantime.
            if os.stat(path).st_ino == inode:
                path.unlink()

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
            logging.getLogger().setLevel(self.config.logging_level)
            described = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in changes.items())
            log.info("reloaded configuration: %s", described or "nothing changed")
        await self.notifier.ready(self.status_line())


def _log_internal_error(session: Session, command: str, exc: BaseException) -> None:
    # The client got a generic error; the traceback belongs in the log only.
    label = getattr(session.context, "label", "client")
    log.error("%s: internal error in %s", label, command, exc_info=exc)


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sd_notify failed: %s", task.exception())


def bind_socket(path: Path, mode: int) -> socket.socket:
    """Bind a listening socket at ``path``, refusing to steal one a live daemon serves."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {path.parent}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        if _answers(path):
            raise StartupError(
                f"another daemon is already listening on {path}; refusing to take over "
                "a live socket (stop it first, or choose another --socket)"
            )
        log.info("removing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket must never exist with wider permissions than asked, even briefly.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    # Listening at once: a client (or a second daemon probing) that comes before
    # we accept waits in the backlog instead of finding a "stale" socket.
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # unsure (a full backlog, a timeout): do not steal it
    finally:
        probe.close()
    return True


async def run(config: Config, cli: dict[str, Any]) -> None:
    """Start, serve until SIGTERM/SIGINT, stop.  Raises StartupError when it cannot start."""
    try:
        contract = Contract.load(config.schema)
    except QAPIError as exc:
        raise StartupError(f"bad schema: {exc}") from None
    except OSError as exc:
        raise StartupError(f"cannot read the schema: {exc}") from None
    registry = Registry(
        contract.enums["MigMode"],
        only_migratable=config.only_migratable,
        migration_time=config.migration_time,
    )
    notifier = await Notifier.open()
    daemon = Daemon(config, cli, contract, registry, notifier)
    try:
        await daemon.start()
    except BaseException:
        await notifier.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(factory: Callable[[], Any]) -> None:
        task = loop.create_task(factory())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_stop(signame: str) -> None:
        if not stop.is_set():
            log.info("received %s", signame)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, spawn, daemon.reload)
    await notifier.ready(daemon.status_line())
    await daemon.serve()
    where = "the passed socket" if daemon.own_socket is None else str(config.socket)
    log.info("migblockd %s ready on %s (only-migratable %s, migration-time %gs)",
             __version__, where,
             "on" if config.only_migratable else "off", config.migration_time)
    notifier.start_watchdog()
    try:
        await stop.wait()
    finally:
        await notifier.stopping()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.stop()
        for task in tasks:
            task.cancel()
        await notifier.close()
        log.info("stopped")

"""The asyncio side: the listening socket, its connections, start-up, reload and shutdown.

Everything protocol- or blocker-shaped lives in :class:`migblockd.core.Core`;
each connection's transport is a :class:`migblockd.adapter.ClientProtocol`.
:class:`Server` binds the socket (or takes the one systemd passed) and owns
the order of start-up and shutdown; when requests run, and how the core's
groups of changes reach the disk thread and its calls the gated QEMU, is its
base class's (:class:`migblockd.turns.Turns`), and a reload is its other's
(:class:`migblockd.reloads.Reloads`).

Shutdown is a drain (:meth:`Server.stop`): no more reading, every request
already read runs in turns as usual and is answered, nobody is dropped for
``max_output`` meanwhile, and each connection closes once its replies are
written (:mod:`migblockd.drain` says how long that may take).  Accepting
(:mod:`migblockd.accept`) and the timeouts for unfinished business
(:mod:`migblockd.timeouts`) have modules of their own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migblockd.accept import Acceptor, fit_descriptor_limit
from migblockd.adapter import ClientProtocol, read_buffer
from migblockd.admitting import Admitting
from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.core import Core, Status
from migblockd.disk import DiskThread
from migblockd.drain import drain
from migblockd.ledger import Group
from migblockd.listen import Claim, bind_claimed, file_access, open_to_everyone, unbind
from migblockd.notify import Notifier
from migblockd.pidlock import PidLock
from migblockd.preflight import passed_name, passed_path
from migblockd.preflight_notes import ignored
from migblockd.registry import Change
from migblockd.reload_order import ReloadOrder
from migblockd.reloads import Reloads
from migblockd.settings_file import FileSettings
from migblockd.sources import Sources
from migblockd.timeouts import Timeouts
from migblockd.turns import Forward, Turns

__all__ = ["Commit", "Forward", "Server"]

log = logging.getLogger("migblockd")

Commit = Callable[[list[Change]], None]


class Server(Turns, Reloads):
    """The listening socket, its connections' transports, and the turn scheduler.

    ``commit`` writes a group of changes durably (blocking: it runs on a worker
    thread, one group at a time, so the loop keeps serving meanwhile); it
    raises an exception whose ``str()`` says why when it cannot.  ``forward``
    sends a suspended request's call to the gated QEMU.
    """

    def __init__(self, config: Config, cli: dict[str, Any], core: Core,
                 notifier: Notifier, commit: Commit | None = None,
                 forward: Forward | None = None, *,
                 file: FileSettings | None = None) -> None:
        self.config = config
        self.cli = cli
        #: What the configuration file set when last read (``config.read_settings``):
        #: a reload compares it to say which edits the command line outvotes.
        self.file: FileSettings | None = file
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
        self.passed: Path | None = None  # where the socket systemd passed is
        self._socket_lock: PidLock | None = None
        self.loop = asyncio.get_running_loop()
        self._disk: DiskThread[list[Change]] | None = None
        if commit is not None:
            self._disk = DiskThread(self.loop, commit, self._commit_done)
        self.timeouts = Timeouts(self.loop, core, self.protocols.values,
                                 negotiation=config.negotiation_timeout,
                                 idle=config.idle_timeout)
        #: Shutdown has begun: nobody is dropped for --max-output any more.
        self.draining = False
        self._runnable: dict[ClientProtocol, None] = {}  # an ordered set
        self.losing: set[ClientProtocol] = set()
        #: Connections waiting for their role's look-up (migblockd.judge), not served yet.
        self.judging: dict[Admitting, None] = {}
        #: How many of them each uid has, counted as its per-uid limits are.
        self.judging_per_uid: Counter[int | None] = Counter()
        #: The uids and gids whose role is looked up for a client turned away from the
        #: slots kept for admins (migblockd.admitting), so that it is known at a retry.
        self.learning: set[tuple[int, int]] = set()
        #: Connections turned away that linger until their peer closes, by peer uid
        #: (adapter.py).
        self.refusals_lingering: Counter[int | None] = Counter()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._order = ReloadOrder(self.loop)
        self._timer_deadline: float | None = None
        self._status: tuple[Status, str | None] | None = None
        self._all_gone = asyncio.Event()

    def _turned_away(self) -> None:
        # Accepted (with the reserve descriptor) and told why, as a connection
        # turned away at max-clients is: counted among the connections too.
        self.core.stats.connections += 1
        self.core.stats.connections_refused["descriptors"] += 1

    # -- life cycle ----------------------------------------------------------------
    async def start(self, sock: socket.socket | None, claim: Claim | None) -> None:
        """Bind ``claim`` (or take the socket systemd passed) without accepting yet:
        see serve()."""
        group = self.config.socket_group
        if sock is not None:
            self.passed = passed_path(sock)
            log.info("socket activation: serving the passed socket %s%s", passed_name(sock),
                     "" if self.passed is None else file_access(self.passed))
            if self.passed is None:  # abstract: no file whose mode keeps anyone out
                log.warning("%s", open_to_everyone(passed_name(sock),
                                                   self.config.access.default_role))
            for note in ignored(self.config, socket_passed=True,
                                sources=Sources.of(self.cli, self.file)):
                log.info("%s", note)
        else:
            assert claim is not None, "the daemon claims --socket before it starts the server"
            with Sources.of(self.cli, self.file).locating("socket"):
                bound = bind_claimed(claim)
            sock, self._socket_lock = bound.sock, bound.lock
            self.own_socket = (self.config.socket, bound.inode)
            log.info("listening on %s (mode %04o%s)", self.config.socket,
                     self.config.socket_mode, "" if group is None else f", group {group}")
        sock.setblocking(False)
        self.core.admission.room = fit_descriptor_limit(
            self.config.max_clients,
            setting=Sources.of(self.cli, self.file).named("max_clients"))
        self.acceptor = Acceptor(self.loop, sock, lambda: ClientProtocol(self),
                                 lambda: len(self.protocols), self._turned_away)

    async def serve(self) -> None:
        """Start accepting.  Called after READY=1, so no client is served before it."""
        assert self.acceptor is not None
        self.acceptor.start()

    def acceptor_arrived(self, protocol: ClientProtocol) -> None:
        """``protocol``'s connection_made has come."""
        if self.acceptor is not None:
            self.acceptor.arrived(protocol)

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
        for waiting in list(self.judging):
            # Never greeted, nothing of theirs run: closed (their look-up may never end).
            if waiting.transport is not None:
                waiting.transport.abort()
        for protocol in list(self.protocols.values()):
            protocol.stop_reading()
            self.runnable(protocol)
        await drain(self.loop, self.core, self.protocols, self._all_gone, self._give_up_on_qemu)
        while True:
            # What is still with QEMU belongs to clients the drain dropped: give up on it.
            for task in self._forwarding:
                task.cancel()
            if self._forwarding:
                await asyncio.wait(set(self._forwarding))
            # Those dropped still have what they sent run, a turn's worth each turn
            # (their last reads wait for commits): its changes go to disk too.
            await self._commits_done()
            if not self.core.finishing and not self._forwarding:
                break
            self.schedule()
            await asyncio.sleep(0)  # the turn runs their next batch
        if self._timer is not None:
            self._timer.cancel()
        if self._disk is not None:
            self._disk.stop()
        self.remove_own_socket()

    def remove_own_socket(self) -> None:
        """Remove the socket we bound, then give up its lock (never the other way round)."""
        if self.own_socket is None:
            return
        unbind(*self.own_socket)
        if self._socket_lock is not None:
            self._socket_lock.release()

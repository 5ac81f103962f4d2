"""The asyncio side: the listening socket, its connections, start-up, reload and shutdown.

Everything protocol- or blocker-shaped lives in :class:`migblockd.core.Core`;
each connection's transport is a :class:`migblockd.adapter.ClientProtocol`.
:class:`Server` binds the socket (or takes the one systemd passed), applies a
reload, and owns the order of start-up and shutdown; when requests run, and
how the core's groups of changes reach the disk thread and its calls the
gated QEMU, is its base class's (:class:`migblockd.turns.Turns`).

Shutdown is a drain (:meth:`Server.stop`): no more reading, every request
already read runs in turns as usual and is answered, nobody is dropped for
``max_output`` meanwhile, and each connection closes once its replies are
written (:mod:`migblockd.drain` says how long that may take).  Accepting
(:mod:`migblockd.accept`) and the timeouts for unfinished business
(:mod:`migblockd.timeouts`) have modules of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migblockd import reload_record
from migblockd.accept import Acceptor, fit_descriptor_limit
from migblockd.adapter import ClientProtocol, read_buffer
from migblockd.admitting import Admitting
from migblockd.config import Config, ConfigError, build, read_settings
from migblockd.connection import Connection
from migblockd.core import Core, Status
from migblockd.detached import NoThread, detached
from migblockd.disk import DiskThread
from migblockd.drain import drain
from migblockd.guard import policy_warnings
from migblockd.ledger import Group
from migblockd.listen import Claim, bind_claimed, file_access, open_to_everyone, unbind
from migblockd.notify import Notifier
from migblockd.persistence import only_migratable_refusal, schema_refusal
from migblockd.pidlock import PidLock
from migblockd.preflight import load_contract, passed_name, passed_path, problems
from migblockd.preflight_notes import ignored
from migblockd.registry import Change
from migblockd.reload_order import ReloadOrder
from migblockd.reloading import Reload, next_state, outvoted, plan
from migblockd.settings_file import FileSettings
from migblockd.sources import Sources
from migblockd.state.directory import DATABASE_NAME
from migblockd.timeouts import Timeouts
from migblockd.turns import Forward, Turns

__all__ = ["Commit", "Forward", "Server"]

log = logging.getLogger("migblockd")

Commit = Callable[[list[Change]], None]


class Server(Turns):
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

    async def reload(self) -> None:
        number = self._order.ask()  # before any await: in the order the signals came
        if number is None:
            return
        started = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        try:
            try:
                await self._order.take_turn(str(self.cli.get("config")))
                await self.notifier.reloading()
                started = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                with self._order.reading():
                    applied = await self._reload(number)
            except asyncio.CancelledError:
                # The stop ends the reloads it finds (migblockd.serving): each is said,
                # as every reload is, applied or not.
                log.info("reload: stopping, so this reload is not carried out: the "
                         "running configuration stays")
                raise
            # The look ahead may wait on a thread that never returns (a resolver, a
            # network file system): nothing waits for it.
            if isinstance(applied, str):
                reload_record.ended(started, applied=False, line=applied)
            elif applied is not None:
                # Applied: a `migblockd --reload` waiting (systemctl reload) returns now.
                reload_record.ended(started, applied=True, line=applied[0].messages()[0][1])
                await self._report(*applied)
        except Exception:
            # A bug: said here, not left to asyncio's "Task exception was never retrieved".
            log.exception("reload failed while applying the settings (some may be applied)")
            reload_record.ended(started, applied=False, line="reload failed while applying "
                                "the settings (some may be applied): see the daemon's log")
        finally:
            # Whatever happened, systemd hears READY=1: without it the unit stays
            # "reloading" and the next `systemctl reload` waits for its timeout.
            # Nothing once the stop has begun (the notifier sends no READY=1 after
            # STOPPING=1).
            await self.notifier.ready(self.status_line())

    async def _reload(self, number: int
                      ) -> tuple[Reload, Config, FileSettings, int] | str | None:
        """Read the file and apply it, as reload ``number``; what :meth:`_report` says
        of it, or why it failed (None: not applied, for the stop or a later reload)."""
        def read() -> tuple[FileSettings, Config]:
            file = read_settings(self.cli)
            return file, build(self.cli, file)

        try:
            # On a thread: a file on a network file system that does not answer
            # (and the user and group look-ups) must not hold the event loop, and
            # every client with it.
            try:
                file, fresh = await detached(read, "migblockd-reload-read")
            except NoThread:
                file, fresh = read()  # here, then, rather than not at all
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return f"reload failed, keeping the running configuration: {exc}"
        except Exception:  # a bug
            log.exception("reload failed, keeping the running configuration")
            return "reload failed, keeping the running configuration: see the daemon's log"
        if self.draining:
            # The stop began while the file was read: nothing is applied to a
            # daemon that is draining.
            log.info("reload: stopping, so the configuration read is not applied")
            return None
        if self._order.superseded(number):
            return None
        try:
            # The new policy's roles of the connected uids, and the names of the
            # blockers' owners, are looked up afresh off the loop: clients are
            # served meanwhile, under the running policy (migblockd.judge).
            # Its warnings name an entry at its line in the file as now read.
            prepared = await self.core.guard.judge.prepare(
                fresh.access, self.core.connections, functools.partial(
                    policy_warnings, where=functools.partial(
                        Sources.of(self.cli, file).entry, "access")))
        except Exception as exc:  # no thread for it
            why = ("reload failed, keeping the running configuration: the user and group "
                   f"databases could not be asked: {exc}")
            log.error("%s", why)
            return why
        if self.draining:
            log.info("reload: stopping, so the configuration read is not applied")
            return None
        if self._order.superseded(number):
            return None
        # own_socket is None: serving the socket systemd passed.
        reload = plan(self.config, fresh, socket_passed=self.own_socket is None,
                      overridden=outvoted(self.cli, self.file or {}, file),
                      sources=Sources.of(self.cli, file))
        self.file = file
        self.config = reload.config
        self.core.configure(self.config.limits)
        self.core.admission.max_clients = self.config.max_clients
        self.core.admission.max_clients_per_uid = self.config.max_clients_per_uid
        self.timeouts.configure(negotiation=self.config.negotiation_timeout,
                                idle=self.config.idle_timeout)
        if "max_clients" in reload.changed:
            # Every connection open holds a descriptor, refused ones lingering too.
            self.core.admission.room = fit_descriptor_limit(
                self.config.max_clients,
                len(self.protocols) + self.refusals_lingering.total(),
                reload.sources.named("max_clients"))
        # With the user and group databases' answers, read afresh: open connections
        # get their new role at their next request.
        roles = self.core.apply_access(prepared, self.config.access, self.config.quotas)
        if roles:
            reload = dataclasses.replace(reload, roles=roles)
        # The reload's own report passes the more verbose of the two levels: one
        # that lowers the level to "error" must still say it was read, and what
        # it did not apply; one that raises it from "error" must say so too.
        # Only its own lines: the root logger's level, lowered while the report
        # waits for its look ahead, would let every other line through meanwhile.
        root = logging.getLogger()
        threshold = min(root.level, self.config.logging_level)
        root.setLevel(self.config.logging_level)
        self._order.applied = number
        return reload, fresh, file, threshold

    async def _report(self, reload: Reload, fresh: Config, file: FileSettings,
                      threshold: int) -> None:
        """Log what ``reload`` applied and ignored, and whether the settings it
        did not apply would fail the next start: each line that passes
        ``threshold``, whatever the loggers' level."""
        def say(level: int, msg: str, *args: object) -> None:
            if level >= threshold:
                log.handle(log.makeRecord(log.name, level, __file__, 0, msg, args, None))

        for level, line in reload.messages():
            say(level, "%s", line)
        # The state the next start restores, if it is this one: what it would refuse of
        # it, in the start's words (read here: the registry is the loop's).
        kept_in = None if self.config.ephemeral else self.config.state_dir
        where = None if kept_in is None or fresh.ephemeral or fresh.state_dir != kept_in \
            else kept_in.absolute() / DATABASE_NAME
        keys = list(reload.restart_only)
        if where is not None and "schema" not in keys:
            # The schema's files may have been edited in place, which changes no
            # setting: the next start loads them as they are now (and one it cannot
            # load is said as such, not met below as a bug).
            keys.append("schema")
        if not keys:
            return
        # Not applied now, so not seen now: said before a restart finds out.  On a
        # thread: resolving a metrics host name may wait for DNS, reading a schema
        # on a network file system for the server; one that never returns must
        # not keep the daemon from exiting (migblockd.detached).
        check = functools.partial(problems, fresh, socket_passed=self.own_socket is None,
                                  passed=self.passed, as_daemon=True,
                                  keys=keys, sources=Sources.of(self.cli, file))
        # Counted here: the registry is the loop's.  Those are what the disk keeps.
        kept = self.core.registry.blockers()
        stored = sum(1 for b in kept if b.scope == "daemon")
        ahead = functools.partial(next_state, self.config, fresh, stored, reload.sources)
        mode = self.core.registry.mode
        refused: list[tuple[str, str]] = []
        if where is not None and "only-migratable" in reload.restart_only \
                and fresh.only_migratable:
            why = only_migratable_refusal(kept)
            if why is not None:
                refused.append(("only-migratable", f"{where}: {why}"))

        def look_ahead() -> tuple[list[tuple[str, str]], str | None]:
            found = check()
            if where is not None and not any(key == "schema" for key, _ in found):
                why = schema_refusal(kept, mode, load_contract(fresh.schema).enums["MigMode"])
                if why is not None:
                    found.append(("schema", f"{where}: {why}"))
            if not reload.restart_only:
                return found, None
            # A directory the next start refuses is said as such, not as empty.
            return found, None if any(key == "state-dir" for key, _ in found) else ahead()

        applied = self._order.applied
        try:
            found, fate = await detached(look_ahead, "migblockd-reload-check")
        except Exception:
            # The settings are applied by now: only the look ahead failed (a bug, or
            # no thread to run it on), and the reload is not undone for it.
            log.exception("reload: applied, but checking whether the next start would "
                          "fail with %s as the file now sets it failed",
                          ", ".join(keys))
            return
        if self._order.applied != applied:
            log.debug("reload: a later reload applied its file while this one looked "
                      "ahead: what it found is not said")
            return
        found += refused
        for key, why in found:
            if key in reload.restart_only:
                say(logging.WARNING, "reload: with %s as the file now sets it, the next "
                    "start would fail: %s", key, why)
            else:  # the schema's files, as they are now
                say(logging.WARNING, "reload: with the %s as its files are now, the next "
                    "start would fail: %s", key, why)
        if fate is not None:
            say(logging.WARNING, "reload: %s", fate)
        if not found and fate is None:  # that the look ahead ran, and when it ended
            say(logging.DEBUG, "reload: the next start would refuse nothing of %s as "
                "the file now sets it", ", ".join(keys))

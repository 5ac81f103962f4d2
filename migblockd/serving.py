"""The daemon's served life: from the core built to the stop, and the signals.

The core built, the start's look-ups in the user and group databases
begun (off the loop:
:meth:`migblockd.connection_roles.ConnectionRoles.start_access`), the metrics
endpoint (``--metrics``) and the socket bound without accepting, the look-ups
waited for (3 s at most), ``READY=1``, then accepting: no client is served
before systemd hears we are ready.  SIGHUP reloads the
configuration (one that comes while starting, once ready); SIGTERM and
SIGINT stop: no new connections, every request already received answered,
clients closed, the socket removed, ``STOPPING=1`` sent first; the metrics
endpoint goes last, so a scrape sees the end.  SIGUSR1 and SIGUSR2 are
ignored, and logged (``migblockd.early``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migblockd import __version__, logs, reload_record, signalmask
from migblockd.admission import Admission
from migblockd.config import Config
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.detached import NoThread, detached
from migblockd.listen import Claim
from migblockd.logs.throttle import Throttle
from migblockd.lookups import SLOW
from migblockd.notify import Notifier, plural
from migblockd.persistence import to_store
from migblockd.preflight import passed_path
from migblockd.preflight_notes import passthrough_unused
from migblockd.progress import StartProgress
from migblockd.qemu.bridge import FIRST_CONTACT, Bridge, passthrough_warnings
from migblockd.registry import Change, Registry
from migblockd.server import Server
from migblockd.settings_file import FileSettings
from migblockd.sources import COMMAND_LINE, Sources
from migblockd.startup import STOPPED_STARTING
from migblockd.state import Store, Unsettled

if TYPE_CHECKING:
    from migblockd.scrape import MetricsServer

__all__ = ["open_metrics", "qmp_socket_path", "serve"]

log = logging.getLogger("migblockd")

#: Logged for SIGUSR1 and SIGUSR2, which the daemon ignores (migblockd.early).
IGNORED = ("received %s: ignored (migblockd gives it no meaning: SIGHUP reloads the "
           "configuration, SIGTERM stops)%s")


async def serve(config: Config, cli: dict[str, Any], contract: Contract, registry: Registry,
                store: Store | None, reload_asked: Callable[[], bool],
                stop_asked: Callable[[], str | None],
                sock: socket.socket | None, claim: Claim | None, notifier: Notifier,
                progress: StartProgress, *, file: FileSettings | None = None) -> None:
    bridge = None
    # What is said of a setting of the file is said at its line there.
    sources = Sources.of(cli, file)
    if (unused := passthrough_unused(config, sources)) is not None:
        log.warning("%s", unused)
    if config.qemu is not None:
        for line in passthrough_warnings(config.qemu_passthrough, contract):
            log.warning("%s", sources.leading("qemu_passthrough", line))
        bridge = Bridge(config.qemu, config.qemu_passthrough, contract, registry,
                        timeout=config.qemu_timeout)
    admission = Admission(config.max_clients, config.max_clients_per_uid,
                          daemon_uid=os.geteuid())
    core = Core(contract, registry, config.limits, admission=admission,
                durable=store is not None,
                handlers=bridge.handlers if bridge is not None else None,
                policy=config.access, quotas=config.quotas, deferred=True)
    # The policy's names and the restored owners' names and roles, off the loop from
    # now: a user or group database that does not answer holds no start (root's
    # clients are served, and the others wait, as at a reload: migblockd.judge).
    # The policy's warnings name each entry at its line of the file.
    looking = asyncio.ensure_future(core.start_access(
        functools.partial(sources.entry, "access")))
    if len(registry):
        # Encoded and joined before the first poll, not during it (100,000 blockers:
        # about 70 ms of the only thread).
        progress.step(f"encoding the listing of {plural(len(registry), 'blocker')}")
        core.handlers.listings.get(None).parts()

    def commit(changes: list[Change]) -> None:
        assert store is not None
        try:
            store.commit(to_store(changes))
        except Unsettled as exc:
            # Whether the group is kept is up to the disk, which the next start
            # reads: the commands it carried get no answer, as in a crash.
            # (On the commit thread: the loop never gets to answer them.)
            log.critical("%s; stopping at once, answering none of the commands "
                         "waiting for it", exc)
            logging.shutdown()
            os._exit(1)

    server = Server(config, cli, core, notifier, commit if store is not None else None,
                    bridge.forward if bridge is not None else None, file=file)
    metrics = None
    try:
        metrics = open_metrics(config, core, sock, Sources.of(cli, file))
        await server.start(sock, claim)
    except BaseException:
        looking.cancel()
        await notifier.close()
        if metrics is not None:
            metrics.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    serving = False
    tasks: set[asyncio.Task[None]] = set()

    def on_stop(signame: str) -> None:
        if not stop.is_set():
            log.info("received %s" if serving else STOPPED_STARTING, signame)
        # From now on every client is owed its replies: the turns that still run
        # before the drain proper (a commit releasing a burst of events) must not
        # drop anyone for --max-output either.
        server.draining = True
        if not stop.is_set():
            # Before the drain, which may take a while: a second start refused the
            # socket, the state directory or the metrics socket meanwhile hears that
            # this one is stopping, and whether it has clients to drain.
            for lock in (None if claim is None else claim.lock, store, metrics):
                if lock is not None:
                    lock.stopping(before_serving=not serving)
            # A `migblockd --reload` waiting hears that no reload is carried out now.
            reload_record.stopping()
        stop.set()
        # At once, not when the stop gets to it: a SIGHUP sent with the SIGTERM
        # would otherwise start a reload during the stop.
        ignore_signals()

    def ignore_signals() -> None:
        # Until the drain is over a signal must not kill the daemon (the default
        # action): that would cut off the replies it still owes.  Through
        # signalmask.handle, as the stop's own: the byte that the signal which
        # stopped the daemon left in the wakeup descriptor, read after this, is
        # then no new signal to say "ignored" of.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signalmask.handle(loop, sig, log.info, "received %s while stopping: ignored",
                              sig.name)

    async def reload_unless_stopping(why: str = "") -> None:
        # The first step of a task runs after every callback of the turn that
        # spawned it: a SIGTERM pending with the SIGHUP, which the kernel hands
        # over after it (lower numbers first), has had on_stop run by now.
        if stop.is_set():
            log.info("received SIGHUP while stopping: ignored")
            return
        if why:
            log.info("%s", why)
        await server.reload()

    # Sent in a loop (a script's mistake), each would be a line: bounded as a
    # client's repeated refusals are.
    ignored_lines = Throttle()

    def on_unused(sig: signal.Signals) -> None:
        if (more := ignored_lines.admit(sig, None, loop.time())) is not None:
            log.warning(IGNORED, sig.name, more)

    signalmask.handle(loop, signal.SIGTERM, on_stop, "SIGTERM")
    signalmask.handle(loop, signal.SIGINT, on_stop, "SIGINT")
    for sig in signalmask.UNUSED:
        signalmask.handle(loop, sig, on_unused, sig)
    if (name := stop_asked()) is not None:
        on_stop(name)  # came after daemon.run() looked, before these handlers
    if bridge is not None and not stop.is_set():
        # Clients wait (in the listen backlog) until migblockd knows whether QEMU
        # migrates; a stop does not wait for that.
        bridge.start(core, server.schedule)
        # Said, or systemctl status shows the restore's last step for as long as
        # QEMU keeps the start waiting (a QEMU that accepts and does not answer).
        # STATUS= alone: a wait this short needs no more of TimeoutStartSec=.
        await notifier.status(f"waiting for QEMU at {config.qemu} to answer "
                              f"({FIRST_CONTACT:g} s at most): serving once it says "
                              "whether it migrates")
        await until_stopped(bridge.first_contact(), stop)
        if not stop.is_set() and not looking.done():
            # QEMU's wait is over, the look-ups' (3 s at most) not.
            await notifier.status("preparing to serve")
    if not stop.is_set():
        # The start's look-ups answer in milliseconds when the databases answer at
        # all: waited for, so that such a start serves everyone as soon as it says it
        # is ready, the owners' names and the policy's warnings already there.  One
        # that does not answer holds the start no longer than it takes to be warned of.
        await until_stopped(asyncio.wait({looking}, timeout=SLOW), stop)
        serving = True  # a stop from here on is one of a daemon that said it serves
        await notifier.ready(server.status_line())
        await server.serve()
        logs.batching(True)
        if metrics is not None:
            metrics.start()
        log_ready(config, server, bridge is not None)
        # Not before: a reload says READY=1 when it is done, and systemd would take
        # that for the end of a start-up still waiting for QEMU (until then the entry
        # point's handler keeps the request).
        signalmask.handle(loop, signal.SIGHUP, spawn, loop, tasks, reload_unless_stopping)
        if reload_asked():
            spawn(loop, tasks, lambda: reload_unless_stopping(
                "reloading: SIGHUP received while starting"))
        notifier.start_watchdog(lambda: committing(server, store))
    try:
        await stop.wait()
    finally:
        logs.batching(False)  # the stop's steps may block the loop too
        ignore_signals()
        # (The drain's turns say what it waits for as that changes.)  Never waits
        # for the receiver: a full NOTIFY_SOCKET does not hold up the stop.
        await notifier.stopping(server.status_line())
        await server.stop()
        if bridge is not None:
            await bridge.close()
        if metrics is not None:
            try:  # waits for a scrape in progress
                await detached(metrics.close, "migblockd-metrics-close")
            except NoThread:
                metrics.close()
        looking.cancel()  # a stop does not wait for a look-up
        for task in tasks:
            task.cancel()
        await notifier.close()
        # What follows (the store closed, the log's last lines written) is still the
        # stop: the signals stay ignored until the process exits.  The loop's close
        # would give them their default actions back, so its handlers go now, with
        # the signals blocked (no other thread takes them: signalmask).
        with signalmask.stops_blocked():
            for sig in signalmask.HANDLED:
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        await asyncio.sleep(0)  # what the handlers queued before they went is said first


def committing(server: Server, store: Store | None) -> tuple[str, float] | None:
    """The commit under way, named, and how long it has taken: what keeps every
    client of a daemon whose disk does not answer waiting, as the watchdog asks."""
    took = server.committing_for()
    if store is None or took is None:
        return None
    return f"the commit to {store.path}", took


def open_metrics(config: Config, core: Core, passed: socket.socket | None = None,
                 sources: Sources = COMMAND_LINE) -> MetricsServer | None:
    """The metrics endpoint, bound but not serving yet (None without ``--metrics``).

    ``passed`` is the QMP socket systemd passed, if any: its path, not ``--socket``,
    is the one the endpoint must not take.  ``sources``: where the settings came
    from, which the errors name."""
    if config.metrics is None:
        return None
    # prometheus_client and the HTTP server load only when asked for: start-up time.
    from migblockd.metrics import metrics_registry  # noqa: PLC0415
    from migblockd.scrape import MetricsServer  # noqa: PLC0415

    with sources.locating("metrics"):
        return MetricsServer.open(config.metrics, metrics_registry(core),
                                  qmp_socket_path(config, passed), asyncio.get_running_loop(),
                                  sources)


def qmp_socket_path(config: Config, passed: socket.socket | None) -> Path:
    """Where migblockd's QMP socket is: systemd's passed socket's path, else --socket."""
    path = None if passed is None else passed_path(passed)
    return config.socket if path is None else path


def log_ready(config: Config, server: Server, gated: bool) -> None:
    """The start's last lines: what the daemon serves, where, with what policy."""
    gating = (f"gating the QEMU at {config.qemu}" if gated
              else f"migration-time {config.migration_time:g}s")
    where = "the passed socket" if server.own_socket is None else str(config.socket)
    # A reload names the policy it applies; the start names the one it serves
    # with, so that the log alone says who may do what (docs/access.md).
    log.info("access: %s", config.access)
    log.info("migblockd %s ready on %s (only-migratable %s, %s)", __version__, where,
             "on" if config.only_migratable else "off", gating)
    if config.event_loop != "asyncio":
        log.info("event loop: %s", config.event_loop)


async def until_stopped(work: Coroutine[Any, Any, object], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends or ``stop`` is set, whichever comes first."""
    done = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done, stopped):
            task.cancel()
        await asyncio.gather(done, stopped, return_exceptions=True)
    if not done.cancelled():
        done.result()  # its exception, if it raised one


def spawn(loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task[None]],
          factory: Callable[[], Any]) -> None:
    """Run ``factory()`` as a task kept alive in ``tasks``."""
    task = loop.create_task(factory())
    tasks.add(task)
    task.add_done_callback(tasks.discard)

"""The daemon's start, up to serving: what is taken in which order.

Start-up: the schema (a bad one stops us before anything binds), the socket
claimed (its lock taken, a busy one refused) or the one systemd passed checked,
so that a daemon that cannot serve creates no state; then the state, restored
into the registry.  A SIGTERM or SIGINT that comes meanwhile ends the start,
serving nobody; a restore under way is not cut short.  What follows, from the
core built to the stop, is :mod:`migblockd.serving`'s.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

from migblockd.config import Config
from migblockd.detached import Unanswered, within
from migblockd.listen import Claim, claim_socket
from migblockd.notify import Notifier, plural
from migblockd.paths import NoDefault, default_state_dir
from migblockd.persistence import restore
from migblockd.preflight import check_qemu, load_contract, socket_gid, state_refused
from migblockd.preflight_notes import kept_out_notes, socket_group_notes
from migblockd.progress import StartProgress
from migblockd.registry import Registry
from migblockd.serving import qmp_socket_path, serve
from migblockd.settings_file import FileSettings
from migblockd.socketgroup import WAIT
from migblockd.sources import COMMAND_LINE, Sources
from migblockd.startup import (
    STOPPED_STARTING,
    NotConfigured,
    StartupError,
    StoppedStarting,
)
from migblockd.state import StateError, Store
from migblockd.systemd import Activation, ActivationError

__all__ = ["StartupError", "run"]

log = logging.getLogger("migblockd")


async def run(config: Config, cli: dict[str, Any], *,
              reload_asked: Callable[[], bool] = lambda: False,
              stop_asked: Callable[[], str | None] = lambda: None,
              file: FileSettings | None = None,
              activation: Activation | None = None) -> None:
    """Start, serve until SIGTERM/SIGINT, stop.  Raises StartupError when it cannot start.

    A stop leaves SIGTERM, SIGINT and SIGHUP ignored: the process is to exit.

    ``reload_asked()``: whether a SIGHUP came before the event loop handled
    it; the reload is done once the daemon is ready.  ``stop_asked()``: the
    name of a SIGTERM or SIGINT that came before, if one did; the start then
    ends after the restore, serving nobody.  ``file``: what the configuration
    file set when ``config`` was built (``config.read_settings``).
    """
    # First: a start refused at any step says why in STATUS=, which systemd keeps
    # once the process has exited (else `systemctl status` of the failed unit shows
    # the step it was at, "opening the state in ...", as if still under way).
    notifier = await Notifier.open()
    try:
        await _run(config, cli, notifier, reload_asked, stop_asked, file, activation)
    except StartupError as exc:
        notifier.failed(str(exc))
        raise
    finally:
        await notifier.close()  # serve() closed it already, but for a start refused


async def _run(config: Config, cli: dict[str, Any], notifier: Notifier,
               reload_asked: Callable[[], bool], stop_asked: Callable[[], str | None],
               file: FileSettings | None, activation: Activation | None) -> None:
    sources = Sources.of(cli, file)
    with sources.locating("schema"):
        contract = load_contract(config.schema)
    # The socket before the state: a daemon that cannot serve (another one holds
    # the socket, systemd passed the wrong sockets) refuses before it creates or
    # restores a state directory.
    try:
        sock = (activation if activation is not None else Activation()).listener()
    except ActivationError as exc:
        raise NotConfigured(f"socket activation: {exc}") from None
    if sock is None and config.socket_activated:
        # Binding --socket instead would serve a path nobody connects to, with
        # settings --check-config was told not to judge.
        raise NotConfigured("--socket-activated: systemd passed no socket (start the "
                            "daemon through its socket unit)")
    if config.qemu is not None:
        check_qemu(config.qemu, qmp_socket_path(config, sock), sources)
    try:
        # A stop that came while the modules loaded is acted on before the start
        # waits for anything (the group database) or makes anything.
        if (name := stop_asked()) is not None:
            raise StoppedStarting(name)
        claim = claim_own_socket(config, sources, stop_asked) if sock is None else None
    except StoppedStarting as exc:
        log.info(STOPPED_STARTING, str(exc))
        return
    store = None
    try:
        registry = Registry(
            contract.enums["MigMode"],
            only_migratable=config.only_migratable,
            migration_time=config.migration_time,
        )
        if (name := stop_asked()) is not None:
            # Came while the socket was claimed: no restore is begun for it.
            log.info(STOPPED_STARTING, name)
            return
        progress = StartProgress(notifier, stop_asked)
        try:
            store = open_state(config, registry, sources, progress, stop_asked)
        except StoppedStarting as exc:
            # Came while another program's write lock was waited for, after the
            # restore: nothing was written.
            log.info(STOPPED_STARTING, str(exc))
            return
        if (name := stop_asked()) is not None:
            # Not sooner: the restore is not cut short (it may be migrating an
            # older database forward), and the log says what it found.
            log.info(STOPPED_STARTING, name)
            return
        await serve(config, cli, contract, registry, store, reload_asked, stop_asked,
                    sock, claim, notifier, progress, file=file)
        # Closing the store is still the stop (it may save a state.db that left its
        # name, and say so): "stopped" comes after it, the stop's last line.
        closing, store = store, None
        if closing is not None:
            closing.close()
        log.info("stopped")
    finally:
        if store is not None:
            store.close()
        if claim is not None:
            claim.lock.release()  # a no-op once the server has released it


def claim_own_socket(config: Config, sources: Sources = COMMAND_LINE,
                     stop_asked: Callable[[], str | None] = lambda: None) -> Claim:
    """``--socket``'s directory made and its lock taken; a busy socket refused.
    ``sources``: where the settings came from, which the errors name.
    ``stop_asked``: as :func:`run`'s; a stop that comes while a look-up is waited
    for raises StoppedStarting, with nothing claimed."""
    gid = socket_gid(config.socket_group, sources.named("socket_group"), stop_asked)
    with sources.locating("socket"):
        claim = claim_socket(config.socket, config.socket_mode, gid,
                             option=sources.choice("socket"))
    try:
        # Their look-ups are the databases' too: one that does not answer holds
        # no start for a warning, nor a stop.
        notes = within(lambda: socket_group_notes(config, socket_passed=False, sources=sources)
                       + kept_out_notes(config, socket_passed=False, sources=sources),
                       "migblockd-socket-notes", stop=stop_asked)
    except StoppedStarting:
        claim.lock.release()
        raise
    except Unanswered:
        notes = [sources.leading("socket_group", f"socket-group: the group database did not "
                                 f"answer within {WAIT:g} s: whether a group is named with "
                                 "the number given, or a directory keeps the group out of the "
                                 "socket, is not checked")]
    for note in notes:
        log.warning("%s", note)
    return claim


def open_state(config: Config, registry: Registry, sources: Sources = COMMAND_LINE,
               progress: StartProgress | None = None,
               stop_asked: Callable[[], str | None] = lambda: None) -> Store | None:
    """The state directory, locked, with what it holds restored into ``registry``.
    ``sources``: where the settings came from, which the errors name; ``progress``:
    where to say how far the restore is; ``stop_asked``: as :func:`run`'s, a stop
    that comes while another program holds the database's write lock raises
    StoppedStarting."""
    if config.ephemeral:
        log.info("state: ephemeral: blockers live in memory only, a restart forgets them")
        try:
            given = config.state_dir is not None and config.state_dir != default_state_dir()
        except NoDefault:  # then it was given: there is no default to come from
            given = True
        if given:
            # Given, yet unused: said, so that nobody believes it holds anything; led
            # by the line of the file that gives it, where the file does.
            log.warning("state: %s %s is not used: the state is ephemeral",
                        sources.keyed("state_dir"), config.state_dir)
        return None
    assert config.state_dir is not None  # config.build() leaves it out only when ephemeral
    try:
        # Restored before the database is opened for writing: a stored blocker or
        # setting that this start refuses leaves the files as they were.
        if progress is not None:
            progress.step(f"opening the state in {config.state_dir}")
        checking = None if progress is None else progress.counting("restoring")
        store = Store.open(config.state_dir,
                           restore=lambda snapshot: restore(registry, snapshot, checking),
                           progress=None if progress is None else progress.counting("reading"),
                           stop=stop_asked)
    except StateError as exc:
        why, status = state_refused(exc, config.state_dir, sources.choice("state_dir"))
        raise StartupError(sources.located("state_dir", why), status) from None
    count = len(registry)
    log.info("restored %d %s from %s", count, "blocker" if count == 1 else "blockers",
             store.path)
    if progress is not None:
        progress.step(f"restored {plural(count, 'blocker')}: preparing to serve")
    # What was restored lives as long as the daemon: keep the collector off it.
    gc.collect()
    gc.freeze()
    return store

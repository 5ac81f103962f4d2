"""The daemon's life: what starts in which order, signals, and the order of shutdown.

Start-up: the schema (a bad one stops us before anything binds), the registry
and the core, the socket (bound, or passed by systemd) without accepting,
``READY=1``, then accepting: no client is served before systemd hears we are
ready.  SIGHUP reloads the configuration; SIGTERM and SIGINT stop: no new
connections, every request already received answered, clients closed, the
socket removed, ``STOPPING=1`` sent first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from migblockd import __version__
from migblockd.config import Config
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.qapi.error import QAPIError
from migblockd.registry import Registry
from migblockd.server import Server, StartupError, spawn
from migblockd.systemd import ActivationError, Notifier, activated_listener

__all__ = ["StartupError", "run"]

log = logging.getLogger("migblockd")


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
    core = Core(contract, registry, config.limits, max_clients=config.max_clients,
                policy=config.access, quotas=config.quotas)
    try:
        sock = activated_listener()
    except ActivationError as exc:
        raise StartupError(f"socket activation: {exc}") from None
    notifier = await Notifier.open()
    server = Server(config, cli, core, notifier)
    try:
        await server.start(sock)
    except BaseException:
        await notifier.close()
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def on_stop(signame: str) -> None:
        if not stop.is_set():
            log.info("received %s", signame)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, spawn, loop, tasks, server.reload)
    await notifier.ready(server.status_line())
    await server.serve()
    where = "the passed socket" if server.own_socket is None else str(config.socket)
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
        await server.stop()
        for task in tasks:
            task.cancel()
        await notifier.close()
        log.info("stopped")

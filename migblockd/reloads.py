"""A SIGHUP reload on the event loop: its turn, the file read and applied, the look ahead.

Part of :class:`migblockd.server.Server` (a base class of it, with no state of
its own).  Apart from the server's socket and its start and stop because a
reload is a story of its own: its turn among the signals
(:class:`migblockd.reload_order.ReloadOrder`), the file read and the new policy's
look-ups made off the loop, what :mod:`migblockd.reloading` decides applied,
``READY=1`` whatever happened, and, for the settings only a restart applies,
whether the next start would fail with them, said now rather than found then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migblockd import reload_record
from migblockd.accept import fit_descriptor_limit
from migblockd.config import Config, ConfigError, build, read_settings
from migblockd.detached import NoThread, detached
from migblockd.guard import policy_warnings
from migblockd.persistence import only_migratable_refusal, schema_refusal
from migblockd.preflight import load_contract, problems
from migblockd.reloading import Reload, next_state, outvoted, plan
from migblockd.settings_file import FileSettings
from migblockd.sources import Sources
from migblockd.state.directory import DATABASE_NAME

if TYPE_CHECKING:
    from migblockd.adapter import ClientProtocol
    from migblockd.connection import Connection
    from migblockd.core import Core
    from migblockd.notify import Notifier
    from migblockd.reload_order import ReloadOrder
    from migblockd.timeouts import Timeouts

__all__ = ["Reloads"]

log = logging.getLogger("migblockd")


class Reloads:
    """The reloads of a :class:`~migblockd.server.Server`."""

    # The server's, set in Server.__init__:
    config: Config
    cli: dict[str, Any]
    file: FileSettings | None
    core: Core
    notifier: Notifier
    protocols: dict[Connection, ClientProtocol]
    timeouts: Timeouts
    own_socket: tuple[Path, int] | None
    passed: Path | None
    refusals_lingering: Counter[int | None]
    _order: ReloadOrder
    #: Shutdown has begun (the server's).
    draining: bool

    if TYPE_CHECKING:
        def status_line(self) -> str: ...  # Turns'

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
            if isinstance(applied, reload_record.Refused):
                reload_record.ended(started, applied=False, line=applied.line,
                                    mend=applied.mend)
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

    async def _reload(self, number: int) -> tuple[Reload, Config, FileSettings, int] | (
            reload_record.Refused | None):
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
            # The file's fault, as the reload's check would have said (exit 6), unless
            # it could not be read for an I/O error.
            return reload_record.Refused(
                f"reload failed, keeping the running configuration: {exc}", not exc.passing)
        except Exception:  # a bug
            log.exception("reload failed, keeping the running configuration")
            return reload_record.Refused("reload failed, keeping the running configuration: "
                                         "see the daemon's log")
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
            return reload_record.Refused(why)
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

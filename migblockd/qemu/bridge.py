"""Between the core and the link to QEMU: calls out, answers and events back in.

The core's gate handlers (:mod:`migblockd.gate`) say what to ask QEMU; the
link (:mod:`migblockd.qemu.link`) talks to it.  This module does the rest:
it keeps :class:`~migblockd.qemu_facts.QemuFacts` current as the link connects and
disconnects, turns the link's errors into the gate's (QEMU's refusals
verbatim; anything else "not connected"), and hands QEMU's ``MIGRATION`` and
``MIGRATION_PASS`` events to the core in the order QEMU sent them (and the last one
owed of a migration whose QEMU the link lost: :mod:`migblockd.qemu.lost_migration`).
On each connection it learns what that QEMU is doing and sets the events capability
clients asked for, or owes it while QEMU migrates: that is its base class's,
:class:`~migblockd.qemu.events_capability.EventsCapability`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.forwarding import Call
from migblockd.gate import GateHandlers
from migblockd.qemu.errors import (
    QemuCommandError,
    QemuInterrupted,
    QemuLinkError,
    QemuTimedOut,
)
from migblockd.qemu.events_capability import EventsCapability
from migblockd.qemu.link import QemuLink
from migblockd.qemu.lost_migration import LostMigration
from migblockd.qemu.reconnect import LinkState
from migblockd.qemu_facts import (
    QemuError,
    QemuFacts,
    QemuLost,
    QemuRestarted,
    QemuSilent,
    QemuUnavailable,
)
from migblockd.qmp.encoding import timestamp
from migblockd.registry import Registry

__all__ = ["FIRST_CONTACT", "Bridge", "passthrough_warnings"]

log = logging.getLogger("migblockd")

#: How long the daemon waits at start for QEMU's first answer before serving
#: anyway (a QEMU whose monitor serves another client does not greet; one whose main
#: loop is busy does not answer).
FIRST_CONTACT: Final = 5.0

#: QEMU's events that migblockd's clients hear about.
RELAYED: Final = frozenset({"MIGRATION", "MIGRATION_PASS"})

#: QEMU commands that, passed through, save or move the VM's state past
#: migblockd's blockers, and what the start warns of each: QEMU consults its own only
#: (``migrate_prepare()`` in migration/migration.c, ``save_snapshot()`` in
#: migration/savevm.c), or none at all (``qmp_xen_save_devices_state()``, there too,
#: which writes the file it is given as QEMU's user).
_PAST_OURS = "lets admins migrate or snapshot the VM past migblockd's blockers"
UNGATED: Final = {
    "human-monitor-command": f"{_PAST_OURS} (QEMU consults only its own for its HMP "
                             "migrate and savevm)",
    "snapshot-save": f"{_PAST_OURS} (QEMU consults only its own for it)",
    "xen-save-devices-state": "lets admins save the VM's device state past every blocker, "
                              "migblockd's and QEMU's own (QEMU consults none for it), into "
                              "any file QEMU's user may write",
}

#: QEMU commands that take a file descriptor sent with them (``SCM_RIGHTS``): migblockd
#: reads its clients' bytes and no ancillary data, so the kernel closes the descriptor,
#: and QEMU gets the command alone, which it refuses (``qmp_getfd()``, ``qmp_add_fd()``).
NO_DESCRIPTOR: Final = ("getfd", "add-fd")


def failure_of(info: object) -> str | None:
    """Why the migration that ``query-migrate``'s answer ``info`` shows failed (None: it
    shows none that failed)."""
    if not isinstance(info, dict) or info.get("status") != "failed":
        return None
    desc = info.get("error-desc")
    return desc if isinstance(desc, str) else "QEMU does not say why"


def passthrough_warnings(passthrough: tuple[str, ...], contract: Contract) -> list[str]:
    """What the start warns of in ``qemu-passthrough`` (and ``--check-config`` prints),
    each led by the setting's key, which the caller names at its line of the file."""
    lines = []
    ours = [name for name in passthrough if name in contract.commands]
    if ours:
        lines.append(f"qemu-passthrough: ignoring {', '.join(ours)}: migblockd's own command(s)")
    lines += [f"qemu-passthrough: {name} {UNGATED[name]}"
              for name in passthrough if name in UNGATED]
    lines += [f"qemu-passthrough: {name} takes a file descriptor sent with it (SCM_RIGHTS), "
              "which migblockd does not pass on to QEMU: QEMU answers it through migblockd "
              "'No file descriptor supplied via SCM_RIGHTS'"
              for name in passthrough if name in NO_DESCRIPTOR]
    return lines


class Bridge(EventsCapability):
    """One gated QEMU: its facts, the handlers that consult them, and the link."""

    def __init__(self, path: Path, passthrough: tuple[str, ...], contract: Contract,
                 registry: Registry, *, timeout: float) -> None:
        # What passthrough_warnings() says of them, the start logs (at their line).
        ours = [name for name in passthrough if name in contract.commands]
        self.facts = QemuFacts(path)
        self.handlers = GateHandlers(contract, registry, self.facts,
                                     tuple(n for n in passthrough if n not in ours))
        self._lost = LostMigration(Path(path), self.facts, evented=self._sends_events,
                                   on_end=self._lost_ended)
        self.link = QemuLink(path, on_event=self._event, on_state=self._state,
                             on_gone=self._lost.gone, on_silent=self._silent,
                             timeout=timeout)
        # (A QEMU the link dropped is there too, until the link tries it again.)
        self.facts.greeting_awaited = lambda: self.link.awaiting_greeting or self.link.dropped
        self.facts.set_up_late = lambda: self.link.awaiting_greeting and self.link.late
        self.facts.timed_out = lambda: self.link.silent is not None
        self.facts.lost = self.link.losses  # counted as the link loses connections
        self._core: Core | None = None
        self._wake: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Questions of migblockd's own that nothing waits for (why a migration failed).
        self._asides: set[asyncio.Task[None]] = set()
        self._sent = 0  # commands forwarded so far
        self._unanswered = 0  # which of them is the unanswered migrate (facts.unanswered)
        #: The link's connections to QEMU, numbered: one more each time it connects (a
        #: restarted QEMU, or the same one again); what a command's calls are pinned to.
        self._connection = 0
        #: Whether the connected QEMU sends MIGRATION events: it has sent one, or said
        #: that its events capability is on.
        self._evented = False
        #: Whether the events capability clients asked for is still to be set on the
        #: connected QEMU: it was migrating when migblockd connected (QEMU takes no
        #: capability then), or setting it failed.  Recomputed on each connection.
        self._events_owed = False
        #: MIGRATION events QEMU has sent, on any connection (whether a migrate's came).
        self._migration_events = 0
        #: The connected QEMU's process id, kept once the link is lost (None: unknown).
        self._pid: int | None = None

    def start(self, core: Core, wake: Callable[[], None]) -> None:
        """Connect (and keep reconnecting); ``wake()`` makes the server flush and report."""
        self._core, self._wake = core, wake
        self.link.start()

    async def first_contact(self, timeout: float = FIRST_CONTACT) -> None:
        """Wait (at most ``timeout`` seconds) until the link has tried QEMU once and,
        if QEMU answered, learnt whether it migrates.

        Until then ``add-blocker`` could not know that QEMU migrates (after a restart
        of migblockd, say): the daemon serves no client before this returns.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.link.first_attempt()
                while self._tasks:  # learning the migration's status
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            if self.facts.may_migrate():
                log.warning("QEMU at %s is there but has not answered within %g s of start; "
                            "serving anyway (until it says whether it migrates, add-blocker "
                            "is refused as while it migrates)", self.link.path, timeout)
            else:
                log.warning("QEMU at %s has not answered within %g s of start; serving "
                            "anyway (until it answers, blockers are added as while QEMU is "
                            "away)", self.link.path, timeout)

    async def close(self) -> None:
        for task in (*self._tasks, *self._asides):
            task.cancel()
        await self.link.close()
        self._lost.close()

    async def forward(self, call: Call) -> object:
        """Run ``call`` on QEMU: its return value, or the gate's errors."""
        name, args, pin = call.name, call.args, call.pin
        # What a QEMU just connected to does, and the events capability, are settled
        # first: a migrate sent meanwhile would start a migration without the events
        # clients asked for (QEMU refuses capabilities while it migrates).
        await self._settled()
        if self._events_due(call):
            await self._set_events()
            await self._settled()  # (a new connection meanwhile: its own set-up first)
        # Checked here, with no await before the send: the connection a call goes out
        # on is the one that answers it (lost meanwhile, it fails: QemuInterrupted).
        if pin is not None:
            if pin.connection is None:  # the command's first call (sent, or not connected)
                pin.connection, pin.pid = self._connection, self._pid
            elif pin.connection != self._connection:
                # The command decided on the answers of the QEMU before (a migrate's
                # checks: its status, run state and mode), which say nothing of this one.
                raise self._restarted(pin.pid)
        self._sent += 1
        sent, connection, events = self._sent, self._connection, self._migration_events
        try:
            result = await self.link.execute(name, args)
        except QemuCommandError as exc:
            self._answered(sent)
            raise QemuError(exc.error_class, exc.desc) from None
        except QemuInterrupted as exc:
            if name == "migrate" and not self.facts.cut_off and connection == self._connection:
                # Sent, and lost before QEMU replied (this failure may come before the
                # link's loss is reported): QEMU may have started it, and migrate on.
                self._lost.lose()
            raise QemuLost(str(exc)) from None
        except QemuTimedOut as exc:
            if name == "migrate" and self.facts.connected:
                # Still in QEMU's queue: QEMU may start that migration when it gets to it.
                self.facts.unanswered, self._unanswered = True, sent
            raise QemuSilent(str(exc)) from None
        except QemuLinkError as exc:
            raise QemuUnavailable(str(exc)) from None
        self._answered(sent)
        if connection == self._connection:
            if name == "migrate-set-capabilities":
                self._events_set(call)  # (a migration QEMU runs now sends what this says)
            elif name == "migrate" and call.args.get("resume") is not True:
                self._migrate_taken(events != self._migration_events)
        return result

    async def _settled(self) -> None:
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _restarted(self, pid: int | None) -> QemuRestarted:
        """Why a command whose earlier calls went to QEMU process ``pid`` (on another
        connection) sends no more: QEMU was restarted, or only its connection was lost
        and made again (the same process answers), which a restart must not be
        blamed for."""
        if pid is not None and pid == self._pid:
            return QemuRestarted(
                f"The connection to QEMU at '{self.link.path}' was lost and made again "
                "while migblockd checked the command: nothing more of it was sent; try "
                "again")
        return QemuRestarted(
            f"QEMU at '{self.link.path}' was restarted while migblockd checked the "
            "command: nothing was sent to the new QEMU; try again")

    def _answered(self, sent: int) -> None:
        """QEMU answered the command forwarded ``sent``-th: it answers in order, so it
        has run every command sent before, an unanswered ``migrate`` included."""
        if sent > self._unanswered:
            self.facts.unanswered = False

    def _event(self, name: str, data: Mapping[str, object],
               timestamp: Mapping[str, object]) -> None:
        if name not in RELAYED or self._core is None:
            return
        if name == "MIGRATION":
            self._migration_events += 1
            status = data.get("status")
            self.facts.status = status if isinstance(status, str) else self.facts.status
            self.facts.saw_status(status)
            self.facts.learnt = True
            self._evented = True
            log.info("QEMU migration status: %s", self.facts.status)
            if status == "failed":
                task = asyncio.get_running_loop().create_task(self._why_failed())
                self._asides.add(task)
                task.add_done_callback(self._asides.discard)
        self._core.relay(name, dict(data), dict(timestamp))
        self._wake()

    async def _why_failed(self) -> None:
        """Log why QEMU's migration failed: its MIGRATION event does not say, its
        ``query-migrate`` does (``error-desc``), until the next migration replaces it."""
        path, connection = self.link.path, self._connection
        try:
            info = await self.link.execute("query-migrate", for_client=False)
        except QemuLinkError as exc:
            log.warning("QEMU at %s: the migration failed; why cannot be told: %s", path, exc)
            return
        if connection != self._connection or failure_of(info) is None:
            return  # another QEMU's answer, or another migration's
        log.warning("QEMU at %s: the migration failed: %s", path, failure_of(info))

    def _state(self, state: LinkState) -> None:
        facts, info = self.facts, self.link.info
        facts.connected = state == "connected" and info is not None
        if facts.connected:
            assert info is not None
            self._connection += 1
            self._pid = info.pid
            self._lost.connected(info.pid)
        facts.unanswered = False  # a new connection: QEMU holds nothing sent before
        facts.commands = info.commands if info is not None and facts.connected else {}
        facts.required = info.required if info is not None and facts.connected else {}
        facts.members = info.members if info is not None and facts.connected else {}
        facts.version = info.version_string if info is not None and facts.connected else ""
        if facts.connected:
            task = asyncio.get_running_loop().create_task(self._learn_status())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            # (Not when migblockd closes the link itself, stopping: QEMU is still there.)
            if state == "disconnected":
                self._lost.disconnected()
            facts.status = facts.blockers = None
            # What QEMU said is void: while migblockd is not connected, another
            # client of its monitors may start a migration, and another QEMU may
            # take the socket's path.  Until it answers again, it may be migrating.
            facts.learnt = False
            self._evented = False
        self._wake()

    def _silent(self) -> None:
        """QEMU stopped answering, or answers again, or a connection's set-up waited
        past the notice for it: what the status shows changed (``facts.silent``,
        ``facts.set_up_late``), whoever's command told (migblockd's own, at connect)."""
        self._wake()

    def _lost_ended(self, ending: str | None) -> None:
        """The QEMU whose migration the link lost has exited: the clients are sent
        that migration's last event (``MIGRATION`` ``ending``; None: none is owed)."""
        if ending is not None and self._core is not None:
            self._core.relay("MIGRATION", {"status": ending}, timestamp(time.time()))
        self._wake()


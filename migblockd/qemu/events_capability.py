"""The events capability clients asked for, on each QEMU the link connects to.

Part of :class:`migblockd.qemu.bridge.Bridge` (a base class of it, with no state of
its own).  Clients turn QEMU's ``events`` migration capability on through migblockd
(kept in the registry), but QEMU starts with it off, and a QEMU restarted, or first
met, would send none of the ``MIGRATION`` events they asked for.  So on each
connection the bridge learns what that QEMU is doing (:meth:`EventsCapability._learn_status`:
``query-migrate``, and whether a migration it shows is an incoming one) and sets the
capability at once, unless QEMU is migrating: QEMU refuses capabilities then, and the
capability is owed (:meth:`EventsCapability._events_due`) until that migration is
seen to have ended, or before the next ``migrate`` the bridge forwards at the latest.
Whether the connected QEMU's migration sends events (:meth:`EventsCapability._sends_events`)
is what :mod:`migblockd.qemu.lost_migration` needs to owe clients its last one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from migblockd.forwarding import Call
from migblockd.gate import GateHandlers
from migblockd.qemu.errors import QemuLinkError
from migblockd.qemu.link import QemuLink
from migblockd.qemu_facts import QemuFacts, incoming
from migblockd.registry import is_running

__all__ = ["EventsCapability"]

# The logger the bridge's lines go to: these are its lines.
log = logging.getLogger("migblockd")

#: What the log adds when the events capability clients asked for is owed to a QEMU.
OWED: Final = ("; the events capability clients asked for is owed: migblockd sets it once "
               "QEMU is not migrating, before it forwards the next migrate at the latest")


class EventsCapability:
    """What a :class:`~migblockd.qemu.bridge.Bridge` does for the events capability."""

    # The bridge's, set in Bridge.__init__:
    facts: QemuFacts
    handlers: GateHandlers
    link: QemuLink
    _wake: Callable[[], None]
    _connection: int
    _evented: bool
    _events_owed: bool

    def _events_due(self, call: Call) -> bool:
        """Whether the events capability still owed is to be set before ``call``: once
        QEMU's migration is seen to have ended (an event, a ``query-migrate``), and
        before any new migration at the latest (the gate's ``migrate`` has asked QEMU
        whether one runs first).  Not before a resume, which goes on with the paused
        migration QEMU has its capabilities for, nor while QEMU answers nothing."""
        if not self._events_owed or not self.facts.connected or self.link.silent is not None:
            return False
        if call.name == "migrate":
            return call.args.get("resume") is not True
        # (awaiting: one migblockd handed over without events has not been seen to end.)
        return not is_running(self.facts.status) and not self.facts.awaiting

    async def _set_events(self) -> None:
        """Set the events capability clients asked for (kept in the registry) on the
        connected QEMU; a failure is warned of and leaves it owed, to be tried again
        before the next command forwarded once QEMU is not migrating."""
        path = self.link.path
        if not self.handlers.registry.events_enabled:  # a client turned it off meanwhile
            self._events_owed = False
            return
        try:
            await self.link.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]}, for_client=False)
        except QemuLinkError as exc:
            self._events_owed = True
            log.warning("QEMU at %s: cannot set the events capability clients asked for: "
                        "%s; migblockd tries again before it forwards the next migrate",
                        path, exc)
        else:
            self._events_owed = False
            log.info("QEMU at %s: set the events capability clients asked for", path)

    def _events_set(self, call: Call) -> None:
        """A client's ``migrate-set-capabilities`` (``call``) succeeded: QEMU sends
        MIGRATION events from now on as it set them, whatever it sent before on this
        connection.  (QEMU takes no capability while it migrates: no migration whose
        events clients heard goes on without them.)"""
        for cap in call.args.get("capabilities", ()):
            if isinstance(cap, dict) and cap.get("capability") == "events":
                self._evented = cap.get("state") is True
                self._events_owed = False  # set, or turned off: nothing to set any more

    def _migrate_taken(self, evented: bool) -> None:
        """QEMU took a new migration; ``evented``: a MIGRATION event came before its
        reply.  QEMU sends ``setup`` before it answers a ``migrate`` it took, when its
        events capability is on (``migrate_init()``, migration/migration.c): none came,
        so the capability is off, turned off elsewhere (another of QEMU's monitors)
        whatever clients asked for.  That migration's end goes unseen; the capability
        is owed again, set once that migration is seen to have ended."""
        if evented or self._events_owed or not self.handlers.registry.events_enabled:
            return  # (owed: not set on this QEMU, as the log said when it could not be)
        self._evented, self._events_owed = False, True
        log.warning("QEMU at %s took a migration without sending MIGRATION events: its "
                    "events capability was turned off on another of its monitors; its "
                    "end goes unseen%s", self.link.path, OWED)

    def _sends_events(self) -> bool:
        """Whether the connected QEMU's migration sends MIGRATION events."""
        # (An owed capability: that QEMU was sent none for this migration.)
        return self._evented or (self.handlers.registry.events_enabled
                                 and not self._events_owed)

    async def _receiving(self, info: object) -> bool:
        """The migration ``query-migrate`` shows (``info``) is an incoming one."""
        try:
            state = await self.link.execute("query-status", for_client=False)
        except QemuLinkError:
            return False
        runstate = state.get("status") if isinstance(state, dict) else None
        return isinstance(runstate, str) and incoming(info, runstate)

    async def _events_on(self) -> bool:
        """Whether the QEMU connected now has its ``events`` capability on (False: off,
        or it cannot be told).  QEMU answers this query while it migrates; a migration
        it runs with events on sends MIGRATION events that clients hear, so its end
        must be told them even when the link loses that QEMU."""
        connection = self._connection
        try:
            caps = await self.link.execute("query-migrate-capabilities", for_client=False)
        except QemuLinkError:
            return False
        if connection != self._connection or not self.facts.connected:
            return False  # another connection's QEMU, or none
        return isinstance(caps, list) and {"capability": "events", "state": True} in caps

    async def _learn_status(self) -> None:
        """What a QEMU just connected to is doing, and the capability migblockd's
        clients set: QEMU starts with ``events`` off, and a QEMU restarted (or
        first met) would otherwise send none of the events they asked for."""
        path = self.link.path
        wanted = self.handlers.registry.events_enabled
        # Owed until set on this QEMU (whatever the connection before it had).
        self._events_owed = wanted
        try:
            info = await self.link.execute("query-migrate", for_client=False)
        except QemuLinkError as exc:
            log.warning("QEMU at %s: cannot learn its migration status: %s%s", path, exc,
                        OWED if wanted else "")
            return
        if not self.facts.connected:
            return  # lost since: the answer says nothing of what may be there now
        status = info.get("status") if isinstance(info, dict) else None
        self.facts.status = status if isinstance(status, str) else None
        self.facts.saw(info)
        self._wake()
        if is_running(self.facts.status) and await self._receiving(info):
            # query-migrate shows an incoming migration too; QEMU takes capabilities
            # then, and the events are for the migrations this VM makes afterwards.
            log.info("QEMU at %s is receiving a migration (status %s)", path,
                     self.facts.status)
        elif is_running(self.facts.status):
            # QEMU refuses capabilities while it migrates (qmp_migrate_set_capabilities(),
            # migration/migration.c): set once that migration is seen to have ended,
            # unless QEMU has it on already (a restarted migblockd set it before).
            if await self._events_on():
                self._evented = True  # its migration's last event is owed to clients
                self._events_owed = False
            log.info("QEMU at %s is migrating (status %s)%s", path, self.facts.status,
                     OWED if self._events_owed else "")
            return
        if wanted:
            await self._set_events()

"""Between the core and the link to QEMU: calls out, answers and events back in.

The core's gate handlers (:mod:`migblockd.gate`) say what to ask QEMU; the
link (:mod:`migblockd.qemu.link`) talks to it.  This module does the rest:
it keeps :class:`~migblockd.gate.QemuFacts` current as the link connects and
disconnects, turns the link's errors into the gate's (QEMU's refusals
verbatim; anything else "not connected"), and hands QEMU's ``MIGRATION`` and
``MIGRATION_PASS`` events to the core in the order QEMU sent them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.gate import GateHandlers, QemuError, QemuFacts, QemuUnavailable
from migblockd.qemu.link import LinkState, QemuCommandError, QemuLink, QemuLinkError
from migblockd.registry import Registry

__all__ = ["Bridge"]

log = logging.getLogger("migblockd")

#: QEMU's events that migblockd's clients hear about.
RELAYED: Final = frozenset({"MIGRATION", "MIGRATION_PASS"})


class Bridge:
    """One gated QEMU: its facts, the handlers that consult them, and the link."""

    def __init__(self, path: Path, passthrough: tuple[str, ...], contract: Contract,
                 registry: Registry) -> None:
        ours = [name for name in passthrough if name in contract.commands]
        if ours:
            log.warning("qemu-passthrough: ignoring %s: migblockd's own command(s)",
                        ", ".join(ours))
        self.facts = QemuFacts(path)
        self.handlers = GateHandlers(contract, registry, self.facts,
                                     tuple(n for n in passthrough if n not in ours))
        self.link = QemuLink(path, on_event=self._event, on_state=self._state)
        self._core: Core | None = None
        self._wake: Callable[[], None] = lambda: None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, core: Core, wake: Callable[[], None]) -> None:
        """Connect (and keep reconnecting); ``wake()`` makes the server flush and report."""
        self._core, self._wake = core, wake
        self.link.start()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.link.close()

    async def forward(self, name: str, args: dict[str, Any]) -> object:
        """Run ``name`` on QEMU: its return value, or the gate's errors."""
        try:
            return await self.link.execute(name, args)
        except QemuCommandError as exc:
            raise QemuError(exc.error_class, exc.desc) from None
        except QemuLinkError as exc:
            raise QemuUnavailable(str(exc)) from None

    def _event(self, name: str, data: Mapping[str, object],
               timestamp: Mapping[str, object]) -> None:
        if name not in RELAYED or self._core is None:
            return
        if name == "MIGRATION":
            status = data.get("status")
            self.facts.status = status if isinstance(status, str) else self.facts.status
            log.info("QEMU migration status: %s", self.facts.status)
        self._core.relay(name, dict(data), dict(timestamp))
        self._wake()

    def _state(self, state: LinkState) -> None:
        facts, info = self.facts, self.link.info
        facts.connected = state == "connected" and info is not None
        facts.commands = info.commands if info is not None and facts.connected else {}
        facts.version = info.version_string if info is not None and facts.connected else ""
        if facts.connected:
            task = asyncio.get_running_loop().create_task(self._learn_status())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            facts.status = None
        self._wake()

    async def _learn_status(self) -> None:
        # For the STATUS line only: migrate and add-blocker ask QEMU afresh.
        try:
            info = await self.link.execute("query-migrate")
        except QemuLinkError:
            return
        status = info.get("status") if isinstance(info, dict) else None
        self.facts.status = status if isinstance(status, str) else None
        self._wake()

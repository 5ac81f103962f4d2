"""Forwarding to the gated QEMU: what handlers yield to the core, the commands passed through.

Gated handlers are generators: each ``yield Call(...)`` is a command for QEMU,
and the handler resumes with QEMU's return value, or with
:class:`~migblockd.qemu_facts.QemuError` or
:class:`~migblockd.qemu_facts.QemuUnavailable` thrown in; ``yield SETTLE``
resumes it once the changes other clients made meanwhile are on disk (or
undone).  A command's calls all go to one QEMU connection (its :class:`Pin`): one
made after QEMU was restarted is not sent, and the handler gets
:class:`~migblockd.qemu_facts.QemuRestarted` instead.  The core drives them (the
adapter does the I/O); a handler changes the registry only after its last
``yield``, so what it changes is committed with the command that made it.  A
handler that returns :class:`Forwarded` says what QEMU applied, which a failed
commit cannot take back.

:class:`Forwarding` is a part of :class:`~migblockd.gate.GateHandlers` (a base
class of it): the command table in front of QEMU, where the pass-through
commands go to QEMU as they are and the schema's commands that wait for QEMU are
in-band only, as introspection says.  It is apart from :mod:`migblockd.gate`,
which holds the rules of the commands migblockd itself answers for in front of
QEMU (its blockers, QEMU's, and the migration commands), and from
:mod:`migblockd.start_checks` (what ``migrate`` checks first).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Final

from migblockd.commands import Args, Handlers
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.qmp.encoding import Encoded, encode
from migblockd.qmp.envelope import Command
from migblockd.registry import Registry

__all__ = ["SETTLE", "Call", "Forwarded", "Forwarding", "Pin", "Settle", "Step"]

Step = Generator["Call | Settle", object, object]


@dataclass(slots=True)
class Pin:
    """The QEMU connection one command's calls go to: the one its first call was sent
    on (``None`` until then), and the process id of the QEMU at its other end.  The
    sender fills it in and refuses a later call once the connection is another: a
    handler decides each call on the answers to the earlier ones, which a restarted
    QEMU (or a reconnected one) did not give.  ``changing``: whether a call that may
    change QEMU (any but a ``query-``) has gone out for the command: from then on
    what QEMU did is the command's outcome."""

    connection: int | None = None
    pid: int | None = None
    changing: bool = False


@dataclass(frozen=True, slots=True)
class Call:
    """A command for QEMU; the handler that yields it resumes with its return value.

    Handlers leave ``pin`` out: the core gives every call of a command the same one."""

    name: str
    args: dict[str, Any]
    pin: Pin | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A handler's result (``value``) after QEMU applied ``applied`` (its words for
    the client and the log): a failed commit of the command's own change cannot take
    that back, so the error it turns the reply into says that it stays."""

    value: object
    applied: str


class Settle:
    """What a handler yields to go on (with None) once every change made so far is on
    disk: what it decides next must not stand on a change a failed commit takes back."""

    __slots__ = ()


SETTLE: Final = Settle()


class Forwarding(Handlers):
    """The command table of the gated commands: the schema's, then the pass-through ones."""

    def __init__(self, contract: Contract, registry: Registry,
                 passthrough: tuple[str, ...] = ()) -> None:
        super().__init__(contract, registry)
        self.passthrough = passthrough
        self._command_list = [*self._command_list, *({"name": n} for n in passthrough)]
        # The schema's allow-oob commands that wait for QEMU here.  QEMU runs what
        # migblockd forwards in-band (QEMU 7.2 allows OOB for none of them), after every
        # command already queued on migblockd's monitor: none of them can jump a queue,
        # so exec-oob of them is refused as QEMU refuses it, and introspection says so.
        self.in_band_only = frozenset(
            name for name, spec in contract.commands.items()
            if spec.allow_oob and inspect.isgeneratorfunction(self.handler(name)))
        self._introspection = Encoded(encode([
            {k: v for k, v in entry.items() if k != "allow-oob"}
            if entry.get("meta-type") == "command" and entry["name"] in self.in_band_only
            else entry
            for entry in contract.introspection]))

    def table(self) -> dict[str, Command]:
        """The schema's commands, then the pass-through ones (QEMU checks their arguments)."""
        table = super().table()
        for name in self.in_band_only:
            table[name] = dataclasses.replace(table[name], allow_oob=False)
        for name in self.passthrough:
            if name not in table:
                table[name] = Command(name, False, _unchecked, self._forward(name))
        return table

    @staticmethod
    def _forward(name: str) -> Any:
        def run(conn: Connection, args: Args) -> Step:
            return (yield Call(name, args))

        return run


def _unchecked(args: Args) -> None:
    """Pass-through arguments are QEMU's to judge."""

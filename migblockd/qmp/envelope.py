"""What makes a QMP request runnable: its envelope, its command, negotiation.

Part of :class:`migblockd.qmp.session.Session` (a base class of it, holding
the command table and the negotiation state): the checks a parsed object
passes before it is a :class:`Request`, in the order QEMU makes them
(``qapi/qmp-dispatch.c``, ``monitor/qmp.c``), and ``qmp_capabilities``
itself.  They are apart from the session because they are rules about one
request, each raising the :class:`~migblockd.qmp.errors.QMPError` QEMU would
answer with; the session decides when they run, and answers what they raise.

1. The envelope (QEMU's ``qmp_dispatch_check_obj()``): a request has
   ``execute`` (or, with OOB enabled, ``exec-oob``), a string; ``arguments``,
   if present, is an object; nothing else but ``id``.  Of several errors, the
   one QEMU meets first in its QDict's order is reported.
2. The command: before negotiation every name but ``qmp_capabilities`` is
   ``CommandNotFound`` with desc ``Expecting capabilities negotiation with
   'qmp_capabilities'``; after it, a name outside the schema is ``The command
   NAME has not been found``.  ``exec-oob`` of a command without
   ``allow-oob`` is refused.
3. The arguments, against the command's schema: :attr:`Command.validate`,
   which the session calls on the :class:`Request` built here.
4. ``qmp_capabilities``: once negotiated, it fails with ``Capabilities
   negotiation is already complete, command ignored``; before, a capability
   the greeting did not offer fails with ``Capability X not available``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from migblockd.qmp.errors import CommandNotFound, QMPError
from migblockd.qmp.qdict import qdict_order

__all__ = [
    "ALREADY_NEGOTIATED",
    "ARGUMENTS_NOT_OBJECT",
    "LACKS_EXECUTE",
    "NEGOTIATION_REQUIRED",
    "NOT_AN_OBJECT",
    "QMP_CAPABILITIES",
    "Command",
    "Envelope",
    "Request",
]

Args = dict[str, Any]

QMP_CAPABILITIES: Final = "qmp_capabilities"


@dataclass(frozen=True, slots=True)
class Command:
    """What the session needs to know of one command of the schema.

    ``validate(args)`` raises :class:`QMPError` when the arguments do not match
    the schema and has no side effect.  ``handler`` is opaque to the session:
    it travels with each :class:`Request` to whoever runs it.
    """

    name: str
    allow_oob: bool
    validate: Callable[[Args], None]
    handler: object = None


@dataclass(slots=True)
class Request:
    """A request that passed every protocol check and awaits its answer."""

    command: Command
    args: Args
    id: object  # NO_ID when the request had none
    oob: bool


# The members of a request that needs no closer look: in-band, or with OOB enabled
# out-of-band (exec-oob is an envelope member only then).
_IN_BAND_MEMBERS: Final = frozenset({"execute", "arguments", "id"})
_OOB_ONLY_MEMBERS: Final = frozenset({"exec-oob", "arguments", "id"})
_NO_ARGUMENTS: Final[dict[str, Any]] = {}

NEGOTIATION_REQUIRED: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED: Final = "Capabilities negotiation is already complete, command ignored"
NOT_AN_OBJECT: Final = "QMP input must be a JSON object"
ARGUMENTS_NOT_OBJECT: Final = "QMP input member 'arguments' must be an object"
LACKS_EXECUTE: Final = "QMP input lacks member 'execute'"


class Envelope:
    """The request checks and the negotiation of a :class:`~migblockd.qmp.session.Session`."""

    # Set in Session.__init__; negotiated and oob_enabled change in _negotiate.
    __slots__ = ("_negotiation", "_offered", "commands", "negotiated", "oob_enabled")

    commands: Mapping[str, Command]
    negotiated: bool
    oob_enabled: bool
    _negotiation: Command
    _offered: frozenset[str]

    def _envelope(self, req: dict[str, Any], id_: object) -> Request:
        """The envelope checks, in QEMU's order (``qapi/qmp-dispatch.c``)."""
        oob = self.oob_enabled
        keys = req.keys()
        if keys <= _IN_BAND_MEMBERS and type(req.get("execute")) is str:
            exec_key = "execute"  # the common case, with nothing for the member checks to find
        elif oob and keys <= _OOB_ONLY_MEMBERS and type(req.get("exec-oob")) is str:
            exec_key = "exec-oob"
        else:
            exec_key = ""
        args = req.get("arguments", _NO_ARGUMENTS)
        if not exec_key or type(args) is not dict:
            exec_key = _check_members(req, oob)
        command = self._lookup(req[exec_key])
        if exec_key == "exec-oob" and not command.allow_oob:
            raise QMPError(f"The command {command.name} does not support OOB")
        return Request(command, args if args is not _NO_ARGUMENTS else {}, id_,
                       exec_key == "exec-oob")

    def _lookup(self, name: str) -> Command:
        if name == QMP_CAPABILITIES:
            return self._negotiation
        command = self.commands.get(name) if self.negotiated else None
        if command is None:
            if not self.negotiated:
                raise CommandNotFound(NEGOTIATION_REQUIRED)
            raise CommandNotFound(f"The command {name} has not been found")
        return command

    def _negotiate(self, args: Args) -> object:
        if self.negotiated:
            raise CommandNotFound(ALREADY_NEGOTIATED)
        enable: list[str] = args.get("enable", [])
        unavailable = [cap for cap in enable if cap not in self._offered]
        if unavailable:
            raise QMPError(f"Capability {', '.join(unavailable)} not available")
        self.oob_enabled = "oob" in enable
        self.negotiated = True
        return {}


def _check_members(req: dict[str, Any], oob: bool) -> str:
    """QEMU's ``qmp_dispatch_check_obj()``: each member in the order QEMU's QDict
    holds them, so that of several errors the one QEMU meets first is reported.
    Returns the member that names the command (``exec-oob`` is one only with
    OOB enabled, else it is unexpected; with both, the second met clashes)."""
    exec_key = ""
    for key in qdict_order(req):
        value = req[key]
        if key == "execute" or (key == "exec-oob" and oob):
            if type(value) is not str:
                raise QMPError(f"QMP input member '{key}' must be a string")
            if exec_key:
                raise QMPError(f"QMP input member '{key}' clashes with '{exec_key}'")
            exec_key = key
        elif key == "arguments":
            if type(value) is not dict:
                raise QMPError(ARGUMENTS_NOT_OBJECT)
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if not exec_key:
        raise QMPError(LACKS_EXECUTE)
    return exec_key

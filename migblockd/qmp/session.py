"""The QMP session: one connection's protocol state machine, with no I/O.

In the style of python-websockets' ``protocol.py``: the server feeds received
bytes in with :meth:`Session.receive_data`, lets the session run requests with
:meth:`Session.execute`, and writes whatever :meth:`Session.data_to_send`
returns.  The session never touches a socket, a clock or an event loop, so
every protocol rule is unit-tested with plain bytes.

The protocol, as QEMU speaks it (``docs/interop/qmp-spec.rst``,
``monitor/qmp.c``, ``qapi/qmp-dispatch.c``):

1. On connect the server sends the greeting ``{"QMP": {"version": ...,
   "capabilities": [...]}}``.
2. The session is in *capabilities negotiation* mode: the only command is
   ``qmp_capabilities``; any other gets ``CommandNotFound`` with desc
   ``Expecting capabilities negotiation with 'qmp_capabilities'`` (QEMU
   rewrites every ``CommandNotFound`` in this mode; other errors, such as
   envelope errors, pass through unchanged).  No events are sent.
3. ``qmp_capabilities`` (optionally ``{"enable": ["oob"]}``) switches to
   command mode.  Asking for a capability the greeting did not offer fails
   with ``Capability X not available``; a second ``qmp_capabilities`` fails
   with ``CommandNotFound``, ``Capabilities negotiation is already complete,
   command ignored`` (after its arguments were validated, as in QEMU).
4. Each request is ``{"execute": NAME, "arguments": {...}, "id": ANY}``
   (``arguments`` and ``id`` optional), or with OOB enabled ``{"exec-oob":
   NAME, ...}``.  The reply is ``{"return": VALUE, "id": ID}`` or ``{"id": ID,
   "error": {"class": ..., "desc": ...}}``, without ``id`` when the request
   had none (or was not an object).  Replies are lines ending in ``\\r\\n``.

The session implements ``qmp_capabilities`` itself (state, OOB, errors); of
that command's :class:`Command` entry only ``validate`` and ``allow_oob`` are
used, and a built-in validator serves when the table has no entry.

Ordering and OOB: every command runs synchronously, to completion, and its
reply is queued at once.  In-band requests run in arrival order, at most
``max_requests`` per :meth:`Session.execute` call (the server's turn).  Once
OOB is enabled, each call first parses everything buffered and runs the
``exec-oob`` requests among it at once, ahead of in-band requests that arrived
earlier but have not had their turn -- QEMU's "out-of-band" promise.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from migblockd.qmp.codec import (
    NEED_DATA,
    Limits,
    ParseError,
    StreamDecoder,
    encode_line,
    encode_return,
)
from migblockd.qmp.errors import NO_ID, CommandNotFound, QMPError, error_reply
from migblockd.qmp.validation import ArgumentValidator

__all__ = ["Command", "Limits", "Session"]

Args = dict[str, Any]


@dataclass(frozen=True)
class Command:
    """One entry of the command table.

    ``validate(args)`` raises :class:`QMPError` when the arguments do not match
    the schema and must have no side effect; ``run(session, args)`` returns the
    JSON value of ``"return"`` (``{}`` for commands without a return value) and
    may raise :class:`QMPError` or a domain error (see :class:`Session`).
    """

    name: str
    allow_oob: bool
    validate: Callable[[Args], None]
    run: Callable[[Session, Args], object]


QMP_CAPABILITIES: Final = "qmp_capabilities"

#: The arguments of ``qmp_capabilities`` (QEMU's qapi/control.json), used when
#: the command table does not bring its own validator.
QMP_CAPABILITIES_ARGUMENTS: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "qmp_capabilities arguments",
    "type": "object",
    "properties": {"enable": {"type": "array", "items": {"$ref": "#/$defs/QMPCapability"}}},
    "additionalProperties": False,
    "$defs": {"QMPCapability": {"type": "string", "enum": ["oob"]}},
}

# Envelope members; exec-oob joins them once OOB is enabled.
_IN_BAND_MEMBERS: Final = frozenset({"execute", "arguments", "id"})
_OOB_MEMBERS: Final = _IN_BAND_MEMBERS | {"exec-oob"}

NEGOTIATION_REQUIRED: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED: Final = "Capabilities negotiation is already complete, command ignored"
NOT_AN_OBJECT: Final = "QMP input must be a JSON object"
ARGUMENTS_NOT_OBJECT: Final = "QMP input member 'arguments' must be an object"
LACKS_EXECUTE: Final = "QMP input lacks member 'execute'"
CLASH: Final = "QMP input member 'exec-oob' clashes with 'execute'"


def _internal_error_desc(name: str) -> str:
    return f"Internal error while executing command {name}"


class Session:
    """Per-connection QMP state machine (sans-I/O).

    ``commands`` is the full command table, including ``qmp_capabilities``;
    ``greeting`` the ``{"QMP": {...}}`` object, whose encoded line is pending
    in :meth:`data_to_send` right away and whose ``capabilities`` are what
    ``qmp_capabilities`` may enable.  ``context`` is opaque to the session and
    left for the server and the command handlers (the connection object).

    Errors raised by a command: :class:`QMPError` becomes its class and desc;
    an instance of one of ``domain_errors`` (the server passes the registry's
    ``BlockerError``, whose ``str()`` is QEMU's exact desc) becomes a
    ``GenericError`` with that desc -- this is the one place where domain
    errors meet the wire (and the protocol core never imports the registry).
    Any other exception is a bug: the client gets a ``GenericError`` with a
    generic desc (never a traceback), the session goes on, and
    ``on_internal_error(session, command_name, exc)`` lets the server log it.
    """

    def __init__(
        self,
        commands: Mapping[str, Command],
        greeting: dict[str, Any],
        limits: Limits,
        *,
        context: object = None,
        domain_errors: tuple[type[BaseException], ...] = (),
        on_internal_error: Callable[[Session, str, BaseException], None] | None = None,
    ) -> None:
        self.commands = commands
        self.context = context
        self.negotiated = False
        self.oob_enabled = False
        self.limits = limits
        self._domain_errors = domain_errors
        self._on_internal_error = on_internal_error
        self._offered = frozenset(greeting.get("QMP", {}).get("capabilities", ()))
        capabilities = commands.get(QMP_CAPABILITIES)
        self._negotiation_validate = (
            capabilities.validate
            if capabilities is not None
            else _builtin_capabilities_validator().check
        )
        self._negotiation_allow_oob = capabilities.allow_oob if capabilities is not None else True
        self._decoder = StreamDecoder(limits)
        #: In-band requests parsed ahead of their turn while looking for OOB ones.
        self._queue: deque[object] = deque()
        self._output: list[bytes] = [encode_line(greeting)]

    # -- input ---------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Buffer received bytes.  Nothing is parsed or executed here."""
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        """The peer will send no more.

        Complete requests still buffered stay pending and are executed by
        :meth:`execute` as usual.  A truncated request at the end gets one
        error, ``JSON parse error, premature EOI`` (QEMU drops it silently, but
        migblockd still delivers replies after a half-close, so the client can
        learn why its last request did nothing).
        """
        self._decoder.feed_eof()

    def has_pending(self) -> bool:
        """True when a complete request (or a parse error) waits for :meth:`execute`."""
        return bool(self._queue) or self._decoder.has_message()

    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed by :meth:`execute`."""
        return self._decoder.buffered

    def execute(self, max_requests: int) -> int:
        """Handle up to ``max_requests`` pending requests in order; queue their replies.

        Returns how many were handled (parse errors count: each one gets a reply).
        """
        handled = 0
        decoder = self._decoder
        output = self._output
        queue = self._queue
        if self.oob_enabled and decoder.has_message():
            # Out-of-band requests run the moment they are parsed, ahead of the
            # in-band ones queued before them (QEMU's monitor does the same);
            # in-band requests keep their order.  Only what one read brought is
            # buffered, so parsing it all at once is bounded.
            while (item := decoder.next_message()) is not NEED_DATA:
                if type(item) is dict and "exec-oob" in item and "execute" not in item:
                    handled += 1
                    output.append(self._handle(item))
                else:
                    queue.append(item)
        while handled < max_requests:
            if queue:
                item = queue.popleft()
            else:
                item = decoder.next_message()
                if item is NEED_DATA:
                    break
            handled += 1
            output.append(self._handle(item))
        return handled

    # -- output --------------------------------------------------------------
    def send_event(self, line: bytes) -> None:
        """Queue a pre-encoded event line; dropped unless negotiation is complete."""
        if self.negotiated:
            self._output.append(line)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call (greeting, replies, events), in order."""
        output = self._output
        if not output:
            return b""
        data = output[0] if len(output) == 1 else b"".join(output)
        output.clear()
        return data

    @staticmethod
    def encode_event(name: str, data: Mapping[str, Any], timestamp: float) -> bytes:
        """One event line: ``{"event": ..., "data": ..., "timestamp": {...}}\\r\\n``.

        ``data`` is omitted when empty, as QEMU does for events without data;
        ``timestamp`` is wall-clock seconds, split into whole seconds and
        microseconds.  Encode once and pass the line to every session's
        :meth:`send_event`.
        """
        seconds, microseconds = divmod(round(timestamp * 1_000_000), 1_000_000)
        event: dict[str, Any] = {"event": name}
        if data:
            event["data"] = data
        event["timestamp"] = {"seconds": seconds, "microseconds": microseconds}
        return encode_line(event)

    # -- dispatch ------------------------------------------------------------
    def _handle(self, request: object) -> bytes:
        if isinstance(request, ParseError):
            return encode_line(error_reply(QMPError(request.desc)))
        if type(request) is not dict:
            return encode_line(error_reply(QMPError(NOT_AN_OBJECT)))
        req: dict[str, Any] = request
        id_ = req.get("id", NO_ID)
        name = "?"
        try:
            name, command, args = self._check_request(req)
            if command is None:  # qmp_capabilities
                result = self._negotiate(args)
            else:
                command.validate(args)
                result = command.run(self, args)
            return encode_return(result, id_, NO_ID)
        except QMPError as exc:
            return self._error_line(exc, id_)
        except self._domain_errors as exc:
            return self._error_line(QMPError(str(exc)), id_)
        except Exception as exc:
            if self._on_internal_error is not None:
                self._on_internal_error(self, name, exc)
            return self._error_line(QMPError(_internal_error_desc(name)), id_)

    def _error_line(self, exc: QMPError, id_: object) -> bytes:
        try:
            return encode_line(error_reply(exc, id_))
        except (ValueError, TypeError):  # pragma: no cover - ids come from our own parser
            return encode_line(error_reply(exc))

    def _check_request(self, req: dict[str, Any]) -> tuple[str, Command | None, Args]:
        """The envelope checks, in qmp-wire.md's order; returns name, command, arguments.

        The command is None for ``qmp_capabilities``, which the session runs itself.
        """
        oob = self.oob_enabled
        execute: str | None = req.get("execute")
        if (execute is not None or "execute" in req) and type(execute) is not str:
            raise QMPError("QMP input member 'execute' must be a string")
        # exec-oob is an envelope member only once OOB is enabled; before
        # that it is just an unexpected member.
        exec_oob: str | None = req.get("exec-oob") if oob else None
        if (exec_oob is not None or (oob and "exec-oob" in req)) and type(exec_oob) is not str:
            raise QMPError("QMP input member 'exec-oob' must be a string")
        if "arguments" in req:
            args = req["arguments"]
            if type(args) is not dict:
                raise QMPError(ARGUMENTS_NOT_OBJECT)
        else:
            args = {}
        allowed = _OOB_MEMBERS if oob else _IN_BAND_MEMBERS
        if not req.keys() <= allowed:
            for key in req:
                if key not in allowed:
                    raise QMPError(f"QMP input member '{key}' is unexpected")
        if execute is None and exec_oob is None:
            raise QMPError(LACKS_EXECUTE)
        name = execute if execute is not None else exec_oob
        assert name is not None
        command = self._lookup(name)
        if execute is not None and exec_oob is not None:
            # Both: an in-band request with a clash (QEMU runs a request out of
            # band only when exec-oob is its sole command member).
            self._lookup(exec_oob)
            raise QMPError(CLASH)
        if execute is None and not (
            command.allow_oob if command is not None else self._negotiation_allow_oob
        ):
            raise QMPError(f"The command {name} does not support OOB")
        return name, command, args

    def _lookup(self, name: str) -> Command | None:
        """The command for ``name`` in the current state (None: qmp_capabilities)."""
        if name == QMP_CAPABILITIES:
            return None
        command = self.commands.get(name) if self.negotiated else None
        if command is None:
            if not self.negotiated:
                raise CommandNotFound(NEGOTIATION_REQUIRED)
            raise CommandNotFound(f"The command {name} has not been found")
        return command

    def _negotiate(self, args: Args) -> object:
        self._negotiation_validate(args)
        if self.negotiated:
            raise CommandNotFound(ALREADY_NEGOTIATED)
        enable: list[str] = args.get("enable", [])
        unavailable = [cap for cap in enable if cap not in self._offered]
        if unavailable:
            raise QMPError(f"Capability {', '.join(unavailable)} not available")
        self.oob_enabled = "oob" in enable
        self.negotiated = True
        return {}


_BUILTIN_VALIDATOR: ArgumentValidator | None = None


def _builtin_capabilities_validator() -> ArgumentValidator:
    global _BUILTIN_VALIDATOR  # noqa: PLW0603 - compiled once, on first use
    if _BUILTIN_VALIDATOR is None:
        _BUILTIN_VALIDATOR = ArgumentValidator(QMP_CAPABILITIES_ARGUMENTS)
    return _BUILTIN_VALIDATOR

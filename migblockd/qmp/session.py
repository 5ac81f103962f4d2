"""The QMP session: one connection's protocol state machine, with no I/O.

In the style of python-websockets' ``protocol.py``: received bytes go in with
:meth:`Session.receive_data`; :meth:`Session.next_request` hands out the next
request that passed every protocol check, answering by itself everything that
did not (and ``qmp_capabilities``); whoever runs the request answers it with
:meth:`Session.reply` or :meth:`Session.fail`; :meth:`Session.data_to_send`
returns the bytes to write.  The session never touches a socket, a clock or
an event loop, so every protocol rule is unit-tested with plain bytes.

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

Ordering and OOB: in-band requests come out of :meth:`next_request` in arrival
order.  Once OOB is enabled, each call first parses what is buffered, up to
:data:`LOOKAHEAD` in-band requests waiting, and hands out the ``exec-oob``
requests among it first, ahead of in-band requests that arrived earlier but
have not had their turn (QEMU's "out-of-band" promise).  Replies are written
in the order they are given, so whoever runs the requests keeps in-band
replies in request order by answering each before asking for the next.

The checks a request passes, and negotiation, are in
:mod:`migblockd.qmp.envelope` (:class:`~migblockd.qmp.envelope.Envelope`, a
base class of :class:`Session`); the output queue, and the output held until
a commit, in :mod:`migblockd.qmp.output` (:class:`~migblockd.qmp.output.Output`,
the other one).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from migblockd.qmp.encoding import encode_error, encode_line, encode_return
from migblockd.qmp.envelope import NOT_AN_OBJECT, QMP_CAPABILITIES, Command, Envelope, Request
from migblockd.qmp.errors import NO_ID, QMPError
from migblockd.qmp.framing import NEED_DATA, StreamDecoder
from migblockd.qmp.limits import Limits
from migblockd.qmp.output import KEEP, Output
from migblockd.qmp.wording import (
    NESTING_EXCEEDED,
    TOKEN_COUNT_EXCEEDED,
    TOKEN_SIZE_EXCEEDED,
    ParseError,
)

__all__ = ["LOOKAHEAD", "Session"]

#: In-band requests parsed ahead of their turn at most, while looking for OOB ones.
#: QEMU's monitor queues 8 and stops reading while they wait (``monitor/qmp.c``,
#: ``QMP_REQ_QUEUE_LEN_MAX``), so an ``exec-oob`` behind more is not seen before they
#: run there either.  Parsing all a read brought at once took seconds of the only
#: thread for 256 KiB of ``[]`` (128 Ki messages), every other client waiting.
LOOKAHEAD: Final = 64

#: The input limits' errors, and the setting each one enforces (at its value in force).
_LIMITS: dict[str, Callable[[StreamDecoder], str]] = {
    TOKEN_SIZE_EXCEEDED: lambda bounds: f"max-message-size={bounds.max_message_size} bytes",
    TOKEN_COUNT_EXCEEDED: lambda bounds: f"max-tokens={bounds.max_tokens}",
    NESTING_EXCEEDED: lambda bounds: f"max-nesting={bounds.max_nesting}",
}


class Session(Envelope, Output):
    """Per-connection QMP state machine (sans-I/O).

    ``commands`` is the full command table of the schema, including
    ``qmp_capabilities`` (whose validator the session uses; the session runs
    negotiation itself).  ``greeting`` is the ``{"QMP": {...}}`` object: its
    line is pending in :meth:`data_to_send` right away, and its
    ``capabilities`` are what ``qmp_capabilities`` may enable.
    """

    __slots__ = ("_decoder", "_held", "_limit_told", "_output", "_queue", "discarding",
                 "event_bytes", "limit_notice", "missed", "output_bytes")

    def __init__(self, commands: Mapping[str, Command], greeting: dict[str, Any],
                 limits: Limits) -> None:
        self.commands = commands
        self.negotiated = False
        self.oob_enabled = False
        self._negotiation = commands[QMP_CAPABILITIES]
        self._offered = frozenset(greeting.get("QMP", {}).get("capabilities", ()))
        self._decoder = StreamDecoder(limits)
        #: The first request refused for an input limit, in the operator's words
        #: (which setting, at what value), for the daemon to log and then clear;
        #: later ones on this connection are counted only.  The client gets QEMU's
        #: wording, which names no setting.
        self.limit_notice: str | None = None
        self._limit_told = False
        #: In-band requests parsed ahead of their turn while looking for OOB ones.
        self._queue: deque[object] = deque()
        # Output's (migblockd.qmp.output): the greeting goes first.
        self._output = [encode_line(greeting)]
        self.output_bytes = len(self._output[0])
        self.event_bytes = 0
        self._held = deque()
        self.discarding = False
        self.missed = 0

    # -- input ---------------------------------------------------------------
    def receive_data(self, data: bytes | memoryview) -> None:
        """Buffer (copy) received bytes.  Nothing is parsed or executed here."""
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        """The peer will send no more.

        Complete requests still buffered stay pending.  A truncated request at
        the end gets one error, ``JSON parse error, premature EOI`` (QEMU drops
        it silently, but migblockd still delivers replies after a half-close,
        so the client can learn why its last request did nothing).
        """
        self._decoder.feed_eof()

    def has_pending(self) -> bool:
        """True when a complete request (or a parse error) waits for its turn."""
        return bool(self._queue) or self._decoder.has_message()

    def configure(self, limits: Limits) -> None:
        """Bound the input by ``limits`` from now on (a reload)."""
        self._decoder.configure(limits)

    @property
    def buffered(self) -> int:
        """Received bytes not yet consumed."""
        return self._decoder.buffered

    def next_request(self, in_band: bool = True) -> Request | None:
        """Take the next pending item: the request to run, or None.

        ``in_band`` False takes only an out-of-band request, if one is buffered
        (the in-band ones wait: their client's output is backed up).

        None when nothing complete is buffered, or when the item failed a
        protocol check (a parse error, a non-object, an envelope or argument
        error, negotiation state) or was ``qmp_capabilities``: those are
        answered here.  Either way one item was handled, so a caller that
        counts calls bounds its work per turn however bad the input is.
        """
        decoder = self._decoder
        queue = self._queue
        if self.oob_enabled and decoder.has_message():
            # Out-of-band requests run the moment they are parsed, ahead of the
            # in-band ones queued before them (QEMU's monitor does the same), up
            # to LOOKAHEAD of those: what one read brought may be 128 Ki messages.
            while len(queue) < LOOKAHEAD \
                    and (item := decoder.next_message()) is not NEED_DATA:
                if type(item) is dict and "exec-oob" in item and "execute" not in item:
                    return self._check(item)
                queue.append(item)
        if not in_band:
            return None
        if queue:
            return self._check(queue.popleft())
        item = decoder.next_message()
        return None if item is NEED_DATA else self._check(item)

    # -- checks --------------------------------------------------------------
    def _check(self, item: object) -> Request | None:
        """A runnable request, or None after answering ``item`` here."""
        if type(item) is ParseError:
            self._put(encode_error(QMPError(item.desc), NO_ID), 0, KEEP)
            if not self._limit_told and item.desc in _LIMITS:
                self._limit_told = True
                setting = _LIMITS[item.desc](self._decoder)
                self.limit_notice = (f"request refused ({item.desc}): past {setting}; "
                                     "further ones on this connection are not logged")
            return None
        if type(item) is not dict:
            self._put(encode_error(QMPError(NOT_AN_OBJECT), NO_ID), 0, KEEP)
            return None
        id_ = item.get("id", NO_ID)
        try:
            request = self._envelope(item, id_)
            request.command.validate(request.args)
            if request.command is self._negotiation:
                self._put(encode_return(self._negotiate(request.args), id_), 0, KEEP)
                return None
        except QMPError as exc:
            self._put(encode_error(exc, id_), 0, KEEP)
            return None
        return request

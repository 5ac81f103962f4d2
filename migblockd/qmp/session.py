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

Holding: the core may ask for output to be *held* (a ``stamp`` > 0) until
the change it depends on is on disk; everything queued after held output is
held too, so order never changes.  :meth:`release` lets it go;
:meth:`fail_held` turns it into what the client must hear instead when the
disk refused: the replies of the failed commands become errors, their events
vanish, everything else goes out unchanged.

Ordering and OOB: in-band requests come out of :meth:`next_request` in arrival
order.  Once OOB is enabled, each call first parses everything buffered and
hands out the ``exec-oob`` requests among it first, ahead of in-band requests
that arrived earlier but have not had their turn (QEMU's "out-of-band"
promise).  Replies are written in the order they are given, so whoever runs
the requests keeps in-band replies in request order by answering each before
asking for the next.

The checks a request passes, and negotiation, are in
:mod:`migblockd.qmp.envelope` (:class:`~migblockd.qmp.envelope.Envelope`, a
base class of :class:`Session`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

from migblockd.qmp.encoding import (
    Parts,
    encode_error,
    encode_line,
    encode_return,
    encode_return_parts,
)
from migblockd.qmp.envelope import NOT_AN_OBJECT, QMP_CAPABILITIES, Command, Envelope, Request
from migblockd.qmp.errors import NO_ID, QMPError
from migblockd.qmp.framing import NEED_DATA, StreamDecoder
from migblockd.qmp.limits import Limits
from migblockd.qmp.wording import (
    NESTING_EXCEEDED,
    TOKEN_COUNT_EXCEEDED,
    TOKEN_SIZE_EXCEEDED,
    ParseError,
)

__all__ = ["EVENT", "KEEP", "VANISH", "Applied", "Session"]

#: The input limits' errors, and the setting each one enforces (at its value in force).
_LIMITS: dict[str, Callable[[StreamDecoder], str]] = {
    TOKEN_SIZE_EXCEEDED: lambda bounds: f"max-message-size={bounds.max_message_size} bytes",
    TOKEN_COUNT_EXCEEDED: lambda bounds: f"max-tokens={bounds.max_tokens}",
    NESTING_EXCEEDED: lambda bounds: f"max-nesting={bounds.max_nesting}",
}


#: What held output becomes if its commit fails: sent as it is (a reply, or an
#: event), or dropped (the event of a change that never happened).  A reply
#: that must become an error carries its request instead.
KEEP: Final = "keep"
EVENT: Final = "event"
VANISH: Final = "vanish"


class Applied:
    """The fate of a held reply whose command made a change elsewhere too (QEMU
    applied what migblockd forwarded): if its commit fails, the error says what
    stays applied there, in ``applied``'s words, not that nothing was changed."""

    __slots__ = ("applied", "request")

    def __init__(self, request: Request, applied: str) -> None:
        self.request = request
        self.applied = applied


class _Held:
    """The output held for one stamp, in order.

    Releasing moves whole runs (one ``list.extend``), not line by line: while
    a commit is in flight, every client holds one event line per change.
    Most of them are events of durable changes (VANISH), so only the other
    lines' fates are written down, and sizes are counted on release.
    """

    __slots__ = ("data", "fates", "replies", "stamp")

    def __init__(self, stamp: int) -> None:
        self.stamp = stamp
        self.data: list[bytes] = []
        #: The fate of each line that is not VANISH, by its index in ``data``.
        self.fates: dict[int, object] = {}
        self.replies = 0  # bytes of the lines that are not events


class Session(Envelope):
    """Per-connection QMP state machine (sans-I/O).

    ``commands`` is the full command table of the schema, including
    ``qmp_capabilities`` (whose validator the session uses; the session runs
    negotiation itself).  ``greeting`` is the ``{"QMP": {...}}`` object: its
    line is pending in :meth:`data_to_send` right away, and its
    ``capabilities`` are what ``qmp_capabilities`` may enable.
    """

    __slots__ = ("_decoder", "_held", "_limit_told", "_output", "_queue",
                 "event_bytes", "limit_notice", "output_bytes")

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
        self._output: list[bytes] = [encode_line(greeting)]
        #: Bytes in the output ready to send, and how many of them are events:
        #: what a client that does not read lets pile up (its replies are
        #: bounded by backpressure; see the server's max-output rule).
        self.output_bytes = len(self._output[0])
        self.event_bytes = 0
        #: Output waiting for a commit, oldest stamp first.
        self._held: deque[_Held] = deque()

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
            # in-band ones queued before them (QEMU's monitor does the same).
            # Only what one read brought is buffered, so parsing it all is bounded.
            while (item := decoder.next_message()) is not NEED_DATA:
                if type(item) is dict and "exec-oob" in item and "execute" not in item:
                    return self._check(item)
                queue.append(item)
        if not in_band:
            return None
        if queue:
            return self._check(queue.popleft())
        item = decoder.next_message()
        return None if item is NEED_DATA else self._check(item)

    # -- output --------------------------------------------------------------
    def reply(self, request: Request, result: object, stamp: int = 0,
              durable: bool = False, applied: str = "") -> None:
        """Answer ``request`` with its return value (``{}`` for commands without one).

        ``stamp`` > 0 holds the reply until :meth:`release` reaches it;
        ``durable`` says the command changed what is on disk, so that a failed
        commit turns this reply into an error; ``applied``, what the command
        changed that such a failure does not take back (see :class:`Applied`).
        """
        if type(result) is Parts:
            pieces = encode_return_parts(result, request.id)
            if not (stamp or self._held):  # a big listing: its pieces, unjoined
                self._output.extend(pieces)
                self.output_bytes += sum(map(len, pieces))
                return
            data = b"".join(pieces)
        else:
            data = encode_return(result, request.id)
        fate: object = KEEP
        if durable:
            fate = Applied(request, applied) if applied else request
        self._put(data, stamp, fate)

    def fail(self, request: Request | None, error: QMPError, stamp: int = 0,
             durable: bool = False) -> None:
        """Answer ``request`` with an error (None: a reply without ``id``);
        ``stamp`` and ``durable`` as for :meth:`reply`."""
        self._put(encode_error(error, NO_ID if request is None else request.id), stamp,
                  request if durable and request is not None else KEEP)

    def send_event(self, line: bytes, stamp: int = 0, durable: bool = False) -> None:
        """Queue a pre-encoded event line; dropped unless negotiation is complete."""
        # _put, inlined: this runs once per client for every event.
        if self.negotiated:
            held = self._held
            if stamp or held:
                run = held[-1] if held and held[-1].stamp >= stamp else self._hold(stamp)
                if not durable:
                    run.fates[len(run.data)] = EVENT
                run.data.append(line)
            else:
                self._output.append(line)
                size = len(line)
                self.output_bytes += size
                self.event_bytes += size

    def _hold(self, stamp: int) -> _Held:
        run = _Held(stamp)
        self._held.append(run)
        return run

    def _put(self, data: bytes, stamp: int, on_failure: object) -> None:
        held = self._held
        if stamp or held:
            # Stamps only grow; what is queued behind held output waits with it.
            run = held[-1] if held and held[-1].stamp >= stamp else self._hold(stamp)
            run.fates[len(run.data)] = on_failure
            run.data.append(data)
            run.replies += len(data)
        else:
            self._output.append(data)
            self.output_bytes += len(data)

    def _emit(self, data: bytes, on_failure: object) -> None:
        self._output.append(data)
        self.output_bytes += len(data)
        if on_failure is EVENT or on_failure is VANISH:
            self.event_bytes += len(data)

    def release(self, committed: int) -> bool:
        """Let held output through up to stamp ``committed``; True if any moved."""
        held = self._held
        if not held or held[0].stamp > committed:
            return False
        output = self._output
        while held and held[0].stamp <= committed:
            run = held.popleft()
            output.extend(run.data)
            size = sum(map(len, run.data))
            self.output_bytes += size
            self.event_bytes += size - run.replies
        return True

    @property
    def holds_reply(self) -> bool:
        """A reply (or an error) waits in held output."""
        return any(run.replies for run in self._held)

    def fail_held(self, error: QMPError,
                  partly: Callable[[str], QMPError] | None = None) -> int:
        """The commit failed: release held output as the client must now hear it.
        Returns how many replies became errors: ``error``, or for a command whose
        change elsewhere stays (:class:`Applied`), ``partly(applied)``."""
        failed = 0
        for run in self._held:
            fates = run.fates
            for n, data in enumerate(run.data):
                on_failure = fates.get(n, VANISH)
                if on_failure is KEEP or on_failure is EVENT:
                    self._emit(data, on_failure)
                elif isinstance(on_failure, Request):
                    self._emit(encode_error(error, on_failure.id), KEEP)
                    failed += 1
                elif isinstance(on_failure, Applied):
                    told = error if partly is None else partly(on_failure.applied)
                    self._emit(encode_error(told, on_failure.request.id), KEEP)
                    failed += 1
        self._held.clear()
        return failed

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @property
    def held_replies(self) -> int:
        """Bytes of replies held for commits (a run per stamp: a few at most)."""
        return sum(run.replies for run in self._held)

    def refuse(self, error: QMPError) -> None:
        """Turn the connection away: ``error`` (no ``id``) replaces the greeting."""
        self._output[:] = [encode_error(error, NO_ID)]
        self.output_bytes = len(self._output[0])

    def has_output(self) -> bool:
        return bool(self._output)

    def data_to_send(self) -> bytes:
        """Everything queued since the last call (greeting, replies, events), in order."""
        pieces, size, _ = self.take_output()
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        # The transport's accounting (migblockd.outbox) trusts the running count.
        assert len(data) == size, (len(data), size)
        return data

    def take_output(self) -> tuple[list[bytes], int, int]:
        """What :meth:`data_to_send` returns, in pieces, its size, and how many of
        its bytes are events."""
        output = self._output
        if not output:
            return [], 0, 0
        self._output = []
        size, events = self.output_bytes, self.event_bytes
        self.output_bytes = self.event_bytes = 0
        return output, size, events

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

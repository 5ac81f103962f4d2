"""``qemu.qmp``'s ``QMPClient``, fitted to migblockd (see :class:`QMPLink`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from qemu.qmp import Message, QMPClient, QMPError
from qemu.qmp.error import ProtocolError
from qemu.qmp.models import Greeting
from qemu.qmp.qmp_client import GreetingError, NegotiationError

__all__ = ["READ_LIMIT", "TRACE_LIMIT", "QMPLink", "Refused"]

#: The longest line a client reads: a 100,000-blocker listing with reasons of
#: 1024 characters, each escaped as ``\\uXXXX``, is about 600 MB.
READ_LIMIT: Final = 1 << 30

#: Bytes of a message its debug line shows at most.
TRACE_LIMIT: Final = 1000

#: How the daemon's last line ends when it closes a connection, after the answers it
#: owes (``--idle-timeout``: ``Timeouts.overdue()``, ``migblockd/timeouts.py``): an
#: error without an ``id`` that answers no request, followed by the end of the stream.
CLOSING: Final = "; closing the connection"


class Refused(QMPError):
    """The daemon turned the connection away: one error line instead of a greeting,
    or as the answer to ``qmp_capabilities`` (:attr:`negotiating`)."""

    def __init__(self, desc: str, *, negotiating: bool = False) -> None:
        super().__init__(desc)
        self.negotiating = negotiating


class QMPLink(QMPClient):
    """``QMPClient`` fitted to migblockd.

    * Events go to the client's streams only: the library's default listener
      would keep every event for as long as the connection lives (its history
      list), and an agent holding a blocker for hours would accumulate
      everyone's events.
    * An error without an ``id`` is the answer to the oldest request not yet
      answered.  The daemon, like QEMU, cannot give a request it could not
      parse (over ``--max-message-size``...) its ``id``, then carries on; it
      answers in order.  The library would drop the connection, and with it
      every ``scope: connection`` blocker.  The requests sent and not yet
      answered are kept here, in order: the library's own table forgets a
      request its caller gave up on (whose answer still comes, and must not
      be taken for the next one's, nor logged as a stranger's), and keeps one
      already answered until its caller has read the answer.
    * Lines up to :data:`READ_LIMIT`: the library's 10 MiB is less than a big
      ``query-blockers`` answer.
    * A refusal in place of the greeting (``max-clients``...), or in answer to
      ``qmp_capabilities`` (a connection that did not negotiate within the
      daemon's ``--negotiation-timeout``), is reported in the daemon's words.
    * A line longer than that ends the connection (the library can do nothing
      else with it): :attr:`gave_up` says so, since the daemon did nothing wrong.
    * A message the end of the stream cuts short (the daemon killed while it wrote)
      is that end, ``EOFError``: the library would take the part for a message it
      cannot parse, and log it whole as an error.
    * An error without an ``id`` that says the daemon closes the connection
      (:data:`CLOSING`) answers no request: it is kept (:attr:`farewell`), and
      the requests not answered end as the connection does, lost.
    * What ended the connection (the stream's end, the socket's error) is kept
      (:attr:`ended`), so that the client's errors chain it rather than the
      library's report of it.
    * A message is rendered for the log only when the log shows it, and cut to
      :data:`TRACE_LIMIT` bytes: the library pretty-prints each one sent or
      received, in pure Python, whatever the log's level (a listing's answer of
      hundreds of MB, rendered again for nothing).
    * The library's error lines for what the client raises itself are debug lines
      (:class:`_LibraryLog`): a refused or failed connection attempt, and the loss
      of the connection (a reset); an agent that retries would log one error per
      attempt for an error it has already handled.
    * Disconnecting waits at most ``flush_timeout`` seconds (None: forever) for
      the daemon to take what was sent, then closes: a stopped daemon takes
      nothing, and the library would wait for it forever (and so would closing
      the transport, which first writes out its buffer).
    """

    def __init__(self, name: str, deliver: Callable[[Message], None],
                 flush_timeout: float | None = None) -> None:
        super().__init__(name, readbuflen=READ_LIMIT)
        self.logger = _LibraryLog(self.logger)
        self._deliver = deliver  # each event, in the daemon's order
        self._flush_timeout = flush_timeout
        self._unanswered: dict[str, None] = {}  # ids sent, oldest first (an ordered set)
        #: Why this side ended the connection, when it did: a line over the limit.
        self.gave_up: str | None = None
        #: Whether the client closed it (``disconnect()``) while it was up.
        self.disconnected = False
        #: The daemon's last line, when it closed the connection saying why.
        self.farewell: str | None = None
        #: What ended the reader or the writer, and so the connection (``EOFError``
        #: at the stream's end, ``ConnectionResetError``...); None while it is up.
        self.ended: BaseException | None = None

    async def _bh_loop_forever(self, async_fn: Callable[[], Awaitable[None]],
                               name: str) -> None:
        try:
            await super()._bh_loop_forever(async_fn, name)
        except BaseException as exc:  # the library schedules the disconnect
            if self.ended is None:
                self.ended = exc
            raise

    async def _bh_flush_writer(self) -> None:
        try:
            async with asyncio.timeout(self._flush_timeout):
                await super()._bh_flush_writer()
        except TimeoutError:
            # What the daemon has not taken is dropped: unsent, a request never runs
            # (its caller already hears that its outcome is unknown).
            if self._writer is not None:
                self._writer.transport.abort()

    async def _readline(self) -> bytes:
        try:
            line = await super()._readline()
        except ValueError:  # asyncio's StreamReader: the line is over its limit
            self.gave_up = (f"a message from the daemon was longer than the "
                            f"{self.readbuflen} bytes this client reads")
            raise
        if not line.endswith(b"\n"):
            # The stream ended in the middle of a message (the daemon killed while it
            # wrote an answer): the end of the stream, as the library reports one
            # between messages.  Parsed, the part would be a DeserializationError,
            # which the library logs as an error quoting it whole (up to READ_LIMIT).
            raise EOFError(f"the connection ended {len(line)} bytes into a message")
        return line

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", _trace(msg))
        return msg

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", _trace(msg))
        return msg

    async def _event_dispatch(self, msg: Message) -> None:
        self._deliver(msg)

    async def _issue(self, msg: Message) -> str | None:
        msg_id = msg.get("id")
        if isinstance(msg_id, str):
            self._unanswered[msg_id] = None  # before it is sent, let alone answered
        try:
            return await super()._issue(msg)
        except BaseException:
            self._unanswered.pop(str(msg_id), None)
            raise

    async def _on_message(self, msg: Message) -> None:
        if "event" not in msg:
            if "id" in msg:
                msg_id = str(msg["id"])
                if msg_id in self._unanswered:
                    del self._unanswered[msg_id]
                    if msg_id not in self._pending:
                        # Its caller gave up (asyncio.timeout()), as the docstrings say
                        # to bound a command: the library would log it as an unknown id,
                        # a warning (an error for a refusal) in the agent's log.
                        self.logger.debug("the answer to %s, given up on, is dropped",
                                          msg_id)
                        return
            elif "error" in msg and (farewell := _farewell(msg["error"])) is not None:
                # Not the oldest request's answer: the connection's end, which the
                # requests not answered hear of as lost (their outcome is unknown).
                self.farewell = farewell
                return
            elif "error" in msg and self._unanswered:
                oldest = next(iter(self._unanswered))
                del self._unanswered[oldest]
                waiting = self._pending.get(oldest)  # None: its caller gave up on it
                if waiting is not None:
                    await waiting.put(msg)
                return
        await super()._on_message(msg)

    async def _negotiate(self) -> None:
        # The library's own asserts that the answer is no error: it reported the
        # daemon's refusal as "Negotiation failed: " and nothing more (and under
        # python -O took it for a success).
        arguments: dict[str, list[str]] = {}
        if self._greeting is not None and "oob" in self._greeting.QMP.capabilities:
            arguments["enable"] = ["oob"]
        await self._send(self.make_execute_msg("qmp_capabilities", arguments=arguments))
        reply = await self._recv()
        error = reply.get("error")
        if isinstance(error, dict) and isinstance(error.get("desc"), str):
            raise Refused(error["desc"], negotiating=True)
        if "return" not in reply:
            raise NegotiationError("Negotiation failed", ProtocolError(
                f"not an answer to qmp_capabilities: {reply}"))

    async def _get_greeting(self) -> Greeting:
        msg = await self._recv()
        error = msg.get("error") if "QMP" not in msg else None
        if isinstance(error, dict) and isinstance(error.get("desc"), str):
            raise Refused(error["desc"])
        try:
            return Greeting(msg)
        except (ProtocolError, KeyError, TypeError) as err:
            raise GreetingError("Did not understand Greeting", err) from err


#: The library's error lines for a failed connection attempt (``connect()``'s
#: ``_session_guard`` in qemu/qmp/protocol.py), by their first argument: the
#: client raises DisconnectedError, saying why, for each.
_CONNECTING: Final = frozenset({"Failed to establish connection",
                                "Failed to establish session"})


class _LibraryLog(logging.Logger):
    """The library's logger for one link (``qemu.qmp.protocol.NAME``): what it logs
    goes where the library's logger sends it, at the level the library gives it,
    except the error lines for what the client raises itself, which are debug lines
    (with the traceback the library logs there after each).  A connection refused
    (``max-clients``...) or that fails, and a connection lost to an error of the
    socket (``Task.Reader: ConnectionResetError``, where the end of the stream is
    an info line), are the caller's :class:`DisconnectedError`, which says so and
    chains the error.  The rest (the library's report of a bug in itself, a
    stranger's answer) stays as the library logs it."""

    def __init__(self, library: logging.Logger) -> None:
        super().__init__(library.name)
        self._library = library

    def isEnabledFor(self, level: int) -> bool:
        # The library's logger's level and its parents', as configured now (a
        # logger made outside the hierarchy keeps a cache no configuration clears).
        return self._library.isEnabledFor(level)

    def getEffectiveLevel(self) -> int:
        return self._library.getEffectiveLevel()

    def handle(self, record: logging.LogRecord) -> None:
        self._library.handle(record)  # its filters, its handlers and its parents'

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # the library's line, not this
        if (msg == "%s: %s" and args and args[0] in _CONNECTING) or msg == "Task.%s: %s":
            self.debug(msg, *args, **kwargs)
        else:
            super().error(msg, *args, **kwargs)


def _farewell(error: object) -> str | None:
    """The daemon's last line, if an error without an ``id`` is one (:data:`CLOSING`)."""
    desc = error.get("desc") if isinstance(error, dict) else None
    return desc if isinstance(desc, str) and desc.endswith(CLOSING) else None


def _trace(msg: Message) -> str:
    """``msg`` as sent, its first :data:`TRACE_LIMIT` bytes if longer."""
    data = bytes(msg)
    if len(data) <= TRACE_LIMIT:
        return data.decode(errors="replace")
    return f"{data[:TRACE_LIMIT].decode(errors='replace')}... ({len(data)} bytes)"

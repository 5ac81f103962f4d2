"""A small asyncio QMP client for a Unix socket.

The server writes one JSON object per line (ending in ``\\r\\n``).  Requests are sent
as compact JSON carrying an ``id`` (a raw one as typed, with its own ``id`` or none);
replies are matched to requests by ``id`` (a reply without one by its turn), and
events, which may arrive between replies, go to a callback in arrival order (so an
event caused by a command is seen before that command's reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any

from migblockd.shell.ids import id_key
from migblockd.shell.opening import (
    ClientError,
    ConnectError,
    Message,
    OpeningWait,
    open_qmp,
)
from migblockd.shell.strict_json import loads

#: The longest message read while no answer that grows with the blockers is
#: awaited: qmp-shell's (qemu.qmp's ``_limit``, "10MB like libvirt default").  An
#: event holds one blocker, the other answers are of a size fixed by the schema,
#: and QEMU's, forwarded, are what libvirt reads within that bound.
MESSAGE_LIMIT = 10 << 20
#: The longest answer to the commands of :data:`LISTINGS`: a 100,000-blocker
#: listing (the default max-blockers) with reasons of 1024 characters (the default
#: max-reason-length), each escaped as ``\\uXXXX``, is about 600 MB.
LINE_LIMIT = 1 << 30
#: The commands whose answer lists every blocker (query-migrate: their reasons).
LISTINGS = frozenset({"query-blockers", "query-migrate"})
_CHUNK = 1 << 16  # asked of the socket at a time
#: Why a connection ended when the server ended it (QMPClient.lost_reason); any
#: other reason is the shell's own doing or the socket's.
SERVER_CLOSED = "the server closed the connection"


class _TooLong(Exception):
    """A line longer than the bound of the moment (``limit``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class ConnectionLost(ClientError):
    """The server closed the connection (or it broke) while we needed it.

    ``sent``: whether the request it cut short had gone out (or begun to): its
    outcome is then unknown; not sent, it took no effect."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class QMPClient:
    """One connection. ``on_event(message)`` and ``on_lost()`` are called from the
    reader task; ``on_lost`` is called once when the server goes away unexpectedly.
    ``timeout``: a script's ``--timeout``, which bounds the opening too
    (:meth:`OpeningWait.bounded`)."""

    def __init__(
        self,
        on_event: Callable[[Message], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_lost = on_lost
        self._opening = OpeningWait.bounded(timeout)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Message]] = {}
        # The ids sent and not yet answered, oldest first, each with whether its answer
        # may be a listing (LISTINGS).  A request the daemon cannot parse (over
        # --max-message-size...) is answered without its id, in request order; after
        # Ctrl-C abandoned a request, its answer still comes, not the next request's.
        self._unanswered: dict[str, bool] = {}
        # What has been read of the line still to end (see _read_line), and how far
        # it is known to hold no line feed.
        self._buffer = bytearray()
        self._scanned = 0
        #: What to do with the reply to a request abandoned with Ctrl-C, when it
        #: comes (:meth:`execute`'s ``late``), by the request's key.
        self._late: dict[str, Callable[[Message], None]] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self.lost_reason = "not connected"
        self.greeting: Message = {}

    @property
    def connected(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

    async def connect(self, path: str) -> Message:
        """Connect and read the greeting; raises :class:`ConnectError`."""
        self._reader, self._writer, greeting = await open_qmp(
            path, self._opening, MESSAGE_LIMIT)
        self.greeting = greeting
        self._reader_task = asyncio.create_task(self._read_loop())
        return greeting

    async def negotiate(self) -> None:
        """Send ``qmp_capabilities``; raises :class:`ConnectError` if refused, or
        unanswered in time (:meth:`ask`), as ``migblockd.client`` does."""
        # OOB when the greeting offers it, as qemu.qmp (qmp-shell's) enables it: a
        # raw {"exec-oob": ...} request then runs, as there, rather than being
        # refused as unexpected.  The shell waits for each reply before sending
        # the next request, so no reply overtakes another.
        offered = self.greeting.get("QMP", {}).get("capabilities")
        oob = isinstance(offered, list) and "oob" in offered
        reply = await self.ask("qmp_capabilities", {"enable": ["oob"]} if oob else None)
        if "error" in reply:
            desc = reply["error"].get("desc", reply["error"])
            raise ConnectError(f"capabilities negotiation failed: {desc}")

    async def ask(self, command: str, arguments: Message | None = None) -> Message:
        """The reply to ``command`` (no arguments), asked for while opening the
        connection; raises :class:`ConnectError` when the connection goes, or when
        no answer comes within the greeting's bound (:class:`OpeningWait`): a daemon
        that greets and then answers nothing (stopped, hung) is as broken as one
        that does not greet, and a script must not wait on it for ever."""
        try:
            async with asyncio.timeout(self._opening.seconds):
                request: Message = {"execute": command}
                if arguments is not None:
                    request["arguments"] = arguments
                return await self.execute(request)
        except ConnectionLost as err:
            raise ConnectError(str(err)) from None
        except TimeoutError:
            raise ConnectError(f"no answer to {command} within {self._opening.said}") from None

    def awaits(self, id: Any) -> bool:
        """Whether a request with ``id`` has had no reply yet (one abandoned, say):
        a second one with that id could not be told from it by its reply."""
        return id_key(id) in self._unanswered

    @property
    def awaiting(self) -> bool:
        """Whether any request sent has had no reply yet (one abandoned, say)."""
        return bool(self._unanswered)

    async def execute(self, message: Message, text: str | None = None,
                      late: Callable[[Message], None] | None = None) -> Message:
        """Send ``message`` (an ``id`` is added when it has none) and wait for its reply.

        ``text``: ``message`` as the operator typed it (UTF-8), sent as it is, with no
        ``id`` added; a reply without one is taken for it in its turn, as the
        daemon, like QEMU, answers in order.  ``late``: called with the reply if it
        comes after the wait for it was cancelled (Ctrl-C): the request took effect
        all the same, and what it did may be the caller's to know.

        Raises :class:`ConnectionLost` when the connection is gone or goes away first.
        """
        if not self.connected or self._writer is None:
            raise ConnectionLost(self.lost_reason, sent=False)
        if text is not None:
            # A key no reply's id can have (not JSON): only its turn matches it.
            key = id_key(message["id"]) if "id" in message else f"typed {next(self._ids)}"
            encoded = (text + "\n").encode()
        else:
            message = dict(message)
            if "id" not in message:
                message["id"] = self._fresh_id()
            key = id_key(message["id"])
            data = json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n"
            try:
                encoded = data.encode()
            except UnicodeEncodeError:  # a lone surrogate, typed as "\ud800": sent so
                encoded = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        command = message.get("execute", message.get("exec-oob"))
        # A raw request's may be no string (a list): the daemon's to refuse.
        self._unanswered[key] = isinstance(command, str) and command in LISTINGS
        try:
            self._writer.write(encoded)
            await self._writer.drain()
        except (OSError, RuntimeError) as err:
            self._pending.pop(key, None)
            self._unanswered.pop(key, None)
            # A request too big for the socket (64 KiB and more) is still being
            # written when the daemon goes: the reader has failed its future too,
            # which nobody would await (asyncio then prints "Future exception was
            # never retrieved" at exit).  Its failure is the one said.
            if future.done() and not future.cancelled():
                lost = future.exception()
                if lost is None:
                    return future.result()  # answered before the rest failed to go
                if isinstance(lost, ConnectionLost):
                    raise lost from None
            future.cancel()
            raise ConnectionLost(f"connection lost: {err}") from None
        try:
            return await future
        finally:
            self._pending.pop(key, None)
            if late is not None and key in self._unanswered:
                self._late[key] = late  # abandoned: its reply is still to come

    def _fresh_id(self) -> str:
        """An id of the shell's own, and not one a request typed with that id (its
        reply not come, Ctrl-C having abandoned it) still awaits."""
        while True:
            id = f"shell-{next(self._ids)}"
            if id_key(id) not in self._unanswered:
                return id

    async def close(self) -> None:
        """Close the connection (no ``on_lost`` callback)."""
        self._closing = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, RuntimeError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._fail_pending("connection closed")

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        self._pending.clear()
        self._unanswered.clear()
        self._late.clear()

    async def _read_line(self) -> bytes:
        """The next line, or b"" at the end of the input.

        A line the end cuts short (the daemon killed while it wrote a reply) is that
        end, as a server that closes between messages: parsed, the part would say
        that the daemon sent something it cannot read.

        Read in pieces, so that the line is held to the bound of the moment:
        :data:`LINE_LIMIT` while an answer that may list every blocker is awaited,
        :data:`MESSAGE_LIMIT` otherwise.  A server that sends a line without end
        (not migblockd: a socket planted in its place) is cut off there, and
        costs that much memory, not a gigabyte."""
        assert self._reader is not None
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._scanned)
            limit = LINE_LIMIT if any(self._unanswered.values()) else MESSAGE_LIMIT
            if (len(buffer) if end < 0 else end) > limit:
                raise _TooLong(limit)
            if end >= 0:
                line = bytes(buffer[: end + 1])
                del buffer[: end + 1]
                self._scanned = 0
                return line
            self._scanned = len(buffer)
            chunk = await self._reader.read(_CHUNK)
            if not chunk:
                buffer.clear()
                self._scanned = 0
                return b""
            buffer += chunk

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = SERVER_CLOSED
        try:
            while True:
                try:
                    line = await self._read_line()
                except _TooLong as err:
                    # The daemon did nothing wrong: its log shows nothing, so say so.
                    reason = (f"a message from the daemon was longer than the {err.limit:,} "
                              "bytes this shell reads, so the shell closed the connection")
                    break
                except OSError as err:
                    reason = f"connection lost: {err}"
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    # Held to what the shell sends: printed, a NaN would make the
                    # script's output no JSON, and a megabyte of digits take seconds.
                    # Bytes that are not UTF-8 read as U+FFFD, as QEMU writes them
                    # (quoted_str() in qobject/json-writer.c).
                    message = loads(line.decode("utf-8", "replace"))
                except ValueError as err:
                    # Never from migblockd.  Skipped, it could be the answer a command
                    # waits for, which would then wait for ever.
                    why = (f"not JSON: {err.msg} at column {err.colno}"
                           if isinstance(err, json.JSONDecodeError) else str(err))
                    reason = (f"a message from the daemon cannot be read ({why}), so the "
                              "shell closed the connection")
                    break
                if not isinstance(message, dict):
                    # Every QMP message is an object (qemu.qmp ends the connection on
                    # one that is not): skipped, it too could be an awaited answer.
                    reason = ("a message from the daemon cannot be read (not a JSON "
                              "object), so the shell closed the connection")
                    break
                self._dispatch(message)
        finally:
            self.lost_reason = reason
            self._fail_pending(reason)
            if not self._closing:
                # Let go of the socket now, not at the next command (or exit): a
                # stopping daemon half-closes each connection and waits for its
                # peer to close too (2 s), and a shell idle at its prompt would
                # hold up every stop and restart of the daemon that long.
                if self._writer is not None:
                    self._writer.close()
                if self._on_lost is not None:
                    self._on_lost()

    def _dispatch(self, message: Message) -> None:
        if "event" in message:
            if self._on_event is not None:
                self._on_event(message)
            return
        if "id" in message:
            key: str | None = id_key(message["id"])
        elif self._unanswered:
            # A reply without id (a request the server could not parse): the
            # answer to the oldest request not yet answered, whether or not its
            # caller still waits for it.
            key = next(iter(self._unanswered))
        else:
            key = None
        if key is None:
            return
        self._unanswered.pop(key, None)
        late = self._late.pop(key, None)
        future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(message)
        elif late is not None:
            late(message)

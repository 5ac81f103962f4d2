"""A Python client for agents that would rather not speak QMP by hand.

::

    async with MigblockClient() as client:                # the default socket
        async with client.holding("dump in progress") as blocker:
            ...                                           # migration is blocked here
        for blocker in await client.blockers():
            print(blocker.id, blocker.reason, blocker.modes)

Built on ``qemu.qmp``'s ``QMPClient`` (which connects, reads the greeting and
negotiates), with typed results: :class:`Blocker` mirrors the schema's
``BlockerInfo`` and :class:`Event` a QMP event.

Errors, all :class:`ClientError`:

* :class:`CommandError`: the daemon refused a command; ``error_class`` and
  ``desc`` are the daemon's, verbatim (``GenericError``, ``"Duplicate blocker
  ID 'dump'"``), also for a request it could not read (``"JSON token size
  limit exceeded"``): the connection stays up.
* :class:`DisconnectedError`: connecting failed (or the daemon turned the
  connection away, in its words), the client is not connected, or the
  connection was lost (the cause is chained).  Whether a command in
  flight when it was lost took effect is unknown.

:meth:`MigblockClient.holding` adds a ``scope: connection`` blocker for the
duration of an ``async with`` block and deletes it when the block ends.  The
daemon deletes such a blocker itself when its connection closes, so a process
that dies (even by SIGKILL) cannot leave it behind.  Conversely, if the
connection is lost while the block runs, the blocker is gone: the block's exit
then raises :class:`DisconnectedError`, unless the block itself raised.

:meth:`MigblockClient.events` returns an :class:`EventStream`, which receives
the events that arrive from the moment it is created::

    async for event in client.events("BLOCKER_DELETED"):
        print(event.data["id"], event.data["cause"])

A stream ends (``StopAsyncIteration``) when it is closed or the client
disconnects, and raises :class:`DisconnectedError` when the connection is
lost.  It keeps events until they are read; one that is no longer used is
dropped with its last reference (or close it: ``async with client.events() as
stream``).  Only streams keep events: a client without one stores none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final

from qemu.qmp import (
    ConnectError,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qemu.qmp.error import ProtocolError
from qemu.qmp.models import Greeting
from qemu.qmp.qmp_client import GreetingError

from migblockd.paths import connect_failure, default_socket_path

log = logging.getLogger("migblockd.client")

__all__ = [
    "Blocker",
    "BlockerOwner",
    "ClientError",
    "CommandError",
    "DisconnectedError",
    "Event",
    "EventStream",
    "MigblockClient",
]


class ClientError(Exception):
    """Base of every error :mod:`migblockd.client` raises."""


class CommandError(ClientError):
    """The daemon answered a command with an error.  ``str()`` is its ``desc``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(desc)
        #: The command that failed (``"add-blocker"``).
        self.command = command
        #: The QMP error class (``"GenericError"``).
        self.error_class = error_class
        #: The daemon's description of the error, verbatim.
        self.desc = desc


class DisconnectedError(ClientError):
    """Not connected: connecting failed, or the connection is closed or was lost."""


# --------------------------------------------------------------------------- values


def _time(value: Mapping[str, Any]) -> datetime:
    """A QMP ``{"seconds": S, "microseconds": US}`` as an aware UTC datetime."""
    seconds, micro = value["seconds"], value["microseconds"]
    if not isinstance(seconds, int) or not isinstance(micro, int):
        raise TypeError(f"not a timestamp: {value!r}")
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micro)


@dataclass(frozen=True)
class BlockerOwner:
    """The peer credentials of the connection that added a blocker."""

    pid: int
    uid: int
    gid: int
    #: The name of ``uid``, when the daemon's system knows one.
    user: str | None = None


@dataclass(frozen=True)
class Blocker:
    """A migration blocker, as the schema's ``BlockerInfo`` describes it."""

    #: Unique among current blockers; what :meth:`MigblockClient.del_blocker` takes.
    id: str
    #: Why migration is blocked; ``migrate`` reports it verbatim.
    reason: str
    #: The migration modes it blocks (``"normal"``, ``"cpr-reboot"``...), in MigMode order.
    modes: tuple[str, ...]
    #: Whether it ignores the daemon's --only-migratable.
    internal: bool
    #: ``"daemon"`` (until deleted) or ``"connection"`` (until deleted or its connection closes).
    scope: str
    #: When it was added (UTC); None for QEMU's own blockers, of which QEMU says nothing.
    added: datetime | None = None
    #: Who added it; None when the daemon did not know.
    owner: BlockerOwner | None = None
    #: ``"migblockd"``, or ``"qemu"`` for the gated QEMU's own (ids ``qemu:N``), which
    #: only QEMU deletes.
    source: str = "migblockd"

    @classmethod
    def from_qmp(cls, data: Mapping[str, Any]) -> Blocker:
        """A ``BlockerInfo`` object as the daemon sends it (unknown members are ignored)."""
        try:
            owner, added = data.get("owner"), data.get("added")
            return cls(
                id=_str(data["id"]), reason=_str(data["reason"]),
                modes=tuple(_str(m) for m in data["modes"]), internal=bool(data["internal"]),
                scope=_str(data["scope"]), added=None if added is None else _time(added),
                owner=None if owner is None else BlockerOwner(
                    pid=owner["pid"], uid=owner["uid"], gid=owner["gid"],
                    user=None if owner.get("user") is None else _str(owner["user"])),
                source=_str(data.get("source", "migblockd")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ClientError(f"not a BlockerInfo: {data!r} ({exc!r})") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


@dataclass(frozen=True)
class Event:
    """A QMP event: ``BLOCKER_ADDED``, ``BLOCKER_DELETED``, ``MIGRATION``..."""

    name: str
    #: The event's ``data`` member as sent (empty when the event has none).
    data: Mapping[str, Any] = field(hash=False)
    #: When the daemon emitted it (UTC).
    timestamp: datetime

    @classmethod
    def from_qmp(cls, message: Mapping[str, Any]) -> Event:
        try:
            data = message.get("data", {})
            if not isinstance(data, Mapping):
                raise TypeError("data is not an object")
            return cls(name=_str(message["event"]), data=dict(data),
                       timestamp=_time(message["timestamp"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ClientError(f"not a QMP event: {dict(message)!r} ({exc!r})") from None

    @property
    def blocker(self) -> Blocker | None:
        """The new blocker of a ``BLOCKER_ADDED`` event; None for other events."""
        return Blocker.from_qmp(self.data) if self.name == "BLOCKER_ADDED" else None


# --------------------------------------------------------------------------- events


class _End:
    """Put in a stream's queue after its last event; ``lost`` says why, if it was lost."""

    def __init__(self, lost: str | None) -> None:
        self.lost = lost


class EventStream:
    """The events a client receives from the stream's creation on; ``async for`` them.

    Created by :meth:`MigblockClient.events`.  ``names``, when given, keeps only
    the events of those names.
    """

    def __init__(self, client: MigblockClient, names: Iterable[str]) -> None:
        self._client = client
        self.names: Final = frozenset(names)
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._ended = False

    def _put(self, event: Event | _End) -> None:
        if self._ended:
            return
        if isinstance(event, _End):
            self._ended = True
        elif self.names and event.name not in self.names:
            return
        self._queue.put_nowait(event)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # an ended stream stays ended
            if item.lost is not None:
                raise DisconnectedError(item.lost)
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop receiving events; iteration ends after the events already received."""
        self._client._streams.discard(self)
        self._put(_End(None))

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


#: The longest line a client reads: a 100,000-blocker listing with reasons of
#: 1024 characters, each escaped as ``\\uXXXX``, is about 600 MB.
READ_LIMIT: Final = 1 << 30


class _Refused(QMPError):
    """The daemon turned the connection away (one error line instead of a greeting)."""


class _QMP(QMPClient):
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
      be taken for the next one's), and keeps one already answered until its
      caller has read the answer.
    * Lines up to :data:`READ_LIMIT`: the library's 10 MiB is less than a big
      ``query-blockers`` answer.
    * A refusal in place of the greeting (``max-clients``...) is reported in
      the daemon's words.
    """

    def __init__(self, client: MigblockClient, name: str) -> None:
        super().__init__(name, readbuflen=READ_LIMIT)
        self._client = client
        self._unanswered: dict[str, None] = {}  # ids sent, oldest first (an ordered set)

    async def _event_dispatch(self, msg: Message) -> None:
        self._client._deliver(msg)

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
                self._unanswered.pop(str(msg["id"]), None)
            elif "error" in msg and self._unanswered:
                oldest = next(iter(self._unanswered))
                del self._unanswered[oldest]
                waiting = self._pending.get(oldest)  # None: its caller gave up on it
                if waiting is not None:
                    await waiting.put(msg)
                return
        await super()._on_message(msg)

    async def _get_greeting(self) -> Greeting:
        msg = await self._recv()
        error = msg.get("error") if "QMP" not in msg else None
        if isinstance(error, dict) and isinstance(error.get("desc"), str):
            raise _Refused(error["desc"])
        try:
            return Greeting(msg)
        except (ProtocolError, KeyError, TypeError) as err:
            raise GreetingError("Did not understand Greeting", err) from err


# --------------------------------------------------------------------------- the client


class MigblockClient:
    """A connection to migblockd.  ``async with MigblockClient(path) as client:``.

    ``path`` defaults to the daemon's default socket
    (``migblockd.paths.default_socket_path()``); ``name`` names the connection in
    ``qemu.qmp``'s logs.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 name: str = "migblockd.client") -> None:
        self.path = os.fspath(path) if path is not None else str(default_socket_path())
        self.name = name
        self._qmp: _QMP | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    # -- connection

    @property
    def connected(self) -> bool:
        return self._qmp is not None and self._qmp.runstate == Runstate.RUNNING

    async def connect(self) -> None:
        """Connect, read the greeting and negotiate capabilities (again, after a
        connection was lost)."""
        if self._qmp is not None:
            if self.connected:
                raise ClientError(f"already connected to {self.path}")
            await self.disconnect()  # what is left of a lost connection
        qmp = _QMP(self, self.name)
        try:
            await qmp.connect(self.path)
        except ConnectError as exc:
            cause = exc.exc
            if isinstance(cause, _Refused):
                raise DisconnectedError(f"migblockd at {self.path} refused the connection: "
                                        f"{cause}") from None
            why = connect_failure(self.path, cause) if isinstance(cause, OSError) else str(exc)
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: {why}"
                                    ) from cause
        self._qmp, self._closing = qmp, False
        self._watch = asyncio.create_task(self._watch_connection(qmp))

    async def _watch_connection(self, qmp: _QMP) -> None:
        while qmp.runstate == Runstate.RUNNING:
            await qmp.runstate_changed()
        self._end_streams(None if self._closing else
                          f"the connection to migblockd at {self.path} was lost")

    def _end_streams(self, lost: str | None) -> None:
        for stream in list(self._streams):
            stream._put(_End(lost))
        self._streams.clear()

    async def disconnect(self) -> None:
        """Close the connection (the daemon releases its ``scope: connection`` blockers).

        Never raises: a connection lost earlier has already been reported by the
        commands, streams and :meth:`holding` that were using it.
        """
        qmp, self._qmp = self._qmp, None
        if qmp is None:
            return
        self._closing = True
        with contextlib.suppress(Exception):
            await qmp.disconnect()  # re-raises what ended a lost connection
        if self._watch is not None:
            await asyncio.wait({self._watch})
            self._watch = None
        self._end_streams(None)

    async def __aenter__(self) -> MigblockClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.disconnect()

    # -- commands

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None
                      ) -> Any:
        """Run any command of the schema; return its ``return`` value as decoded JSON."""
        if self._qmp is None:
            raise DisconnectedError(f"not connected to migblockd at {self.path}")
        try:
            # The library serializes in its writer task, where a failure would drop the
            # connection; and the daemon, like QEMU, takes strict JSON in UTF-8 only (a
            # lone surrogate, as os.fsdecode() makes of a byte that is not UTF-8, is not).
            json.dumps(arguments, allow_nan=False, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ClientError(f"arguments of {command} are not JSON: {exc}") from None
        try:
            return await self._qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandError(command, exc.error_class, exc.error.error.desc) from None
        except (ExecInterruptedError, StateError) as exc:
            raise DisconnectedError(
                f"the connection to migblockd at {self.path} was lost"
                + (f" before it replied to {command}" if isinstance(
                    exc, ExecInterruptedError) else "")) from exc
        except QMPError as exc:
            raise ClientError(f"the reply to {command} was not understood: {exc}") from exc

    async def add_blocker(self, reason: str, *, modes: Iterable[str] | None = None,
                          internal: bool = False, id: str | None = None,
                          scope: str | None = None) -> Blocker:
        """Add a migration blocker (``add-blocker``) and return it.

        ``modes`` defaults to every mode, ``id`` to one the daemon picks, ``scope``
        to ``"daemon"``; ``internal`` ignores the daemon's --only-migratable.
        """
        arguments: dict[str, object] = {"reason": reason}
        if modes is not None:
            if isinstance(modes, str):
                raise TypeError("modes is a list of mode names, not one string")
            arguments["modes"] = list(modes)
        if internal:
            arguments["internal"] = True
        if id is not None:
            arguments["id"] = id
        if scope is not None:
            arguments["scope"] = scope
        return Blocker.from_qmp(await self.execute("add-blocker", arguments))

    async def del_blocker(self, blocker: Blocker | str) -> None:
        """Delete a blocker (``del-blocker``), given it or its id."""
        blocker_id = blocker.id if isinstance(blocker, Blocker) else blocker
        await self.execute("del-blocker", {"id": blocker_id})

    async def blockers(self, mode: str | None = None) -> list[Blocker]:
        """The current blockers, oldest first; only those blocking ``mode`` if given."""
        reply = await self.execute("query-blockers", None if mode is None else {"mode": mode})
        if not isinstance(reply, list):
            raise ClientError(f"query-blockers returned {reply!r}, not a list")
        return [Blocker.from_qmp(item) for item in reply]

    @contextlib.asynccontextmanager
    async def holding(self, reason: str, *, modes: Iterable[str] | None = None,
                      internal: bool = False, id: str | None = None
                      ) -> AsyncIterator[Blocker]:
        """``async with client.holding(reason) as blocker:`` block migration meanwhile.

        Adds a ``scope: connection`` blocker on entry and deletes it on exit.  If
        someone deleted it meanwhile there is nothing to delete.  If the connection
        was lost meanwhile, the daemon has already dropped the blocker: the exit
        raises :class:`DisconnectedError`, unless the block raised an exception.
        """
        blocker = await self.add_blocker(reason, modes=modes, internal=internal, id=id,
                                         scope="connection")
        try:
            yield blocker
        except BaseException:
            with contextlib.suppress(DisconnectedError):
                await self._release(blocker)
            raise
        await self._release(blocker)

    async def _release(self, blocker: Blocker) -> None:
        with contextlib.suppress(CommandError):  # deleted by someone else meanwhile
            await self.del_blocker(blocker)

    def events(self, *names: str) -> EventStream:
        """A stream of the events received from now on (only ``names`` if given)."""
        stream = EventStream(self, names)
        if self.connected:
            self._streams.add(stream)
        else:
            stream._put(_End(f"not connected to migblockd at {self.path}"))
        return stream

    def _deliver(self, message: Message) -> None:
        # Called by qemu.qmp's reader task for each event, in the daemon's order.  An
        # exception here would end the reader, and the connection with it.
        try:
            event = Event.from_qmp(message)
        except ClientError as exc:
            log.warning("ignoring an event from %s: %s", self.path, exc)
            return
        for stream in list(self._streams):
            stream._put(event)

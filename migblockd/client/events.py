"""A client's event streams: the events it receives, kept for each stream until read.

Apart from :mod:`migblockd.client`, whose :class:`~migblockd.client.MigblockClient`
holds the connection and the commands: what is kept here is what the reader of a
stream is owed, and the bound on it, which no command needs.  The events that
``qemu.qmp``'s reader task hands over are decoded (:class:`Event`) and put in every
open stream at once, in the daemon's order: the daemon disconnects a client that
leaves events unread past its ``--max-output``, so nothing waits for a stream's
reader, which is bounded instead by the stream's ``max_unread``
(:data:`MAX_UNREAD` by default).  A stream ends after its last event: closed, the
client disconnected (``StopAsyncIteration``), the connection lost
(:class:`DisconnectedError`) or its bound passed (:class:`EventsLostError`).

:class:`EventSource` is a part of :class:`~migblockd.client.MigblockClient` (a base
class of it): the streams it feeds are its state, and what of the client it reads
is named there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable
from typing import Final

from qemu.qmp import Message

from migblockd.client.errors import ClientError, DisconnectedError, EventsLostError
from migblockd.client.values import Blocker, Event

__all__ = ["MAX_UNREAD", "EventSource", "EventStream", "HeldId"]

log = logging.getLogger("migblockd.client")

_BLOCKER_EVENTS: Final = frozenset({"BLOCKER_ADDED", "BLOCKER_DELETED"})


class _End:
    """Put in a stream's queue after its last event; ``error``, ``why`` say what the
    reader gets after it (``StopAsyncIteration`` when ``error`` is None)."""

    def __init__(self, error: type[ClientError] | None = None, why: str = "",
                 cause: BaseException | None = None) -> None:
        self.error = error
        self.why = why
        #: What ended the connection, chained to the error.
        self.cause = cause


#: How many unread events a stream keeps by default: about the --max-output
#: default's worth (4 MiB of events of a few hundred bytes each).
MAX_UNREAD: Final = 10_000


class EventStream:
    """The events a client receives from the stream's creation on; ``async for`` them.

    Created by :meth:`MigblockClient.events`.  ``names``, when given, keeps only
    the events of those names; ``max_unread`` (None: no bound) is how many it keeps
    unread before it ends with :class:`EventsLostError`.
    """

    def __init__(self, client: EventSource, names: Iterable[str],
                 max_unread: int | None = MAX_UNREAD) -> None:
        self._client = client
        self.names: Final = frozenset(names)
        self.max_unread: Final = max_unread
        self._queue: asyncio.Queue[Event | _End] = asyncio.Queue()
        self._ended = False

    def _put(self, event: Event | _End) -> None:
        if self._ended:
            return
        if isinstance(event, _End):
            self._ended = True
        elif self.names and event.name not in self.names:
            return
        elif self.max_unread is not None and self._queue.qsize() >= self.max_unread:
            self._client._streams.discard(self)
            self._ended = True
            event = _End(EventsLostError, f"more than {self.max_unread} events were left "
                         f"unread on this stream, which ended; later events were not kept")
        self._queue.put_nowait(event)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # an ended stream stays ended
            if item.error is not None:
                raise item.error(item.why) from item.cause
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop receiving events; iteration ends after the events already received."""
        self._client._streams.discard(self)
        self._put(_End())

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class HeldId:
    """What the daemon said of an id a :meth:`~migblockd.client.MigblockClient.holding`
    block chose: its ``BLOCKER_ADDED`` and ``BLOCKER_DELETED`` events, in order.

    Someone else may delete the block's blocker and add another of the same id: the
    block must then delete nothing.  The daemon sends every client each change before
    it answers whoever made it, and before any later answer to this client: once the
    block's exit has the answer to a request of its own, those events have been read
    (not before: the block may have held up the event loop meanwhile), unless the
    change is made in the very moment the deletion is sent.
    """

    __slots__ = ("_events", "id")

    def __init__(self, id: str) -> None:
        self.id = id
        self._events: list[Event] = []

    def deleted_since_added(self, blocker: Blocker) -> bool:
        """Whether ``blocker`` was deleted after its ``BLOCKER_ADDED`` (False when
        that event was not seen: then only the deletion's answer can tell)."""
        added = False
        for event in self._events:
            if not added:
                with contextlib.suppress(ClientError):
                    added = event.blocker == blocker
            elif event.name == "BLOCKER_DELETED":
                return True
        return False


class EventSource:
    """The event streams of :class:`~migblockd.client.MigblockClient` (a base class of it)."""

    # The client's, which it reads.
    path: str

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._held_ids: list[HeldId] = []  # the ids holding() blocks chose

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def _in_its_loop(self) -> None:
        raise NotImplementedError

    def events(self, *names: str, max_unread: int | None = MAX_UNREAD) -> EventStream:
        """A stream of the events received from now on (only ``names`` if given).

        It keeps at most ``max_unread`` events unread (None: no bound, for a reader
        that is sure to keep up); one more ends it with :class:`EventsLostError`.
        Asked for outside the event loop the client is connected in, it raises
        :class:`ClientError`, as the commands do: that loop's reader feeds it.
        """
        if max_unread is not None and max_unread < 1:
            raise ValueError(f"max_unread must be at least 1, not {max_unread}")
        if self.connected:
            try:
                self._in_its_loop()
            except RuntimeError:  # no event loop at all in this thread
                raise ClientError(f"this client of migblockd at {self.path} is connected "
                                  "in another event loop: use it there") from None
        stream = EventStream(self, names, max_unread)
        if self.connected:
            self._streams.add(stream)
        else:
            stream._put(_End(DisconnectedError, f"not connected to migblockd at {self.path}"))
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
        if self._held_ids and event.name in _BLOCKER_EVENTS:
            for held in self._held_ids:
                if event.data.get("id") == held.id:
                    held._events.append(event)

    def _hold_id(self, id: str) -> HeldId:
        """Keep what the daemon says of ``id`` from now on, until :meth:`_unhold_id`."""
        held = HeldId(id)
        self._held_ids.append(held)
        return held

    def _unhold_id(self, held: HeldId | None) -> None:
        if held is not None:
            self._held_ids.remove(held)

    def _end_streams(self, lost: str | None, cause: BaseException | None = None) -> None:
        end = _End() if lost is None else _End(DisconnectedError, lost, cause)
        for stream in list(self._streams):
            stream._put(end)
        self._streams.clear()

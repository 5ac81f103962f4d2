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
* :class:`DisconnectedError`: connecting failed (why, in the shell's words:
  a connection that ends before the greeting names the daemon's log; a daemon
  that turns the connection away says why), the client is not connected, or
  the connection was lost (chained to what ended it: ``EOFError`` at the end of
  the stream, the socket's ``OSError`` such as ``ConnectionResetError``; later
  errors of that connection chain the same), also when this client ended
  it, for a message longer than it reads (``link.READ_LIMIT``, 1 GiB: the
  message says so), or closed by :meth:`~MigblockClient.disconnect` while a
  command waited for its answer (the message says that too), and when the
  daemon closed it saying why, after a message left unfinished for its
  ``--idle-timeout`` (the message ends with the daemon's words: ``Message left
  unfinished for idle-timeout=30s; closing the connection``).  Whether a command
  in flight when it was lost took effect is unknown.
* :class:`EventsLostError`: an event stream's reader fell behind (see
  below); the stream ended, the connection did not.

:meth:`MigblockClient.holding` adds a ``scope: connection`` blocker for the
duration of an ``async with`` block and deletes it when the block ends.  The
daemon deletes such a blocker itself when its connection closes, so a process
that dies (even by SIGKILL) cannot leave it behind.  Conversely, if the
connection is lost while the block runs, the blocker is gone: the block's exit
then raises :class:`DisconnectedError`, unless the block itself raised, also
when the client has connected again meanwhile.

:meth:`MigblockClient.events` returns an :class:`EventStream`, which receives
the events that arrive from the moment it is created::

    async for event in client.events("BLOCKER_DELETED"):
        print(event.data["id"], event.data["cause"])

A stream ends (``StopAsyncIteration``) when it is closed or the client
disconnects, and raises :class:`DisconnectedError` when the connection is
lost.  It keeps events until they are read, at most ``max_unread`` of them
(:data:`MAX_UNREAD` by default): one more, and the stream ends, raising
:class:`EventsLostError` once the events it kept have been read.  The daemon
disconnects a client that leaves events unread past its ``--max-output`` (or, one
holding connection-scoped blockers, discards its events until it reads); this
library reads them all as they come, so that its replies are never stuck behind
them, and the bound is kept here instead, per stream.  Events come in bursts: the
library hands over all it has received in one turn of the event loop (some 1,500
when a peer's 6,000 connection-scoped blockers are released at once), and a reader
that awaits something between events falls behind by that many a turn; one that
must not lose any in a burst of tens of thousands (one client's connection-scoped
blockers released together) gives ``max_unread`` room for them.  A client belongs
to the event loop it connects in (each ``asyncio.run()`` is one): used connected
from another, it raises :class:`ClientError`, and :meth:`MigblockClient.disconnect`
there ends its connection.  A stream that is no longer used is dropped with its last
reference (or close it: ``async with client.events() as stream``).  Only streams
keep events: a client without one stores none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any, Final

from migblockd.client.commands import Commands
from migblockd.client.errors import (
    ClientError,
    CommandError,
    DisconnectedError,
    EventsLostError,
)
from migblockd.client.events import MAX_UNREAD, EventStream, HeldId
from migblockd.client.link import QMPLink
from migblockd.client.values import Blocker, BlockerOwner, Event
from migblockd.registry.errors import NotFound  # the daemon's words for it

__all__ = [
    "MAX_UNREAD",
    "Blocker",
    "BlockerOwner",
    "ClientError",
    "CommandError",
    "DisconnectedError",
    "Event",
    "EventStream",
    "EventsLostError",
    "MigblockClient",
]

log = logging.getLogger("migblockd.client")


#: How long :meth:`MigblockClient.connect` waits for the greeting and the
#: negotiation by default: as long as ``migblock-shell`` does.
TIMEOUT: Final = 10.0

class MigblockClient(Commands):
    """A connection to migblockd.  ``async with MigblockClient(path) as client:``.

    ``path`` defaults to the daemon's default socket
    (``migblockd.paths.default_socket_path()``); one in the fallback directory
    under the shared temporary directory is refused when that directory is another
    user's or others may write to it, as the daemon refuses it (another user's
    program could be listening there).  ``name`` names the connection in
    ``qemu.qmp``'s logs.  ``timeout`` bounds how long :meth:`connect` waits for the
    daemon's greeting and its answer to ``qmp_capabilities`` (a daemon that is
    stopped, or hung, sends neither), how long :meth:`disconnect` waits for the
    daemon to take what was sent (then it closes regardless), and how long the
    exit of a :meth:`holding` block that raised waits for its deletion's answer;
    None, 0 or infinity waits forever (0 as for the daemon's own timeouts; the
    attribute is None then).  Commands are not bounded: wrap them in
    ``asyncio.timeout()``.
    An empty ``path``, or a negative or NaN ``timeout``, raises ``ValueError``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 name: str = "migblockd.client", timeout: float | None = TIMEOUT) -> None:
        super().__init__(path, name, timeout)

    async def __aenter__(self) -> MigblockClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.disconnect()

    @contextlib.asynccontextmanager
    async def holding(self, reason: str, *, modes: Iterable[str] | None = None,
                      internal: bool = False, id: str | None = None
                      ) -> AsyncIterator[Blocker]:
        """``async with client.holding(reason) as blocker:`` block migration meanwhile.

        Adds a ``scope: connection`` blocker on entry and deletes it on exit.  If
        someone deleted it meanwhile there is nothing to delete, even if another
        blocker has its ``id`` by then (the events tell; for a chosen ``id`` the exit
        first asks ``query-version``, whose answer comes after every event the daemon
        sent before it, also those not read yet because the block held up the event
        loop, by a blocking call say).  A deletion the daemon refuses otherwise (the
        client's role lowered by a reload, a failed commit) raises
        :class:`CommandError`: the blocker is still there.  If the connection was lost
        meanwhile, the daemon has already dropped the blocker: the exit raises
        :class:`DisconnectedError`, unless the block raised an exception, and deletes
        nothing, even if the client has connected again (another blocker may have the
        id by then).  When the block raised, the exit waits at most ``timeout``
        seconds for the deletion's answer, then raises the block's exception (a
        refused deletion is logged); the deletion goes on, and runs when the daemon
        does, as it does when the exit itself is cancelled (the caller's timeout).
        If the entry is cancelled (the caller's timeout) after the request was sent,
        the daemon may still add the blocker: it is deleted when its answer comes.
        A block of the same ``id`` entered while such a deletion goes on (a retry)
        waits for it before it adds its own, which the daemon would otherwise
        refuse (``Duplicate blocker ID``).
        """
        leaving = self._leaving.get(id) if id is not None else None
        if leaving is not None:
            # An earlier block's blocker of this id, being deleted (its block ended
            # while the client's loop was busy, or its entry was cancelled): the
            # daemon runs requests in order, and this add must come after that.
            await asyncio.wait({leaving})
        held_on = self._qmp  # the blocker lasts as long as this connection
        # From before the add: its own event comes before its answer.  (A generated id
        # is never given again: only a chosen one can be another blocker's later.)
        held = self._hold_id(id) if id is not None else None
        adding = asyncio.ensure_future(self.add_blocker(
            reason, modes=modes, internal=internal, id=id, scope="connection"))
        try:
            blocker = await asyncio.shield(adding)
        except asyncio.CancelledError:
            # Added after all, the blocker would block migration for as long as this
            # connection lives, with no block left to end it.
            self._undoing.add(adding)
            undone = asyncio.get_running_loop().create_future()
            if id is not None:
                self._mark_leaving(id, undone)
            adding.add_done_callback(
                lambda done: self._undo_add(done, held_on, held, undone))
            raise
        except BaseException:
            self._unhold_id(held)
            raise
        try:
            try:
                yield blocker
            except BaseException:
                if self._qmp is held_on:
                    # The caller's own timeout may be what ended the block, and a daemon
                    # that does not answer (stopped) would hold it here forever.  The
                    # deletion goes on regardless: the daemon runs it when it runs again.
                    releasing, held = self._start_release(blocker, held, quiet=True), None
                    with contextlib.suppress(DisconnectedError, TimeoutError):
                        async with asyncio.timeout(self.timeout):
                            await asyncio.shield(releasing)
                raise
            assert held_on is not None  # the blocker was added through it
            dropped = f" while it held blocker {blocker.id!r}, which the daemon dropped with it"
            if self._qmp is not held_on or not self.connected:
                # Lost, whether or not connected again since: the daemon dropped the
                # blocker with that connection, and there is nothing to delete.
                raise DisconnectedError(self._lost(held_on, dropped)) from held_on.ended
            # Shielded: an exit cut short (the caller's timeout) still deletes.
            releasing, held = self._start_release(blocker, held, quiet=False), None
            try:
                await asyncio.shield(releasing)
            except DisconnectedError as exc:
                # Lost before the loop had seen it (the block held it up): as above.
                raise DisconnectedError(self._lost(held_on, dropped)
                                        ) from held_on.ended or exc
        finally:
            self._unhold_id(held)

    async def _release(self, blocker: Blocker, held: HeldId | None, *,
                       quiet: bool = False) -> None:
        """Delete ``blocker`` unless it is gone; ``quiet``: log a refusal, not raise it."""
        if held is not None:
            # The events of a change made while this client's event loop was busy (an
            # agent's blocking call in the block) may not have been read yet.  The
            # daemon sends each event before any later answer: one round trip, and
            # they have been.
            with contextlib.suppress(CommandError):
                await self.execute("query-version")
            if held.deleted_since_added(blocker):
                return  # and its id may be another blocker's by now
        try:
            await self.del_blocker(blocker)
        except CommandError as exc:
            if exc.desc == str(NotFound(blocker.id)):
                return  # deleted by someone else meanwhile
            if not quiet:
                raise
            log.warning("blocker %r stays: the daemon refused to delete it (%s)",
                        blocker.id, exc.desc)

    def _mark_leaving(self, id: str, going: asyncio.Future[Any]) -> None:
        """The blocker ``id`` is gone (or known never added) once ``going`` is done."""
        self._leaving[id] = going

        def gone(done: asyncio.Future[Any]) -> None:
            if self._leaving.get(id) is done:
                del self._leaving[id]

        going.add_done_callback(gone)

    def _start_release(self, blocker: Blocker, held: HeldId | None, *,
                       quiet: bool) -> asyncio.Future[None]:
        """:meth:`_release` in a task of its own, which goes on if whoever awaits it is
        cancelled, and which lets go of ``held`` when it ends."""
        releasing = asyncio.ensure_future(self._release(blocker, held, quiet=quiet))
        self._undoing.add(releasing)
        self._mark_leaving(blocker.id, releasing)

        def released(task: asyncio.Future[None]) -> None:
            self._undoing.discard(task)
            self._unhold_id(held)
            if not task.cancelled():
                task.exception()  # raised to whoever awaited it; no one else to tell

        releasing.add_done_callback(released)
        return releasing

    def _undo_add(self, adding: asyncio.Future[Blocker], held_on: QMPLink | None,
                  held: HeldId | None, undone: asyncio.Future[None]) -> None:
        """Delete what the add of a :meth:`holding` whose entry was cancelled added;
        ``undone`` is done once that is over."""
        self._undoing.discard(adding)
        if adding.cancelled() or adding.exception() is not None or self._qmp is not held_on:
            # Not added (or not known to be: then its connection is gone), or gone
            # with its connection.
            self._unhold_id(held)
            undone.set_result(None)
            return
        releasing = self._start_release(adding.result(), held, quiet=True)
        releasing.add_done_callback(lambda _: undone.set_result(None))

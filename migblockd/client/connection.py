"""A client's connection to migblockd: connecting, negotiating, losing it, closing it.

Apart from the commands :class:`~migblockd.client.MigblockClient` sends
(:mod:`migblockd.client.commands`): what is here is the life of one connection made through
``qemu.qmp`` (:class:`~migblockd.client.link.QMPLink`), and why it failed or ended,
in the words :class:`DisconnectedError` carries.  A connection belongs to the event
loop it is made in (each ``asyncio.run()`` is one): asyncio's streams, tasks and locks
are that loop's.

:class:`Connection` is a base class of :class:`~migblockd.client.MigblockClient`, as
:class:`~migblockd.client.events.EventSource` is of it: the streams it ends when the
connection does are that class's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

from qemu.qmp import ConnectError, QMPError, Runstate

from migblockd.client.arguments import socket_path, wait_bound
from migblockd.client.errors import ClientError, DisconnectedError
from migblockd.client.events import EventSource
from migblockd.client.link import QMPLink, Refused
from migblockd.paths import (
    NO_GREETING,
    before_greeting,
    connect_failure,
    connect_unix,
    default_socket_path,
    fallback_refusal,
)

__all__ = ["Connection"]

#: How to name a socket other than the default, in the refusal of an unsafe default.
GIVE_PATH = "pass its path as MigblockClient's path"


class Connection(EventSource):
    """The connection of a :class:`~migblockd.client.MigblockClient`, which documents
    ``path``, ``name`` and ``timeout``."""

    def __init__(self, path: str | os.PathLike[str] | None, name: str,
                 timeout: float | None) -> None:
        super().__init__()
        self.path = socket_path(os.fspath(path)) if path is not None \
            else str(default_socket_path())
        self.name = name
        self.timeout = wait_bound(timeout)
        self._qmp: QMPLink | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        # Two connect() at once would each open a connection, and the one not kept
        # would live on unseen, delivering every event to the streams a second time.
        self._connecting = asyncio.Lock()
        # The adds of holding() blocks whose entry was cancelled, and the deletions of
        # what they added: kept here, since the event loop keeps only weak references.
        # Work of the loop the client is used in, as the connection is.
        self._undoing: set[asyncio.Future[Any]] = set()
        # By id, the blocker a holding() block chose that is being deleted, or whose
        # add is undone: a block of that id waits for it before its own add, which
        # the daemon would otherwise run first ("Duplicate blocker ID").
        self._leaving: dict[str, asyncio.Future[Any]] = {}
        # The event loop it was first used in: asyncio's streams, tasks and locks
        # belong to one, and the client with them (see _in_its_loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        #: The connection being made, while connect() waits for it.
        self._attempt: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up: connected, negotiated, neither closed nor lost
        (nor left behind by the event loop it was made in, which has ended)."""
        return (self._qmp is not None and self._qmp.runstate == Runstate.RUNNING
                and self._loop is not None and not self._loop.is_closed())

    def _in_its_loop(self) -> None:
        """Raise :class:`ClientError` when called, connected, from an event loop other
        than the one the client connected in (each ``asyncio.run()`` makes one): what
        it waits on there would never be woken, and the call would hang."""
        running = asyncio.get_running_loop()
        if self._loop is running:
            return
        if self._loop is None or (self._qmp is None and not self._undoing):
            # Not connected: nothing of the other loop's is left to use.
            self._loop, self._connecting = running, asyncio.Lock()
        else:
            raise ClientError(f"this client of migblockd at {self.path} is connected in "
                              "another event loop: use it there, or disconnect() it first")

    async def connect(self) -> None:
        """Connect, read the greeting and negotiate capabilities (again, after a
        connection was lost).  One call at a time connects: a call made meanwhile
        waits for it, then raises :class:`ClientError` if it succeeded."""
        self._in_its_loop()
        async with self._connecting:
            await self._connect()

    async def _connect(self) -> None:
        if self._qmp is not None:
            if self.connected:
                raise ClientError(f"already connected to {self.path}")
            await self._disconnect()  # what is left of a lost connection
        # A default socket under the shared temporary directory may be someone
        # else's, listening there to read what is sent: judged before connecting,
        # and again before the first command (migblockd.paths.fallback_refusal).
        refusal = fallback_refusal(self.path, GIVE_PATH)
        if refusal is not None:
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: {refusal}")
        try:
            sock = connect_unix(self.path)  # the library's own connect: see connect_unix
        except OSError as exc:
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: "
                                    f"{connect_failure(self.path, exc)}") from exc
        qmp = QMPLink(self.name, self._deliver, self.timeout)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    # A future of its own, which disconnect() may cancel.
                    self._attempt = asyncio.ensure_future(qmp.connect(sock))
                    try:
                        await self._attempt  # cancelled, it closes what it opened
                    finally:
                        self._attempt = None
            except BaseException:
                sock.close()  # failed before the library had made a stream of it
                raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task's own cancellation, not disconnect()'s
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: "
                                    "disconnect() was called meanwhile") from None
        except TimeoutError:
            what = ("no QMP greeting" if qmp.greeting is None
                    else "no answer to qmp_capabilities")
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: {what} "
                                    f"within {self.timeout:g}s") from None
        except ConnectError as exc:
            cause = exc.exc
            if isinstance(cause, Refused):
                if cause.negotiating:
                    raise DisconnectedError(f"cannot connect to migblockd at {self.path}: "
                                            f"capabilities negotiation failed: {cause}"
                                            ) from None
                raise DisconnectedError(f"migblockd at {self.path} refused the connection: "
                                        f"{cause}") from None
            if isinstance(cause, (EOFError, ConnectionResetError)):
                why = (before_greeting(cause) if qmp.greeting is None
                       else "the connection was lost while negotiating capabilities")
            elif isinstance(cause, OSError):
                why = connect_failure(self.path, cause)
            elif isinstance(cause, QMPError) and qmp.greeting is None:
                why = NO_GREETING  # not a QMP socket
            else:
                why = str(exc)
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: {why}"
                                    ) from cause
        refusal = fallback_refusal(self.path, GIVE_PATH, connected=True)
        if refusal is not None:
            await qmp.disconnect()
            raise DisconnectedError(f"cannot connect to migblockd at {self.path}: {refusal}")
        self._qmp, self._closing, self._sock = qmp, False, sock
        self._watch = asyncio.create_task(self._watch_connection(qmp))

    async def _watch_connection(self, qmp: QMPLink) -> None:
        while qmp.runstate == Runstate.RUNNING:
            await qmp.runstate_changed()
        if self._closing:
            self._end_streams(None)
        else:
            self._end_streams(self._lost(qmp), qmp.ended)

    def _lost(self, qmp: QMPLink, before: str = "") -> str:
        """Why ``qmp`` is down: lost, or closed by this client."""
        if qmp.disconnected:
            return f"the connection to migblockd at {self.path} was closed by disconnect()" \
                   f"{before}"
        if qmp.gave_up is not None:
            return f"this client closed its connection to migblockd at {self.path}{before}: " \
                   f"{qmp.gave_up}"
        if qmp.farewell is not None:
            return f"migblockd at {self.path} closed the connection{before}: {qmp.farewell}"
        return f"the connection to migblockd at {self.path} was lost{before}"

    async def disconnect(self) -> None:
        """Close the connection (the daemon releases its ``scope: connection`` blockers).

        Never raises: a connection lost earlier has already been reported by the
        commands, streams and :meth:`holding` that were using it.  What the daemon
        has not taken within ``timeout`` seconds (it is stopped) is not sent.  A
        :meth:`connect` under way is cancelled (it raises :class:`DisconnectedError`):
        a shutdown racing a reconnection must neither leave the connection, and its
        blockers, behind, nor wait for a daemon that does not greet.
        """
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            # Nothing of the loop it was made in can be awaited here (it may be
            # closed): its socket is shut down, so that the daemon ends the
            # connection and releases its blockers; the rest goes with that loop.
            # A loop that has ended closes nothing any more: the socket is closed here.
            self._qmp = None
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                if self._loop.is_closed():
                    self._sock.close()
            return
        if self._attempt is not None:
            self._attempt.cancel()
        async with self._connecting:
            await self._disconnect()

    async def _disconnect(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is None:
            return
        self._closing = True
        if qmp.runstate == Runstate.RUNNING:
            qmp.disconnected = True  # not lost: what waited on it is told so
        with contextlib.suppress(Exception):
            await qmp.disconnect()  # re-raises what ended a lost connection
        if self._watch is not None:
            await asyncio.wait({self._watch})
            self._watch = None
        self._end_streams(None)

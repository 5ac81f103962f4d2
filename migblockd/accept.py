"""Accepting connections, and refusing them when the process runs out of descriptors.

Why not ``loop.create_unix_server``: when ``accept(2)`` fails with EMFILE,
asyncio logs a traceback and *goes on calling accept* for the rest of its
backlog-sized batch, then retries each second, so 200 clients against
``RLIMIT_NOFILE=64`` wrote 80,758 tracebacks (36 MB) in 9 s while the
clients waiting in the backlog hung.  Here:

* out of descriptors (EMFILE, ENFILE, and the kernel's ENOBUFS/ENOMEM), the
  clients waiting are turned away one by one with a QMP error line, using a
  descriptor held in reserve for exactly that (close it, accept, write, close,
  reopen it): nobody hangs, and the backlog never fills;
* the log gets one line when an episode starts and one when it ends (with how
  many clients were refused), never one per attempt: it ends once a descriptor
  has been free for a while, whether or not a client comes to take it (a flood
  that stops is followed by no client, as often as not), and a stop in the
  middle of one says how many it refused;
* if even the reserve cannot be had (the whole system is out), accepting
  pauses and resumes when one of our connections closes, or after a second.

Transports are made by ``loop.connect_accepted_socket``, as asyncio's server
makes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable

from migblockd.peer import LEFTOVER_CHUNK, received
from migblockd.qmp.encoding import encode_error
from migblockd.qmp.errors import NO_ID, QMPError

__all__ = ["OWN_DESCRIPTORS", "Acceptor", "fit_descriptor_limit"]

log = logging.getLogger("migblockd")

#: accept() calls per wake-up of the listening socket: a burst of connections
#: is taken in few loop iterations without starving the clients already served.
ACCEPT_BATCH = 64
#: How long accepting pauses when not even the reserve descriptor can be had.
RETRY_DELAY = 1.0
#: An episode ends after this long without running out: at the edge of the limit
#: connections come and go, and one episode must not be logged as hundreds.
EPISODE_QUIET = 1.0
#: Descriptors the daemon needs besides its clients' (standard streams, the
#: event loop's, the listening socket and its lock, SQLite's, sd_notify's,
#: the reserve, QEMU's link and pidfd, and the refused connections that linger,
#: adapter.REFUSALS_LINGERING), with room to spare.  ``LimitNOFILE=`` in the units is
#: ``--max-clients`` plus this, rounded up.
OWN_DESCRIPTORS = 64
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def refusal_line(desc: str) -> bytes:
    """The one line a client turned away before its session exists is sent."""
    return encode_error(QMPError(desc), NO_ID)


OUT_OF_DESCRIPTORS = refusal_line(
    "migblockd is out of file descriptors and cannot serve another client now; "
    "try again later")


def fit_descriptor_limit(max_clients: int, serving: int = 0,
                         setting: str = "--max-clients") -> int | None:
    """Make room for ``max_clients`` clients in ``RLIMIT_NOFILE``, or say why not.

    The soft limit is raised toward the hard one when it is too low (no
    privilege needed); when even the hard limit is too low, one warning says
    so: clients past it are refused for want of descriptors, not hung.  About
    how many clients the descriptors allow then (None: ``max_clients``), for
    the admission to keep the admins' slots below that (migblockd.admission):
    ``serving``, the connections open now (a reload's), hold descriptors that
    are theirs, not the daemon's own.  ``setting``: where ``max_clients`` came
    from, as ``Sources.named`` says it (``FILE:LINE: max-clients``,
    ``--max-clients``), which the warning leads with.
    """
    needed = max_clients + OWN_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft
    if target >= needed:
        return None
    room = max(0, target - (_open_descriptors() - serving))
    # Led by where the bound was set, as the start's other messages about a
    # setting are: the one to lower is at that line of the file, or that option.
    log.warning("%s: RLIMIT_NOFILE is %d, too low for %d clients (about %d descriptors): "
                "clients past about %d are refused for want of descriptors; raise "
                "LimitNOFILE= (or ulimit -n)", setting, target, max_clients, needed, room)
    return room


def _open_descriptors() -> int:
    """Descriptors open now, and a few the daemon opens later (its log and
    notify sockets, SQLite's log); OWN_DESCRIPTORS, the bound, when unknown."""
    try:
        return len(os.listdir("/proc/self/fd")) + 8
    except OSError:
        return OWN_DESCRIPTORS


class Acceptor:
    """The listening socket's reader: accepts, and makes one protocol per connection.

    ``clients()`` says how many clients are served (for the log): those whose
    protocol's ``connection_made`` has come, which ``arrived()`` is told of.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.BaseProtocol], clients: Callable[[], int],
                 turned_away: Callable[[], None] = lambda: None) -> None:
        self._loop = loop
        self._turned_away = turned_away  # called for each client refused for descriptors
        self._sock = sock
        self._factory = factory
        self._clients = clients
        self._reading = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._quiet: asyncio.TimerHandle | None = None
        self._reserve: int | None = self._open_reserve()
        #: Clients turned away in the current episode; None outside one.
        self.refused: int | None = None
        #: uvloop's transports being made, each with its protocol.
        self._pending: dict[asyncio.Task[object], asyncio.BaseProtocol] = {}
        #: Protocols of connections accepted whose ``connection_made`` is still to
        #: come: served, though ``clients()`` does not count them yet.  Not the
        #: pending tasks: on uvloop a connection is in ``clients()`` for two loop
        #: iterations before its task is done, and was counted twice.
        self._arriving: set[asyncio.BaseProtocol] = set()

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    async def close(self) -> None:
        """Stop accepting and close the listening socket; connections already
        accepted get their protocols first."""
        self._pause()
        self._closed = True
        for timer in (self._retry, self._quiet):
            if timer is not None:
                timer.cancel()
        self._sock.close()
        if self.refused is not None:
            # The episode's count would otherwise go unsaid.
            log.warning("stopping: %d clients were refused since the file descriptors "
                        "ran out", self.refused)
            self.refused = None
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        if self._pending:
            await asyncio.wait(list(self._pending))
        await asyncio.sleep(0)  # the connection_made callbacks _serve scheduled

    def arrived(self, protocol: asyncio.BaseProtocol) -> None:
        """``protocol``'s ``connection_made`` has come: ``clients()`` counts it now
        (or it was refused, and is no client being served)."""
        self._arriving.discard(protocol)

    def descriptor_freed(self) -> None:
        """One of our connections closed: try again if accepting is paused."""
        if self.refused is not None and not self._reading and not self._closed:
            self.start()

    # -- accepting ----------------------------------------------------------------
    def _accept(self) -> None:
        if self._reserve is None:
            # The reserve comes before any new client: without it, nobody can be refused.
            self._reserve = self._open_reserve()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._exhausted(exc)
                else:
                    log.error("accept() failed: %s; trying again in %gs",
                              exc.strerror or exc, RETRY_DELAY)
                    self._pause_for_a_while()
                return
            if self.refused is not None:
                self._await_quiet()
            self._serve(conn)

    def _episode_over(self) -> None:
        self._quiet = None
        if self.refused is None:
            return
        if self._reserve is None or not self._spare_descriptor():
            # Still out (the reserve aside): no client could be served yet.
            self._quiet = self._loop.call_later(EPISODE_QUIET, self._episode_over)
            return
        log.warning("file descriptors are available again: serving new clients "
                    "(%d refused meanwhile)", self.refused or 0)
        self.refused = None

    def _serve(self, conn: socket.socket) -> None:
        """Serve ``conn``: its protocol's ``connection_made`` comes in a callback."""
        # asyncio's selector loops make the transport at once, as their own
        # servers do underneath: connect_accepted_socket() would add a task and
        # two loop iterations per connection, about a tenth of a short
        # connection's CPU.  Other loops (uvloop) go the public way.
        make = getattr(self._loop, "_make_socket_transport", None)
        if make is not None:
            try:
                conn.setblocking(False)
                make(conn, protocol := self._factory())
            except BaseException:
                conn.close()
                raise
            self._arriving.add(protocol)
            return
        protocol = self._factory()
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(lambda: protocol, conn))
        self._pending[task] = protocol
        self._arriving.add(protocol)
        task.add_done_callback(self._made)

    def _made(self, task: asyncio.Task[object]) -> None:
        # Its connection_made has come by now, or never will.
        self._arriving.discard(self._pending.pop(task))
        if not task.cancelled() and task.exception() is not None:
            # The peer went away before its transport was made: nothing to serve.
            log.debug("a connection failed before it was served: %s", task.exception())

    def _exhausted(self, exc: OSError) -> None:
        """Out of descriptors."""
        if self._quiet is not None:  # still the same episode
            self._quiet.cancel()
            self._quiet = None
        refused = self.refused
        if refused is None:
            refused = 0
            log.warning("out of file descriptors (%s) while serving %d clients: refusing "
                        "new clients until one is free", exc.strerror,
                        self._clients() + len(self._arriving))
        for _ in range(ACCEPT_BATCH):
            if self._reserve is None:
                self._reserve = self._open_reserve()
                if self._reserve is None:
                    break
            # Spend the reserve on one waiting client, then take it back.
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                self.refused = refused
                self._reserve = self._open_reserve()
                self._await_quiet()
                return  # nobody else waits
            except OSError:
                break  # someone else took the descriptor
            with conn, contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(OUT_OF_DESCRIPTORS)
                for _ in received(conn, LEFTOVER_CHUNK):  # closed unread, it would reset
                    pass
            refused += 1
            self._turned_away()
            self._reserve = self._open_reserve()
        else:
            self.refused = refused
            return  # more wait: the next turn of the loop refuses them
        # Not even one descriptor to refuse with: wait for one to come free.
        self.refused = refused
        self._pause_for_a_while()
        self._await_quiet()

    def _await_quiet(self) -> None:
        """End the episode EPISODE_QUIET after it last ran out, once a descriptor is
        free (looked at again each EPISODE_QUIET until one is), whether a client
        comes for it or not."""
        if self._quiet is None:
            self._quiet = self._loop.call_later(EPISODE_QUIET, self._episode_over)

    @staticmethod
    def _spare_descriptor() -> bool:
        """Whether a descriptor besides the reserve can be had now (one for a client)."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return False
        return True

    def _pause_for_a_while(self) -> None:
        self._pause()
        if self._retry is None:
            self._retry = self._loop.call_later(RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.start()

    @staticmethod
    def _open_reserve() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

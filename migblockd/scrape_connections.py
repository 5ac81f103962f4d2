"""The metrics endpoint's HTTP server: its connections and their limits.

Part of the endpoint (:mod:`migblockd.scrape`, which runs :class:`ScrapeServer`'s
``serve_forever`` on a thread of its own): ``wsgiref``'s server, each connection
served by a worker of :class:`~migblockd.scrape_pool.Pool` (no thread of its
own: see there why), its request read by
:class:`~migblockd.scrape_request.RequestHandler` and answered by the endpoint's
app.  A port that may face the network is open to clients that hold connections
without asking anything: bounded here.

At most ``MAX_SCRAPES`` connections are served at once, and as many requests
parsed in each ``PARSE_WINDOW``; a client that sends nothing is dropped after
``REQUEST_TIMEOUT`` seconds, one that trickles its request after
``REQUEST_DEADLINE`` seconds in all (watched on ``serve_forever``'s turn, not
by a timer each).  Those bound what one connection holds, not
what a client that reconnects as soon as it is cut holds: so a connection past
the limit takes the place of the oldest one still sending its request (a
scraper sends its request as soon as it connects, so only a silent or trickling
client is ever in that state for long), and gets a 503 only when every
connection has sent its request and awaits its answer.  At most ``ACCEPT_BUDGET``
connections are accepted in each ``ACCEPT_WINDOW``: the rest wait in the listen
queue, where a client that connects and closes in a loop costs the daemon
nothing (see :meth:`migblockd.scrape_limits.Pacing.accept_turn`).  Out of file descriptors,
the server waits a moment between attempts to accept rather than spin.  Scrapers
crowded out are counted in the log (at most every ``CROWDED_WARNING`` seconds),
and so is a connection no worker could be started for.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

from migblockd.logs.throttle import Throttle
from migblockd.scrape_limits import (
    ACCEPT_BUDGET,
    ACCEPT_WINDOW,
    CROWDED_GRACE,
    CROWDED_WARNING,
    EVICT_WAIT,
    MAX_SCRAPES,
    REQUEST_DEADLINE,
    REQUEST_TIMEOUT,
    Pacing,
)
from migblockd.scrape_pool import Pool
from migblockd.scrape_request import RequestHandler, for_method, method_sent, unavailable

__all__ = ["ACCEPT_BUDGET", "ACCEPT_WINDOW", "MAX_SCRAPES", "REQUEST_DEADLINE",
           "REQUEST_TIMEOUT", "ScrapeServer"]

log = logging.getLogger("migblockd")

#: What a connection past MAX_SCRAPES is told before it is closed.
_BUSY_TEXT = b"too many scrapes at once; retry\n"


_BUSY = unavailable(_BUSY_TEXT)
#: What a connection still sending its request when the daemon stops is told.
_STOPPING = unavailable(b"migblockd is stopping\n")


class _Handler(RequestHandler):
    timeout = REQUEST_TIMEOUT
    server: ScrapeServer

    def parse_request(self) -> bool:
        if not self.server.parse_turn(self.request):
            # Cut while it waited: nothing parsed but the method (for a HEAD, no body).
            self.command = str(self.raw_requestline, "iso-8859-1").partition(" ")[0]
            self._tell(self.server.cut_answer(self.request) or _BUSY)
            return False
        if not super().parse_request():
            # Answered with an error: no longer a connection still sending its
            # request, whose closing would make room (it is being answered).
            self.server.request_complete(self.request)
            return False
        # The request is complete: from now on this connection awaits its answer,
        # and is no longer the one closed to make room for another.
        if self.server.request_complete(self.request):
            return True
        # Made room for another: a scraper whose request was not read in time
        # (more connections at once than MAX_SCRAPES) is told to retry; or cut by
        # the stop, told so.
        self._tell(self.server.cut_answer(self.request) or _BUSY)
        return False

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        cut = self.server.cut_answer(self.request)
        if cut is not None:
            # What was read of its request before it was cut is no request to
            # judge: a request line cut short looks like HTTP/0.9's (a 505), or
            # one with a bad version (a 400).  Told what one read whole is.
            self.close_connection = True
            self._tell(cut)
            return
        super().send_error(code, message, explain)

    def _tell(self, answer: bytes) -> None:
        """Send ``answer`` (a 503), its head alone to a HEAD (see for_method)."""
        with contextlib.suppress(OSError):
            self.wfile.write(for_method(answer, self.command))


class ScrapeServer(Pacing):
    """A wsgiref server on a socket bound elsewhere (TCP or Unix), served by a pool of
    at most MAX_SCRAPES threads."""

    def __init__(self, sock: socket.socket, port: int, app: Any) -> None:
        # socketserver makes a socket of its own here, unbound: ours replaces it.
        # Of our socket's family, not AF_INET: the units' RestrictAddressFamilies=AF_UNIX
        # refuses any other (EAFNOSUPPORT), and a Unix endpoint must start there.
        self.address_family = sock.family
        super().__init__(("", 0), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = "migblockd", port
        self.setup_environ()
        self.set_app(app)
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        # Connections still sending their request, oldest first (dicts keep order).
        self._sending: dict[socket.socket, float] = {}
        # Connections cut before their request was read (to make room, or by the
        # stop), until their thread ends: what each is told.
        self._cut: dict[socket.socket, bytes] = {}
        self._sending_lock = threading.Lock()
        # Connections closed or refused because every slot was busy, since the
        # last warning; when the next warning may come, and when it is due (None:
        # nothing to say).  serve_forever's thread only.
        self._crowded = [0, 0]
        self._warn_from = 0.0
        self._warn_at: float | None = None
        self.pool = Pool(self._serve, MAX_SCRAPES)
        # When each connection must be over (REQUEST_DEADLINE), for service_actions.
        self._deadlines: dict[socket.socket, float] = {}
        # When the latest parses started; those waiting, in order, each with its event.
        self._parses: deque[float] = deque(maxlen=MAX_SCRAPES)
        self._in_line: dict[socket.socket, threading.Event] = {}
        self._parse_lock = threading.Lock()
        # When the latest accepts were (accept_turn).  serve_forever's thread only.
        self._accepts: deque[float] = deque(maxlen=ACCEPT_BUDGET)

    def _crowding(self, closed: int, refused: int) -> None:
        """Count a connection closed to make room, or refused: a few silent or
        hostile clients can keep a real scraper out, so the log says so, at
        most every CROWDED_WARNING seconds (:meth:`service_actions`)."""
        self._crowded[0] += closed
        self._crowded[1] += refused
        if self._warn_at is None:
            self._warn_at = max(time.monotonic() + CROWDED_GRACE, self._warn_from)

    def service_actions(self) -> None:
        """serve_forever's turn (every half second): cut the connections past their
        deadline, and say what was crowded out when due (what a warning promises,
        "next count in 60 s at most", holds without another crowding)."""
        super().service_actions()
        now = time.monotonic()
        if self._warn_at is not None and now >= self._warn_at:
            self.say_crowded()
        with self._sending_lock:  # a worker forgets it before the close: not another's fd
            for request in [r for r, at in self._deadlines.items() if now >= at]:
                del self._deadlines[request]
                _cut(request)

    def say_crowded(self, *, last: bool = False) -> None:
        """Warn of the connections crowded out since the last warning, if any (also
        at the stop, ``last``: serve_forever no longer runs)."""
        if self._warn_at is None:
            return
        self._warn_at, self._warn_from = None, time.monotonic() + CROWDED_WARNING
        closed, refused = self._crowded
        self._crowded = [0, 0]
        more = "" if last else f"; next count in {CROWDED_WARNING:g} s at most"
        log.warning("metrics: all %d connections were busy: %d closed to make room before "
                    "their request was read, %d refused (a scraper may have failed%s)",
                    MAX_SCRAPES, closed, refused, more)

    def request_complete(self, request: socket.socket) -> bool:
        """Mark ``request`` as awaiting its answer; False if it was closed to make room."""
        with self._sending_lock:
            return self._sending.pop(request, None) is not None

    def cut_answer(self, request: socket.socket) -> bytes | None:
        """What ``request``, cut before its request was read, is told (None: not cut)."""
        with self._sending_lock:
            return self._cut.get(request)

    def cut_senders(self) -> None:
        """The stop (serve_forever has ended): cut the connections still sending their
        request, which no scrape under way is (a silent client, or one trickling it),
        rather than wait for them and then end the process with them unanswered.
        Their threads read what was sent, then the end at once (see _make_room)."""
        with self._sending_lock:
            senders = list(self._sending)
            self._sending.clear()
            self._cut.update(dict.fromkeys(senders, _STOPPING))
        self._wake(senders)
        for request in senders:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RD)

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its request; True when a slot is free."""
        with self._sending_lock:
            if not self._sending:
                return False
            oldest = next(iter(self._sending))
            since = self._sending.pop(oldest)
            self._cut[oldest] = _BUSY
        self._wake([oldest])
        log.debug("metrics: closing a connection that has not sent its request in %.1f s, "
                  "to serve a new one", time.monotonic() - since)
        self._crowding(1, 0)
        with contextlib.suppress(OSError):
            # Its thread reads what was sent, if anything, then the end at once:
            # see _Handler.parse_request.  It lets go of its slot right after.
            oldest.shutdown(socket.SHUT_RD)
        return self._slots.acquire(timeout=EVICT_WAIT)

    def process_request(self, request: Any, client_address: Any) -> None:
        """serve_forever's: hand ``request`` to a worker with a slot, or turn it away."""
        if not self._slots.acquire(blocking=False) and not self._make_room():
            log.debug("metrics: %d scrapes in progress; refusing another connection",
                      MAX_SCRAPES)
            self._crowding(0, 1)
            self._turn_away(request)
            return
        with self._sending_lock:  # REQUEST_TIMEOUT bounds each wait, the deadline all
            self._sending[request] = now = time.monotonic()
            self._deadlines[request] = now + REQUEST_DEADLINE
        try:
            self.pool.hand((request, client_address))
        except RuntimeError as exc:
            # A slot held with no worker to serve it would never be freed.
            self._forget(request)
            self._no_thread(exc, request)

    def _serve(self, job: tuple[socket.socket, Any]) -> None:
        """A worker's: serve one connection, then close it and free its slot."""
        request, client_address = job
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._sending_lock:
                self._deadlines.pop(request, None)  # before the close: see service_actions
            self.shutdown_request(request)
            self._forget(request)

    def _no_thread(self, exc: RuntimeError, request: socket.socket) -> None:
        """No worker could be started to serve ``request`` (RLIMIT_NPROC, a cgroup's
        ``pids.max``): it is told to retry, and the log says why, at most once
        every CROWDED_WARNING seconds (a shortage lasts, and every connection meets it)."""
        with _no_thread_lock:
            said = _no_threads.admit("serve", None, time.monotonic())
        if said is not None:
            log.warning("metrics: no thread to serve a connection (%s): told to retry%s",
                        exc, said)
        self._turn_away(request)

    def _turn_away(self, request: socket.socket) -> None:
        """Tell ``request`` to retry, and close it."""
        with contextlib.suppress(OSError):
            request.settimeout(0)  # what fits in the socket's buffer, never a wait
            # A HEAD already sent is told without the text: a body would be read
            # as the next answer.  What comes later is not known, and gets it.
            request.send(for_method(_BUSY, method_sent(request)))
            # Closed with its request unread, the socket would send a reset,
            # which can reach the client before the answer and discard it.
            while request.recv(65536):
                pass
        self.shutdown_request(request)

    def _forget(self, request: socket.socket) -> None:
        with self._sending_lock:
            self._sending.pop(request, None)
            self._cut.pop(request, None)
            self._deadlines.pop(request, None)
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or timed out: nothing to report beyond debug.
        log.debug("metrics: request failed: %r", sys.exc_info()[1])


# Warnings that no thread could be started for a connection (ScrapeServer._no_thread).
_no_threads = Throttle(burst=1, window=CROWDED_WARNING)
_no_thread_lock = threading.Lock()


def _cut(request: socket.socket) -> None:
    """End a connection past its deadline: its thread's read or write fails at once."""
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)

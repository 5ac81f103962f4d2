"""The metrics endpoint's limits, and the pace at which its connections are accepted and parsed.

Part of the endpoint's server: :class:`Pacing` is a base class of
:class:`migblockd.scrape_connections.ScrapeServer`, with no state of its own.  The limits
are declared here, each with why it is what it is, because both halves of the
server apply them: the server bounds what each connection holds (a slot, a
deadline), and :class:`Pacing` bounds how fast they come, in windows:
``ACCEPT_BUDGET`` accepts in each ``ACCEPT_WINDOW`` on ``serve_forever``'s
thread, and ``MAX_SCRAPES`` requests parsed in each ``PARSE_WINDOW`` on the
workers.  Each accept and each parse costs Python under the interpreter lock,
which the event loop waits for: unpaced, a client connecting in a loop, or
sending requests that are answered at once, takes the QMP clients' time.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from migblockd.logs.throttle import Throttle

__all__ = ["ACCEPT_BUDGET", "ACCEPT_WINDOW", "CROWDED_GRACE", "CROWDED_WARNING", "EVICT_WAIT",
           "EXHAUSTED_PAUSE", "MAX_SCRAPES", "PARSE_WINDOW", "REQUEST_DEADLINE",
           "REQUEST_TIMEOUT", "Pacing"]

log = logging.getLogger("migblockd")

#: Connections served at once.  Several scrapers may connect at the same moment,
#: and one whose request its thread has not read yet looks like a silent client:
#: a client must open this many in the moment between a scraper's connection and
#: its request to crowd the scraper out.
MAX_SCRAPES = 16
#: Seconds to wait for a connection closed to make room to let go of its slot.
EVICT_WAIT = 1.0
#: Seconds a metrics client has to send its request (and to read the answer).
REQUEST_TIMEOUT = 10.0
#: Seconds a metrics connection may last in all, however steadily it trickles.
REQUEST_DEADLINE = 30.0
#: Seconds in which MAX_SCRAPES requests are parsed at most (ScrapeServer.parse_turn).
PARSE_WINDOW = 0.1
#: Connections accepted in each ACCEPT_WINDOW at most (ScrapeServer.accept_turn).
#: Each costs the daemon some 100 us of Python on two threads, and the event loop
#: waits for the interpreter lock meanwhile: clients connecting and closing in a
#: loop, 2,500 to 3,000 a second over a Unix socket, took most of a core and cut
#: QMP round trips to a third or a half.  At 160 a second, 16 scrapers connecting
#: at the same moment still go in at once.
ACCEPT_BUDGET = 16
#: Seconds in which ACCEPT_BUDGET connections are accepted at most.
ACCEPT_WINDOW = 0.1
#: Seconds between attempts to accept while the process is out of descriptors.
EXHAUSTED_PAUSE = 0.1
#: Seconds between two warnings that every connection was busy (the rest: debug).
CROWDED_WARNING = 60.0
#: Seconds from the first connection crowded out to the warning: a burst of
#: scrapers is counted whole, not as its first one.
CROWDED_GRACE = 1.0


class Pacing(WSGIServer):
    """The pace of a :class:`~migblockd.scrape_connections.ScrapeServer`'s accepts and parses."""

    # The server's, set in ScrapeServer.__init__:
    # When the latest parses started; those waiting, in order, each with its event.
    _parses: deque[float]
    _in_line: dict[socket.socket, threading.Event]
    _parse_lock: threading.Lock
    # When the latest accepts were (accept_turn).  serve_forever's thread only.
    _accepts: deque[float]

    if TYPE_CHECKING:
        def cut_answer(self, request: socket.socket) -> bytes | None: ...  # the server's

    def accept_turn(self) -> None:
        """Wait until the next accept is within ACCEPT_BUDGET a window (on
        serve_forever's thread, before each accept).

        A thread of its own does not keep the endpoint off the event loop: the
        loop waits for the interpreter lock while this thread and a worker run.
        The connections past the budget wait in the listen queue (1,024 of
        them), and past that a client's connect waits or fails in the kernel,
        which costs the daemon nothing.  A scraper behind a flood waits its turn
        there, as it is crowded out of a slot (see the module's docstring): the
        flood costs the scrapers their answers, not the QMP clients theirs."""
        accepts = self._accepts
        if len(accepts) < ACCEPT_BUDGET:
            return
        wait = accepts[0] + ACCEPT_WINDOW - time.monotonic()
        if wait <= 0:
            return
        said = _flooded.admit("accept", None, time.monotonic())
        if said is not None:
            log.warning("metrics: more than %d connections within %g s: the rest wait in "
                        "the listen queue (a client connecting in a loop?)%s",
                        ACCEPT_BUDGET, ACCEPT_WINDOW, said)
        time.sleep(wait)

    def get_request(self) -> tuple[socket.socket, Any]:
        self.accept_turn()
        try:
            conn, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays queued and the socket readable: without a
                # pause, serve_forever() would try again at once, for as long as
                # the shortage lasts, on a whole core.
                time.sleep(EXHAUSTED_PAUSE)
            raise
        self._accepts.append(time.monotonic())
        # A Unix socket's peer has no address; wsgiref wants one for REMOTE_ADDR.
        return conn, address if isinstance(address, tuple) else ("local", 0)

    def parse_turn(self, request: socket.socket) -> bool:
        """Wait for the turn of ``request`` to have its header lines parsed: at most
        MAX_SCRAPES in each PARSE_WINDOW; False if it was cut meanwhile.

        A request answered at once (a 400, a 431) costs up to a millisecond of
        Python under the interpreter lock, which the event loop waits for: four
        local connections sending them as fast as answered took 85% of a core
        and cut QMP throughput by 4 to 5.  One waiting is still sending, as far
        as room is made."""
        parses, in_line = self._parses, self._in_line
        woken = threading.Event()
        with self._parse_lock:
            in_line[request] = woken
        try:
            while True:
                with self._parse_lock:
                    if self.cut_answer(request) is not None:
                        return False
                    # Only the first in line watches the clock: not all wake each turn.
                    wait = None
                    if next(iter(in_line)) is request:
                        now = time.monotonic()
                        if len(parses) < MAX_SCRAPES or now - parses[0] >= PARSE_WINDOW:
                            parses.append(now)
                            return True
                        wait = parses[0] + PARSE_WINDOW - now
                    woken.clear()
                woken.wait(wait)
        finally:
            with self._parse_lock:
                del in_line[request]
                if in_line:
                    next(iter(in_line.values())).set()  # the next one's turn to watch

    def _wake(self, requests: list[socket.socket]) -> None:
        """Wake those of ``requests`` waiting for their turn to be parsed (just cut)."""
        with self._parse_lock:
            for request in requests:
                woken = self._in_line.get(request)
                if woken is not None:
                    woken.set()


# Warnings that connections came faster than ACCEPT_BUDGET a window (accept_turn):
# serve_forever's thread alone writes them, so no lock.
_flooded = Throttle(burst=1, window=CROWDED_WARNING)

"""One HTTP request on the metrics endpoint: wsgiref's handler, with its gaps closed.

:mod:`migblockd.scrape` serves the endpoint with the standard library's
``wsgiref``, whose request handler is made for a development server.  What it
does wrong for a port that may face any client, :class:`RequestHandler` does
otherwise:

- An error while writing the answer that is not a connection reset (the
  socket's timeout, for a client that stops reading an answer larger than the
  socket's buffers) is printed as a bare traceback on standard error, outside
  the log's format.  Here it is a line of the log: debug for the socket's
  errors (the client's doing), error for anything else (a bug).
- Its header block may reach 100 lines of 64 KiB each: 6.4 MB per connection,
  parsed by the ``email`` package in pure Python, on a thread that holds the
  interpreter lock while it does, so the event loop waits (16 such clients, two
  requests a second each, held QMP replies for up to 0.8 s, and grew the
  process by 270 MB).  Here the block is at most ``MAX_HEADER_BYTES``; past it,
  431.  A scraper's headers are a few hundred bytes.
- A request it cannot parse (no version, or ``HTTP/2.0``) is taken for
  HTTP/0.9, and its error goes out with no status line: a client sees a
  malformed answer, not a 400 or a 505.  A request that says ``HTTP/0.9`` is
  answered that way, with no status line nor headers.  Here every answer has
  them, and a version below 1.0 gets a 505 (HTTP/0.9's ``GET /metrics``, with
  no version, too), as one past 1.x does.
- Its error pages repeat the request line it could not parse, twice: an answer
  larger than the request, which a client that does not read it leaves
  blocking the thread.  Here an error's message is cut.
- An empty line before the request line, which RFC 9112 (2.2) asks a server
  to ignore, is taken for an empty request line, and the connection closed
  without an answer.  Here empty lines are skipped, within the request line's
  bound; empty lines and then the end of the request get a 400.
- A failure of its own (a bug) is logged with its traceback each time, and a
  client that repeats the request that causes it writes the log as fast as it
  can send it.  Here :func:`log_failure` logs one traceback per kind of failure
  each ``FAILURE_WINDOW`` seconds, and counts the rest.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler

from migblockd.logs import shown
from migblockd.logs.throttle import Throttle

__all__ = ["FAILURE_WINDOW", "MAX_HEADER_BYTES", "MAX_REQUEST_LINE", "RequestHandler",
           "for_method", "log_failure", "method_sent", "unavailable"]

log = logging.getLogger("migblockd")

#: Bytes of the request line at most (wsgiref's own bound): past it, 414.
MAX_REQUEST_LINE = 65536
#: Bytes of the header lines together at most, the empty line that ends them
#: included: past it, 431.  Prometheus sends a few hundred; a bearer token, a
#: few thousand.
MAX_HEADER_BYTES = 65536
#: Characters of an error's message at most (it may quote the client's request).
_MESSAGE_MAX = 100
#: Seconds in which one failure of a kind is logged with its traceback; the
#: rest are counted, and the next line says how many there were.
FAILURE_WINDOW = 60.0

# Shared by the endpoint's threads (one per connection): the throttle is not
# safe across threads by itself.
_failures = Throttle(burst=1, window=FAILURE_WINDOW)
_failures_lock = threading.Lock()


def log_failure(what: str, exc_info: Any) -> None:
    """Log ``what`` failed at the error level, with the traceback of ``exc_info``,
    once per ``FAILURE_WINDOW`` (the rest at the debug level, without it).

    A failure while building or sending an answer is a bug, but one any client
    may set off at will, once per request: unthrottled, a client repeating the
    request filled the log with tracebacks (2 KB each, hundreds a second).
    """
    with _failures_lock:
        said = _failures.admit(what, None, time.monotonic())
    if said is None:
        log.debug("metrics: %s: %r", what, exc_info[1])
    else:
        log.error("metrics: %s%s", what, said, exc_info=exc_info)


def unavailable(text: bytes) -> bytes:
    """A whole 503 answer of ``text``, to retry in a second."""
    return (b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))


def for_method(answer: bytes, method: str) -> bytes:
    """``answer``, its head alone for a ``HEAD``: a body after a HEAD's answer (RFC
    9110, 9.3.2) is read by a client as the start of the next one."""
    if method == "HEAD":
        return answer[:answer.index(b"\r\n\r\n") + 4]
    return answer


def method_sent(sock: socket.socket) -> str:
    """The method of the request ``sock`` has received so far, left unread (non-blocking
    ``sock``; "" if none is there yet): for an answer sent without reading it."""
    try:
        start = sock.recv(_PEEK, socket.MSG_PEEK)
    except OSError:
        return ""  # nothing yet (EAGAIN), or gone
    line = start.lstrip(b"\r\n")  # the empty lines a request line may follow
    return str(line, "iso-8859-1").partition(" ")[0] if b" " in line else ""


#: Bytes of a request looked at for its method, its empty lines before included.
_PEEK = 1024


class RequestHandler(WSGIRequestHandler):
    """wsgiref's handler of one request: its header block bounded, what goes wrong logged,
    every answer in HTTP/1.0."""

    # What an unparsable request line is taken for: the version its error is
    # answered in (HTTP/0.9, the default, is answered without a status line).
    default_request_version = "HTTP/1.0"

    def version_string(self) -> str:
        # The Server header of an error's answer: the interpreter's version is
        # nobody's business (any local user can reach a TCP endpoint).
        return "migblockd"

    def handle(self) -> None:
        # WSGIRequestHandler.handle (the same from Python 3.8 to 3.13), but for
        # the empty lines before the request line, and the ServerHandler that logs.
        skipped, line = self._past_empty_lines()
        if skipped + len(line) > MAX_REQUEST_LINE:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not line:
            if skipped:
                # Empty lines, then the end: not a request.  A client that shut
                # down its side only may still read the answer.
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.BAD_REQUEST, "No request line")
            return  # nothing at all: nobody to answer (http.server's choice too)
        self.raw_requestline = line
        if not self.parse_request():
            return
        # The socket's files, as wsgiref passes them (typeshed wants IO[bytes] there).
        handler = _ServerHandler(self.rfile, self.wfile,  # type: ignore[arg-type]
                                 self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back pointer
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def _past_empty_lines(self) -> tuple[int, bytes]:
        """(bytes of empty lines skipped, the line after them: b"" at the end).

        RFC 9112 (2.2): a server SHOULD ignore at least one empty line before the
        request line; http.server takes the first line for the request line, and
        closed the connection on an empty one without a word.  The empty lines
        count towards ``MAX_REQUEST_LINE``, so a client cannot keep the thread
        reading them for ever (the socket's timeout and the connection's deadline
        bound the wait for each).
        """
        skipped = 0
        while True:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1 - skipped)
            if line not in (b"\r\n", b"\n") or skipped + len(line) > MAX_REQUEST_LINE:
                return skipped, line
            skipped += len(line)

    def parse_request(self) -> bool:
        version = _version(self.raw_requestline)
        if version is not None and version < (1, 0):
            # http.server takes it, and wsgiref then answers without a status line
            # nor headers (a body alone, or nothing for a HEAD), which a client
            # cannot tell from a broken answer.  Refused as http.server refuses
            # HTTP/2.0, but in HTTP/1.0.
            self.command = ""
            self.request_version = self.default_request_version
            self.close_connection = True
            self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                            f"Invalid HTTP version ({version[0]}.{version[1]})")
            return False
        rfile = self.rfile
        head = _Bounded(rfile, MAX_HEADER_BYTES)
        self.rfile = head  # what http.server reads the header lines from
        try:
            parsed = super().parse_request()
        finally:
            self.rfile = rfile
        if parsed and head.over:
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"Request header fields over {MAX_HEADER_BYTES} bytes")
            return False
        return parsed

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # http.server repeats what it could not parse in the reason phrase and
        # again in the page, as repr(): 65 KB of NULs came back as 520 KB, more
        # than a socket's buffer, and a client that did not read held the thread
        # (and the slot) writing for REQUEST_TIMEOUT.  The status says enough.
        if message is not None and len(message) > _MESSAGE_MAX:
            message = f"{message[:_MESSAGE_MAX]}..."
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line is the client's: escaped and cut, as every client string.
        log.debug("metrics: %s", shown(format % args, quoted=False))


def _version(line: bytes) -> tuple[int, int] | None:
    """The version a request line says, as http.server reads it (the last of three
    words or more, ``HTTP/`` and two numbers; two words are HTTP/0.9's simple
    request, ``GET /metrics``); None if it says none it can read."""
    words = str(line, "iso-8859-1").split()
    if len(words) == 2:
        return 0, 9
    if len(words) < 3 or not words[-1].startswith("HTTP/"):
        return None
    numbers = words[-1][len("HTTP/"):].split(".")
    # ASCII digits only: "²" is a digit to isdigit(), not to int().
    if len(numbers) != 2 or not all(n.isascii() and n.isdigit() and len(n) <= 10
                                    for n in numbers):
        return None
    return int(numbers[0]), int(numbers[1])


class _Bounded(io.BufferedIOBase):
    """The request's header lines from ``raw``, ending early past ``limit`` bytes in all."""

    def __init__(self, raw: io.BufferedIOBase, limit: int) -> None:
        super().__init__()
        self._raw = raw
        self._left = limit
        self.over = False

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> bytes:
        if self.over:
            return b""
        # One byte past what is left tells a block that ends exactly at the limit
        # from one that goes on.
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        line = self._raw.readline(want)
        self._left -= len(line)
        if self._left < 0:
            self.over = True
            return b""  # the end of the headers, for http.client: parse_request says 431
        return line


class _ServerHandler(ServerHandler):
    server_software = "migblockd"  # the Server header: no interpreter version

    def log_exception(self, exc_info: Any) -> None:
        error = exc_info[1]
        if isinstance(error, OSError):
            # A client that stopped reading (the socket's timeout) or went away
            # (wsgiref keeps quiet about a reset or a broken pipe, not the rest).
            log.debug("metrics: answer not sent: %r", error)
        else:
            log_failure("cannot answer", exc_info)

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
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler

from migblockd.logs import shown

__all__ = ["MAX_REQUEST_LINE", "RequestHandler"]

log = logging.getLogger("migblockd")

#: Bytes of the request line at most (wsgiref's own bound): past it, 414.
MAX_REQUEST_LINE = 65536


class RequestHandler(WSGIRequestHandler):
    """wsgiref's handler of one request, that logs what goes wrong."""

    def handle(self) -> None:
        # WSGIRequestHandler.handle (the same from Python 3.8 to 3.13), but for
        # the ServerHandler that logs.
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not self.parse_request():
            return
        # The socket's files, as wsgiref passes them (typeshed wants IO[bytes] there).
        handler = _ServerHandler(self.rfile, self.wfile,  # type: ignore[arg-type]
                                 self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref's back pointer
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        # The request line is the client's: escaped and cut, as every client string.
        log.debug("metrics: %s", shown(format % args, quoted=False))


class _ServerHandler(ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        error = exc_info[1]
        if isinstance(error, OSError):
            # A client that stopped reading (the socket's timeout) or went away
            # (wsgiref keeps quiet about a reset or a broken pipe, not the rest).
            log.debug("metrics: answer not sent: %r", error)
        else:
            log.error("metrics: cannot answer", exc_info=exc_info)

"""The metrics endpoint (``--metrics``): HTTP for Prometheus, on a thread of its own.

prometheus_client's WSGI app (``make_wsgi_app``: content negotiation between
the Prometheus text format and OpenMetrics, gzip, ``name[]`` filters, 405 for
anything but GET) served by the standard library's ``wsgiref`` on a
threading server, in a daemon thread.  Why a thread rather than an HTTP
handler on the event loop: the HTTP parsing, for a port that may face the
network, is the standard library's and not ours, and the only shared state
is read-only for the thread (integers and fixed-size containers,
:mod:`migblockd.stats`).  The price is the GIL: while a scrape formats its
answer (about a millisecond) the loop may wait for the interpreter, a cost
``benchmarks/bench_metrics.py`` measures (docs/metrics.md has the numbers).

The address is ``host:port`` (TCP) or an absolute path, a Unix socket bound
with the same care as the QMP socket (``migblockd.listen``: mode 0600 from
the start, a live socket never taken over, a stale one replaced, our own
removed at exit).  Abuse stays bounded: at most ``MAX_SCRAPES`` requests are
served at once (more connections are closed at once), and a client that
sends nothing is dropped after ``REQUEST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from migblockd.config import HostPort
from migblockd.listen import StartupError, bind_socket

__all__ = ["MAX_SCRAPES", "REQUEST_TIMEOUT", "MetricsServer"]

log = logging.getLogger("migblockd")

#: Scrapes served at once; Prometheus sends one at a time per target.
MAX_SCRAPES = 4
#: Seconds a metrics client has to send its request (and to read the answer).
REQUEST_TIMEOUT = 10.0


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s", format % args)


class _Server(ThreadingMixIn, WSGIServer):
    """A wsgiref server on a socket bound elsewhere (TCP or Unix), bounded in threads."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, port: int, app: Any) -> None:
        # socketserver makes a socket of its own here, unbound: ours replaces it.
        super().__init__(("", 0), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = "migblockd", port
        self.setup_environ()
        self.set_app(app)
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = self.socket.accept()
        # A Unix socket's peer has no address; wsgiref wants one for REMOTE_ADDR.
        return conn, address if isinstance(address, tuple) else ("local", 0)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: %d scrapes in progress; closing another connection",
                      MAX_SCRAPES)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or timed out: nothing to report beyond debug.
        log.debug("metrics: request failed: %r", sys.exc_info()[1])


class MetricsServer:
    """The endpoint, serving ``registry`` until :meth:`close`."""

    def __init__(self, sock: socket.socket, where: str, registry: CollectorRegistry,
                 own_socket: tuple[Path, int] | None) -> None:
        port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else 0
        self.where = where
        self.own_socket = own_socket
        self._httpd = _Server(sock, port, make_wsgi_app(registry))
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="migblockd-metrics", daemon=True)

    @classmethod
    def open(cls, address: Path | HostPort, registry: CollectorRegistry,
             qmp_socket: Path) -> MetricsServer:
        """Bind ``address`` (not serving yet: :meth:`start`).  StartupError when it cannot."""
        if isinstance(address, Path):
            if os.path.abspath(address) == os.path.abspath(qmp_socket):
                raise StartupError(f"--metrics {address}: that is the QMP socket; metrics "
                                   "need an address of their own")
            sock = bind_socket(address, 0o600, option="--metrics")
            sock.setblocking(True)
            own = (address, os.stat(address).st_ino)
            return cls(sock, f"http+unix://{address}", registry, own)
        sock = _listen_tcp(address)
        host, port = sock.getsockname()[:2]
        shown = str(HostPort(host, port))
        return cls(sock, f"http://{shown}/metrics", registry, None)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics: serving Prometheus metrics on %s", self.where)

    def close(self) -> None:
        """Stop serving (at once: blocks only for a scrape being written) and clean up."""
        if self._thread.is_alive():
            # Wakes the server's select() now rather than at its next poll.
            with contextlib.suppress(OSError):
                self._httpd.socket.shutdown(socket.SHUT_RDWR)
            self._httpd.shutdown()
        self._httpd.server_close()
        if self.own_socket is not None:
            path, inode = self.own_socket
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:  # only ours: it may have been replaced
                    path.unlink()


def _listen_tcp(address: HostPort) -> socket.socket:
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--metrics {address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise StartupError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") \
            from None
    return sock

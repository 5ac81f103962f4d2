"""The metrics endpoint (``--metrics``): HTTP on a thread, each answer built on the loop.

The standard library's ``wsgiref`` on a threading server, in a daemon thread,
does the HTTP: the parsing, for a port that may face the network, is not
ours to write, and a slow or silent client ties up a thread, never the event
loop.  The answer itself is built on the event loop, between two turns, by
:class:`~migblockd.exposition.MetricsApp` (see :mod:`migblockd.exposition` for
why there, and how often).

The address is ``host:port`` (TCP) or an absolute path, a Unix socket bound
with the same care as the QMP socket (``migblockd.listen``: mode 0600 from
the start, a live socket never taken over, a stale one replaced, our own
removed at exit).  What the server does with its connections (at most
``MAX_SCRAPES`` at once, each within ``REQUEST_TIMEOUT`` and ``REQUEST_DEADLINE``,
a silent one closed to make room for a new one) is
:mod:`migblockd.scrape_connections`'s; this module binds the address, runs the
server's thread, and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from migblockd import signalmask
from migblockd.exposition import MIN_INTERVAL, MetricsApp, gzip_wanted
from migblockd.kinds import HostPort
from migblockd.listen import LISTEN_BACKLOG, bind_socket, unbind
from migblockd.pidlock import PidLock
from migblockd.preflight import not_the_qmp_socket
from migblockd.scrape_connections import ScrapeServer
from migblockd.sources import COMMAND_LINE, Sources
from migblockd.startup import StartupError, status_of
from migblockd.tcp import cannot_listen, resolve_all

__all__ = ["MIN_INTERVAL", "STOP_WAIT", "MetricsApp", "MetricsServer", "gzip_wanted"]

log = logging.getLogger("migblockd")

#: Seconds a stop waits for the scrapes under way to be answered.
STOP_WAIT = 2.0


class MetricsServer:
    """The endpoint, serving ``registry`` until :meth:`close`."""

    def __init__(self, sock: socket.socket, where: str, app: MetricsApp,
                 own_socket: tuple[Path, int] | None, lock: PidLock | None = None,
                 unserved: str = "", setting: str = "metrics") -> None:
        port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else 0
        self.where = where
        #: The host's other addresses, where nothing listens ("" for none).
        self.unserved = unserved
        #: The setting as the warning about them names it (Sources.keyed).
        self.setting = setting
        self.own_socket = own_socket
        self._lock = lock
        self._app = app
        self._httpd = ScrapeServer(sock, port, app)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="migblockd-metrics", daemon=True)

    @classmethod
    def open(cls, address: Path | HostPort, registry: CollectorRegistry, qmp_socket: Path,
             loop: asyncio.AbstractEventLoop, sources: Sources = COMMAND_LINE) -> MetricsServer:
        """Bind ``address`` (not serving yet: :meth:`start`).  StartupError when it cannot.

        ``loop`` is the event loop that builds the answers (see above); ``sources``:
        where ``address`` came from, which the errors name.
        """
        app = MetricsApp(registry, loop)
        if isinstance(address, Path):
            not_the_qmp_socket(address, qmp_socket, sources.named("metrics"))
            bound = bind_socket(address, 0o600, option=sources.choice("metrics"))
            bound.sock.setblocking(True)
            return cls(bound.sock, f"http+unix://{address}", app, (address, bound.inode),
                       bound.lock)
        sock, others = _listen_tcp(address, sources.named("metrics"))
        name = sock.getsockname()
        host, port = name[:2]
        if len(name) == 4 and name[3] and "%" not in host:  # link-local: its interface
            with contextlib.suppress(OSError):
                host = f"{host}%{socket.if_indextoname(name[3])}"
        shown = str(HostPort(host, port))
        unserved = ", ".join(str(HostPort(other, port)) for other in others)
        return cls(sock, f"http://{shown}/metrics", app, None, unserved=unserved,
                   setting=sources.keyed("metrics"))

    def start(self) -> None:
        signalmask.start(self._thread)
        log.info("metrics: serving Prometheus metrics on %s", self.where)
        if self.unserved:
            # localhost is [::1] first and 127.0.0.1 on most systems: a scraper
            # told 127.0.0.1 would find nothing, with a log that names neither.  Led
            # by the line of the file that names the host, where the file does.
            log.warning("%s: nothing is served on %s, which the host name also resolves "
                        "to: a name is served on its first address only (give the address "
                        "itself to choose)", self.setting, self.unserved)

    def stopping(self, *, before_serving: bool = False) -> None:
        """Say in the lock of a Unix socket it serves that the daemon is stopping
        (before it served: ``before_serving``), for a start refused the address
        meanwhile (:meth:`PidLock.stopping`); a TCP address has no lock (the
        kernel's refusal says nothing of who holds it)."""
        if self._lock is not None:
            self._lock.stopping(before_serving=before_serving)

    def close(self) -> None:
        """Stop serving and clean up: the scrapes under way are answered (a 503 for
        those still waiting for their turn), for STOP_WAIT seconds at most; the
        connections still sending their request are cut at once."""
        self._app.stopping.set()
        if self._thread.is_alive():
            # Wakes the server's select() now rather than at its next poll.
            with contextlib.suppress(OSError):
                self._httpd.socket.shutdown(socket.SHUT_RDWR)
            self._httpd.shutdown()
        # No scrape under way: only waited for, then cut by the end of the process.
        self._httpd.cut_senders()
        self._httpd.say_crowded(last=True)
        # Daemon threads: the end of the process would close their connections
        # with nothing said.
        self._httpd.pool.stop(time.monotonic() + STOP_WAIT)
        self._httpd.server_close()
        if self.own_socket is not None:
            unbind(*self.own_socket)
        if self._lock is not None:
            self._lock.release()


def _listen_tcp(address: HostPort, setting: str) -> tuple[socket.socket, list[str]]:
    """A socket listening on the first address of ``address``, and the others it
    resolves to (distinct, in the resolver's order), where nothing listens."""
    infos = resolve_all(address, setting)
    family, kind, proto, _, sockaddr = infos[0]
    others = list(dict.fromkeys(info[4][0] for info in infos if info[4][0] != sockaddr[0]))
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        # The QMP socket's backlog: connections cut and made again as fast as
        # they are cut fill a short queue, and a scraper's SYN is then dropped
        # and retried only seconds later.
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno is None:
            raise StartupError(f"{setting} {address}: cannot listen: {exc}") from None
        raise StartupError(cannot_listen(address, setting, exc.errno),
                           status_of(exc.errno)) from None
    return sock, others

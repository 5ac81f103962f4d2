"""The ceiling: a minimal server that does the visible work of add/del, as cheaply as Python can.

``python -m benchmarks.ceiling --socket PATH [--event-loop asyncio|uvloop]``
serves a Unix socket with an :class:`asyncio.Protocol` (no streams).  Per
connection it sends a QMP-style greeting line, then for every complete request
line: ``json.loads()``, the reply ``{"return": {}, "id": ID}\\r\\n`` (no ``id``
member when the request had none), and, when the request is ``add-blocker`` or
``del-blocker``, a small event line (``BLOCKER_ADDED`` / ``BLOCKER_DELETED``,
the request's ``arguments.id`` and a timestamp) to *every* connected client,
ahead of the reply, as a QMP server orders them.  Nothing is validated and
nothing is stored.

Writes are coalesced: output is appended to the connection's buffer, and one
callback per event-loop turn (``loop.call_soon``) writes each connection's
buffer with a single ``transport.write``.  With 16 clients each add/del thus
costs about two ``send()`` calls per loop turn instead of seventeen: the
least that "reply, and tell everyone" can cost.  ``benchmarks.bench_daemon``
reports the daemon's add/del rate as a fraction of this server's, next to the
floor (``benchmarks.floor``), which sends no events.

It logs ``ceiling: ready on PATH`` on stderr once it listens, and exits cleanly
on SIGTERM or SIGINT.  ``--event-loop uvloop`` needs the optional ``uvloop``
package (``pip install -e '.[uvloop]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from benchmarks.floor import GREETING, LINE_LIMIT

EVENTS = {b"add-blocker": b"BLOCKER_ADDED", b"del-blocker": b"BLOCKER_DELETED"}
PARSE_ERROR = b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n'


class Hub:
    """Every connected client, and the ones with output waiting for this turn's flush."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clients: dict[Client, None] = {}  # an ordered set
        self.dirty: list[Client] = []
        self.scheduled = False

    def queue(self, client: Client, data: bytes) -> None:
        if not client.out:
            self.dirty.append(client)
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self.flush)
        client.out.append(data)

    def broadcast(self, data: bytes) -> None:
        for client in self.clients:
            self.queue(client, data)

    def flush(self) -> None:
        """Once per loop turn: one write per client with output."""
        dirty, self.dirty = self.dirty, []
        self.scheduled = False
        for client in dirty:
            out, client.out = client.out, []
            if client.transport is not None and not client.transport.is_closing():
                client.transport.write(out[0] if len(out) == 1 else b"".join(out))


def event_line(name: bytes, request: dict[str, Any]) -> bytes:
    arguments = request.get("arguments")
    blocker = arguments.get("id") if isinstance(arguments, dict) else None
    seconds, micro = divmod(int(time.time() * 1_000_000), 1_000_000)
    return (b'{"timestamp": {"seconds": %d, "microseconds": %d}, "event": "%s", '
            b'"data": {"id": %s}}\r\n' % (seconds, micro, name, json.dumps(blocker).encode()))


class Client(asyncio.Protocol):
    """One connection: splits lines, answers each, fans add/del events out."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)
        self.hub.clients[self] = None
        self.hub.queue(self, GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.clients.pop(self, None)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > LINE_LIMIT:
            assert self.transport is not None
            self.transport.abort()  # like the floor: an overlong line ends the connection
            return
        for line in lines:
            if line and not line.isspace():
                self.request(line)

    def request(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            self.hub.queue(self, PARSE_ERROR)
            return
        if not isinstance(request, dict):
            self.hub.queue(self, b'{"return": {}}\r\n')
            return
        command = request.get("execute")
        if isinstance(command, str):
            name = EVENTS.get(command.encode())
            if name is not None:
                self.hub.broadcast(event_line(name, request))
        if "id" in request:
            reply = b'{"return": {}, "id": ' + json.dumps(request["id"]).encode() + b"}\r\n"
        else:
            reply = b'{"return": {}}\r\n'
        self.hub.queue(self, reply)


async def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    loop = asyncio.get_running_loop()
    hub = Hub(loop)
    server = await loop.create_unix_server(lambda: Client(hub), path, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ceiling: ready on {path} ({type(loop).__module__})", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def uvloop_available() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop constructor for ``--event-loop`` (None: asyncio's default)."""
    if name == "asyncio":
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = importlib.import_module(
        "uvloop").new_event_loop
    return factory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ceiling",
        description="Minimal asyncio Protocol server with coalesced writes and add/del "
                    "events fanned out to every client: the benchmark's ceiling.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop implementation (uvloop: the optional uvloop package)")
    args = parser.parse_args(argv)
    try:
        factory = loop_factory(args.event_loop)
    except ImportError:
        parser.error("--event-loop uvloop needs the uvloop package: pip install -e '.[uvloop]'")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The scale scenario: a daemon holding 100,000 blockers, and a client that polls them all.

:func:`preload` writes the blockers straight into a state directory with the
daemon's own store (``migblockd.state.Store``), so the daemon restores them at
start: seconds, where adding them over the socket would take minutes, and it
exercises the restore.  Then ``python -m benchmarks.scale --socket PATH``, a
load generator of its own, measures in two phases and prints one JSON object:

1. **after a change**: one connection adds a blocker, then sends
   ``query-blockers`` and times it from the request to the last byte of the
   reply; then queries again (nothing changed: ``unchanged``); then deletes
   the blocker and queries again (after a change).  ``--repeat`` times.
2. **under load**: for ``--warmup`` + ``--duration`` seconds, one *poller*
   sends ``query-blockers`` in a loop, one *adder* adds and deletes blockers
   in a loop (so every poll follows a change), and ``--clients`` *observers*
   send ``query-version`` in a loop, each with one request in flight.  The
   report gives each group's latencies in the window, and how many clients
   the daemon dropped (a connection it closed, e.g. for ``--max-output``); a
   dropped poller reconnects and goes on polling, so the load stays the same.

Big replies are never parsed: the reader keeps the first bytes of a line (to
tell an event, a success and an error apart) and counts the rest up to the
newline.  Every client negotiates capabilities, so all of them receive the
adder's events, and read and discard them, as management software would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadgen import CAPABILITIES, DRAIN_TIMEOUT, SETUP_TIMEOUT, Meter, RequestClient
from benchmarks.loadgen import percentile as nearest_rank
from benchmarks.servers import SEED_BLOCKERS
from migblockd.state import BlockerRow, Put, Store

QUERY = b'{"execute": "query-blockers", "id": "poll"}\n'
HEAD = 16  # bytes kept of each line: enough to classify it


def preload(directory: Path, count: int) -> None:
    """Store ``count`` daemon-scoped blockers (every mode, as ``migrate_add_blocker()``
    makes them, owned by this process) in the state directory ``directory``."""
    owner = (os.getpid(), os.getuid(), os.getgid())
    now = time.time()
    rows = [Put(BlockerRow(id=f"scale-{n:06d}", reason=SEED_BLOCKERS[n % len(SEED_BLOCKERS)][0],
                           modes=None, internal=False, owner=owner, added=now, seq=n))
            for n in range(count)]
    with Store.open(directory) as store:
        store.commit(rows)


def stats(ns: Sequence[int]) -> dict[str, float]:
    values = sorted(ns)
    return {"samples": len(values), "p50_us": nearest_rank(values, 0.50) / 1000,
            "p99_us": nearest_rank(values, 0.99) / 1000,
            "max_us": (values[-1] if values else 0) / 1000}


class BlockingLines:
    """Reads lines from a blocking socket as (first bytes, length), without keeping them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(1 << 20)
        self.start = self.end = 0

    def line(self) -> tuple[bytes, int]:
        head, length = b"", 0
        while True:
            newline = self.buf.find(b"\n", self.start, self.end)
            stop = self.end if newline < 0 else newline + 1
            if len(head) < HEAD:
                head += bytes(self.buf[self.start:min(stop, self.start + HEAD - len(head))])
            length += stop - self.start
            self.start = stop
            if newline >= 0:
                return head, length
            self.start = self.end = 0
            received = self.sock.recv_into(self.buf)
            if received == 0:
                raise ConnectionError("the server closed the connection")
            self.end = received

    def reply(self) -> tuple[bytes, int]:
        """The next line that is not an event; RuntimeError if it is not a success."""
        while True:
            head, length = self.line()
            if head.startswith(b'{"timestamp"'):
                continue
            if not head.startswith(b'{"return"'):
                raise RuntimeError(f"error reply: {head!r}...")
            return head, length


def after_change(path: str, repeat: int) -> dict[str, Any]:
    """Phase 1: ``query-blockers`` right after an add or a delete, and unchanged."""
    changed: list[int] = []
    unchanged: list[int] = []
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120.0)
        sock.connect(path)
        lines = BlockingLines(sock)
        lines.line()  # greeting
        sock.sendall(CAPABILITIES)
        lines.reply()

        def query(into: list[int]) -> int:
            started = time.perf_counter_ns()
            sock.sendall(QUERY)
            length = lines.reply()[1]
            into.append(time.perf_counter_ns() - started)
            return length

        for n in range(repeat):
            blocker = f"scale-probe-{os.getpid()}-{n}"
            sock.sendall(b'{"execute": "add-blocker", "arguments": {"id": "%s", "reason": '
                         b'"scale probe"}}\n' % blocker.encode())
            lines.reply()
            size = query(changed)
            query(unchanged)
            sock.sendall(b'{"execute": "del-blocker", "arguments": {"id": "%s"}}\n'
                         % blocker.encode())
            lines.reply()
            query(changed)
    return {"reply_bytes": size, "after_change": stats(changed), "unchanged": stats(unchanged)}


class BigReader(asyncio.Protocol):
    """An asyncio connection whose replies may be megabytes long: :meth:`request`
    returns the reply's first bytes and length; events are counted and skipped."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head, self.length = b"", 0
        self.waiting: asyncio.Future[tuple[bytes, int]] | None = None
        self.lines: list[tuple[bytes, int]] = []
        self.events = 0
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        start = 0
        while True:
            newline = data.find(b"\n", start)
            stop = len(data) if newline < 0 else newline + 1
            if len(self.head) < HEAD:
                self.head += data[start:min(stop, start + HEAD - len(self.head))]
            self.length += stop - start
            if newline < 0:
                return
            start = stop
            line, self.head, self.length = (self.head, self.length), b"", 0
            if line[0].startswith(b'{"timestamp"'):
                self.events += 1
            else:
                self.lines.append(line)
                self.wake()

    def wake(self) -> None:
        if self.waiting is not None and not self.waiting.done() and self.lines:
            self.waiting.set_result(self.lines.pop(0))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionError(f"closed by the server ({exc or 'EOF'})")
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(self.lost)

    async def next_line(self) -> tuple[bytes, int]:
        if self.lost is not None and not self.lines:
            raise self.lost
        self.waiting = asyncio.get_running_loop().create_future()
        self.wake()
        return await self.waiting

    async def request(self, data: bytes) -> tuple[bytes, int]:
        assert self.transport is not None
        self.transport.write(data)
        return await self.next_line()


class Load:
    """Phase 2's shared state: the window, the poller's figures, the drops."""

    def __init__(self) -> None:
        self.measuring = False
        self.stopping = False
        self.polls: list[int] = []
        self.sent = 0
        self.poll_bytes = 0
        self.drops: list[str] = []


async def poller(path: str, load: Load) -> None:
    loop = asyncio.get_running_loop()
    while not load.stopping:
        # Outside the try: a refused connection is an error, not a drop.
        transport, conn = await loop.create_unix_connection(BigReader, path)
        try:
            await conn.next_line()  # greeting
            await conn.request(CAPABILITIES)
            while not load.stopping:
                started = time.perf_counter_ns()
                load.sent += 1
                head, length = await conn.request(QUERY)
                if not head.startswith(b'{"return"'):
                    raise RuntimeError(f"query-blockers failed: {head!r}...")
                if load.measuring:
                    load.polls.append(time.perf_counter_ns() - started)
                    load.poll_bytes += length
        except ConnectionError as exc:
            load.drops.append(f"poller: {exc}")
        finally:
            transport.close()


async def under_load(path: str, observers: int, warmup: float, duration: float
                     ) -> dict[str, Any]:
    """Phase 2: one poller, one adder and ``observers`` query-version clients."""
    loop = asyncio.get_running_loop()
    load, watch, adds = Load(), Meter(), Meter()
    conns: list[RequestClient] = []
    for number in range(observers + 1):
        meter, kind = (adds, "adddel") if number == observers else (watch, "version")
        _, proto = await loop.create_unix_connection(
            lambda m=meter, k=kind, n=number: RequestClient(m, k, n), path)  # type: ignore[misc]
        conns.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.negotiated for c in conns)), SETUP_TIMEOUT)
    polling = asyncio.create_task(poller(path, load))
    for conn in conns:
        conn.start()
    await asyncio.sleep(warmup)
    started = time.perf_counter()
    for meter in (watch, adds):
        meter.begin()
    load.measuring = True
    await asyncio.sleep(duration)
    load.measuring = False
    for meter in (watch, adds):
        meter.end()
    window = time.perf_counter() - started
    load.stopping = watch.stopping = adds.stopping = True
    await asyncio.wait_for(
        asyncio.gather(*(c.finished for c in conns), polling, return_exceptions=True),
        DRAIN_TIMEOUT + 120)
    polling.result()  # an error other than a drop ends the run
    for conn in conns:
        if conn.state != "done":
            load.drops.append(f"{'adder' if conn.meter is adds else 'observer'} "
                              f"{conn.prefix}: closed by the server in state {conn.state}")
        if conn.transport is not None:
            conn.transport.close()
    for meter, what in ((watch, "observer"), (adds, "adder")):
        if meter.errors:
            raise RuntimeError(f"{what}: {meter.errors} error replies, first: "
                               f"{meter.first_error}")

    def group(meter: Meter) -> dict[str, Any]:
        lat = sorted(meter.latencies)
        return {**stats(lat), "requests": len(lat), "rate": len(lat) / window,
                "events": meter.events}

    return {"seconds": window, "observers": {"clients": observers, **group(watch)},
            "adder": group(adds),
            "poller": {**stats(load.polls), "requests": len(load.polls), "sent": load.sent,
                       "bytes": load.poll_bytes},
            "dropped": len(load.drops), "drops": load.drops[:100]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="The scale scenario's load: query-blockers after changes, then one poller, "
                    "one adder and N query-version clients; prints one JSON object.",
    )
    parser.add_argument("--socket", required=True)
    parser.add_argument("--repeat", type=int, default=5,
                        help="add / query / query / delete / query cycles of phase 1")
    parser.add_argument("--clients", type=int, default=16, help="query-version clients")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args(argv)
    if not (1 <= args.repeat <= 100 and 1 <= args.clients <= 500):
        parser.error("need 1 <= --repeat <= 100 and 1 <= --clients <= 500")
    if not (0 <= args.warmup <= 60 and 0 < args.duration <= 300):
        parser.error("--warmup must be in [0, 60] and --duration in (0, 300]")
    try:
        result = after_change(args.socket, args.repeat)
        result.update(asyncio.run(
            under_load(args.socket, args.clients, args.warmup, args.duration)))
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"scale: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

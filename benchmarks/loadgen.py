"""The load generator: one process, one asyncio loop, N closed-loop connections.

``python -m benchmarks.loadgen --socket PATH --scenario NAME --clients N
--warmup S --duration S`` drives one server and prints one JSON object (a
:class:`Result`) on stdout.  ``benchmarks.bench_daemon`` runs it once per
scenario and server, in its own process, so the client never shares an event
loop (or, when pinned, a core) with the server it measures.

Scenarios:

``query``    each connection negotiates, then sends ``query-blockers`` and waits
             for the reply before sending the next (1 request in flight).
``adddel``   each connection alternates ``add-blocker`` (a unique ``id``) and
             ``del-blocker`` of that id; each command counts as one request.
             Events (the daemon sends BLOCKER_ADDED/BLOCKER_REMOVED to every
             negotiated client, before the reply) are read and discarded.
``connect``  each of N connectors loops: connect, read the greeting, send
             ``qmp_capabilities``, read the reply, send ``query-version``, read
             the reply, close.  One cycle counts as one "request"; its latency is
             the whole cycle.

Every request ends in ``\\n`` (see ``benchmarks.floor`` for why).  Replies are
classified without parsing: a line starting ``{"timestamp"`` is an event, one
starting ``{"return"`` a success, anything else an error (both servers put
``timestamp`` first in an event, ``return`` first in a success and ``id`` first
in an error, as QEMU does).  Versions of migblockd before the event order was
QEMU's put ``event`` first: ``benchmarks.ab`` still compares them.

Only replies received inside the measurement window (after the warm-up) count
towards the rate and the latencies; afterwards every connection finishes its
request in flight (an added blocker is still deleted, uncounted) and closes.  An
error reply counts whenever it comes, warm-up and wind-down included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from benchmarks.servers import process_cpu_seconds

SCENARIOS = ("query", "adddel", "connect")
#: How an event line starts: QEMU's order, and older migblockd's.
_EVENT_HEADS = (b'{"timestamp"', b'{"event"')
#: How long the wind-down may take before the run is declared broken.
DRAIN_TIMEOUT = 10.0
#: How long the set-up (connecting and negotiating every client) may take.
SETUP_TIMEOUT = 10.0

CAPABILITIES = b'{"execute": "qmp_capabilities"}\n'
QUERY_VERSION = b'{"execute": "query-version", "id": 1}\n'


@dataclass
class Result:
    scenario: str
    clients: int
    requests: int = 0          # replies (or cycles) completed inside the window
    seconds: float = 0.0       # length of the window
    rate: float = 0.0          # requests / seconds
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    errors: int = 0            # replies that were not successes, in or out of the window
    events: int = 0            # event lines read and discarded in the window
    first_error: str = ""
    client_cpu: float = 0.0    # CPU seconds of this process per second of window (0..1)
    server_cpu: float = 0.0    # the same of the --server-pid process (0 without it)


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values) - 1e-9)))
    return sorted_values[rank - 1]


class Meter:
    """The shared measurement window and what falls inside it."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.server_start = 0.0
        self.server_used = 0.0
        self.measuring = False
        self.stopping = False
        self.latencies: list[int] = []
        self.errors = 0
        self.events = 0
        self.first_error = ""
        self.failure: BaseException | None = None
        self.cpu_start = 0.0
        self.cpu_used = 0.0

    def begin(self) -> float:
        self.measuring = True
        self.cpu_start = time.process_time()
        if self.server_pid is not None:
            self.server_start = process_cpu_seconds(self.server_pid)
        return time.perf_counter()

    def end(self) -> None:
        self.measuring = False
        self.cpu_used = time.process_time() - self.cpu_start
        if self.server_pid is not None:
            self.server_used = process_cpu_seconds(self.server_pid) - self.server_start

    def reply(self, line: bytes, sent_ns: int) -> None:
        # An error fails the run whenever it comes; only the figures of speed are
        # limited to the window.
        if not line.startswith(b'{"return"'):
            self.error(line)
        if self.measuring:
            self.latencies.append(time.perf_counter_ns() - sent_ns)

    def error(self, line: bytes) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = line.decode(errors="replace").strip()[:300]

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc


class LineProtocol(asyncio.Protocol):
    """Splits the byte stream into lines and hands them to :meth:`line`."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.transport: asyncio.Transport | None = None
        self.partial = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line.startswith(_EVENT_HEADS):
                if self.meter.measuring:
                    self.meter.events += 1
                continue
            self.line(line)

    def line(self, line: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class RequestClient(LineProtocol):
    """One connection of the ``query`` or ``adddel`` scenario (or ``version``:
    ``query-version`` in a loop, which ``benchmarks.scale`` uses)."""

    def __init__(self, meter: Meter, scenario: str, number: int) -> None:
        super().__init__(meter)
        self.scenario = scenario
        self.prefix = f"bench-{os.getpid()}-{number}-"
        self.serial = 0
        self.pending_delete = ""  # the id to delete next, while a blocker is added
        self.sent_ns = 0
        self.state = "greeting"
        self.negotiated: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def line(self, line: bytes) -> None:
        assert self.transport is not None
        if self.state == "running":
            self.meter.reply(line, self.sent_ns)
            if self.meter.stopping and not self.pending_delete:
                self.state = "done"
                if not self.finished.done():
                    self.finished.set_result(None)
                return
            self.send_next()
        elif self.state == "greeting":
            if not line.startswith(b'{"QMP"'):
                self.meter.fail(RuntimeError(f"unexpected greeting: {line[:200]!r}"))
                return
            self.state = "negotiating"
            self.transport.write(CAPABILITIES)
        elif self.state == "negotiating":
            if not line.startswith(b'{"return"'):
                self.meter.fail(RuntimeError(f"qmp_capabilities failed: {line[:200]!r}"))
                return
            self.state = "idle"
            self.negotiated.set_result(None)

    def start(self) -> None:
        self.state = "running"
        self.send_next()

    def send_next(self) -> None:
        assert self.transport is not None
        self.serial += 1
        if self.scenario == "query":
            request = b'{"execute": "query-blockers", "id": %d}\n' % self.serial
        elif self.scenario == "version":  # the observers of benchmarks.scale
            request = b'{"execute": "query-version", "id": %d}\n' % self.serial
        elif self.pending_delete:
            request = b'{"execute": "del-blocker", "arguments": {"id": "%s"}, "id": %d}\n' % (
                self.pending_delete.encode(), self.serial)
            self.pending_delete = ""
        else:
            blocker = f"{self.prefix}{self.serial}"
            request = (
                b'{"execute": "add-blocker", "arguments": {"reason": "benchmark blocker %s",'
                b' "id": "%s"}, "id": %d}\n' % (blocker.encode(), blocker.encode(), self.serial)
            )
            self.pending_delete = blocker
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != "done":
            self.meter.fail(ConnectionError(f"server closed the connection in state {self.state}"))
        for future in (self.negotiated, self.finished):
            if not future.done():
                future.set_exception(ConnectionError("server closed the connection"))
                future.exception()  # mark retrieved: the meter carries the failure
        super().connection_lost(exc)


class CycleClient(LineProtocol):
    """One connect / greeting / negotiate / query-version / close cycle."""

    def __init__(self, meter: Meter) -> None:
        super().__init__(meter)
        self.state = "greeting"
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def line(self, line: bytes) -> None:
        assert self.transport is not None
        if self.state == "greeting":
            self.state = "negotiating"
            self.transport.write(CAPABILITIES)
        elif self.state == "negotiating":
            if not line.startswith(b'{"return"'):
                self.meter.error(line)
            self.state = "query"
            self.transport.write(QUERY_VERSION)
        elif self.state == "query":
            if not line.startswith(b'{"return"'):
                self.meter.error(line)
            self.state = "done"
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed by the server in state {self.state}"))
        super().connection_lost(exc)


async def run_requests(path: str, scenario: str, clients: int, warmup: float,
                       duration: float, meter: Meter) -> float:
    loop = asyncio.get_running_loop()
    conns: list[RequestClient] = []
    for number in range(clients):
        _, proto = await loop.create_unix_connection(
            lambda n=number: RequestClient(meter, scenario, n), path)  # type: ignore[misc]
        conns.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.negotiated for c in conns)), SETUP_TIMEOUT)
    for conn in conns:
        conn.start()
    await asyncio.sleep(warmup)
    start = meter.begin()
    await asyncio.sleep(duration)
    meter.end()
    window = time.perf_counter() - start
    meter.stopping = True
    try:
        await asyncio.wait_for(asyncio.gather(*(c.finished for c in conns)), DRAIN_TIMEOUT)
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), DRAIN_TIMEOUT)
    return window


async def run_connect(path: str, connectors: int, warmup: float, duration: float,
                      meter: Meter) -> float:
    loop = asyncio.get_running_loop()

    async def connector() -> None:
        while not meter.stopping:
            started = time.perf_counter_ns()
            transport, proto = await loop.create_unix_connection(lambda: CycleClient(meter), path)
            try:
                await asyncio.wait_for(proto.done, DRAIN_TIMEOUT)
            finally:
                transport.close()
            await proto.closed
            if meter.measuring:
                meter.latencies.append(time.perf_counter_ns() - started)

    async def phase(seconds: float) -> None:
        # Sleep, but return early (with the error) when a connector fails.
        sleeper = asyncio.create_task(asyncio.sleep(seconds))
        await asyncio.wait([sleeper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        sleeper.cancel()
        for task in tasks:
            if task.done():
                meter.stopping = True
                task.result()

    tasks = [asyncio.create_task(connector()) for _ in range(connectors)]
    await phase(warmup)
    start = meter.begin()
    await phase(duration)
    meter.end()
    window = time.perf_counter() - start
    meter.stopping = True
    await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_TIMEOUT)
    return window


async def measure(path: str, scenario: str, clients: int, warmup: float,
                  duration: float, server_pid: int | None = None) -> Result:
    meter = Meter(server_pid)
    if scenario == "connect":
        window = await run_connect(path, clients, warmup, duration, meter)
    else:
        window = await run_requests(path, scenario, clients, warmup, duration, meter)
    if meter.failure is not None:
        raise meter.failure
    lat = sorted(meter.latencies)
    return Result(
        scenario=scenario,
        clients=clients,
        requests=len(lat),
        seconds=window,
        rate=len(lat) / window if window > 0 else 0.0,
        p50_us=percentile(lat, 0.50) / 1000,
        p99_us=percentile(lat, 0.99) / 1000,
        max_us=(lat[-1] if lat else 0) / 1000,
        errors=meter.errors,
        events=meter.events,
        first_error=meter.first_error,
        client_cpu=meter.cpu_used / window if window > 0 else 0.0,
        server_cpu=meter.server_used / window if window > 0 else 0.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadgen",
        description="Closed-loop QMP load on one Unix socket; prints one JSON result.",
    )
    parser.add_argument("--socket", required=True)
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument("--clients", type=int, default=1,
                        help="connections (connectors for 'connect')")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--server-pid", type=int, metavar="PID",
                        help="also report this process's CPU use over the window (Linux)")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 1000:
        parser.error("--clients must be between 1 and 1000")
    if not (0 <= args.warmup <= 60 and 0 < args.duration <= 300):
        parser.error("--warmup must be in [0, 60] and --duration in (0, 300]")
    try:
        result = asyncio.run(
            measure(args.socket, args.scenario, args.clients, args.warmup, args.duration,
                    args.server_pid))
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"loadgen: {args.scenario} on {args.socket}: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

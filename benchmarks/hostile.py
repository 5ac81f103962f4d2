"""The soak's clients: every hostile pattern the tests know, and polite clients that measure.

``python -m benchmarks.hostile --socket PATH --role hostile --seconds S`` runs the
hostile patterns at once, each in a loop, and prints one JSON object (how many
cycles each completed, and how many failed in ways the pattern did not expect).
``--role polite --warmup W`` runs well-behaved clients instead and prints their
latencies after the warm-up.  ``benchmarks.soak`` runs one of each, in processes of
their own, so the polite clients' clock is not the hostile ones' event loop.

Hostile patterns (rates are per pattern, kept modest: the point is variety for
minutes, not a flood):

``fuzz``       random bytes and QMP words, negotiated or not, then a probe request
``slowloris``  connections that trickle a message they never finish
``silent``     connections that never negotiate
``nonreader``  negotiated connections that send big requests and never read
``churn``      connect and close at once, over and over
``lister``     a thousand blockers of another mode, listed in full twice a second
               for a minute, then released all at once (a burst of events)
``exhaust``    connections opened until the daemon refuses one, held, then closed
``oversize``   a megabyte id, and a message past --max-message-size

Polite clients each loop: add a blocker of their own, list the normal mode's
blockers, delete theirs, pausing about 50 ms between requests: far busier than
agents are, and every request waits for a commit (a change's reply is held
until it is on disk; a read waits for the changes before it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

from benchmarks.loadgen import percentile

CAPABILITIES = b'{"execute": "qmp_capabilities"}\n'
READ_TIMEOUT = 10.0
FUZZ_ALPHABET = (b'{}[]":,\\ \n\r\t\x00\x04\x1b\xff\xfe\xc3\xa9\xed\xa0\x80\xf0\x9f'
                 b"'abcdeflnrstu0123456789-+.eE")
FUZZ_WORDS = (b'"execute"', b'"exec-oob"', b'"arguments"', b'"id"', b'"add-blocker"',
              b'"reason"', b'"query-version"', b'"qmp_capabilities"', b"NaN", b"1e400")


#: When the running pattern's loop stops (time.monotonic()), set per loop task.
DEADLINE: ContextVar[float] = ContextVar("DEADLINE", default=float("inf"))
#: Seconds the exhaustion pattern holds the daemon at its limit.
EXHAUST_HOLD = 3.0


class Stats:
    def __init__(self) -> None:
        self.cycles: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.last_failure: dict[str, str] = {}


async def connect(path: str, *, negotiate: bool = True,
                  limit: int = 1 << 22) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path, limit=limit)
    greeting = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
    if not greeting.startswith(b'{"QMP"'):
        writer.close()
        raise ConnectionRefusedError(greeting.decode(errors="replace").strip())
    if negotiate:
        writer.write(CAPABILITIES)
        await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
    return reader, writer


async def reply_to(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    """The next line that is not an event and carries ``marker`` (skipping the others)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        if not line:
            raise EOFError("the daemon closed the connection")
        if not line.startswith(b'{"timestamp"') and marker in line:
            return line


async def close(writer: asyncio.StreamWriter) -> None:
    """Close, or abort if what is still unsent does not go within a few seconds."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)
    writer.transport.abort()


# --------------------------------------------------------------------------- hostile


async def fuzz(path: str, rng: random.Random) -> None:
    reader, writer = await connect(path, negotiate=rng.random() < 0.5)
    try:
        for _ in range(20):
            writer.write(b"".join(
                rng.choice(FUZZ_WORDS) if rng.random() < 0.1 else bytes([rng.choice(FUZZ_ALPHABET)])
                for _ in range(rng.randint(1, 120))))
        writer.write(b'\x04\n{"execute": "query-version", "id": "probe"}')
        await reply_to(reader, b'"probe"')
    finally:
        await close(writer)


async def slowloris(path: str, rng: random.Random) -> None:
    _, writer = await connect(path)
    try:
        writer.write(b'{"execute": "add-blocker", "arguments": {"reason": "')
        while not writer.is_closing():  # until the idle timeout closes it
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.5)
    except OSError:
        pass
    finally:
        await close(writer)


async def silent(path: str, rng: random.Random) -> None:
    reader, writer = await connect(path, negotiate=False)
    try:
        await asyncio.wait_for(reader.read(), 60)  # the negotiation timeout's line, then EOF
    finally:
        await close(writer)


async def nonreader(path: str, rng: random.Random) -> None:
    # A small read buffer: once it is full asyncio stops reading, as a stuck client does.
    _, writer = await connect(path, limit=1 << 16)
    try:
        writer.write(b'{"execute": "query-qmp-schema"}\n' * 50)
        await asyncio.sleep(20)
    finally:
        writer.transport.abort()


async def churn(path: str, rng: random.Random) -> None:
    _, writer = await asyncio.open_unix_connection(path)
    writer.transport.abort()


async def lister(path: str, rng: random.Random) -> None:
    reader, writer = await connect(path)
    try:
        writer.write(b"".join(json.dumps({"execute": "add-blocker", "arguments": {
            "reason": f"listed {i} " + "r" * 200, "id": f"big-{rng.random():.12f}",
            "modes": ["cpr-exec"], "scope": "connection"}}).encode() for i in range(1000)))
        writer.write(b'{"execute": "query-version", "id": "seeded"}')
        await reply_to(reader, b'"seeded"')
        for i in range(120):
            writer.write(b'{"execute": "query-blockers", "id": "list-%d"}' % i)
            await reply_to(reader, b'"list-%d"' % i)
            await asyncio.sleep(0.5)
    finally:
        await close(writer)  # its blockers go with it


async def exhaust(path: str, rng: random.Random) -> None:
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3000):
            try:
                _, writer = await connect(path, negotiate=False)
            except (ConnectionRefusedError, OSError, EOFError):
                break  # refused with a line (or out of our own descriptors)
            held.append(writer)
        # Held, but not past the run's end: reaching the limit on a loaded machine
        # can take most of a short run, and a cycle cut short does not count.
        await asyncio.sleep(min(EXHAUST_HOLD, max(0.5, DEADLINE.get() - time.monotonic())))
    finally:
        for writer in held:
            writer.transport.abort()


async def oversize(path: str, rng: random.Random) -> None:
    reader, writer = await connect(path)
    try:
        writer.write(json.dumps({"execute": "add-blocker", "id": "big-id", "arguments": {
            "reason": "r", "id": "x" * 1_000_000}}).encode())
        await reply_to(reader, b'"big-id"')
        # Past the limit the daemon skips to the next line feed (the structure is lost).
        writer.write(b'{"execute": "add-blocker", "arguments": {"reason": "'
                     + b"y" * (2 << 20) + b'"}}\n{"execute": "query-version", "id": "after"}')
        await reply_to(reader, b'"after"')
    finally:
        await close(writer)


Pattern = Callable[[str, random.Random], Awaitable[None]]
#: pattern -> how many copies run at once, and the pause after each cycle (seconds)
HOSTILE: dict[str, tuple[Pattern, int, float]] = {
    "fuzz": (fuzz, 2, 0.05), "slowloris": (slowloris, 20, 0), "silent": (silent, 20, 0),
    "nonreader": (nonreader, 4, 0), "churn": (churn, 2, 0.01), "lister": (lister, 1, 0),
    "exhaust": (exhaust, 1, 12), "oversize": (oversize, 1, 2),
}
#: What the daemon does to hostile clients on purpose: not a failure of the pattern.
EXPECTED = (EOFError, ConnectionError, ConnectionRefusedError, BrokenPipeError)


async def loop(name: str, pattern: Pattern, rest: float, path: str, rng: random.Random,
               deadline: float, stats: Stats) -> None:
    DEADLINE.set(deadline)  # this task's own context
    while time.monotonic() < deadline:
        try:
            await pattern(path, rng)
            stats.cycles[name] += 1
        except EXPECTED:
            stats.cycles[name] += 1
            rest = max(rest, 0.1)
        except Exception as exc:  # counted and reported, never fatal
            stats.failures[name] += 1
            stats.last_failure[name] = f"{type(exc).__name__}: {exc}"[:200]
            rest = max(rest, 0.5)
        await asyncio.sleep(max(0.0, min(rest, deadline - time.monotonic())))


async def hostile(path: str, seconds: float, seed: int,
                  patterns: Sequence[str] = tuple(HOSTILE)) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    stats = Stats()
    deadline = time.monotonic() + seconds
    rng = random.Random(seed)
    tasks = [asyncio.create_task(loop(name, pattern, rest, path, random.Random(rng.random()),
                                      deadline, stats))
             for name, (pattern, copies, rest) in HOSTILE.items() if name in patterns
             for _ in range(copies)]
    if tasks:
        # Past the deadline, what is still waiting (a silent client, a pause) is cut short.
        _, pending = await asyncio.wait(tasks, timeout=seconds + 2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {"cycles": dict(stats.cycles), "failures": dict(stats.failures),
            "last_failure": stats.last_failure}


# --------------------------------------------------------------------------- polite


async def polite_client(path: str, number: int, pause: float, warmup_end: float,
                        deadline: float, latencies: dict[str, list[int]],
                        counts: Counter[str], reasons: list[str]) -> None:
    reader, writer = await connect(path)
    rng = random.Random(number)
    n = 0
    try:
        while time.monotonic() < deadline:
            n += 1
            blocker = f"polite-{number}-{n}"
            for request in (
                {"execute": "add-blocker", "id": n, "arguments": {
                    "reason": "agent at work", "id": blocker, "modes": ["normal"]}},
                {"execute": "query-blockers", "id": n, "arguments": {"mode": "normal"}},
                {"execute": "del-blocker", "id": n, "arguments": {"id": blocker}},
            ):
                start = time.monotonic()
                writer.write(json.dumps(request).encode() + b"\n")
                line = await reply_to(reader, b"")  # in order: the next reply is this one
                took = time.monotonic() - start
                if b'"return"' not in line[:12]:
                    counts["errors"] += 1
                if start >= warmup_end:
                    latencies[str(request["execute"])].append(round(took * 1e6))
                    counts["requests"] += 1
                await asyncio.sleep(pause * rng.uniform(0.5, 1.5))
    except (TimeoutError, OSError, EOFError) as exc:
        counts["disconnected"] += 1
        reasons.append(f"client {number} request {n} at {time.time():.3f}: "
                       f"{type(exc).__name__}: {exc}"[:200])
    finally:
        await close(writer)


async def polite(path: str, seconds: float, warmup: float, clients: int,
                 pause: float) -> dict[str, Any]:
    latencies: dict[str, list[int]] = {"add-blocker": [], "query-blockers": [],
                                       "del-blocker": []}
    counts: Counter[str] = Counter()
    reasons: list[str] = []
    now = time.monotonic()
    await asyncio.gather(*(polite_client(path, k, pause, now + warmup, now + seconds,
                                         latencies, counts, reasons) for k in range(clients)))
    us = sorted(t for kind in latencies.values() for t in kind)
    return {"clients": clients, "requests": counts["requests"], "errors": counts["errors"],
            "disconnected": counts["disconnected"], "why": reasons[:3],
            "p50_ms": percentile(us, 0.50) / 1000, "p99_ms": percentile(us, 0.99) / 1000,
            "p999_ms": percentile(us, 0.999) / 1000,
            "max_ms": us[-1] / 1000 if us else 0.0,
            "p99_ms_by_command": {kind: percentile(sorted(values), 0.99) / 1000
                                  for kind, values in latencies.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True)
    p.add_argument("--role", choices=("hostile", "polite"), required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--clients", type=int, default=8, help="polite clients")
    p.add_argument("--pause", type=float, default=0.05,
                   help="polite clients' pause between requests, in seconds")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--patterns", default=",".join(HOSTILE),
                   help="hostile patterns to run, comma-separated (default: all; '' for none)")
    args = p.parse_args(argv)
    if args.role == "hostile":
        patterns = [name for name in args.patterns.split(",") if name]
        unknown = set(patterns) - set(HOSTILE)
        if unknown:
            p.error(f"unknown patterns: {', '.join(sorted(unknown))}")
        result = asyncio.run(hostile(args.socket, args.seconds, args.seed, patterns))
    else:
        result = asyncio.run(polite(args.socket, args.seconds, args.warmup, args.clients,
                                    args.pause))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

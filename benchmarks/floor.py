"""The floor: the least a Python QMP-style server can do per request.

``python -m benchmarks.floor --socket PATH`` serves a Unix socket with asyncio
streams.  Per connection it sends a QMP-style greeting line, then for every
request line: ``readline()``, ``json.loads()``, and the reply
``{"return": {}, "id": ID}\\r\\n`` (no ``id`` member when the request had none),
written and drained.  Every request is answered the same way, ``qmp_capabilities``
included; there is no negotiation, no validation, no dispatch and no events.

Framing: the load generator ends every request with ``\\n``, so the floor can
use ``StreamReader.readline()``, the cheapest correct framing asyncio streams
offer.  The daemon gets the very same bytes; for it the newline is plain JSON
whitespace and it must parse a stream (QMP clients send no newline at all).
That is the fair comparison: the floor is what the daemon would cost if QMP
were line-framed and every command did nothing.

It logs ``floor ready on PATH`` on stderr once it listens, and exits cleanly on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence

GREETING = (
    json.dumps(
        {
            "QMP": {
                "version": {
                    "qemu": {"micro": 0, "minor": 0, "major": 0},
                    "package": "benchmark floor",
                },
                "capabilities": ["oob"],
            }
        }
    ).encode()
    + b"\r\n"
)
#: Longest request line accepted (same order as the daemon's default limits).
LINE_LIMIT = 1 << 20


def reply_for(line: bytes) -> bytes:
    """The floor's whole protocol: parse the request, echo its ``id``."""
    try:
        request = json.loads(line)
    except ValueError:
        return b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\r\n'
    if isinstance(request, dict) and "id" in request:
        return b'{"return": {}, "id": ' + json.dumps(request["id"]).encode() + b"}\r\n"
    return b'{"return": {}}\r\n'


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(GREETING)
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.isspace():
                continue
            writer.write(reply_for(line))
            await writer.drain()
    except (ConnectionError, ValueError):
        # ValueError: a line longer than the reader's limit; the floor just hangs up.
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handle, path, limit=LINE_LIMIT, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor: ready on {path}", file=sys.stderr, flush=True)
    await stop.wait()
    # Not ``async with server``: from 3.12 on its exit waits for open connections.
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor",
        description="Minimal QMP-style asyncio streams server: the benchmark's floor.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())

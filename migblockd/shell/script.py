"""The scripting mode: commands from ``-c`` or from a non-terminal stdin.

stdout gets exactly one JSON reply per request, one per line (``help`` prints its
text there too).  Parse errors go to stderr with the line number; ``-v`` echoes the
requests to stderr.  Events are not printed.  The exit status is 0 when everything
succeeded, 1 when any line failed; connection failures raise ConnectError /
ConnectionLost, which :mod:`migblockd.shell.main` turns into exit status 2.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence

from migblockd.qapi.doc import SchemaDocs
from migblockd.shell.client import ConnectionLost
from migblockd.shell.connection import Connection
from migblockd.shell.render import Renderer
from migblockd.shell.runner import Runner


def _print(text: str) -> None:
    print(text, flush=True)


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin, read without blocking the event loop."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        yield line.rstrip("\n")


async def _listed(commands: Sequence[str]) -> AsyncIterator[str]:
    for command in commands:
        yield command


async def run_script(
    path: str,
    renderer: Renderer,
    docs: SchemaDocs,
    verbose: bool,
    commands: Sequence[str],
    messages: Renderer | None = None,
) -> int:
    """Run the commands; ``renderer`` is for stdout, ``messages`` for stderr."""
    connection = Connection(path)
    await connection.open()
    number = 0

    def report(text: str) -> None:
        where = "-c" if commands else "line"
        print(f"migblock-shell: {where} {number}: {text}", file=sys.stderr, flush=True)

    def echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    runner = Runner(
        connection,
        renderer,
        docs,
        out=_print,
        err=report,
        echo=echo if verbose else None,
        messages=messages,
    )
    failed = False
    lines = _listed(commands) if commands else stdin_lines()
    try:
        async for line in lines:
            number += 1
            if not await runner.run_line(line):
                failed = True
    except ConnectionLost as err:
        raise ConnectionLost(f"{path}: {err}") from None
    finally:
        await connection.close()
    return 1 if failed else 0

"""The scripting mode: commands from ``-c``, or from stdin when stdin or stdout is
not a terminal (``migblock-shell | tee log`` reads the lines typed as a script).

stdout gets exactly one JSON reply per request, one per line (``help`` prints its
text there too).  A raw JSON request may span lines, as at the prompt
(:mod:`migblockd.shell.entries`).  Parse errors go to stderr with the line number; ``-v`` echoes the
requests to stderr.  Events are not printed.  The exit status is 0 when everything
succeeded, 1 when any line failed; connection failures raise ConnectError /
ConnectionLost, which :mod:`migblockd.shell.main` turns into exit status 2; a
stdout that cannot be written ends the run here (exit status 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Sequence

from migblockd.qapi.doc import SchemaDocs
from migblockd.shell.client import ConnectionLost
from migblockd.shell.connection import Connection
from migblockd.shell.entries import Entries
from migblockd.shell.render import Renderer
from migblockd.shell.runner import Runner


class OutputFailed(Exception):
    """stdout cannot take the replies (a full disk, an I/O error, closed): the
    script stops, since what it printed is lost.  ``str()`` says why."""


def _print(text: str) -> None:
    if sys.stdout is None:  # started with stdout closed (>&-): print() would drop it
        raise OutputFailed("stdout is closed")
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise  # its reader went away (| head): main ends quietly
    except OSError as err:
        raise OutputFailed(err.strerror or str(err)) from None


def to_stderr(text: str) -> None:
    """Write a line to stderr; nowhere when the shell was started with stderr
    closed (``2>&-``), where ``print(file=sys.stderr)`` would write it to stdout,
    among the replies."""
    if sys.stderr is not None:
        print(text, file=sys.stderr, flush=True)


async def stdin_lines() -> AsyncIterator[str]:
    """Lines of stdin, read without blocking the event loop.

    Read as bytes and decoded with ``surrogateescape`` whatever the locale, so
    that a line that is not UTF-8 gets its own error, and the others run.  The
    reads happen on a daemon thread, one line ahead: a Ctrl-C ends the shell at
    once, where an executor's thread would hold up its exit until the next line.
    The thread reads the descriptor itself: a daemon thread blocked inside
    ``sys.stdin``'s buffer would hold its lock, and the interpreter aborts when
    it finds that lock held at exit.
    """
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    wanted = threading.Semaphore(1)

    def post(line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads on
            loop.call_soon_threadsafe(lines.put_nowait, line)

    def read() -> None:
        pending = b""  # what was read past the last line feed
        try:
            fd = sys.stdin.fileno()
            while wanted.acquire():
                parts, end = [pending], pending.find(b"\n")
                while end < 0 and (chunk := os.read(fd, 65536)):
                    parts.append(chunk)
                    if (at := chunk.find(b"\n")) >= 0:
                        end = sum(map(len, parts[:-1])) + at
                data = b"".join(parts)
                if not data:
                    break
                if end < 0:
                    end = len(data)
                raw, pending = data[:end], data[end + 1:]
                post(raw.decode("utf-8", "surrogateescape"))
        except (OSError, ValueError, AttributeError):  # no stdin at all, or a broken one
            pass
        post(None)

    threading.Thread(target=read, name="migblock-shell-stdin", daemon=True).start()
    while (line := await lines.get()) is not None:
        yield line
        wanted.release()


async def _numbered(commands: Sequence[str]) -> AsyncIterator[tuple[int, str]]:
    """The commands to run, each with its number: the ``-c`` ones as given, else
    stdin's, a request pretty-printed over several lines being one (numbered by
    its first line)."""
    if commands:
        for number, command in enumerate(commands, 1):
            yield number, command
        return
    entries = Entries()
    first = True
    async for read in stdin_lines():
        # A byte order mark, as editors on Windows begin a file with (RFC 8259 lets
        # a JSON reader ignore it): no part of the first command.
        line, first = (read.removeprefix("\ufeff") if first else read), False
        for found in entries.feed(line):
            yield found
    for found in entries.end():
        yield found


async def run_script(
    path: str,
    renderer: Renderer,
    docs: SchemaDocs,
    verbose: bool,
    commands: Sequence[str],
    messages: Renderer | None = None,
    timeout: float | None = None,
) -> int:
    """Run the commands; ``renderer`` is for stdout, ``messages`` for stderr.
    ``timeout``: the most seconds a command may wait for its reply (``--timeout``);
    past it the run ends as when the connection is lost (exit status 2), the
    command's outcome unknown.  Each wait of connecting, too, when shorter than
    its own bound (ConnectError, exit status 2)."""
    if sys.stdout is None:
        # Started with stdout closed (>&-): every reply would be lost, and a command
        # that changes something would do so unseen.  Nothing is sent.
        to_stderr("migblock-shell: cannot write the replies to stdout: stdout is closed; "
                  "no command was run")
        return 1
    connection = Connection(path, timeout=timeout)
    await connection.open()
    number = 0

    def report(text: str) -> None:
        where = "-c" if commands else "line"
        to_stderr(f"migblock-shell: {where} {number}: {text}")

    runner = Runner(
        connection,
        renderer,
        docs,
        out=_print,
        err=report,
        echo=to_stderr if verbose else None,
        messages=messages,
    )
    failed = False
    # Whether the blockers that end with the connection were named already.
    named = False
    try:
        async for found in _numbered(commands):
            number, line = found  # report's and the lost connection's line
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    ran = await runner.run_line(line)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise ConnectionLost(f"no reply within {timeout:g} s (--timeout)") from None
            if not ran:
                failed = True
    except ConnectionLost as err:
        # Which line, and whether it ran: the lines before it did, those after did not.
        outcome = ("the command may or may not have taken effect" if err.sent
                   else "the command was not sent")
        where = "-c" if commands else "line"
        named = True
        raise ConnectionLost(f"{where} {number}: {path}: {err}; {outcome}{_went(connection)}",
                             sent=err.sent) from None
    except OutputFailed as err:
        to_stderr(f"migblock-shell: cannot write the replies to stdout: {err}")
        _drop_stdout()
        return 1
    finally:
        if connection.connected and connection.held and not named:
            # As the interactive shell says when its session ends: a blocker added
            # with scope=connection lives as long as the script's connection, so the
            # run that added it (-c 'add-blocker ... scope=connection') removes it as
            # it ends, however it ends (Ctrl-C too, which may cut the closing short).
            to_stderr((messages if messages is not None else renderer).error(
                "migblock-shell: the script ended; the blockers it added with scope="
                f"connection went with it ({', '.join(connection.held)}): migration is no "
                "longer blocked by them"))
        await connection.close()
    return 1 if failed else 0


def _went(connection: Connection) -> str:
    """What a lost connection took with it: the blockers the script added with
    scope=connection (the daemon deletes them with the connection)."""
    if not connection.held:
        return ""
    return (f"; the blockers the script added with scope=connection went with it "
            f"({', '.join(connection.held)}): migration is no longer blocked by them")


def _drop_stdout() -> None:
    """Point stdout at /dev/null: the reply that failed is still in its buffer,
    and the interpreter's final flush would fail on it again ("Exception
    ignored ...")."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)

"""The terminal below prompt_toolkit: the lines of a dumb terminal as its cooked
mode hands them over, and letting go of a terminal that hung up.

A dumb terminal (``TERM=dumb``, as in an Emacs shell buffer) edits the line itself
and hands it over at Enter; what was pasted, or sent by the buffer at once, is
there together, and is read as one entry, as prompt_toolkit reads a bracketed
paste: a raw JSON request pretty-printed over several lines runs whole
(:mod:`migblockd.shell.entries`), where each of its lines was refused alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
from typing import TextIO


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _decoded(line: bytes) -> str:
    # As a script's lines are: bytes that are not UTF-8 get their own error.
    return line.decode("utf-8", "surrogateescape")


class PlainLines:
    """Lines from a terminal in cooked mode, read as the loop's other input is."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: What the terminal handed over without a newline yet (Ctrl-D mid-line).
        self.pending = b""
        #: Whether a line is being waited for (the prompt is on the screen).
        self.waiting = False
        #: Whether the terminal has said the input ended (Ctrl-D on an empty line)
        #: while the lines it held with it were read: the next read ends.
        self._ended = False

    async def readline(self) -> str | None:
        """The next line, without its newline; None at the end (Ctrl-D)."""
        loop = asyncio.get_running_loop()
        self.waiting = True
        try:
            while b"\n" not in self.pending:
                if self._ended:
                    self.pending = b""
                    return None
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.fd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.fd)
                self._read()
        finally:
            self.waiting = False
        line, self.pending = self.pending.split(b"\n", 1)
        return _decoded(line)

    def held(self) -> list[str]:
        """The whole lines the terminal holds already, read without waiting: the
        rest of what came with the line just read.  In cooked mode each read
        hands over one line, so the others of a paste wait in the terminal."""
        lines: list[str] = []
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                lines.append(_decoded(line))
            if self._ended or not select.select([self.fd], [], [], 0)[0]:
                return lines
            self._read()

    def _read(self) -> None:
        chunk = os.read(self.fd, 1 << 16)
        if chunk:
            self.pending += chunk
        else:
            self._ended = True


def hung_up(err: OSError) -> None:
    """Say on stderr that the terminal hung up, and let go of the terminal: the
    interpreter's last flush of what is left for it would fail too ("Exception
    ignored in: <stdout>")."""
    try:
        print(f"migblock-shell: the terminal hung up ({err.strerror}); the session ended",
              file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # stderr is that terminal too, or closed
        _to_devnull(sys.stderr)
    _to_devnull(sys.stdout)  # the terminal: the shell is interactive only on one


def _to_devnull(stream: TextIO | None) -> None:
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)

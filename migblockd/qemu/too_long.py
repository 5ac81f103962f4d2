"""A message from QEMU longer than the link reads, named for what it is.

``qemu.qmp`` reads QEMU's messages a line at a time, up to a limit: a longer one
ends the connection (the library can do nothing else with it), and asyncio words
that ``Separator is not found, and chunk exceed the limit``.  The link
(:mod:`migblockd.qemu.link`) reads up to :data:`READ_LIMIT` and keeps the
commands QEMU has yet to answer, in order (QEMU answers in the order it was sent
them), so that such a message is named: the reply to which command, past what
size, and what became of the commands sent after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qemu.qmp import ExecInterruptedError

__all__ = ["READ_LIMIT", "Interrupted", "ReplyTooLong", "TooLong"]

#: The longest message read from QEMU; ``qemu.qmp``'s own limit is 10 MiB.  QEMU puts no
#: limit on what it sends: its largest QMP reply is ``query-qmp-schema`` (~200 kB), but a
#: passed-through ``human-monitor-command`` (an ``xp`` dump of guest memory, say) can be
#: far longer.  64 MiB is QEMU's own limit on one message it reads (``MAX_TOKEN_SIZE``,
#: ``qobject/json-streamer.c``), and what one reply costs the daemon stays bounded: it
#: holds a few copies of it (read, parsed, and written to the client) at once.
READ_LIMIT: Final = 64 << 20


@dataclass(frozen=True)
class TooLong:
    """QEMU sent a message longer than the link reads, which ended the connection."""

    #: The command whose reply it was (QEMU answers in order); None: no reply was owed.
    command: str | None
    limit: int
    #: The ids of the commands sent on that connection and not answered when it ended,
    #: oldest (the one whose reply it was) first.
    unanswered: tuple[str, ...]

    def what(self) -> str:
        if self.command is None:
            return f"QEMU sent a message larger than {self.limit} bytes"
        return f"QEMU's reply to '{self.command}' was larger than {self.limit} bytes"

    def reason(self) -> str:
        """Why the connection ended: the log's, and the next commands' until it is up."""
        return (f"{self.what()}, the most migblockd reads from QEMU; migblockd dropped the "
                "connection")

    def interrupted(self, command: str, path: Path, *, own: bool) -> str:
        """The error of ``command``, one of those it interrupted; ``own``: the reply
        was its own."""
        if own:
            return (f"{self.what()}, the most migblockd reads from QEMU: migblockd dropped "
                    f"the connection to QEMU's monitor at '{path}' and reconnects; QEMU "
                    "did run the command")
        return (f"migblockd dropped the connection to QEMU's monitor at '{path}' before "
                f"QEMU replied to '{command}': {self.what()} (a command sent before it), "
                "the most migblockd reads from QEMU; it reconnects")


class ReplyTooLong(Exception):
    """The reader's failure on a message over the limit, in plain words (asyncio's are
    \"Separator is not found, and chunk exceed the limit\")."""


class Interrupted(ExecInterruptedError):
    """A command's reply will not come: the connection ended on a message too long."""

    def __init__(self, too_long: TooLong, *, own: bool) -> None:
        super().__init__(too_long.what())
        self.too_long = too_long
        self.own = own

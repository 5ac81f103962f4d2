"""The daemon's logging: off the event loop, in text, JSON or for journald.

:func:`setup` installs one handler on the root logger that hands records to a
writer thread (:mod:`migblockd.logs.writer`) and returns a :class:`Logs` whose
``close()`` writes what is left, within a bound, at exit.  The formats are in
:mod:`migblockd.logs.formats`, journald's native protocol in
:mod:`migblockd.logs.journal`, and the rules for what a record may say about
a client (:func:`shown`, :func:`about`) in :mod:`migblockd.logs.fields`.

The cost on the event loop of a record is building it and appending it to a
list: no system call, no formatting, and none of the look-ups ``logging``
makes by default (caller's frame, thread, process, asyncio task), which the
daemon's formats do not show.  The records logged for every request go
through :func:`info` (:mod:`migblockd.logs.quick`), which also skips the
logger's walk to the one handler there is.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from migblockd.logs.fields import WIRE_LIMIT, about, shown
from migblockd.logs.formats import JsonFormat, TextFormat
from migblockd.logs.journal import socket_path, stderr_is_journal
from migblockd.logs.quick import info, install
from migblockd.logs.writer import CLOSE_TIMEOUT, OffLoopHandler, Writer

__all__ = ["WIRE_LIMIT", "Logs", "about", "batching", "info", "setup", "shown"]


def batching(on: bool) -> None:
    """Leave the writer's wake-ups to the event loop's turns (``on``: the daemon
    serves, and its loop turns), or wake it at each record (the start and the
    stop, whose steps may block the loop: see ``Writer.batching``)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, OffLoopHandler):
            handler.writer.batching = on


@dataclass
class Logs:
    """The installed logging: where it writes, and how to finish."""

    handler: OffLoopHandler
    journal_stream: bool  # stderr is the journal: lines carry <N> priorities

    @property
    def native(self) -> bool:
        """Records about clients and blockers go to journald's native socket."""
        return self.handler.writer.native

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is waiting, for at most ``timeout`` seconds: a stuck sink
        does not hold up the exit.  The handler stays installed and drops what
        comes later, rather than let ``logging`` write on a stuck stderr."""
        self.handler.writer.close(timeout)


def setup(level: int, log_format: str = "text", *, fd: int = 2) -> Logs:
    """Send every record of the process to ``fd`` (stderr) through a writer thread."""
    # What the formats never show, logging should not look up for each record:
    # the caller's frame (sys._getframe walks), the thread, the process (a
    # getpid(2) per record), the asyncio task.  The logging documentation's
    # "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    journal = stderr_is_journal(fd=fd)
    pid = os.getpid()
    fmt = (JsonFormat if log_format == "json" else TextFormat)(journal=journal, pid=pid)
    writer = Writer(fmt, fd=fd, journal=socket_path() if journal else None)
    writer.start()
    handler = OffLoopHandler(writer)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    install(handler, writer.put)
    root.setLevel(level)
    # warnings.warn() would write on stderr from the caller's thread.
    logging.captureWarnings(True)
    return Logs(handler, journal)

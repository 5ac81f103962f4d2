"""Records leave the event loop at once; a writer thread formats and writes them.

Why: a log line written on the event loop's thread is a blocking ``write(2)``
per record.  When stderr is a pipe nobody drains (a stuck log shipper,
journald under pressure) the first write that does not fit blocks the whole
daemon: every client, the watchdog, even SIGTERM.  And when the sink is fine,
that write is still a system call per request.

So the logging handler (:class:`OffLoopHandler`) only appends the record to
a bounded list, under a lock no one holds for long.  A thread of our own
takes the whole list at once, formats every record there (never on the
event loop) and writes them with one ``write(2)`` per batch; records about a
client or a blocker go to journald's native socket instead when stderr is the
journal.  The thread runs a small asyncio loop of its own, so that it sends
those datagrams with asyncio-dgram while the daemon's loop never waits on it.

Waking the writer costs a system call and, on a busy core, a switch to the
writer thread and back, so the daemon's loop wakes it at most once per
:data:`WAKE_INTERVAL`: the first record after a quiet spell at the end of
its loop turn, the records that follow within the interval all at its end.
Never once per record, and not at all while the writer has not yet taken
the records it was last woken for (it is busy, or stuck).  Under load a
record thus reaches the log up to that much later.

When the list is full, records are dropped and counted; once the sink takes
data again, one line says how many were lost.  At exit the writer gets
:data:`CLOSE_TIMEOUT` seconds to write what is left; a stuck sink never holds
up the exit (the thread is a daemon thread, blocked in a system call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
from typing import Protocol

from migblockd import signalmask
from migblockd.logs.formats import message, priority, record_fields
from migblockd.logs.journal import JournalSender, encode_entry

__all__ = ["CAPACITY", "CLOSE_TIMEOUT", "WAKE_INTERVAL", "OffLoopHandler", "Writer"]

#: Records waiting for the writer before new ones are dropped.  Each record is
#: small: client strings are cut by ``shown`` and wire messages by WIRE_LIMIT.
CAPACITY = 4096
#: How long exit waits for the writer to write what is left.
CLOSE_TIMEOUT = 1.0
#: The event loop wakes the writer at most once per this many seconds.
WAKE_INTERVAL = 0.01


class Format(Protocol):
    def line(self, record: logging.LogRecord) -> str: ...


def write_all(fd: int, data: bytes) -> None:
    """Write everything, waiting (in this thread) as long as the sink needs."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # stderr may be a non-blocking file description we inherited.
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


class Writer:
    """The writer thread and the bounded list of records waiting for it."""

    def __init__(self, fmt: Format, *, fd: int = 2, journal: str | None = None,
                 capacity: int = CAPACITY) -> None:
        self.format = fmt
        self.fd = fd
        self.journal_path = journal
        self.capacity = capacity
        self._lock = threading.Lock()
        self._records: list[logging.LogRecord] = []
        self._dropped = 0
        self._signalled = False  # a wake-up is on its way and not yet taken
        self._wake_at = 0.0  # the event loop's time of the last wake-up it arranged
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="migblockd-log-writer",
                                        daemon=True)
        #: True while entries go to journald's native socket.
        self.native = False
        #: True while the event loop runs its turns (the daemon serves): wake-ups are
        #: then left to the loop, at most one per WAKE_INTERVAL.  Not before: the
        #: start's steps block the loop (a restore, a look-up that does not answer),
        #: and a line saying what the start waits for would wait with it.
        self.batching = False

    def start(self) -> None:
        signalmask.start(self._thread)
        self._started.wait()

    # -- any thread ------------------------------------------------------------
    def put(self, record: logging.LogRecord) -> None:
        """Queue a record; never blocks, and costs no system call on an event loop."""
        with self._lock:
            if len(self._records) >= self.capacity or self._closing:
                self._dropped += 1
                return
            self._records.append(record)
            if self._signalled:
                return
            self._signalled = True
        if not self.batching:
            self._signal()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._signal()
        else:
            self._wake_at = when = max(loop.time(), self._wake_at + WAKE_INTERVAL)
            loop.call_at(when, self._signal)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is waiting, giving up after ``timeout`` seconds.

        Records that come later are dropped: the process is exiting, and
        nothing may write on stderr from its thread any more.
        """
        with self._lock:
            self._closing = True
        if self._thread.is_alive():
            self._signal()
            self._thread.join(timeout)

    def _signal(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        with contextlib.suppress(RuntimeError):  # the writer's loop is closed
            loop.call_soon_threadsafe(wake.set)

    # -- the writer thread -----------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            # A bug here would silence the daemon: say so, where it can still be seen.
            with contextlib.suppress(OSError):
                write_all(self.fd, f"migblockd: the log writer failed: {exc!r}\n".encode())
            raise
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        journal = None if self.journal_path is None else JournalSender(self.journal_path)
        self.native = journal is not None
        self._started.set()
        try:
            while True:
                await wake.wait()
                wake.clear()
                while True:
                    with self._lock:
                        records, self._records = self._records, []
                        dropped, self._dropped = self._dropped, 0
                        self._signalled = False
                    if not records and not dropped:
                        break
                    await self._deliver(records, dropped, journal)
                if self._closing:
                    return
        finally:
            if journal is not None:
                journal.close()

    async def _deliver(self, records: list[logging.LogRecord], dropped: int,
                       journal: JournalSender | None) -> None:
        lines: list[str] = []
        for record in records:
            try:
                if journal is not None and record_fields(record):
                    # In order: the lines before this entry go first.
                    self._write(lines)
                    lines = []
                    if await journal.send(journal_entry(record)):
                        continue
                    # journald did not take it: the journal stream gets the line.
                lines.append(self.format.line(record))
            except Exception as exc:  # a bad record must not stop the writer
                lines.append(self.format.line(_internal(
                    logging.ERROR, "cannot log a record (%r): %r", record.msg, exc)))
        if dropped:
            # The sink has just taken a batch again: say what it missed.
            loss = _internal(logging.WARNING, "dropped %d log record(s): the log sink "
                             "(stderr or the journal) was not taking them", dropped)
            loss.fields = {"dropped": dropped}
            lines.append(self.format.line(loss))
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        # OSError: stderr is closed or broken, and there is nowhere left to say so.
        with contextlib.suppress(OSError):
            write_all(self.fd, data)


def journal_entry(record: logging.LogRecord) -> bytes:
    """The record as a native journal entry; fields become ``MIGBLOCKD_<NAME>``."""
    fields: list[tuple[str, str]] = []
    for key, value in record_fields(record).items():
        name = "MIGBLOCKD_" + key.upper()
        if isinstance(value, list):
            fields.extend((name, str(v)) for v in value)
        else:
            fields.append((name, str(value)))
    return encode_entry(message(record), priority(record.levelno), fields)


def _internal(level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("migblockd.logs", level, __file__, 0, msg, args, None)


class OffLoopHandler(logging.Handler):
    """The root logger's one handler: hands every record to the :class:`Writer`."""

    def __init__(self, writer: Writer) -> None:
        super().__init__()
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: Writer.put is thread-safe on its own.
        if not self.filter(record):
            return False
        self.writer.put(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.writer.put(record)

    def flush(self) -> None:
        """Nothing: waiting for the sink is what this handler exists to avoid."""

    def close(self) -> None:
        self.writer.close()
        super().close()

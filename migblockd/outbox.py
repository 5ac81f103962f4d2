"""What is written to one client, and when: slices, backpressure, and max-output.

Output reaches the transport in slices of at most :data:`SLICE` bytes (a
bigger piece is cut),
:data:`BURST` slices per callback at most, and a slice only while the
transport's own buffer is below :data:`HIGH_WATER`: a 35 MB listing goes out
piece by piece as the client reads it, and no copy of the whole answer is ever
made.  The burst bound matters for a client that reads as fast as we write:
its buffer never fills, and writing while the kernel takes it would hand it
the whole listing in one callback (about 10 ms of the only thread, every other
client waiting).

``max-output`` bounds the *events* a client leaves unread: its own replies
are bounded by backpressure (the server runs no more of its requests while
its output waits), and a big one it reads steadily must not get it dropped.
The transport says how much is unread; the marks say how much of that is
events.  Only output from earlier writes counts: a client cannot have read what
was only just written, and one commit can make more events at once than the
bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

__all__ = ["BURST", "HIGH_WATER", "SLICE", "Outbox"]

#: The transport buffer size at which writing (and running the client's requests) waits.
HIGH_WATER: Final = 64 * 1024
#: Most bytes handed to the transport in one write.
SLICE: Final = 256 * 1024
#: Most slices handed over in one callback: about a millisecond of copying,
#: after which the event loop serves the other clients.
BURST: Final = 4


class Outbox:
    """The bytes on their way to one client."""

    __slots__ = ("_backlog", "_backlog_bytes", "_enqueued", "_events_unread", "_marks",
                 "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._backlog: deque[bytes | memoryview] = deque()
        self._backlog_bytes = 0
        self._enqueued = 0  # bytes ever given to put()
        self._marks: deque[tuple[int, int]] = deque()  # (stream offset, event bytes)
        self._events_unread = 0

    @property
    def waiting(self) -> bool:
        """Output is still here, not yet with the transport."""
        return bool(self._backlog)

    def put(self, pieces: list[bytes], size: int, events: int) -> int:
        """Queue ``pieces`` (``size`` bytes, ``events`` of them events) and write a slice.

        What is left over waits (:attr:`waiting`) for :meth:`write_some`.

        Returns the event bytes of *earlier* output the client has not read yet:
        these it cannot have read however promptly it reads, and one commit can
        make more events at once than the bound.
        """
        self._enqueued += size
        if not self._backlog and size <= SLICE \
                and self.transport.get_write_buffer_size() <= HIGH_WATER:
            # What write_some would do with it, without queueing it first:
            # most output is a turn's few lines.
            self.transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        else:
            self._backlog.extend(pieces)
            self._backlog_bytes += size
            self.write_some()
        read = self._read()
        earlier = self._events_unread
        if events and read < self._enqueued:
            self._marks.append((self._enqueued, events))
            self._events_unread += events
        return earlier

    def events_unread(self) -> int:
        """The event bytes of all output so far that the client has not read yet."""
        self._read()
        return self._events_unread

    def _read(self) -> int:
        """Forget the events the client has read; returns the bytes it has read."""
        read = self._enqueued - self._backlog_bytes - self.transport.get_write_buffer_size()
        marks = self._marks
        while marks and marks[0][0] <= read:
            self._events_unread -= marks.popleft()[1]
        return read

    def sent(self) -> int:
        """Bytes of all ever queued that the transport has handed to the kernel."""
        return self._enqueued - self._backlog_bytes - self.transport.get_write_buffer_size()

    def write_some(self) -> bool:
        """Hand the transport up to :data:`BURST` slices while its buffer has room.

        Returns True when more is waiting and the transport would take it now:
        the caller comes back for it in a later callback.  Otherwise either
        all is written or the transport's buffer is full, and its
        ``resume_writing`` brings the caller back.
        """
        backlog, transport = self._backlog, self.transport
        # <=: the write that passes HIGH_WATER makes the transport call
        # pause_writing, and its resume_writing brings us back.
        for _ in range(BURST):
            if not backlog or transport.get_write_buffer_size() > HIGH_WATER:
                return False
            first = backlog.popleft()
            if len(first) > SLICE:
                # A listing's segment (up to megabytes) is shared by every client
                # it is owed to: cut, not copied, or each transport would keep
                # its own copy of what the kernel did not take at once.
                view = memoryview(first)
                backlog.appendleft(view[SLICE:])
                first = view[:SLICE]
            batch = [first]
            size = len(first)
            while backlog and size + len(backlog[0]) <= SLICE:
                piece = backlog.popleft()
                batch.append(piece)
                size += len(piece)
            self._backlog_bytes -= size
            transport.write(batch[0] if len(batch) == 1 else b"".join(batch))
        return bool(backlog) and transport.get_write_buffer_size() <= HIGH_WATER

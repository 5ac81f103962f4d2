"""The thread that commits groups to the state directory, off the event loop.

One thread, fed through a queue, answering on the loop with
``call_soon_threadsafe``: the least a hand-over can cost.  An executor's
futures (a ``concurrent.futures.Future`` chained to an asyncio one) cost a
few loop callbacks and locks more per group, and the disk thread holds the
GIL for every one of them while the clients' requests wait.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from migblockd import signalmask

__all__ = ["DiskThread"]

T = TypeVar("T")


class DiskThread(Generic[T]):
    """Runs ``work(item)`` for each item :meth:`submit` gets, in order, and
    calls ``done(error)`` on ``loop`` after each (``error`` None on success)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[[T], None],
                 done: Callable[[BaseException | None], None]) -> None:
        self._loop = loop
        self._work = work
        self._done = done
        self._queue: queue.SimpleQueue[tuple[T] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, item: T) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="migblockd-commit",
                                            daemon=True)
            signalmask.start(self._thread)
        self._queue.put((item,))

    def stop(self) -> None:
        """Finish what was submitted, then end the thread (blocks until it has)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            error: BaseException | None = None
            try:
                self._work(entry[0])
            except BaseException as exc:  # the loop's side reports it
                error = exc
            try:
                self._loop.call_soon_threadsafe(self._done, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

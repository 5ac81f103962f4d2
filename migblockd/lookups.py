"""Look-ups in the user and group databases, on a few worker threads nothing joins.

A database that does not answer (an LDAP server out of reach, an NFS-mounted
``/etc/group``) must not hold the event loop, and every client with it: the
daemon asks it here, on at most :data:`THREADS` daemon threads started as needed
and kept, fed by one queue.  They are daemon threads, as :mod:`migblockd.detached`'s:
one stuck in the C library never keeps the process from exiting.

Asking again what is being asked (the same key: a uid's role, say) waits for
the same answer: a thousand clients of a uid whose look-up hangs make one
look-up, not a thousand threads.  More distinct look-ups than threads wait
their turn in the queue.  One that takes longer than :data:`SLOW` seconds is
said once (a warning), with the call it is in and who waits for it, and
again when it answers (an info line).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Final, Generic, TypeVar

from migblockd import signalmask
from migblockd.databases import Live

__all__ = ["SLOW", "THREADS", "Lookups"]

log = logging.getLogger("migblockd")

#: Look-ups that run at once: more wait in the queue.
THREADS: Final = 4
#: Seconds after which a look-up not answered yet is said in the log.
SLOW: Final = 3.0

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("future", "key", "live", "running", "started", "timer", "waiters",
                 "waits", "warned", "what", "work")

    def __init__(self, key: Hashable, work: Callable[[Live], T], what: str, waits: str,
                 future: asyncio.Future[T]) -> None:
        self.key, self.work, self.what, self.waits, self.future = key, work, what, waits, future
        self.live = Live()
        self.running = False
        self.waiters = 1
        self.warned = False
        self.started = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None


class Lookups:
    """The worker threads and what they are asked."""

    def __init__(self) -> None:
        self._jobs: dict[Hashable, _Job[Any]] = {}
        #: The queue: look-ups asked that no thread has taken yet, in order (a dict:
        #: one nobody waits for any more leaves it, wherever it is).
        self._queued: dict[_Job[Any], None] = {}
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._threads = 0
        self._idle = 0

    def ask(self, key: Hashable, work: Callable[[Live], T], what: str,
            waits: str) -> asyncio.Future[T]:
        """``work(live)`` on a worker thread, ``live`` the databases (recording what
        they say); the same future for a ``key`` asked already.  ``what`` is
        looked up and who ``waits``, for the log."""
        job = self._jobs.get(key)
        if job is not None:
            job.waiters += 1
            future: asyncio.Future[T] = job.future
            return future
        loop = asyncio.get_running_loop()
        job = _Job(key, work, what, waits, loop.create_future())
        self._jobs[key] = job
        job.timer = loop.call_later(SLOW, self._slow, job)
        job.future.add_done_callback(functools.partial(self._done, job))
        with self._lock:
            self._queued[job] = None
            self._ready.notify()
            # A thread idle now may not have woken for the look-up before (asked in
            # the same turn of the loop): one more unless each queued has its own.
            start = self._idle < len(self._queued) and self._threads < THREADS
            if start:
                self._threads += 1
        if start:
            try:
                signalmask.start(threading.Thread(
                    target=self._run, args=(loop,), daemon=True,
                    name=f"migblockd-lookup-{self._threads}"))
            except RuntimeError as exc:
                with self._lock:
                    self._threads -= 1
                    alone = self._threads == 0
                    if alone:
                        del self._queued[job]
                if alone:
                    # No thread at all (out of processes): here, then, rather than not
                    # at all (as migblockd.detached's callers do).
                    log.debug("no thread for a look-up (%s): made on the event loop", exc)
                    try:
                        job.future.set_result(work(job.live))
                    except Exception as failed:
                        job.future.set_exception(failed)
        return job.future

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._ready:
                self._idle += 1
                while not self._queued:
                    self._ready.wait()
                self._idle -= 1
                job = next(iter(self._queued))
                del self._queued[job]
                job.running = True
            outcome: Callable[[], None]
            try:
                outcome = functools.partial(job.future.set_result, job.work(job.live))
            except Exception as exc:
                outcome = functools.partial(job.future.set_exception, exc)
            # Closed: the loop is gone (the daemon stops), and nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, job.future, outcome)

    def leave(self, key: Hashable, future: asyncio.Future[Any]) -> None:
        """One who asked for ``key`` (and got ``future``) waits no more: a look-up
        nobody waits for that no thread has taken yet is dropped (clients that hang
        up while the databases do not answer must not fill the queue, nor the log)."""
        job = self._jobs.get(key)
        if job is None or job.future is not future:
            return
        job.waiters -= 1
        if job.waiters > 0:
            return
        with self._lock:
            if job.running:
                return
            self._queued.pop(job, None)
        job.future.cancel()

    def _slow(self, job: _Job[Any]) -> None:
        job.warned = True
        doing = (f"in {job.live.doing}" if job.running else
                 f"queued behind {self._threads - self._idle} look-ups that have not "
                 "answered")
        log.warning("the user and group databases have not answered %s for %g s (%s): %s "
                    "until they do", job.what, SLOW, doing, job.waits)

    def _done(self, job: _Job[Any], future: asyncio.Future[Any]) -> None:
        self._jobs.pop(job.key, None)
        if job.timer is not None:
            job.timer.cancel()
        if future.cancelled():
            return
        failed = future.exception()
        if job.warned:
            took = time.monotonic() - job.started
            log.log(logging.INFO if failed is None else logging.WARNING,
                    "the user and group databases answered %s after %.1f s%s", job.what,
                    took, "" if failed is None else f", but the look-up failed: {failed!r}")
        elif failed is not None:
            # Else unsaid: its clients are only told to try again later.
            log.warning("the look-up in the user and group databases %s failed: %r",
                        job.what, failed)


def _settle(future: asyncio.Future[Any], outcome: Callable[[], None]) -> None:
    if not future.done():
        outcome()

"""The metrics endpoint's worker threads: at most one per slot, kept while used.

Part of the endpoint (:mod:`migblockd.scrape_connections` hands each connection
it admits to :class:`Pool`).  Why not a thread per connection, as
``socketserver.ThreadingMixIn`` serves: a thread started and ended for each
connection, and a timer thread for its deadline, cost the daemon 60 to 70% of
a core under 32 local clients that only connected and closed (some 1,000
connections a second), on the core the event loop shares; at a fixed 900
connections a second, a pool took a third of that.  A worker is started when
the connections admitted outnumber the workers, never more than the connections
served at once (``MAX_SCRAPES``, the pool's ``most``), and it stays for the next
ones; one that has had no job for ``IDLE_WORKER`` seconds ends.  A burst of 16
scrapers, or a flood, would otherwise leave 16 threads asleep for the rest of
the daemon's life, each with its stack and its entry in every ``ps -L``; a
scraper's next connection after such a pause pays one thread start (some
100 us), which a pause that long makes nothing.

``most`` is a bound of its own, not left to the count of jobs: a worker frees its
connection's slot as the last thing it serves, a moment before it takes the next
job, and a connection admitted in that moment finds every worker with a job.
Counted alone, that started one more, kept for good (17 after seconds of churn);
bounded, it waits the moment for the worker that freed its slot.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["IDLE_WORKER", "Pool"]

#: Seconds a worker waits for a job before it ends (a job then starts another).
IDLE_WORKER = 30.0


class Pool:
    """Threads that run ``serve(job)`` for each job handed over, one job at a time each."""

    def __init__(self, serve: Callable[[Any], None], most: int) -> None:
        self._serve = serve
        self._most = most  # workers at most: as many jobs as the caller serves at once
        # Jobs handed over, oldest first; None: a worker's end, at the stop.
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._held = 0  # jobs handed over and not yet served
        self._lock = threading.Lock()

    def hand(self, job: Any) -> None:
        """Have ``job`` served, by a new worker if every one has a job already and
        there are fewer than ``most`` (else by the first to be free).

        RuntimeError when that worker cannot be started (RLIMIT_NPROC, a cgroup's
        ``pids.max``): ``job`` is not taken, and is the caller's to turn away."""
        with self._lock:
            self._held += 1
            short = self._held > len(self._workers) and len(self._workers) < self._most
        if short:
            worker = threading.Thread(target=self._work, name="migblockd-metrics-worker",
                                      daemon=True)
            try:
                worker.start()
            except RuntimeError:
                with self._lock:
                    self._held -= 1
                raise
            with self._lock:
                self._workers.append(worker)
        # Each job held has a worker: the one served before it frees one for it (the
        # caller holds at most ``most`` at once, one just freed included).
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_WORKER)
            except queue.Empty:
                if self._retire():
                    return
                continue
            if job is None:
                return
            try:
                self._serve(job)
            finally:
                with self._lock:
                    self._held -= 1

    def _retire(self) -> bool:
        """End this idle worker unless a job handed over needs it: ``hand`` counts
        the workers under the same lock, and starts one when they are too few."""
        with self._lock:
            if self._held >= len(self._workers):
                return False  # a job is on its way to the queue: this one takes it
            self._workers.remove(threading.current_thread())
            return True

    def stop(self, until: float) -> None:
        """Let the workers serve the jobs handed over, then end, by ``until``
        (``time.monotonic()``) at most: daemon threads, which the end of the
        process stops where they are."""
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._jobs.put(None)  # after every job handed over
        for worker in workers:
            worker.join(max(0.0, until - time.monotonic()))

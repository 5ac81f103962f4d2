"""The worker threads of :mod:`migblockd.lookups`, with work that blocks until told, and
the threads the start's and ``--check-config``'s look-ups are bounded on."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from migblockd.config import Config
from migblockd.daemon import claim_own_socket
from migblockd.databases import Live
from migblockd.lookups import THREADS, Lookups
from migblockd.preflight_notes import warnings


async def test_a_look_up_that_hangs_holds_none_asked_with_it_while_threads_are_free() -> None:
    # Found by review: a thread idle when two look-ups were asked in one turn of the
    # loop took the first, which hung, and the second waited behind it: no thread was
    # started for it, as one was idle when it was asked.
    lookups = Lookups()
    assert await lookups.ask("before", lambda live: "answered", "w", "w") == "answered"
    while lookups._idle != 1:  # its thread is back in the queue
        await asyncio.sleep(0.01)
    release = threading.Event()
    try:
        hung = lookups.ask("hung", lambda live: release.wait(), "for a", "a waits")
        quick = lookups.ask("quick", lambda live: "answered", "for b", "b waits")
        assert await asyncio.wait_for(quick, 30) == "answered"
        assert not hung.done()
    finally:
        release.set()
    assert await hung is True


class _Work:
    """A look-up's work, to tell when nothing holds it any more."""

    def __call__(self, live: Live) -> str:
        return "answered"


async def test_a_queued_look_up_nobody_waits_for_leaves_the_queue() -> None:
    # Found by review: with every thread hung, a look-up whose clients all hung up
    # was dropped, but stayed in the queue, with all it holds, until a thread
    # took it: a user with many subordinate gids, connecting and hanging up, grew
    # the daemon's memory without bound.
    lookups = Lookups()
    release = threading.Event()
    hung = [lookups.ask(("hung", n), lambda live: release.wait(), "a", "a")
            for n in range(THREADS)]
    try:
        work = _Work()
        gone = weakref.ref(work)
        future = lookups.ask("left", work, "b", "b")
        del work
        lookups.leave("left", future)
        assert future.cancelled()
        await asyncio.sleep(0)  # its callbacks run
        gc.collect()
        assert gone() is None
    finally:
        release.set()
    assert await asyncio.gather(*hung) == THREADS * [True]


async def test_a_look_up_that_fails_is_said(caplog: pytest.LogCaptureFixture) -> None:
    # Found by review: a look-up that raised (MemoryError from the C library's
    # buffer, say) turned its clients away with "cannot look up the user and group
    # databases now" and left nothing in the log, unless it had been slow.
    def work(live: Live) -> str:
        raise MemoryError

    lookups = Lookups()
    with pytest.raises(MemoryError):
        await lookups.ask("k", work, "for uid 5 (gid 5)", "clients of uid 5 wait")
    await asyncio.sleep(0)  # its callbacks run
    assert ("the look-up in the user and group databases for uid 5 (gid 5) failed: "
            "MemoryError()") in caplog.text


@pytest.fixture
def thread_names() -> Iterator[list[str]]:
    """The names of the threads started meanwhile, each as it begins to run."""
    names: list[str] = []

    def seen(frame: FrameType, event: str, arg: object) -> None:
        sys.setprofile(None)  # once is enough: the name is known
        names.append(threading.current_thread().name)

    threading.setprofile(seen)
    try:
        yield names
    finally:
        threading.setprofile(None)


def test_the_look_ups_of_a_check_and_a_start_are_named_for_what_they_ask(
    thread_names: list[str], tmp_path: Path,
) -> None:
    # Found by review: --check-config asked the access policy's names on a thread
    # named "migblockd-socket-group", as was the start's look-up of the socket's
    # notes: a thread dump of either, held by the databases, said the socket's
    # group was asked, which it may not have been.
    config = dataclasses.replace(Config(), socket=tmp_path / "s.sock")
    warnings(config)
    claim_own_socket(config).lock.release()
    assert "migblockd-socket-group" not in thread_names, thread_names
    assert {"migblockd-check-lookups", "migblockd-socket-notes"} <= set(thread_names), (
        thread_names)

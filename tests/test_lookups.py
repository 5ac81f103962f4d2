"""The worker threads of :mod:`migblockd.lookups`, with work that blocks until told."""

from __future__ import annotations

import asyncio
import threading

from migblockd.lookups import Lookups


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

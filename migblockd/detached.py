"""Blocking work off the event loop, on a thread that never holds the process up.

``asyncio.to_thread`` runs on the loop's default executor, whose threads the
end of ``asyncio.Runner`` joins (``shutdown_default_executor``: without a
bound on Python 3.11, 300 s on 3.12+) and, failing that, the interpreter's
exit joins again (``concurrent.futures.thread``'s exit hook): a call that
never returns (a file system that hangs, a resolver that does not answer)
would keep the daemon alive after it logged "stopped", until systemd's
``TimeoutStopSec=`` killed it.  :func:`detached` runs the call on a daemon
thread of its own instead, which nothing joins: at exit it is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

from migblockd import signalmask

__all__ = ["NoThread", "detached"]

T = TypeVar("T")


class NoThread(RuntimeError):
    """No thread could be started for the call (out of processes or memory): it
    did not run."""


async def detached(call: Callable[[], T], name: str) -> T:
    """``call()``'s result (or exception), computed on a daemon thread named ``name``.

    Cancelling the awaiting task abandons the call: it runs on, and its
    outcome is dropped.  :class:`NoThread` when no thread could be started.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # not cancelled meanwhile
            outcome()

    def body() -> None:
        hand: Callable[[], None]
        try:
            hand = functools.partial(future.set_result, call())
        except BaseException as exc:
            hand = functools.partial(future.set_exception, exc)
        # Closed: the loop is gone, and nobody waits for the outcome any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, hand)

    try:
        signalmask.start(threading.Thread(target=body, name=name, daemon=True))
    except RuntimeError as exc:
        raise NoThread(f"{exc} for {name}") from exc
    return await future

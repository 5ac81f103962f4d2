"""Blocking work off the event loop, on a thread that never holds the process up.

``asyncio.to_thread`` runs on the loop's default executor, whose threads the
end of ``asyncio.Runner`` joins (``shutdown_default_executor``: without a
bound on Python 3.11, 300 s on 3.12+) and, failing that, the interpreter's
exit joins again (``concurrent.futures.thread``'s exit hook): a call that
never returns (a file system that hangs, a resolver that does not answer)
would keep the daemon alive after it logged "stopped", until systemd's
``TimeoutStopSec=`` killed it.  :func:`detached` runs the call on a daemon
thread of its own instead, which nothing joins: at exit it is abandoned.

The start, which serves nobody yet, and ``--check-config`` wait for their
look-ups (``--socket-group``'s gid, the warnings about the group and the access
policy's names) where they are, but bounded: :func:`within` runs the call on
such a daemon thread too, and waits for it so long at most, and not past a stop
asked meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

from migblockd import signalmask
from migblockd.lookups import SLOW
from migblockd.startup import StoppedStarting

__all__ = ["NoThread", "Unanswered", "detached", "within"]

T = TypeVar("T")

#: Seconds between two looks at whether a stop was asked while a look-up is waited for.
POLL: Final = 0.1


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


class Unanswered(Exception):
    """A look-up that did not answer within its wait (it goes on, on its thread)."""


def within(work: Callable[[], T], name: str, seconds: float = SLOW,
           slow: Callable[[], object] | None = None,
           stop: Callable[[], str | None] | None = None) -> T:
    """``work()``'s result (or what it raised), run on a daemon thread named ``name``;
    :class:`Unanswered` when it has not returned within ``seconds``.  ``slow`` is
    called once if it has not returned within ``lookups.SLOW`` seconds, when every
    look-up is said to be slow (and ``seconds`` is more).
    ``stop()``: the name of a SIGTERM or SIGINT that came (``EarlySignals.stop``);
    one that has come, before or during the wait, raises :class:`.StoppedStarting`."""
    if stop is not None and (signal_name := stop()) is not None:
        raise StoppedStarting(signal_name)
    done = threading.Event()
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the waiter, which raises it
            outcome.append((False, exc))
        finally:
            done.set()

    try:
        # With the signals blocked, as every thread of the daemon's: they are the
        # main thread's to take.
        signalmask.start(threading.Thread(target=run, name=name, daemon=True))
    except RuntimeError:  # no thread to be had: asked here, unbounded, as before
        return work()
    start = time.monotonic()
    deadline, said = start + seconds, slow is None or seconds <= SLOW
    # In slices, to look at the stop: the handler that keeps a signal cannot wake
    # this wait itself (Event.set in a signal handler may take the lock that the
    # very wait it interrupts holds).
    while not done.wait(max(0.0, min(POLL, deadline - time.monotonic()))):
        if stop is not None and (signal_name := stop()) is not None:
            raise StoppedStarting(signal_name)  # the look-up goes on, on its daemon thread
        now = time.monotonic()
        if now >= deadline:
            raise Unanswered
        if not said and now >= start + SLOW:
            said = True
            assert slow is not None
            slow()
    answered, value = outcome[0]
    if not answered:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]  # work()'s own

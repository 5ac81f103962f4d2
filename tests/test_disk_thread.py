"""The commit thread's hand-over: in order, off the loop, errors reported, and a
stop that finishes what was submitted."""

from __future__ import annotations

import asyncio
import threading

from migblockd.disk import DiskThread


async def test_items_run_in_order_on_another_thread_and_each_is_reported() -> None:
    loop = asyncio.get_running_loop()
    ran: list[tuple[int, str]] = []
    outcomes: list[tuple[str | None, str]] = []
    all_done = asyncio.Event()

    def work(item: int) -> None:
        ran.append((item, threading.current_thread().name))
        if item == 2:
            raise OSError("disk full")

    def done(error: BaseException | None) -> None:
        outcomes.append((None if error is None else str(error),
                         threading.current_thread().name))
        if len(outcomes) == 3:
            all_done.set()

    disk: DiskThread[int] = DiskThread(loop, work, done)
    for item in (1, 2, 3):
        disk.submit(item)
    await asyncio.wait_for(all_done.wait(), 10)
    disk.stop()
    assert [item for item, _ in ran] == [1, 2, 3]
    assert {name for _, name in ran} == {"migblockd-commit"}
    here = threading.current_thread().name
    assert outcomes == [(None, here), ("disk full", here), (None, here)]


async def test_stop_finishes_what_was_submitted() -> None:
    loop = asyncio.get_running_loop()
    release = threading.Event()
    ran: list[int] = []

    def work(item: int) -> None:
        release.wait(10)
        ran.append(item)

    disk: DiskThread[int] = DiskThread(loop, work, lambda error: None)
    disk.submit(1)
    disk.submit(2)
    release.set()
    disk.stop()  # blocks until both ran
    assert ran == [1, 2]
    disk.stop()  # a second stop is harmless

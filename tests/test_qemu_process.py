"""ProcessWatch: a process's exit, told by a pidfd, on real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess

from migblockd.qemu.process import ProcessWatch, process_exited


async def exit_seen(watch: ProcessWatch) -> asyncio.Future[None]:
    seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    watch.on_exit(lambda: seen.set_result(None))
    return seen


async def test_the_exit_of_a_running_process_calls_back_once() -> None:
    child = subprocess.Popen(["sleep", "60"])
    watch = ProcessWatch(child.pid)
    try:
        seen = await exit_seen(watch)
        await asyncio.sleep(0.1)
        assert not seen.done() and not watch.exited()
        child.kill()  # not waited for: a zombie has exited too
        await asyncio.wait_for(seen, 10)
        assert watch.exited()
        assert process_exited(child.pid)
    finally:
        watch.close()
        child.wait()


async def test_a_process_reaped_before_it_is_watched_has_exited() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    watch = ProcessWatch(child.pid)
    try:
        assert watch.telling and watch.exited()
        await asyncio.wait_for(await exit_seen(watch), 10)
    finally:
        watch.close()


async def test_a_stopped_watch_calls_nothing_and_its_number_says_nothing() -> None:
    child = subprocess.Popen(["sleep", "60"])
    watch = ProcessWatch(child.pid)
    try:
        seen = await exit_seen(watch)
        watch.stop()
        child.kill()
        child.wait()
        await asyncio.sleep(0.2)
        assert not seen.done()
        # The pidfd is the process's, not its number's: still says it exited.
        assert watch.exited()
    finally:
        watch.close()


def test_a_running_process_has_not_exited() -> None:
    assert not process_exited(os.getpid())

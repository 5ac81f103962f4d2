"""Group commit end to end, on a real daemon and a real SQLite file: writers
share commits, and a writer that goes quiet holds no one up.

The cohort's rules are tested without a disk in test_core_cohort.py; here the
daemon's timer must end the wait for a quiet writer, or its peers' replies
would never come.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess
from qmpclient import RawClient

Start = Callable[..., DaemonProcess]


async def test_a_writer_that_goes_quiet_does_not_hold_up_the_next_commit(
        start_daemon: Start, tmp_path: Path) -> None:
    daemon = start_daemon("--state-dir", str(tmp_path / "state"))
    async with daemon.clients(2) as (quiet, busy):
        # One group carries both: each is in the cohort of the next.
        await asyncio.gather(quiet.ok("add-blocker", {"reason": "r", "id": "q"}),
                             busy.ok("add-blocker", {"reason": "r", "id": "b0"}))
        # quiet sends nothing more; busy's changes are committed all the same.
        for n in range(1, 20):
            info = await asyncio.wait_for(
                busy.ok("add-blocker", {"reason": "r", "id": f"b{n}"}), 10)
            assert info["id"] == f"b{n}"
        assert len(await quiet.ok("query-blockers")) == 21


async def test_writers_in_a_loop_all_get_answers_and_all_is_stored(
        start_daemon: Start, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))

    async def writer(client: RawClient, k: int) -> None:
        for n in range(25):
            await client.ok("add-blocker", {"reason": "r", "id": f"w{k}-{n}"})
            if n % 2:
                await client.ok("del-blocker", {"id": f"w{k}-{n}"})

    async with daemon.clients(8) as clients:
        await asyncio.wait_for(asyncio.gather(*(writer(c, k) for k, c in enumerate(clients))),
                               60)
    expected = sorted(f"w{k}-{n}" for k in range(8) for n in range(0, 25, 2))
    daemon.proc.kill()
    daemon.proc.wait()
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as client:
        assert sorted(b["id"] for b in await client.ok("query-blockers")) == expected

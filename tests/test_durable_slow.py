"""A disk that stalls under the running daemon: the commit waits, and the log says why.

strace holds the real daemon's ``fdatasync`` before it returns (its fault
injection can delay a system call's exit), so that a group commit takes as long
as a disk in trouble makes it take.  The test is skipped where strace cannot
trace.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess
from faults import injecting

from migblockd.state.store import SLOW_COMMIT

Start = Callable[..., DaemonProcess]

#: How long strace holds each sync: past the mark at which a commit is called slow.
DELAY = SLOW_COMMIT + 0.3


async def test_a_slow_commit_is_answered_and_logged_as_slow(
    start_daemon: Start, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        await c.ok("add-blocker", {"reason": "before", "id": "before"})
        async with injecting(daemon.proc.pid, "fsync,fdatasync",
                             f"delay_exit={int(DELAY * 1_000_000)}", "the daemon"):
            await c.ok("add-blocker", {"reason": "stalled", "id": "stalled"})
        # Slow is not failed: the change is committed, and served.
        assert [b["id"] for b in await c.ok("query-blockers")] == ["before", "stalled"]
    found = daemon.wait_for_log(re.compile(
        r"WARNING: a commit to (\S+) took (\d+\.\d) s \((\d+) changes?\): its disk or the machine "
        r"is slow, and the clients whose changes it carried waited as long for their replies"))
    assert found[1] == str(directory / "state.db")
    assert float(found[2]) >= round(DELAY, 1)
    assert int(found[3]) >= 1
    assert daemon.stop() == 0

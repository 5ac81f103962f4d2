"""A disk that fails under the running daemon in a way it cannot clean up after.

A commit whose sync fails may still have its pages in the log (in the page
cache, on their way to the disk): the store writes a commit over them, or cuts
the log where the last good commit ends (test_state_store.py).  When the file
system refuses both (it went read-only: ext4's ``errors=remount-ro``), the next
start may replay the group, so no client may be told it failed.  The daemon
stops at once instead, answering none of its commands, as a crash would: what
it answered before is on disk, what it did not may or may not be.

strace makes the disk fail (its fault injection), in the real daemon's commit
thread; the test is skipped where strace cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess
from faults import injecting

Start = Callable[..., DaemonProcess]


async def test_a_failed_sync_that_cannot_be_undone_stops_the_daemon_unanswered(
    start_daemon: Start, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    daemon = start_daemon("--state-dir", str(directory))
    async with daemon.client() as c:
        kept = await c.ok("add-blocker", {"reason": "kept", "id": "kept"})
        # The group's two writes (a frame's header and its page) go through, its
        # sync fails, and so does every write and truncate after: a file system
        # that went read-only while the group was being synced.
        async with injecting(daemon.proc.pid, "fsync,fdatasync", "error=EIO", "the daemon",
                             "pwrite64:error=EROFS:when=3+", "truncate,ftruncate:error=EROFS"):
            await c.send({"execute": "add-blocker", "arguments": {"reason": "unsure",
                                                                  "id": "unsure"}, "id": 1})
            try:
                told = await c.read_reply()
            except EOFError:
                told = None
    # Stopped at once, as a crash would (exit status 1 for systemd to restart it),
    # not telling the client that a change the next start may find had failed.
    assert told is None
    assert daemon.wait_exit() == 1
    lines = daemon.log().splitlines()
    db = directory / "state.db"
    assert lines[-1].endswith(
        f"CRITICAL: cannot commit to {db}: disk I/O error, and the log could be neither "
        "written over nor cut where its last good commit ends: the next start may find "
        "the changes; stopping at once, answering none of the commands waiting for it")
    # Whatever the disk kept is what every client may now see; acknowledged: kept.
    again = start_daemon("--state-dir", str(directory))
    async with again.client() as c:
        listing = await c.ok("query-blockers")
    assert listing[0] == kept
    assert [b["id"] for b in listing] in (["kept"], ["kept", "unsure"])
    assert again.stop() == 0

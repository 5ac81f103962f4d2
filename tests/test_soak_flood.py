"""A flood of signals, faster than the event loop takes them: the real daemon, real kill().

asyncio's loop learns of a signal through a byte the C handler writes to its
wakeup descriptor.  CPython's default is to print a traceback on stderr for
every signal that finds that descriptor full (``Exception ignored when trying to
write to the signal wakeup fd``): a flood of SIGHUPs wrote hundreds of them
among the daemon's log lines.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log

Start = Callable[..., DaemonProcess]


async def test_a_flood_of_sighups_writes_no_traceback(start_daemon: Start, tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text("max-clients = 100\n")
    d = start_daemon("--config", str(config), "--ephemeral", log_level="info")
    pidfd = os.pidfd_open(d.proc.pid)
    try:
        # As fast as one process sends them, for a second: far faster than the loop reads.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            signal.pidfd_send_signal(pidfd, signal.SIGHUP)
    finally:
        os.close(pidfd)
    d.wait_for_log("reloaded configuration")
    # A request answered after the flood: the loop has taken every signal's byte
    # that fitted (a SIGTERM that finds the descriptor full is lost to asyncio's
    # loop, as each SIGHUP that did not fit was: not what this test is about).
    async with d.client() as c:
        await c.ok("query-version")
    assert d.stop(60) == 0, d.log()[-3000:]
    assert "Exception ignored" not in d.log(), d.log()[-3000:]
    assert_clean_log(d)

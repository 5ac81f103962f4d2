"""Signals a long-running daemon meets that it gives no meaning: the real daemon, real kill().

SIGUSR1 and SIGUSR2 reach daemons by habit (a log rotation's "reopen your logs", a
status dump other daemons give) or by mistake (``systemctl kill`` without ``-s``
meant for another unit).  Their default action ends the process, without a line
and with its socket left behind; migblockd ignores them, and says so.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, assert_clean_log
from test_daemon_lifecycle import start_signalled_while_importing

Start = Callable[..., DaemonProcess]

UNUSED = (signal.SIGUSR1, signal.SIGUSR2)


async def test_sigusr1_and_sigusr2_are_ignored_and_said(start_daemon: Start) -> None:
    # Found by the soak review: `kill -USR1` ended the daemon (status -10), no line
    # in the log, its socket left behind, every connection's blockers gone.
    d = start_daemon("--ephemeral")
    async with d.client() as c:
        await c.ok("add-blocker", {"id": "held", "reason": "r", "scope": "connection"})
        for sig in UNUSED:
            d.signal(sig)
            d.wait_for_log(f"WARNING: received {sig.name}: ignored (migblockd gives it no "
                           "meaning: SIGHUP reloads the configuration, SIGTERM stops)")
        # The same connection is served, and its blocker is still there.
        assert [b["id"] for b in await c.ok("query-blockers")] == ["held"]
    assert d.stop() == 0, d.log()
    assert not d.socket.exists()
    assert_clean_log(d)


@pytest.mark.parametrize("sig", [s.name for s in UNUSED])
def test_sigusr_while_the_modules_load_is_ignored(tmp_path: Path, sig: str) -> None:
    # Before the event loop handles them, too: the entry point ignores them first.
    d = start_signalled_while_importing(tmp_path, sig, "-m")
    try:
        d.wait_for_log(" ready on ", 20)
        assert d.stop() == 0, d.log()
    finally:
        d.kill()
    assert_clean_log(d)


def test_sigusr_spammed_through_the_stop_never_ends_the_daemon(start_daemon: Start) -> None:
    # The stop hands the loop's signals back (SIG_DFL for a moment, then SIG_IGN):
    # SIGUSR1 and SIGUSR2 must be ignored throughout, in every thread, as the stop
    # signals are (migblockd.signalmask).
    for _ in range(3):
        d = start_daemon("--ephemeral")
        done = threading.Event()

        # Through a pidfd: the daemon's pid, once reaped, may be another process's.
        pidfd = os.pidfd_open(d.proc.pid)

        def spam(pidfd: int = pidfd, done: threading.Event = done) -> None:
            # A signal a millisecond, not a flood: the loop keeps up with these.
            while not done.wait(0.001):
                for sig in UNUSED:
                    try:
                        signal.pidfd_send_signal(pidfd, sig)
                    except ProcessLookupError:
                        return

        spammer = threading.Thread(target=spam)
        spammer.start()
        try:
            d.wait_for_log("WARNING: received SIGUSR")
            status = d.stop(20)
        finally:
            done.set()
            spammer.join()
            os.close(pidfd)
        assert status == 0, d.log()
        assert d.log().rstrip("\n").endswith("INFO: stopped"), d.log()[-2000:]
        assert_clean_log(d)

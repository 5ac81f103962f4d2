"""The watchdog of a daemon whose disk does not answer: the real daemon, pinging a
test-owned ``NOTIFY_SOCKET``, and strace holding its ``fdatasync``.

A stuck event loop stops the pings by itself (they come from it).  A commit that does
not return leaves the loop turning, but every change, and every read after it, waits
for that commit: the daemon serves nobody, and only its pings would say otherwise.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess
from faults import injecting
from test_systemd_manager import (
    Manager,
    add_blocker,
    blocker_ids,
    client,
    is_running,
    user_manager,
)
from test_systemd_manager import pytestmark as MANAGER_SKIP

Start = Callable[..., DaemonProcess]

#: WatchdogSec=1s: pings every 0.5 s, and a commit is stuck after 1 s.
WATCHDOG_USEC = 1_000_000
#: How long strace holds each sync: far past the watchdog's timeout (the test ends it).
HOLD_USEC = 60_000_000
#: The manager test's WatchdogSec=, in seconds.
MANAGER_WATCHDOG = 2
#: How long a datagram may take to come.
WITHIN = 10.0


def next_ping(receiver: socket.socket, within: float) -> bool:
    """Whether a ``WATCHDOG=1`` comes within ``within`` seconds (others are skipped)."""
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        receiver.settimeout(left)
        try:
            datagram = receiver.recv(4096).decode()
        except TimeoutError:
            return False
        if "WATCHDOG=1" in datagram.splitlines():
            return True
    return False


def drain(receiver: socket.socket) -> None:
    """Read what the socket holds now, without waiting."""
    receiver.setblocking(False)
    try:
        while True:
            receiver.recv(4096)
    except BlockingIOError:
        pass
    finally:
        receiver.setblocking(True)


async def test_a_commit_that_does_not_return_stops_the_watchdog_pings(
    start_daemon: Start, tmp_path: Path, notify: socket.socket
) -> None:
    d = start_daemon("--state-dir", str(tmp_path / "state"), "--log-level", "info",
                     env={**os.environ, "NOTIFY_SOCKET": notify.getsockname(),
                          "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    assert next_ping(notify, WITHIN), "the daemon does not ping its watchdog"
    async with d.client() as c:
        async with injecting(d.proc.pid, "fsync,fdatasync", f"delay_exit={HOLD_USEC}",
                             "the daemon"):
            await c.send({"execute": "add-blocker", "id": "stuck",
                          "arguments": {"reason": "disk", "id": "stuck"}})
            # (How long, to the second, is up to when the loop looked.)
            d.wait_for_log(re.compile(
                re.escape(f"ERROR: watchdog: the commit to {tmp_path / 'state' / 'state.db'}")
                + r" has not returned for \d+ s \(WatchdogSec=1 s\): no more pings until it "
                "does, so that systemd restarts a daemon that serves nobody"), WITHIN)
            drain(notify)  # the pings sent before it said so
            # Four times the interval: a daemon still pinging would have pinged.
            assert not next_ping(notify, 4 * WATCHDOG_USEC / 2 / 1_000_000), \
                "pinged while its commit does not return"
        # strace detached: the sync returns, the change is on disk and answered.
        reply = await c.read_reply()
        assert reply.get("id") == "stuck" and "return" in reply, reply
        assert next_ping(notify, WITHIN), "no ping once the commit returned"
        d.wait_for_log(f"WARNING: watchdog: the commit to {tmp_path / 'state' / 'state.db'}"
                       " returned: pinging again", WITHIN)
    assert d.stop() == 0


def host_pid(manager: Manager, pid: int) -> int:
    """The process that the manager's PID namespace numbers ``pid``, as this one numbers it."""
    namespace = os.readlink(f"/proc/{manager.init_pid}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != namespace:
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        numbers = next(line.split()[1:] for line in status.splitlines()
                       if line.startswith("NSpid:"))
        if numbers[-1] == str(pid):
            return int(entry.name)
    raise AssertionError(f"no process is pid {pid} in the manager's namespace")


@pytest.mark.skipif(bool(MANAGER_SKIP.args[0]), reason=MANAGER_SKIP.kwargs["reason"])
async def test_systemd_restarts_a_daemon_whose_commit_does_not_return(
    tmp_path: Path
) -> None:
    """The shipped unit under a real manager (test_systemd_manager's), with
    WatchdogSec=2s: systemd's own watchdog ends the daemon, and Restart= starts
    another, which serves the blockers on disk."""
    with user_manager(tmp_path) as manager:
        manager.drop_in("migblockd.service", f"[Service]\nWatchdogSec={MANAGER_WATCHDOG}s\n")
        await add_blocker(manager, "kept")
        before = manager.wait_for("migblockd.service", "start", is_running)
        c = await client(manager)
        try:
            # Each sync held for longer than the watchdog's timeout, twice over: the
            # daemon dies of systemd's SIGABRT once strace lets the sync return.
            async with injecting(host_pid(manager, int(before["MainPID"])), "fsync,fdatasync",
                                 f"delay_exit={4 * MANAGER_WATCHDOG * 1_000_000}",
                                 "the daemon"):
                await c.send({"execute": "add-blocker", "id": "stuck",
                              "arguments": {"reason": "disk", "id": "stuck"}})
                after = manager.wait_for(
                    "migblockd.service", "restart by the watchdog",
                    lambda s: is_running(s) and s["MainPID"] != before["MainPID"])
        finally:
            await c.close()
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, after
        assert re.search(r"watchdog: the commit to \S+/state\.db has not returned for \d+ s "
                         rf"\(WatchdogSec={MANAGER_WATCHDOG} s\)", manager.daemon_log()), \
            manager.log()
        assert "kept" in await blocker_ids(manager)

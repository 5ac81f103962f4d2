"""What ``systemctl status`` shows of a stop that waits: the real daemon's ``STATUS=``.

systemd shows the last ``STATUS=`` while a service stops; the daemon said
``STOPPING=1`` and then went on with its running summary, so a slow stop (a commit
waiting for another program's write lock, a stopped QEMU) said nothing of stopping,
nor of what it waited for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log

#: How long a datagram may take to come.
WITHIN = 10.0


def until(receiver: socket.socket, wanted: Callable[[dict[str, str]], bool],
          seen: list[dict[str, str]]) -> dict[str, str]:
    """The first datagram that ``wanted`` takes (each one read is kept in ``seen``)."""
    deadline = time.monotonic() + WITHIN
    while (left := deadline - time.monotonic()) > 0:
        receiver.settimeout(left)
        try:
            datagram = receiver.recv(4096).decode()
        except TimeoutError:
            break
        fields = dict(line.partition("=")[::2] for line in datagram.splitlines())
        seen.append(fields)
        if wanted(fields):
            return fields
    raise AssertionError(f"no such datagram within {WITHIN:g} s; seen: {seen}")


async def test_a_stop_that_waits_for_a_commit_says_so_in_its_status(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path, notify: socket.socket,
) -> None:
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state), "--log-level", "info",
                     env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()})
    seen: list[dict[str, str]] = []
    until(notify, lambda f: f.get("READY") == "1", seen)
    # c's add waits for a commit, and so does the second's event of it; the third,
    # which has not negotiated (no events), is owed nothing but to be let go.
    async with d.client() as c, d.client(), d.client(negotiate=False):
        # Another program holds the database's write lock: the commit waits for it
        # (SQLite's busy timeout, 5 s).
        other = sqlite3.connect(state / "state.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            await c.send({"execute": "add-blocker", "id": "t1",
                          "arguments": {"reason": "slow disk", "id": "t1"}})
            d.wait_for_log("added blocker t1")
            d.signal(signal.SIGTERM)
            stopping = until(notify, lambda f: f.get("STOPPING") == "1", seen)
            # With STOPPING=1, and while it waits: what for.
            assert stopping.get("STATUS") == (
                "stopping: waiting for 3 clients (2 for a commit to disk, 1 to take its "
                "last replies); 1 blocker, migration: none"), seen
        finally:
            other.execute("COMMIT")
            other.close()
        reply = await c.read_reply()
        assert reply["id"] == "t1" and "return" in reply, reply
    # The others gone, the last commit done: stopping, with nothing left to wait for.
    until(notify, lambda f: f.get("STATUS") == "stopping; 1 blocker, migration: none", seen)
    assert d.wait_exit() == 0
    assert_clean_log(d)


async def test_a_stop_with_nothing_to_wait_for_says_it_is_stopping(
    start_daemon: Callable[..., DaemonProcess], notify: socket.socket,
) -> None:
    d = start_daemon("--ephemeral", env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()})
    seen: list[dict[str, str]] = []
    until(notify, lambda f: f.get("READY") == "1", seen)
    d.signal(signal.SIGTERM)
    stopping = until(notify, lambda f: f.get("STOPPING") == "1", seen)
    assert stopping.get("STATUS") == "stopping; 0 blockers, migration: none", seen
    assert d.wait_exit() == 0
    await asyncio.sleep(0)

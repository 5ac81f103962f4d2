"""The real daemon with a ``NOTIFY_SOCKET`` nobody reads: its queue is full.

PID 1 reads every service's notifications from one socket, whose queue holds
``/proc/sys/net/unix/max_dgram_qlen`` datagrams (10 to 512); while PID 1 is busy
(a long ``daemon-reload``) it is full.  The daemon used to send through
asyncio's datagram transport, which kept what the kernel refused and retried it
each time epoll said the socket was writable, which it always says of an
unconnected AF_UNIX datagram socket: a busy loop, thousands of failing
``sendto()`` a second and nothing logged, and once 64 KiB were waiting every
send blocked, a SIGHUP's reload and a SIGTERM's stop included.

Here the test's own datagram socket plays PID 1's, filled by the test before the
daemon starts, and read only when the test says so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log
from faults import traced
from test_systemd import fill

#: Pings every 0.1 s: few enough that a quiet daemon's sendto() calls are countable.
WATCHDOG_USEC = 200_000
#: How long the test watches the daemon's system calls (or its CPU time).
WINDOW = 2.0
WITHIN = 20.0


def drain(sock: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            return got


def sendto_calls(pid: int, path: Path, seconds: float) -> int | None:
    """How many sendto() calls to ``path`` the process makes in ``seconds``, as
    strace counts them; None where strace is missing or may not trace."""
    if shutil.which("strace") is None:
        return None
    out = path.parent / "strace.out"
    strace = subprocess.Popen(["strace", "-f", "-qq", "-p", str(pid), "-e", "trace=sendto",
                               "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not traced(pid):
            if strace.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        time.sleep(seconds)
    finally:
        strace.terminate()
        try:
            strace.wait(10)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait()
    return sum(1 for line in out.read_text().splitlines() if str(path) in line)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_no_busy_loop(d: DaemonProcess, path: Path) -> None:
    """A quiet daemon whose notifications find the queue full makes a few
    sendto() calls a second (its pings, a retry a second), not thousands."""
    calls = sendto_calls(d.proc.pid, path, WINDOW)
    if calls is not None:
        # At most a ping every 0.1 s and the retries (backing off from 0.01 s to 1 s):
        # about 30 in 2 s.  The busy loop made thousands (under strace too).
        assert calls < 200, f"{calls} sendto() to {path} in {WINDOW} s:\n{d.log()[-3000:]}"
        return
    # No strace here: the CPU time instead.  A check for a busy loop (it kept a
    # CPU 90% busy), not of speed: an idle daemon uses nearly none.
    before, start = cpu_seconds(d.proc.pid), time.monotonic()
    time.sleep(WINDOW)
    used, wall = cpu_seconds(d.proc.pid) - before, time.monotonic() - start
    assert used < 0.5 * wall, f"{used:.2f} s of CPU in {wall:.2f} s:\n{d.log()[-3000:]}"


async def test_a_full_notify_socket_costs_no_cpu_and_holds_up_no_reload_or_stop(
    start_daemon: Callable[..., DaemonProcess], notify: socket.socket, short_tmp: Path,
) -> None:
    path = Path(notify.getsockname())
    config = short_tmp / "migblockd.toml"
    config.write_text("max-clients = 100\n")
    fillers = fill(path)
    assert fillers > 0
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    d = start_daemon("--ephemeral", "--config", str(config), log_level="info", env=env)
    d.wait_for_log(f"sd_notify: NOTIFY_SOCKET {path} is full (nobody reads it): ")
    # Status changes, a reload and pings while the queue stays full.
    for _ in range(20):
        async with d.client():
            pass
    config.write_text("max-clients = 50\n")
    d.signal(signal.SIGHUP)
    d.wait_for_log("reloaded configuration")
    assert_no_busy_loop(d, path)
    assert d.log().count("is full (nobody reads it)") == 1, d.log()

    # PID 1 reads again: the latest state arrives, the reload's end with the latest
    # status, in one message (the test's fillers first, as queued).
    assert drain(notify) == ["FILLER=1"] * fillers
    notify.settimeout(WITHIN)
    while (message := notify.recv(4096).decode()) == "WATCHDOG=1":
        pass
    fields = dict(line.split("=", 1) for line in message.split("\n"))
    assert fields.get("READY") == "1", message
    assert fields.get("STATUS") == "0 blockers, 0 clients, migration: none", message
    d.wait_for_log(f"sd_notify: NOTIFY_SOCKET {path} has room again")

    # Full again, a SIGTERM stops it all the same, without waiting for the queue.
    fill(path)
    d.signal(signal.SIGTERM)
    assert d.wait_exit(WITHIN) == 0
    log = d.log()
    assert log.count("is full (nobody reads it)") == 2, log
    assert f"NOTIFY_SOCKET {path} still full at exit" in log, log
    assert "STOPPING=1" in log.rpartition("still full at exit")[2], log
    assert_clean_log(d)
    await asyncio.sleep(0)

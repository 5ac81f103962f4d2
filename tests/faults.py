"""A disk or a kernel that misbehaves under a real process: strace's fault injection.

strace attaches to every thread of a running process and makes the system calls
it names fail (``error=EIO``) or take longer (``delay_enter=``, ``delay_exit=``,
in microseconds), for as long as it stays attached.  A test that needs it is
skipped where strace is missing or may not trace (no ptrace).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from realqemu import wait_until

__all__ = ["delayed", "injecting", "opened", "stopped_at_open", "traced"]

#: How long strace gets to detach after SIGTERM before it is killed.
DETACH_TIMEOUT = 10.0


def traced(pid: int) -> bool:
    """Every thread of ``pid`` is under a tracer (strace has attached)."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    return bool(tasks) and all(
        int(next(line.split()[1] for line in (task / "status").read_text().splitlines()
                 if line.startswith("TracerPid:"))) != 0 for task in tasks)


@contextlib.asynccontextmanager
async def injecting(pid: int, syscalls: str, inject: str, what: str,
                    *also: str, paths: Sequence[Path] = ()) -> AsyncIterator[None]:
    """strace on every thread of ``pid``, injecting ``inject`` into ``syscalls``
    (``delay_enter=``, ``error=``), and each of ``also`` (``"SYSCALLS:INJECT"``),
    for as long as the block runs; ``what`` names the process in a skip.  With
    ``paths``, only into the calls that name one of them (strace's ``-P``)."""
    if shutil.which("strace") is None:
        pytest.skip(f"needs strace, to make {what} misbehave (apt install strace)")
    faults = (f"{syscalls}:{inject}", *also)
    names = dict.fromkeys(name for fault in faults for name in fault.split(":")[0].split(","))
    strace = subprocess.Popen(
        ["strace", "-f", "-qq", "-p", str(pid), "-e", f"trace={','.join(names)}",
         *(arg for fault in faults for arg in ("-e", f"inject={fault}")),
         *(arg for path in paths for arg in ("-P", str(path)))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_until(lambda: traced(pid) or strace.poll() is not None, "strace attached")
        if strace.poll() is not None:
            pytest.skip(f"strace cannot trace {what} here (ptrace not permitted?)")
        yield
    finally:
        strace.terminate()  # it detaches, and the calls run as usual again
        try:
            strace.wait(DETACH_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Seen when the traced process had exited (os._exit) while traced: strace
            # then waits for one of its threads forever.  Killed, it lets go of it.
            strace.kill()
            strace.wait()


def stopped_at_open(path: Path, workdir: Path, what: str) -> str:
    """A ``python`` for ``spawn_daemon`` that runs the daemon under strace, which
    stops it (SIGSTOP) as it opens ``path``, until it is sent SIGCONT; strace
    stays attached, and lets every signal through.  :func:`opened` says when."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip(f"needs strace, to hold {what} (apt install strace)")
    wrapper = workdir / "python-stopped-at-open"
    # -D: strace runs as a grandchild, so that the daemon keeps the pid spawned.
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {shlex.quote(strace)} -D -f -qq -o /dev/null -e trace=openat "
        f"-P {shlex.quote(str(path))} -e inject=openat:signal=SIGSTOP "
        f'{shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def delayed(syscall: str, usec: int, workdir: Path, what: str,
            paths: Sequence[Path] = ()) -> str:
    """A ``python`` for ``spawn_daemon`` that runs the daemon under strace, which
    holds each of its ``syscall`` calls back for ``usec`` microseconds before it runs;
    with ``paths``, only the calls that name one of them (strace's ``-P``)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip(f"needs strace, to hold {what} back (apt install strace)")
    wrapper = workdir / f"python-delayed-{syscall}"
    only = "".join(f"-P {shlex.quote(str(path))} " for path in paths)
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {shlex.quote(strace)} -D -f -qq -o /dev/null -e trace={syscall} "
        f"-e inject={syscall}:delay_enter={usec} {only}"
        f'{shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def opened(pid: int, path: Path) -> bool:
    """``pid`` holds ``path`` open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except FileNotFoundError:  # closed since the listing: not this one
            continue
    return False

"""Whether the QEMU process behind the monitor has exited, told by a pidfd.

The kernel names the process at the other end of a Unix socket (``SO_PEERCRED``).
A pidfd opened while that connection is up refers to that very process, whatever
later takes its number, and becomes readable once it has exited, reaped or not: a
zombie has exited too (``pidfd_open(2)``).  ``/proc`` would not do: the units'
``ProtectProc=invisible`` hides other users' processes (QEMU's, as a rule), and
``kill(pid, 0)`` on one of those is refused, zombie or not.

Whether a lost QEMU has exited is what ends a migration that the link lost
(:mod:`migblockd.qemu.lost_migration`): nothing at the monitor's path tells it,
which may be held by another client, replaced by something that is not QEMU, or
removed while QEMU runs on.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable

__all__ = ["ProcessWatch", "process_exited"]


class ProcessWatch:
    """Process ``pid``, held open (while the kernel lets us) to tell when it exits."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._exited = False
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited = True  # exited and reaped already
        except OSError:
            pass  # cannot tell (a kernel older than 5.3, say): never "exited"

    @property
    def telling(self) -> bool:
        """Whether this can tell that the process exits at all."""
        return self._fd is not None or self._exited

    def exited(self) -> bool:
        if self._fd is not None and not self._exited:
            poll = select.poll()
            poll.register(self._fd, select.POLLIN)
            self._exited = bool(poll.poll(0))
        return self._exited

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Have the running loop call ``callback`` once, when the process exits (soon,
        if it has); never if this cannot tell, or once :meth:`stop` is called."""
        loop = asyncio.get_running_loop()
        if self._fd is None:
            if self._exited:
                self._loop = loop
                loop.call_soon(self._called, callback)
            return
        self._loop = loop
        loop.add_reader(self._fd, self._ready, callback)

    def _ready(self, callback: Callable[[], None]) -> None:
        self._exited = True
        self.stop()
        callback()

    def _called(self, callback: Callable[[], None]) -> None:
        if self._loop is not None:  # not closed meanwhile
            self._loop = None
            callback()

    def stop(self) -> None:
        """Call no callback given to :meth:`on_exit`."""
        loop, self._loop = self._loop, None
        if loop is not None and self._fd is not None and not loop.is_closed():
            loop.remove_reader(self._fd)

    def close(self) -> None:
        self.stop()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def process_exited(pid: int) -> bool:
    """Whether process ``pid`` has exited, reaped or not (False: it runs, or the
    kernel cannot tell)."""
    watch = ProcessWatch(pid)
    try:
        return watch.exited()
    finally:
        watch.close()

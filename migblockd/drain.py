"""How long shutdown waits for clients to take their last replies.

On SIGTERM the server stops reading and keeps taking turns: every request
already read runs and is answered, and each connection closes once its
replies are written (:meth:`migblockd.server.Server.stop`).  Nobody is dropped
for ``--max-output`` meanwhile: the output is owed.  What bounds the wait:

* a client that takes none of its output for ``SHUTDOWN_STALL`` seconds is
  dropped, unless what it is owed waits for a commit (a slow disk) or QEMU;
* after ``QEMU_LIMIT`` seconds the commands still waiting for QEMU are given up
  (``give_up``), so that their clients hear so while the drain still waits for
  them (QEMU may be stopped, and ``qemu-timeout`` longer than the drain, or 0);
* after ``SHUTDOWN_LIMIT`` seconds the drain ends, and whoever is left is dropped.

A connection answered in full is half-closed and lingers until the peer
closes it too, as long as it goes on taking its last output
(``ClientProtocol.finish``), and no longer than the drain.

A dropped client's requests still run (see ``ClientProtocol.drop``); only
their replies are lost.  Both limits are documented in docs/service.md.

Meanwhile ``STATUS=`` (``systemctl status``) says what the stop waits for
(:func:`waiting_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from migblockd.connection import Connection
from migblockd.core import Core
from migblockd.notify import plural

__all__ = ["DRAIN_POLL", "QEMU_LIMIT", "SHUTDOWN_LIMIT", "SHUTDOWN_STALL", "drain",
           "waiting_for"]

#: A client that has taken none of its output for this long is dropped ...
SHUTDOWN_STALL = 2.0
#: ... and the drain ends after this long in any case (well inside systemd's
#: default TimeoutStopSec= of 90 s).
SHUTDOWN_LIMIT = 30.0
#: Commands still waiting for QEMU then are given up, their clients told so.
QEMU_LIMIT = SHUTDOWN_LIMIT - 5.0
#: How often the drain looks for stalled clients.
DRAIN_POLL = 0.25

Progress = tuple[int, int, bool]


class Draining(Protocol):
    """What the drain needs of a connection's adapter (``adapter.ClientProtocol``)."""

    conn: Connection | None
    lingering: bool

    def progress(self) -> Progress: ...

    def drop(self, why: str) -> None: ...


async def drain(loop: asyncio.AbstractEventLoop, core: Core,
                protocols: Mapping[Connection, Draining], all_gone: asyncio.Event,
                give_up: Callable[[], None] = lambda: None) -> None:
    """Wait until ``protocols`` is empty, dropping the clients that stall; call
    ``give_up()`` once, after ``QEMU_LIMIT`` seconds, if some are still there."""
    start = loop.time()
    deadline = start + SHUTDOWN_LIMIT
    given_up = False
    seen: dict[Draining, tuple[Progress, float]] = {}
    while protocols:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_gone.wait(), DRAIN_POLL)
        now = loop.time()
        if not given_up and now >= start + QEMU_LIMIT:
            given_up = True
            give_up()
        for protocol in list(protocols.values()):
            if protocol.lingering and now < deadline:
                continue  # answered in full; closes when the peer does, or soon
            state = protocol.progress()
            conn = protocol.conn
            last = seen.get(protocol)
            if now >= deadline:
                # Not the client's doing when what it is owed is not made yet.
                awaited = None if conn is None else core.awaited(conn)
                protocol.drop(f"still waiting for {awaited} after {SHUTDOWN_LIMIT:g}s of "
                              "shutdown" if awaited is not None else
                              f"still taking its last replies after {SHUTDOWN_LIMIT:g}s "
                              "of shutdown")
            elif last is None or last[0] != state or (conn is not None and core.awaiting(conn)):
                seen[protocol] = (state, now)  # it moves, or waits for a commit or QEMU
            elif now - last[1] >= SHUTDOWN_STALL:
                protocol.drop(f"took none of its last replies for {SHUTDOWN_STALL:g}s "
                              "during shutdown")
        await asyncio.sleep(0)  # let the dropped ones go


def waiting_for(core: Core, conns: Iterable[Connection], committing: bool) -> str:
    """What a stop still waits for, in words for ``STATUS=`` ("": nothing).

    The clients left, and for each whether what it is owed waits for QEMU, for
    a commit (``committing``: one is due or under way), or for the client itself
    to take its last replies and hang up; with no client left, the commit.
    """
    qemu = commit = replies = 0
    for conn in conns:
        if core.awaits_qemu(conn):
            qemu += 1
        elif core.awaiting(conn):
            commit += 1
        else:
            replies += 1
    parts = [part for n, part in (
        (qemu, f"{qemu} for QEMU's answer"),
        (commit, f"{commit} for a commit to disk"),
        (replies, f"{replies} to take {'its' if replies == 1 else 'their'} last replies"),
    ) if n]
    if parts:
        return f"waiting for {plural(qemu + commit + replies, 'client')} ({', '.join(parts)})"
    return "waiting for a commit to disk" if committing else ""

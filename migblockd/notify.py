"""sd_notify and the watchdog: the daemon's state, as systemd's service manager reads it.

Inert when the daemon does not run under systemd: without ``$NOTIFY_SOCKET``
the notifier sends nothing, without ``$WATCHDOG_USEC`` it pings nothing.

The protocol is implemented from its stable specifications (sd_notify(3),
sd_watchdog_enabled(3)) rather than by linking libsystemd, so that the daemon
has no native dependency.  Socket activation is :mod:`migblockd.systemd`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import asyncio_dgram

from migblockd.notify_delivery import RETRY_FIRST, Delivery

__all__ = [
    "EXTEND_SEC",
    "MIN_WATCHDOG_INTERVAL",
    "Notifier",
    "Stalled",
    "format_status",
    "notify_address",
    "plural",
    "watchdog_usec",
]

logger = logging.getLogger(__name__)

#: The shortest interval between two watchdog pings.  A ``$WATCHDOG_USEC`` so
#: short that half of it is less (``WatchdogSec=1us``, a typo for ``1s``) is a
#: deadline no process can keep, since systemd checks it on its own loop;
#: pinging at half of it would turn the loop into a busy one (``WATCHDOG_USEC=1``
#: meant a ping every half microsecond: one CPU, and the notify socket, kept
#: busy).  Pinging every 10 ms instead costs nothing and keeps a watchdog of
#: 20 ms or more exactly as asked.
MIN_WATCHDOG_INTERVAL = 0.01

#: What each sign of progress of a long start gives it, past ``TimeoutStartSec=``
#: (sd_notify(3)'s ``EXTEND_TIMEOUT_USEC=``, systemd 236 and later): a restore
#: that goes on restoring is not killed for the size of its state, and one that
#: stops for longer than this still is.  As long as systemd's default
#: ``TimeoutStartSec=`` gives a whole start: the longest step between two signs
#: (the restored blockers put in the registry, their first listing encoded) grows
#: with the state, and took about 40 s for 1,000,000 blockers on a loaded 2-core
#: machine.
EXTEND_SEC = 90

#: What a daemon that serves nobody waits for, and for how many seconds so far
#: (None: nothing), as :meth:`Notifier.start_watchdog` asks it.
Stalled = Callable[[], "tuple[str, float] | None"]


def notify_address(value: str) -> str | None:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value, or None if unsupported.

    ``/path`` is a filesystem socket; ``@name`` is Linux's abstract namespace,
    which Python spells with a leading NUL.  Other forms (newer systemd's
    ``vsock:``) are not AF_UNIX and the daemon may only use AF_UNIX.
    """
    if len(value) < 2:
        return None
    if value[0] == "/":
        return value
    if value[0] == "@":
        return "\0" + value[1:]
    return None


def watchdog_usec(env: Mapping[str, str] = os.environ) -> int | None:
    """The watchdog timeout in microseconds, as sd_watchdog_enabled(3) decides it.

    None when ``$WATCHDOG_USEC`` is missing, not a positive integer, or when
    ``$WATCHDOG_PID`` names another process (the watchdog is meant for it).
    """
    raw = env.get("WATCHDOG_USEC")
    if raw is None:
        return None
    usec = _digits(raw)
    if usec is None:
        logger.warning("ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    # USEC_INFINITY (2**64 - 1) means "no timeout" to systemd.
    if usec <= 0 or usec >= 2**64 - 1:
        logger.warning("ignoring out-of-range WATCHDOG_USEC=%r", raw)
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        number = _digits(pid)
        if number is None:
            logger.warning("ignoring watchdog: malformed WATCHDOG_PID=%r", pid)
            return None
        if number != os.getpid():
            return None
    return usec


def _digits(raw: str) -> int | None:
    """``raw`` as systemd writes a number: ASCII digits, no more of them than a
    64-bit number has.  ``int()`` would also take ``"1_0"`` as 10 and any Unicode
    digit, both of which libsystemd's ``safe_atou64`` refuses."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        return None
    return int(raw)


def format_status(blockers: int, clients: int, migration: str, qemu: str | None = None,
                  state: str | None = None, stopping: str | None = None) -> str:
    """The one-line ``STATUS=`` summary, e.g. ``2 blockers, 1 client, migration: none``.

    ``qemu`` is the state of the link to a gated QEMU (``--qemu``), if any;
    ``state`` why the last commit to the state directory failed, while no later
    one has succeeded (what ``systemctl status`` should show at once);
    ``stopping``, once the daemon stops, what the stop still waits for ("": nothing),
    which comes first and says of the clients what there is to say.
    """
    line = f"{plural(blockers, 'blocker')}, {plural(clients, 'client')}, migration: {migration}"
    if stopping is not None:
        what = f": {stopping}" if stopping else ""
        line = f"stopping{what}; {plural(blockers, 'blocker')}, migration: {migration}"
    if qemu is not None:
        line = f"{line}, QEMU {qemu}"
    return line if state is None else f"{line}, state: {state}"


def plural(n: int, word: str) -> str:
    """``1 client``, ``2 clients``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(text: str) -> str:
    # Each notify assignment is one line; a newline would start a new
    # (possibly meaningful, e.g. "READY=1") assignment.
    return " ".join(text.splitlines())


class Notifier(Delivery):
    """One sd_notify endpoint for the daemon's life.

    The datagram socket is unconnected and every message is sent to the
    address, like sd_notify(3) does: a receiver that re-creates its socket
    keeps working, and a missing receiver costs a logged warning, never an
    exception in the daemon.

    What to say is the notifier's: the states (``READY=1``, ``RELOADING=1``,
    ``STOPPING=1``, and none after ``STOPPING=1``), ``STATUS=`` (not sent twice
    alike), the watchdog's pings.  How each message is sent is its base class's,
    :class:`~migblockd.notify_delivery.Delivery`: never waiting for the receiver,
    what a full queue holds back kept and retried, one last attempt at :meth:`close`.
    """

    def __init__(
        self,
        stream: asyncio_dgram.aio.DatagramServer | None,
        address: str | None,
        watchdog_usec: int | None,
        sock: socket.socket | None = None,
        display: str | None = None,
    ) -> None:
        self._stream = stream
        #: The socket under ``stream``, which the messages are sent on.
        self._sock = sock if stream is not None else None
        self._address = address
        #: ``$NOTIFY_SOCKET`` as given, for the log.
        self._display = display if display is not None else address
        self._watchdog_usec = watchdog_usec if stream is not None else None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._last_status: str | None = None
        # Log the first failure loudly and its repetitions (every watchdog
        # ping while the receiver is gone) quietly, until a send works again.
        self._failing = False
        #: Why the last send failed, when not for a full queue (nobody bound there).
        self._unreachable: OSError | None = None
        #: STOPPING=1 was sent: no READY=1 or RELOADING=1 may follow it.
        self._stopping = False
        #: What a full queue held back, one line per name ("READY", "STATUS"...),
        #: in the order to send them; empty when nothing waits.
        self._pending: dict[str, str] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = RETRY_FIRST
        #: Since the queue was found full: messages and pings held back.
        self._full = False
        self._held = 0
        self._held_pings = 0

    @classmethod
    async def open(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        raw = env.get("NOTIFY_SOCKET")
        if not raw:
            return cls(None, None, None)
        address = notify_address(raw)
        if address is None:
            logger.warning("ignoring unsupported NOTIFY_SOCKET=%r", raw)
            return cls(None, None, None)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            stream = await asyncio_dgram.from_socket(sock)
        except (OSError, TypeError) as exc:
            sock.close()
            logger.warning("cannot open the sd_notify socket: %s", exc)
            return cls(None, None, None)
        # An unconnected socket always yields the "server" flavour.
        assert isinstance(stream, asyncio_dgram.aio.DatagramServer)
        logger.debug("sd_notify socket %s", raw)
        return cls(stream, address, watchdog_usec(env), sock, raw)

    @property
    def active(self) -> bool:
        """True when there is a ``$NOTIFY_SOCKET`` to talk to."""
        return self._stream is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half the timeout, but not below
        :data:`MIN_WATCHDOG_INTERVAL`), or None if no watchdog."""
        if self._watchdog_usec is None:
            return None
        return max(self._watchdog_usec / 2 / 1_000_000, MIN_WATCHDOG_INTERVAL)

    async def notify(self, *lines: str) -> None:
        """Send the assignments as one datagram, at once: never waits for the
        receiver.  Failures are logged, never raised; with a full queue the
        state they carry is kept and sent later (see
        :class:`~migblockd.notify_delivery.Delivery`)."""
        self._send(lines)

    async def ready(self, status: str | None = None) -> None:
        """``READY=1``, unless the stop has begun: a reload that ends during the
        drain would take systemd's view of the unit back from stopping."""
        if not self._stopping:
            await self._with_status("READY=1", status)

    async def status(self, text: str) -> None:
        """Send ``STATUS=text`` unless it is what was sent last."""
        text = _one_line(text)
        if text == self._last_status:
            return
        self._last_status = text
        await self.notify(f"STATUS={text}")

    def extend(self, status: str) -> None:
        """``EXTEND_TIMEOUT_USEC=`` (:data:`EXTEND_SEC`) and ``STATUS=status``, as one
        message: the start makes progress, and ``systemctl status`` says which.

        Not a coroutine: the restore calls it between rows, on the loop's thread
        without returning to the loop.  Never waits for the receiver, as every
        message; none once the stop has begun, whose bound is the drain's own."""
        if self._stopping:
            return
        text = _one_line(status)
        self._last_status = text
        self._send((f"EXTEND_TIMEOUT_USEC={EXTEND_SEC * 1_000_000}", f"STATUS={text}"))

    def say(self, status: str) -> None:
        """``STATUS=status`` alone, at once: :meth:`extend`'s, for a start that no
        longer asks for more time (a stop came while it restored)."""
        text = _one_line(status)
        if self._stopping or text == self._last_status:
            return
        self._last_status = text
        self._send((f"STATUS={text}",))

    def failed(self, why: str) -> None:
        """``STATUS=failed to start: why``, at once: the last word of a start that
        ends in an error.  systemd keeps a unit's last ``STATUS=`` after its process
        exits, and ``systemctl status`` of the failed unit showed the step the start
        was at (``opening the state in ...``) as if it were still under way
        (sd_notify(3)'s example sends ``STATUS=Failed to start up: ...`` so)."""
        text = _one_line(f"failed to start: {why}")
        self._last_status = text
        self._send((f"STATUS={text}",))

    def _send(self, lines: tuple[str, ...]) -> None:
        # The one place that decides whether there is anyone to tell: the
        # coroutines and the restore's calls, which may not wait, alike.
        if self._stream is not None and self._address is not None and lines:
            self._deliver(lines)

    async def reloading(self) -> None:
        # Type=notify-reload (systemd 253+) requires MONOTONIC_USEC with
        # RELOADING=1 so that it can tell this reload from an earlier one.
        if self._stopping:
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    async def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``, with what the stop waits for (``status``) if given.
        Never waits for the receiver: a full queue does not hold up the stop."""
        self._stopping = True
        await self._with_status("STOPPING=1", status)

    async def _with_status(self, assignment: str, status: str | None) -> None:
        # In one datagram: systemd shows the new state and its status together.
        lines = [assignment]
        if status is not None:
            status = _one_line(status)
            self._last_status = status
            lines.append(f"STATUS={status}")
        await self.notify(*lines)

    def start_watchdog(self, stalled: Stalled = lambda: None) -> None:
        """Start pinging ``WATCHDOG=1`` every half timeout, if a watchdog is wanted.

        The pings come from a task on the running event loop, so a wedged loop
        stops them and systemd kills and restarts the daemon.  A loop that turns
        while the daemon serves nobody stops them too: ``stalled()``, asked before
        each ping, names what every client waits for and for how many seconds it
        has (a commit that does not return: every change waits for it, and every
        read after one), or is None; once that is the watchdog's whole timeout, no
        ping is sent until it ends.
        """
        interval = self.watchdog_interval
        usec = self._watchdog_usec
        if interval is None or usec is None or self._watchdog_task is not None:
            return
        if usec / 2 / 1_000_000 < MIN_WATCHDOG_INTERVAL:
            logger.warning("WATCHDOG_USEC=%d (%g s) is too short a watchdog to keep: pinging "
                           "every %g s instead, and systemd may kill the daemon as unresponsive;"
                           " set WatchdogSec= to 1s or more (the shipped unit says 30s)",
                           usec, usec / 1_000_000, MIN_WATCHDOG_INTERVAL)
        self._watchdog_task = asyncio.get_running_loop().create_task(
            self._watchdog(interval, usec / 1_000_000, stalled), name="sd-watchdog"
        )

    async def _watchdog(self, interval: float, timeout: float, stalled: Stalled) -> None:
        logger.debug("watchdog: pinging every %.3g s", interval)
        held: str | None = None  # what the pings are held back for
        while True:
            stall = stalled()
            if stall is not None and stall[1] >= timeout:
                if held is None:
                    held = stall[0]
                    logger.error("watchdog: %s has not returned for %.0f s (WatchdogSec=%g s):"
                                 " no more pings until it does, so that systemd restarts a "
                                 "daemon that serves nobody", held, stall[1], timeout)
            else:
                if held is not None:
                    logger.warning("watchdog: %s returned: pinging again", held)
                    held = None
                await self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop the pings; what a full queue still holds back gets one last
        non-blocking attempt (never a wait), then the socket is closed."""
        task, self._watchdog_task = self._watchdog_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._last_attempt()
        stream, self._stream = self._stream, None
        self._sock = None
        if stream is not None:
            stream.close()

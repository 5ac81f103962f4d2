"""The connection to a QEMU's QMP monitor: execute commands, relay events.

migblockd may start before QEMU and outlive it.  The link keeps trying to connect, with
capped exponential backoff, and reconnects by itself when a new QEMU listens on the same
socket: that is :mod:`migblockd.qemu.reconnect`'s (a base class of :class:`QemuLink`),
apart from what is done over a connection that is up, which is this module's.  The link
knows nothing of migblockd's registry: the caller gets QEMU's events through ``on_event``
and state changes through ``on_state``, and sends commands with :meth:`QemuLink.execute`.

It is built on ``qemu.qmp``'s ``QMPClient``, adjusted (:mod:`migblockd.qemu.client`) to
hand QEMU's events over in QEMU's order with its replies, to log the wire traffic at debug
level and nothing of the library's own, and to name a message too long for what it is.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from qemu.qmp import (
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPError,
    Runstate,
    StateError,
)

from migblockd.qemu.client import LinkClient
from migblockd.qemu.errors import (
    QemuCommandError,
    QemuInterrupted,
    QemuLinkError,
    QemuNotConnected,
    QemuTimedOut,
)
from migblockd.qemu.info import QemuInfo
from migblockd.qemu.reconnect import (
    GREETING_NOTICE,
    LOSSES,
    MAX_DELAY,
    MIN_DELAY,
    NEGOTIATING,
    NOT_GREETED,
    LinkState,
    Reconnecting,
    StateHandler,
)
from migblockd.qemu.too_long import Interrupted

__all__ = ["EventHandler", "QemuLink"]

log = logging.getLogger("migblockd.qemu")

#: ``on_event(name, data, timestamp)``: QEMU's event name, its ``data`` (empty when QEMU sent
#: none) and its ``timestamp`` (``{"seconds": N, "microseconds": N}``), all as QEMU sent them.
EventHandler = Callable[[str, Mapping[str, object], Mapping[str, object]], None]

#: How long :meth:`QemuLink.execute` waits for QEMU's reply by default (0: forever).
TIMEOUT = 10.0


class QemuLink(Reconnecting):
    """A self-healing QMP connection to the QEMU monitor at ``path``.

    Call :meth:`start` from a running event loop, :meth:`close` when done.
    """

    def __init__(self, path: str | os.PathLike[str], *, on_event: EventHandler | None = None,
                 on_state: StateHandler | None = None,
                 on_gone: Callable[[], None] | None = None,
                 on_silent: Callable[[], None] | None = None, min_delay: float = MIN_DELAY,
                 max_delay: float = MAX_DELAY, greeting_notice: float = GREETING_NOTICE,
                 timeout: float = TIMEOUT) -> None:
        self.path = Path(path)
        #: How long :meth:`execute` waits for QEMU's reply (0: forever).
        self.timeout = timeout
        #: The command QEMU left unanswered past ``timeout``, until it answers one.
        self.silent: str | None = None
        self._on_event = on_event
        self._on_state = on_state
        #: Called after each connection attempt that found nobody listening at ``path``.
        self._on_gone = on_gone
        #: Called when ``silent`` starts or ends on a connection (a new connection ends
        #: it too, which ``on_state`` tells): whoever shows it learns so at once, with
        #: no command of a client's to wait for (the link's own, or a late reply).
        self._on_silent = on_silent
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._greeting_notice = greeting_notice
        #: Connection attempts that failed since the link last connected (or started).
        self.attempts = 0
        self._state: LinkState = "disconnected"
        #: QEMU accepted the connection and the session is not up yet (its greeting,
        #: then its answers, are awaited): QEMU is there.
        self.awaiting_greeting = False
        #: migblockd dropped the connection to a QEMU that runs on (its message was too
        #: long to read, or garbage), and has not tried to connect again yet: QEMU is
        #: there.
        self.dropped = False
        #: The connection up now (or the last one) carried a message migblockd took
        #: once it was up: a drop that ends it is the first in a row again.
        self.served = False
        #: Connections that were up and were lost, by who ended them (LOSSES).
        self.losses = dict.fromkeys(LOSSES, 0)
        #: QEMU has greeted on the connection being set up.
        self.greeted = False
        #: The connection being set up has waited GREETING_NOTICE for QEMU (its
        #: greeting, or its first answers), which the log warned of.
        self.late = False
        self._reason = "not connected yet"
        self._logged_reason: str | None = None
        self._info: QemuInfo | None = None
        self._client = LinkClient(self)
        self._peer_pid = self._client.peer_pid
        self._peer_uid = self._client.peer_uid
        #: Events read after each reply whose caller has not run yet (see the module doc).
        self._after_replies: collections.deque[list[Message]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()  # the first attempt to connect is over

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def info(self) -> QemuInfo | None:
        """The connected QEMU's version and commands; ``None`` unless connected."""
        return self._info

    @property
    def version(self) -> Mapping[str, object] | None:
        """QEMU's version object (as ``query-version`` returns it); ``None`` unless connected."""
        return self._info.version if self._info is not None else None

    async def first_attempt(self) -> None:
        """Return once the first attempt to connect has succeeded or failed."""
        await self._tried.wait()

    def start(self) -> None:
        if self._task is not None or self._state == "closed":
            raise RuntimeError("QemuLink.start() may be called once, before close()")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"QEMU link {self.path}")

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None,
                      *, for_client: bool = True) -> object:
        """Run ``command`` in QEMU and return QEMU's ``return`` value; ``for_client``
        False: migblockd's own, which no client waits for (the log says so).

        Raises QemuCommandError (QEMU's error, verbatim), QemuNotConnected (nothing was
        sent), QemuInterrupted (sent, but the connection was lost before the reply),
        QemuTimedOut (no reply within ``timeout`` seconds; the link stays connected and
        drops the late reply), or QemuLinkError (arguments that are not strict JSON, or a
        reply not understood).
        """
        if self._state != "connected":
            raise self._not_connected()
        try:
            # The library serializes in its writer task, where a failure would drop the
            # connection; and QEMU cannot parse NaN or Infinity.
            json.dumps(arguments, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise QemuLinkError(f"Arguments for '{command}' are not valid JSON: {exc}") from None
        # Not for the link's own set-up (greeting, query-qmp-schema): that has its notice.
        deadline = asyncio.timeout(self.timeout or None)
        try:
            async with deadline:
                result = await self._client.execute(command, arguments)
        except TimeoutError:
            if not deadline.expired():
                raise  # not this deadline's
            # Every command of every client times out while QEMU is stopped: the
            # first says so, the others wait for QEMU's next answer, which is logged.
            if self.silent is None:
                log.warning("QEMU at %s did not answer '%s' within %g s (stopped, or busy "
                            "with a long command?); %s, QEMU may still run it; further "
                            "commands it leaves unanswered are not logged until it answers",
                            self.path, command, self.timeout,
                            "the client's command that sent it failed" if for_client else
                            "migblockd sent it for itself")
                self.silent = command
                self._silent_changed()
            else:
                log.debug("QEMU at %s did not answer '%s' within %g s either", self.path,
                          command, self.timeout)
            raise QemuTimedOut(self.path, command, self.timeout) from None
        except ExecuteError as exc:
            self._answers()
            raise QemuCommandError(exc.error_class, exc.error.error.desc) from None
        except Interrupted as exc:
            raise QemuInterrupted(exc.too_long.interrupted(command, self.path,
                                                           own=exc.own)) from None
        except ExecInterruptedError as exc:
            raise QemuInterrupted(
                f"The connection to QEMU's monitor at '{self.path}' was lost before QEMU "
                f"replied to '{command}'") from exc
        except StateError:
            raise self._not_connected() from None
        except QMPError as exc:
            raise QemuLinkError(f"QEMU's reply to '{command}' was not understood: {exc}"
                                ) from exc
        self._answers()
        return result

    def _answers(self) -> None:
        """QEMU answered a command: if it had left one unanswered, that is over."""
        if self.silent is not None:
            log.info("QEMU at %s answers again (it had not answered '%s' within %g s)",
                     self.path, self.silent, self.timeout)
            self.silent = None
            self._silent_changed()

    def _late_changed(self) -> None:
        self._silent_changed()

    def _silent_changed(self) -> None:
        if self._on_silent is None:
            return
        try:
            self._on_silent()
        except Exception:
            log.exception("internal error handling QEMU's silence (%r)", self.silent)

    async def close(self) -> None:
        """Stop reconnecting and disconnect; commands in flight raise QemuInterrupted."""
        if self._state == "closed":
            return
        was_connected = self._state == "connected"
        self._state, self._info, self._reason = "closed", None, "the link is closed"
        self.dropped = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("the QEMU link for %s had failed: %s", self.path, task.exception())
        if self._client.runstate != Runstate.IDLE:
            await self._disconnect_quietly()
        if was_connected:
            log.info("disconnected from QEMU at %s", self.path)
        self._notify_state()

    def _greeting_awaited(self) -> None:
        # Until now the reason was the last attempt's ("Connection refused"): a client
        # told that while another one holds QEMU's monitor would look for a dead QEMU.
        # Why QEMU is silent is guessed only once the greeting is late (_greeting_late):
        # a QEMU that is starting, or just restarted, greets within milliseconds.
        self._reason = NOT_GREETED
        # Still "disconnected" (the state's callers count on that), but QEMU is there.
        self.awaiting_greeting = True
        self.greeted = False

    def _greeted(self) -> None:
        # No longer "has not greeted": QEMU's I/O thread greets even while its main loop,
        # which answers qmp_capabilities, is busy; nor may another client be blamed.
        self.greeted = True
        self._reason = NEGOTIATING

    def _not_connected(self) -> QemuNotConnected:
        if self._state == "connected":  # the reader saw the end; _run has yet to notice
            return QemuNotConnected(self.path, "the connection was just lost")
        return QemuNotConnected(self.path, self._reason)

    def _deliver_after_reply(self) -> None:
        for msg in self._after_replies.popleft():
            self._deliver(msg)

    def _deliver(self, msg: Mapping[str, object]) -> None:
        name = msg.get("event")
        data = msg.get("data", {})
        timestamp = msg.get("timestamp", {})
        if not (isinstance(name, str) and isinstance(data, Mapping)
                and isinstance(timestamp, Mapping)):
            log.warning("QEMU at %s sent a malformed event, ignored: %r", self.path, dict(msg))
            return
        if self._on_event is None:
            return
        try:
            self._on_event(name, data, timestamp)
        except Exception:
            log.exception("internal error handling QEMU's %s event", name)

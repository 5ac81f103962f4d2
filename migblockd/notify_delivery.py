"""Sending to ``$NOTIFY_SOCKET`` without waiting, and what a full queue holds back.

Part of :class:`migblockd.notify.Notifier` (a base class of it, with no state of its
own): how one message reaches systemd's service manager.  The notifier decides what
to say (the states, ``STATUS=``, the watchdog's pings) and hands each message to
:meth:`Delivery._deliver`, which makes one non-blocking ``sendto()`` of it.  A
message the receiver's queue has no room for, or that nobody is bound to receive,
is not lost and not waited for: what matters of it is coalesced with what is
already held back (:func:`_coalesce`, by systemd's rules for reading the states)
and retried on a backing-off timer (:data:`RETRY_FIRST` to :data:`RETRY_MAX`) and
with every later message; :meth:`Delivery._last_attempt` is the stop's one last
try.  The log tells the first failure, and when messages go through again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from collections.abc import Mapping, Sequence

__all__ = ["MAX_MESSAGE", "RETRY_FIRST", "RETRY_MAX", "Delivery"]

# The notifier's logger: its lines are one component's, whichever module words them.
logger = logging.getLogger("migblockd.notify")

#: A message a full ``$NOTIFY_SOCKET`` held back is retried after this many
#: seconds, then after twice as long each time, up to :data:`RETRY_MAX`.
RETRY_FIRST = 0.01
RETRY_MAX = 1.0


def _coalesce(pending: Mapping[str, str], lines: Sequence[str], *,
              keep_watchdog: bool) -> dict[str, str]:
    """``pending`` (one line per name) updated with ``lines``, as one message.

    A later value replaces an earlier one.  Of the states, systemd reads one per
    message (``STOPPING=1`` wins over the others, ``READY=1`` over
    ``RELOADING=1``: src/core/service.c), so a new state replaces the earlier
    one, but for a ``READY=1`` that ends a ``RELOADING=1`` still held back: the
    two go together with its ``MONOTONIC_USEC=``, which systemd (253+, in
    reload-signal state) takes for a reload begun and done, where a ``READY=1``
    alone would leave the unit reloading until its timeout.  ``RELOADING=1``
    after ``READY=1`` is a new reload: the ``READY=1`` goes.  ``STOPPING=1``
    drops the others.  ``WATCHDOG=1`` is kept only if ``keep_watchdog``: a ping
    held back by a full queue is worth sending late (systemd's timer restarts
    when it arrives); one to a receiver that is not there is not.
    """
    message = dict(pending)
    for line in lines:
        name = line.partition("=")[0]
        if name == "WATCHDOG" and not keep_watchdog:
            continue
        if name == "STOPPING":
            for other in ("READY", "RELOADING", "MONOTONIC_USEC"):
                message.pop(other, None)
        elif name == "RELOADING":
            message.pop("READY", None)
        # Re-inserted at the end: READY=1 after the RELOADING=1 it ends.
        message.pop(name, None)
        message[name] = line
    return message


#: The longest message systemd's manager takes: it reads each datagram into a buffer
#: of ``NOTIFY_BUFFER_MAX`` (``PIPE_BUF``, 4096) bytes and ignores one that fills it
#: whole, ``READY=1`` and all ("Received notify message exceeded maximum size.
#: Ignoring.": ``manager_dispatch_notify_fd()`` in systemd's src/core/manager.c).
MAX_MESSAGE = 4095
#: What ends a ``STATUS=`` cut short to fit :data:`MAX_MESSAGE`.
_CUT = b"..."

#: Lone surrogates that stand for no byte (surrogateescape's are U+DC80..U+DCFF).
_NOT_A_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _utf8(text: str) -> bytes:
    """``text`` in UTF-8, as systemd reads it; never an error.  The bytes of a name
    that is not UTF-8 (a state directory's, held as surrogates) are shown escaped
    (``\\xff``); any other lone surrogate (JSON may spell one, as in a gated QEMU's
    migration status) as Python writes it (``\\ud800``)."""
    text = _NOT_A_BYTE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
    return text.encode(errors="surrogateescape").decode(errors="backslashreplace").encode()


def _payload(message: Mapping[str, str]) -> bytes:
    """``message``'s lines as one datagram of :data:`MAX_MESSAGE` bytes at most: a
    ``STATUS=`` that would make it longer (a gated QEMU's migration status is
    whatever QEMU says) is cut, at a character, and ends ``...``.  The other lines
    are a few dozen bytes together."""
    lines = {name: _utf8(line) for name, line in message.items()}
    payload = b"\n".join(lines.values())
    status = lines.get("STATUS")
    if len(payload) <= MAX_MESSAGE or status is None:
        return payload
    room = MAX_MESSAGE - (len(payload) - len(status)) - len(_CUT)
    lines["STATUS"] = status[:room].decode(errors="ignore").encode() + _CUT
    return b"\n".join(lines.values())


class Delivery:
    """A :class:`~migblockd.notify.Notifier`'s sending of its messages.

    Sending never waits.  Each message is one non-blocking ``sendto()``;
    asyncio's transport (which would buffer a datagram the receiver's queue has
    no room for and retry it whenever epoll says "writable", which it always
    says of an unconnected AF_UNIX datagram socket: a busy loop, and past its
    64 KiB high-water mark every send blocked) is never used to send.  When the
    queue is full (nobody reads ``$NOTIFY_SOCKET``, or PID 1 is busy, e.g. in a
    long ``daemon-reload``; the queue is the kernel's ``max_dgram_qlen`` datagrams,
    shared by every service), what matters is kept, coalesced into one pending
    message: the latest of ``READY=1``/``RELOADING=1``/``STOPPING=1`` (with
    the ``MONOTONIC_USEC=`` of a ``RELOADING=1`` a ``READY=1`` ends), the
    latest ``STATUS=``, and a ``WATCHDOG=1`` (late, it still restarts systemd's
    timer; dropped, the next ping came half the watchdog's time later, with no
    margin left).  It is retried on a timer backing off from
    :data:`RETRY_FIRST` to :data:`RETRY_MAX`, and with every later message.  A
    receiver that is not there (``ECONNREFUSED``) has the state kept and
    retried alike.  One warning when the queue is first found full, one info
    line when messages go through again.  :meth:`close` makes one last
    non-blocking attempt.
    """

    # The notifier's, set in Notifier.__init__:
    #: The socket the messages are sent on (None: closed, or no ``$NOTIFY_SOCKET``).
    _sock: socket.socket | None
    _address: str | None
    _display: str | None
    _failing: bool
    _unreachable: OSError | None
    _pending: dict[str, str]
    _retry: asyncio.TimerHandle | None
    _retry_delay: float
    _full: bool
    _held: int
    _held_pings: int

    def _deliver(self, lines: tuple[str, ...] | list[str]) -> None:
        """One non-blocking attempt at what is pending plus ``lines``."""
        message = _coalesce(self._pending, lines, keep_watchdog=True)
        if not message:
            return
        payload = _payload(message)
        error = self._sendto(payload)
        if error is None:
            self._delivered(payload)
        elif isinstance(error, BlockingIOError) or error.errno == errno.ENOBUFS:
            self._queue_full(lines, error)
        else:
            # Nobody bound there now (ECONNREFUSED, ENOENT), or another error: the
            # state is kept and tried again, as with a full queue, for a receiver
            # that comes back (the STATUS= it was last sent is not sent twice).
            self._pending = _coalesce(self._pending, lines, keep_watchdog=False)
            self._full = False
            self._unreachable = error
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            logger.log(level, "sd_notify %r failed: %r", payload.decode(), error)
            self._schedule_retry()

    def _sendto(self, payload: bytes) -> OSError | None:
        sock, address = self._sock, self._address
        if sock is None or address is None:
            return OSError(errno.EBADF, "the sd_notify socket is closed")
        try:
            # MSG_DONTWAIT: never a wait in the kernel for the receiver's queue.
            # (libsystemd's sd_notify() sends each message once, with sendmsg() on
            # a fresh blocking socket, and so waits in the kernel while the queue
            # is full; it retries nothing and returns the error.  An event loop may
            # not wait, hence the pending message and the timer here.)
            sock.sendto(payload, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, address)
        except OSError as exc:
            return exc
        return None

    def _delivered(self, payload: bytes) -> None:
        self._cancel_retry()
        self._pending = {}
        self._retry_delay = RETRY_FIRST
        if self._full:
            logger.info("sd_notify: NOTIFY_SOCKET %s has room again: sent %r (%d message(s) "
                        "and %d watchdog ping(s) held back and sent as one)",
                        self._display, payload.decode(), self._held, self._held_pings)
            self._full = False
        if self._failing:
            logger.info("sd_notify works again")
            self._failing = False

    def _queue_full(self, lines: tuple[str, ...] | list[str], error: OSError) -> None:
        # A watchdog ping is kept too: systemd resets its timer when a ping
        # arrives, so one sent late is as good as one on time, where one dropped
        # left the next, half the watchdog's time later, with no margin at all.
        self._pending = _coalesce(self._pending, lines, keep_watchdog=True)
        pinged = any(line.startswith("WATCHDOG=") for line in lines)
        if not self._full:
            self._full = True
            self._held = self._held_pings = 0
            logger.warning(
                "sd_notify: NOTIFY_SOCKET %s is full (nobody reads it): %s; keeping the "
                "latest state, STATUS= and watchdog ping to send when it has room (retried "
                "after %g s, backing off to every %g s)",
                self._display, error.strerror or error, RETRY_FIRST, RETRY_MAX)
        if pinged:
            self._held_pings += 1
        if len(lines) > int(pinged):
            self._held += 1
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._pending and self._retry is None:
            loop = asyncio.get_running_loop()
            self._retry = loop.call_later(self._retry_delay, self._retry_pending)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def _retry_pending(self) -> None:
        self._retry = None
        if self._pending and self._sock is not None:
            self._deliver([])

    def _cancel_retry(self) -> None:
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()

    def _last_attempt(self) -> None:
        """What a full queue still holds back, tried once more (never a wait) before
        the socket is closed; logged if it still does not go."""
        self._cancel_retry()
        if self._pending and self._sock is not None:
            pending = "\n".join(self._pending.values())
            self._deliver([])
            if self._pending and self._full:
                logger.warning("sd_notify: NOTIFY_SOCKET %s still full at exit: %r not "
                               "delivered", self._display, pending)
            elif self._pending:
                # Not a full queue: nobody is bound there (a receiver gone, a path
                # that names no socket), which "full" would send the reader looking
                # for a busy manager that is not the cause.
                error = self._unreachable
                logger.warning("sd_notify: NOTIFY_SOCKET %s still unreachable at exit (%s): "
                               "%r not delivered", self._display,
                               (error.strerror or error) if error is not None else "unknown",
                               pending)
            self._cancel_retry()  # the attempt's own, which would outlive the socket
            self._pending = {}

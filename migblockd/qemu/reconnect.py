"""The link's connection's life: connecting, waiting out QEMU's greeting, backoff, reconnecting.

Part of :class:`migblockd.qemu.link.QemuLink` (a base class of it, with no state of its
own).  migblockd may start before QEMU and outlive it.  The link keeps trying to connect,
with capped exponential backoff (:data:`MIN_DELAY` doubling up to :data:`MAX_DELAY`), and
reconnects at once when a connection is lost, so that a new QEMU listening on the same
socket is found by itself (with that backoff again from the second connection in a row
that migblockd dropped over a message it could not take).  A connection is up once QEMU
has greeted and answered ``query-qmp-schema`` (what the gate learns of it,
:class:`~migblockd.qemu.info.QemuInfo`);
a greeting that takes :data:`GREETING_NOTICE` seconds is worth a warning, as QEMU serves
one client per monitor, and so is a greeted QEMU that leaves ``qmp_capabilities``, or
then ``query-qmp-schema``, unanswered that long (its main loop is busy or stopped).  It
logs once per change of state (not once per attempt) and tells the caller of each change
through ``on_state``: at info level while QEMU is not there yet, as a warning when
``--qemu`` names something that is not a QMP monitor migblockd can use
(:func:`_misconfigured`), which no QEMU start will mend.

It is apart from :mod:`migblockd.qemu.link`, which holds what is done over a connection
that is up (commands, their errors and QEMU's events, in QEMU's order) and the
adjustments made to ``qemu.qmp``'s client for that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from qemu.qmp import ConnectError, ExecuteError, QMPClient, Runstate
from qemu.qmp.message import DeserializationError
from qemu.qmp.qmp_client import GreetingError

from migblockd.paths import not_a_socket
from migblockd.qemu.garbage import garbage
from migblockd.qemu.info import QemuInfo
from migblockd.qemu.peer_trust import untrusted_listener
from migblockd.qemu.too_long import ReplyTooLong

__all__ = ["ANOTHER_CLIENT", "GREETING_NOTICE", "LOSSES", "MAX_DELAY", "MIN_DELAY",
           "NEGOTIATING", "NOT_ANSWERING", "NOT_GREETED", "READING_SCHEMA",
           "SCHEMA_UNANSWERED", "LinkState", "Reconnecting", "StateHandler"]

log = logging.getLogger("migblockd.qemu")

LinkState = Literal["disconnected", "connected", "closed"]
StateHandler = Callable[[LinkState], None]

MIN_DELAY = 0.1
MAX_DELAY = 5.0
#: Who ended a connection that was up, as ``losses`` counts it: ``closed``, QEMU's
#: end (it exited, was restarted, or closed its monitor's connection; a reset);
#: ``dropped``, migblockd's, over a message it could not take (too long, garbage).
LOSSES = ("closed", "dropped")
#: Past this many drops in a row the wait is MAX_DELAY anyway: counting on would
#: only overflow the float the wait is computed in.
_DROPS_COUNTED = 32
#: QEMU serves one client per monitor socket; a second one is accepted by the kernel but
#: gets no greeting until the first leaves.  Say so if the greeting takes this long.
GREETING_NOTICE = 5.0
#: Why a client waits, until GREETING_NOTICE; then ANOTHER_CLIENT is the guess.
NOT_GREETED = "QEMU accepted the connection but has not greeted yet"
ANOTHER_CLIENT = "QEMU serves one client per monitor: is another one connected?"
#: Why a client waits once QEMU has greeted, until GREETING_NOTICE; then NOT_ANSWERING.
#: QEMU's monitor I/O thread greets (``monitor_qmp_event()``); its main loop runs the
#: commands, qmp_capabilities too (``monitor_qmp_dispatcher_co()``, both in
#: monitor/qmp.c): a QEMU that greets and does not answer is busy, not held.
NEGOTIATING = "QEMU has greeted; migblockd is negotiating (qmp_capabilities)"
NOT_ANSWERING = ("QEMU has greeted but does not answer qmp_capabilities (its main loop is "
                 "busy or stopped)")
#: Why a client waits once QEMU has answered qmp_capabilities, until GREETING_NOTICE;
#: then SCHEMA_UNANSWERED: its main loop answers query-qmp-schema too, and may have
#: stopped (or begun a long command) in between.
READING_SCHEMA = ("QEMU has greeted; migblockd is still reading its commands "
                  "(query-qmp-schema)")
SCHEMA_UNANSWERED = ("QEMU has greeted but does not answer query-qmp-schema (its main loop "
                     "is busy or stopped)")


#: What QEMU's human monitor says first (``monitor/hmp.c``, ``monitor_event()``).
_HMP_BANNER = re.compile(rb"QEMU \S+ monitor - type 'help' for more information")
#: How much of what a listener that is not QEMU's monitor sent first the reason quotes.
_SHOWN = 60


class NotQemu(Exception):
    """A QMP server that greets, but is not QEMU: what it is, and what to do."""


def _misconfigured(exc: BaseException, path: Path | None = None) -> str | None:
    """Why a connection attempt (to ``path``) failed, when ``--qemu`` names something
    that is not a QMP monitor migblockd can use: no QEMU starting or restarting there
    mends that, so it is worth a warning (a QEMU that is not there yet is not).  None
    for any other failure."""
    if isinstance(exc, NotQemu):
        return str(exc)
    if isinstance(exc, ConnectError):
        exc = exc.exc
    if isinstance(exc, (ConnectionRefusedError, PermissionError)) and path is not None:
        # The kernel refuses a path that is not a socket as it refuses a socket that
        # nobody listens on, or with EACCES when the path is not writable
        # (unix_find_bsd(), net/unix/af_unix.c): say which, or --qemu naming a regular
        # file or a directory reads as a QEMU that is down.
        odd = not_a_socket(path)
        if odd is not None:
            return odd
    if isinstance(exc, PermissionError):
        # QEMU creates its socket as its user and umask say: migblockd's user is not
        # allowed to connect, and a new QEMU will not allow it either.
        return exc.strerror or str(exc)
    if isinstance(exc, GreetingError) and isinstance(exc.exc, DeserializationError):
        if exc.exc.raw.rstrip() == b"{":
            # A pretty-printing monitor spreads every message over lines; QMP clients
            # read one message per line.
            return ("QEMU's monitor pretty-prints its JSON (-qmp-pretty, or -mon "
                    "pretty=on), which migblockd cannot read: give migblockd a monitor "
                    "without it")
        if _HMP_BANNER.match(exc.exc.raw):
            return ("this is QEMU's human monitor (HMP: -monitor, or -mon mode=readline), "
                    "not QMP: give migblockd a -qmp monitor")
    if isinstance(exc, GreetingError):
        # Something else listens there (another service's socket, a VM's serial console
        # or agent channel): QEMU's monitor greets with {"QMP": ...} (monitor/qmp.c,
        # qmp_greeting()).
        if isinstance(exc.exc, DeserializationError):
            raw = exc.exc.raw
            shown = repr(raw[:_SHOWN]) + ("..." if len(raw) > _SHOWN else "")
            first = f"its first line, {shown}, is not QEMU's greeting"
        else:
            first = "its first message is JSON, but not QEMU's greeting"
        return (f"what listens there is not a QMP monitor ({first}): give migblockd "
                "the socket of QEMU's -qmp")
    return None


def _reason(exc: BaseException, path: Path | None = None) -> str:
    """Why a connection attempt (to ``path``) failed or a connection ended, for one
    log line."""
    wrong = _misconfigured(exc, path)
    if wrong is not None:
        return wrong
    if isinstance(exc, ConnectError):
        exc = exc.exc
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, EOFError):
        return "QEMU closed the connection"
    if isinstance(exc, ExecuteError):
        return f"query-qmp-schema failed: {exc}"
    # One line: the log's, and the client's error (qemu.qmp's own texts span lines).
    return " ".join((str(exc) or type(exc).__name__).split())


def _nobody_listens(exc: BaseException) -> bool:
    """A connection attempt found no QEMU at the path: no socket file, or one that no
    process listens on (a killed QEMU leaves its socket file behind)."""
    if isinstance(exc, ConnectError):
        exc = exc.exc
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT)


class Reconnecting:
    """A :class:`~migblockd.qemu.link.QemuLink`'s attempts to connect and their outcome."""

    # The link's, set in QemuLink.__init__:
    path: Path
    attempts: int
    _client: QMPClient
    _on_state: StateHandler | None
    _on_gone: Callable[[], None] | None
    _min_delay: float
    _max_delay: float
    _greeting_notice: float
    _state: LinkState
    awaiting_greeting: bool
    dropped: bool
    served: bool
    losses: dict[str, int]
    greeted: bool
    late: bool
    _reason: str
    _logged_reason: str | None
    _info: QemuInfo | None
    silent: str | None
    _tried: asyncio.Event
    #: The process at the other end of the connection (the link's: its client knows).
    _peer_pid: Callable[[], int | None]
    _peer_uid: Callable[[], int | None]

    async def _run(self) -> None:
        delay = self._min_delay
        drops = 0  # connections in a row that migblockd dropped (see below)
        while True:
            try:
                info = await self._connect()
            except Exception as exc:  # every kind of failure means: try again later
                self.attempts += 1
                wrong = _misconfigured(exc, self.path)
                self._set_down(wrong or _reason(exc, self.path), lost=False,
                               misconfigured=wrong is not None)
                if _nobody_listens(exc) and self._on_gone is not None:
                    try:
                        self._on_gone()
                    except Exception:
                        log.exception("internal error handling QEMU's absence")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_delay)
                continue
            delay, self.attempts = self._min_delay, 0
            self._set_up(info)
            # After a loss, try again at once: QEMU may already be back.
            self._set_down(await self._session_end(), lost=True)
            # Not again and again at once, though: a peer that sends, on every
            # connection, what migblockd cannot take (garbage, or a reply too long to
            # read to the link's own question) would have the link reconnect, and warn,
            # in a busy loop.  Until it tries again, that peer counts as there (dropped).
            # A connection that served (QEMU's messages taken once it was up) starts
            # the count over: QEMU sends nothing migblockd cannot take as a rule, and
            # one drop after hours of service is the first, not one more in a row.
            in_row = 1 if self.served else min(drops + 1, _DROPS_COUNTED)
            drops = in_row if self.dropped else 0
            if drops > 1:
                wait = min(self._min_delay * 2 ** (drops - 2), self._max_delay)
                log.info("QEMU at %s: %d connections in a row dropped over messages "
                         "migblockd could not take; trying again in %g s", self.path,
                         drops, wait)
                await asyncio.sleep(wait)

    async def _connect(self) -> QemuInfo:
        loop = asyncio.get_running_loop()
        self.late = False
        notice = loop.call_later(self._greeting_notice, self._greeting_late)
        try:
            await self._client.connect(str(self.path))
            notice.cancel()
            impostor = untrusted_listener(self.path, self._peer_uid())
            if impostor is not None:  # before anything but qmp_capabilities is sent
                raise NotQemu(impostor)
            # Up in a moment (QEMU's schema is some 200 kB): not silent, not held; unless
            # QEMU stopped since it answered qmp_capabilities, which the notice says.
            self._reason = READING_SCHEMA
            notice = loop.call_later(self._greeting_notice, self._schema_late)
            greeting = self._client.greeting
            version = greeting.QMP.version if greeting is not None else {}
            package = version.get("package")
            if isinstance(package, str) and package.startswith("migblockd "):
                # Another migblockd (its greeting's package, commands.py): it has no
                # query-status, and its migrate is a simulation or another gate's.
                raise NotQemu(f"that is a migblockd's socket ({package}), not QEMU's "
                              "monitor: give migblockd the socket of QEMU's -qmp")
            schema = await self._client.execute("query-qmp-schema")
            info = QemuInfo.from_schema(version, schema)
            return dataclasses.replace(info, pid=self._peer_pid())
        except Exception:
            # A failed connect() has already reset the client; anything later has not.
            if self._client.runstate != Runstate.IDLE:
                await self._disconnect_quietly()
            raise
        finally:
            notice.cancel()

    async def _session_end(self) -> str:
        """Wait until the connection ends; why it ended."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        try:
            await self._disconnect()
        except Exception as exc:  # the reader's or writer's failure, re-raised
            # migblockd's own doing (a message too long to read, or one it could not
            # take): whoever sent it runs on, and counts as there until tried again.
            not_taken = garbage(exc)
            self.dropped = not_taken is not None or isinstance(exc, ReplyTooLong)
            return not_taken or _reason(exc)
        return "the connection ended"

    async def _disconnect_quietly(self) -> None:
        try:
            await self._disconnect()
        except Exception as exc:  # the failure that ended the session: nothing left to do
            log.debug("QEMU %s: disconnected: %s", self.path, _reason(exc))

    async def _disconnect(self) -> None:
        """The library's ``disconnect()``, taken to its end even when the caller is
        cancelled meanwhile (``close()`` cancels the link's task): it gathers its
        reader's and writer's failures, and a gathering left unawaited is reported
        by asyncio as an error never retrieved, traceback and all (a QEMU that closes
        the connection as migblockd stops).  A cancellation is raised once it is done."""
        ending = asyncio.ensure_future(self._client.disconnect())
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError:
            await asyncio.wait({ending})
            if not ending.cancelled():
                ending.exception()  # retrieved: the caller is gone, nothing to do with it
            raise


    def _late_changed(self) -> None:
        """The set-up became late (``late``), or a late one failed: what the status
        shows changed."""

    def _greeting_late(self) -> None:
        self.late = True
        self._late_changed()
        if self.greeted:
            self._reason = NOT_ANSWERING
            log.warning("QEMU at %s greeted but has not answered qmp_capabilities after %g s "
                        "(its main loop is busy or stopped); still waiting", self.path,
                        self._greeting_notice)
            return
        if self.awaiting_greeting:
            self._reason = f"{NOT_GREETED} ({ANOTHER_CLIENT})"
        log.warning("QEMU at %s accepted the connection but has not greeted after %g s "
                    "(%s); still waiting", self.path, self._greeting_notice, ANOTHER_CLIENT)

    def _schema_late(self) -> None:
        self.late = True
        self._late_changed()
        self._reason = SCHEMA_UNANSWERED
        log.warning("QEMU at %s has not answered query-qmp-schema after %g s (its main loop "
                    "is busy or stopped); still waiting", self.path, self._greeting_notice)

    def _set_up(self, info: QemuInfo) -> None:
        self._state, self._info, self._reason = "connected", info, "connected"
        self.awaiting_greeting = self.dropped = self.greeted = self.late = False
        self.served = False
        self._logged_reason = None
        # A command the last connection left unanswered says nothing of this one
        # (a new QEMU, often): its first timeout is a warning, its answers no return.
        self.silent = None
        self._tried.set()
        log.info("connected to QEMU %s at %s", info.version_string, self.path)
        self._notify_state()

    def _set_down(self, reason: str, *, lost: bool, misconfigured: bool = False) -> None:
        changed = self._state != "disconnected"
        # A set-up that went late (QEMU there and silent) and then failed ends in the
        # state it began in: no change of state, but what the status shows changed.
        was_late = self.awaiting_greeting and self.late
        self._state, self._info, self._reason = "disconnected", None, reason
        self.awaiting_greeting = self.greeted = self.late = False
        if not lost:  # an attempt's outcome: whatever it found, QEMU was tried again
            self.dropped = False
        if lost:
            self.losses["dropped" if self.dropped else "closed"] += 1
            log.warning("lost the connection to QEMU at %s: %s; reconnecting", self.path, reason)
        elif reason != self._logged_reason:
            # A --qemu that cannot work must show at --log-level warning (and in
            # journalctl -p warning): migrate never reaches QEMU meanwhile.
            log.log(logging.WARNING if misconfigured else logging.INFO,
                    "QEMU at %s is not available: %s; retrying", self.path, reason)
        self._logged_reason = reason
        self._tried.set()
        if changed:
            self._notify_state()
        elif was_late:
            self._late_changed()

    def _notify_state(self) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(self._state)
        except Exception:
            log.exception("internal error handling the QEMU link's state %r", self._state)

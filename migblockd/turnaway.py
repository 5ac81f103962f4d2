"""The clients waiting on the socket systemd passed, when the start is refused for good.

A client that connects to the socket unit's socket before the daemon runs waits
in its backlog, and its connection is what makes systemd start the service.  When
the start fails, systemd puts the socket unit back to listening
(``socket_trigger_notify()`` in systemd's src/core/socket.c, for a service that is
dead or failed), finds the same connection still waiting, and starts the service
again at once.  For a start that fails alike every time (a mistake in the file:
exit status 6, which the units' ``RestartPreventExitStatus=`` keeps
``Restart=on-failure`` from retrying) that was 5 starts within the minute; then
the service hit its start limit, and systemd stopped the socket unit with it
(``service-start-limit-hit``) and removed the socket: every later client was
refused, and mending the file was not enough.

So a start refused with a status the units do not restart first takes each
connection waiting on the passed socket, sends it one QMP error line saying that
the daemon cannot start until an operator acts, and closes it.  Nothing is left
to start the service again: the socket unit listens on, ``systemctl status``
shows the failed start's status and the journal why, and once the file is
mended the next client starts the daemon.  A start that a later one may get
past (exit status 1) leaves its clients waiting: ``Restart=on-failure`` starts
the daemon again, and the start that succeeds serves them.

Not the socket unit's ``FlushPending=yes``: it drops the waiting connections each
time the socket unit listens again, after a crash that ``Restart=`` cures too,
whose clients the restarted daemon would serve; and it closes them without a
word.  Nor a ``TriggerLimitBurst=``: it only makes the socket unit fail sooner.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from typing import TYPE_CHECKING, Final

from migblockd.paths import LOG_SAYS
from migblockd.startup import EXIT_STATUSES

if TYPE_CHECKING:
    from migblockd.systemd import Activation

__all__ = ["LIMIT", "TURNED_AWAY", "Passed", "turn_away", "turns_away"]

#: What each client turned away reads instead of the greeting.
TURNED_AWAY: Final = ("migblockd cannot start until an operator mends its settings or "
                      f"state; {LOG_SAYS}")
#: The most connections taken: clients that connect again as soon as they are
#: closed would otherwise keep the exit waiting for ever (those left make systemd
#: start the daemon once more, which turns them away in turn).
LIMIT: Final = 4096
#: The bytes read from a client before its close, at most: a close with unread
#: input may reset the connection before the client reads the line.
_UNREAD: Final = 65536


def turns_away(status: int) -> bool:
    """Whether a start refused with exit ``status`` turns its waiting clients away:
    one the units do not restart (``RestartPreventExitStatus=``)."""
    return any(s.code == status and s.code != 0 and not s.restarted for s in EXIT_STATUSES)


class Passed:
    """The socket systemd passed, read once (``migblockd.systemd.Activation``): when
    the start asks for it, or when a refused start turns its clients away."""

    def __init__(self) -> None:
        self._activation: Activation | None = None
        #: Set for ``--check-config`` and ``--reload``: a check leaves every client
        #: alone, whatever it finds, were it passed a socket (``--reload`` runs while
        #: the daemon serves).
        self.checking = False

    def activation(self) -> Activation:
        """The start's: read before the log and the event loop open descriptors of
        their own, which a ``$LISTEN_FDS`` counting more than were passed would
        take for passed ones."""
        if self._activation is None:
            from migblockd.systemd import Activation  # noqa: PLC0415 - keeps --help fast

            self._activation = Activation()
        return self._activation

    def turn_away(self) -> None:
        """:func:`turn_away` on the passed sockets, if any, said on stderr:
        the log has closed by now, after the line that says why the start failed."""
        if self.checking:
            return
        count = 0
        # Each socket clients wait on, also when the start refused to serve them (a
        # drop-in that adds a ListenStream=): their clients would start it again too.
        for listener in self.activation().waiting():
            count += turn_away(listener, LIMIT - count)
        if count:
            from migblockd.logs.journal import for_stderr  # noqa: PLC0415

            print(for_stderr(logging.WARNING, [
                f"turned away {count} {'client' if count == 1 else 'clients'} waiting on "
                f"the socket systemd passed: {TURNED_AWAY}"]), file=sys.stderr, flush=True)


def turn_away(listener: socket.socket, limit: int = LIMIT) -> int:
    """Take each connection waiting on ``listener``, ``limit`` at most, send it
    :data:`TURNED_AWAY` and close it; the number turned away.  Waits for nothing:
    the listener is made non-blocking, and a client that does not read its line
    loses it."""
    from migblockd.qmp.encoding import encode_error  # noqa: PLC0415 - keeps --help fast
    from migblockd.qmp.errors import NO_ID, QMPError  # noqa: PLC0415

    if listener.fileno() == -1:  # closed on the way out of a start that went further
        return 0
    line = encode_error(QMPError(TURNED_AWAY), NO_ID)
    listener.setblocking(False)
    count = 0
    while count < limit:
        try:
            conn, _ = listener.accept()
        except OSError:  # none waiting (EAGAIN), or none can be taken (EMFILE)
            break
        count += 1
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            _discard_input(conn)
            conn.send(line)
            conn.shutdown(socket.SHUT_WR)
    return count


def _discard_input(conn: socket.socket) -> None:
    """Read what ``conn`` has sent so far (its ``qmp_capabilities``, say)."""
    left = _UNREAD
    while left > 0:
        try:
            data = conn.recv(min(left, 4096))
        except BlockingIOError:
            return
        if not data:
            return
        left -= len(data)

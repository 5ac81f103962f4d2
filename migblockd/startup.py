"""The exceptions that end the daemon's start with a line for its log, the line of
a stop that ends it, and the exit statuses of a start that fails.

The statuses are LSB's, by systemd's names for them (systemd.exec(5), "Process Exit
Codes"; ``systemd-analyze exit-status``): ``systemctl status`` shows the number
(``code=exited, status=6``), and the units' ``RestartPreventExitStatus=`` lists
those that no restart can cure, so that ``Restart=on-failure`` does not start a
daemon again, five times in a minute, into the same mistake.
"""

from __future__ import annotations

import errno
from typing import Final, NamedTuple

__all__ = ["EXIT_FAILURE", "EXIT_INVALIDARGUMENT", "EXIT_NOTCONFIGURED", "EXIT_STATUSES",
           "STOPPED_STARTING", "ExitStatus", "NotConfigured", "StartupError",
           "StoppedStarting", "passing", "status_of"]

#: Logged for a SIGTERM or SIGINT that came before the daemon served anyone.
STOPPED_STARTING = "received %s while starting: stopping before serving"


class ExitStatus(NamedTuple):
    """One exit status of the daemon: its number, systemd's name for it, when the
    daemon exits with it, and whether the units' ``Restart=on-failure`` starts it
    again (not for what no restart cures: their ``RestartPreventExitStatus=``)."""

    code: int
    name: str
    meaning: str
    restarted: bool


#: Something a later start may not meet: another daemon still holding the socket
#: or the state directory (it is stopping), the disk (I/O, full), another
#: program's lock on the database, the user or group database not answering.
EXIT_FAILURE: Final = 1
#: A bad command line (argparse's own status).
EXIT_INVALIDARGUMENT: Final = 2
#: What only an operator mends: the --config file (its syntax, a value, who may
#: write it), the schema, a setting that cannot work (a group that does not exist,
#: a socket path too long or in a directory others may change, the sockets systemd
#: passed), or a state directory or database the daemon may not use as it is
#: (corrupt, no database, a newer migblockd's, others may write it).
EXIT_NOTCONFIGURED: Final = 6

#: The statuses, in one place: the --help epilog and the tests (the units'
#: RestartPreventExitStatus=, docs/service.md's table) read them.
EXIT_STATUSES: Final = (
    ExitStatus(0, "SUCCESS", "stopped (SIGTERM or SIGINT), also while starting", False),
    ExitStatus(EXIT_FAILURE, "FAILURE", "a start that a later one may get past: "
               "the socket or state directory held by another migblockd, the disk, "
               "another program's lock on the database, a look-up that did not answer",
               True),
    ExitStatus(EXIT_INVALIDARGUMENT, "INVALIDARGUMENT", "a bad command line", False),
    ExitStatus(EXIT_NOTCONFIGURED, "NOTCONFIGURED", "a start that none would get past "
               "until an operator acts: a mistake in the --config file or the schema, "
               "a setting that cannot work, a state database the daemon may not use as "
               "it is", False),
)


#: What the kernel says of a resource that may come free, or a device that may
#: answer, by the next start: any other failure of a system call (a permission, a
#: read-only file system, a path that leads nowhere) an operator has to mend.
_PASSING: Final = frozenset({
    errno.EAGAIN, errno.EINTR, errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM,
    errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ETIMEDOUT, errno.EBUSY,
    errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.ENOLCK, errno.ESTALE,
})


def passing(code: int | None) -> bool:
    """Whether a system call's failure with errno ``code`` may not meet a later
    start (None: unknown, which is left to one)."""
    return code is None or code in _PASSING


def status_of(code: int | None) -> int:
    """The exit status of a start refused for a system call that failed with ``code``."""
    return EXIT_FAILURE if passing(code) else EXIT_NOTCONFIGURED


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one-line reason for the log and
    ``status`` the exit status (:data:`EXIT_FAILURE` unless it says otherwise: a
    failure not known to need an operator is left to a restart)."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status

    def reworded(self, message: str) -> StartupError:
        """The same refusal said as ``message`` (a setting's name and line added)."""
        return StartupError(message, self.status)


class NotConfigured(StartupError):
    """A start refused for what only an operator mends (:data:`EXIT_NOTCONFIGURED`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_NOTCONFIGURED)


class StoppedStarting(Exception):
    """A SIGTERM or SIGINT came while a step of the start waited (a look-up that
    does not answer): the start ends there, serving nobody, and the exit is a
    clean one.  ``str()`` is the signal's name."""

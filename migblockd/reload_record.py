"""What the daemon says of its reloads to ``migblockd --reload``, which waits for them.

systemd 252 ends a reload job as soon as the last ``ExecReload=`` command exits:
after a bare ``kill -HUP``, ``systemctl reload && migblock-shell ...`` raced the
reload.  ``Type=notify-reload`` (systemd 253) closes that gap by sending the
signal itself and waiting for ``RELOADING=1`` with a ``MONOTONIC_USEC=`` no
earlier than the signal, then ``READY=1``.  ``migblockd --reload PID`` (the
units' ``ExecReload=``, :mod:`migblockd.reloader`) does the same, and needs to
read what systemd would: when a reload began reading the file, and how it ended.
It cannot read ``$NOTIFY_SOCKET`` (systemd's), so the daemon keeps it here too.

The record is a memfd the daemon holds open, found and opened through
``/proc/PID/fd``: the kernel lets only the daemon's own user and root open it
(the ptrace read check ``/proc/PID/environ`` has, which the reload's check reads
already), and it shows under ``ProtectProc=invisible`` and ``ProcSubset=pid``,
which hide only other users' processes.  It has no path: nobody can put a file
in its place, and it is there with ``--ephemeral`` (no state directory), under
``PrivateTmp=`` and without it, by hand or under systemd alike.

It holds one line of JSON: the reload that began the latest of those that have
ended (``started`` is its ``MONOTONIC_USEC``), whether the file it refused is
one only an operator mends (``--reload`` then exits 6, as its check does for a
bad file), and whether the daemon is stopping.  A reload that ends after a later
one began and ended (one held by its file system; it applies nothing,
:mod:`migblockd.reload_order`) changes nothing here, so a reload the waiter's
signal started is never hidden by an earlier one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["MEMFD_NAME", "Refused", "Said", "ended", "open_record", "parse", "stopping"]

log = logging.getLogger("migblockd")

#: The memfd's name, as ``readlink /proc/PID/fd/N`` shows it (``/memfd:NAME (deleted)``).
MEMFD_NAME = "migblockd-reloads"
#: The most of a reload's line kept: one page, which a reader sees whole or not at all.
_MOST_SAID = 2048


@dataclass(frozen=True)
class Said:
    """The record as read: the latest reload to have ended, if any, and the stop."""

    #: ``MONOTONIC_USEC`` of that reload's start (when it began reading the file).
    started: int | None = None
    applied: bool = False
    #: Its line: ``reloaded configuration: ...`` or why it failed.
    line: str = ""
    stopping: bool = False
    #: Not applied for what the file says, or who may read or write it (not an I/O
    #: error, nor a user database that did not answer): an operator mends it.
    mend: bool = False


class Refused(NamedTuple):
    """A reload that read the file and applied none of it: why (its log line), and
    whether only an operator mends that (``Said.mend``)."""

    line: str
    mend: bool = False


#: The process's record (one per daemon); None until :func:`open_record`, or if it
#: could not be made.
_fd: int | None = None
_said = Said()


def open_record() -> None:
    """Make the record, empty of reloads.  Before the daemon could take a SIGHUP for
    a reload (its signals are already caught then): a ``--reload`` signals only a
    process that has one.  A memfd that cannot be made is said, and the daemon runs
    on without it (``--reload`` then says that it cannot wait for it)."""
    global _fd  # noqa: PLW0603 - one record per process, as pidlock's locks
    try:
        _fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    except OSError as exc:
        log.warning("cannot keep a record of reloads for migblockd --reload (memfd_create: "
                    "%s): systemctl reload will fail", exc.strerror)
        return
    _write(_said)


def ended(started: int, *, applied: bool, line: str, mend: bool = False) -> None:
    """Reload begun at ``started`` (``MONOTONIC_USEC``) has ended, applied or not,
    ``line`` saying how (``mend``: see :class:`Said`); kept unless a reload begun
    later has ended already."""
    global _said  # noqa: PLW0603
    if _said.started is not None and _said.started > started:
        return
    _said = Said(started, applied, line[:_MOST_SAID], _said.stopping, mend)
    _write(_said)


def stopping() -> None:
    """The daemon is stopping: no reload begun from now on is carried out."""
    global _said  # noqa: PLW0603
    if not _said.stopping:
        _said = Said(_said.started, _said.applied, _said.line, stopping=True,
                     mend=_said.mend)
        _write(_said)


def _write(said: Said) -> None:
    if _fd is None:
        return
    text = json.dumps({"started": said.started, "applied": said.applied,
                       "line": said.line, "stopping": said.stopping,
                       "mend": said.mend}) + "\n"
    # Emptied, then written from the start: a reader sees the file empty (and reads
    # again) or whole, since the file's size grows only once the bytes are there.
    with contextlib.suppress(OSError):
        os.ftruncate(_fd, 0)
        os.pwrite(_fd, text.encode("utf-8", "backslashreplace"), 0)


def parse(data: bytes) -> Said | None:
    """The record from what a read of it gave; None for no whole record (read it again)."""
    if not data.endswith(b"\n"):
        return None
    try:
        fields = json.loads(data)
        started = fields["started"]
        return Said(started=None if started is None else int(started),
                    applied=bool(fields["applied"]), line=str(fields["line"]),
                    stopping=bool(fields["stopping"]), mend=bool(fields.get("mend")))
    except (ValueError, TypeError, KeyError):
        return None

"""Whether the daemon a reload's check is for started with the options the check reads.

The units declare the daemon's command line once, as ``MIGBLOCKD_OPTIONS``;
``systemctl reload`` runs ``migblockd --reload $MAINPID --socket-activated
$MIGBLOCKD_OPTIONS`` (ExecReload=) with the unit's environment as it is *now*,
which checks the settings, then sends the SIGHUP (``--check-config --running-pid
PID`` checks alone).  The daemon keeps the command
line it started with: a SIGHUP re-reads only the file that one names.  So after
a drop-in changed ``MIGBLOCKD_OPTIONS`` and a daemon-reload, the check would
judge a file the daemon never reads, pass, and the reload would apply none of
the change (or fail, on the old file, in the daemon's log only).  The check
therefore compares its ``MIGBLOCKD_OPTIONS`` with the daemon's and refuses a
difference, saying that a restart applies new options.

The daemon's is read from ``/proc/PID/environ``: the environment the process
was started with (what the daemon later changes in ``os.environ`` is not
written back there), readable by the process's own user, as ExecReload= runs the
check, and by root; ``ProtectProc=invisible`` and ``ProcSubset=pid`` still show
it.  A check that cannot read it fails: a reload check that cannot check must
not pass in silence.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

#: The units' declaration of the daemon's options.
OPTIONS = "MIGBLOCKD_OPTIONS"


class Unknown(Exception):
    """The daemon's options cannot be read; ``str()`` says why, in one line."""


def started_with(pid: int, option: str = "--running-pid") -> str | None:
    """The ``MIGBLOCKD_OPTIONS`` process ``pid`` was started with (None: without it);
    ``option``, which gave ``pid``, leads the errors."""
    path = f"/proc/{pid}/environ"
    try:
        with open(path, "rb") as f:
            environ = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise Unknown(f"{option} {pid}: there is no process {pid} (has the daemon "
                      "exited?)") from None
    except OSError as exc:
        uid = os.geteuid()
        # Root too may be refused (a process of another user namespace, ptrace rules).
        also = "" if uid == 0 else " or as root"
        raise Unknown(f"{option} {pid}: cannot read {path} as uid {uid}: "
                      f"{exc.strerror}; run the check as the daemon's user (as ExecReload= "
                      f"does){also}") from None
    if not environ:
        # A zombie's, or a kernel thread's: nothing to compare with.
        raise Unknown(f"{option} {pid}: process {pid} shows no environment (has the "
                      "daemon exited?)")
    prefix = os.fsencode(OPTIONS) + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return os.fsdecode(entry[len(prefix):])
    return None


def words(value: str) -> list[str]:
    """The arguments systemd makes of ``$MIGBLOCKD_OPTIONS`` alone in a word: the value
    split at whitespace, quotes removed.  Two values with the same words are the same
    command line, however spaced."""
    try:
        return shlex.split(value)
    except ValueError:  # an unbalanced quote, which systemd takes as it stands
        return value.split()


def refusal(pid: int, env: Mapping[str, str] = os.environ,
            option: str = "--running-pid") -> str | None:
    """Why a reload of the daemon ``pid`` would not apply the options in ``env``,
    in one line, or None when it started with them.  Raises :class:`Unknown`."""
    theirs = started_with(pid, option)
    ours = env.get(OPTIONS)
    if (words(theirs) == words(ours) if theirs is not None and ours is not None
            else theirs is None and ours is None):
        return None
    now = f"{OPTIONS} is '{ours}' now" if ours is not None else f"{OPTIONS} is not set now"
    then = (f"started with '{theirs}'" if theirs is not None else f"started without {OPTIONS}")
    return (f"{now}, but the daemon (pid {pid}) {then}: a reload keeps the options the "
            "daemon started with, and re-reads only the file they name; a restart of its "
            "unit (systemctl restart) applies the new ones")

"""``migblockd --reload PID``: send the daemon SIGHUP and wait until it has reloaded.

The units' ``ExecReload=`` runs it, once the settings passed the reload's check
(:mod:`migblockd.running`, :mod:`migblockd.preflight`), so that ``systemctl
reload`` returns when the daemon has applied the file, and fails when it
refused it, as ``Type=notify-reload`` (systemd 253) would have systemd itself
wait.  What the daemon says of its reloads is in :mod:`migblockd.reload_record`.

A reload is this signal's when it began reading the file at or after the moment
just before the signal was sent (``MONOTONIC_USEC``, as systemd compares): one
under way when the signal came is not it, and one the signal joined
(:mod:`migblockd.reload_order`: it reads after every signal that came while it
waited) is.  The daemon is signalled only once it has its record: a process that
has none has not yet caught SIGHUP (the interpreter's own start, whose default
action would end it) or is no migblockd; one that has run for longer than the wait
and has none never will, and is refused at once.  The daemon's exit (a pidfd, so that
the pid is never another process's by the time it is signalled) and its stop
end the wait, said; ``WAIT`` seconds bound it, below the 90 s that systemd's
``TimeoutStartSec=`` gives ``ExecReload=`` by default, so that the line saying
why is ours, not systemd's ``Reload operation timed out``.
"""

from __future__ import annotations

import os
import select
import signal
import time

from migblockd.reload_record import MEMFD_NAME, parse
from migblockd.startup import EXIT_FAILURE, EXIT_NOTCONFIGURED

__all__ = ["WAIT", "Failed", "reload", "watch"]

#: Seconds the wait for the record and then for the reload may take together.
WAIT = 60.0
#: Seconds between two reads of the record while waiting.
_POLL = 0.02


class Failed(Exception):
    """The reload failed, or was not seen to end; ``str()`` says why, in one line, and
    ``status`` is the exit status: :data:`EXIT_NOTCONFIGURED` for a file the daemon
    refused that only an operator mends (as the check's for a bad file), else
    :data:`EXIT_FAILURE`."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def watch(pid: int) -> int:
    """A pidfd of ``pid``, taken before the check reads its options: the process
    checked is the one signalled, or none if it exits meanwhile."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise Failed(f"--reload {pid}: there is no process {pid} (has the daemon "
                     "exited?): nothing was reloaded") from None
    except OSError as exc:
        raise Failed(f"--reload {pid}: cannot watch process {pid}: {exc.strerror}") from None


def reload(pid: int, pidfd: int, wait: float = WAIT) -> str:
    """Signal ``pid`` (its :func:`watch`, closed here) and wait for its reload: the
    daemon's line for one applied; raises :class:`Failed` for one refused, a daemon
    that stopped, or none seen."""
    deadline = time.monotonic() + wait
    try:
        record = _record(pid, pidfd, deadline, wait)
        try:
            # Taken before the signal, as systemd takes it for Type=notify-reload.
            sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            signal.pidfd_send_signal(pidfd, signal.SIGHUP)
        except ProcessLookupError:
            raise Failed(f"the daemon (pid {pid}) exited before it was signalled: "
                         "nothing was reloaded") from None
        return _outcome(pid, pidfd, record, sent, deadline, wait)
    finally:
        os.close(pidfd)


def _record(pid: int, pidfd: int, deadline: float, wait: float) -> int:
    """The daemon's record, opened, once it has one."""
    judged = False
    while True:
        fd = _find(pid)
        if fd is not None:
            return fd
        if not judged:
            judged = True
            # A daemon opens its record as it begins to start, well within the wait: a
            # process that has run longer and has none never will (no migblockd, or one
            # running still from before an upgrade), and is not waited for in vain.
            age = _age(pid)
            if age is not None and age >= wait:
                raise Failed(f"process {pid} keeps no record of reloads, and has run for "
                             f"{age:.0f} s, longer than a migblockd takes to begin to keep "
                             f"one ({wait:g} s): it is no migblockd, or one older than this "
                             "one (a restart runs the new one), so it was not sent SIGHUP")
        if _exited(pidfd, deadline):
            raise Failed(f"the daemon (pid {pid}) exited before it was signalled: "
                         "nothing was reloaded")
        if time.monotonic() >= deadline:
            raise Failed(f"process {pid} keeps no record of reloads after {wait:g} s: it "
                         "is not a migblockd that has begun to start (or one older than "
                         "this one), so it was not sent SIGHUP")


def _age(pid: int) -> float | None:
    """Seconds since process ``pid`` started (None: not known): its start time in
    ``/proc/PID/stat`` (field 22, clock ticks since boot) against CLOCK_BOOTTIME."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # After the name, which may hold spaces and parentheses: field 3 on.
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


def _find(pid: int) -> int | None:
    """The record among ``pid``'s descriptors, opened for reading (None: none yet)."""
    where = f"/proc/{pid}/fd"
    try:
        names = os.listdir(where)
    except FileNotFoundError:
        return None  # gone: the pidfd says so
    except OSError as exc:
        uid = os.geteuid()
        raise Failed(f"cannot read {where} as uid {uid}: {exc.strerror}; run this as the "
                     "daemon's user (as ExecReload= does) or as root") from None
    for name in names:
        try:
            if os.readlink(f"{where}/{name}").startswith(f"/memfd:{MEMFD_NAME} "):
                return os.open(f"{where}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # closed meanwhile
    return None


def _outcome(pid: int, pidfd: int, record: int, sent: int, deadline: float,
             wait: float) -> str:
    try:
        while True:
            said = parse(os.pread(record, 1 << 16, 0))
            if said is not None and said.started is not None and said.started >= sent:
                if said.applied:
                    return f"migblockd: pid {pid}: {said.line}"
                raise Failed(f"the daemon (pid {pid}) did not apply the file: {said.line}",
                             EXIT_NOTCONFIGURED if said.mend else EXIT_FAILURE)
            if said is not None and said.stopping:
                raise Failed(f"the daemon (pid {pid}) is stopping: the reload is not "
                             "carried out")
            if _exited(pidfd, deadline):
                raise Failed(f"the daemon (pid {pid}) exited before it had reloaded")
            if time.monotonic() >= deadline:
                raise Failed(f"the daemon (pid {pid}) has not reloaded within {wait:g} s "
                             "of the signal (a start still under way, or a file system or "
                             "user database that does not answer?): it may still apply "
                             "the file, which its log says")
    finally:
        os.close(record)


def _exited(pidfd: int, deadline: float) -> bool:
    """Whether the process has exited, waiting ``_POLL`` seconds at most to see."""
    left = max(0.0, min(_POLL, deadline - time.monotonic()))
    readable, _, _ = select.select([pidfd], [], [], left)
    return bool(readable)

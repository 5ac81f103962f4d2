"""systemd's socket activation: the listening socket the service manager passes.

A no-op when the daemon does not run under systemd (or
``systemd-socket-activate``): without ``$LISTEN_PID``/``$LISTEN_FDS``
:func:`listen_sockets` returns ``[]``.  sd_notify and the watchdog are
:mod:`migblockd.notify`'s.

The protocol is implemented from its stable specification (sd_listen_fds(3))
rather than by linking libsystemd, so that the daemon has no native dependency.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
from collections.abc import Mapping

__all__ = [
    "SD_LISTEN_FDS_START",
    "Activation",
    "ActivationError",
    "activated_listener",
    "listen_sockets",
]

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The socket-activation environment is malformed or unusable."""


# --- socket activation -------------------------------------------------------


def listen_sockets(
    env: Mapping[str, str] = os.environ, *, unset_env: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets passed by the service manager, as ``(name, socket)`` pairs.

    sd_listen_fds_with_names(3) semantics: only when ``$LISTEN_PID`` is this
    process; descriptors start at 3; names come from ``$LISTEN_FDNAMES``
    ("unknown" when absent); every descriptor gets FD_CLOEXEC.  Returns ``[]``
    when the process was not socket-activated.  With ``unset_env`` the
    ``LISTEN_*`` variables are removed from ``os.environ`` (whatever the outcome)
    so that no child process mistakes the descriptors for its own.

    Raises :class:`ActivationError` when the variables are malformed or a
    descriptor is not a socket.
    """
    try:
        return _listen_sockets(env)
    finally:
        if unset_env:
            for name in _LISTEN_VARIABLES:
                os.environ.pop(name, None)


#: The largest ``int`` in C: sd_listen_fds(3) refuses a ``$LISTEN_FDS`` whose last
#: descriptor would be past it, and a ``$LISTEN_PID`` is a ``pid_t``.
_INT_MAX = 2**31 - 1


def _env_int(env: Mapping[str, str], name: str, minimum: int,
             maximum: int = _INT_MAX) -> int | None:
    """``$name`` as an integer from ``minimum`` to ``maximum``; None when it is unset.

    ASCII digits only, as libsystemd's ``safe_atoi`` reads them, less the signs and
    blanks it lets ``strtol`` skip: ``int()`` would also take ``" 1_0"`` as 10, and
    any Unicode digit.
    """
    raw = env.get(name)
    if raw is None:
        return None
    # The length first: int() of a long enough string of digits is slow, or refused.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(maximum)):
        raise ActivationError(f"malformed {name}={raw!r}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise ActivationError(f"malformed {name}={raw!r}")
    return value


def _listen_sockets(env: Mapping[str, str]) -> list[tuple[str, socket.socket]]:
    pid = _env_int(env, "LISTEN_PID", 1)
    if pid is None:
        return []
    if pid != os.getpid():
        # Inherited from a parent that was activated; not ours.
        return []
    count = _env_int(env, "LISTEN_FDS", 0, _INT_MAX - SD_LISTEN_FDS_START)
    if not count:
        return []
    # Before anything is made per descriptor: a count no process could have been
    # passed (99999999999 asked for 800 MB of names first, then failed).
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit != resource.RLIM_INFINITY and SD_LISTEN_FDS_START + count > limit:
        raise ActivationError(
            f"LISTEN_FDS={count} counts descriptors {SD_LISTEN_FDS_START} to"
            f" {SD_LISTEN_FDS_START + count - 1}, past this process's limit of {limit}"
            " (RLIMIT_NOFILE): more than were passed"
        )
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd in fds:
        try:
            os.set_inheritable(fd, False)  # FD_CLOEXEC
        except OSError as exc:
            # Most likely LISTEN_FDS counts more descriptors than were passed.
            raise ActivationError(
                f"LISTEN_FDS={count}, but descriptor {fd} was not passed: {exc.strerror}"
            ) from None
    raw_names = env.get("LISTEN_FDNAMES")
    if raw_names is None:
        names = ["unknown"] * count
    else:
        names = raw_names.split(":")
        if len(names) != count:
            raise ActivationError(
                f"LISTEN_FDNAMES={raw_names!r} names {len(names)} descriptors,"
                f" LISTEN_FDS={count}"
            )
    result: list[tuple[str, socket.socket]] = []
    for name, fd in zip(names, fds, strict=True):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            for _, done in result:
                done.detach()
            raise ActivationError(f"passed descriptor {fd} ({name}): {exc.strerror}") from None
        result.append((name, sock))
    return result


def activated_listener(
    env: Mapping[str, str] = os.environ, *, unset_env: bool = True
) -> socket.socket | None:
    """The one listening AF_UNIX stream socket the daemon was activated with, or None.

    The daemon serves exactly one socket; anything else (several sockets, a
    datagram or TCP socket, a socket that is not listening, i.e. ``Accept=yes``)
    is a configuration mistake reported as :class:`ActivationError`.
    """
    passed = listen_sockets(env, unset_env=unset_env)
    try:
        return _the_one(passed)
    except ActivationError:
        for _, sock in passed:
            sock.close()
        raise


def _the_one(passed: list[tuple[str, socket.socket]]) -> socket.socket | None:
    """The one socket of ``passed`` the daemon serves; raises, closing none."""
    if not passed:
        return None
    if len(passed) != 1:
        names = ", ".join(name for name, _ in passed)
        # ListenStream= and the like are lists: a drop-in's line without an empty one
        # before it is added to the unit's, and the unit listens on both.
        raise ActivationError(
            f"expected one socket, was passed {len(passed)} ({names}): the daemon serves "
            "one, so its socket unit must listen on one (a drop-in that changes its "
            "ListenStream= starts with an empty ListenStream=, which resets the list)")
    name, sock = passed[0]
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        what = f"{sock.family.name} {sock.type.name}{'' if listening else ', not listening'}"
        raise ActivationError(
            f"passed socket {name!r} is {what}; need a listening AF_UNIX SOCK_STREAM socket"
        )
    return sock


class Activation:
    """:func:`activated_listener`, read when this is made: as the process starts,
    before the daemon opens descriptors of its own (the event loop's, the log's).

    A ``$LISTEN_FDS`` that counts more descriptors than were passed then finds the
    first one missing, where read later it would find one of the daemon's and blame
    it (``passed descriptor 4 (unknown): Socket operation on non-socket``).  What it
    finds wrong is kept for :meth:`listener` to raise, once the log is set up.
    """

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self._error: ActivationError | None = None
        self._sock: socket.socket | None = None
        self._passed: list[socket.socket] = []
        try:
            passed = listen_sockets(env)
            self._passed = [sock for _, sock in passed]
            self._sock = _the_one(passed)
        except ActivationError as exc:
            self._error = exc

    def listener(self) -> socket.socket | None:
        """The passed listening socket, None when none was; raises the
        :class:`ActivationError` found."""
        if self._error is not None:
            raise self._error
        return self._sock

    def waiting(self) -> list[socket.socket]:
        """The passed sockets clients wait on to be accepted, the one served or not:
        a start refused for several of them, or for a TCP one, turns their clients
        away too (``migblockd.turnaway``).  Not the closed ones, nor one systemd
        accepted a connection on (``Accept=yes``), nor a datagram socket."""
        return [sock for sock in self._passed if sock.fileno() != -1
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]

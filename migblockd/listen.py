"""The listening socket: bound safely, never stolen from a live daemon.

A socket file left by a daemon that died is replaced; one a live daemon
answers on is not (the daemon refuses to start instead).  The socket never
exists with wider permissions than asked, even for an instant: the umask is
set around ``bind(2)``.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

__all__ = ["LISTEN_BACKLOG", "UNIX_PATH_MAX", "StartupError", "bind_socket"]

log = logging.getLogger("migblockd")

LISTEN_BACKLOG = 1024
#: sun_path is 108 bytes on Linux, one of them the terminating NUL.
UNIX_PATH_MAX = 107


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one-line reason for the log."""


def bind_socket(path: Path, mode: int) -> socket.socket:
    """Bind a listening socket at ``path``, refusing to steal one a live daemon serves."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise StartupError(f"cannot bind {path}: AF_UNIX path too long ({size} bytes; "
                           f"the limit is {UNIX_PATH_MAX})")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create {path.parent}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        if _answers(path):
            raise StartupError(
                f"another daemon is already listening on {path}; refusing to take over "
                "a live socket (stop it first, or choose another --socket)"
            )
        log.info("removing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket must never exist with wider permissions than asked, even briefly.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    # Listening at once: a client (or a second daemon probing) that comes before
    # we accept waits in the backlog instead of finding a "stale" socket.
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # unsure (a full backlog, a timeout): do not steal it
    finally:
        probe.close()
    return True

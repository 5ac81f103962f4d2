"""The listening socket: bound safely, never stolen from a live daemon, nor by anyone else.

Three rules keep the socket the daemon's own:

* Its directory is one that nobody but the daemon's user and root can change
  (:mod:`migblockd.socketdir`): whoever can write there could rename the
  socket away and bind an impostor in its place, which clients would trust.
* One daemon per socket path: an exclusive ``flock`` on ``PATH.lock``, beside
  the socket, is taken before anything else (:func:`lock_socket`), so of two
  daemons started together on a stale socket exactly one serves; the other
  refuses.  A socket file left by a daemon that died is replaced; one a live
  daemon answers on is not (the daemon refuses to start instead).
* The socket never exists with wider permissions than asked, even for an
  instant, and nothing is changed by name afterwards: the umask is set around
  ``bind(2)``, and there is no ``chmod(path)``, which would follow a symlink
  swapped in meanwhile.  An ACL that the directory's default ACL gave the socket
  is dropped before ``listen(2)``, before which nobody can connect.  A directory
  made for the socket gets its group and mode through a descriptor, for the same
  reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from migblockd.acl import mode_only
from migblockd.paths import fallback_socket_dir
from migblockd.pidlock import Held, LockFailed, PidLock
from migblockd.socketdir import (
    cannot_create,
    check_fallback,
    check_socket_directory,
    make_socket_dir,
    not_given,
    runtime_problem,
    socket_dir_exists,
    whose,
)
from migblockd.startup import StartupError
from migblockd.trust import unsearchable
from migblockd.writable import attribute_fix, denied, first_missing

__all__ = ["LISTEN_BACKLOG", "UNIX_PATH_MAX", "Claim", "Listening", "bind_claimed",
           "bind_socket", "check_socket_path", "check_socket_writable", "claim_socket",
           "stale_socket", "unbind"]

log = logging.getLogger("migblockd")

LISTEN_BACKLOG = 1024
#: sun_path is 108 bytes on Linux, one of them the terminating NUL.
UNIX_PATH_MAX = 107


@dataclass
class Listening:
    """A socket bound by :func:`bind_socket`: the socket, its file's inode, its lock."""

    sock: socket.socket
    inode: int
    lock: PidLock


def bind_socket(path: Path, mode: int, group: int | None = None, *,
                option: str = "--socket") -> Listening:
    """Bind a listening socket at ``path``, refusing to steal one a live daemon serves.

    The socket file gets ``mode`` and, when given, the group ``group``, before
    anyone can connect (we listen only after both are set).  ``option`` is the
    option that named ``path``, for the error messages.
    """
    return bind_claimed(claim_socket(path, mode, group, option=option))


@dataclass
class Claim:
    """A socket path :func:`claim_socket` made ready and locked, not bound yet."""

    path: Path
    mode: int
    group: int | None
    option: str
    lock: PidLock


def claim_socket(path: Path, mode: int, group: int | None = None, *,
                 option: str = "--socket") -> Claim:
    """Everything :func:`bind_socket` refuses, refused now; the lock taken.

    The daemon claims its socket before it opens its state directory, so that a
    second daemon started on a busy socket refuses before it creates (or
    restores) anything.  Only the socket's directory and lock file are made.
    """
    check_socket_path(path, option)
    try:
        if not socket_dir_exists(path.parent, option):
            # What exists of the path is judged before anything is made there: refused
            # only once made, the directories would be left behind.
            check_socket_directory(path.parent, option, to_be_made=True)
        make_socket_dir(path.parent, mode, group, option)
        check_socket_directory(path.parent, option)
    except StartupError as exc:
        raise StartupError(runtime_problem(path) or str(exc)) from None
    lock = lock_socket(path, option)
    try:
        # What is at the path is refused now too; _bind() looks again, as
        # another program may change it meanwhile.
        stale_socket(path, option)
    except BaseException:
        lock.release()
        raise
    return Claim(path, mode, group, option, lock)


def bind_claimed(claim: Claim) -> Listening:
    """Bind the socket :func:`claim_socket` claimed; on failure the lock is released."""
    path = claim.path
    try:
        sock = _bind(path, claim.mode, claim.group, claim.option)
        try:
            inode = os.lstat(path).st_ino
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot stat {path} after binding it: {exc.strerror}") from None
    except BaseException:
        claim.lock.release()
        raise
    return Listening(sock, inode, claim.lock)


def unbind(path: Path, inode: int) -> None:
    """Remove the socket this daemon bound at ``path`` (``inode``), at its stop.

    Only while it is still ours: another daemon may have replaced it meanwhile.
    One it cannot remove is said, not raised: the rest of the stop goes on, and
    the next start meets it as a stale socket."""
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        fix = attribute_fix(path.parent, None) if exc.errno == errno.EPERM else None
        log.error("cannot remove the socket %s: %s%s", path, exc.strerror,
                  f"; {fix}" if fix else "")


def check_socket_path(path: Path, option: str = "--socket") -> None:
    """StartupError when no socket can be bound at ``path``: too long for AF_UNIX,
    or something other than a socket there (never replaced); ``option`` named it."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise StartupError(f"cannot bind {path}: AF_UNIX path too long ({size} bytes; "
                           f"the limit is {UNIX_PATH_MAX}); choose a shorter {option}")
    try:
        st = os.lstat(path)
    except OSError:  # nothing there, or nothing to see yet: binding will tell
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(_not_a_socket(path, option))


def _not_a_socket(path: Path, option: str) -> str:
    return (f"{path} exists and is not a socket; refusing to replace it (move it away, or "
            f"choose another {option})")


def stale_socket(path: Path, option: str) -> bool:
    """Whether ``path`` is a socket nobody answers on (False: nothing there).

    Anything else there is refused: a file that is not a socket, or a live
    socket (another program's, or a daemon older than the lock file); ``option``
    is what names the path, for the message.  Also the socket units' check
    before systemd binds (:mod:`migblockd.vacant`)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(_not_a_socket(path, option))
    if _answers(path):
        raise StartupError(
            f"another daemon is already listening on {path}; refusing to take over "
            f"a live socket (stop it first, or choose another {option})"
        )
    return True


def _bind(path: Path, mode: int, group: int | None, option: str) -> socket.socket:
    if stale_socket(path, option):
        log.info("removing stale socket %s", path)
        try:
            path.unlink()
        except OSError as exc:
            fix = attribute_fix(path.parent, option) if exc.errno == errno.EPERM else None
            raise StartupError(f"cannot remove the stale socket {path}: {exc.strerror}; "
                               f"{fix or f'remove it, or choose another {option}'}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket is created with exactly ``mode`` (0777 less the umask; with a
    # default ACL in the directory, made the mode again below), and never
    # chmod()ed by name afterwards.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise StartupError(_cannot_bind(path, exc, option)) from None
    finally:
        os.umask(old)
    if group is not None:
        try:
            # Not following a symbolic link: only the socket we just bound is ours to give.
            os.chown(path, -1, group, follow_symlinks=False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise StartupError(not_given(path, group, exc)) from None
    try:
        # A default ACL of the directory took the umask's place: its entries would
        # let in whom the mode never named (and its mask could keep the group out).
        if mode_only(path, mode):
            log.info("%s took the default ACL of its directory; the socket's mode "
                     "(%04o) alone decides who may connect", path, mode)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise StartupError(f"cannot drop the ACL {path} took from the default ACL of its "
                           f"directory: {exc.strerror}; remove that default ACL "
                           f"('setfacl -k {path.parent}'), or choose another {option}"
                           ) from None
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


# --------------------------------------------------------------------------- the lock


def lock_socket(socket_path: Path, option: str = "--socket") -> PidLock:
    """The lock on ``SOCKET.lock`` that makes one daemon per socket path."""
    path = socket_path.with_name(socket_path.name + ".lock")
    try:
        return PidLock.acquire(path)
    except Held as held:
        raise StartupError(
            f"another migblockd ({held.holder}) is already serving {socket_path}; "
            f"refusing to start a second one (stop it first, or choose another "
            f"{option})") from None
    except LockFailed as exc:
        raise StartupError(_lock_failed(path, exc, option)) from None


def _lock_failed(path: Path, exc: LockFailed, option: str) -> str:
    what = "open the socket's lock file" if exc.opening else "lock"
    return f"cannot {what} {path}: {exc.strerror}; {_lock_remedy(path, exc, option)}"


def _lock_remedy(path: Path, exc: LockFailed, option: str) -> str:
    """What to do when ``SOCKET.lock`` cannot be opened or locked: whose file or
    directory is in the way (a socket directory made by root for a daemon that
    runs as another user, say), else another socket path."""
    if exc.opening and exc.errno == errno.EPERM:
        fix = attribute_fix(path, option) or attribute_fix(path.parent, option)
        if fix is not None:
            return fix
    if (exc.opening and exc.errno == errno.EACCES
            and not os.access(path.parent, os.X_OK, effective_ids=True)):
        return unsearchable(path.parent, option)
    if exc.opening and exc.errno in (errno.EACCES, errno.EPERM):
        place, fix = (path, "remove it") if path.is_file() else (path.parent, "let this user "
                                                                  "write in it")
        owned = whose(place)
        if owned is not None:
            return f"{owned}: {fix}, or choose another {option}"
    return f"choose another {option}"


def check_socket_writable(socket_path: Path, option: str = "--socket") -> None:
    """The StartupError a start by this user would give at ``socket_path``, found
    without making, opening or binding anything (``--check-config``): a
    directory it could not make on the way, a lock file it could not open, a
    directory it could not take the lock or bind the socket in."""
    directory = socket_path.parent
    is_dir = socket_dir_exists(directory, option)
    if os.path.lexists(directory) and not is_dir:
        return  # in the way (a file, a dangling link): the start says what is
    if is_dir and directory == fallback_socket_dir():
        check_fallback(directory)  # the start refuses it before it tries to write there
    if not is_dir:
        first = first_missing(directory)
        if not first.parent.is_dir():
            return  # in the way: the start says what is
        code = denied(first.parent, os.W_OK | os.X_OK)
        if code:
            raise StartupError(cannot_create(directory, OSError(
                code, os.strerror(code), str(first)), option))
        return
    lock = socket_path.with_name(socket_path.name + ".lock")
    if os.path.islink(lock):
        code = errno.ELOOP  # opened with O_NOFOLLOW
    elif os.path.isdir(lock):
        code = errno.EISDIR
    elif os.path.isfile(lock):
        code = denied(lock, os.R_OK | os.W_OK)
    else:
        code = denied(directory, os.W_OK | os.X_OK)
    if code:
        raise StartupError(_lock_failed(lock, LockFailed(
            os.strerror(code), opening=True, errno=code), option))
    code = denied(directory, os.W_OK | os.X_OK)
    if code:
        raise StartupError(_cannot_bind(socket_path, OSError(code, os.strerror(code)), option))


def _cannot_bind(path: Path, exc: OSError, option: str) -> str:
    fix = attribute_fix(path.parent, option) if exc.errno == errno.EPERM else None
    return f"cannot bind {path}: {exc.strerror or exc}" + (f"; {fix}" if fix else "")

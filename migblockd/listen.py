"""The listening socket: bound safely, never stolen from a live daemon, nor by anyone else.

Three rules keep the socket the daemon's own:

* Its directory is one that nobody but the daemon's user and root can change
  (:mod:`migblockd.socketdir`): whoever can write there could rename the
  socket away and bind an impostor in its place, which clients would trust.
* One daemon per socket path: an exclusive ``flock`` on ``PATH.lock``, beside
  the socket, is taken before anything else (:func:`~migblockd.bindable.lock_socket`),
  so of two
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

And a client that sees the socket finds it listening: it is bound by a staging name
beside its own (``.NAME.binding``), given its group and ACL, made to listen, and only
then linked to its name, so that a script that waits for the file and connects is
never refused.  Where no staging name fits (AF_UNIX's length), something answers on it
(another daemon's socket), or no hard link can be made, it is bound by its own name, and
listens a moment after its file appears.
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
from migblockd.bindable import cannot_bind, lock_socket
from migblockd.pidlock import PidLock
from migblockd.resolver import group_name, who
from migblockd.socketdir import (
    check_socket_directory,
    in_runtime_dir,
    make_socket_dir,
    not_given,
    socket_dir_exists,
)
from migblockd.startup import NotConfigured, StartupError, status_of
from migblockd.writable import attribute_fix

__all__ = ["LISTEN_BACKLOG", "UNIX_PATH_MAX", "Claim", "Listening", "bind_claimed",
           "bind_socket", "check_socket_path", "claim_socket", "file_access",
           "open_to_everyone", "stale_socket", "unbind"]

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
    anyone can connect (we listen only after both are set), and its name once it
    listens.  ``option`` is the
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
        raise in_runtime_dir(path, exc) from None
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


def file_access(path: Path) -> str:
    """Who may connect to the socket file at ``path``, for the log: `` (mode 0660,
    owner uid 0 (root), group migblockd)``, or why that is unknown.  For a socket systemd
    passed, whose mode and group its socket unit set (``SocketMode=``,
    ``SocketGroup=``), not the daemon's options: the operator asking why a user
    is refused reads them here."""
    try:
        st = os.stat(path)
    except PermissionError:
        # The shipped units' /run/migblockd (0750, root and migblockd-clients) keeps
        # the daemon's own user out, as it should: say so, and where to look instead,
        # rather than a bare "Permission denied" at every start.
        return (f" (its directory {path.parent} keeps this daemon's user out, so who "
                "may connect is not shown here: the socket unit's SocketUser=, "
                "SocketGroup= and SocketMode= say)")
    except OSError as exc:
        return f" (its file cannot be examined: {exc.strerror})"
    if not stat.S_ISSOCK(st.st_mode):
        return " (no socket file is at that path now)"
    group = group_name(st.st_gid)
    return (f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {who(st.st_uid)}, "
            f"group {st.st_gid if group is None else group})")


def open_to_everyone(name: str, default_role: object) -> str:
    """The start's warning for a passed socket ``name`` in the abstract namespace
    (``ListenStream=@name``): it has no file, so the kernel's first gate, the
    socket file's mode and group (docs/access.md), is not there, and every process
    in the network namespace connects with ``default_role`` (unix(7))."""
    return (f"the passed socket {name} is in Linux's abstract namespace, where no file "
            "mode, owner or group keeps anyone out (unix(7)): every process in the "
            "daemon's network namespace can connect, whatever the socket unit's "
            "SocketMode= and SocketGroup= say, and has the access policy's default-role "
            f"({default_role}); give ListenStream= a path, as the shipped migblockd.socket "
            "does")


def check_socket_path(path: Path, option: str = "--socket") -> None:
    """StartupError when no socket can be bound at ``path``: too long for AF_UNIX,
    or something other than a socket there (never replaced); ``option`` named it."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise NotConfigured(f"cannot bind {path}: AF_UNIX path too long ({size} bytes; "
                            f"the limit is {UNIX_PATH_MAX}); choose a shorter {option}")
    try:
        st = os.lstat(path)
    except OSError:  # nothing there, or nothing to see yet: binding will tell
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise NotConfigured(_not_a_socket(path, option))


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
        raise NotConfigured(_not_a_socket(path, option))
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
                               f"{fix or f'remove it, or choose another {option}'}",
                               status_of(exc.errno)) from None
    staging = _staging(path)
    if staging is None:
        return _listen_at(path, path, mode, group, option)
    sock = _listen_at(staging, path, mode, group, option)
    try:
        # Only now does the socket have its name: a client that sees it finds it
        # listening (a script that waits for the file, then connects), never
        # refusing, nor with the group and ACL it is being given.
        os.link(staging, path)
    except OSError as exc:
        sock.close()
        _drop_staging(staging)
        if exc.errno == errno.EEXIST:  # put there since stale_socket() looked
            raise StartupError(cannot_bind(path, OSError(
                errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)), option)) from None
        # A file system with no hard links: bound by its name after all.
        log.debug("cannot link %s to %s (%s): bound by its name", staging, path,
                  exc.strerror)
        return _listen_at(path, path, mode, group, option)
    _drop_staging(staging)
    return sock


def _staging(path: Path) -> Path | None:
    """The name the socket is bound by beside ``path`` until it is ready, or None when
    it cannot be one (longer than AF_UNIX allows, or in the way): then it is bound by
    ``path`` itself, and listens a moment after its file appears.  The lock on
    ``path`` makes it one daemon's: one left by a daemon killed while it bound its
    socket is removed, but not one something answers on (another daemon's
    ``--socket`` or ``--metrics`` may be that name: it is no staging name then)."""
    staging = path.with_name(f".{path.name}.binding")
    if len(os.fsencode(staging)) > UNIX_PATH_MAX:
        return None
    try:
        if not stat.S_ISSOCK(os.lstat(staging).st_mode):
            return None
    except FileNotFoundError:
        return staging
    except OSError:
        return None
    if _answers(staging):
        return None
    return staging if _drop_staging(staging) else None


def _drop_staging(staging: Path) -> bool:
    try:
        staging.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", staging, exc.strerror)
        return False
    return True


def _listen_at(where: Path, path: Path, mode: int, group: int | None,
               option: str) -> socket.socket:
    """A socket bound by ``where`` with ``mode``, ``group`` and no ACL of its
    directory's, then listening; ``path`` is the name its messages give."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket is created with exactly ``mode`` (0777 less the umask; with a
    # default ACL in the directory, made the mode again below), and never
    # chmod()ed by name afterwards.
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(where))
    except OSError as exc:
        sock.close()
        raise StartupError(cannot_bind(path, exc, option), status_of(exc.errno)) from None
    finally:
        os.umask(old)
    if group is not None:
        try:
            # Not following a symbolic link: only the socket we just bound is ours to give.
            os.chown(where, -1, group, follow_symlinks=False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                where.unlink()
            raise StartupError(not_given(path, group, exc), status_of(exc.errno)) from None
    try:
        # A default ACL of the directory took the umask's place: its entries would
        # let in whom the mode never named (and its mask could keep the group out).
        if mode_only(where, mode):
            log.info("%s took the default ACL of its directory; the socket's mode "
                     "(%04o) alone decides who may connect", path, mode)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            where.unlink()
        raise StartupError(f"cannot drop the ACL {path} took from the default ACL of its "
                           f"directory: {exc.strerror}; remove that default ACL "
                           f"('setfacl -k {path.parent}'), or choose another {option}",
                           status_of(exc.errno)) from None
    # Listening before it has its name (see _bind): a client that comes before we
    # accept waits in the backlog instead of finding a "stale" socket.
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

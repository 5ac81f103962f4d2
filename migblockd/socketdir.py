"""The socket's directory: made for the socket, judged before it is trusted.

Whoever can write in the directory that holds the socket could rename the
socket away and bind an impostor in its place, which clients would trust.  So
the daemon serves only from a directory that nobody but its user and root can
change (:func:`check_socket_directory`; :mod:`migblockd.trust` has the rule).
A directory it makes itself gets its group and mode through a descriptor, never
by name (:func:`make_socket_dir`), and the per-user fallback under the shared
temporary directory, which another user may have made first to catch our
clients, must be this user's and writable by nobody else.  Each refusal names
what is in the way and what lets the daemon in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from migblockd.paths import fallback_problem, fallback_remedy, fallback_socket_dir
from migblockd.resolver import group_name, user_name, who
from migblockd.startup import NotConfigured, StartupError, status_of
from migblockd.trust import ownership, refusal, search_fix
from migblockd.writable import attribute, attribute_fix, in_the_way

__all__ = ["cannot_create", "check_fallback", "check_socket_directory", "in_runtime_dir",
           "make_socket_dir", "not_given", "runtime_problem", "socket_dir_exists", "whose"]


def check_socket_directory(directory: Path, option: str = "--socket", *,
                           to_be_made: bool = False, owner: int | None = None) -> None:
    """Refuse a socket directory that anyone but this user and root could change
    (:mod:`migblockd.trust` has the rule); ``option`` named the socket.
    ``to_be_made``: it may be missing, and what exists of its path is judged.
    ``owner``: a uid trusted as this user is (:func:`migblockd.trust.distrust`)."""
    try:
        why = refusal(directory, kind="socket directory", asset="the socket", option=option,
                      to_be_made=to_be_made, owner=owner)
    except OSError as exc:
        raise StartupError(_cannot_check(directory, exc, option), status_of(exc.errno)) from None
    if why is not None:
        raise NotConfigured(f"refusing to serve from {directory}: {why}")
    found = attribute(directory)
    if found is not None and found[0] == "append-only":
        # It could bind there, but never unlink: the socket would outlive the
        # daemon, and the next start could not replace it.
        raise NotConfigured(f"refusing to serve from {directory}: the daemon could not "
                           f"remove its socket when it stops, nor the next start a stale "
                           f"one; {attribute_fix(directory, option)}")


def socket_dir_exists(directory: Path, option: str) -> bool:
    """Whether the socket's ``directory`` is there; a directory on the way
    that this user may not search is refused, saying which."""
    try:
        return directory.is_dir()
    except OSError as exc:
        raise StartupError(_cannot_check(directory, exc, option), status_of(exc.errno)) from None


def _cannot_check(directory: Path, exc: OSError, option: str) -> str:
    return (f"cannot check socket directory {directory}: {exc.filename}: {exc.strerror}; "
            f"{search_fix(exc, option)}")


def make_socket_dir(directory: Path, socket_mode: int, group: int | None,
                    option: str = "--socket") -> None:
    """Create the socket's directory if it is missing; refuse an unsafe fallback directory.

    A directory we create is searchable by exactly whom ``socket_mode`` lets
    connect (0700, plus x for the group and for others as the mode grants them:
    a 0666 socket in a 0700 directory would be unreachable), and belongs to
    ``group`` when given.  The non-root fallback under the shared temporary
    directory may have been made by another user to catch our clients, so it
    must be ours and writable by nobody else.
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        else:
            # Ours, made now: nobody else's to judge, and judged by name it might
            # be something else already (check_socket_directory refuses a
            # directory anyone else may change).
            _give_socket_dir(directory, socket_mode, group)
            return
    except OSError as exc:
        raise StartupError(cannot_create(directory, exc, option), status_of(exc.errno)) from None
    if directory != fallback_socket_dir():
        return
    check_fallback(directory)


def check_fallback(directory: Path) -> None:
    """Refuse the per-user fallback under the shared temporary directory unless it
    is this user's and writable by nobody else (see :func:`make_socket_dir`)."""
    problem = fallback_problem(directory, "the daemon's")
    if problem is not None:
        raise NotConfigured(
            f"refusing to put the socket in {directory}: {problem}, so another user could "
            f"replace the socket; {fallback_remedy(directory)}, or set XDG_RUNTIME_DIR, or "
            "choose another --socket")


def _give_socket_dir(directory: Path, socket_mode: int, group: int | None) -> None:
    """Give a directory just made its group and mode, or remove it: a directory left
    0700 would be taken as it is at the next start (an existing one is left alone),
    and keep out the very group members the socket's mode lets in.

    Through a descriptor, not by name: whoever may write to the parent (a shared
    one, before :func:`check_socket_directory` refuses it) could swap the new
    directory for a symlink meanwhile, and a chown or chmod by name would give the
    symlink's target our group and mode.  What the descriptor opens must be a
    directory of ours (no symlink is followed to it).
    """
    try:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise StartupError(_replaced(directory, exc.strerror)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise StartupError(_replaced(directory, f"it belongs to {who(st.st_uid)}"))
            if group is not None:
                try:
                    os.fchown(fd, -1, group)
                except OSError as exc:
                    raise StartupError(not_given(directory, group, exc),
                                       status_of(exc.errno)) from None
            # Connecting takes write permission on the socket (unix(7)): a class
            # that may only read it is let in no further than the directory.
            os.fchmod(fd, 0o700 | (0o010 if socket_mode & 0o020 else 0)
                      | (0o001 if socket_mode & 0o002 else 0))
        finally:
            os.close(fd)
    except BaseException:
        # By name, but harmless: rmdir(2) follows no symlink, and removes only an
        # empty directory.
        with contextlib.suppress(OSError):
            os.rmdir(directory)
        raise


def _replaced(directory: Path, why: str | None) -> str:
    return (f"cannot create {directory}: something else took its place as it was created "
            f"({why}), so another user may write to {directory.parent}; choose another "
            "--socket")


def not_given(path: Path, gid: int, exc: OSError) -> str:
    """Why ``path`` could not be given to --socket-group ``gid``, and what to run."""
    name = group_name(gid) or str(gid)
    uid = os.geteuid()
    user = user_name(uid)
    run = f": usermod -aG {name} {user}, then start it again" if user is not None else ""
    return (f"cannot give {path} to group {name}: {exc.strerror} (the daemon's user, "
            f"{who(uid)}, must be a member of the group{run})")


def cannot_create(directory: Path, exc: OSError, option: str) -> str:
    """Why the socket's ``directory`` (or a missing one above it) could not be
    made, and, when this user may not write where it goes, whose directory that is."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and (blocker := in_the_way(directory)):
        return (f"cannot create {directory}: {blocker} is not a directory; move it away, "
                f"or choose another {option}")
    if exc.errno == errno.EPERM and exc.filename:
        fix = attribute_fix(Path(os.fsdecode(exc.filename)).parent, option)
        if fix is not None:
            return f"cannot create {directory}: {exc.strerror}; {fix}"
    owned = None
    if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename:
        owned = whose(Path(os.fsdecode(exc.filename)).parent)
    if owned is None:
        return f"cannot create {directory}: {exc.strerror}"
    return (f"cannot create {directory}: {exc.strerror}; {owned}: let this user write in it, "
            f"or choose another {option}")


def whose(place: Path) -> str | None:
    """``PLACE belongs to uid 0 (root), mode 0755, and this daemon runs as ...``
    (None when it cannot be told)."""
    try:
        st = place.stat()
    except OSError:
        return None
    return f"{place} {ownership(st)}"


def runtime_problem(socket_path: Path) -> str | None:
    """Why ``socket_path``, when it is a non-root user's default socket under
    ``$XDG_RUNTIME_DIR`` and its directory could not be used, is the runtime
    directory's fault, in place of the remedy the failure alone would suggest (a
    ``chmod`` of root's ``/run/user/0``, which ``su`` leaves in XDG_RUNTIME_DIR, or
    letting this user write in ``/run/user``): one that does not exist, or another
    user's.  None otherwise."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if (os.geteuid() == 0 or not os.path.isabs(runtime)
            or socket_path != Path(runtime) / "migblockd" / "migblockd.sock"):
        return None
    where = f"the default socket {socket_path} is under XDG_RUNTIME_DIR ({runtime}), which"
    try:
        st = os.stat(runtime)
    except FileNotFoundError:
        return (f"{where} does not exist (systemd-logind makes it when this user logs in; "
                "it was not made for this one); unset XDG_RUNTIME_DIR, or give --socket PATH")
    except OSError:
        return None
    if st.st_uid == os.geteuid():
        return None
    return (f"{where} {ownership(st)} (an XDG_RUNTIME_DIR kept from another user, as su "
            "keeps it?); set XDG_RUNTIME_DIR to this user's, or unset it, or give --socket "
            "PATH")


def in_runtime_dir(socket_path: Path, exc: StartupError) -> StartupError:
    """``exc``, a refusal of the socket's directory, as :func:`runtime_problem` says
    it when the runtime directory is at fault: an environment to mend, which no
    restart changes."""
    why = runtime_problem(socket_path)
    return exc if why is None else NotConfigured(why)

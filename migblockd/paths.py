"""Where things live on disk by default."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from pathlib import Path

from migblockd.denied import explain
from migblockd.trust import gid_name, writers, writers_named

#: The socket of ``migblockd.socket``, the systemd units' daemon (and root's default).
SYSTEM_SOCKET = Path("/run/migblockd/migblockd.sock")


def make_private_directory(directory: Path) -> None:
    """``mkdir -p directory``, every directory it makes mode 0700: with mkdir's own,
    the missing parents get the umask's mode (0775 under umask 002), and the
    daemon then refuses a state directory below them (others could write there:
    :mod:`migblockd.trust`).  Raises OSError as mkdir does (FileExistsError:
    what is in the way is not a directory)."""
    for missing in reversed([d for d in directory.parents if not d.exists()]):
        missing.mkdir(mode=0o700, exist_ok=True)
    directory.mkdir(mode=0o700, exist_ok=True)


def default_socket_path() -> Path:
    """The socket the daemon listens on and the shell connects to by default.

    root gets ``/run/migblockd/migblockd.sock`` (what ``migblockd.socket`` uses);
    other users get ``$XDG_RUNTIME_DIR/migblockd/migblockd.sock``, or a per-user
    directory under the temporary directory when there is no runtime directory
    (or a relative one, which the XDG spec says to ignore).
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return Path(runtime) / "migblockd" / "migblockd.sock"
    return fallback_socket_dir() / "migblockd.sock"


def fallback_socket_dir() -> Path:
    """``${TMPDIR:-/tmp}/migblockd-UID``: in a directory every user can write to, so the
    daemon refuses it unless it is its own (see ``migblockd.socketdir.make_socket_dir``),
    and the clients do not connect through it then (:func:`fallback_refusal`)."""
    tmp = os.environ.get("TMPDIR", "")
    if not os.path.isabs(tmp):
        # A relative one would put the socket wherever the process was started,
        # and the shell, started elsewhere, would not find it.
        tmp = "/tmp"
    return Path(tmp) / f"migblockd-{os.geteuid()}"


def fallback_problem(directory: Path, whose: str = "this user's") -> str | None:
    """What makes ``directory``, the fallback socket directory, unsafe; None if nothing.

    Another user may have made it first (its parent is everyone's), to listen there
    in place of this user's daemon, or to replace the socket later: it must be a
    directory (not a symlink to one), this user's, and writable by nobody else
    (under an access ACL, by no entry but this user's and root's, as
    :func:`migblockd.trust.writers` reads them: the mode's group bits are then only
    the ACL's mask).  ``whose`` words this user in the answer (``the daemon's``).  A missing
    directory has no problem: the daemon creates it, 0700.
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be looked at ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    me = os.geteuid()
    if st.st_uid != me:
        return f"it belongs to {_who(st.st_uid)}, not to {whose} {_who(me)}"
    entries = writers(directory, st, (me, 0))
    if entries:
        return (f"its ACL lets {writers_named(entries, _who, gid_name)} write to it (mode "
                f"{stat.S_IMODE(st.st_mode):04o}, whose group bits are the ACL's mask)")
    if entries is None and st.st_mode & 0o022:
        return f"other users may write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def fallback_remedy(directory: Path) -> str:
    """How to get rid of ``directory``: removing it is this user's to do only when
    it is theirs or the user is root (its parent, like /tmp, is sticky: an entry's
    owner and root alone may remove it)."""
    try:
        owner = os.lstat(directory).st_uid
    except OSError:
        return "remove it"
    if owner == os.geteuid() or os.geteuid() == 0:
        return "remove it"
    if owner == 0:
        return "ask root to remove it"
    return f"ask {_who(owner)} or root to remove it"


def _who(uid: int) -> str:
    """``uid 1001 (alice)``, as the daemon's ``resolver.who`` says it; here, since the
    clients use this module, without the daemon's policy modules."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def fallback_refusal(path: str, give: str, *, connected: bool = False) -> str | None:
    """Why a client must not talk to the socket ``path``, or None.

    Only a socket in the fallback directory is judged, as the daemon judges that
    directory (:func:`fallback_problem`), since this user's daemon never listens
    in one it would refuse; ``give`` says how to name another socket.  Judged
    before connecting, and again once ``connected``: a directory that appeared
    meanwhile must be there, and this user's.
    """
    directory = Path(os.path.abspath(path)).parent
    if directory != fallback_socket_dir():
        return None
    problem = fallback_problem(directory, "your")
    if problem is None and connected and not os.path.lexists(directory):
        problem = "it was removed as the connection was made"
    if problem is None:
        return None
    return (f"refusing {directory}: {problem}, so another user's program could be "
            f"listening there in place of your daemon; {fallback_remedy(directory)}, or "
            f"use a socket outside it: {give}, or set XDG_RUNTIME_DIR (for the default one)")


def default_state_dir() -> Path:
    """The directory the daemon keeps its state in by default.

    systemd's ``$STATE_DIRECTORY`` (set by ``StateDirectory=``; with several
    directories it is a colon-separated list, and the first is ours) wins;
    otherwise root gets ``/var/lib/migblockd`` and other users
    ``$XDG_STATE_HOME/migblockd``, where ``XDG_STATE_HOME`` defaults to
    ``~/.local/state`` (and, as the XDG spec says, a relative one is ignored).
    """
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        if not os.path.isabs(systemd):
            # Never systemd's (it passes absolute paths): set by hand, it would be
            # taken from wherever the daemon was started, as the file refuses it.
            raise NoDefault(f"STATE_DIRECTORY is the relative path {systemd!r}; systemd's "
                            "StateDirectory= sets an absolute one: set it to an absolute "
                            "path, or give --state-dir")
        return Path(systemd)
    if os.geteuid() == 0:
        return Path("/var/lib/migblockd")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "migblockd"
    try:
        home = Path.home()
    except RuntimeError:  # no $HOME, and no home in the user database (a bare uid)
        raise NoDefault(f"no default --state-dir for uid {os.geteuid()}: HOME is not set "
                        "and the user database has no home directory for it; give "
                        "--state-dir, or set XDG_STATE_HOME") from None
    return home / ".local" / "state" / "migblockd"


class NoDefault(ValueError):
    """A default path cannot be formed here; ``str()`` says what to give instead."""


def _system_hint(path: str) -> str:
    """Where the systemd units' daemon is, for a user whose own default has no daemon.

    A user other than root defaults to a socket of their own, where a daemon they
    started would listen; an operator of the system's daemon, started by systemd, is
    told where that one listens instead of just "No such file or directory".
    """
    if os.geteuid() == 0 or path != str(default_socket_path()):
        return ""
    if not os.path.isdir(SYSTEM_SOCKET.parent):
        return ""
    return (f" (this user's default socket; the daemon of the systemd units listens on "
            f"{SYSTEM_SOCKET}: give that path)")


def _start_hint(path: str) -> str:
    """How to start a daemon, for the default socket with none there and no other
    socket beside it: an operator who has not started one yet, or whose socket unit
    is stopped, gets more than "No such file or directory"."""
    if path != str(default_socket_path()):
        return ""
    if os.geteuid() == 0:
        return (" (no daemon listens there: start the systemd units' one with "
                "'systemctl start migblockd.socket', or run migblockd)")
    return " (no daemon listens there: start one with migblockd)"


def _others_hint(path: str) -> str:
    """The sockets beside a missing ``path``: with one daemon per VM (the template
    units' ``/run/migblockd/vm1.sock``) there may be no daemon at the default path,
    and "No such file or directory" alone does not say where the daemons are.  Not
    a daemon's staging name (``.NAME.binding``, :mod:`migblockd.listen`): one starting
    links it to NAME in a moment, one killed meanwhile left it, and nobody answers."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        with os.scandir(directory) as entries:
            names = sorted(e.name for e in entries
                           if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)
                           and not (e.name.startswith(".") and e.name.endswith(".binding")))
    except OSError:
        return ""
    if not names:
        return ""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f" (sockets in {directory}: {shown}; give one's path)"


#: What a path that is not a socket is, by its file type (``stat.S_IFMT``).
_FILE_TYPES = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory",
               stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device"}


def not_a_socket(path: str | os.PathLike[str]) -> str | None:
    """``not a socket (a directory)`` and the like when ``path`` is there and is not a
    socket (connecting to it fails with ECONNREFUSED, as to a socket nobody listens
    on); None when it is a socket, or cannot be looked at."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    kind = _FILE_TYPES.get(stat.S_IFMT(mode))
    return f"not a socket ({kind})" if kind is not None else "not a socket"


#: Why a connection could not even wait for the daemon to take it.
NOT_ACCEPTING = ("the daemon is not accepting connections (its queue of pending "
                 "connections is full: is it stopped or hung?)")


def connect_unix(path: str) -> socket.socket:
    """A non-blocking socket connected to the Unix socket ``path``, for the clients
    to hand to asyncio; raises OSError as connect() does.

    asyncio's own connect takes EAGAIN for "in progress", as it is on a TCP
    socket; on a Unix socket it means the listener's queue is full (a daemon
    stopped or hung, taking no connection), and no connection is in progress:
    the first read then failed with EINVAL.  Said here (:func:`connect_failure`).
    A Unix socket connects at once or not at all, so this does not block.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_failure(path: str, err: OSError) -> str:
    """Why connecting to ``path`` failed, in the operator's terms.

    The kernel answers ECONNREFUSED both for a path that is not a socket (a
    directory, a regular file) and for a socket file nobody listens on (a daemon
    that died without removing it); say which.  It answers EACCES for a path that
    is not a socket too, when this user may not write to it (the state directory,
    say): that is no matter of the socket's permissions.
    """
    reason = err.strerror or str(err)
    if err.errno == errno.EAGAIN:
        return NOT_ACCEPTING
    if isinstance(err, FileNotFoundError):
        return reason + (_system_hint(path) or _others_hint(path) or _start_hint(path))
    if isinstance(err, (ConnectionRefusedError, PermissionError)):
        other = not_a_socket(path)
        if other is not None:
            return other
    if isinstance(err, ConnectionRefusedError):
        try:
            os.stat(path)
        except OSError:
            return reason
        return f"{reason} (no daemon is listening on this socket)"
    if isinstance(err, PermissionError):
        why = explain(path)
        if why is not None:
            return f"{reason}: {why}"
        return (f"{reason} (the daemon's socket is mode 0600 by default: run as its user, "
                "or see its --socket-mode and --socket-group)")
    return reason


#: Why a connection ends before the greeting, as a rule: the daemon exited (it could
#: not start: bad state or configuration), and its log has the one line saying why.
#: A client queued on a socket-activated daemon's socket sees a reset when the daemon
#: exits before taking it (systemd's socket unit gives up on a service that keeps
#: failing); one it took and then closed, an end of file.
#: Where an operator reads why the daemon did not start.
LOG_SAYS = "its log says why (under systemd: journalctl -u migblockd)"
DAEMON_GONE = f"the daemon stopped, or failed to start: {LOG_SAYS}"


#: Why a connection that answered with something other than QMP's greeting failed.
NO_GREETING = "the server did not send a QMP greeting"


def before_greeting(err: BaseException | None) -> str:
    """Why a connection ended before the daemon's greeting, in the operator's terms.

    ``err`` is what reading the greeting raised: a reset (``ConnectionResetError``),
    or anything else (None, ``EOFError``) for an end of file.
    """
    if isinstance(err, ConnectionResetError):
        return f"the connection was reset before a greeting; {DAEMON_GONE}"
    return f"the connection was closed before a greeting; {DAEMON_GONE}"

"""What would stop a start, found without binding, creating or locking anything.

A setting can be well formed and still stop the daemon at its start: a
``socket-group`` that names no group, a ``schema`` that cannot be read, an
``event-loop`` whose package is not installed, a ``metrics`` host that does not
resolve, or a port below 1024 this user may not bind, a socket path too long for AF_UNIX,
taken by a file that is not a socket, or in a directory others may change, a
``state-dir`` that is not a directory or that others may change (or, still to
be made, is under a directory others may change), a socket or state directory
this user may not make or write in, a ``state.db`` there (or its log) that
others may write, this user may not open, or that is empty or no database, a
``qemu`` that is migblockd's own socket.
``--check-config`` must not call such settings valid, and a reload, which
applies none of them, must not let the operator learn of them only when the
next restart fails: :func:`problems` finds them with the very functions the
start-up uses (:func:`load_contract`, :func:`loop_factory`, :func:`socket_gid`,
``tcp.check_address`` (the start's ``resolve_tcp``, and an address of no interface here) and
``check_port``, ``listen.check_socket_path`` and ``socketdir.check_socket_directory``,
``state.directory.check_existing_directory`` and, for the files in it,
``state.files.check_existing_database``, :func:`not_its_own_socket`), so
both say what the start would.  The database is judged without SQLite, which
could make files or take locks beside the running daemon.

What only binding can tell (a port or a path in use) is left to the start:
checked while a daemon runs, the daemon's own socket would look taken.  So is
what only SQLite tells of the database (another program's, a damaged one), and
its log's frames, which a running daemon's commits change as they are read.  So
is, for root checking for a daemon that runs as another user, whether that user
may make and write the directories, and open the database: root cannot play it.
And the daemon's own look ahead at a reload judges no database: the directory
may hold the one it has open, and closing any descriptor of that file would drop
the locks SQLite holds on it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Collection
from pathlib import Path
from typing import NamedTuple

from migblockd.bindable import check_socket_writable, lock_path
from migblockd.config import UVLOOP_INSTALL, Config
from migblockd.contract import Contract
from migblockd.kinds import HostPort
from migblockd.listen import UNIX_PATH_MAX, check_socket_path
from migblockd.qapi.error import QAPIError
from migblockd.regular import NotRegularFile
from migblockd.served import check_served
from migblockd.shapes import check_shapes
from migblockd.socketdir import check_socket_directory, in_runtime_dir, socket_dir_exists
from migblockd.socketgroup import group_gid
from migblockd.sources import COMMAND_LINE, Sources
from migblockd.startup import (
    EXIT_FAILURE,
    EXIT_NOTCONFIGURED,
    NotConfigured,
    StartupError,
    status_of,
)
from migblockd.state import StateError
from migblockd.state.directory import check_existing_directory, home_problem
from migblockd.tcp import check_address, check_port
from migblockd.trust import distrust, named_uid
from migblockd.trusted_file import UntrustedFile, check_trusted

__all__ = ["Problem", "check_qemu", "load_contract", "loop_factory", "not_its_own_socket",
           "not_the_qmp_socket", "passed_name", "passed_path", "problems", "refusals",
           "socket_gid", "state_refused"]


class Problem(NamedTuple):
    """A setting that would stop a start: its key, why, and the exit status of a
    start refused for it (``migblockd.startup``: 1 for what a later start may get
    past, 6 for what only an operator mends), which ``--check-config`` exits with."""

    key: str
    why: str
    status: int


def state_refused(exc: StateError, directory: Path, choice: str) -> tuple[str, int]:
    """Why a start refuses the state directory ``directory`` for ``exc``, and its exit
    status: a directory or database to mend is not tried again (the units' restart);
    another daemon's lock, or the disk, may be gone by the next start.  ``choice``:
    the setting to change, as :meth:`Sources.choice` names it."""
    home = home_problem(directory)
    return (home or exc.naming(choice),
            EXIT_NOTCONFIGURED if home or exc.lasting else EXIT_FAILURE)


def load_contract(path: Path | None) -> Contract:
    """The schema ``--schema`` names (None: the installed one); StartupError when it
    cannot be read, has a mistake, is not one the daemon can serve (:mod:`.served`,
    :mod:`.shapes`) or, given, could have been written (it or a file it includes)
    by someone but root and the daemon's user (:mod:`.trusted_file`)."""
    try:
        # The installed schema is not judged: it is part of the installed code.
        contract = Contract.load(path, None if path is None else _vet_schema_file)
    except UntrustedFile as exc:
        raise NotConfigured(str(exc)) from None
    except QAPIError as exc:
        # NotConfigured's one line: QEMU's second line of some messages joined to it.
        raise NotConfigured(f"bad schema: {exc.line()}") from None
    except NotRegularFile as exc:
        raise NotConfigured(f"{exc}; --schema takes a QAPI schema file") from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise StartupError(f"cannot read the schema{where}: {exc.strerror or exc}",
                           status_of(exc.errno)) from None
    check_served(contract)
    if path is not None:
        check_shapes(contract)
    return contract


def _vet_schema_file(name: str, fd: int, st: os.stat_result) -> None:
    check_trusted(name, fd, st, "schema file",
                  "the commands the daemon serves, their arguments and the migration modes")


def socket_gid(group: str | None, setting: str = "--socket-group",
               stop: Callable[[], str | None] | None = None) -> int | None:
    """``--socket-group`` as a gid (None: not given); StartupError when no group has that name.

    ``setting``: how the message names it (:meth:`Sources.named`); ``stop``: a
    starting daemon's stop signal, which ends the wait for the look-up (``group_gid``)."""
    if group is None:
        return None
    gid = group_gid(group, setting, stop)  # bounded: StartupError when it does not answer
    if gid is None:
        raise NotConfigured(f"{setting}: there is no group named {group!r}")
    return gid


def loop_factory(name: str, setting: str = "--event-loop"
                 ) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--event-loop`` names (None: asyncio's own); NotConfigured when
    it is uvloop and the package is not installed, an optional one that the units'
    install (``pip install .``) leaves out.  ``setting``: how the message names it."""
    if name != "uvloop":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional, and costly to import when not used
    except ImportError:
        raise NotConfigured(f"{setting} uvloop needs the uvloop package ({UVLOOP_INSTALL})"
                            ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def passed_path(passed: socket.socket) -> Path | None:
    """Where the socket systemd passed is (None: not a Unix socket with a path)."""
    if passed.family == socket.AF_UNIX:
        name = passed.getsockname()
        if isinstance(name, str) and name.startswith("/"):
            return Path(name)
    return None


def passed_name(passed: socket.socket) -> str:
    """The address of the socket systemd passed, for the log, as its socket unit
    writes it: a path, or ``@name`` in Linux's abstract namespace (``ListenStream=@name``),
    which Python gives as bytes with a leading NUL."""
    name = passed.getsockname()
    if isinstance(name, bytes) and name.startswith(b"\0"):
        return "@" + name[1:].decode(errors="backslashreplace")
    return str(name)


def not_the_qmp_socket(address: Path, qmp_socket: Path, setting: str = "--metrics") -> None:
    """StartupError when a Unix ``--metrics`` address is the QMP socket's path, also
    through a symlinked directory: the two would take the same lock, and the
    start would take its own QMP socket for another daemon's.  Likewise when
    either is the other's lock file: the start would make that file, find it no
    socket where it binds, and leave it to fail every later start.  ``setting``:
    how the message names it (:meth:`Sources.named`)."""
    metrics, qmp = _socket_place(address), _socket_place(qmp_socket)
    if metrics == qmp:
        what = "that is the QMP socket"
    elif metrics == _socket_place(lock_path(qmp_socket)):
        what = "that is the QMP socket's lock file"
    elif _socket_place(lock_path(address)) == qmp:
        what = f"its lock file {lock_path(address)} is the QMP socket"
    else:
        return
    raise NotConfigured(f"{setting} {address}: {what}; metrics need an address of their own")


def _socket_place(path: Path) -> str:
    """Where a socket at ``path`` is: its directory's real path and its name.

    The directory's only: the socket may not exist yet (of a directory still to
    be made, what exists of its path is resolved), and a symlink at the name
    itself is no socket, which the start refuses as such (``check_socket_path``).
    """
    return os.path.join(os.path.realpath(path.parent), path.name)


def check_qemu(qemu: Path, qmp_socket: Path | None, sources: Sources = COMMAND_LINE) -> None:
    """StartupError for a ``--qemu`` that migblockd can never reach: a path too long
    for it to connect to (retrying would never end, whatever QEMU does there), or
    migblockd's own socket (``qmp_socket``, when known: :func:`not_its_own_socket`)."""
    size = len(os.fsencode(qemu))
    if size > UNIX_PATH_MAX:
        raise NotConfigured(f"{sources.named('qemu')} {qemu}: AF_UNIX path too long ({size} "
                            f"bytes; migblockd connects to paths of at most {UNIX_PATH_MAX}); "
                            f"choose a shorter {sources.choice('qemu')}")
    if qmp_socket is not None:
        not_its_own_socket(qemu, qmp_socket, sources)


def not_its_own_socket(qemu: Path, qmp_socket: Path, sources: Sources = COMMAND_LINE) -> None:
    """StartupError when ``--qemu`` is migblockd's own QMP socket, also through a
    symlink: gating itself, every forwarded command would wait for itself until
    ``qemu-timeout``.  ``sources``: where ``qemu`` came from, which the message names."""
    if os.path.realpath(qemu) == os.path.realpath(qmp_socket):
        raise NotConfigured(f"{sources.named('qemu')} {qemu}: that is migblockd's own socket; "
                            f"{sources.choice('qemu')} names the QMP monitor of the QEMU to "
                            "gate (its -qmp)")


def problems(config: Config, *, socket_passed: bool = False, passed: Path | None = None,
             as_daemon: bool = False, keys: Collection[str] | None = None,
             sources: Sources = COMMAND_LINE) -> list[tuple[str, str]]:
    """(key, why) for each setting that would stop a start with ``config``: the
    :func:`refusals`, whatever their statuses."""
    return [(p.key, p.why) for p in refusals(
        config, socket_passed=socket_passed, passed=passed, as_daemon=as_daemon, keys=keys,
        sources=sources)]


def refusals(config: Config, *, socket_passed: bool = False, passed: Path | None = None,
             as_daemon: bool = False, keys: Collection[str] | None = None,
             sources: Sources = COMMAND_LINE) -> list[Problem]:
    """A :class:`Problem` for each setting that would stop a start with ``config``.

    ``socket_passed``: systemd passes the socket, so ``socket-group`` is the
    socket unit's and not used; ``passed``: that socket's path, when known (a
    reload knows it, ``--check-config`` does not), which a Unix ``metrics``
    address and ``qemu`` must not be.  ``as_daemon``: this process is the daemon (a reload),
    whose user the trust rule is about.  ``keys``: check only these settings
    (keys as in the file, ``socket-group``); all by default.  ``sources``: where
    the settings came from, which the messages name.
    """
    qmp_socket = config.socket if not socket_passed else passed
    found: list[Problem] = []
    # (the settings a check judges, the check): reported under the first of
    # them that is wanted, the one whose edit a reload names.
    checks: list[tuple[tuple[str, ...], Callable[[], object]]] = [
        (("schema",), lambda: load_contract(config.schema)),
        (("event-loop",), lambda: loop_factory(config.event_loop, sources.named("event_loop"))),
        (("socket",), lambda: None if socket_passed
         else _socket_at(config.socket, sources.choice("socket"), as_daemon)),
        (("socket-group",), lambda: None if socket_passed
         else socket_gid(config.socket_group, sources.named("socket_group"))),
        (("metrics",), lambda: _metrics(config, qmp_socket, as_daemon, sources)),
        (("state-dir",), lambda: None if config.ephemeral or config.state_dir is None
         else check_existing_directory(config.state_dir,
                                       owner=_daemon_user(config.state_dir, as_daemon),
                                       database=not as_daemon)),
        # A passed socket's path is the socket unit's, not this setting's to change.
        (("qemu",) if socket_passed else ("qemu", "socket"),
         lambda: None if config.qemu is None else check_qemu(config.qemu, qmp_socket, sources)),
    ]
    for judged, check in checks:
        key = next((k for k in judged if keys is None or k in keys), None)
        if key is not None:
            try:
                check()
            except StateError as exc:
                assert config.state_dir is not None  # only its check raises it
                why, status = state_refused(exc, config.state_dir,
                                            sources.choice("state_dir"))
            except StartupError as exc:
                why, status = str(exc), exc.status
            except OSError as exc:  # a directory on the way this user may not search
                why = f"cannot examine {exc.filename or key}: {exc.strerror or exc}"
                status = status_of(exc.errno)
            else:
                continue
            # The setting judged (the first: qemu's check judges it against socket),
            # at its line when the file gives it, as the start names it.
            found.append(Problem(key, sources.located(judged[0].replace("-", "_"), why),
                                 status))
    return found


def _metrics(config: Config, qmp_socket: Path | None, as_daemon: bool,
             sources: Sources) -> None:
    """``qmp_socket``: where the QMP socket is (None: systemd's, at a path not known here)."""
    address = config.metrics
    if isinstance(address, HostPort):
        # In the order the kernel's bind checks them, so that the first refusal is
        # the start's: IPv6 looks at the port first, IPv4 at the address.
        checks = (check_port, check_address) if ":" in address.host else (
            check_address, check_port)
        for check in checks:
            check(address, sources.named("metrics"))
    elif address is not None:
        _socket_at(address, sources.choice("metrics"), as_daemon)
        if qmp_socket is not None:
            not_the_qmp_socket(address, qmp_socket, sources.named("metrics"))


def _socket_at(path: Path, option: str, as_daemon: bool) -> None:
    """``option``: what the messages say to change (:meth:`Sources.choice`)."""
    check_socket_path(path, option)
    try:
        exists = socket_dir_exists(path.parent, option)
        # One still to be made is judged by what exists of its path, as the start does.
        owner = _daemon_user(path.parent, as_daemon)
        check_socket_directory(path.parent, option, to_be_made=not exists, owner=owner)
        if owner is None:  # else root checks for the daemon's user, which it cannot play
            check_socket_writable(path, option)
    except StartupError as exc:
        raise in_runtime_dir(path, exc) from None


def _daemon_user(directory: Path, as_daemon: bool) -> int | None:
    """The uid to judge ``directory`` for besides this process's and root's, as
    the trust rule (:mod:`migblockd.trust`) does for the daemon's own user.

    Root, checking the file for a daemon that runs as its own user
    (``--check-config`` under the units), does not know that user: a directory
    owned by another uid may well be the daemon's (``/var/lib/migblockd``).  So
    the first such owner on the way is taken for the daemon's user, its
    ownership left to the start (:func:`unjudged` says so), and the rest of the
    path judged as that daemon would: a mode that lets others write is refused
    whoever the daemon runs as, and so is a second owner, whom no one user's
    daemon trusts beside the first.
    """
    if as_daemon:
        return None
    foreign = _foreign_owner(directory)
    return None if foreign is None else foreign[1]


def _foreign_owner(directory: Path) -> tuple[Path, int] | None:
    """Where root, not the daemon, meets another uid's directory on the way to
    ``directory``, and that uid; None when this process is not root or meets none."""
    if os.geteuid() != 0:
        return None
    try:
        found = distrust(directory, to_be_made=True)  # a state directory may be made
    except OSError:
        return None  # the check itself says what it could not examine
    if found is None or found.owner is None:
        return None
    return found.place, found.owner


def unjudged(config: Config, *, socket_passed: bool,
             sources: Sources = COMMAND_LINE) -> list[str]:
    """What ``--check-config``, run as root, leaves to the start, each as one line:
    a directory of another uid on the way to the socket, the metrics socket or the
    state directory.  A daemon running as that uid trusts it; one running as root
    refuses it, and only the start knows which it is.  ``sources``: where each
    setting came from, which its line names."""
    places: list[tuple[str, Path]] = []
    if not socket_passed:
        places.append(("socket", config.socket.parent))
    if isinstance(config.metrics, Path):
        places.append(("metrics", config.metrics.parent))
    if not config.ephemeral and config.state_dir is not None:
        places.append(("state_dir", config.state_dir))
    lines = []
    for setting, directory in places:
        foreign = _foreign_owner(directory)
        if foreign is not None:
            place, uid = foreign
            lines.append(f"{sources.named(setting)}: {place} belongs to {named_uid(uid)}, "
                         "not judged here: a daemon running as that user may use it, one "
                         "running as root refuses it")
    return lines

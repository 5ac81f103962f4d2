"""What a start would warn of or ignore rather than refuse, each said as one line.

:mod:`migblockd.preflight` finds what would stop a start; this module holds the
rest of what the start says of its settings: those it ignores with a passed socket,
a ``socket-group`` number that is also another group's name, a directory that keeps
out whom ``socket-mode`` lets in, the access policy's and the pass-through's
warnings.  Apart because none of it is a refusal: ``--check-config`` prints these
lines and still passes, and the start logs them and goes on, each named as its log
names it (at its line when the file sets it).
"""

from __future__ import annotations

import functools
import os

from migblockd.config import Config
from migblockd.denied import kept_out
from migblockd.detached import Unanswered, within
from migblockd.guard import policy_warnings
from migblockd.preflight import load_contract, socket_gid
from migblockd.qemu.bridge import passthrough_warnings
from migblockd.resolver import Resolver, named_like
from migblockd.socketgroup import WAIT
from migblockd.sources import COMMAND_LINE, Sources
from migblockd.startup import StartupError

__all__ = ["ignored", "kept_out_notes", "passthrough_unused", "socket_group_notes", "warnings"]


def ignored(config: Config, *, socket_passed: bool,
            sources: Sources = COMMAND_LINE) -> list[str]:
    """The settings a start with ``config`` ignores, each as one line: the start
    logs them (``Server.start``) and ``--check-config`` prints them, each named as
    it was given (``sources``): at its line when the file sets it.

    With a passed socket the daemon serves it as the socket unit made it, so the
    socket's path, mode and group given here are not used (nor is the group
    checked by :func:`migblockd.preflight.problems`): said, not refused.  An operator who sets
    ``socket`` in the file and connects there finds nothing, and this line says
    why.  Defaults are not mentioned: nobody asked for them.
    """
    if not socket_passed:
        return []
    defaults = Config()
    given = [(config.socket != defaults.socket, "socket", "ListenStream="),
             (config.socket_mode != defaults.socket_mode, "socket_mode", "SocketMode="),
             (config.socket_group is not None, "socket_group", "SocketGroup=")]
    return [f"socket activation: {sources.named(name)} is ignored (the socket unit's "
            f"{directive} applies)" for differs, name, directive in given if differs]


def socket_group_notes(config: Config, *, socket_passed: bool,
                       sources: Sources = COMMAND_LINE) -> list[str]:
    """A ``socket-group`` by number that is also the name of another group: the
    start logs it as a warning and ``--check-config`` prints it (not an error: the
    number may be what was meant), at its line when the file sets it (``sources``)."""
    group = config.socket_group
    if socket_passed or group is None or (other := named_like(group, "group")) is None:
        return []
    return [sources.leading("socket_group", f"socket-group {group} is read as gid {group}, "
                            f"but a group is named {group!r} (gid {other}); to mean that "
                            f"group, give {other}")]


def kept_out_notes(config: Config, *, socket_passed: bool,
                   sources: Sources = COMMAND_LINE) -> list[str]:
    """A directory on the way to the socket that keeps out whom ``socket-mode``
    lets connect (:func:`migblockd.denied.kept_out`), as one line: the start logs
    it as a warning and ``--check-config`` prints it, led by the line of
    ``socket-mode`` when the file sets it (``sources``): the mode is what lets
    them in.  Not an error: the daemon's own user and root still connect, and a
    directory's mode is its owner's call."""
    if socket_passed:
        return []
    try:
        gid = socket_gid(config.socket_group)
    except StartupError:
        return []  # preflight.problems() says so
    why = kept_out(config.socket, config.socket_mode, os.getegid() if gid is None else gid,
                   sources.choice("socket"))
    return [] if why is None else [sources.located("socket_mode", why)]


def warnings(config: Config, sources: Sources = COMMAND_LINE) -> list[str]:
    """What a start with ``config`` would warn of, each as one line, for
    ``--check-config`` to print: names in the access policy that the databases do
    not know (a typo, or an account still to be made), the pass-through's, and a
    directory that keeps out whom ``socket-mode`` lets in.  None stops a start.

    Those from the user and group databases are waited for :data:`WAIT` seconds at
    most, as the start waits for its own: ``systemctl reload`` runs this first
    (``ExecReload=``), and a database that does not answer held it until systemd's
    timeout, for warnings that change nothing.  That they were not checked is said."""
    def looked_up() -> tuple[list[str], list[str]]:
        return (policy_warnings(Resolver(config.access, os.geteuid()),
                                functools.partial(sources.entry, "access")),
                socket_group_notes(config, socket_passed=config.socket_activated,
                                   sources=sources)
                + kept_out_notes(config, socket_passed=config.socket_activated,
                                 sources=sources))

    try:
        # Named for what it asks, the access policy's names as well as the socket's
        # group: a thread dump of a check held by the databases says which.
        lines, socket_notes = within(looked_up, "migblockd-check-lookups")
    except Unanswered:
        lines, socket_notes = [], [
            f"the user and group databases did not answer within {WAIT:g} s: the names in "
            "the access policy, and the socket's group and directories, are not checked"]
    if config.qemu is None:
        lines += [] if (unused := passthrough_unused(config, sources)) is None else [unused]
    else:
        lines += [sources.leading("qemu_passthrough", line) for line in
                  passthrough_warnings(config.qemu_passthrough, load_contract(config.schema))]
    return lines + socket_notes


def passthrough_unused(config: Config, sources: Sources = COMMAND_LINE) -> str | None:
    """``qemu-passthrough`` without ``qemu``: nothing to forward to, said (the start
    logs it) rather than ignored in silence, at its line of the file (``sources``)."""
    if config.qemu is not None or not config.qemu_passthrough:
        return None
    return sources.leading("qemu_passthrough", f"qemu-passthrough: "
                           f"{', '.join(config.qemu_passthrough)} not forwarded: there is "
                           "no QEMU to forward to without qemu (--qemu SOCKET)")

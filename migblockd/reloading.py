"""What a SIGHUP reload applies, and what it tells the operator about the rest.

A reload builds the configuration again (defaults < ``--config`` file < the
command line the daemon was started with) and compares it with the running
one.  Only the settings marked *reload* in the option table change at run
time; the others keep their running value until a restart, and the log says
so, because a reload that silently ignored an edited ``socket-mode`` would
leave the operator believing it applied.  With a socket that systemd passed,
the socket unit owns its path, mode and group (``ListenStream=``,
``SocketMode=``, ``SocketGroup=``): a restart would not apply those either.
An edit to a setting that the command line also sets changes nothing, and the
log says that too, with the value that wins: otherwise the operator reads
"nothing changed" after editing the file and cannot tell why.

:func:`outvoted` and :func:`plan` decide, with no I/O; ``Server.reload``
applies the result to the core and logs :meth:`Reload.messages`.

A ``state-dir`` moved, or ``ephemeral`` turned on, is not an error the next start
would stop on, yet it would start without the blockers this daemon keeps:
migration no longer blocked, with nothing but "created ...: there was no state
database" to say why.  :func:`next_state` says so at the reload, with what the
next start will find, while the blockers can still be moved.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migblockd.config import RELOADABLE, Config
from migblockd.options import table
from migblockd.sources import COMMAND_LINE, Sources
from migblockd.state.directory import DATABASE_NAME, holds_database
from migblockd.trust import named_uid

__all__ = ["Reload", "next_state", "outvoted", "plan"]

#: Settings of the listening socket: with a passed socket, the socket unit's.
_SOCKET_KEYS = ("socket", "socket-mode", "socket-group")
#: The uids whose new role a reload's line names; it counts the others.
_ROLES_NAMED = 5


@dataclass(frozen=True)
class Reload:
    #: The running configuration with the reloadable changes applied.
    config: Config
    #: Field name -> new value, for each reloadable setting that changed.
    changed: dict[str, Any]
    #: Keys (``socket-mode``) that changed but only apply at a restart.
    restart_only: list[str]
    #: Keys that changed but belong to the socket unit that passed the socket.
    unit_owned: list[str]
    #: (key, the command line's value as shown) for each setting the file
    #: changed but the command line sets.
    outvoted: list[tuple[str, str]] = field(default_factory=list)
    #: Each connected uid whose role the reload changed, worded (:meth:`Guard.configure`):
    #: the policy's doing, or the user and group databases' (re-read).
    roles: list[str] = field(default_factory=list)
    #: Where the file read sets each setting, for the lines that name one.
    sources: Sources = COMMAND_LINE

    def messages(self) -> list[tuple[int, str]]:
        """The log lines a reload gives, as (level, text)."""
        roles = ", ".join(self.roles[:_ROLES_NAMED]) + (
            f" and {len(self.roles) - _ROLES_NAMED} more" if len(self.roles) > _ROLES_NAMED
            else "")
        whose = ("the role of a connected uid" if len(self.roles) == 1
                 else f"the roles of {len(self.roles)} connected uids")
        if self.config.config is None and not (self.changed or self.restart_only
                                                or self.unit_owned or self.outvoted):
            # The operator who sends SIGHUP has usually just edited a file; one the
            # daemon was never told of must not look read ("nothing changed").
            return [(logging.WARNING, "reload: nothing to re-read: this migblockd was "
                     "started without --config, so its settings are its command line's")] + (
                [(logging.INFO, f"reload: the user and group databases changed {whose}: "
                  f"{roles}")] if self.roles else [])
        described = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in self.changed.items())
        ignored = self.restart_only or self.unit_owned or self.outvoted
        if described and self.roles:
            described += f"; {whose} changed: {roles}"
        elif self.roles:  # the databases, re-read, changed it
            described = (("no setting a reload applies changed" if ignored else
                          "no setting changed") + f", but {whose} did (the user and group "
                         f"databases changed): {roles}")
        lines = [(logging.INFO, "reloaded configuration: " + (described or (
            "no setting a reload applies changed" if ignored else "nothing changed")))]
        if self.restart_only:
            # At the line the file now gives each, which the operator edited.
            later = ", ".join(self.sources.keyed(k.replace("-", "_")) for k in self.restart_only)
            lines.append((logging.WARNING, f"reload: {later} changed, "
                          "which only a restart applies"))
        if self.unit_owned:
            # At its line, as the start and --check-config name it (preflight_notes.ignored).
            owned = ", ".join(self.sources.keyed(k.replace("-", "_")) for k in self.unit_owned)
            lines.append((logging.WARNING, f"reload: {owned} changed, "
                          "which the socket unit sets (ListenStream=, SocketMode=, "
                          "SocketGroup=); the daemon serves the socket systemd passed"))
        # At its line, which the operator who edited the file looks at.
        lines += [(logging.WARNING, f"reload: {self.sources.in_file(key.replace('-', '_'))} "
                   f"changed in the file, but the command line sets it ({value}); the command "
                   "line wins") for key, value in self.outvoted]
        return lines


def outvoted(cli: Mapping[str, Any], before: Mapping[str, Any],
             now: Mapping[str, Any]) -> list[str]:
    """The settings (field names) that the file, read ``before`` and ``now``
    (field name -> value), changed, and that the command line ``cli`` sets."""
    return [o.name for o in table(Config) if cli.get(o.name) is not None
            and before.get(o.name) != now.get(o.name)]


def plan(running: Config, fresh: Config, *, socket_passed: bool,
         overridden: Sequence[str] = (), sources: Sources = COMMAND_LINE) -> Reload:
    """What reloading from ``running`` to ``fresh`` does.  ``overridden``: the
    settings (field names) whose edit in the file the command line outvotes
    (:func:`outvoted`); ``sources``: where the file that ``fresh`` was built from
    sets each, which the messages name."""
    changed = {k: getattr(fresh, k) for k in RELOADABLE
               if getattr(fresh, k) != getattr(running, k)}
    later = [o.key for o in table(Config) if o.name not in RELOADABLE
             and getattr(fresh, o.name) != getattr(running, o.name)]
    unit_owned = [k for k in later if socket_passed and k in _SOCKET_KEYS]
    options = {o.name: o for o in table(Config)}
    return Reload(config=running.replace(**changed), changed=changed,
                  restart_only=[k for k in later if k not in unit_owned],
                  unit_owned=unit_owned,
                  outvoted=[(options[name].key, options[name].show(getattr(fresh, name)))
                            for name in overridden],
                  sources=sources)


def next_state(running: Config, fresh: Config, stored: int,
               sources: Sources = COMMAND_LINE) -> str | None:
    """What the next start does with the state of ``running``, which keeps
    ``stored`` daemon-scoped blockers, when ``fresh`` (as the file now sets it)
    keeps none (``ephemeral``) or keeps it elsewhere (``state-dir``); None when
    it restores that state.  Led by the line of the file that sets it
    (``sources``).  Looks in the new directory: run it off the loop."""
    if running.ephemeral or running.state_dir is None:
        return None  # nothing kept, nothing left behind
    said = _fate(running.state_dir, fresh, stored)
    if said is None:
        return None
    # The operator who edited the file is sent to the line edited, as by the line
    # above it ("FILE:LINE: state-dir changed, ..."); a setting the file no longer
    # gives (back to its default) has no line.
    name = "ephemeral" if said.startswith("with ephemeral ") else "state_dir"
    key = name.replace("_", "-")
    named = sources.keyed(name)
    return said if named == key else f"{named.removesuffix(key)}{said}"


def _fate(old: Path, fresh: Config, stored: int) -> str | None:
    """:func:`next_state`'s words, where the setting is not named at its line."""
    where = old / DATABASE_NAME
    # With no blocker, still its settings and the counter of generated ids.
    kept = f"state kept in {where} (no blockers now)" if stored == 0 else (
        f"{stored} blocker kept in {where}" if stored == 1 else
        f"{stored} blockers kept in {where}")
    if fresh.ephemeral or fresh.state_dir is None:
        return (f"with ephemeral as the file now sets it, the next start keeps nothing "
                f"and ignores the {kept}")
    new = fresh.state_dir
    if new == old or _same_directory(new, old):
        return None
    if holds_database(new):
        return (f"with state-dir as the file now sets it, the next start restores "
                f"{new / DATABASE_NAME}, not the {kept}")
    them = "them" if stored > 1 else "it"
    moved = f"{DATABASE_NAME} and its {DATABASE_NAME}-wal, if there, from {old}"
    if os.path.lexists(new):
        return (f"with state-dir as the file now sets it, the next start finds no database "
                f"in {new} and will not restore the {kept} (it creates an empty one); to "
                f"keep {them}, stop the daemon, move {moved} to {new}, then start it")
    # "mv state.db /srv/migblockd" would make the database that name, which the start
    # then refuses as no directory; and one made by hand must pass the start's rule
    # (migblockd.trust), as one the start makes does.
    return (f"with state-dir as the file now sets it, the next start finds no database in "
            f"{new}, which does not exist yet, and will not restore the {kept} (it makes "
            f"the directory, with an empty database); to keep {them}, stop the daemon, make "
            f"{new} as a start would (mode 0700, owned by {named_uid(os.geteuid())}, the "
            "user the daemon runs as; any directory made above it writable by no one else), "
            f"move {moved} into {new}, then start it")


def _same_directory(one: Path, other: Path) -> bool:
    """Two paths to one directory (through a link): the next start finds the same state."""
    try:
        return os.path.samefile(one, other)
    except OSError:  # the new one is not there yet: another directory
        return False

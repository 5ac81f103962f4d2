"""The daemon's settings: built-in defaults, then a TOML file, then the command line.

Each field of :class:`Config` *is* the declaration of one option: its type, its
default, how it is parsed and checked, its help, and whether a SIGHUP reload
applies it (see ``migblockd.options``, which derives the command line, the
TOML reading, ``RELOADABLE`` and the README's table from these fields).

The TOML file mirrors the long command-line options (``log-level = "debug"``,
``max-clients = 100``...).  On SIGHUP the daemon reads the file again; the
command line still wins, and only the settings in ``RELOADABLE`` change at run
time (the socket and the migration semantics are fixed for the daemon's life).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migblockd import options, settings_file
from migblockd.access import (
    DEFAULT_MAX_BLOCKERS,
    DEFAULT_MAX_BLOCKERS_PER_UID,
    DEFAULT_MAX_REASON_LENGTH,
    AccessTable,
    GroupName,
    Policy,
    Quotas,
)
from migblockd.kinds import (
    CommandNames,
    FilePath,
    HostPort,
    Integer,
    ListenAddress,
    OctalMode,
    OneOf,
    Seconds,
)
from migblockd.options import ConfigError, Where, flag, option
from migblockd.paths import NoDefault, default_socket_path, default_state_dir
from migblockd.qmp.limits import MAX_NESTING_CEILING, MIN_MESSAGE_SIZE, Limits

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "RELOADABLE", "UVLOOP_INSTALL", "Config", "ConfigError",
           "build", "read_file", "read_settings"]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: How the optional uvloop package comes: migblockd's extra, installed as the README's
#: install from a checkout is, not a name a package index is known to have.
UVLOOP_INSTALL = "migblockd's uvloop extra: pip install '.[uvloop]' from its checkout"


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told.  Field names are the options' names."""

    socket: Path = option(
        factory=default_socket_path, parse=FilePath(), metavar="PATH",
        default_doc="`/run/migblockd/migblockd.sock` as root, else "
        "`$XDG_RUNTIME_DIR/migblockd/migblockd.sock` (without `XDG_RUNTIME_DIR`: "
        "`${TMPDIR:-/tmp}/migblockd-UID/migblockd.sock`)",
        help="Unix socket to listen on (ignored under socket activation); a missing "
        "directory is created, searchable only by those --socket-mode lets connect; an "
        "existing one must be owned by the daemon's user or root and writable by nobody "
        "else; PATH.lock beside it keeps a second daemon off the path",
    )
    socket_mode: int = option(
        0o600, parse=OctalMode(), metavar="MODE",
        help="permissions of the socket file, in octal; 0600 lets only the daemon's user "
        "connect",
    )
    socket_group: str | None = option(
        None, parse=GroupName(), metavar="GROUP",
        help="group of the socket file (and of the directory the daemon creates for it), "
        "by name or number; with --socket-mode 0660 its members can connect",
    )
    socket_activated: bool = flag(
        where=Where.COMMAND_LINE,
        help="serve only the socket systemd passes (socket activation), as the shipped "
        "units say: never bind --socket, and without a passed socket do not start; "
        "--socket, --socket-mode and --socket-group are the socket unit's and ignored, "
        "and --check-config judges the settings so",
    )
    only_migratable: bool = flag(
        help="refuse non-internal blockers of the normal mode, as QEMU's "
        "-only-migratable does",
    )
    migration_time: float = option(
        3.0, parse=Seconds(), metavar="SECONDS",
        help="how long a simulated migration takes from setup to completed",
    )
    log_level: str = option(
        "info", parse=OneOf(*LOG_LEVELS), reloadable=True,
        help="log verbosity on stderr; debug shows every message on the wire",
    )
    log_format: str = option(
        "text", parse=OneOf(*LOG_FORMATS),
        help="log lines on stderr: text (for people and journald) or json (one object "
        "per line, for log shippers)",
    )
    max_clients: int = option(
        1024, parse=Integer(minimum=1), metavar="N", reloadable=True,
        help="connections served at once, of which the last ones (an eighth, at most 8) "
        "only admins may take; more get one error line saying so, are closed and logged",
    )
    max_clients_per_uid: int = option(
        128, parse=Integer(minimum=0), metavar="N", reloadable=True,
        help="connections one local user may hold at once (0: no limit); admins (root, "
        "the daemon's own user, the access policy's) are exempt; more get one error line "
        "saying so",
    )
    negotiation_timeout: float = option(
        10.0, parse=Seconds(), metavar="SECONDS", reloadable=True,
        help="how long a new connection may take to send qmp_capabilities before it is "
        "closed with an error line saying why (0: forever)",
    )
    idle_timeout: float = option(
        30.0, parse=Seconds(), metavar="SECONDS", reloadable=True,
        help="how long a client may leave a message unfinished before it is closed with "
        "an error line saying why (0: forever); a client idle between messages is "
        "never closed",
    )
    max_message_size: int = option(
        1 << 20, parse=Integer(minimum=MIN_MESSAGE_SIZE, unit="bytes"), metavar="BYTES",
        reloadable=True,
        help="largest request accepted; a larger one gets one error and is skipped",
    )
    max_nesting: int = option(
        64, parse=Integer(minimum=1, maximum=MAX_NESTING_CEILING), metavar="N",
        reloadable=True,
        help=f"deepest JSON nesting accepted in a request, at most {MAX_NESTING_CEILING}",
    )
    max_tokens: int = option(
        1 << 14, parse=Integer(minimum=1), metavar="N", reloadable=True,
        help="most JSON tokens in one request, as QEMU counts them; bounds the work "
        "one request may cost",
    )
    max_output: int = option(
        4 << 20, parse=Integer(minimum=1), metavar="BYTES", reloadable=True,
        help="unread events a client may accumulate before it is disconnected (its own "
        "replies, however big, do not count: backpressure bounds them)",
    )
    # None only with ephemeral, for a user who has no default (see build()).
    state_dir: Path | None = option(
        factory=default_state_dir, parse=FilePath(), metavar="DIR",
        default_doc="`$STATE_DIRECTORY` (set by systemd's `StateDirectory=`), else "
        "`/var/lib/migblockd` as root, else `${XDG_STATE_HOME:-~/.local/state}/migblockd`",
        help="where the blockers, the migration mode and the events capability are kept "
        "across restarts "
        "(SQLite, created with mode 0700); one daemon per directory",
    )
    ephemeral: bool = flag(
        help="keep everything in memory only: a restart forgets every blocker "
        "(for throwaway runs and tests)",
    )
    qemu: Path | None = option(
        None, parse=FilePath(), metavar="SOCKET", default_doc="none: migrations are simulated",
        help="gate the QEMU whose QMP monitor listens on SOCKET: migrate reaches it only when "
        "no blocker (migblockd's or QEMU's own) refuses; migblockd keeps reconnecting while "
        "QEMU is away",
    )
    qemu_passthrough: tuple[str, ...] = option(
        (), parse=CommandNames(), metavar="LIST", where=Where.FILE, default_doc="none",
        help="QEMU commands that migblockd's schema does not define, forwarded to the gated "
        "QEMU as they are (admins only), so that a tool can use migblockd as its only monitor",
    )
    qemu_timeout: float = option(
        10.0, parse=Seconds(), metavar="SECONDS",
        help="how long to wait for the gated QEMU to answer a command (0: forever); past it "
        "the client gets an error saying QEMU did not answer, and the command may still take "
        "effect in QEMU later",
    )
    max_blockers: int = option(
        DEFAULT_MAX_BLOCKERS, parse=Integer(minimum=1), metavar="N", reloadable=True,
        help="blockers registered at once, all uids together; add-blocker beyond is refused",
    )
    max_blockers_per_uid: int = option(
        DEFAULT_MAX_BLOCKERS_PER_UID, parse=Integer(minimum=1), metavar="N", reloadable=True,
        help="blockers one uid may hold at once (admins are exempt); add-blocker beyond is "
        "refused",
    )
    max_reason_length: int = option(
        DEFAULT_MAX_REASON_LENGTH, parse=Integer(minimum=1, unit="characters"), metavar="N",
        reloadable=True,
        help="longest blocker reason add-blocker accepts, in characters",
    )
    access: Policy = option(
        factory=Policy, parse=AccessTable(), metavar="TABLE", where=Where.FILE,
        reloadable=True,
        default_doc="root and the daemon's user are `admin`, everyone else `client`",
        help="who may do what: the [access] table's default-role, and its users and groups "
        "tables, which map names or numbers to observer, client, operator or admin "
        "(docs/access.md)",
    )
    event_loop: str = option(
        "asyncio", parse=OneOf("asyncio", "uvloop"),
        help="the event loop: asyncio's own, or uvloop (faster; needs the uvloop package, "
        f"{UVLOOP_INSTALL})",
    )
    metrics: Path | HostPort | None = option(
        None, parse=ListenAddress(), metavar="ADDRESS", default_doc="none: no metrics",
        help="serve Prometheus metrics over HTTP on ADDRESS: host:port (TCP; an IPv6 host in "
        "brackets, [::1]:9715; port 0 picks a free one, which the log names) or an absolute "
        "path (a Unix socket, mode 0600); never the QMP socket (docs/metrics.md)",
    )
    schema: Path | None = option(
        None, parse=FilePath(), metavar="FILE",
        default_doc="the schema installed with migblockd",
        help="QAPI schema to serve (a file, or a directory holding migblockd.json); refused, "
        "as the --config file is, when others may write it or a file it includes, or a user "
        "other than root and the daemon's owns one",
    )
    config: Path | None = option(
        None, parse=FilePath(), metavar="FILE", where=Where.COMMAND_LINE,
        help='TOML file of settings, keyed by the long options without "--" '
        '(log-level = "debug"); the command line wins over it (--no-ephemeral turns off '
        "ephemeral = true); refused, at start and at reload, when others may write it or "
        "a user other than root and the daemon's owns it",
    )

    @functools.cached_property
    def limits(self) -> Limits:
        """The protocol's input limits, from the max-* settings (shared by every session)."""
        return Limits(max_message_size=self.max_message_size, max_nesting=self.max_nesting,
                      max_tokens=self.max_tokens)

    @functools.cached_property
    def quotas(self) -> Quotas:
        """What one client and all together may register, from the max-blockers* settings."""
        return Quotas(max_blockers=self.max_blockers,
                      max_blockers_per_uid=self.max_blockers_per_uid,
                      max_reason_length=self.max_reason_length)

    @property
    def logging_level(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


#: Settings a SIGHUP reload applies to the running daemon (field names).
RELOADABLE = options.reloadable(Config)


def read_file(path: Path) -> settings_file.FileSettings:
    """Read a TOML configuration file into field name -> checked value."""
    return settings_file.read_file(path, Config)


def read_settings(cli: dict[str, Any]) -> settings_file.FileSettings:
    """What the file named by ``cli['config']`` sets (field name -> checked value),
    with the line of each; nothing without one."""
    path = cli.get("config")
    return settings_file.FileSettings({}, None, {}) if path is None else read_file(Path(path))


def build(cli: dict[str, Any], file: dict[str, Any] | None = None) -> Config:
    """Defaults < the file named by ``cli['config']`` < the command line.

    ``cli`` is what ``migblockd.cli.options()`` returns: field name -> value
    already parsed and checked, or None for an option not given.  ``file``: what
    the file sets, when the caller has read it (:func:`read_settings`) to know
    that too; read here otherwise.
    """
    settings = dict(read_settings(cli) if file is None else file)
    settings.update({k: v for k, v in cli.items() if v is not None})
    try:
        return Config(**settings)
    except NoDefault as exc:  # a bare uid: no $HOME, no home in the user database
        if not settings.get("ephemeral"):
            raise ConfigError(str(exc)) from None
        # An ephemeral daemon keeps nothing on disk, so it needs no directory.
        return Config(**settings, state_dir=None)

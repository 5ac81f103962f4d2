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

from migblockd import options
from migblockd.options import (
    ConfigError,
    FilePath,
    Integer,
    OctalMode,
    OneOf,
    Seconds,
    Where,
    flag,
    option,
)
from migblockd.paths import default_socket_path, default_state_dir
from migblockd.qmp.framing import MAX_NESTING_CEILING, MIN_MESSAGE_SIZE, Limits

__all__ = ["LOG_LEVELS", "RELOADABLE", "Config", "ConfigError", "build", "read_file"]

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told.  Field names are the options' names."""

    socket: Path = option(
        factory=default_socket_path, parse=FilePath(), metavar="PATH",
        default_doc="`/run/migblockd/migblockd.sock` as root, else "
        "`$XDG_RUNTIME_DIR/migblockd/migblockd.sock` (without `XDG_RUNTIME_DIR`: "
        "`${TMPDIR:-/tmp}/migblockd-UID/migblockd.sock`)",
        help="Unix socket to listen on (ignored under socket activation); its directory "
        "is created with mode 0700 if missing, and an existing one must be owned by the "
        "daemon's user or root and writable by nobody else; PATH.lock beside it keeps "
        "a second daemon off the path",
    )
    socket_mode: int = option(
        0o600, parse=OctalMode(), metavar="MODE",
        help="permissions of the socket file, in octal; 0600 lets only the daemon's user "
        "connect",
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
    max_clients: int = option(
        1024, parse=Integer(minimum=1), metavar="N", reloadable=True,
        help="connections served at once; more get one error line saying so, are closed "
        "and logged",
    )
    max_clients_per_uid: int = option(
        128, parse=Integer(minimum=0), metavar="N", reloadable=True,
        help="connections one local user may hold at once (0: no limit); root and the "
        "daemon's own user are exempt; more get one error line saying so",
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
        help="unread output a client may accumulate before it is disconnected",
    )
    state_dir: Path = option(
        factory=default_state_dir, parse=FilePath(), metavar="DIR",
        default_doc="`$STATE_DIRECTORY` (set by systemd's `StateDirectory=`), else "
        "`/var/lib/migblockd` as root, else `${XDG_STATE_HOME:-~/.local/state}/migblockd`",
        help="where the blockers and the migration settings are kept across restarts "
        "(SQLite, created with mode 0700); one daemon per directory",
    )
    ephemeral: bool = flag(
        help="keep everything in memory only: a restart forgets every blocker "
        "(for throwaway runs and tests)",
    )
    schema: Path | None = option(
        None, parse=FilePath(), metavar="FILE",
        default_doc="the schema installed with migblockd",
        help="QAPI schema to serve",
    )
    config: Path | None = option(
        None, parse=FilePath(), metavar="FILE", where=Where.COMMAND_LINE,
        help='TOML file of settings, keyed by the long options without "--" '
        '(log-level = "debug"); the command line wins over it; refused, at start and '
        "at reload, when others may write it or a user other than root and the "
        "daemon's owns it",
    )

    @functools.cached_property
    def limits(self) -> Limits:
        """The protocol's input limits, from the max-* settings (shared by every session)."""
        return Limits(max_message_size=self.max_message_size, max_nesting=self.max_nesting,
                      max_tokens=self.max_tokens)

    @property
    def logging_level(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


#: Settings a SIGHUP reload applies to the running daemon (field names).
RELOADABLE = options.reloadable(Config)


def read_file(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file into field name -> checked value."""
    return options.read_file(path, Config)


def build(cli: dict[str, Any]) -> Config:
    """Defaults < the file named by ``cli['config']`` < the command line.

    ``cli`` is what ``migblockd.cli.options()`` returns: field name -> value
    already parsed and checked, or None for an option not given.
    """
    settings: dict[str, Any] = {}
    path = cli.get("config")
    if path is not None:
        settings.update(read_file(Path(path)))
    settings.update({k: v for k, v in cli.items() if v is not None})
    return Config(**settings)

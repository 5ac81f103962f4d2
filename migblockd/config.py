"""The daemon's settings: built-in defaults, then a TOML file, then the command line.

The TOML file mirrors the long command-line options (``log-level = "debug"``,
``max-clients = 100``...).  On SIGHUP the daemon reads the file again; the
command line still wins, and only the settings in ``RELOADABLE`` change at run
time (the socket and the migration semantics are fixed for the daemon's life).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migblockd.paths import default_socket_path
from migblockd.qmp.framing import Limits

LOG_LEVELS = ("debug", "info", "warning", "error")

#: Settings a SIGHUP reload applies to the running daemon.
RELOADABLE = frozenset(
    {"log_level", "max_clients", "max_message_size", "max_nesting", "max_tokens", "max_output"}
)


class ConfigError(Exception):
    """A setting is invalid; ``str()`` says which one and why."""


@dataclass(frozen=True)
class Config:
    """Everything the daemon can be told.  Field names are the options' names."""

    socket: Path = field(default_factory=default_socket_path)
    socket_mode: int = 0o600
    only_migratable: bool = False
    migration_time: float = 3.0
    log_level: str = "info"
    max_clients: int = 1024
    max_message_size: int = 1 << 20
    max_nesting: int = 64
    max_tokens: int = 1 << 14
    max_output: int = 4 << 20
    schema: Path | None = None
    config: Path | None = None
    #: The protocol's input limits, derived from the max-* settings above.
    limits: Limits = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"socket-mode must be a permission mode, not {self.socket_mode:o}")
        if not (math.isfinite(self.migration_time) and self.migration_time >= 0):
            raise ConfigError("migration-time must be a finite, non-negative number of seconds")
        for name in ("max_clients", "max_message_size", "max_nesting", "max_tokens",
                     "max_output"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        try:
            # Built once here: every session shares it, and a bad value is a
            # configuration error at start (or reload), not a failure per connection.
            object.__setattr__(self, "limits", Limits(
                max_message_size=self.max_message_size, max_nesting=self.max_nesting,
                max_tokens=self.max_tokens))
        except ValueError as exc:
            raise ConfigError(str(exc).replace("_", "-")) from None

    @property
    def logging_level(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML (or command-line) value into the field's type, or explain."""
    kind = {f.name: f.type for f in dataclasses.fields(Config)}[name]
    key = name.replace("_", "-")
    if name == "socket_mode":
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ConfigError(f"{key} must be an octal mode such as \"0660\"") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f'{key} must be an octal mode string such as "0660"')
    if kind in ("Path", "Path | None"):
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string")
        return Path(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false")
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer")
        return value
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string")
    return value


def read_file(path: Path) -> dict[str, Any]:
    """Read a TOML configuration file into field-name -> value, validating keys."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    known = {f.name for f in dataclasses.fields(Config) if f.init} - {"config"}
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        settings[name] = _coerce(name, value)
    return settings


def build(cli: dict[str, Any]) -> Config:
    """Defaults < the file named by ``cli['config']`` < the command line."""
    settings: dict[str, Any] = {}
    path = cli.get("config")
    if path is not None:
        settings.update(read_file(Path(path)))
        settings["config"] = Path(path)
    settings.update({k: _coerce(k, v) for k, v in cli.items() if v is not None and k != "config"})
    try:
        return Config(**settings)
    except TypeError as exc:  # pragma: no cover - guarded by read_file's key check
        raise ConfigError(str(exc)) from None

"""Value kinds for the option table: parse and check one setting, and show it back.

Each kind takes the text of a command-line argument or the native value of a
TOML key and returns the setting, or raises ValueError saying what it must
be; ``show()`` gives the text that parses back to the same value (how
``--help`` and the README print defaults).

Most are general (a number, a duration, a mode, a path, a choice); the last few
are one setting's own: ``qemu-passthrough``'s list of command names, and
``metrics``' address (:class:`HostPort`, which the endpoint and its checks in
:mod:`migblockd.tcp` take, or a Unix socket's path).  The kinds of the access table
and of a group name are :mod:`migblockd.access`'s, beside the policy they build.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

__all__ = [
    "Boolean",
    "CommandNames",
    "FilePath",
    "HostPort",
    "Integer",
    "KeyedError",
    "Kind",
    "ListenAddress",
    "OctalMode",
    "OneOf",
    "Seconds",
    "describe",
]

T = TypeVar("T")


class KeyedError(ValueError):
    """A table's value refused for one of its keys: ``keys`` lead to it from the
    table, as the file spells them, so that the file's error names that key's line
    rather than the table's header (:func:`migblockd.settings_file.line_of`)."""

    def __init__(self, message: str, keys: tuple[str, ...]) -> None:
        super().__init__(message)
        self.keys = keys


def describe(value: object) -> str:
    """A refused value as the user wrote it (TOML spelling for TOML's types)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 40 else text[:36] + "...'"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML's dates and times


class Kind(Generic[T]):
    """A reusable parse-and-check function, which also knows how to show a value.

    ``show(parse(x))`` is how ``--help`` and the README print a default, and
    must parse back to the same value.  ``choices`` (when fixed) are offered to
    argparse for its usage line and for shell completion.
    """

    choices: tuple[str, ...] = ()
    #: What a TOML file gives for a setting of this kind, in words, when the
    #: command line has no spelling for it (a list, a table).
    toml_doc: str = ""

    def __call__(self, value: object) -> T:
        raise NotImplementedError

    def show(self, value: T) -> str:
        return str(value)


# What a number given as text may be: ASCII digits as written, not all that
# int() and float() take (blanks around it, 1_000, Arabic-Indic digits, "inf").
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Integer(Kind[int]):
    """A whole number within ``[minimum, maximum]``; ``unit`` words the bound."""

    minimum: int | None = None
    maximum: int | None = None
    unit: str = ""

    def __call__(self, value: object) -> int:
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _INTEGER.fullmatch(value):
            with contextlib.suppress(ValueError):  # past int()'s 4,300 digits
                number = int(value)
        if number is None:
            raise ValueError(f"must be an integer, not {describe(value)}")
        unit = f" {self.unit}" if self.unit else ""
        low = self.minimum if self.minimum is not None else -math.inf
        high = self.maximum if self.maximum is not None else math.inf
        if low <= number <= high:
            return number
        if self.maximum is None:
            if self.minimum == 1 and unit.endswith("s"):
                unit = unit[:-1]  # "at least 1 character"
            raise ValueError(f"must be at least {self.minimum}{unit}")
        if self.minimum is None:
            raise ValueError(f"must be at most {self.maximum}{unit}")
        raise ValueError(f"must be between {self.minimum} and {self.maximum}{unit}")


@dataclass(frozen=True)
class Seconds(Kind[float]):
    """A finite, non-negative duration in seconds."""

    def __call__(self, value: object) -> float:
        number: float = math.nan
        if ((isinstance(value, int | float) and not isinstance(value, bool))
                or (isinstance(value, str) and _DECIMAL.fullmatch(value))):
            number = float(value)
        if not (math.isfinite(number) and number >= 0):
            raise ValueError(
                f"must be a finite, non-negative number of seconds, not {describe(value)}")
        return number

    def show(self, value: float) -> str:
        return f"{value:g}"


@dataclass(frozen=True)
class OctalMode(Kind[int]):
    """File permission bits, written in octal, as a string (``"0660"``).

    Not a TOML integer: ``660`` is decimal there, and once parsed ``0o620`` and
    ``400`` are the same number, so a mode meant as 0400 would give the group
    write access without a word.
    """

    def __call__(self, value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            # Shown in octal too: whether it was spelled 400 or 0o620, that is
            # what it would have meant.
            raise ValueError(f'must be an octal mode in quotes, such as "0660", not a TOML '
                             f'number ({value}, which is {value:#o})')
        if not (isinstance(value, str) and re.fullmatch(r"[0-7]+", value)
                and int(value, 8) <= 0o777):
            raise ValueError(
                f'must be an octal mode such as "0660" (at most 0777), not {describe(value)}')
        return int(value, 8)

    def show(self, value: int) -> str:
        return f"{value:04o}"


@dataclass(frozen=True, init=False)
class OneOf(Kind[str]):
    """One of a fixed set of words."""

    choices: tuple[str, ...]

    def __init__(self, *choices: str) -> None:
        object.__setattr__(self, "choices", choices)

    def __call__(self, value: object) -> str:
        if isinstance(value, str) and value in self.choices:
            return value
        raise ValueError(f"must be one of {', '.join(self.choices)}, not {describe(value)}")


@dataclass(frozen=True)
class FilePath(Kind[Path]):
    """A file system path (not empty; no NUL byte, which no system call accepts;
    no leading ``~``, which only a shell expands, and not after ``--option=``
    nor in the file: taken as it is, it would name a directory ``~`` under the
    working directory, and state kept there would not be found from another)."""

    def __call__(self, value: object) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise ValueError(f"must be a path, not {describe(value)}")
        if value.startswith("~"):
            raise ValueError(f"must spell the home directory out (nothing here expands ~), "
                             f"not {describe(value)}")
        return Path(value)


@dataclass(frozen=True)
class Boolean(Kind[bool]):
    """``true`` or ``false`` in the file; on the command line a flag (present: true)."""

    def __call__(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, not {describe(value)}")
        return value

    def show(self, value: bool) -> str:
        return "on" if value else "off"


class CommandNames(Kind[tuple[str, ...]]):
    """A TOML list of QMP command names (``["query-status", "stop"]``)."""

    toml_doc = 'a list of QMP command names, such as ["query-status", "stop"]'

    def __call__(self, value: object) -> tuple[str, ...]:
        if isinstance(value, str):  # a shown value: the same list in TOML syntax
            with contextlib.suppress(tomllib.TOMLDecodeError):
                value = tomllib.loads(f"v = {value}")["v"]
        if not isinstance(value, list):
            raise ValueError(f"must be a list of command names, not {describe(value)}")
        for name in value:
            if not (isinstance(name, str) and name and name.isprintable() and " " not in name):
                raise ValueError(f"must be a list of command names, and {describe(name)} "
                                 "is not one")
        return tuple(dict.fromkeys(value))

    def show(self, value: tuple[str, ...]) -> str:
        return "[" + ", ".join(json.dumps(name) for name in value) + "]"


@dataclass(frozen=True)
class HostPort:
    """A TCP address to listen on; ``port`` 0 lets the kernel choose one."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ListenAddress(Kind[Path | HostPort]):
    """``host:port`` (``[::1]:9715`` for IPv6), or an absolute path for a Unix socket."""

    def __call__(self, value: object) -> Path | HostPort:
        if isinstance(value, str) and value.startswith("/") and "\0" not in value:
            return Path(value)
        if isinstance(value, str) and ":" in value:
            host, _, port = value.rpartition(":")
            bracketed = host.startswith("[") and host.endswith("]")
            if bracketed:
                host = host[1:-1]
            # A colon outside brackets leaves the port in doubt ("::9715": every
            # address, or "::" and 9715?), and is a URL's scheme in "http://h:9715".
            valid_host = (host.isprintable() and " " not in host
                          and (bracketed or ":" not in host))
            if host and valid_host and port.isascii() and port.isdigit() and int(port) < 65536:
                _resolvable(host, value)
                return HostPort(host, int(port))
        raise ValueError("must be host:port (TCP, such as 127.0.0.1:9715, or [::1]:9715 with "
                         "an IPv6 address in brackets) or an absolute path (a Unix socket), "
                         f"not {describe(value)}")

    def show(self, value: Path | HostPort) -> str:
        return str(value)


def _resolvable(host: str, value: str) -> None:
    """ValueError for a host that ``getaddrinfo`` cannot even be asked about.

    Python hands a host name to the resolver encoded with the IDNA codec, which
    refuses an empty label (``a..b``, ``.a``) or one over 63 characters with a
    UnicodeError: refused here, with the setting's name, rather than met by the
    start (or a reload's check) as an exception no message was written for.
    """
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"must be host:port with a host that is an IP address or a DNS "
                         f"name (labels of 1 to 63 characters between single dots), not "
                         f"{describe(value)}") from None

"""migblockd's three command lines, as the man pages and completion scripts see them.

Each :class:`Program` builds its real argparse parser (the one ``--help`` uses)
in its *documented* form: defaults worded as the documentation words them
rather than computed for whoever runs the generator (the default socket depends
on the user), and text wrapped at a fixed width rather than the terminal's.
Generated files must come out the same on every machine, or the staleness check
would fail for no reason.

What a parser cannot say is declared here: the manual section, the one-line
summary of the NAME section, the files a program uses, related pages, and which
arguments name files (for completion).  For ``migblockd`` the latter comes from
the option table: every option whose value is a :class:`~migblockd.options.FilePath`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

from migblockd import cli
from migblockd.config import Config
from migblockd.kinds import FilePath
from migblockd.options import Where, table
from migblockd.qapi import main as qapi_main
from migblockd.shell import main as shell_main

#: Columns at which argparse wraps help text for the generated files.
WIDTH = 80

#: What an argument's value is, for completion: a file (or socket), or a directory.
Completes = Literal["file", "directory"]

#: Where the systemd units (systemd/) put the socket and the configuration file.
SYSTEM_SOCKET = "/run/migblockd/migblockd.sock"
SYSTEM_CONFIG = "/etc/migblockd/migblockd.toml"


@dataclass(frozen=True)
class Program:
    """One installed command and what its man page says beyond ``--help``."""

    prog: str
    section: int
    #: The NAME section's description: what the program is, in a few words.
    summary: str
    build: Callable[[], argparse.ArgumentParser]
    #: Argument destinations (``dest``) whose values are paths, for completion.
    completes: Callable[[], Mapping[str, Completes]] = dict
    #: FILES section: (path, what it is).
    files: tuple[tuple[str, str], ...] = ()
    #: SEE ALSO section: ("name", section).
    see_also: tuple[tuple[str, int], ...] = field(default=())

    def parser(self) -> argparse.ArgumentParser:
        """The documented parser, its help wrapped at :data:`WIDTH` columns."""
        parser = self.build()
        # Each of migblockd's parsers names a HelpFormatter class, which takes a width.
        formatter = cast(type[argparse.HelpFormatter], parser.formatter_class)

        def fixed_width(*, prog: str) -> argparse.HelpFormatter:
            return formatter(prog, width=WIDTH)

        parser.formatter_class = fixed_width  # argparse calls formatter_class(prog=...)
        return parser

    @property
    def page_name(self) -> str:
        return f"{self.prog}({self.section})"


def _daemon_paths() -> Mapping[str, Completes]:
    return {o.name: "file" for o in table(Config)
            if Where.COMMAND_LINE in o.where and isinstance(o.parse, FilePath)}


MIGBLOCKD = Program(
    prog="migblockd",
    section=8,
    summary="QEMU's migration blocker registry as a QMP daemon",
    build=lambda: cli.parser(documented=True),
    completes=_daemon_paths,
    files=(
        (SYSTEM_SOCKET, "The socket that migblockd.socket listens on, and the default "
         "--socket of a daemon run as root."),
        (SYSTEM_CONFIG, "The configuration file that the systemd units pass with --config; "
         "see migblockd.toml(5)."),
    ),
    see_also=(("migblockd.toml", 5), ("migblock-shell", 1), ("migblockd-qapi-gen", 1),
              ("systemd.socket", 5), ("qemu", 1)),
)

MIGBLOCK_SHELL = Program(
    prog="migblock-shell",
    section=1,
    summary="interactive and scripted QMP shell for migblockd",
    build=lambda: shell_main.build_parser(documented=True),
    completes=lambda: {"socket": "file"},
    files=(
        ("$XDG_STATE_HOME/migblockd/shell-history", "The history of the interactive shell "
         "(~/.local/state/migblockd/shell-history without XDG_STATE_HOME)."),
    ),
    see_also=(("migblockd", 8),),
)

MIGBLOCKD_QAPI_GEN = Program(
    prog="migblockd-qapi-gen",
    section=1,
    summary="generate migblockd's JSON Schemas from its QAPI schema",
    build=qapi_main.build_parser,
    completes=lambda: {"schema": "file", "output_dir": "directory"},
    see_also=(("migblockd", 8),),
)

PROGRAMS = (MIGBLOCKD, MIGBLOCK_SHELL, MIGBLOCKD_QAPI_GEN)

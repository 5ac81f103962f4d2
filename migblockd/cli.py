"""``migblockd``: the command-line entry point of the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from migblockd import __version__
from migblockd.config import LOG_LEVELS, Config, ConfigError, build
from migblockd.qmp.framing import MAX_NESTING_CEILING

DESCRIPTION = """\
Serve QEMU's migration blocker registry over QMP on a Unix socket.

Clients connect to the socket, receive QEMU's QMP greeting, negotiate with
qmp_capabilities and then run add-blocker, del-blocker, query-blockers,
migrate, query-migrate and the other commands of the schema (query-qmp-schema
lists them).  Blockers behave exactly as QEMU's migrate_add_blocker*() do,
including the --only-migratable and migration-in-progress refusals.
"""

EPILOG = """\
Settings come from the built-in defaults, then the --config file (TOML; its
keys are the long option names without the leading "--", e.g.
log-level = "debug"), then the command line.  SIGHUP re-reads the file and
applies log-level and the limits; SIGTERM or SIGINT stops the daemon cleanly.
Under systemd the daemon reports readiness and status with sd_notify and
accepts a socket passed by socket activation.
"""


def _octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be a finite, non-negative number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(
        prog="migblockd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"migblockd {__version__}")
    p.add_argument(
        "--socket", metavar="PATH",
        help=f"Unix socket to listen on (default: {d.socket}); its directory is "
        "created with mode 0700 if missing. Ignored under socket activation.",
    )
    p.add_argument(
        "--socket-mode", metavar="MODE", type=_octal,
        help="permissions of the socket file, in octal (default: 0600: only the "
        "daemon's user may connect)",
    )
    p.add_argument(
        "--only-migratable", action="store_true", default=None,
        help="refuse non-internal blockers of the normal mode, as QEMU's "
        "-only-migratable does",
    )
    p.add_argument(
        "--migration-time", metavar="SECONDS", type=_seconds,
        help=f"how long a simulated migration takes from setup to completed "
        f"(default: {d.migration_time:g})",
    )
    p.add_argument(
        "--log-level", choices=LOG_LEVELS,
        help=f"log verbosity on stderr; debug shows every message on the wire "
        f"(default: {d.log_level})",
    )
    p.add_argument(
        "--max-clients", metavar="N", type=_positive_int,
        help=f"connections served at once; more are closed at once and logged "
        f"(default: {d.max_clients})",
    )
    p.add_argument(
        "--max-message-size", metavar="BYTES", type=_positive_int,
        help=f"largest request accepted; a larger one gets one error and is "
        f"skipped (default: {d.max_message_size})",
    )
    p.add_argument(
        "--max-nesting", metavar="N", type=_positive_int,
        help=f"deepest JSON nesting accepted in a request, at most "
        f"{MAX_NESTING_CEILING} (default: {d.max_nesting})",
    )
    p.add_argument(
        "--max-tokens", metavar="N", type=_positive_int,
        help=f"most JSON tokens in one request, as QEMU counts them; bounds the "
        f"work one request may cost (default: {d.max_tokens})",
    )
    p.add_argument(
        "--max-output", metavar="BYTES", type=_positive_int,
        help=f"unread output a client may accumulate before it is disconnected "
        f"(default: {d.max_output})",
    )
    p.add_argument(
        "--schema", metavar="FILE",
        help="QAPI schema to serve (default: the one installed with migblockd)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    return p


def options(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line as Config field names; options not given are None."""
    ns = parser().parse_args(argv)
    return dict(vars(ns))


def setup_logging(config: Config) -> None:
    # journald adds its own timestamps and knows the unit; a terminal does not.
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s: %(message)s"
    else:
        fmt = "%(asctime)s migblockd[%(process)d] %(levelname)s: %(message)s"
    logging.basicConfig(stream=sys.stderr, format=fmt, level=config.logging_level, force=True)


def main(argv: Sequence[str] | None = None) -> None:
    cli = options(argv)
    try:
        config = build(cli)
    except ConfigError as exc:
        sys.exit(f"migblockd: {exc}")
    setup_logging(config)

    from migblockd.daemon import StartupError, run  # noqa: PLC0415 - keeps --help fast

    try:
        asyncio.run(run(config, cli))
    except StartupError as exc:
        logging.getLogger("migblockd").error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)

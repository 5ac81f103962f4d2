"""``migblock-shell``: command line entry point."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from migblockd import __version__
from migblockd.paths import default_socket_path
from migblockd.shell.helptext import load_docs
from migblockd.shell.history import history_path
from migblockd.shell.interrupt import Interrupts
from migblockd.shell.opening import GREETING_TIMEOUT, ClientError
from migblockd.shell.render import Renderer, visible

DESCRIPTION = """\
A QMP shell for migblockd, in the spirit of QEMU's qmp-shell.

Type commands as  COMMAND key=value ...  (values that parse as JSON are JSON, as are
True and False in any case, and a bracketed Python literal such as {'a': True}, as
qmp-shell takes them; others are strings, and so are the values of string arguments;
quote with '...' or "..." to force a string; dotted keys build nested objects:
a.b=1 a.c=2; list arguments also take a,b,c), or a raw JSON request starting
with '{'.  'help' lists the daemon's commands, 'help COMMAND' documents one.  Tab
completes command names, argument names and enum values, all taken from the daemon's
query-qmp-schema, against which command and argument names are checked before a
command is sent (raw JSON goes as typed, and so do the QEMU commands a gating daemon
forwards, which query-commands lists).  Events are printed as they arrive.  History
is kept in $XDG_STATE_HOME/migblockd/shell-history (without XDG_STATE_HOME,
~/.local/state/migblockd/shell-history; its last 1000 entries are loaded; in memory
only where that file, or its nearest directory that exists, is another user's: nothing
is made in their home, and their file is read, not written).
Ctrl-C drops the line, Ctrl-D quits; the other keys edit as in Emacs and bash (Esc
then a key is Alt with that key: Alt-b and Alt-f move by words), and none of them
ends the shell.  On a dumb terminal (TERM=dumb) lines are read as the terminal edits
them: no completion, no recall.  If the daemon restarts, the
shell reconnects on the next command.
"""

#: The default socket as the man page words it (the daemon's default, the same rule).
SOCKET_DOC = "the daemon's own default, see --socket in migblockd(8)"

EPILOG = f"""\
scripting: when stdin or stdout is not a terminal (migblock-shell | tee log), or with
-c, the shell runs the commands and prints one JSON reply per line on stdout (events
are not printed; errors in the input go to stderr; a raw JSON request may span lines,
to where its outer brace closes: migblock-shell < request.json).  Exit status: 0 if
every command succeeded, 1 if any failed, 2 if the daemon could not be reached or the
connection was lost, 64 if the command line is wrong (an empty SOCKET, say, which is
refused rather than taken for the default), 130 if Ctrl-C ended the run.

connecting: the shell waits {GREETING_TIMEOUT:g} s for the daemon's greeting, and as long
for each of its answers to qmp_capabilities, query-qmp-schema and query-commands (a
stopped or hung daemon; in a script, --timeout SECONDS when that is shorter), then
gives up (exit status 2); commands wait as long as the daemon takes (Ctrl-C, or
Ctrl-\\, abandons one; in a script, --timeout bounds the wait, so that a cron job or
a monitoring check fails with exit status 2 rather than hang).  A refused connection
names the file that refuses it and what would let this user in: the group to join,
who may open a directory, or the daemon's --socket-mode and --socket-group.

examples:
  migblock-shell
  migblock-shell -c 'add-blocker reason="SEV: no migration" modes=normal,cpr-reboot'
  printf 'query-blockers\\nquery-migrate\\n' | migblock-shell /run/migblockd/migblockd.sock
"""


#: The exit status of a command line the shell cannot run: sysexits.h's EX_USAGE,
#: not argparse's 2, which is the shell's status for a daemon it cannot reach.  A
#: monitoring check with a mistyped option would otherwise report a daemon down.
USAGE = 64


class _Parser(argparse.ArgumentParser):
    """argparse, its usage errors ending with :data:`USAGE`."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def seconds(text: str) -> float:
    """--timeout's value: a number of seconds above zero (and finite)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be above 0 (and below 1e9), not {text!r}")
    return value


def socket_path(text: str) -> str:
    """SOCKET as given; an empty one is a usage error.  It is no path (connecting
    fails with EINVAL), and taken for no argument, a script's unset ``"$SOCK"``
    would reach the default daemon instead of the one it meant."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, not ''")
    return text


def build_parser(*, documented: bool = False) -> argparse.ArgumentParser:
    """The command line; ``documented`` words the socket's default for the man page
    (the default computed here depends on who runs the shell)."""
    default = SOCKET_DOC if documented else default_socket_path()
    parser = _Parser(
        prog="migblock-shell",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "socket",
        nargs="?",
        default=None,
        type=socket_path,
        metavar="SOCKET",
        help=f"the daemon's QMP socket, not empty (default: {default})",
    )
    parser.add_argument(
        "-p", "--pretty", action="store_true", help="pretty-print replies and events"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show each request as it is sent"
    )
    parser.add_argument(
        "-c",
        "--command",
        action="append",
        default=[],
        metavar="COMMAND",
        help="run COMMAND (repeatable) and exit instead of reading commands",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="in scripts: give up on a command that has no reply within SECONDS, exit "
        "status 2 (default: wait as long as the daemon takes); below "
        f"{GREETING_TIMEOUT:g}, SECONDS bounds each wait of connecting too",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


async def _amain(args: argparse.Namespace, interrupts: Interrupts) -> int:
    interrupts.install()
    try:
        return await _run(args, interrupts)
    finally:
        interrupts.uninstall()


async def _run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    socket = args.socket if args.socket is not None else str(default_socket_path())
    docs = load_docs()
    # Interactive only between two terminals: with its output in a pipe or a file
    # (`| tee session.log`), the prompt's redrawing would litter the transcript.
    if (args.command or sys.stdin is None or not sys.stdin.isatty()
            or sys.stdout is None or not sys.stdout.isatty()):
        from migblockd.shell.script import run_script  # noqa: PLC0415

        renderer = Renderer.for_stream(sys.stdout, args.pretty)
        # Messages on stderr are coloured when stderr is a terminal, whatever
        # stdout is (-c ... 2>errors.log must not get escape sequences).
        messages = Renderer.for_stream(sys.stderr, args.pretty)
        return await run_script(
            socket, renderer, docs, args.verbose, args.command, messages=messages,
            timeout=args.timeout,
        )

    from migblockd.shell.repl import Interactive  # noqa: PLC0415

    renderer = Renderer.for_stream(sys.stdout, args.pretty)
    shell = Interactive(socket, renderer, docs, args.verbose, history_path(), interrupts)
    await shell.start()
    return await shell.loop()


def _stdout_gone() -> None:
    """stdout's reader went away (``migblock-shell ... | head``): stop quietly.

    Python would otherwise print a traceback, and another error when it flushes
    stdout at exit; point stdout at /dev/null so that final flush succeeds.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    interrupts = Interrupts()
    try:
        status = asyncio.run(_amain(args, interrupts))
    except ClientError as err:
        if sys.stderr is not None:  # closed (2>&-): print() would write to stdout
            # It may quote the peer (a refusal's text) or a path: neither may steer
            # the terminal.
            print(f"migblock-shell: {visible(str(err))}", file=sys.stderr)
        status = 2
    except asyncio.CancelledError:
        if not interrupts.count:
            raise
        status = 130  # Ctrl-C cancelled the main task, as asyncio.run's own handling does
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        _stdout_gone()
        status = 1
    sys.exit(status)

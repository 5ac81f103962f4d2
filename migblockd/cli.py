"""``migblockd``: the command-line entry point of the daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from migblockd import __version__, signalmask
from migblockd.config import Config, ConfigError, build, read_settings
from migblockd.early import EarlySignals
from migblockd.kinds import Integer
from migblockd.options import Where, add_arguments, table
from migblockd.reloader import WAIT, Failed, reload, watch
from migblockd.sources import Sources
from migblockd.startup import EXIT_FAILURE, EXIT_NOTCONFIGURED, EXIT_STATUSES
from migblockd.turnaway import Passed, turns_away

DESCRIPTION = """\
Serve QEMU's migration blocker registry over QMP on a Unix socket.

Clients connect to the socket, receive QEMU's QMP greeting, negotiate with
qmp_capabilities and then run add-blocker, del-blocker, query-blockers,
migrate, query-migrate and the other commands of the schema (query-qmp-schema
lists them).  Blockers behave exactly as QEMU's migrate_add_blocker*() do,
including the --only-migratable and migration-in-progress refusals.
"""



def epilog() -> str:
    reloaded = ", ".join(o.key for o in table(Config) if o.reloadable)
    file_only = [o.key for o in table(Config) if Where.COMMAND_LINE not in o.where]
    return textwrap.fill(
        "Settings come from the built-in defaults, then the --config file (TOML; its keys "
        'are the long option names without the leading "--", e.g. log-level = "debug"), '
        "then the command line."
        + (f"  Only the file takes {' and '.join(file_only)} (see migblockd.toml(5))."
           if file_only else "")
        + f"  SIGHUP re-reads the file and applies {reloaded}; "
        "SIGTERM or SIGINT stops the daemon cleanly.  Under systemd the daemon reports "
        "readiness and status with sd_notify and accepts a socket passed by socket "
        "activation.", break_on_hyphens=False) + "\n\n" + exit_statuses()


def exit_statuses() -> str:
    """The epilog's list of exit statuses, from :data:`EXIT_STATUSES`."""
    restarted = " and ".join(str(s.code) for s in EXIT_STATUSES if s.restarted)
    lines = [f"Exit status (as systemd names it; the units restart the daemon after "
             f"{restarted} only):"]
    for status in EXIT_STATUSES:
        lines.append(textwrap.fill(f"{status.code} {status.name}: {status.meaning}",
                                   initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def parser(*, documented: bool = False) -> argparse.ArgumentParser:
    """The command line, from the option table (man pages and completion read it too).

    ``documented``: show defaults as the documentation words them, not as computed
    here (see ``migblockd.options.help_text``); ``python -m migblockd.share`` uses it.
    """
    p = _Parser(
        prog="migblockd",
        description=DESCRIPTION,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"migblockd {__version__}")
    p.add_argument(
        "--check-config", action="store_true",
        help="check the settings (the --config file, then the command line) as a start "
             "or a SIGHUP would read them and exit: 0 if they are valid; else, saying "
             "why, as a start refused for it exits (below): "
             f"{EXIT_NOTCONFIGURED} when any of it is an operator's to mend, "
             f"{EXIT_FAILURE} when a later start may get past all of it (an address no "
             "interface has yet, a database or resolver that did not answer), and when "
             "the check cannot tell (an I/O error reading the file, --running-pid's "
             "daemon unreadable); nothing is started or created")
    p.add_argument(
        "--running-pid", metavar="PID", type=_pid,
        help="with --check-config, as systemctl reload runs it (ExecReload=): also refuse "
             "when the daemon PID started with another MIGBLOCKD_OPTIONS than this "
             "command's environment holds, since a reload re-reads only the file the "
             "daemon's own options name and a restart applies new ones; a PID whose "
             "environment cannot be read fails the check too")
    p.add_argument(
        "--reload", metavar="PID", type=_pid,
        help="as systemctl reload runs it (ExecReload=): check the settings as "
             "--check-config --running-pid PID does, then send the daemon PID SIGHUP and "
             "wait until it has reloaded: 0 once it applied the file, non-zero with why "
             "when the check or the daemon refused it, the daemon stopped, or it did not "
             f"reload within {WAIT:g} s")
    add_arguments(p, Config, documented=documented)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse's, its errors marked as the other lines before the log are: a bad
    option value in ``MIGBLOCKD_OPTIONS`` stops the units' start and fails their
    reload's check, and ``journalctl -p err`` must show why.  ``--help`` and
    ``--version`` go to stdout unmarked: they are no log."""

    def error(self, message: str) -> NoReturn:
        from migblockd.logs.journal import marked  # noqa: PLC0415 - keeps --help fast

        # What argparse's own error() writes (the usage, then the message), which it
        # writes unmarked and the usage apart.
        text = f"{self.format_usage()}{self.prog}: error: {message}"
        self.exit(2, marked(logging.ERROR, text.splitlines()) + "\n")


def _pid(text: str) -> int:
    try:
        return Integer(minimum=1)(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class Check:
    """``--check-config``: check the settings and exit rather than start."""

    #: ``--running-pid``: the daemon whose options the settings must be.
    running_pid: int | None = None
    #: ``--reload``: then signal that daemon and wait for its reload.
    reload: bool = False


def command_line(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], Check | None]:
    """:func:`options`, and the :class:`Check` that ``--check-config`` asks for instead
    of a start (None: start)."""
    p = parser()
    given = dict(vars(p.parse_args(argv)))
    check_only, running_pid = given.pop("check_config"), given.pop("running_pid")
    reload_pid = given.pop("reload")
    if reload_pid is not None:
        if check_only or running_pid is not None:
            p.error("--reload checks the settings itself, as --check-config --running-pid "
                    "PID does: give it alone")
        return given, Check(reload_pid, reload=True)
    if running_pid is not None and not check_only:
        # A daemon told it would only be ignored: a reload's check, not a start.
        p.error("--running-pid is for --check-config only (as ExecReload= runs it)")
    return given, Check(running_pid) if check_only else None


def options(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line as Config field names -> checked values; options not given are None."""
    return command_line(argv)[0]


def checked(config: Config, path: str | None) -> str:
    """What ``--check-config`` says of settings that are valid."""
    source = f"{path} and the command line" if path else "the command line (no --config file)"
    state = ("state in memory only (ephemeral)" if config.ephemeral or config.state_dir is None
             else f"state in {config.state_dir}{_awaiting(config.state_dir)}")
    # The check runs outside the daemon (ExecReload=), where nothing is passed: it
    # can say whose socket it is, not its path.
    sock = ("socket passed by systemd (the socket unit's ListenStream=)"
            if config.socket_activated else f"socket {config.socket}")
    return f"migblockd: {source}: valid; {sock}, {state}"


def _awaiting(directory: Path) -> str:
    """What a start makes in ``directory`` when it holds no database yet: said, since
    the check does not know the running daemon, whose state may be elsewhere (a
    ``state-dir`` edited, mistyped, or on a volume not mounted) and would not be
    restored."""
    from migblockd.state.directory import holds_database  # noqa: PLC0415 - keeps --help fast

    if holds_database(directory):
        return ""
    if not os.path.lexists(directory):
        return ", which does not exist yet: a start makes it, with an empty state database"
    return ", which holds no state database yet: a start creates an empty one"


def _reload(pid: int, pidfd: int) -> None:
    """``--reload``'s signal and wait, once the check passed: its line, or exit with
    why (6 for a file the daemon refused that an operator mends, 1 otherwise)."""
    try:
        _say(reload(pid, pidfd))
    except Failed as exc:
        _fail(str(exc), status=exc.status)


def _say(line: str) -> None:
    """``line`` on stdout, at once (the check's before the daemon's, in the journal
    too), a name that is not UTF-8 (held as surrogates) escaped as the log escapes
    it.  Bytes, not print(): stdout is strict under a UTF-8 locale other than
    C.UTF-8 (en_US.UTF-8).  A stdout that takes nothing (its reader gone, a full
    disk) loses the line, never the check's status or the reload after it."""
    data = (line + "\n").encode(errors="backslashreplace")
    if sys.stdout is None:  # started with no descriptor 1
        return
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # io.UnsupportedOperation, a replaced stdout, is one too
        pass


def _fail(*lines: str, status: int = EXIT_NOTCONFIGURED) -> NoReturn:
    """Exit with ``status`` and ``lines``, errors, on stderr (marked as the log marks
    them): by default, as for settings only an operator mends."""
    from migblockd.logs.journal import for_stderr  # noqa: PLC0415 - keeps --help fast

    print(for_stderr(logging.ERROR, lines), file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str] | None = None, early: EarlySignals | None = None) -> None:
    """Run the daemon.  ``early``: the handlers of the signals that come while it
    starts (``migblockd.early``), installed by the caller; without it, here."""
    passed = Passed()
    try:
        _main(argv, early, passed)
    except SystemExit as exc:
        # A start refused for what no restart cures (a bad command line included)
        # lets go of the clients waiting on systemd's socket, whose connections
        # would have systemd start it again, into the same refusal, until its start
        # limit takes the socket unit down too (migblockd.turnaway).
        if isinstance(exc.code, int) and turns_away(exc.code):
            passed.turn_away()
        raise


def _main(argv: Sequence[str] | None, early: EarlySignals | None, passed: Passed) -> None:
    if early is None:
        early = EarlySignals()
        early.install()
    pidfd = -1  # --reload's watch of the daemon
    try:
        cli, check = command_line(argv)  # exits for --help, --version, a bad option
        passed.checking = check is not None
        if check is not None and check.running_pid is not None:
            # First: with other options than the daemon's, the files they name are
            # not what a reload would read, and judging them says nothing of it.
            from migblockd.running import Unknown, refusal  # noqa: PLC0415 - keeps --help fast

            if check.reload:
                try:
                    pidfd = watch(check.running_pid)
                except Failed as exc:
                    _fail(str(exc), status=EXIT_FAILURE)
            try:
                why = refusal(check.running_pid, option="--reload" if check.reload
                              else "--running-pid")
            except Unknown as exc:
                # Not the settings' fault: the check could not be made.
                _fail(str(exc), status=EXIT_FAILURE)
            if why is not None:
                _fail(why)
        try:
            file = read_settings(cli)
            config = build(cli, file)
        except ConfigError as exc:
            _fail(str(exc), status=EXIT_FAILURE if exc.passing else EXIT_NOTCONFIGURED)
    except SystemExit:
        # Not a daemon after all: a stop that came is acted on as by any program.
        early.uninstall()
        raise
    if check is not None:
        early.uninstall()
        # Well formed is not enough: what would stop the start (an unknown
        # socket-group, an unreadable schema) is an error here too.
        from migblockd.preflight import refusals, unjudged  # noqa: PLC0415 - keeps --help fast
        from migblockd.preflight_notes import ignored, warnings  # noqa: PLC0415

        # --socket-activated: judged as the daemon the units start, which serves the
        # socket systemd passes and uses none of the settings of its own socket.
        sources = Sources.of(cli, file)
        found = refusals(config, socket_passed=config.socket_activated, sources=sources)
        if found:
            # The start's status for the same problems: 1 only when each of them may
            # be gone by a later start, which is then worth waiting for; one an
            # operator has to mend stops every start.
            _fail(*(p.why for p in found), status=EXIT_FAILURE if all(
                p.status == EXIT_FAILURE for p in found) else EXIT_NOTCONFIGURED)
        notes = [*ignored(config, socket_passed=config.socket_activated, sources=sources),
                 *unjudged(config, socket_passed=config.socket_activated, sources=sources),
                 *warnings(config, sources)]
        if notes:
            from migblockd.logs.journal import for_stderr  # noqa: PLC0415 - keeps --help fast

            print(for_stderr(logging.WARNING, notes), file=sys.stderr)
        _say(checked(config, cli.get("config")))
        if check.reload:
            assert check.running_pid is not None
            _reload(check.running_pid, pidfd)
        return

    from migblockd import logs, reload_record  # noqa: PLC0415 - keeps --help fast
    from migblockd.daemon import StartupError, run  # noqa: PLC0415
    from migblockd.pidlock import say_stopping  # noqa: PLC0415

    # Before the log and the event loop open descriptors of their own, which a
    # $LISTEN_FDS counting more than were passed would take for passed ones.
    activation = passed.activation()

    from migblockd.preflight import loop_factory as chosen_loop  # noqa: PLC0415

    try:
        loop_factory = chosen_loop(config.event_loop,
                                   Sources.of(cli, file).named("event_loop"))
    except StartupError as exc:
        _fail(str(exc))

    # From the stop's signal on, the locks the start holds say that it is stopping,
    # and so does the record of reloads.
    def stopping() -> None:
        say_stopping()
        reload_record.stopping()

    early.when_stopping(stopping)
    installed = logs.setup(config.logging_level, config.log_format)
    # A SIGHUP is caught and kept by now: `migblockd --reload` sends one only to a
    # daemon that keeps this record (migblockd.reload_record).
    reload_record.open_record()
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(config, cli, reload_asked=early.reload, stop_asked=early.stop,
                           file=file, activation=activation))
    except StartupError as exc:
        logging.getLogger("migblockd").error("%s", exc)
        sys.exit(exc.status)
    except KeyboardInterrupt:  # a second Ctrl-C as the event loop closes
        sys.exit(130)
    finally:
        # A stop left them ignored (serving.serve); so does a start that failed: a
        # second SIGTERM must not end the exit with the log's last lines unwritten.
        for sig in signalmask.HANDLED:
            signal.signal(sig, signal.SIG_IGN)
        # What is still queued is written now, within a bound: a stuck
        # stderr does not keep the daemon from exiting.
        installed.close()

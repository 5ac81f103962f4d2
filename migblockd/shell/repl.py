"""The interactive mode: a prompt_toolkit prompt with completion and history, and
events printed above the prompt the moment they arrive, so the line being typed is
redrawn intact below them."""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app_or_none, get_app_session, run_in_terminal
from prompt_toolkit.history import History
from prompt_toolkit.patch_stdout import StdoutProxy, patch_stdout
from prompt_toolkit.utils import is_dumb_terminal

from migblockd.paths import make_private_directory
from migblockd.qapi.doc import SchemaDocs
from migblockd.shell.client import SERVER_CLOSED, ConnectionLost
from migblockd.shell.completion import ShellCompleter
from migblockd.shell.connection import Connection, describe_greeting
from migblockd.shell.entries import entered_commands
from migblockd.shell.history import (
    SessionFallbackHistory,
    SessionMemoryHistory,
    foreign_file,
    foreign_owner,
    history_problem,
    not_saved,
)
from migblockd.shell.interrupt import Interrupts
from migblockd.shell.opening import ConnectError, Message
from migblockd.shell.render import Renderer, visible
from migblockd.shell.runner import Runner
from migblockd.shell.syntax import Help, parse_line
from migblockd.shell.terminal import PlainLines, hung_up
from migblockd.shell.words import ParseError

PROMPT = "(migblockd) "


def _say(text: str) -> None:
    """Print ``text`` on a line of its own: at once, or above the prompt if one is
    on the screen.  Called from the event loop, which draws the prompt.

    Not through ``patch_stdout``'s proxy (``sys.stdout`` inside it), whose own
    thread writes what it is given when it gets to it: above the prompt if it
    finds one running, else straight to the terminal.  A thread that found none
    (a command was running) and was then held back (a busy machine) wrote its
    text after the next prompt was drawn, below it, and the prompt was not drawn
    again: the operator was left with no prompt, and a test waited for it."""
    if not isinstance(sys.stdout, StdoutProxy):  # no prompt_toolkit prompt in this run
        print(text, file=sys.stdout, flush=True)
        return
    output = get_app_session().output  # where the prompt is drawn, as the proxy writes

    def write() -> None:  # as the proxy's thread does (raw: the colours kept)
        output.enable_autowrap()
        output.write_raw(text + "\n")
        output.flush()

    app = get_app_or_none()
    if app is not None and app.is_running:
        # The prompt erased, the text written, the prompt drawn again below it; a
        # line said after this one waits for it.
        run_in_terminal(write)
    else:
        write()


def open_history(path: Path | None) -> History:
    if path is None:
        _say("warning: history not saved (no home directory: set HOME or XDG_STATE_HOME)")
        return SessionMemoryHistory()
    if (problem := history_problem(path)) is not None:
        _say(f"warning: history not saved ({problem})")
        return SessionMemoryHistory()
    if (problem := foreign_file(path)) is not None:
        # Read (Up recalls it), never written.
        _say(f"warning: history not saved ({problem})")
        return SessionFallbackHistory(path, _say, writable=False)
    if (problem := foreign_owner(path)) is not None:
        _say(f"warning: history not saved ({problem})")
        return SessionMemoryHistory()
    try:
        # Its missing parents 0700 too (~/.local, ~/.local/state): the daemon's
        # default state directory is below them, and refused under any that
        # others may write, as the umask's 0775 would let them.
        make_private_directory(path.parent)
        # 0600 as bash and readline (qmp-shell's) make theirs: a line may hold a
        # secret (a password given to QEMU), whatever the directory's mode.
        path.touch(mode=0o600, exist_ok=True)
    except OSError as err:
        _say(not_saved(path, err))
        return SessionMemoryHistory()
    return SessionFallbackHistory(path, _say)


def _asks_for_help(line: str) -> bool:
    """Whether ``line`` is the shell's ``help``, which needs no connection."""
    try:
        return isinstance(parse_line(line), Help)
    except ParseError:
        return False


class Interactive:
    def __init__(
        self, path: str, renderer: Renderer, docs: SchemaDocs, verbose: bool,
        history: Path | None, interrupts: Interrupts | None = None
    ) -> None:
        self.interrupts = interrupts if interrupts is not None else Interrupts()
        self.renderer = renderer
        self.connection = Connection(path, self._event, self._lost)
        self.runner = Runner(
            self.connection,
            renderer,
            docs,
            out=_say,
            err=_say,
            echo=_say if verbose else None,
        )
        self.history_path = history
        #: Whether the line being run is still waiting for a connection (so unsent).
        self._connecting = False
        #: The lines of a dumb terminal, read without prompt_toolkit.
        self._plain: PlainLines | None = None

    def _notify(self, text: str) -> None:
        """Print ``text`` (an event, a lost connection) the moment it comes."""
        if self._plain is not None and self._plain.waiting:
            # At a plain prompt: on a line of its own, then the prompt again.
            print(f"\n{text}\n{PROMPT}", end="", flush=True)
        else:
            _say(text)

    def _event(self, message: Message) -> None:
        self._notify(self.renderer.event(message))

    def _lost(self) -> None:
        # The daemon's doing, or the shell's (a reply it cannot read): said as such.
        why = self.connection.lost_reason
        said = "migblockd closed the connection" if why == SERVER_CLOSED else why
        if held := self.connection.held:
            # The next command reconnects as if nothing went: the operator must
            # not go on believing that these still block migration.
            said += (f"; the blockers this shell added with scope=connection went with it"
                     f" ({', '.join(held)}): migration is no longer blocked by them")
        self._notify(self.renderer.error(f"{said}; the next command reconnects"))

    async def start(self) -> None:
        """Connect for the first time; ConnectError propagates (exit status 2)."""
        greeting = await self.connection.open()
        # The greeting is the peer's text, which may be any server's: it must not
        # steer the terminal, as the "Reconnected to" notice must not.
        print(visible(f"Connected to {describe_greeting(greeting)} at {self.connection.path}"))
        print("Type 'help' for the commands; Ctrl-D quits." if is_dumb_terminal() else
              "Type 'help' for the commands; Tab completes; Ctrl-D quits.")

    async def loop(self) -> int:
        """Read and run commands until Ctrl-D; the exit status."""
        try:
            if is_dumb_terminal():
                return await self._plain_loop()
            return await self._prompt_loop()
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            # The terminal hung up (its window closed, its ssh connection dropped)
            # and SIGHUP did not end the shell (ignored: nohup, a trap): each read
            # and write of it now fails with EIO.  The session is over; said where
            # that can still be read (a stderr that is not that terminal), never as
            # a traceback.
            hung_up(err)
            return 1

    async def _prompt_loop(self) -> int:
        session: PromptSession[str] = PromptSession(
            history=open_history(self.history_path),
            completer=ShellCompleter(lambda: self.connection.schema),
            complete_while_typing=False,
            enable_suspend=True,  # Ctrl-Z, as in bash and readline: not a literal ^Z
        )
        try:
            # The shell's own output does not go through the proxy (_say); what else
            # writes to sys.stdout or sys.stderr (a warning) still keeps off the prompt.
            with patch_stdout(raw=True), self.interrupts.interactive():
                while True:
                    try:
                        line = await session.prompt_async(PROMPT)
                    except KeyboardInterrupt:
                        continue  # Ctrl-C drops the line
                    except EOFError:
                        break  # Ctrl-D
                    for command in entered_commands(line):
                        if not await self._run_interruptibly(command):
                            break  # Ctrl-C stops what was pasted, too
        finally:
            await self._end()
        return 0

    async def _end(self) -> None:
        """Close the connection, saying which blockers went with it."""
        held = list(self.connection.held) if self.connection.connected else []
        await self.connection.close()
        if held:
            # As when the connection is lost (_lost): the daemon has deleted them,
            # and migration is no longer blocked by them.  Said once they are gone.
            _say(self.renderer.error(
                "the session ended; the blockers this shell added with scope=connection "
                f"went with it ({', '.join(held)}): migration is no longer blocked by them"))

    async def _plain_loop(self) -> int:
        """A dumb terminal (``TERM=dumb``, as in an Emacs shell buffer) has no cursor
        to move: the prompt is printed plainly and lines are read as the terminal
        edits them (its cooked mode), with no completion nor recall.

        prompt_toolkit's own dumb mode echoed only the last character typed after
        each edit: the screen showed another line than the one that ran."""
        history = open_history(self.history_path)  # kept, for a terminal that recalls it
        reader = PlainLines(sys.stdin.fileno())

        def dropped() -> None:  # Ctrl-C at the prompt: the terminal dropped the line
            if reader.waiting:
                reader.pending = b""
                print(f"\n{PROMPT}", end="", flush=True)

        self._plain = reader
        self.interrupts.on_dropped = dropped
        try:
            with self.interrupts.interactive():
                while True:
                    print(PROMPT, end="", flush=True)
                    line = await reader.readline()
                    if line is None:
                        print()  # Ctrl-D: the shell's prompt ends its line
                        break
                    lines = [line, *reader.held()]  # a paste's others with it
                    for each in lines:
                        if each.strip():
                            history.append_string(each)
                    for command in entered_commands("\n".join(lines)):
                        if not await self._run_interruptibly(command):
                            break
        finally:
            self.interrupts.on_dropped = None
            await self._end()
        return 0

    async def _run_interruptibly(self, line: str) -> bool:
        """Run ``line``; Ctrl-C while it runs (a daemon that does not answer, a
        reconnection that hangs) abandons it and returns to the prompt instead of
        ending the shell.  Whether it ran to its end (not interrupted).

        At the prompt prompt_toolkit reads Ctrl-C as a key; while a command runs
        the terminal is in cooked mode and Ctrl-C is SIGINT (:mod:`.interrupt`).
        """
        task = asyncio.ensure_future(self._run(line))
        with self.interrupts.abandoning(task):
            try:
                await task
            except asyncio.CancelledError:
                if self.interrupts.abandoned is not task:
                    raise
                _say(
                    self.renderer.error(
                        "interrupted while connecting to migblockd: nothing was sent"
                        if self._connecting else
                        "interrupted: a request already sent may still take effect;"
                        " its reply will not be shown"
                    )
                )
                return False
        return True

    async def _run(self, line: str) -> None:
        if not line.strip() or line.lstrip().startswith("#"):
            return
        self._connecting = True
        try:
            if await self.connection.ensure_open():
                _say(
                    self.renderer.notice(
                        f"Reconnected to {describe_greeting(self.connection.greeting)}"
                    )
                )
        except ConnectError as err:
            _say(self.renderer.error(f"error: {err}"))
            if not _asks_for_help(line):
                return
            # help is the shell's own: with the daemon down (when it is most
            # needed) it is told from the schema of the daemon last connected, which
            # Tab completes from meanwhile too, rather than not at all.
            _say(self.renderer.notice(
                f"help from {describe_greeting(self.connection.greeting)}, as last connected:"))
        self._connecting = False
        try:
            await self.runner.run_line(line)
        except ConnectionLost:
            _say(
                self.renderer.error(
                    "error: the connection was lost before the reply arrived;"
                    " the command may or may not have taken effect"
                )
            )

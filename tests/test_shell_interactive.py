"""migblock-shell driven in a pseudo-terminal (pexpect) against a real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, DaemonProcess, quick_shell
from fakeqmp import GREETING, SILENT, Raw, serving
from otheruids import Account
from qmpclient import qemu_qmp_client

from migblockd import __version__
from migblockd.shell.interrupt import Interrupts

PROMPT = "(migblockd)"  # prompt_toolkit draws the trailing space as a cursor move
ESCAPES = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\s)*"
CTRL_C = "\x03"
CTRL_D = "\x04"


class Shell:
    def __init__(self, child: pexpect.spawn, state: Path) -> None:
        self.child = child
        self.state = state

    def expect(self, text: str) -> None:
        self.child.expect_exact(text)

    def send(self, text: str) -> None:
        self.child.send(text)

    def sent(self, line: str) -> None:
        """Type ``line`` and wait until the shell has sent it (needs ``-v``): a Ctrl-C
        typed sooner can reach the prompt, still reading, as the next line's."""
        self.child.send(line + "\r")
        self.child.expect_exact("\x1b[?2004l")  # the prompt is done with the line
        self.child.expect_exact('{"execute"')  # -v: the request as it is sent

    def transcript(self) -> str:
        """Everything the shell wrote to the terminal so far."""
        log = self.child.logfile_read
        assert isinstance(log, io.StringIO)
        return log.getvalue()

    def quit(self) -> int:
        self.child.send(CTRL_D)
        self.child.expect(pexpect.EOF)
        self.child.close()
        status: int = self.child.exitstatus
        return status


@pytest.fixture
def spawn_shell(tmp_path: Path) -> Iterator[Callable[..., Shell]]:
    children: list[pexpect.spawn] = []

    def spawn(socket: Path, *args: str,
              connected: str = f"Connected to migblockd {__version__} ",
              bound: float | None = None) -> Shell:
        """``bound``: the seconds each wait of connecting is given (quick_shell)."""
        env = dict(os.environ)
        env.pop("NO_COLOR", None)
        env.update(
            TERM="xterm",
            XDG_STATE_HOME=str(tmp_path / "state"),
            PROMPT_TOOLKIT_NO_CPR="1",  # the pty does not answer cursor position requests
        )
        program = (quick_shell(bound) if bound is not None
                   else [sys.executable, "-m", "migblockd.shell"])
        child = pexpect.spawn(
            program[0],
            [*program[1:], str(socket), *args],
            env=env,
            encoding="utf-8",
            timeout=30,
            dimensions=(40, 200),
        )
        child.logfile_read = io.StringIO()  # the whole transcript, for assertions
        children.append(child)
        shell = Shell(child, tmp_path / "state")
        shell.expect(connected)
        shell.expect(PROMPT)
        return shell

    yield spawn
    for child in children:
        if child.isalive():
            child.terminate(force=True)


async def _add_blocker_from_another_client(socket: Path, reason: str) -> None:
    async with qemu_qmp_client(socket, "other-operator") as client:
        await client.execute("add-blocker", {"reason": reason, "modes": ["cpr-exec"]})


def test_complete_run_and_see_an_event_while_typing(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    shell = spawn_shell(daemon.socket)

    # Complete the command name, an argument name and an enum value, then run it.
    # (prompt_toolkit draws only what a completion inserts.)
    shell.send("add-bl\t")
    shell.expect("ocker")  # and a space: the arguments follow at once
    shell.send("reason=first mo\t")
    shell.expect("des=")
    shell.send("cpr-reb\t")
    shell.expect("oot")
    shell.send("\r")
    shell.expect('"event": "BLOCKER_ADDED"')  # our own blocker's event...
    shell.expect('"return": {"id": ')  # ...comes before the reply
    shell.expect('"modes": ["cpr-reboot"]')
    shell.expect(PROMPT)

    # Half-type a command; another client adds a blocker meanwhile.
    shell.send("query-bl")
    shell.expect("query-bl")
    asyncio.run(_add_blocker_from_another_client(daemon.socket, "from elsewhere"))
    shell.expect('"event": "BLOCKER_ADDED"')
    shell.expect('"reason": "from elsewhere"')
    # The prompt is redrawn below the event with the half-typed line intact...
    shell.child.expect(re.escape(PROMPT) + ESCAPES + "query-bl")
    # ...and it still completes and runs as typed.
    shell.send("\t")
    shell.expect("ockers")  # completion runs asynchronously: wait for it
    shell.send("\r")
    shell.child.expect(r'\{"return": \[\{[^\r\n]*\r?\n')
    reply = json.loads(shell.child.after)
    assert sorted(b["reason"] for b in reply["return"]) == ["first", "from elsewhere"]
    shell.expect(PROMPT)
    assert shell.quit() == 0

    history = (shell.state / "migblockd" / "shell-history").read_text()
    assert "+query-blockers" in history
    assert "+add-blocker reason=first modes=cpr-reboot" in history


def test_ctrl_c_drops_the_line_and_errors_are_red(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    shell = spawn_shell(daemon.socket)
    shell.send("del-blocker id=would-fail")
    shell.expect("would-fail")
    shell.send(CTRL_C)
    shell.send("query-migrate\r")
    # The dropped line never ran: the next output is query-migrate's reply.
    shell.child.expect(r'\{"return": \{\}\}|GenericError')
    assert shell.child.after == '{"return": {}}'
    shell.expect(PROMPT)

    shell.send("del-blocker id=nope\r")
    shell.expect('\x1b[1;31m{"error": {"class": "GenericError"')
    shell.expect(PROMPT)
    shell.send("add-blocker reason='a b\r")
    shell.expect("\x1b[1;31merror: unterminated ' quote")
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_unknown_names_are_refused_with_a_suggestion_and_never_sent(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    shell = spawn_shell(daemon.socket)
    shell.send("add-bloker reason=x\r")
    shell.expect("\x1b[1;31merror: unknown command 'add-bloker'; did you mean 'add-blocker'?")
    shell.expect(PROMPT)
    shell.send("add-blocker reson=x\r")
    shell.expect(
        "\x1b[1;31merror: unknown argument 'reson' for add-blocker; did you mean 'reason'?"
    )
    shell.expect(PROMPT)
    # The session goes on, and nothing was added.
    shell.send("query-blockers\r")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0
    # The daemon's debug log shows each request it received: none of the refused.
    daemon.wait_for_log(re.compile(r' <- b.*"execute": ?"query-blockers"'))
    assert daemon.received() == ["qmp_capabilities", "query-qmp-schema", "query-commands",
                                 "query-blockers"]


def test_help_pretty_and_verbose(daemon: DaemonProcess, spawn_shell: Callable[..., Shell]) -> None:
    shell = spawn_shell(daemon.socket, "-p", "-v")
    shell.send("help add-blocker\r")
    shell.expect("reason: string (required)")
    shell.expect("modes: [MigMode] (optional)")
    shell.expect(PROMPT)
    shell.send("add-blocker reason=x\r")
    shell.expect('"execute": "add-blocker"')  # -v shows the request
    shell.child.expect(r'"return": \{\r?\n        "added"')  # -p: qmp-shell's indent, sorted
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_json_nested_too_deeply_is_an_error_line_not_the_end_of_the_shell(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    """Before, pasting a value nested deeper than Python's decoder recurses ended
    the session with a RecursionError traceback."""
    shell = spawn_shell(daemon.socket)
    deep = "[" * 100_000 + "]" * 100_000
    # Pasted (bracketed paste), as such a line would be: prompt_toolkit then
    # takes it as one key press instead of redrawing the line for each character.
    shell.send(f"\x1b[200~add-blocker reason=x modes={deep}\x1b[201~\r")
    shell.child.expect(r"Traceback|error: 'modes': invalid JSON value \[+\.\.\.: nested too deeply")
    assert shell.child.after.startswith("error:")
    shell.expect(PROMPT)
    shell.send("query-version\r")
    shell.expect('{"return": {"qemu"')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_escape_keys_edit_and_a_pasted_escape_is_shown_not_obeyed(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    """Esc alone, Esc then Enter, and Alt keys (Esc then the key) are editing keys at
    the prompt (prompt_toolkit's Emacs bindings), and leave the shell running.  A
    line that carries an ESC (pasted) is refused with the ESC written as ``\\x1b``:
    it used to be written out as it was, and the terminal obeyed it (ESC [ A: the
    message overwrote the line above)."""
    shell = spawn_shell(daemon.socket)
    shell.send("\x1b")
    time.sleep(1)  # longer than prompt_toolkit waits for a key after a lone Esc
    shell.send("\x1b\r")  # Alt-Enter: accepts the (empty) line, as Enter does
    shell.expect(PROMPT)
    # Alt-b back a word, Alt-f forward, Alt-Backspace deletes the word before.
    shell.send("migrate\x1bbquery-\x1bf x\x1b\x7f\r")
    shell.expect('{"return": {}}')
    shell.expect(PROMPT)
    shell.send("\x1b[200~help \x1b[A\x1b[201~\r")
    shell.child.expect(r"error: help: the daemon has no command, event or type '[^\r\n]*'")
    assert shell.child.after.endswith("'\\x1b[A'")
    shell.expect(PROMPT)
    shell.send("query-version\r")
    shell.expect('{"return": {"qemu"')
    shell.expect(PROMPT)
    assert shell.quit() == 0
    assert "Traceback" not in shell.transcript()


def test_a_greeting_that_would_steer_the_terminal_is_shown_escaped(
    tmp_path: Path, spawn_shell: Callable[..., Shell]
) -> None:
    # "Connected to ..." printed the server's package as it was: its ESC [ 2 J
    # cleared the operator's screen.  (migblockd's greeting never holds one.)
    path = tmp_path / "not-migblockd.sock"
    greeting = {"QMP": {**GREETING["QMP"], "version": {
        **GREETING["QMP"]["version"], "package": "evil\x1b[2J\x1b[31mred\u009b"}}}
    with serving(path, greeting):
        shell = spawn_shell(path, connected="Connected to evil\\x1b[2J\\x1b[31mred\\x9b "
                            "(QMP server version 9.2.0)")
        assert shell.quit() == 0
    assert "\x1b[2J" not in shell.transcript()
    assert "\x9b" not in shell.transcript()


def test_a_greeting_whose_version_is_not_qemus_shape_is_shown_as_unknown(
    tmp_path: Path, spawn_shell: Callable[..., Shell]
) -> None:
    # Its "qemu" a string: the shell ended with a traceback.
    path = tmp_path / "not-migblockd.sock"
    greeting = {"QMP": {"version": {"qemu": "x", "package": 5}, "capabilities": []}}
    with serving(path, greeting):
        shell = spawn_shell(path, connected="Connected to 5 (QMP server version ?.?.?)")
        assert shell.quit() == 0
    assert "Traceback" not in shell.transcript()


def test_a_reply_the_shell_cannot_read_is_said_to_be_the_shells_doing(
    tmp_path: Path, spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: the shell closed the connection itself (a NaN in a reply, a
    # reply over its limit) and said "migblockd closed the connection", sending the
    # operator to a daemon whose log shows nothing; a script said the true reason.
    path = tmp_path / "nan.sock"
    with serving(path, GREETING, {"query-version": Raw('{"a": NaN}')}):
        shell = spawn_shell(path, connected="Connected to QMP server 9.2.0")
        shell.send("query-version\r")
        shell.expect("a message from the daemon cannot be read (NaN is not JSON), so the "
                     "shell closed the connection; the next command reconnects")
        shell.expect(PROMPT)
        assert shell.quit() == 0
    assert "migblockd closed the connection" not in shell.transcript()


def test_a_pasted_block_runs_each_command_in_turn(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    """Several lines pasted at once arrive as one entry (bracketed paste).  Reported:
    they were read as one command, and the shell said ``expected key=value, got
    'query-blockers'``.  Each line runs, in order, as bash runs a pasted block; a raw
    JSON request pasted pretty-printed runs whole."""
    shell = spawn_shell(daemon.socket)
    shell.send("\x1b[200~add-blocker reason=pasted id=p\r"
               '{\r  "execute": "query-blockers"\r}\r'
               "\r"
               "del-blocker id=p\rquery-blockers\x1b[201~\r")
    shell.expect('{"return": {"id": "p", "reason": "pasted"')
    shell.expect('{"return": [{"id": "p", "reason": "pasted"')
    shell.expect('{"return": {}}')
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0
    assert "error" not in shell.transcript()


def test_a_pasted_request_that_never_parses_leaves_the_lines_after_it_to_run(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    """Reported: a pasted raw JSON line that never parsed took every line after it
    into one request, and they all went unrun behind its error."""
    shell = spawn_shell(daemon.socket)
    shell.send('\x1b[200~{"execute": "query-version"\r'
               "add-blocker reason=after-bad-json id=abj\r"
               "query-migrate\x1b[201~\r")
    shell.expect("error: invalid JSON: Expecting ',' delimiter")
    shell.expect('{"return": {"id": "abj", "reason": "after-bad-json"')
    shell.expect('{"return": {"blocked-reasons": ["after-bad-json"]')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_a_pasted_qmp_shell_transaction_is_refused_whole(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    """Found by review: a qmp-shell transaction( ... ) block pasted from its docs ran
    each action alone, at once, between two errors; none of it is sent now."""
    shell = spawn_shell(daemon.socket)
    shell.send("\x1b[200~transaction(\radd-blocker reason=t1 id=t1\r"
               "add-blocker reason=t2 id=t2\r)\rquery-blockers\x1b[201~\r")
    shell.expect("error: qmp-shell's transaction( ... ) block is not read by this shell: "
                 "none of its lines was sent")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    shell.send("transaction(\r")  # typed: refused at once, before any action is typed
    shell.expect("error: qmp-shell's transaction( ... ) block is not read")
    shell.expect(PROMPT)
    assert shell.quit() == 0
    assert shell.transcript().count("error") == 2


def _stopped_under(start_daemon: Callable[..., DaemonProcess],
                   spawn_shell: Callable[..., Shell],
                   bound: float | None = None) -> tuple[DaemonProcess, Shell]:
    """A shell whose daemon stopped (it has said so), and that stopped daemon."""
    first = start_daemon()
    shell = spawn_shell(first.socket, bound=bound)
    first.stop()
    shell.expect("migblockd closed the connection; the next command reconnects")
    return first, shell


def test_reconnects_after_the_daemon_restarts(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    first, shell = _stopped_under(start_daemon, spawn_shell)
    shell.send("query-version\r")
    shell.expect("error: cannot connect to")  # still down: the shell stays up
    shell.expect(PROMPT)
    start_daemon(socket=first.socket)
    shell.send("query-blockers\r")
    shell.expect("Reconnected to migblockd")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_help_is_shown_while_the_daemon_is_down(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: help, the shell's own command, answered only "cannot connect"
    # while the daemon was down, when the operator needs it most.
    first, shell = _stopped_under(start_daemon, spawn_shell)
    shell.send("help add-blocker\r")
    shell.expect("error: cannot connect to")  # it still tries: a new daemon's schema
    shell.expect(f"help from migblockd {__version__} (QMP server version {__version__}), "
                 "as last connected:")
    shell.expect("add-blocker (command)")
    shell.expect("reason: string (required)")
    shell.expect(PROMPT)
    shell.send("help\r")
    shell.expect("error: cannot connect to")
    shell.expect("query-blockers")
    shell.expect("Ctrl-D exits.")
    shell.expect(PROMPT)
    # A command still fails, and is not sent anywhere.
    shell.send("query-version\r")
    shell.expect("error: cannot connect to")
    shell.expect(PROMPT)
    start_daemon(socket=first.socket)
    shell.send("query-blockers\r")
    shell.expect("Reconnected to migblockd")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    transcript = shell.transcript()
    assert transcript.count("as last connected:") == 2  # the two helps, not the command
    assert shell.quit() == 0


def test_reconnecting_to_a_daemon_whose_queue_is_full_says_so(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    first, shell = _stopped_under(start_daemon, spawn_shell)
    second = start_daemon(socket=first.socket)
    with second.stopped_with_full_backlog():
        shell.send("query-version\r")
        shell.expect(f"error: cannot connect to {first.socket}: the daemon is not accepting "
                     "connections (its queue of pending connections is full: is it stopped "
                     "or hung?)")
        shell.expect(PROMPT)
    shell.send("query-blockers\r")
    shell.expect("Reconnected to migblockd")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0


@pytest.mark.parametrize("silent", ["qmp_capabilities", "query-qmp-schema", "query-commands"])
def test_reconnecting_to_a_server_that_never_answers_gives_up_and_the_shell_goes_on(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell], silent: str
) -> None:
    # Found by review: after the greeting, only qmp_capabilities had a bound; a
    # restarted daemon that hung on the queries the shell makes next held the
    # command (and the prompt) until Ctrl-C.
    first, shell = _stopped_under(start_daemon, spawn_shell, bound=0.5)
    first.socket.unlink(missing_ok=True)
    with serving(first.socket, GREETING, {silent: SILENT}):
        shell.send("query-version\r")
        shell.expect(f"error: {first.socket}: no answer to {silent} within 0.5s")
        shell.expect(PROMPT)
    start_daemon(socket=first.socket)
    shell.send("query-blockers\r")
    shell.expect("Reconnected to migblockd")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_ctrl_c_while_waiting_for_a_reply_returns_to_the_prompt(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    shell = spawn_shell(daemon.socket, "-v")
    daemon.signal(signal.SIGSTOP)  # a daemon that does not answer
    try:
        shell.send("query-blockers\r")
        shell.expect('{"execute": "query-blockers"}')  # -v: it is being sent
        shell.send(CTRL_C)
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
    finally:
        daemon.signal(signal.SIGCONT)
    # The shell is still connected; the late reply to the abandoned request is
    # not shown in place of the next one's.
    shell.send("add-blocker reason=after\r")
    shell.expect('"return": {"id": ')
    shell.expect('"reason": "after"')
    shell.expect(PROMPT)
    # Ctrl-C at the prompt still only drops the line.
    shell.send("query-bl")
    shell.expect("query-bl")
    shell.send(CTRL_C)
    assert shell.quit() == 0


async def test_what_a_command_says_is_written_before_the_next_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found under load: twice a test waited 30 s for the prompt after "error: cannot
    connect".  The shell printed through ``patch_stdout``'s proxy, whose thread,
    finding no prompt running (a command was), wrote straight to the terminal, but
    only when it got to it: on a busy machine after the next prompt was drawn.  The
    text then stood below the prompt, which was never drawn again.  That thread is
    held back here until the next prompt is on the screen."""
    from prompt_toolkit.application import create_app_session  # noqa: PLC0415
    from prompt_toolkit.data_structures import Size  # noqa: PLC0415
    from prompt_toolkit.input import create_pipe_input  # noqa: PLC0415
    from prompt_toolkit.output.vt100 import Vt100_Output  # noqa: PLC0415
    from prompt_toolkit.patch_stdout import StdoutProxy  # noqa: PLC0415

    from migblockd.qapi.doc import SchemaDocs  # noqa: PLC0415
    from migblockd.shell.render import Renderer  # noqa: PLC0415
    from migblockd.shell.repl import Interactive  # noqa: PLC0415

    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("PROMPT_TOOLKIT_NO_CPR", "1")
    release = threading.Event()
    write_and_flush = StdoutProxy._write_and_flush

    def held_back(self: StdoutProxy, loop: asyncio.AbstractEventLoop | None, text: str) -> None:
        release.wait(10)
        write_and_flush(self, loop, text)

    monkeypatch.setattr(StdoutProxy, "_write_and_flush", held_back)
    screen = tmp_path / "terminal"
    with (screen.open("w") as terminal, create_pipe_input() as keys,
          create_app_session(input=keys, output=Vt100_Output(
              terminal, lambda: Size(rows=40, columns=200), term="xterm")) as session):
        shell = Interactive(str(tmp_path / "no-daemon.sock"), Renderer(), SchemaDocs.empty(),
                            verbose=False, history=tmp_path / "history")
        running = asyncio.ensure_future(shell.loop())

        async def next_prompt(after: object) -> object:
            """The prompt run after ``after``, once it is drawn (at its start)."""
            for _ in range(1000):
                app = session.app
                if app is not None and app.is_running and app.future is not after:
                    return app.future
                await asyncio.sleep(0.01)
            raise AssertionError("no prompt")

        try:
            first = await next_prompt(None)
            keys.send_text("query-version\r")
            await next_prompt(first)
            seen = screen.read_text()
        finally:
            release.set()
            keys.send_text(CTRL_D)
            await asyncio.wait_for(running, 10)
    assert "error: cannot connect to" in seen, seen
    # The prompt drawn after the error, on the screen to type at.
    assert seen.rindex(PROMPT) > seen.index("error: cannot connect to"), seen


async def test_a_ctrl_c_taken_after_its_command_ended_does_not_end_the_shell() -> None:
    """Reported: Ctrl-C pressed while a 20,000-blocker reply was read and printed ended
    the interactive shell (status 130), where it returns to the prompt.  The loop took
    the signal after the command's task had ended (inside its ``abandoning`` block,
    or just after it): it is dropped, as at the prompt.  Real SIGINTs, through the
    loop's handler; outside the interactive loop (connecting, scripts) the first
    still ends the shell."""
    interrupts = Interrupts()
    reached_the_end = asyncio.Event()

    async def shell() -> None:
        interrupts.install()  # this task is the one a Ctrl-C cancels
        try:
            with interrupts.interactive():
                command = asyncio.ensure_future(asyncio.sleep(0))
                await command
                with interrupts.abandoning(command):
                    os.kill(os.getpid(), signal.SIGINT)
                    await asyncio.sleep(0.05)  # the loop reads the signal
                os.kill(os.getpid(), signal.SIGINT)  # between two commands
                await asyncio.sleep(0.05)
            assert interrupts.count == 0 and interrupts.abandoned is None
            reached_the_end.set()
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(5)
        finally:
            interrupts.uninstall()

    task = asyncio.create_task(shell())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reached_the_end.is_set() and interrupts.count == 1


def _sockets(pid: int) -> int:
    """How many sockets process ``pid`` holds open."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def test_ctrl_c_while_reconnecting_says_nothing_was_sent(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # It used to say "a request already sent may still take effect" of a command
    # that was never sent: the shell was still waiting for the restarted daemon.
    first, shell = _stopped_under(start_daemon, spawn_shell)
    second = start_daemon(socket=first.socket)
    second.signal(signal.SIGSTOP)  # takes the connection, never greets
    try:
        idle = _sockets(shell.child.pid)
        shell.send("del-blocker id=gone\r")
        for _ in range(600):  # until the shell is connected, waiting for the greeting
            if _sockets(shell.child.pid) > idle:
                break
            time.sleep(0.05)
        shell.send(CTRL_C)
        shell.expect("interrupted while connecting to migblockd: nothing was sent")
        shell.expect(PROMPT)
    finally:
        second.signal(signal.SIGCONT)
    assert "already sent" not in shell.transcript()
    shell.send("query-blockers\r")
    shell.expect("Reconnected to migblockd")
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0


@pytest.mark.parametrize("typed", ["query-version", '{"execute": "query-version"}'],
                         ids=["command", "raw-json-without-id"])
def test_the_late_answer_to_an_abandoned_request_is_not_the_next_ones(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell], typed: str
) -> None:
    # A request over --max-message-size is answered without its id (the daemon, like
    # QEMU, could not read it), in request order.  Abandoned with Ctrl-C, its answer
    # still comes, and must not be shown as the reply to the command typed next; nor
    # to a raw request, sent as typed, without an id, whose answer has none either.
    daemon = start_daemon("--ephemeral", "--max-message-size", "1024")
    shell = spawn_shell(daemon.socket, "-v")
    daemon.signal(signal.SIGSTOP)  # both requests reach it before it answers either
    try:
        shell.send(f"add-blocker reason={'x' * 1000} id={'y' * 100}\r")
        shell.expect('{"execute": "add-blocker"')
        shell.send(CTRL_C)
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
        shell.send(f"{typed}\r")
        shell.expect('{"execute": "query-version"}')
    finally:
        daemon.signal(signal.SIGCONT)
    shell.child.expect(r'"package": "migblockd|JSON token size limit exceeded')
    assert shell.child.after.startswith('"package"'), shell.transcript()[-2000:]
    shell.expect(PROMPT)
    assert "limit exceeded" not in shell.transcript()
    assert shell.quit() == 0


def test_an_id_still_awaited_is_refused_for_the_next_request(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: a raw request abandoned with Ctrl-C, then another with the
    # same id (the habitual "id": 1), was shown the first one's reply, and its own
    # was dropped: the replies cannot be told apart.
    daemon = start_daemon("--ephemeral")
    shell = spawn_shell(daemon.socket, "-v")
    daemon.signal(signal.SIGSTOP)  # the first request waits for its reply
    try:
        shell.sent('{"execute": "query-version", "id": 1}')
        shell.send(CTRL_C)
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
        shell.send('{"execute": "add-blocker", "arguments": {"reason": "r"}, "id": 1}\r')
        shell.expect("error: id 1 is still awaited by an earlier request, whose reply has "
                     "not come; give this one another id")
        shell.expect(PROMPT)
    finally:
        daemon.signal(signal.SIGCONT)
    shell.send('{"execute": "query-blockers", "id": 2}\r')
    shell.expect('{"return": [], "id": 2}')  # nothing was added
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_an_exec_oob_without_id_is_refused_while_a_reply_is_awaited(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # Found by the shell review: a reply without an id is taken for the oldest request
    # not yet answered, which holds for in-band requests (answered in order), not
    # for an exec-oob one, which the daemon, as QEMU, runs ahead of those queued.
    # After a request abandoned with Ctrl-C, {"exec-oob": "query-blockers"} without
    # an id got the abandoned query-version's reply shown as its own.
    daemon = start_daemon("--ephemeral")
    shell = spawn_shell(daemon.socket, "-v")
    daemon.signal(signal.SIGSTOP)  # both requests reach it before it answers either
    try:
        shell.sent('{"execute": "query-version"}')
        shell.send(CTRL_C)
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
        shell.send('{"exec-oob": "query-blockers"}\r')
        shell.expect("\x1b[?2004l")  # the prompt is done with the line
        # Refused, or (before the fix) sent: -v shows it as it goes.
        shown = shell.child.expect_exact([
            "error: an exec-oob request without an id cannot be told from the earlier "
            "request still awaited, whose reply has not come: give it an id",
            '{"exec-oob"'])
        assert shown == 0, shell.transcript()[-2000:]
        shell.expect(PROMPT)
    finally:
        daemon.signal(signal.SIGCONT)
    # The same request, now that nothing else is awaited, runs without an id.
    shell.send('{"execute": "query-version", "id": "w"}\r')
    shell.expect('"id": "w"}')
    shell.expect(PROMPT)
    shell.send('{"exec-oob": "query-blockers"}\r')
    shell.expect('{"return": []}')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_an_id_the_shell_makes_is_never_one_a_typed_request_awaits(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: the shell numbers its own requests "shell-N" (qmp_capabilities,
    # query-qmp-schema and query-commands take 1 to 3).  A raw request typed with the
    # next one, abandoned with Ctrl-C, and the next command got the same id: the first
    # request's reply was shown as the command's, and the command's own was dropped.
    daemon = start_daemon("--ephemeral")
    shell = spawn_shell(daemon.socket, "-v")
    daemon.signal(signal.SIGSTOP)  # the typed request waits for its reply
    try:
        shell.sent('{"execute": "query-blockers", "id": "shell-4"}')
        shell.send(CTRL_C)
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
        shell.sent("add-blocker reason=mine id=b1")
        # Not a timing assertion: should the daemon wake before the request reaches
        # it, the typed one is answered first and the test passes without the fix.
        time.sleep(0.3)
    finally:
        daemon.signal(signal.SIGCONT)
    # The typed request's reply ({"return": []}) is not the command's to show.
    shown = shell.child.expect([r'"return": \{"id": "b1"', r'"return": \[\]'])
    assert shown == 0, shell.transcript()[-2000:]
    shell.expect(PROMPT)
    shell.send("query-blockers\r")
    shell.expect('"id": "b1"')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_the_history_file_is_made_readable_by_its_user_alone(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell], tmp_path: Path
) -> None:
    # Found by review: it was made with the umask's mode (0644), where bash and
    # readline (so qmp-shell) make theirs 0600; its directory, made by hand, may
    # let others in.
    state = tmp_path / "state" / "migblockd"
    state.mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    old = os.umask(0o022)
    try:
        shell = spawn_shell(daemon.socket)
    finally:
        os.umask(old)
    shell.send("query-version\r")
    shell.expect('{"return": {"qemu"')
    shell.expect(PROMPT)
    assert shell.quit() == 0
    history = state / "shell-history"
    assert "+query-version" in history.read_text()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600


def test_no_home_keeps_the_history_in_memory(tmp_path: Path) -> None:
    """A bare uid (no $HOME, no account): before, the shell died with a traceback
    (Path.home()) before it connected."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as a uid that has no account")
    def has_account(uid: int) -> bool:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return False
        return True

    uid = next(u for u in range(23456, 24000) if not has_account(u))
    code = ("from migblockd.shell.history import history_path; "
            "from migblockd.shell.repl import open_history; "
            "path = history_path(); print(path, type(open_history(path)).__name__)")
    proc = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
         "-c", code], env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "warning: history not saved (no home directory: set HOME or XDG_STATE_HOME)",
        "None SessionMemoryHistory"]



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_the_history_leaves_the_daemons_default_state_directory_usable(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path, short_tmp: Path,
    accounts: dict[str, Account]
) -> None:
    """The shell's history is kept in the daemon's default state directory
    (``~/.local/state/migblockd``).  Before, the shell made the missing
    ``~/.local`` and ``~/.local/state`` with the umask's mode (0775 under umask
    002), and the daemon then refused to keep its state there ("writable by
    others")."""
    olga = accounts["mbt-olga"]
    short_tmp.chmod(0o755)
    home, run = short_tmp / "home", short_tmp / "run"
    for directory in (home, run):
        directory.mkdir(mode=0o750)
        os.chown(directory, olga.uid, olga.gid)
    as_olga = tmp_path / "as-olga"
    as_olga.write_text(f"#!/bin/sh\numask 002\nexec setpriv --reuid={olga.uid} "
                       f"--regid={olga.gid} --clear-groups {sys.executable} \"$@\"\n")
    as_olga.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(home),
           "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    daemon = start_daemon("--ephemeral", socket=run / "s.sock", env=env, python=str(as_olga))
    child = pexpect.spawn(str(as_olga), ["-m", "migblockd.shell", str(daemon.socket)],
                          env=env, encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.logfile_read = io.StringIO()
    shell = Shell(child, home / ".local" / "state")
    try:
        shell.expect(PROMPT)
        shell.send("query-version\r")
        shell.expect('{"return": {"qemu"')
        shell.expect(PROMPT)
        assert shell.quit() == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert daemon.stop() == 0
    state = home / ".local" / "state" / "migblockd"
    assert "+query-version" in (state / "shell-history").read_text()
    for made in (home / ".local", home / ".local" / "state", state):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    # The daemon of the same user, under the same umask, keeps its state there.
    durable = start_daemon("--state-dir", str(state), socket=run / "s.sock", env=env,
                           python=str(as_olga))
    durable.wait_for_log(f"created {state}/state.db")


@pytest.mark.parametrize("breakage", ["a directory in its place", "its directory removed"])
def test_a_history_file_that_fails_is_named_once_and_the_shell_goes_on(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell], tmp_path: Path, breakage: str
) -> None:
    """A history file that cannot be read at start, or written later (a full disk
    fails there the same way): before, each line printed prompt_toolkit's
    traceback and waited for Enter ("Press ENTER to continue...")."""
    history = tmp_path / "state" / "migblockd" / "shell-history"
    if breakage == "a directory in its place":
        history.mkdir(parents=True)
        reason = "Is a directory"
    shell = spawn_shell(daemon.socket)
    if breakage == "its directory removed":
        shutil.rmtree(tmp_path / "state")
        reason = "No such file or directory"
    for _ in range(2):
        shell.send("query-version\r")
        shell.child.expect(r"Traceback|Press ENTER|\{\"return\": \{\"qemu\"")
        assert shell.child.after == '{"return": {"qemu"', shell.child.before
        shell.expect(PROMPT)
    # The lines are still recalled in this session (Up, then Enter runs it again).
    shell.send("\x1b[A\r")
    shell.expect('{"return": {"qemu"')
    shell.expect(PROMPT)
    assert shell.quit() == 0
    seen = shell.transcript()
    assert seen.count(f"warning: history not saved ({history}: {reason})") == 1
    assert "Traceback" not in seen


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/null", "no home", "home a file"])
def test_a_history_file_that_is_no_file_is_not_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        kind: str) -> None:
    # Found by review: a FIFO in the history's place blocked the shell on its open
    # for good (deaf to Ctrl-C and Ctrl-D), a link to /dev/zero fed it without end,
    # and a HOME that did not exist was made, as root, with the history under it.
    from migblockd.shell.history import history_path  # noqa: PLC0415
    from migblockd.shell.repl import open_history  # noqa: PLC0415

    home = tmp_path / "home"
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    if kind == "home a file":
        home.write_text("")
    elif kind == "no home":
        home = tmp_path / "none" / "x"
    monkeypatch.setenv("HOME", str(home))
    path = history_path()
    assert path is not None
    if kind not in ("no home", "home a file"):
        path.parent.mkdir(parents=True)
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(kind)
    history = open_history(path)  # before, a file history, whose first load blocked
    said = capsys.readouterr().out
    if kind == "/dev/null":  # the usual way to keep none: taken as a file
        assert said == ""
        assert type(history).__name__ == "SessionFallbackHistory"
        return
    assert type(history).__name__ == "SessionMemoryHistory"
    if kind == "no home":
        assert said == (f"warning: history not saved ({tmp_path}/none/x: the home directory "
                        "does not exist)\n")
        assert list(tmp_path.iterdir()) == []
    elif kind == "home a file":  # found by review: said "does not exist"
        assert said == (f"warning: history not saved ({home}: the home directory is not a "
                        "directory)\n")
    else:
        assert said == f"warning: history not saved ({path}: not a regular file)\n"


def test_a_terminal_whose_output_goes_to_a_file_gets_a_clean_transcript(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    # Found by review: `migblock-shell | tee session.log` from a terminal ran the
    # prompt into the pipe, and every reply came after lines of bare carriage
    # returns and indentation, on screen and in the log.
    log = tmp_path / "session.log"
    env = {**os.environ, "TERM": "xterm", "XDG_STATE_HOME": str(tmp_path / "state")}
    child = pexpect.spawn("sh", ["-c", '"$0" -m migblockd.shell "$1" > "$2"',
                                 sys.executable, str(daemon.socket), str(log)],
                          env=env, encoding="utf-8", timeout=30)
    try:
        child.sendline("query-blockers")
        child.sendline("add-bloker reason=x")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1  # the second line, as a script's
    assert log.read_text() == '{"return": []}\n'


def test_ctrl_z_suspends_the_shell_as_in_bash(daemon: DaemonProcess, tmp_path: Path) -> None:
    # Found by review: Ctrl-Z put a literal ^Z in the line (then "unknown command
    # '\x1aquery-version'"), where qmp-shell (readline) suspends.  Under a real
    # job-control shell: stopped, then brought back with fg.
    env = {**os.environ, "TERM": "xterm", "PS1": "$ ", "PROMPT_TOOLKIT_NO_CPR": "1",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("NO_COLOR", None)
    bash = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=env, encoding="utf-8",
                         timeout=30, dimensions=(24, 200))
    try:
        bash.expect_exact("$ ")
        bash.sendline(f"{sys.executable} -m migblockd.shell {daemon.socket}")
        bash.expect_exact("Ctrl-D quits.")
        bash.expect_exact(PROMPT)
        bash.send("\x1a")
        bash.expect("Stopped")
        bash.expect_exact("$ ")
        bash.sendline("fg")
        bash.send("query-version\r")
        bash.expect_exact('"qemu"')
        assert "unknown command" not in bash.before
        bash.send(CTRL_D)
        bash.expect_exact("$ ")
        bash.sendline("echo status=$?")
        bash.expect_exact("status=0")
    finally:
        bash.close(force=True)


def test_a_dumb_terminal_gets_plain_lines_and_no_control_sequences(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    # Found in use: with TERM=dumb (an Emacs shell buffer) prompt_toolkit reads
    # line by line, but every reply still came wrapped in the sequences that
    # print above a prompt, and errors and events in colour codes.
    env = {**os.environ, "TERM": "dumb", "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "migblockd.shell", str(daemon.socket)],
                          env=env, encoding="utf-8", timeout=30)
    child.logfile_read = io.StringIO()
    try:
        child.expect_exact("Ctrl-D quits.")
        child.expect_exact("(migblockd) ")
        child.send("query-blockers\r")
        child.expect_exact('query-blockers\r\n{"return": []}\r\n(migblockd) ')
        child.send("nosuch\r")
        child.expect_exact("error: unknown command 'nosuch'; 'help' lists the commands\r\n"
                           "(migblockd) ")
        asyncio.run(_add_blocker_from_another_client(daemon.socket, "dumb-event"))
        child.expect_exact('\r\n{"timestamp": ')  # on a line of its own...
        child.expect_exact('"event": "BLOCKER_ADDED"')
        child.expect_exact('"reason": "dumb-event"')
        child.expect_exact("}}\r\n(migblockd) ")  # ...and the prompt again
        # Found by review: prompt_toolkit's dumb mode echoed only the last character
        # after each edit, so the screen showed another line than the one that ran
        # (query-versionXn), and Up ran the previous line unseen.  The terminal
        # edits the line now (its cooked mode): what is shown is what runs.
        child.send("query-versionX\x7f\r")
        child.expect_exact('query-versionX\b \b\r\n{"return": {"qemu"')
        child.expect_exact("(migblockd) ")
        child.send("\x1b[A\r")  # no recall: the line is the key's bytes
        child.expect_exact("error: unknown command '\\x1b[A'")
        child.expect_exact("(migblockd) ")
        child.send("del-blocker id=dumb" + CTRL_C)  # the terminal drops the line
        child.expect_exact("^C\r\n(migblockd) ")
        child.send("del-blocker id=dumb\x1c")  # Ctrl-\ too (SIGQUIT: it ended the shell)
        child.expect_exact("^\\\r\n(migblockd) ")
        child.send("query-migrate\r")
        child.expect_exact('query-migrate\r\n{"return": {}}')
        child.expect_exact("(migblockd) ")
        child.send(CTRL_D)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    log = child.logfile_read
    assert isinstance(log, io.StringIO)
    after_greeting = log.getvalue().split("Ctrl-D quits.", 1)[1]
    assert re.findall(r"\x1b\[[0-9;?]*[A-Za-z]", after_greeting) == []  # Up echoed ^[[A
    assert "Tab completes" not in log.getvalue()
    assert "GenericError" not in log.getvalue()  # del-blocker never ran


def test_a_dumb_terminal_runs_a_pasted_request_whole(daemon: DaemonProcess, tmp_path: Path
                                                     ) -> None:
    # Found by review: on a dumb terminal (an Emacs shell buffer) a request pasted
    # pretty-printed was read a line at a time, each refused alone ("invalid JSON",
    # "expected key=value, got 'query-version'", "unknown command '}'"), where the
    # prompt_toolkit prompt and a script run it whole, as docs/shell.md says.
    env = {**os.environ, "TERM": "dumb", "XDG_STATE_HOME": str(tmp_path / "state")}
    child = pexpect.spawn(sys.executable, ["-m", "migblockd.shell", str(daemon.socket)],
                          env=env, encoding="utf-8", timeout=30)
    child.logfile_read = io.StringIO()
    try:
        child.expect_exact("(migblockd) ")
        # One write, as a terminal hands a paste over; the key=value lines with it
        # run each in turn, and the Ctrl-D after them ends the shell once they ran.
        child.send('{\n  "execute": "add-blocker",\n  "arguments": {"reason": "pasted",'
                   ' "id": "p1"}\n}\nquery-blockers\ndel-blocker id=p1\n' + CTRL_D)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    log = child.logfile_read
    assert isinstance(log, io.StringIO)
    replies = [json.loads(line) for line in log.getvalue().splitlines()
               if line.startswith(('{"return"', '{"error"'))]
    assert len(replies) == 3, replies
    assert replies[0]["return"]["id"] == "p1"
    assert [b["id"] for b in replies[1]["return"]] == ["p1"]
    assert replies[2] == {"return": {}}
    assert "error:" not in log.getvalue()


def _root_shell_in(socket: Path, env: dict[str, str]) -> Shell:
    """migblock-shell as root (this process) with ``env`` over the usual one."""
    full = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", **env}
    full.pop("XDG_STATE_HOME", None)
    full.update(env)
    child = pexpect.spawn(sys.executable, ["-m", "migblockd.shell", str(socket)], env=full,
                          encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.logfile_read = io.StringIO()
    return Shell(child, Path(env.get("XDG_STATE_HOME", env.get("HOME", "/"))))


def _tree(top: Path) -> list[tuple[str, int, int, int]]:
    """Every path below ``top``: name, owner, mode, size."""
    found = []
    for path in sorted(top.rglob("*")):
        st = path.lstat()
        found.append((str(path), st.st_uid, st.st_mode, st.st_size))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, in another user's home")
def test_root_in_another_users_home_makes_nothing_there(
    daemon: DaemonProcess, short_tmp: Path, accounts: dict[str, Account]
) -> None:
    """Reported: ``su`` (HOME still alice's) then migblock-shell made ~/.local,
    ~/.local/state and ~/.local/state/migblockd root's, 0700, and the history file
    in them: alice's own daemon could then not keep its state there."""
    olga = accounts["mbt-olga"]
    home = short_tmp / "home"
    home.mkdir(mode=0o750)
    os.chown(home, olga.uid, olga.gid)
    (home / ".local").mkdir(mode=0o700)  # hers, half made: the nearest that exists
    os.chown(home / ".local", olga.uid, olga.gid)
    before = _tree(home)
    shell = _root_shell_in(daemon.socket, {"HOME": str(home)})
    try:
        shell.expect(f"warning: history not saved ({home}/.local is mbt-olga's "
                     f"(uid {olga.uid}), not this user's (root): set XDG_STATE_HOME to a "
                     "directory of this user's)")
        shell.expect(PROMPT)
        shell.send("query-version\r")
        shell.expect('{"return": {"qemu"')
        shell.expect(PROMPT)
        shell.send("\x1b[A\r")  # kept for the session
        shell.expect('{"return": {"qemu"')
        shell.expect(PROMPT)
        assert shell.quit() == 0
    finally:
        if shell.child.isalive():
            shell.child.terminate(force=True)
    assert _tree(home) == before
    assert shell.transcript().count("history not saved") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, in another user's home")
@pytest.mark.parametrize("linked", ["file", "directory"])
def test_root_follows_no_link_of_another_user_in_their_home(
    daemon: DaemonProcess, short_tmp: Path, accounts: dict[str, Account], linked: str
) -> None:
    """Found by review: after ``su`` or ``sudo -E``, a history file that alice had
    linked to a file of root's (``/etc/sudoers``) was that file for the shell, root's,
    and root's commands were appended to it; a link of hers in place of
    ``~/.local/state`` had root make its history in the directory it names."""
    olga = accounts["mbt-olga"]
    home, roots = short_tmp / "home", short_tmp / "roots"
    roots.mkdir(mode=0o700)
    victim = roots / "config"
    victim.write_text("root's own\n")
    state = home / ".local" / "state"
    (state / "migblockd").mkdir(parents=True, mode=0o700)
    if linked == "file":
        link = state / "migblockd" / "shell-history"
        link.symlink_to(victim)
    else:
        shutil.rmtree(state)
        link = state
        link.symlink_to(roots)
        (roots / "migblockd").mkdir(mode=0o700)
    for path in (home, *home.rglob("*")):
        os.lchown(path, olga.uid, olga.gid)
    before = _tree(roots)
    shell = _root_shell_in(daemon.socket, {"HOME": str(home)})
    try:
        shell.expect(f"warning: history not saved ({link} is mbt-olga's (uid {olga.uid}), "
                     "not this user's (root): set XDG_STATE_HOME to a directory of this "
                     "user's)")
        shell.expect(PROMPT)
        shell.send("query-version\r")
        shell.expect('{"return": {"qemu"')
        shell.expect(PROMPT)
        assert shell.quit() == 0
    finally:
        if shell.child.isalive():
            shell.child.terminate(force=True)
    assert _tree(roots) == before
    assert victim.read_text() == "root's own\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, with another user's history file")
def test_another_users_history_file_is_read_and_never_written(
    daemon: DaemonProcess, short_tmp: Path, accounts: dict[str, Account]
) -> None:
    """Reported: a history file that could be read but not written (another user's,
    0644) was not read either: Up recalled nothing."""
    olga = accounts["mbt-olga"]
    state = short_tmp / "state"
    (state / "migblockd").mkdir(parents=True)
    history = state / "migblockd" / "shell-history"
    history.write_text("\n# 2026-01-01 00:00:00\n+query-blockers\n"
                       "\n# 2026-01-01 00:00:01\n+add-blocker reason=olgas id=olga\n")
    for path in (state, state / "migblockd", history):
        os.chown(path, olga.uid, olga.gid)
    before = _tree(state)
    shell = _root_shell_in(daemon.socket, {"XDG_STATE_HOME": str(state)})
    try:
        shell.expect(f"warning: history not saved ({history} is mbt-olga's (uid {olga.uid}),"
                     " not this user's (root): set XDG_STATE_HOME to a directory of this"
                     " user's)")
        shell.expect(PROMPT)
        shell.send("\x1b[A\r")  # her last entry
        shell.expect('{"return": {"id": "olga", "reason": "olgas"')
        shell.expect(PROMPT)
        shell.send("\x1b[A\x1b[A\x1b[A\r")  # the one before: this session's is not hers
        shell.expect('{"return": [{"id": "olga"')
        shell.expect(PROMPT)
        assert shell.quit() == 0
    finally:
        if shell.child.isalive():
            shell.child.terminate(force=True)
    assert _tree(state) == before
    assert shell.transcript().count("history not saved") == 1


def _bytes_read() -> int:
    """The bytes this process has read so far (rchar: every read(2), cached or not)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_only_the_history_files_last_entries_are_loaded(tmp_path: Path) -> None:
    """Reported: a 107 MB history took 1.2 s and 184 MB to load at each start.  Only
    the last 1000 entries are loaded, read from the end of the file: here a file
    of 8 GiB (sparse: before, read whole, one line of zeros) loads at once."""
    from migblockd.shell.history import MAX_LOADED, SessionFallbackHistory  # noqa: PLC0415

    path = tmp_path / "shell-history"
    with open(path, "wb") as file:
        file.truncate(8 << 30)
        file.seek(0, os.SEEK_END)
        for n in range(3000):
            lines = "".join(f"+line {n}.{k}\n" for k in range(n % 3 + 1))
            file.write(f"\n# 2026-01-01 00:00:00\n{lines}".encode())
    said: list[str] = []
    before = _bytes_read()
    loaded = list(SessionFallbackHistory(path, said.append).load_history_strings())
    # What was read, not how long it took: the end of the file, not its 8 GiB.
    assert _bytes_read() - before < 16 << 20
    assert said == []
    assert len(loaded) == MAX_LOADED == 1000
    assert loaded[:2] == ["line 2999.0\nline 2999.1\nline 2999.2",  # newest first, whole
                          "line 2998.0\nline 2998.1"]
    assert loaded[-1] == "line 2000.0\nline 2000.1\nline 2000.2"


def test_ctrl_backslash_while_waiting_is_ctrl_c_and_ends_nothing(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    """Reported: Ctrl-\\ (SIGQUIT: the terminal is in cooked mode while a command
    waits) killed the shell, whose docs say no key but Ctrl-D ends it."""
    shell = spawn_shell(daemon.socket, "-v")
    shell.send("\x1c")  # at the prompt: a key that does nothing
    daemon.signal(signal.SIGSTOP)
    try:
        shell.send("query-blockers\r")
        shell.expect('{"execute": "query-blockers"}')
        shell.send("\x1c")
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
    finally:
        daemon.signal(signal.SIGCONT)
    shell.send("query-version\r")
    shell.expect('{"return": {"qemu"')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def _read_until(fd: int, wanted: bytes) -> None:
    """Read the terminal ``fd`` until ``wanted`` has been written to it."""
    seen = b""
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, f"{wanted!r} not written; the terminal shows {seen[-500:]!r}"
        seen += os.read(fd, 65536)


@pytest.mark.parametrize("when", ["at the prompt", "while a command waits",
                                  "on a dumb terminal"])
def test_a_terminal_that_hangs_up_ends_the_session_in_one_line(
    daemon: DaemonProcess, tmp_path: Path, when: str
) -> None:
    # Found by review: where SIGHUP does not end the shell (ignored, as nohup or a
    # `trap '' HUP` leaves it), a terminal that hung up (its window closed, its ssh
    # connection dropped) ended the shell with a traceback: each read and write of
    # a hung-up terminal fails with EIO.
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "dumb" if when == "on a dumb terminal" else "xterm",
           "PROMPT_TOOLKIT_NO_CPR": "1", "XDG_STATE_HOME": str(tmp_path / "state")}

    # The terminal's own session (setsid --ctty), so that its hang-up is the
    # kernel's, with SIGHUP ignored, which exec keeps.
    argv = ["setsid", "--ctty", "--wait", "sh", "-c", "trap '' HUP; exec \"$@\"", "sh",
            sys.executable, "-m", "migblockd.shell", str(daemon.socket), "-v"]
    errors = tmp_path / "stderr"
    with errors.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=stderr, env=env)
    os.close(slave)
    try:
        _read_until(master, PROMPT.encode())
        if when == "while a command waits":
            daemon.signal(signal.SIGSTOP)
            os.write(master, b"query-version\r")
            _read_until(master, b'{"execute": "query-version"}')  # -v: it was sent
        else:
            os.write(master, b"query-ver")
            _read_until(master, b"query-ver")
        os.close(master)  # the terminal hangs up
        master = -1
        daemon.signal(signal.SIGCONT)  # the reply comes, for a terminal that is gone
        assert proc.wait(timeout=30) == 1
    finally:
        daemon.signal(signal.SIGCONT)
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert errors.read_text() == (
        "migblock-shell: the terminal hung up (Input/output error); the session ended\n")


async def _add_blockers_until_dropped(daemon: DaemonProcess) -> None:
    """Add blockers, each an event of about 1 KB, until the daemon has dropped a
    client for leaving its events unread."""
    async with qemu_qmp_client(daemon.socket, "busy-agent") as client:
        for number in range(5000):
            await client.execute("add-blocker", {"reason": f"{number} " + "x" * 900})
            if number % 100 == 99 and "bytes of unread events" in daemon.log():
                return
    raise AssertionError(f"no client was dropped:\n{daemon.log()[-3000:]}")


def test_events_past_max_output_while_suspended_cost_the_connection_as_documented(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # docs/shell.md said that events that come while the shell is suspended
    # (Ctrl-Z) are printed when it is brought back: only as many as the daemon
    # keeps for a client that does not read (--max-output), past which it drops
    # the connection.  The shell then says so and reconnects on the next command.
    daemon = start_daemon("--max-output", "65536")
    shell = spawn_shell(daemon.socket)
    os.kill(shell.child.pid, signal.SIGSTOP)  # what Ctrl-Z does, without a job shell
    try:
        asyncio.run(_add_blockers_until_dropped(daemon))
    finally:
        os.kill(shell.child.pid, signal.SIGCONT)
    shell.expect('"event": "BLOCKER_ADDED"')  # the first ones come...
    shell.expect("migblockd closed the connection; the next command reconnects")
    shell.expect(PROMPT)
    shell.send("query-blockers\r")
    shell.expect("Reconnected to migblockd")
    shell.child.expect(r'\{"return": \[\{[^\r\n]*\r?\n')
    added = len(json.loads(shell.child.after)["return"])
    shell.expect(PROMPT)
    assert shell.quit() == 0
    shown = shell.transcript().count('"event": "BLOCKER_ADDED"')
    assert 0 < shown < added  # ...the rest are lost


def test_a_lost_connection_names_the_blockers_that_went_with_it(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: a blocker added with scope=connection lives as long as the
    # shell's connection.  When that ended (the daemon restarted, or dropped the
    # shell for leaving its events unread), the shell said only "migblockd closed
    # the connection; the next command reconnects" and reconnected without a word:
    # an operator who had blocked migration for the night saw nothing to say that
    # it was no longer blocked.  qmp-shell, which does not reconnect, at least ends.
    first = start_daemon()
    shell = spawn_shell(first.socket)
    for line in ("add-blocker reason='night maintenance' id=night scope=connection",
                 "add-blocker reason=brief id=brief scope=connection",
                 "add-blocker reason=kept id=kept",
                 "del-blocker id=brief",
                 '{"execute": "add-blocker", "arguments": {"reason": "raw", '
                 '"scope": "connection"}}'):
        shell.send(line + "\r")
        shell.child.expect(r'\{"return": [^\r\n]*\r?\n')
        reply = json.loads(shell.child.after)
        shell.expect(PROMPT)
    raw = reply["return"]["id"]  # the daemon's
    first.stop()
    shell.expect("migblockd closed the connection; the blockers this shell added with "
                 f"scope=connection went with it (night, {raw}): migration is no "
                 "longer blocked by them; the next command reconnects")
    shell.expect(PROMPT)
    second = start_daemon(socket=first.socket)
    shell.send("query-version\r")
    shell.expect("Reconnected to migblockd")
    shell.expect(PROMPT)
    # The new connection holds none of them: its end names none.
    second.stop()
    shell.child.expect(r"migblockd closed the connection(.*?)\r?\n")
    assert shell.child.match.group(1) == "; the next command reconnects\x1b[0m"
    assert shell.quit() == 0


def test_a_line_with_a_carriage_return_is_recalled_as_it_ran(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell], tmp_path: Path
) -> None:
    # Found by review: a line typed on a dumb terminal with a carriage return in it
    # (Ctrl-V Ctrl-M, as its cooked mode lets one in) was saved whole, and recalled
    # cut at the carriage return, where prompt_toolkit's file format ends entries at
    # line feeds only: Up then Enter ran another command than the one that ran.
    env = {**os.environ, "TERM": "dumb", "XDG_STATE_HOME": str(tmp_path / "state")}
    dumb = pexpect.spawn(sys.executable, ["-m", "migblockd.shell", str(daemon.socket)],
                         env=env, encoding="utf-8", timeout=30)
    try:
        dumb.expect_exact(PROMPT)
        dumb.send("query-version\x16\rextra\n")  # Ctrl-V Ctrl-M: a carriage return
        dumb.expect_exact("error: expected key=value, got 'extra'")
        dumb.expect_exact(PROMPT)
        dumb.sendeof()
        dumb.expect(pexpect.EOF)
    finally:
        dumb.close(force=True)
    shell = spawn_shell(daemon.socket)
    shell.send("\x1b[A\r")  # Up, Enter: the line as it ran, with its error
    shell.expect("error: expected key=value, got 'extra'")
    shell.expect(PROMPT)
    assert shell.quit() == 0
    assert '"package"' not in shell.transcript()


def test_exit_and_quit_say_how_the_shell_ends(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: at 3 a.m., exit or quit (bash's, Python's, HMP's q) was
    # "unknown command 'exit'; 'help' lists the commands", and help does not say
    # how to leave.  They are still not sent (migblockd has no such command; a
    # gating daemon that forwards QEMU's quit sends it, as qmp-shell would).
    shell = spawn_shell(daemon.socket)
    for word in ("exit", "quit", "q", "logout"):
        shell.send(word + "\r")
        shell.expect(f"error: unknown command '{word}': the shell ends at Ctrl-D, or at "
                     "the end of its input ('help' lists the commands)")
        shell.expect(PROMPT)
    assert shell.quit() == 0


def test_a_scope_connection_blocker_abandoned_with_ctrl_c_is_still_named_when_it_goes(
    start_daemon: Callable[..., DaemonProcess], spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: add-blocker scope=connection abandoned with Ctrl-C while the
    # daemon was slow still added the blocker, but its late reply was dropped unread:
    # the shell did not know it held the blocker, and the notice of the lost
    # connection, which names the blockers that went with it, left this one out.
    daemon = start_daemon("--ephemeral")
    shell = spawn_shell(daemon.socket, "-v")
    daemon.signal(signal.SIGSTOP)  # the request waits for its reply
    try:
        shell.sent("add-blocker reason='late night' id=late scope=connection")
        shell.send(CTRL_C)
        shell.expect("interrupted: a request already sent may still take effect")
        shell.expect(PROMPT)
    finally:
        daemon.signal(signal.SIGCONT)
    # Replies come in order: once this one is shown, the abandoned one has come.
    shell.send("query-version\r")
    shell.expect('"package": "migblockd')
    shell.expect(PROMPT)
    daemon.stop()
    shell.expect("migblockd closed the connection; the blockers this shell added with "
                 "scope=connection went with it (late): migration is no longer blocked "
                 "by them; the next command reconnects")
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_ending_the_session_names_the_scope_connection_blockers_that_go_with_it(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    # Found by review: Ctrl-D ended a session that held blockers added with
    # scope=connection without a word, though the daemon deletes them as the
    # connection goes: migration was no longer blocked, and nothing said so.  A lost
    # connection names them, and exit or quit, which say how the shell ends, did not
    # say that either.
    shell = spawn_shell(daemon.socket)
    for line in ("add-blocker reason='night maintenance' id=night scope=connection",
                 "add-blocker reason=kept id=kept"):
        shell.send(line + "\r")
        shell.expect('"return": {"id": ')
        shell.expect(PROMPT)
    shell.send("exit\r")
    shell.expect("error: unknown command 'exit': the shell ends at Ctrl-D, or at the end of "
                 "its input ('help' lists the commands); ending it deletes the blockers this "
                 "shell added with scope=connection (night)")
    shell.expect(PROMPT)
    shell.send(CTRL_D)
    shell.expect("the session ended; the blockers this shell added with scope=connection "
                 "went with it (night): migration is no longer blocked by them")
    shell.child.expect(pexpect.EOF)
    shell.child.close()
    assert shell.child.exitstatus == 0


def test_ending_a_session_that_holds_no_blocker_says_nothing_of_them(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell]
) -> None:
    shell = spawn_shell(daemon.socket)
    shell.send("add-blocker reason=kept id=kept\r")
    shell.expect('"return": {"id": ')
    shell.expect(PROMPT)
    shell.send("exit\r")
    shell.expect("('help' lists the commands)\x1b[0m\r\n")
    shell.expect(PROMPT)
    assert shell.quit() == 0
    assert "scope=connection" not in shell.transcript()


def test_a_history_entry_too_long_to_edit_is_not_recalled(
    daemon: DaemonProcess, spawn_shell: Callable[..., Shell], tmp_path: Path
) -> None:
    """Reported: a history file whose last entry was a pasted 50 MB line made the
    first Up lay that line out for about seven minutes (prompt_toolkit draws a
    recalled line whole at each key), the shell deaf to every key, Ctrl-C and
    Ctrl-D too.  Such an entry is not loaded: Up recalls the one before it."""
    history = tmp_path / "state" / "migblockd" / "shell-history"
    history.parent.mkdir(parents=True, mode=0o700)
    history.write_text("\n# 2026-01-01 00:00:00\n+query-version\n"
                       f"\n# 2026-01-01 00:00:01\n+add-blocker reason={'x' * (50 << 20)}\n")
    shell = spawn_shell(daemon.socket)
    shell.send("\x1b[A")
    shell.expect("query-version")
    shell.send("\r")
    shell.expect('{"return": {"qemu"')
    shell.expect(PROMPT)
    assert shell.quit() == 0


def test_a_line_too_long_to_edit_is_kept_out_of_the_history(tmp_path: Path) -> None:
    """A line of more than MAX_ENTRY characters (pasted: no one types 64 KiB) is
    neither written to the history file nor recalled in this session, which would
    make the shell draw it whole at each key; nor is one the file already holds
    loaded.  The lines around it are kept."""
    from prompt_toolkit.history import History  # noqa: PLC0415

    from migblockd.shell.history import (  # noqa: PLC0415
        MAX_ENTRY,
        SessionFallbackHistory,
        SessionMemoryHistory,
    )

    longest, too_long = "x" * MAX_ENTRY, "y" * (MAX_ENTRY + 1)
    path = tmp_path / "shell-history"
    histories: list[History] = [SessionFallbackHistory(path, print), SessionMemoryHistory()]
    for history in histories:
        for line in ("query-version", too_long, longest, f"a\n{too_long}"):
            history.append_string(line)
        assert history.get_strings() == ["query-version", longest]
    text = path.read_text()
    assert "+query-version\n" in text and f"+{longest}\n" in text
    assert "y" * 100 not in text

    with open(path, "a") as file:  # as an earlier version wrote it
        file.write(f"\n# 2026-01-01 00:00:00\n+{too_long}\n")
    loaded = list(SessionFallbackHistory(path, print).load_history_strings())
    assert loaded == [longest, "query-version"]

"""The real daemon under ``systemd-socket-activate``, watched through ``NOTIFY_SOCKET``.

systemd-socket-activate plays the service manager's part that matters here: it
binds the socket, execs the daemon (in place, so its PID is the daemon's) at
the first connection, and passes the descriptor with LISTEN_FDS/LISTEN_FDNAMES.
The test is the receiver of NOTIFY_SOCKET, an asyncio-dgram endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncio_dgram
import pytest
from conftest import ROOT
from qmpclient import RawClient

from migblockd.startup import EXIT_FAILURE, EXIT_INVALIDARGUMENT, EXIT_NOTCONFIGURED

TIMEOUT = 30.0
#: Pings are expected every 0.2 s.
WATCHDOG_USEC = 400_000

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="needs systemd-socket-activate (apt install systemd)",
)

# Runs in place of systemd-socket-activate and execs it: the PID stays the same
# through both execs, so this is where WATCHDOG_PID can be learnt.  It also
# turns on the kernel's memory-deny-write-execute (the same promise as the
# unit's MemoryDenyWriteExecute=, inherited across exec) where the kernel has it.
WRAPPER = r"""
import ctypes, os, sys
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0:
    assert libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) == PR_MDWE_REFUSE_EXEC_GAIN
    print("wrapper: MDWE on", file=sys.stderr, flush=True)
argv = [a.replace("@PID@", str(os.getpid())) for a in sys.argv[1:]]
os.execvp(argv[0], argv)
"""


@dataclass
class Receiver:
    """Every datagram on NOTIFY_SOCKET, and a timeline shared with the client."""

    stream: Any
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    timeline: list[str] = field(default_factory=list)
    watchdog: list[float] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            data, _ = await self.stream.recv()
            text = data.decode()
            self.timeline.append(text)
            if text == "WATCHDOG=1":
                self.watchdog.append(time.monotonic())
            else:
                self.queue.put_nowait(text)

    async def expect(
        self, predicate: Callable[[dict[str, str]], bool], what: str
    ) -> dict[str, str]:
        """The next non-watchdog message matching ``predicate`` (others are skipped)."""
        skipped = []
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    text = await self.queue.get()
                    fields = dict(line.split("=", 1) for line in text.split("\n"))
                    if predicate(fields):
                        return fields
                    skipped.append(text)
        except TimeoutError:
            raise AssertionError(f"no {what} within {TIMEOUT} s; got {skipped}") from None


@pytest.fixture
async def receiver(short_tmp: Path) -> AsyncIterator[Receiver]:
    stream = await asyncio_dgram.bind(str(short_tmp / "notify"))
    rx = Receiver(stream)
    task = asyncio.create_task(rx.run())
    yield rx
    task.cancel()
    stream.close()


async def test_daemon_under_systemd_socket_activate(
    short_tmp: Path, receiver: Receiver, python: str
) -> None:
    """Once per Python version: from 3.13 on, asyncio itself would unlink the socket."""
    sock_path = short_tmp / "migblockd.sock"
    config = short_tmp / "migblockd.toml"
    config.write_text('log-level = "info"\n')
    log_path = short_tmp / "stderr.log"
    argv = [
        sys.executable, "-c", WRAPPER,
        "systemd-socket-activate", "-l", str(sock_path), "--fdname=migblockd",
        "-E", f"NOTIFY_SOCKET={short_tmp / 'notify'}",
        "-E", f"WATCHDOG_USEC={WATCHDOG_USEC}",
        "-E", "WATCHDOG_PID=@PID@",
        # As systemd's StateDirectory= does: the daemon's default state directory.
        "-E", f"STATE_DIRECTORY={short_tmp / 'state'}",
        python, "-m", "migblockd", "--config", str(config), "--migration-time", "60",
    ]
    with log_path.open("wb") as log:
        # cwd: systemd-socket-activate passes only PATH, HOME, TERM and -E on,
        # so `-m migblockd` must find the package from the working directory.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT)

    def stderr() -> str:
        return log_path.read_text(errors="replace")

    async def wait_stderr(text: str, start: int = 0) -> None:
        """The daemon's log writer thread writes a line a moment after the fact."""
        deadline = time.monotonic() + TIMEOUT
        while text not in stderr()[start:]:
            assert time.monotonic() < deadline, f"{text!r} not in {stderr()[start:]!r}"
            await asyncio.sleep(0.02)

    try:
        # -- READY=1 before the first client is served --------------------------
        # The first connection makes systemd-socket-activate exec the daemon.
        # The path exists from bind(), a moment before listen(): retry.
        async with asyncio.timeout(TIMEOUT):
            while True:
                assert proc.poll() is None, stderr()
                try:
                    reader, writer = await asyncio.open_unix_connection(str(sock_path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(TIMEOUT):  # the daemon is only starting now
            greeting = json.loads(await reader.readline())
        assert "QMP" in greeting
        client = RawClient(reader, writer)
        # A datagram queued before the greeting was written is handed to the
        # receiver in the same loop iteration that wakes this coroutine, or an
        # earlier one; these yields let the receiver task record it.  A READY=1
        # sent after the greeting lands after "greeting" in the timeline.
        for _ in range(3):
            await asyncio.sleep(0)
        receiver.timeline.append("greeting")
        ready_at = [i for i, m in enumerate(receiver.timeline) if "READY=1" in m.split("\n")]
        assert ready_at, (receiver.timeline, stderr())
        assert ready_at[0] < receiver.timeline.index("greeting"), receiver.timeline
        ready = await receiver.expect(lambda f: f.get("READY") == "1", "READY=1")
        assert "STATUS" in ready
        # Its mode, owner and group are the socket unit's, not the options': the log
        # says what they are, for whoever asks why a user is refused.
        st = os.stat(sock_path)
        await wait_stderr(
            f"socket activation: serving the passed socket {sock_path} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid} "
            f"({pwd.getpwuid(st.st_uid).pw_name}), group {grp.getgrgid(st.st_gid).gr_name})\n")

        # -- STATUS= follows the registry and the clients ---------------------------
        await client.ok("qmp_capabilities")
        await client.ok("add-blocker", {"reason": "e2e test"})
        status = await receiver.expect(
            lambda f: f.get("STATUS", "").startswith("1 blocker"), "STATUS with one blocker"
        )
        assert "1 client" in status["STATUS"]

        # -- WATCHDOG=1 every WATCHDOG_USEC/2 -----------------------------------------
        async with asyncio.timeout(TIMEOUT):
            while len(receiver.watchdog) < 6:
                await asyncio.sleep(0.05)
        gaps = [b - a for a, b in itertools.pairwise(receiver.watchdog)]
        mean = sum(gaps) / len(gaps)
        # About 0.2 s: neither a flood nor anywhere near the 0.4 s timeout.
        assert 0.1 < mean < 0.32, gaps

        # -- SIGHUP: RELOADING=1 + MONOTONIC_USEC, then READY=1, new log level --------
        await client.ok("query-blockers")
        assert " DEBUG: " not in stderr()
        # socket-mode too: the socket unit's to set, so the log says so, not "restart".
        config.write_text('log-level = "debug"\nsocket-mode = "0660"\n')
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = await receiver.expect(lambda f: f.get("RELOADING") == "1", "RELOADING=1")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        await receiver.expect(lambda f: f.get("READY") == "1", "READY=1 after the reload")
        mark = len(stderr())
        await client.ok("query-blockers")
        await wait_stderr(" DEBUG: ", mark)
        await wait_stderr(f"WARNING: reload: {config}:2: socket-mode changed, which the "
                          "socket unit sets")
        assert "which only a restart applies" not in stderr()
        # The passed socket's path as the metrics address: the next start refuses it,
        # and the reload says so now (it knows the path; --socket is elsewhere).
        config.write_text(f'log-level = "debug"\nmetrics = "{sock_path}"\n')
        proc.send_signal(signal.SIGHUP)
        await wait_stderr("WARNING: reload: with metrics as the file now sets it, the next "
                          f"start would fail: {config}:2: metrics {sock_path}: that is the QMP "
                          "socket")
        # So is the passed socket as the QEMU to gate.
        config.write_text(f'log-level = "debug"\nqemu = "{sock_path}"\n')
        proc.send_signal(signal.SIGHUP)
        await wait_stderr("WARNING: reload: with qemu as the file now sets it, the next start "
                          f"would fail: {config}:2: qemu {sock_path}: that is migblockd's own "
                          f"socket; qemu in {config} names")
        await client.close()

        # -- SIGTERM: STOPPING=1, exit 0, the passed socket stays ---------------------
        proc.send_signal(signal.SIGTERM)
        await receiver.expect(lambda f: f.get("STOPPING") == "1", "STOPPING=1")
        async with asyncio.timeout(TIMEOUT):
            while proc.poll() is None:
                await asyncio.sleep(0.02)
        assert proc.returncode == 0, stderr()
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode), "the daemon removed the passed socket"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Where the kernel has PR_SET_MDWE (6.3+), the whole run above happened under
    # memory-deny-write-execute ("wrapper: MDWE on" in stderr); elsewhere without it.


@pytest.mark.parametrize("passed", [["-l", "s.sock", "-l", "t.sock", "--fdname=a:b"],
                                    ["--accept", "-l", "s.sock"]],
                         ids=["two-sockets", "Accept=yes"])
async def test_a_wrong_activation_is_refused_before_the_state_directory_is_made(
    short_tmp: Path, passed: list[str]
) -> None:
    """Sockets the daemon cannot serve: it says so and exits, creating no
    $STATE_DIRECTORY (systemd's StateDirectory= makes it; here nobody does)."""
    state = short_tmp / "state"
    argv = ["systemd-socket-activate", *[str(short_tmp / a) if a.endswith(".sock") else a
                                         for a in passed],
            "-E", f"STATE_DIRECTORY={state}", sys.executable, "-m", "migblockd"]
    log_path = short_tmp / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=ROOT)
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:  # the first connection starts the daemon
                try:
                    _, writer = await asyncio.open_unix_connection(str(short_tmp / "s.sock"))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.01)
            while "socket activation: " not in log_path.read_text(errors="replace"):
                assert proc.poll() is None or "socket activation: " in log_path.read_text(
                    errors="replace"), log_path.read_text(errors="replace")
                await asyncio.sleep(0.02)
        writer.close()
        text = log_path.read_text(errors="replace")
        assert "ERROR: socket activation: " in text, text
        assert not state.exists(), text
        assert "restored" not in text, text
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("case", "status"), [
    ("a bad command line", EXIT_INVALIDARGUMENT),
    ("a bad file", EXIT_NOTCONFIGURED),
    ("a held state directory", EXIT_FAILURE),
    ("a check of a bad file", EXIT_NOTCONFIGURED),
])
def test_a_start_no_restart_cures_turns_away_the_clients_waiting(
        short_tmp: Path, case: str, status: int) -> None:
    """Under the units, a client still waiting once the start is refused had
    systemd start the daemon again, into the same refusal, until the socket unit
    failed too (tests/test_systemd_manager.py has that with the real manager).
    A start that a restart may cure leaves them to the restart, and a check (found
    by review: it turned them away, were it passed the socket) leaves them alone."""
    (short_tmp / "bad.toml").write_text('max-clients = "many"\n')
    held = short_tmp / "held"
    held.mkdir(mode=0o700)
    args = {"a bad command line": ["--ephemeral", "--max-clients", "many"],
            "a bad file": ["--ephemeral", "--config", str(short_tmp / "bad.toml")],
            "a held state directory": ["--state-dir", str(held)],
            "a check of a bad file": ["--ephemeral", "--config", str(short_tmp / "bad.toml"),
                                      "--check-config"]}[case]
    sock = short_tmp / "s.sock"
    log_path = short_tmp / "stderr.log"
    lock = os.open(held / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                ["systemd-socket-activate", "-l", str(sock), sys.executable, "-m",
                 "migblockd", "--socket-activated", *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT)
        try:
            deadline = time.monotonic() + TIMEOUT
            received = b""
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waiting:
                waiting.settimeout(TIMEOUT)
                while True:  # once bound and listening, this starts the daemon
                    try:
                        waiting.connect(str(sock))
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        assert proc.poll() is None and time.monotonic() < deadline, (
                            log_path.read_text())
                        time.sleep(0.01)
                with contextlib.suppress(ConnectionResetError):
                    while chunk := waiting.recv(4096):
                        received += chunk
            assert proc.wait(timeout=TIMEOUT) == status, log_path.read_text()
        finally:
            proc.kill()
            proc.wait()
    finally:
        os.close(lock)
    text = log_path.read_text()
    said = ("migblockd cannot start until an operator mends its settings or state; its log "
            "says why (under systemd: journalctl -u migblockd)")
    if status == EXIT_FAILURE or case.startswith("a check"):
        assert received == b"", received
        assert "turned away" not in text, text
    else:
        assert json.loads(received) == {"error": {"class": "GenericError", "desc": said}}
        assert text.endswith(f"migblockd: turned away 1 client waiting on the socket systemd "
                             f"passed: {said}\n"), text
    assert "Traceback" not in text, text


async def test_an_abstract_passed_socket_is_named_as_its_unit_writes_it_and_warned_of(
        short_tmp: Path) -> None:
    """``ListenStream=@name``, found by review twice: the log said ``serving the passed
    socket b'\\x00name'`` (Python's bytes) where the socket unit and ``ss`` say
    ``@name``; and an abstract socket has no file, so no mode, owner or group keeps
    anyone out (unix(7)): every process in the network namespace connects, and the
    start said so only as ``serving the passed socket @name``, as if SocketMode= and
    SocketGroup= applied."""
    name = f"migblockd-test-{short_tmp.name}"
    log_path = short_tmp / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"@{name}", sys.executable, "-m", "migblockd",
             "--socket-activated", "--ephemeral"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT)
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:  # the first connection starts the daemon
                try:
                    reader, writer = await asyncio.open_unix_connection(f"\0{name}")
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.01)
            assert b'"QMP"' in await reader.readline()
            writer.close()
        # Another user, with no group in common with the daemon's, is served: the
        # warning is no formality.
        served = subprocess.run(
            ["setpriv", "--reuid", "3999998", "--regid", "3999998", "--clear-groups",
             sys.executable, "-I", "-c",
             "import socket, sys; s = socket.socket(socket.AF_UNIX); "
             f"s.connect('\\0{name}'); print(s.makefile().readline())"],
            capture_output=True, text=True, timeout=TIMEOUT, check=True)
        assert '"QMP"' in served.stdout
        line = (f"WARNING: the passed socket @{name} is in Linux's abstract namespace, where "
                "no file mode, owner or group keeps anyone out (unix(7)): every process in "
                "the daemon's network namespace can connect, whatever the socket unit's "
                "SocketMode= and SocketGroup= say, and has the access policy's "
                "default-role (client); give ListenStream= a path, as the shipped "
                "migblockd.socket does\n")
        # The daemon's log writer thread writes a line a moment after the fact: under
        # load, after the greeting was read.
        deadline = time.monotonic() + TIMEOUT
        while line not in (text := log_path.read_text(errors="replace")):
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.02)
        assert f"INFO: socket activation: serving the passed socket @{name}\n" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0, log_path.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_socket_settings_a_passed_socket_replaces_are_named_at_their_lines(
        short_tmp: Path) -> None:
    """Reproduced first: the start said "socket activation: --socket-mode is ignored",
    an option nobody gave, of the file's socket-mode, and a reload "reload: socket-mode
    changed, which the socket unit sets", neither with the line that sets it."""
    config = short_tmp / "m.toml"
    config.write_text('# migblockd\n\nlog-level = "info"\nsocket-mode = "0660"\n'
                      'socket-group = "0"\n')
    log_path = short_tmp / "stderr.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", str(short_tmp / "s.sock"), sys.executable,
             "-m", "migblockd", "--config", str(config), "--ephemeral"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT)

    async def wait_log(line: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while line not in (text := log_path.read_text(errors="replace")):
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.02)

    try:
        async with asyncio.timeout(TIMEOUT):
            while True:  # the first connection starts the daemon
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        str(short_tmp / "s.sock"))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.01)
            assert b'"QMP"' in await reader.readline()
            writer.close()
        await wait_log(f"INFO: socket activation: {config}:4: socket-mode is ignored (the "
                       "socket unit's SocketMode= applies)\n")
        await wait_log(f"INFO: socket activation: {config}:5: socket-group is ignored (the "
                       "socket unit's SocketGroup= applies)\n")
        # Edited, and moved: the reload names the line the file now gives it at.
        config.write_text('# migblockd\n\nlog-level = "info"\nsocket-group = "0"\n\n'
                          'socket-mode = "0666"\n')
        proc.send_signal(signal.SIGHUP)
        await wait_log(f"WARNING: reload: {config}:6: socket-mode changed, which the socket "
                       "unit sets (ListenStream=, SocketMode=, SocketGroup=); the daemon "
                       "serves the socket systemd passed\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0, log_path.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

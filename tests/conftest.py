"""Fixtures that start the real daemon as a process on a real Unix socket."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from interpreters import VenvBuilder, interpreters
from otheruids import accounts, uid_client_script  # noqa: F401  (fixtures: other uids)
from qmpclient import RawClient, qmp_client, qmp_clients
from realqemu import qemu, qemu_factory  # noqa: F401  (fixtures: a real QEMU, see realqemu.py)

from migblockd.listen import LISTEN_BACKLOG
from migblockd.resolver import user_name
from migblockd.startup import EXIT_NOTCONFIGURED

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = " ready on "


def owner_info(pid: int, uid: int | None = None, gid: int | None = None) -> dict[str, object]:
    """``BlockerInfo``'s ``owner`` for a client process (by default of this process's
    uid and gid): the daemon adds the uid's user name when the user database has one."""
    uid = os.getuid() if uid is None else uid
    owner: dict[str, object] = {"pid": pid, "uid": uid, "gid": os.getgid() if gid is None else gid}
    if (name := user_name(uid)) is not None:
        owner["user"] = name
    return owner


@dataclass
class DaemonProcess:
    """A running ``python -m migblockd``; its stderr goes to ``log_path``."""

    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def received(self) -> list[str]:
        """The commands of the requests the daemon logged receiving, in order
        (``--log-level debug`` logs each line a client sends as ``<- b'...'``)."""
        return re.findall(r' <- b.*?"execute": ?"([^"]*)"', self.log())
    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``pattern`` in the log (a ``str`` is matched literally),
        polled until it appears.  Fails with the log's tail if it does not appear
        within ``timeout`` seconds, or the daemon exits without logging it."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before reading: then the log is complete
            log = self.log()
            if match := regex.search(log):
                return match
            if exited:
                why = f"daemon exited with {self.proc.returncode}"
            elif time.monotonic() >= deadline:
                why = f"not within {timeout} s"
            else:
                time.sleep(0.02)
                continue
            shown = pattern if isinstance(pattern, str) else pattern.pattern
            raise AssertionError(f"{shown!r} not in the log ({why}):\n{log[-5000:]}")

    def client(self, *, negotiate: bool = True,
               read_greeting: bool = True) -> AbstractAsyncContextManager[RawClient]:
        """``async with daemon.client() as c:`` a connected client, closed afterwards."""
        return qmp_client(self.socket, negotiate=negotiate, read_greeting=read_greeting)

    def clients(self, count: int) -> AbstractAsyncContextManager[list[RawClient]]:
        """``count`` negotiated clients, connected concurrently, all closed afterwards."""
        return qmp_clients(self.socket, count)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    @contextlib.contextmanager
    def stopped_with_full_backlog(self) -> Iterator[None]:
        """The daemon stopped (SIGSTOP), its socket's queue of pending connections
        filled (its listen backlog, then EAGAIN), for the block; then the queued
        connections are closed, the daemon continued, and the queue has room again."""
        queued: list[socket.socket] = []
        self.signal(signal.SIGSTOP)
        try:
            for _ in range(LISTEN_BACKLOG + 100):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect(str(self.socket))
                except BlockingIOError:
                    sock.close()
                    break
                queued.append(sock)
            else:
                raise AssertionError(f"{len(queued)} connections queued, and no EAGAIN")
            yield
        finally:
            for sock in queued:
                sock.close()
            self.signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        while True:  # until the daemon has taken enough of the queue for one more
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.setblocking(False)
                try:
                    probe.connect(str(self.socket))
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AssertionError("the daemon's queue stayed full") from None
            time.sleep(0.01)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """The exit status; fails the test (killing the daemon) if it does not exit in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon still running after {timeout} s:\n{self.log()}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL, unless it has exited: a test's cleanup."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def spawn_daemon(
    workdir: Path, *args: str, socket: Path | None = None, wait: bool = True,
    env: dict[str, str] | None = None, python: str = sys.executable,
    cwd: Path | None = None, log_level: str | None = "debug", own_state: bool = True,
) -> DaemonProcess:
    """Start the daemon; by default wait until it logs that it is ready.

    ``log_level=None`` leaves the level to the daemon's configuration file.

    Unless ``args`` name a state directory (or ``--ephemeral``), each daemon
    gets a fresh one under ``workdir``: durable state is the default, and
    daemons must not share one by accident.  ``own_state=False``: none, for a
    daemon whose ``--config`` file sets ``state-dir`` (a ``--state-dir`` would
    outvote it).
    """
    sock = socket if socket is not None else workdir / "migblockd.sock"
    stamp = time.monotonic_ns()
    log_path = workdir / f"daemon-{stamp}.log"
    state: list[str] = []
    if own_state and not any(a.startswith("--state-dir") or a == "--ephemeral" for a in args):
        state = ["--state-dir", str(workdir / f"state-{stamp}")]
    # MIGBLOCKD_TEST_EVENT_LOOP=uvloop runs every daemon on uvloop (test_uvloop.py does).
    loop = os.environ.get("MIGBLOCKD_TEST_EVENT_LOOP")
    if loop and not any(a.startswith("--event-loop") for a in args):
        state = [*state, "--event-loop", loop]
    level = ["--log-level", log_level] if log_level is not None else []
    argv = [python, "-m", "migblockd", "--socket", str(sock), *level, *state, *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=env if env is not None else dict(os.environ), cwd=cwd,
        )
    daemon = DaemonProcess(sock, proc, log_path, argv)
    if wait:
        wait_ready(daemon)
    return daemon


def wait_ready(daemon: DaemonProcess, timeout: float = 20.0) -> None:
    """Wait for the ready line; a daemon that is not ready in time is killed."""
    try:
        daemon.wait_for_log(READY_LINE, timeout)
    except AssertionError:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        raise


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """A factory: ``start_daemon("--only-migratable")``; every daemon is stopped afterwards."""
    started: list[DaemonProcess] = []

    def start(*args: str, **kwargs: object) -> DaemonProcess:
        d = spawn_daemon(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def daemon(start_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A daemon with a short simulated migration (0.3 s)."""
    return start_daemon("--migration-time", "0.3")


def quick_shell(bound: float) -> list[str]:
    """``migblock-shell`` with the bound on each wait of its connecting (10 s) made
    ``bound`` seconds: what it does when the bound passes is the point, not its
    length."""
    return [sys.executable, "-c", f"from migblockd.shell import opening; "
            f"opening.GREETING_TIMEOUT = {bound}; from migblockd.shell.main import main; main()"]


def assert_start_refused(config: Path, state: Path, sock: Path, refusal: str) -> None:
    """A start with ``config`` and ``state`` (on ``sock``) exits 6 (EXIT_NOTCONFIGURED: the
    state it would restore needs an operator), its last line ``refusal``."""
    again = subprocess.run([sys.executable, "-m", "migblockd", "--config", str(config),
                            "--state-dir", str(state), "--socket", str(sock)],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == EXIT_NOTCONFIGURED
    assert again.stderr.rstrip("\n").endswith(f"ERROR: {refusal}"), again.stderr


def assert_clean_log(daemon: DaemonProcess) -> None:
    """No Python traceback (or uncaught-exception report) anywhere in the daemon's log."""
    log = daemon.log()
    for marker in ("Traceback", "Exception in callback", "exception was never retrieved"):
        assert marker not in log, f"{marker!r} in the daemon log:\n{log[-5000:]}"


def flip_bit(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at ``offset`` in ``path``: damage a
    checksummed page without changing the file's size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory under /tmp: AF_UNIX paths are limited to 107 bytes, and
    pytest's ``tmp_path`` can be longer."""
    path = Path("/tmp") / f"migblockd-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[socket.socket]:
    """A notify socket, as systemd's: the daemon sends its assignments to it."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(short_tmp / "notify"))
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon (0.3 s simulated migration) shared by a module's tests.

    Tests that use it open their own connections and use ids no other test uses.
    At the end it must stop cleanly (exit 0) with nothing alarming in its log.
    """
    d = spawn_daemon(tmp_path_factory.mktemp("shared"), "--migration-time", "0.3")
    yield d
    rc = d.stop()
    assert_clean_log(d)
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()[-5000:]}"


# -- other Python versions ---------------------------------------------------------------
# The daemon must behave the same on 3.11 and on 3.12+ (asyncio's server shutdown and
# socket cleanup changed).  Tests that take the ``python`` fixture run once per CPython
# version found on this machine (see interpreters.py), each but the project venv's own
# from a venv with a non-editable install of the project.


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Here rather than in fixture params: only runs that collect such a test look for
    # interpreters.
    if "python" in metafunc.fixturenames:
        metafunc.parametrize("python", list(interpreters()), indirect=True)


def pytest_report_collectionfinish(items: list[pytest.Item]) -> list[str]:
    """Say which interpreters were found: a version missing here is not tested."""
    if not any("python" in getattr(item, "fixturenames", ()) for item in items):
        return []
    return [f"interpreters: {', '.join(f'{v} ({p})' for v, p in interpreters().items())}"]


@pytest.fixture(scope="session")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VenvBuilder]:
    builder = VenvBuilder(tmp_path_factory.mktemp("venvs"), ROOT)
    yield builder
    builder.kill()


@pytest.fixture
def python(request: pytest.FixtureRequest, venvs: VenvBuilder) -> str:
    """The interpreter to run the daemon with (the project venv's for its own version)."""
    version: str = request.param
    return venvs.python(version)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[None]:
    """Wrap ``owner.name`` so that each call is noted; the list of calls so far.

    For tests that a cost is paid once, or a bounded number of times, rather
    than per byte or per element: they count calls, never time.
    """
    calls: list[None] = []
    original = getattr(owner, name)

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls

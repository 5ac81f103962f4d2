"""Fixtures that start the real daemon as a process on a real Unix socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from realqemu import qemu, qemu_factory  # noqa: F401  (fixtures: a real QEMU, see realqemu.py)

READY_LINE = " ready on "


@dataclass
class DaemonProcess:
    """A running ``python -m migblockd``; its stderr goes to ``log_path``."""

    socket: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

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


def spawn_daemon(
    workdir: Path, *args: str, socket: Path | None = None, wait: bool = True,
    env: dict[str, str] | None = None, python: str = sys.executable,
    cwd: Path | None = None,
) -> DaemonProcess:
    """Start the daemon; by default wait until it logs that it is ready."""
    sock = socket if socket is not None else workdir / "migblockd.sock"
    log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
    argv = [python, "-m", "migblockd", "--socket", str(sock), "--log-level", "debug", *args]
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY_LINE in daemon.log():
            return
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        time.sleep(0.02)
    daemon.proc.kill()
    raise AssertionError(f"daemon not ready after {timeout} s:\n{daemon.log()}")


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


def assert_clean_log(daemon: DaemonProcess) -> None:
    """No Python traceback (or uncaught-exception report) anywhere in the daemon's log."""
    log = daemon.log()
    for marker in ("Traceback", "Exception in callback", "exception was never retrieved"):
        assert marker not in log, f"{marker!r} in the daemon log:\n{log[-5000:]}"


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
# socket cleanup changed).  Tests that take the ``python`` fixture run once per
# interpreter pyenv has here, each from a venv with a non-editable install of the project.

ROOT = Path(__file__).resolve().parent.parent
INTERPRETERS = {
    "3.11": sys.executable,
    "3.12": "/root/.pyenv/versions/3.12.1/bin/python",
    "3.13": "/root/.pyenv/versions/3.13.0/bin/python",
}


class VenvBuilder:
    """Builds one venv per extra interpreter, all in parallel, the first time one is needed."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.lock = threading.Lock()
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
        self.results: dict[str, str] = {}

    def _start_all(self) -> None:
        for version, interpreter in INTERPRETERS.items():
            if version == "3.11" or not Path(interpreter).exists():
                continue
            venv = self.base / f"venv-{version}"
            log = self.base / f"venv-{version}.log"
            script = (f'"{interpreter}" -m venv "{venv}" && '
                      f'"{venv}/bin/python" -m pip install -q --disable-pip-version-check '
                      f'"{ROOT}"')
            with log.open("wb") as out:
                proc = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=out,
                                        stdin=subprocess.DEVNULL)
            self.procs[version] = (proc, venv, log)

    def python(self, version: str) -> str:
        with self.lock:
            if not self.procs and not self.results:
                self._start_all()
            if version in self.results:
                return self.results[version]
            proc, venv, log = self.procs[version]
            rc = proc.wait(600)
            assert rc == 0, f"building the {version} venv failed:\n{log.read_text()}"
            self.results[version] = str(venv / "bin" / "python")
            return self.results[version]


@pytest.fixture(scope="session")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VenvBuilder]:
    builder = VenvBuilder(tmp_path_factory.mktemp("venvs"))
    yield builder
    for proc, _, _ in builder.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(params=sorted(INTERPRETERS))
def python(request: pytest.FixtureRequest, venvs: VenvBuilder) -> str:
    """The interpreter to run the daemon with (the project venv for 3.11)."""
    version: str = request.param
    interpreter = INTERPRETERS[version]
    if not Path(interpreter).exists():
        pytest.skip(f"Python {version} is not installed on this machine ({interpreter})")
    if version == "3.11":
        return sys.executable
    return venvs.python(version)


"""Fixtures that start the real daemon as a process on a real Unix socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit status (killing it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit on SIGTERM:\n{self.log()}") from None


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

"""A real QEMU for tests: no guest, two QMP monitors, always killed after the test.

QEMU runs as ``qemu-system-x86_64 -machine none -nodefaults -display none -S`` (nothing to
boot; migration still works) with two monitors, because QEMU serves one client per
monitor socket: ``gate_socket`` for the code under test (the link, or migblockd with
``--qemu``) and ``test_socket`` for the test's own :class:`QemuMonitor`.

QEMU's own migration blockers are added and removed at run time by opening a read-only
``vdi`` node (QEMU's vdi driver registers a blocker per node, ``block/vdi.c``) and deleting
it again.

The process is QEMU's child of this test process, not ``-daemonize``d: a daemonized QEMU is
re-parented, and on a machine whose PID 1 does not reap, a killed one stays a zombie.

Not ``tests/qemu.py``: that name would shadow the ``qemu`` package (``qemu.qmp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qmpclient import RawClient

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
START_TIMEOUT = 20.0
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes, with the NUL


class QemuMonitor(RawClient):
    """The test's own, raw QMP connection to QEMU (negotiated; events kept in ``events``)."""

    image: Path

    def blocker_text(self, node: str) -> str:
        """QEMU's text for the blocker of a vdi node (``block/vdi.c``)."""
        return f"The vdi format used by node '{node}' does not support live migration"

    async def add_blocker(self, node: str) -> None:
        """Give QEMU one more migration blocker: a read-only vdi node."""
        image = {"driver": "file", "filename": str(self.image), "read-only": True}
        await self.ok("blockdev-add", {"driver": "vdi", "node-name": node,
                                       "read-only": True, "file": image})

    async def remove_blocker(self, node: str) -> None:
        await self.ok("blockdev-del", {"node-name": node})

    async def blocked_reasons(self) -> list[str]:
        """QEMU's blockers, oldest first, from ``query-migrate``."""
        reasons: list[str] = (await self.ok("query-migrate")).get("blocked-reasons", [])
        return reasons

    async def enable_migration_events(self) -> None:
        """Turn on the ``events`` capability: MIGRATION and MIGRATION_PASS are sent."""
        await self.ok("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})


@dataclass
class Qemu:
    """One QEMU, restartable on the same socket paths (a new process each time)."""

    workdir: Path
    memory: str | None = None
    args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.gate_socket, self.test_socket):
            assert len(os.fsencode(path)) <= MAX_SOCKET_PATH, f"socket path too long: {path}"

    @property
    def gate_socket(self) -> Path:
        return self.workdir / "gate.sock"

    @property
    def test_socket(self) -> Path:
        return self.workdir / "test.sock"

    @property
    def image(self) -> Path:
        return self.workdir / "blocker.vdi"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"qemu-{self.starts}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S"]
        if self.memory is not None:
            argv += ["-m", self.memory]
        for path in (self.gate_socket, self.test_socket):
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
        return [*argv, *self.args]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start QEMU; return once its monitors serve clients (the test monitor greets)."""
        assert not self.running, "QEMU is already running"
        if not self.image.exists():
            subprocess.run([QEMU_IMG, "create", "-q", "-f", "vdi", str(self.image), "1M"],
                           check=True)
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        try:
            self._wait_greeting(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_greeting(self, timeout: float) -> None:
        # A killed QEMU leaves its socket files behind, and the new one replaces them: only
        # a greeting proves that this process listens.  The monitors are set up together,
        # before QEMU's main loop runs, so the gate monitor listens too.
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), \
                    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(self.test_socket))
                if sock.recv(4096).startswith(b'{"QMP"'):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not greet within {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL QEMU and reap it; its socket files stay behind, as after a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = START_TIMEOUT) -> None:
        """SIGSTOP QEMU; return once every thread of it has stopped (the signal is
        sent at once, but a thread stops only when it next runs: until then QEMU's
        monitor I/O thread may still greet a client)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.proc.pid}/task")
        deadline = time.monotonic() + timeout
        while not all(_stopped(stat) for stat in tasks.glob("*/stat")):
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not stop within {timeout} s")
            time.sleep(0.01)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Kill QEMU and start a new one on the same socket paths."""
        self.kill()
        self.start(timeout)

    @contextlib.asynccontextmanager
    async def monitor(self) -> AsyncIterator[QemuMonitor]:
        """The test's monitor connection, negotiated; closed on leaving the block."""
        client = await QemuMonitor.connect(self.test_socket)
        assert isinstance(client, QemuMonitor)
        client.image = self.image
        try:
            yield client
        finally:
            await client.close()


def _stopped(stat: Path) -> bool:
    """Whether the thread whose ``/proc/PID/task/TID/stat`` this is has stopped (or gone)."""
    try:
        text = stat.read_text()
    except FileNotFoundError:
        return True
    return text[text.rindex(")") + 2] in "tT"  # the state, after the name in parentheses


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate()`` (which may be a coroutine function) until it is true; fail the
    test after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await _truth(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def source_and_target(qemu_factory: Callable[..., Qemu]) -> tuple[Qemu, Qemu, str]:
    """Two QEMUs with memory to migrate: a source, and a target that waits for an
    incoming migration (``-incoming defer``); and a URI for the target to listen on."""
    source = qemu_factory(memory="1G")
    target = qemu_factory(memory="1G", args=("-incoming", "defer"), name="target")
    return source, target, f"unix:{target.workdir / 'in.sock'}"


async def migrate_slowly(src: QemuMonitor, dst: QemuMonitor, uri: str,
                         **parameters: int) -> None:
    """Start a migration from ``src`` into ``dst`` (started with ``-incoming defer``)
    at 100 kB/s, so that it lasts, and wait until ``dst`` receives it."""
    await dst.ok("migrate-incoming", {"uri": uri})
    await src.ok("migrate-set-parameters", {"max-bandwidth": 100_000, **parameters})
    await src.ok("migrate", {"uri": uri})

    async def receiving() -> bool:
        return bool((await dst.ok("query-migrate")).get("status") == "active")

    await wait_until(receiving, "the target receiving")


async def _truth(value: Any) -> bool:
    return bool(await value) if asyncio.iscoroutine(value) else bool(value)


@pytest.fixture
def qemu_factory(tmp_path: Path) -> Iterator[Callable[..., Qemu]]:
    """``qemu_factory(memory="1G", args=("-only-migratable",), start=True)``.

    Every QEMU it made is killed after the test, whatever the test's outcome.
    """
    made: list[Qemu] = []

    def make(*, memory: str | None = None, args: Sequence[str] = (), start: bool = True,
             name: str | None = None) -> Qemu:
        qemu = Qemu(tmp_path / (name or f"qemu{len(made)}"), memory=memory, args=args)
        made.append(qemu)
        if start:
            qemu.start()
        return qemu

    try:
        yield make
    finally:
        for qemu in made:
            qemu.kill()


@pytest.fixture
def qemu(qemu_factory: Callable[..., Qemu]) -> Qemu:
    """A running QEMU with no RAM (migrations complete in milliseconds)."""
    return qemu_factory()

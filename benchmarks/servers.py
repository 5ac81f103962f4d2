"""The benchmark's servers as subprocesses: start, wait for the greeting, seed, stop.

``benchmarks.bench_daemon`` runs every server it measures through :class:`Server`,
on a temporary Unix socket, with its output in a log file; :class:`SyncClient`
is the blocking QMP client it seeds and checks them with (never used to measure).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0   # a daemon restoring 100,000 blockers on a busy machine
STOP_TIMEOUT = 10.0

#: The blockers present during the benchmark: reasons real QEMU call sites give.
SEED_BLOCKERS: tuple[tuple[str, list[str] | None], ...] = (
    ("The vmdk format used by node 'disk0' does not support live migration", ["normal"]),
    ("Migration disabled: vhost lacks VHOST_F_LOG_ALL feature.", ["normal"]),
    ("0000:01:00.0: Migration is disabled for VFIO device", ["normal"]),
    ("State blocked by non-migratable CPU device (invtsc flag)", None),
    ("SEV: Migration is not implemented", None),
    ("Migration is disabled when using feature 'peer mode' in device 'ivshmem'", None),
    ("Migration disabled: TPM emulator does not support migration", None),
    ("Memory region pc.ram is not compatible with CPR. share=on is required for "
     "memory-backend objects, and aux-ram-share=on is required.", ["cpr-transfer"]),
    ("CPR does not support vfio mdev 0000:02:00.0", ["cpr-transfer", "cpr-exec"]),
    ("Migration disabled: vhost-user backend lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD.", ["normal"]),
)


class BenchError(Exception):
    """The benchmark cannot go on; ``str()`` says why."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def spawn(argv: list[str], cpus: set[int] | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository (or ``cwd=``) with the benchmarks importable,
    pinned to ``cpus``."""
    kwargs.setdefault("cwd", REPO)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=child_env(), **kwargs)
    if cpus:
        with contextlib.suppress(OSError):  # it may already be done
            os.sched_setaffinity(proc.pid, cpus)
    return proc


@dataclass
class Server:
    name: str
    argv: list[str]
    socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0   # from spawning to the first greeting
    #: Where it runs: ``python -m migblockd`` there runs that checkout's daemon.
    cwd: Path = REPO

    def start(self, cpus: set[int] | None) -> None:
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = spawn(self.argv, cpus, stdout=log, stderr=log, cwd=self.cwd)
        wait_for_greeting(self)
        self.start_seconds = time.monotonic() - started

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} is not running (exit {code}):\n{self.log()[-3000:]}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far (Linux /proc; 0 elsewhere)."""
        return 0.0 if self.proc is None else process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (Linux /proc; 0 elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_greeting(server: Server) -> None:
    """Ready = a connection gets a greeting line (works at any log level)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(str(server.socket))
                if sock.makefile("rb").readline().startswith(b'{"QMP"'):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{server.name} gave no greeting within {START_TIMEOUT:g} s:\n{server.log()}")


class SyncClient:
    """A blocking QMP client for seeding and checking (not for measuring)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.read()  # greeting
        self.execute("qmp_capabilities")

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise BenchError("server closed the connection")
        value: dict[str, Any] = json.loads(line)
        return value

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self.read()
            if "event" in reply:
                continue
            if "return" not in reply:
                raise BenchError(f"{command} failed: {reply}")
            return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def seed(server: Server, count: int) -> None:
    client = SyncClient(server.socket)
    try:
        for number, (reason, modes) in enumerate(SEED_BLOCKERS[:count]):
            args: dict[str, Any] = {"reason": reason, "id": f"bench-seed-{number}"}
            if modes is not None:
                args["modes"] = modes
            client.execute("add-blocker", args)
    finally:
        client.close()


def count_blockers(server: Server) -> int:
    client = SyncClient(server.socket, timeout=60.0)
    try:
        blockers = client.execute("query-blockers")
    finally:
        client.close()
    return len(blockers) if isinstance(blockers, list) else -1


def pinning(enabled: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server cpus, client cpus), or Nones when not pinning."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


def file_system(path: Path) -> str:
    """The type and device of the file system ``path`` is on (from /proc/self/mounts)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown file system"
    target, best = str(path.resolve()), ("", "unknown file system")
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, f"{fields[2]} ({fields[0]} on {point})")
    return best[1]


def run_json(argv: list[str], cpus: set[int] | None, timeout: float, what: str,
             server: Server) -> dict[str, Any]:
    """Run a load generator to completion and return the JSON object it printed."""
    server.check_alive()
    proc = spawn([sys.executable, *argv], cpus, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"load generator timed out on {what}") from None
    if proc.returncode != 0:
        raise BenchError(f"load generator failed on {what}:\n{err.decode()}\n"
                         f"{server.name} log:\n{server.log()[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    return result

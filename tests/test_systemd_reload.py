"""``systemctl reload`` as the units define it: their ExecReload= lines, run for real.

systemd need not be PID 1 here.  The daemon is started from the unit's own
ExecStart= and reloaded with the unit's own ExecReload= lines, both taken from
the files and expanded as systemd expands them (``Environment=``, ``$MAINPID``).
The lines run in order, each only if the one before exited 0, and the reload's
outcome is the last one's exit status, as systemd runs a command list; all of
them as another uid (``setpriv``), as the unit's ``User=`` runs them.  The
daemon is passed its listening socket as systemd passes it (``LISTEN_FDS``).
Only the options a drop-in would change (another ``--config``, no state) differ
from the unit's.  Not exercised: systemd's sandbox and its reload job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from test_systemd_units import INSTALLED, UNITS, parse_unit, values

from migblockd.reloader import Failed, reload, watch
from migblockd.startup import EXIT_NOTCONFIGURED

TIMEOUT = 30.0
#: The unit's user: a uid of its own, not root's.
UID = GID = 65534
#: Where the units' --config points; the tests point it at a file of their own.
ETC_CONFIG = "/etc/migblockd/migblockd.toml"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (the unit's User= is another uid)")


def environment(unit: Path) -> dict[str, str]:
    """The unit's ``Environment=`` assignments."""
    env = {}
    for line in values(parse_unit(unit), "Service", "Environment"):
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def expand(line: str, env: dict[str, str]) -> list[str]:
    """An Exec line's words as systemd.service(5) makes them: ``$NAME`` alone in a
    word becomes the value's whitespace-separated words, ``${NAME}`` is replaced
    in place; the installed daemon is this checkout's."""
    assert line[0] not in "-@:+!|", f"a prefix changes how systemd runs {line!r}"
    words: list[str] = []
    for word in shlex.split(line):
        alone = re.fullmatch(r"\$(\w+)", word)
        if alone:
            words.extend(env[alone.group(1)].split())
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return [part for word in words
            for part in ([sys.executable, "-m", "migblockd"] if word == INSTALLED else [word])]


def as_unit_user(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", *argv]


#: Puts descriptor argv[1] at 3 and execs argv[2:] with it passed as systemd passes a
#: socket unit's: LISTEN_PID is this process's, which the exec'd commands keep.
PASS_SOCKET = r"""
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="migblockd")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def socket_activated(argv: list[str], fd: int) -> list[str]:
    """``argv`` run with the listening socket ``fd`` passed to it as descriptor 3."""
    return [sys.executable, "-c", PASS_SOCKET, str(fd), *argv]


@dataclass
class Service:
    """The daemon as the unit starts it, and the unit's reload."""

    unit: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    socket: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} not in {self.log()!r}"
            time.sleep(0.02)

    def reload(self) -> tuple[int, str]:
        """The unit's ExecReload= lines, run as systemd runs them: the exit status
        that decides the reload job, and what the lines wrote."""
        env = dict(self.env, MAINPID=str(self.proc.pid))
        said = ""
        for line in values(parse_unit(self.unit), "Service", "ExecReload"):
            # The unit's environment as it is now, with $MAINPID, as systemd passes it.
            done = subprocess.run(as_unit_user(expand(line, env)), cwd=ROOT,
                                  env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=TIMEOUT)
            said += done.stdout + done.stderr
            if done.returncode != 0:
                return done.returncode, said
        return 0, said

    async def clients_served(self, count: int) -> int:
        """How many of ``count`` clients, connected at once, get QMP's greeting."""
        streams = [await asyncio.open_unix_connection(str(self.socket)) for _ in range(count)]
        try:
            served = 0
            for reader, _ in streams:
                async with asyncio.timeout(TIMEOUT):
                    first = json.loads(await reader.readline())
                served += "QMP" in first
            return served
        finally:
            for _, writer in streams:
                writer.close()


@pytest.fixture(params=["migblockd.service", "migblockd@.service"])
def service(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Service]:
    """The unit's daemon, as its user, with ``max-clients = 1`` from its --config file."""
    unit = UNITS / request.param
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, UID, GID)
    config = short_tmp / "migblockd.toml"
    config.write_text('log-level = "info"\nmax-clients = 1\n')
    config.chmod(0o644)
    env = environment(unit)
    options = env["MIGBLOCKD_OPTIONS"]
    assert ETC_CONFIG in options.split()
    # What a drop-in sets: another file, and no state of its own.
    env["MIGBLOCKD_OPTIONS"] = options.replace(ETC_CONFIG, str(config)) + " --ephemeral"
    start = expand(values(parse_unit(unit), "Service", "ExecStart")[0], env)
    log_path = short_tmp / "stderr.log"
    # The socket unit's part: the listening socket, bound before the daemon starts.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run / "q.sock"))
    listener.listen()
    with log_path.open("wb") as log, listener:
        proc = subprocess.Popen(socket_activated(as_unit_user(start), listener.fileno()),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                                env={**os.environ, **env}, pass_fds=(listener.fileno(),))
    svc = Service(unit, env, proc, log_path, run / "q.sock")
    try:
        svc.wait_for_log("ready on the passed socket")
        yield svc
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


def test_the_config_path_is_declared_once() -> None:
    """ExecStart= and the reload's check read the same settings: one Environment=."""
    for name in ("migblockd.service", "migblockd@.service"):
        text = (UNITS / name).read_text()
        assert len(re.findall(r"(?m)^[^#\n]*" + re.escape(ETC_CONFIG), text)) == 1, name
        service = parse_unit(UNITS / name)
        # --socket-activated outside MIGBLOCKD_OPTIONS: a drop-in that sets it keeps it.
        assert values(service, "Service", "ExecStart") == [
            f"{INSTALLED} --socket-activated $MIGBLOCKD_OPTIONS"]
        # One line, which checks, signals and waits: systemd 252 ends the reload job
        # when it exits.
        assert values(service, "Service", "ExecReload") == [
            f"{INSTALLED} --reload $MAINPID --socket-activated $MIGBLOCKD_OPTIONS"]


async def test_a_good_file_reloads(service: Service) -> None:
    # max-clients = 1 serves one client of two (the test below sees it).
    config = service.env["MIGBLOCKD_OPTIONS"].split()[1]
    Path(config).write_text('log-level = "debug"\nmax-clients = 2\n')
    status, said = service.reload()
    assert status == 0, said
    assert "valid" in said
    # Applied by the time the reload returns: with kill -HUP last, the clients that
    # came right after it could find the old settings.
    assert said.endswith(f"migblockd: pid {service.proc.pid}: reloaded configuration: "
                         "log-level=debug, max-clients=2\n"), said
    assert await service.clients_served(2) == 2
    # At debug, what goes on the wire is logged: their greetings were.
    service.wait_for_log("-> b'{\"QMP\"")


async def test_reloads_sent_together_each_return_once_applied(service: Service) -> None:
    # Their signals come while a reload reads or waits, or arrive as one pending
    # SIGHUP: joined, each still returns once a reload begun after its own signal
    # has applied the file, which every one of them wrote.
    [line] = values(parse_unit(service.unit), "Service", "ExecReload")
    env = dict(service.env, MAINPID=str(service.proc.pid))
    config = Path(service.env["MIGBLOCKD_OPTIONS"].split()[1])
    config.write_text('log-level = "info"\nmax-clients = 2\n')
    reloads = [subprocess.Popen(as_unit_user(expand(line, env)), cwd=ROOT,
                                env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    said = [r.communicate(timeout=TIMEOUT)[0] for r in reloads]
    assert [r.returncode for r in reloads] == [0] * 4, said
    for out in said:
        assert re.search(rf"migblockd: pid {service.proc.pid}: reloaded configuration: "
                         r"(max-clients=2|nothing changed)\n$", out), out
    assert await service.clients_served(2) == 2


def blocked_writing(pid: int) -> bool:
    """Whether process ``pid`` waits in a write(2) to its stdout (``/proc/PID/syscall``:
    the call's number, 1 on x86-64, then its first argument, the descriptor)."""
    return Path(f"/proc/{pid}/syscall").read_text().startswith("1 0x1 ")


def held_after_the_check(service: Service) -> tuple[subprocess.Popen[str], int]:
    """The unit's ExecReload= started, and held between its check and its signal: its
    stdout a pipe the test has filled, so that the check's line, written (flushed)
    just before the signal, waits until the test reads; and the pipe's end to read."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"." * 512)
    os.set_blocking(write_end, True)
    [line] = values(parse_unit(service.unit), "Service", "ExecReload")
    env = dict(service.env, MAINPID=str(service.proc.pid))
    reloader = subprocess.Popen(as_unit_user(expand(line, env)), cwd=ROOT,
                                env={**os.environ, **env}, stdout=write_end,
                                stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    deadline = time.monotonic() + TIMEOUT
    while not blocked_writing(reloader.pid):
        assert reloader.poll() is None, reloader.communicate()
        assert time.monotonic() < deadline, "the reload's check never wrote its line"
        time.sleep(0.02)
    return reloader, read_end


def let_go(reloader: subprocess.Popen[str], read_end: int) -> tuple[int, str]:
    """Read the held reload's stdout until it exits: its status, and what it wrote."""
    with os.fdopen(read_end, "rb") as out:
        said = out.read().decode().lstrip(".")
    _, errors = reloader.communicate(timeout=TIMEOUT)
    return reloader.returncode, said + errors


async def test_a_file_the_daemon_refuses_fails_the_reload(service: Service) -> None:
    # The file went bad between the check and the signal: only the daemon sees it.
    # With kill -HUP last, systemctl reload said 0, and only the daemon's log said no.
    config = Path(service.env["MIGBLOCKD_OPTIONS"].split()[1])
    config.write_text('log-level = "info"\nmax-clients = 2\n')
    reloader, read_end = held_after_the_check(service)
    config.write_text('log-level = "info"\nmax-clients = "many"\n')
    status, said = let_go(reloader, read_end)
    # The status the check gives the same file (6, NOTCONFIGURED): what is wrong is
    # the file, whichever of the two found it.
    assert status == EXIT_NOTCONFIGURED, said
    assert said.endswith(
        f"migblockd: the daemon (pid {service.proc.pid}) did not apply the file: reload "
        f"failed, keeping the running configuration: {config}:2: max-clients must be an "
        "integer, not 'many'\n"), said
    assert await service.clients_served(2) == 1
    assert service.proc.poll() is None


def test_a_daemon_gone_before_the_signal_fails_the_reload(service: Service) -> None:
    reloader, read_end = held_after_the_check(service)
    service.proc.terminate()
    assert service.proc.wait(timeout=TIMEOUT) == 0
    status, said = let_go(reloader, read_end)
    assert status == 1, said
    assert said.endswith(f"migblockd: the daemon (pid {service.proc.pid}) exited before it "
                         "was signalled: nothing was reloaded\n"), said


def test_a_daemon_stopping_when_signalled_fails_the_reload(service: Service) -> None:
    # Its drain kept going by a client that still sends: the SIGHUP finds it stopping,
    # which ignores it; the reload fails at once, rather than when the daemon exits.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(service.socket))
    sending = threading.Event()
    sending.set()

    def keep_sending() -> None:
        with contextlib.suppress(OSError):
            while sending.is_set():
                client.sendall(b'{"execute": "query-version"}')
                time.sleep(0.05)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        reloader, read_end = held_after_the_check(service)
        service.proc.send_signal(signal.SIGTERM)
        service.wait_for_log("stopping: closing the socket and 1 client(s)")
        status, said = let_go(reloader, read_end)
        assert status == 1, said
        assert said.endswith(f"migblockd: the daemon (pid {service.proc.pid}) is stopping: "
                             "the reload is not carried out\n"), said
        assert service.proc.poll() is None  # still draining when the reload failed
    finally:
        sending.clear()
        sender.join()
        client.close()


async def test_a_reload_sent_while_the_daemon_starts_waits_for_it(short_tmp: Path) -> None:
    # systemd queues a reload job until the start is over; by hand, --reload waits for
    # the daemon to catch SIGHUP (whose default action would end it), then for its
    # reload, which the daemon carries out once it serves.
    unit = UNITS / "migblockd.service"
    config = short_tmp / "migblockd.toml"
    config.write_text("max-clients = 2\n")
    config.chmod(0o644)
    short_tmp.chmod(0o755)
    env = environment(unit)
    env["MIGBLOCKD_OPTIONS"] = f"--config {config} --ephemeral --socket {short_tmp}/q.sock"
    start = [w for w in expand(values(parse_unit(unit), "Service", "ExecStart")[0], env)
             if w != "--socket-activated"]
    os.chown(short_tmp, UID, GID)
    with (short_tmp / "stderr.log").open("wb") as log:
        proc = subprocess.Popen(as_unit_user(start), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, cwd=ROOT, env={**os.environ, **env})
    try:
        [line] = values(parse_unit(unit), "Service", "ExecReload")
        reload = [w for w in expand(line, dict(env, MAINPID=str(proc.pid)))
                  if w != "--socket-activated"]
        done = subprocess.run(as_unit_user(reload), cwd=ROOT, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, (done, (short_tmp / "stderr.log").read_text())
        assert done.stdout.endswith(f"migblockd: pid {proc.pid}: reloaded configuration: "
                                    "nothing changed\n"), done
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(timeout=TIMEOUT) == 0


@pytest.mark.parametrize("problem", ["bad value", "unreadable by the unit's user"])
async def test_a_bad_file_fails_the_reload_and_the_daemon_serves_on(
    service: Service, problem: str
) -> None:
    config = Path(service.env["MIGBLOCKD_OPTIONS"].split()[1])
    if problem == "bad value":
        config.write_text('log-level = "info"\nmax-clients = "many"\n')
        why = "max-clients must be an integer, not 'many'"
    else:
        # Root's own check finds nothing wrong: only the daemon's user cannot read it.
        config.write_text('log-level = "info"\nmax-clients = 2\n')
        config.chmod(0o600)
        root = subprocess.run([sys.executable, "-m", "migblockd", "--check-config",
                               "--config", str(config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
        assert root.returncode == 0, root.stderr
        why = "Permission denied"
    status, said = service.reload()
    assert status == EXIT_NOTCONFIGURED, said
    assert why in said, said
    # Never signalled: no reload at all, and the running settings serve on.
    assert "reload" not in service.log(), service.log()
    assert await service.clients_served(2) == 1
    assert service.proc.poll() is None


async def test_options_changed_since_the_start_fail_the_reload(
    service: Service, short_tmp: Path,
) -> None:
    # Reproduced first under systemd --user: a drop-in pointed MIGBLOCKD_OPTIONS at
    # another file, the check judged that one and passed, and the daemon re-read
    # its own, so nothing of the change applied and systemctl reload said 0.
    started = service.env["MIGBLOCKD_OPTIONS"]
    other = short_tmp / "other.toml"
    other.write_text('log-level = "info"\nmax-clients = 2\n')
    other.chmod(0o644)
    config = started.split()[1]
    service.env["MIGBLOCKD_OPTIONS"] = started.replace(config, str(other))
    status, said = service.reload()
    assert status != 0
    assert said == (f"migblockd: MIGBLOCKD_OPTIONS is '{service.env['MIGBLOCKD_OPTIONS']}' "
                    f"now, but the daemon (pid {service.proc.pid}) started with '{started}': "
                    "a reload keeps the options the daemon started with, and re-reads only "
                    "the file they name; a restart of its unit (systemctl restart) applies "
                    "the new ones\n")
    assert "reload" not in service.log(), service.log()
    assert await service.clients_served(2) == 1
    # The same words, spaced otherwise, are the same command line.
    service.env["MIGBLOCKD_OPTIONS"] = f"  {started.replace(' ', chr(9) + ' ')} "
    status, said = service.reload()
    assert status == 0, said
    assert "reloaded configuration: nothing changed" in said, said


def test_a_process_that_keeps_no_record_is_never_signalled() -> None:
    # A pid that is no migblockd (or a daemon older than --reload: a package upgraded
    # under a running daemon) is never sent SIGHUP, whose default action would end it.
    # One that has run longer than a daemon takes to open its record fails at once:
    # `systemctl reload` after an upgrade waited 60 s for a record that never comes.
    wait = 1.0
    other = subprocess.Popen(["sleep", "300"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() - ran_since(other.pid) < wait:  # until it is that old
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(Failed) as failed:
            reload(other.pid, watch(other.pid), wait=wait)
        assert re.fullmatch(
            rf"process {other.pid} keeps no record of reloads, and has run for [0-9]+ s, "
            rf"longer than a migblockd takes to begin to keep one \({wait:g} s\): it is no "
            r"migblockd, or one older than this one \(a restart runs the new one\), so it "
            r"was not sent SIGHUP", str(failed.value)), failed.value
        assert failed.value.status == 1
        # A young one is waited for, within the wait: still none, and still not signalled.
        young = subprocess.Popen(["sleep", "300"])
        try:
            with pytest.raises(Failed) as failed:
                reload(young.pid, watch(young.pid), wait=wait)
            assert str(failed.value) == (
                f"process {young.pid} keeps no record of reloads after {wait:g} s: it is "
                "not a migblockd that has begun to start (or one older than this one), so "
                "it was not sent SIGHUP")
            assert young.poll() is None
        finally:
            young.kill()
            young.wait()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def ran_since(pid: int) -> float:
    """When process ``pid`` started, in ``time.monotonic()``'s terms, from its
    ``/proc/PID/stat`` start time (clock ticks since boot, CLOCK_BOOTTIME)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


async def test_a_stdout_that_takes_nothing_loses_lines_not_the_reload(
    service: Service,
) -> None:
    # The check's line, then the daemon's, go to stdout (the journal under systemd): a
    # stdout whose reader is gone (EPIPE) ended the reload with a traceback before the
    # signal, exit 1 for a good file that was never applied.
    config = Path(service.env["MIGBLOCKD_OPTIONS"].split()[1])
    config.write_text('log-level = "info"\nmax-clients = 2\n')
    read_end, write_end = os.pipe()
    os.close(read_end)
    [line] = values(parse_unit(service.unit), "Service", "ExecReload")
    env = dict(service.env, MAINPID=str(service.proc.pid))
    try:
        done = subprocess.run(as_unit_user(expand(line, env)), cwd=ROOT,
                              env={**os.environ, **env}, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert "reloaded configuration: max-clients=2" in service.log(), service.log()
    assert await service.clients_served(2) == 2

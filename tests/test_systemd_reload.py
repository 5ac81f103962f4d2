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
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from test_systemd_units import INSTALLED, UNITS, parse_unit, values

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
        assert values(service, "Service", "ExecReload") == [
            f"{INSTALLED} --check-config --socket-activated --running-pid $MAINPID "
            "$MIGBLOCKD_OPTIONS",
            "/bin/kill -HUP $MAINPID"]


async def test_a_good_file_reloads(service: Service) -> None:
    # max-clients = 1 serves one client of two (the test below sees it).
    config = service.env["MIGBLOCKD_OPTIONS"].split()[1]
    Path(config).write_text('log-level = "info"\nmax-clients = 2\n')
    status, said = service.reload()
    assert status == 0, said
    assert "valid" in said
    # The SIGHUP is applied a moment after kill exits.
    service.wait_for_log("reloaded configuration: max-clients=2")
    assert await service.clients_served(2) == 2


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
    assert status != 0
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
    service.wait_for_log("reloaded configuration")

"""uvloop is opt-in (``--event-loop uvloop``) only because every wire test passes on it too.

The wire, concurrency and hostile-input tests are run again, in a child pytest, with
every daemon they start on uvloop.  (uvloop differs from asyncio where it matters here:
its transports are no asyncio.Transport subclasses, and half-closes and aborted writes
reach the protocol in its own order.)  So are the tests of how connections end, where
those differences are met: the shutdown drain (half-close, lingering, a dropped
client's last words), the timeouts (a line, then the close) and running out of
descriptors (refusals that linger half-closed).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, DaemonProcess

from migblockd.startup import EXIT_NOTCONFIGURED

WIRE_TESTS = ["tests/test_daemon_wire.py", "tests/test_daemon_concurrency.py",
              "tests/test_daemon_hostile.py", "tests/test_daemon_blockers.py",
              "tests/test_daemon_drain.py", "tests/test_daemon_timeouts.py",
              "tests/test_daemon_exhaustion.py"]


def test_the_wire_tests_pass_with_the_daemon_on_uvloop() -> None:
    env = dict(os.environ, MIGBLOCKD_TEST_EVENT_LOOP="uvloop")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *WIRE_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    tail = result.stdout[-6000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, tail


async def test_event_loop_uvloop_is_what_the_daemon_runs(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--event-loop", "uvloop")
    d.wait_for_log("event loop: uvloop")
    async with d.client() as c:
        assert (await c.ok("add-blocker", {"reason": "on uvloop", "id": "uv"}))["id"] == "uv"
    assert d.stop() == 0


def test_without_the_uvloop_package_the_check_refuses_it_as_the_start_does(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess],
) -> None:
    """uvloop is an extra, which the units' install (``pip install .``) leaves out: a
    start told to run on it there exits 6, which the units do not restart.  So
    ``--check-config`` (and with it ``systemctl reload``) says so first, at the
    file's line, rather than call the file valid (it did), and so does a reload
    that sets it."""
    venv = tmp_path / "venv"
    # As the README's command to run the daemon, and the units' install, make it.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                   capture_output=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=900, capture_output=True)
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import uvloop"],
                           capture_output=True, timeout=60, check=False)
    assert probe.returncode != 0, "the install without extras has uvloop"
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\nevent-loop = "uvloop"\n')
    path.chmod(0o600)
    sock = tmp_path / "s.sock"
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    args = [str(venv / "bin" / "migblockd"), "--config", str(path), "--ephemeral",
            "--socket", str(sock)]
    said = (f"migblockd: {path}:2: event-loop uvloop needs the uvloop package "
            "(migblockd's uvloop extra: pip install '.[uvloop]' from its checkout)\n")
    check = subprocess.run([*args, "--check-config"], capture_output=True, text=True,
                           timeout=60, env=env, check=False)
    assert (check.returncode, check.stdout, check.stderr) == (EXIT_NOTCONFIGURED, "", said)
    start = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env,
                           check=False)
    assert (start.returncode, start.stderr) == (EXIT_NOTCONFIGURED, said)
    assert not sock.exists()
    # On the command line, named as its option.
    check = subprocess.run([*args[:1], "--ephemeral", "--socket", str(sock), "--event-loop",
                            "uvloop", "--check-config"], capture_output=True, text=True,
                           timeout=60, env=env, check=False)
    assert (check.returncode, check.stderr) == (
        EXIT_NOTCONFIGURED, said.replace(f"{path}:2: event-loop", "--event-loop"))
    # A running daemon (of that install, run from elsewhere than the checkout) told
    # by SIGHUP: the setting waits for a restart, which it says would fail.
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral", python=str(venv / "bin" / "python"),
                     cwd=tmp_path, env=env, log_level=None)
    path.write_text('log-level = "info"\nevent-loop = "uvloop"\n')
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("WARNING: reload: with event-loop as the file now sets it, the next start "
                   f"would fail: {said.removeprefix('migblockd: ').rstrip()}")
    assert d.stop() == 0
    # What the message says to run, run as it says, from the checkout, installs it:
    # the start it refused then runs on uvloop.
    command = said.rstrip().removesuffix(" from its checkout)").split(": ")[-1]
    subprocess.run([str(venv / "bin" / "python"), "-m", *shlex.split(command), "-q",
                    "--disable-pip-version-check"], cwd=ROOT, check=True, timeout=900,
                   capture_output=True)
    check = subprocess.run([*args, "--check-config"], capture_output=True, text=True,
                           timeout=60, env=env, check=False)
    assert (check.returncode, check.stderr) == (0, ""), check.stderr

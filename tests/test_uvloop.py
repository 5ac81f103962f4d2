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
import subprocess
import sys
from collections.abc import Callable

from conftest import ROOT, DaemonProcess

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

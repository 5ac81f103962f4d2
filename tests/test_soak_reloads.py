"""A storm of SIGHUPs: the real daemon, its reload's read of the file held by strace.

One reload per SIGHUP made a storm (a script's loop, a configuration manager
sending one per file it wrote) a queue: 200 SIGHUPs sent 10 ms apart kept the
daemon reloading the same file for half a minute, 90 of the reloads warning that
the one before had hung, and the stop dropped those still queued without a word.
A SIGHUP that finds a reload waiting for its turn now joins it: that one reads the
file after both (migblockd.reload_order).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log
from faults import injecting, opened
from realqemu import wait_until

Start = Callable[..., DaemonProcess]

#: How long strace holds the read of the file: longer than any wait of the test.
HOLD_USEC = 600 * 1_000_000
WAITING = "reload: waiting for the reload before to finish reading"
JOINED = "reload: SIGHUP received while a reload waits for its turn: that one reads the file"
#: What a reload, applied or not, ends with.
ENDED = re.compile(r"reloaded configuration|reload: not applied")


async def test_sighups_while_a_reload_waits_for_its_turn_join_it(
    start_daemon: Start, tmp_path: Path,
) -> None:
    config = tmp_path / "m.toml"
    config.write_text("max-clients = 100\n")
    d = start_daemon("--config", str(config), "--ephemeral")
    async with injecting(d.proc.pid, "openat", f"delay_exit={HOLD_USEC}", "the daemon",
                         paths=[config]):
        config.write_text("max-clients = 50\n")
        d.signal(signal.SIGHUP)
        await wait_until(lambda: opened(d.proc.pid, config), "the first reload's read")
        d.signal(signal.SIGHUP)
        d.wait_for_log(WAITING)  # the second waits for its turn
        # One at a time: the kernel keeps one SIGHUP pending, not one per kill.
        for joined in range(1, 6):
            d.signal(signal.SIGHUP)
            await wait_until(lambda n=joined: d.log().count(JOINED) == n,  # type: ignore[misc]
                             f"SIGHUP {joined + 2} to join the waiting reload")
    # Released: the first reload reads the file, and the second reads it again,
    # once for itself and the five SIGHUPs that joined it (or, should the first have
    # been held past HELD, on its own: then whichever applies last says "not applied").
    await wait_until(lambda: len(ENDED.findall(d.log())) == 2, "both reloads' ends")
    assert "INFO: reloaded configuration: max-clients=50\n" in d.log()
    assert d.stop() == 0, d.log()
    assert len(ENDED.findall(d.log())) == 2, d.log()
    assert_clean_log(d)


async def test_a_reload_the_stop_ends_says_so(start_daemon: Start, tmp_path: Path) -> None:
    # The stop ended the reloads still running or waiting (their tasks cancelled)
    # without a line: the log did not say that what SIGHUP asked was not done.
    config = tmp_path / "m.toml"
    config.write_text("max-clients = 100\n")
    d = start_daemon("--config", str(config), "--ephemeral")
    async with injecting(d.proc.pid, "openat", f"delay_exit={HOLD_USEC}", "the daemon",
                         paths=[config]):
        config.write_text("max-clients = 50\n")
        d.signal(signal.SIGHUP)
        await wait_until(lambda: opened(d.proc.pid, config), "the first reload's read")
        d.signal(signal.SIGHUP)
        d.wait_for_log(WAITING)
        d.signal(signal.SIGHUP)  # joins the second: not a reload of its own
        await wait_until(lambda: JOINED in d.log(), "the third SIGHUP to join the second")
        d.signal(signal.SIGTERM)
        d.wait_for_log("INFO: stopped")
    # Both: the one reading its file (held) and the one waiting for its turn (or,
    # past HELD, reading too).
    assert d.log().count("INFO: reload: stopping, so this reload is not carried out: the "
                         "running configuration stays\n") == 2, d.log()
    assert "reloaded configuration" not in d.log()
    assert_clean_log(d)

"""A gated QEMU under a failing commit: the client hears what QEMU kept.

migblockd forwards ``migrate-set-parameters`` and ``migrate-set-capabilities`` to
QEMU, then commits its own part of them (the mode, the ``events`` capability).  QEMU
has applied what it was sent by the time that commit fails, and QEMU's commands
apply all or nothing: the error says what stays applied, not that nothing was changed.
The disk is a real full tmpfs (see test_durable_diskfull.py); QEMU is a real 7.2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log
from realqemu import Qemu
from test_durable_diskfull import Namespace, fill_all, small_tmpfs  # noqa: F401 (a fixture)
from test_gate import connected

Start = Callable[..., DaemonProcess]


async def test_a_failed_commit_says_what_qemu_applied(
    start_daemon: Start, tmp_path: Path, small_tmpfs: Namespace, qemu: Qemu  # noqa: F811
) -> None:
    directory = small_tmpfs.mountpoint / "state"
    db = directory / "state.db"
    daemon = start_daemon("--qemu", str(qemu.gate_socket), "--state-dir", str(directory),
                          python=small_tmpfs.python(tmp_path))
    await connected(daemon)
    full = f"cannot commit to {db}: database or disk is full"
    async with daemon.client() as c, qemu.monitor() as mon:
        fill_all(small_tmpfs, db)
        # QEMU 7.2 has no mode: max-bandwidth and downtime-limit alone reach it.
        reply = await c.execute("migrate-set-parameters", {
            "mode": "cpr-reboot", "max-bandwidth": 5, "downtime-limit": 7}, id=1)
        assert reply == {"id": 1, "error": {"class": "GenericError", "desc": (
            f"{full}; migblockd changed nothing, but QEMU has applied max-bandwidth=5, "
            "downtime-limit=7")}}
        theirs = await mon.ok("query-migrate-parameters")
        assert (theirs["max-bandwidth"], theirs["downtime-limit"]) == (5, 7)
        assert (await c.ok("query-migrate-parameters"))["mode"] == "normal"

        # The mode alone is migblockd's: nothing reached QEMU, nothing was changed.
        reply = await c.execute("migrate-set-parameters", {"mode": "cpr-reboot"}, id=2)
        assert reply["error"]["desc"] == f"{full}; nothing was changed"

        reply = await c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True}]}, id=3)
        assert reply["error"]["desc"] == (
            f"{full}; migblockd changed nothing, but QEMU has applied events=true")
        assert {"capability": "events", "state": True} in await mon.ok(
            "query-migrate-capabilities")
    daemon.wait_for_log("QEMU keeps what it was sent before the commit failed: "
                        "max-bandwidth=5, downtime-limit=7")
    daemon.wait_for_log("QEMU keeps what it was sent before the commit failed: events=true")
    assert daemon.stop() == 0
    assert_clean_log(daemon)

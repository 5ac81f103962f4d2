"""systemd's ``STATUS=`` follows the link to a real QEMU 7.2, with no client asking.

``systemctl status`` shows the last ``STATUS=``; the daemon sent one at the flush
of a client's turn only, so what the link learnt by itself (QEMU left migblockd's own
``query-migrate`` unanswered, QEMU answered again) waited for some client's request.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess
from faults import injecting
from realqemu import Qemu, wait_until
from test_gate import SINK, connected

#: How long a STATUS= may take to come: well past each test's qemu-timeout.
WITHIN = 15.0


def notify_env(receiver: socket.socket) -> dict[str, str]:
    return {**os.environ, "NOTIFY_SOCKET": receiver.getsockname()}


def qemu_status(receiver: socket.socket, wanted: Callable[[str], bool],
                within: float = WITHIN, prefix: str = "") -> str:
    """The QEMU part of the first ``STATUS=`` that begins with ``prefix`` and whose
    QEMU part ``wanted`` takes, within ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no such STATUS= within {within:g} s")
        receiver.settimeout(left)
        try:
            datagram = receiver.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no such STATUS= within {within:g} s") from None
        for line in datagram.splitlines():
            if line.startswith(f"STATUS={prefix}") and wanted(line.partition(", QEMU ")[2]):
                return line.partition(", QEMU ")[2]


async def test_status_says_qemu_left_migblockds_own_query_unanswered(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, notify: socket.socket,
) -> None:
    # On connecting, migblockd asks QEMU whether it migrates (query-migrate). QEMU
    # slow to answer it: the link timed out and said so in its log and the metrics,
    # while STATUS= went on saying "connected" until some client's request.
    assert qemu.proc is not None
    # Each message QEMU writes to a monitor takes 2 s: its query-migrate answer
    # comes 1 s past the timeout (and the start serves before it connects).
    async with injecting(qemu.proc.pid, "sendmsg", "delay_enter=2000000", "QEMU"):
        d = start_daemon("--qemu", str(qemu.gate_socket), "--qemu-timeout", "1",
                         env=notify_env(notify))
        assert re.fullmatch(r"7\.\d+\.\d+ connected, not answering",
                            qemu_status(notify, lambda qemu: "not answering" in qemu))
        d.wait_for_log(f"QEMU at {qemu.gate_socket} did not answer 'query-migrate' within 1 s")
        # Its answer, late, says QEMU answers again.
        assert re.fullmatch(r"7\.\d+\.\d+ connected", qemu_status(
            notify, lambda qemu: "not answering" not in qemu))
    assert d.stop() == 0


async def test_status_says_a_stopped_qemu_answers_again_with_no_client_asking(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, notify: socket.socket,
) -> None:
    # A client's command timed out on a stopped QEMU. Continued, QEMU answered it
    # (late, dropped); STATUS= and the metrics said "not answering" until a client
    # sent QEMU another command.
    assert qemu.proc is not None
    d = start_daemon("--qemu", str(qemu.gate_socket), "--qemu-timeout", "1",
                     env=notify_env(notify))
    await connected(d)
    async with d.client() as c:
        qemu.proc.send_signal(signal.SIGSTOP)  # QEMU will not reply
        try:
            reply = await asyncio.wait_for(c.execute("query-migrate", id=1), 10)
            assert "did not answer 'query-migrate' within 1 s" in reply["error"]["desc"]
            assert qemu_status(notify, lambda qemu: "not answering" in qemu)
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        assert re.fullmatch(r"7\.\d+\.\d+ connected", qemu_status(
            notify, lambda qemu: "not answering" not in qemu))
        d.wait_for_log(f"INFO: QEMU at {qemu.gate_socket} answers again (it had not "
                       "answered 'query-migrate' within 1 s)")
    assert d.stop() == 0


async def test_a_stop_waiting_for_a_stopped_qemu_says_so_in_its_status(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, notify: socket.socket,
) -> None:
    # systemctl status showed the running summary all through a stop that waited
    # (up to 25 s) for a stopped QEMU's answer.
    assert qemu.proc is not None
    d = start_daemon("--qemu", str(qemu.gate_socket), "--qemu-timeout", "0",
                     env=notify_env(notify))
    await connected(d)
    async with d.client() as c:
        qemu.proc.send_signal(signal.SIGSTOP)  # QEMU will not reply
        try:
            await c.send({"execute": "query-migrate", "id": "q"})
            d.wait_for_log('"execute":"query-migrate"')
            d.signal(signal.SIGTERM)
            assert re.fullmatch(r"7\.\d+\.\d+ connected", qemu_status(
                notify, lambda qemu: True, prefix="stopping: waiting for 1 client (1 for "
                "QEMU's answer); 0 blockers, migration: none"))
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        assert "return" in await c.read_reply()
    assert qemu_status(notify, lambda qemu: True, prefix="stopping; 0 blockers")
    assert d.wait_exit() == 0


async def test_status_says_a_qemu_that_accepted_and_never_greets_is_not_answering(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, notify: socket.socket,
) -> None:
    # Found by the metrics review: a QEMU whose monitor another client holds accepts
    # migblockd's connection and never greets; its adds are refused as busy, yet
    # STATUS= said "not connected", as of a QEMU not running (whose adds succeed).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.settimeout(10)
        holder.connect(str(qemu.gate_socket))
        assert holder.recv(4096).startswith(b'{"QMP"')  # greeted: it holds the monitor
        d = start_daemon("--qemu", str(qemu.gate_socket), "--ephemeral",
                         env=notify_env(notify))
        assert qemu_status(notify, lambda qemu: "not answering" in qemu) == (
            "not answering (it accepted the connection)")
        d.wait_for_log("accepted the connection but has not greeted after")
    # Let go: QEMU greets migblockd's connection, waiting in its backlog.
    assert re.fullmatch(r"7\.\d+\.\d+ connected", qemu_status(
        notify, lambda qemu: "connected" in qemu))
    assert d.stop() == 0


async def test_status_says_the_start_waits_for_qemu_while_it_does(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, notify: socket.socket,
    tmp_path: Path,
) -> None:
    # Found by the start/stop review: while the start waited for a QEMU that accepted
    # and did not answer (5 s at most), systemctl status showed the restore's last
    # step, "restored 0 blockers: preparing to serve", as if the daemon were busy
    # with its state; a start with --ephemeral showed no status at all.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.settimeout(10)
        holder.connect(str(qemu.gate_socket))
        assert holder.recv(4096).startswith(b'{"QMP"')  # greeted: it holds the monitor
        d = start_daemon("--qemu", str(qemu.gate_socket), "--state-dir", str(tmp_path / "s"),
                         wait=False, env=notify_env(notify))
        statuses: list[tuple[bool, str]] = []
        deadline = time.monotonic() + 60
        while not statuses or not statuses[-1][0]:
            notify.settimeout(max(0.0, deadline - time.monotonic()))
            fields = dict(line.partition("=")[::2]
                          for line in notify.recv(4096).decode().splitlines())
            if "STATUS" in fields:
                statuses.append((fields.get("READY") == "1", fields["STATUS"]))
        d.wait_for_log(f"QEMU at {qemu.gate_socket} is there but has not answered within 5 s")
    said = [status for _, status in statuses]
    waiting = (f"waiting for QEMU at {qemu.gate_socket} to answer (5 s at most): serving "
               "once it says whether it migrates")
    # The wait, said after the restore and before READY=1 (with its summary).
    assert said.index(waiting) > said.index("restored 0 blockers: preparing to serve"), said
    assert said[-1].endswith("QEMU not answering (it accepted the connection)"), said
    # What follows it is the running summary, but for a last step of the start.
    assert all(status == "preparing to serve" or ", migration: " in status
               for status in said[said.index(waiting) + 1:]), said
    assert d.stop() == 0


async def test_status_says_not_connected_once_a_silent_qemu_that_never_greeted_is_gone(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, notify: socket.socket,
) -> None:
    # A set-up that went late ("not answering (it accepted the connection)") and then
    # failed (QEMU killed) ends in the state it began in, disconnected: no change of
    # state was told, and STATUS= went on saying QEMU was there and silent, while its
    # adds now succeed as for any QEMU not running.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        holder.settimeout(10)
        holder.connect(str(qemu.gate_socket))
        assert holder.recv(4096).startswith(b'{"QMP"')  # greeted: it holds the monitor
        d = start_daemon("--qemu", str(qemu.gate_socket), "--ephemeral",
                         env=notify_env(notify))
        assert qemu_status(notify, lambda qemu: "not answering" in qemu) == (
            "not answering (it accepted the connection)")
        qemu.kill()
        d.wait_for_log(f"QEMU at {qemu.gate_socket} is not available")
        assert qemu_status(notify, lambda qemu: "not answering" not in qemu) == (
            "not connected")
    assert d.stop() == 0


def migration_status(receiver: socket.socket, wanted: Callable[[str], bool]) -> str:
    """The migration part of the first ``STATUS=`` whose migration part ``wanted``
    takes, within :data:`WITHIN` s."""
    deadline = time.monotonic() + WITHIN
    while (left := deadline - time.monotonic()) > 0:
        receiver.settimeout(left)
        try:
            datagram = receiver.recv(4096).decode()
        except TimeoutError:
            break
        for line in datagram.splitlines():
            # Not the start's progress (STATUS=opening the state in ...), which says
            # nothing of a migration and would be read as the migration "".
            if not line.startswith("STATUS=") or ", migration: " not in line:
                continue
            migration = line.partition(", migration: ")[2].partition(", QEMU ")[0]
            if wanted(migration):
                return migration
    raise AssertionError(f"no such STATUS= within {WITHIN:g} s")


async def test_status_says_a_migration_handed_over_unseen_is_not_none(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    notify: socket.socket,
) -> None:
    """Reported: with the events capability off (QEMU's default), STATUS= said
    ``migration: none`` all through a migration migblockd had handed to QEMU (and
    after an earlier one, ``completed``): the status last seen, from before it."""
    qemu = qemu_factory(memory="1G")
    d = start_daemon("--qemu", str(qemu.gate_socket), env=notify_env(notify))
    await connected(d)
    async with d.client() as c:
        await c.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
        await c.ok("migrate", {"uri": SINK})
        unseen = "handed to QEMU and not seen since (no MIGRATION events)"
        assert migration_status(notify, lambda m: m != "none") == unseen
        # Once QEMU has said what it does, the line says it (on a loaded machine
        # QEMU may still be in setup at the first look).
        async def active() -> bool:
            return bool((await c.ok("query-migrate"))["status"] == "active")

        await wait_until(active, "QEMU's migration active")
        assert migration_status(notify, lambda m: m not in ("none", unseen, "setup")) \
            == "active"
        await c.ok("migrate_cancel")
    assert d.stop() == 0

"""migblockd in front of a real QEMU (``--qemu``): its blockers stop QEMU's real migration.

QEMU 7.2 runs with no guest and two monitors: migblockd uses one, the test the other
(QEMU serves one client per monitor).  QEMU's own blockers come from read-only vdi nodes.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log
from qemu.qmp import ExecuteError, QMPClient
from qemu_strings import GENERIC, SEV, error
from qmpclient import RawClient
from realqemu import Qemu, QemuMonitor, migrate_slowly, source_and_target, wait_until

from migblockd import __version__
from migblockd.client import MigblockClient

SINK = "exec:cat > /dev/null"
RUNNING = {"setup", "active", "cancelling", "pre-switchover", "device", "wait-unplug"}


def gate(start_daemon: Callable[..., DaemonProcess], qemu: Qemu, *args: str) -> DaemonProcess:
    return start_daemon("--qemu", str(qemu.gate_socket), *args)


async def connected(d: DaemonProcess) -> None:
    d.wait_for_log("connected to QEMU 7.")


async def drain(client: RawClient) -> list[dict[str, Any]]:
    """Every event the client has been sent so far (kept in ``client.events``)."""
    client.events.extend(m for m in await client.sync() if "event" in m)
    return client.events


async def migrate_events(mon: QemuMonitor) -> list[str]:
    return [e["data"]["status"] for e in await drain(mon) if e["event"] == "MIGRATION"]


async def test_qemu_blockers_are_listed_and_refuse_migrate_in_qemus_words(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = gate(start_daemon, qemu)
    await connected(d)
    async with qemu.monitor() as mon, d.client() as c:
        await mon.add_blocker("vdi1")
        listing = await c.ok("query-blockers")
        assert listing == [{"id": "qemu:1", "reason": mon.blocker_text("vdi1"),
                            "modes": ["normal"], "internal": False, "scope": "daemon",
                            "source": "qemu"}]
        reply = await c.execute("migrate", {"uri": SINK}, id=1)
        assert reply == error(GENERIC, mon.blocker_text("vdi1"), 1)  # QEMU's own refusal
        reply = await c.execute("del-blocker", {"id": "qemu:1"}, id=2)
        assert reply["error"]["desc"].startswith("Blocker 'qemu:1' is QEMU's own")
        for absent in ("qemu:2", "qemu:0", "qemu:x"):  # no such blocker of QEMU's
            reply = await c.execute("del-blocker", {"id": absent}, id=2)
            assert reply == error(GENERIC, f"Blocker '{absent}' not found", 2)
        assert await mon.blocked_reasons() == [mon.blocker_text("vdi1")]  # still there
        # Ours come first, then QEMU's, in query-blockers and in blocked-reasons.
        mine = await c.ok("add-blocker", {"reason": SEV, "id": "sev", "modes": ["normal"]})
        assert mine["source"] == "migblockd"
        assert [b["id"] for b in await c.ok("query-blockers")] == ["sev", "qemu:1"]
        info = await c.ok("query-migrate")
        assert info["blocked-reasons"] == [SEV, mon.blocker_text("vdi1")]
        # migblockd's own blocker refuses first, without asking QEMU to migrate.
        assert await c.execute("migrate", {"uri": SINK}, id=3) == error(GENERIC, SEV, 3)
    assert_clean_log(d)


def qemu_sent(d: DaemonProcess, qemu: Qemu, command: str) -> list[tuple[str, Any]]:
    """What QEMU sent from ``command`` on, as the daemon's debug log traced it: its
    reply as ("reply", None), MIGRATION and MIGRATION_PASS events as (name, data)."""
    trace = re.compile(rf"QEMU {re.escape(str(qemu.gate_socket))} (<-|->) (b'.*')$")
    sent: list[tuple[str, Any]] = []
    exec_id = None
    for line in d.log().splitlines():
        m = trace.search(line)
        if m is None:
            continue
        msg = json.loads(ast.literal_eval(m.group(2)))
        if m.group(1) == "->":
            if msg.get("execute") == command:
                exec_id = msg["id"]
        elif exec_id is not None:
            if msg.get("event") in ("MIGRATION", "MIGRATION_PASS"):
                sent.append((msg["event"], msg["data"]))
            elif msg.get("id") == exec_id:
                sent.append(("reply", None))
    return sent


async def test_events_and_the_reply_reach_the_client_in_the_order_qemu_sent_them(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # Reported: QEMU sent MIGRATION setup, migrate's return, MIGRATION_PASS 1,
    # MIGRATION active; the client got the return last.
    d = gate(start_daemon, qemu, "--log-level", "debug")
    await connected(d)
    completed, reply = ("MIGRATION", {"status": "completed"}), ("reply", None)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
        await c.send({"execute": "migrate", "arguments": {"uri": SINK}, "id": "go"})
        # Until both: after MIGRATION setup, QEMU's migration thread sends the events
        # (migration_thread(), migration/migration.c) while its main thread answers,
        # so the reply may come after any of them, even completed (seen under load:
        # setup, pass 1, active, pass 2, completed, then the reply).
        got: list[tuple[str, Any]] = []
        while completed not in got or reply not in got:
            msg = await c.read()
            if msg.get("event") in ("MIGRATION", "MIGRATION_PASS"):
                got.append((msg["event"], msg["data"]))
            elif msg.get("id") == "go":
                assert msg == {"return": {}, "id": "go"}
                got.append(reply)

    # The daemon traces each message before it relays it, but its log is written a
    # moment later: wait until the trace holds both.
    def traced() -> bool:
        sent = qemu_sent(d, qemu, "migrate")
        return completed in sent and reply in sent

    await wait_until(traced, "QEMU's reply and MIGRATION completed in the trace")
    sent = qemu_sent(d, qemu, "migrate")
    assert got == sent, (got, sent)
    assert_clean_log(d)


async def test_an_external_blocker_stops_the_migration_before_qemu_sees_it(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = gate(start_daemon, qemu)
    await connected(d)
    async with qemu.monitor() as mon, d.client() as c:
        await mon.enable_migration_events()
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        assert await c.execute("migrate", {"uri": SINK}, id="m") == error(GENERIC, SEV, "m")
        assert await migrate_events(mon) == []  # QEMU never started one
        assert (await mon.ok("query-migrate")).get("status") is None
    # What migblockd sent QEMU (its debug log traces every message): never a migrate.
    # The log is written a moment later; the reply's trace comes after the command's.
    d.wait_for_log(re.compile(r' -> b.*"id": ?"m"'))
    sent = [line for line in d.log().splitlines() if f"QEMU {qemu.gate_socket} -> " in line]
    assert any('"execute":"query-migrate"' in line for line in sent)
    assert not [line for line in sent if '"execute":"migrate"' in line]
    assert_clean_log(d)


async def test_with_no_blocker_the_real_migration_completes_and_events_are_relayed(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = gate(start_daemon, qemu)
    await connected(d)
    async with qemu.monitor() as mon, d.client() as c, d.client() as watcher:
        await mon.add_blocker("vdi1")
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        await mon.remove_blocker("vdi1")
        await c.ok("del-blocker", {"id": "sev"})
        # Through migblockd: QEMU's capability, QEMU's answer.
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
        caps = await c.ok("query-migrate-capabilities")
        assert {"capability": "events", "state": True} in caps and len(caps) > 1
        msgs = await c.execute("migrate", {"uri": SINK, "detach": True}, id="go")
        assert msgs == {"return": {}, "id": "go"}
        # MIGRATION setup came before the reply, as QEMU sends it.
        assert [e["data"] for e in c.events if e["event"] == "MIGRATION"][:1] == [
            {"status": "setup"}]

        async def completed() -> bool:
            return any(e["event"] == "MIGRATION" and e["data"]["status"] == "completed"
                       for e in await drain(watcher))

        await wait_until(completed, "MIGRATION completed relayed")
        relayed = [(e["event"], e["data"]) for e in watcher.events
                   if e["event"] in ("MIGRATION", "MIGRATION_PASS")]
        assert [m for m in relayed if m[0] == "MIGRATION"] == [
            ("MIGRATION", {"status": s}) for s in ("setup", "active", "completed")]
        assert ("MIGRATION_PASS", {"pass": 1}) in relayed
        # In the order QEMU sent them, with QEMU's timestamps.
        qemu_side = [(e["event"], e["data"], e["timestamp"]) for e in await drain(mon)
                     if e["event"] in ("MIGRATION", "MIGRATION_PASS")]
        ours = [(e["event"], e["data"], e["timestamp"]) for e in watcher.events
                if e["event"] in ("MIGRATION", "MIGRATION_PASS")]
        assert ours == qemu_side
        assert (await c.ok("query-migrate"))["status"] == "completed"
        # QEMU's words for what comes next, verbatim.
        again = await c.execute("migrate", {"uri": SINK}, id="again")
        assert again == error(GENERIC, "Can't migrate the vm that was paused due to previous "
                              "migration", "again")
    assert_clean_log(d)


async def test_a_failed_migration_is_logged_with_qemus_reason(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Reported: a migration that failed left "QEMU migration status: failed" in the
    log, at info level, and nothing of why: what QEMU's query-migrate says
    (error-desc), which the next migration replaces."""
    d = gate(start_daemon, qemu)
    await connected(d)
    nowhere = qemu.workdir / "nobody-listens.sock"
    async with d.client() as c:
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
        assert await c.ok("migrate", {"uri": f"unix:{nowhere}"}) == {}
        line = d.wait_for_log(re.compile(r"WARNING: QEMU at .* the migration failed: .*"))
        assert line.group(0) == (
            f"WARNING: QEMU at {qemu.gate_socket}: the migration failed: Failed to connect "
            f"to '{nowhere}': No such file or directory")
        assert (await c.ok("query-migrate"))["status"] == "failed"
    assert_clean_log(d)


async def test_add_blocker_is_refused_while_qemu_migrates(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    qemu = qemu_factory(memory="1G")
    d = gate(start_daemon, qemu)
    await connected(d)
    async with qemu.monitor() as mon, d.client() as c:
        # Slowed down through migblockd: QEMU's own parameter, forwarded.
        await c.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
        params = await c.ok("query-migrate-parameters")
        assert params["max-bandwidth"] == 100_000 and params["mode"] == "normal"
        await c.ok("migrate", {"uri": SINK})

        async def active() -> bool:
            return bool((await mon.ok("query-migrate")).get("status") == "active")

        await wait_until(active, "QEMU migrating")
        reply = await c.execute("add-blocker", {"reason": SEV, "id": "late"}, id=1)
        assert reply == error(GENERIC, "disallowing migration blocker (migration/snapshot in "
                              f"progress) for: {SEV}", 1)
        assert await c.ok("query-blockers") == []
        assert await c.execute("migrate", {"uri": SINK}, id=2) == error(
            GENERIC, "There's a migration process in progress", 2)
        assert await c.ok("migrate_cancel") == {}

        async def ended() -> bool:
            return (await mon.ok("query-migrate")).get("status") not in RUNNING

        await wait_until(ended, "QEMU's migration cancelled")
        assert (await c.ok("add-blocker", {"reason": SEV, "id": "now"}))["id"] == "now"
    assert_clean_log(d)


async def test_on_the_destination_an_incoming_migration_takes_blockers_as_qemu_does(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    # Reported: query-migrate's status there is the incoming migration's, and
    # add-blocker was refused as if QEMU migrated out, which QEMU itself does not do.
    source, target, incoming = source_and_target(qemu_factory)
    d = gate(start_daemon, target)
    await connected(d)
    async with target.monitor() as dst, source.monitor() as src, d.client() as c:
        await migrate_slowly(src, dst, incoming)
        await dst.add_blocker("vdi1")  # QEMU takes its own blockers meanwhile
        mine = await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=1)
        assert mine["return"]["id"] == "sev", mine
        # QEMU's answer to migrate, on its own monitor and through migblockd.
        want = await dst.execute("migrate", {"uri": SINK}, id=2)
        assert want == error(GENERIC, "Guest is waiting for an incoming migration", 2)
        assert await c.execute("migrate", {"uri": SINK}, id=2) == want
        await src.ok("migrate_cancel")
    assert_clean_log(d)


async def test_qemus_run_state_refuses_migrate_before_any_blocker_as_in_qemu(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # A migrated VM stays paused: QEMU says so before it looks at its blockers.
    d = gate(start_daemon, qemu)
    await connected(d)
    async with qemu.monitor() as mon, d.client() as c:
        await c.ok("migrate", {"uri": SINK})

        async def completed() -> bool:
            return bool((await mon.ok("query-migrate")).get("status") == "completed")

        await wait_until(completed, "the migration completed")
        await mon.add_blocker("vdi1")
        want = await mon.execute("migrate", {"uri": SINK}, id=1)
        assert want == error(GENERIC, "Can't migrate the vm that was paused due to previous "
                             "migration", 1)
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        assert await c.execute("migrate", {"uri": SINK}, id=1) == want
        await mon.ok("cont")  # running again: the blockers refuse, newest first
        assert await c.execute("migrate", {"uri": SINK}, id=2) == error(GENERIC, SEV, 2)
    assert_clean_log(d)


async def test_a_paused_postcopy_migration_is_resumed_through_migblockd(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    # Reported: "There's a migration process in progress" for migrate resume=true,
    # so an operator with only migblockd could never recover a half-migrated VM.
    source, target, incoming = source_and_target(qemu_factory)
    postcopy = {"capabilities": [{"capability": "postcopy-ram", "state": True}]}
    d = gate(start_daemon, source)
    await connected(d)
    async with target.monitor() as dst, source.monitor() as src, d.client() as c:
        await dst.ok("migrate-set-capabilities", postcopy)
        await dst.ok("migrate-incoming", {"uri": incoming})
        # Set up on QEMU's own monitor (migblockd's schema has none of these):
        # slow enough that postcopy starts, and is still going when the target dies.
        await src.ok("migrate-set-capabilities", postcopy)
        await src.ok("migrate-set-parameters", {"max-bandwidth": 100_000,
                                                "max-postcopy-bandwidth": 100_000})
        await c.ok("migrate", {"uri": incoming})
        await src.ok("migrate-start-postcopy")

        async def status(wanted: str) -> bool:
            return bool((await src.ok("query-migrate")).get("status") == wanted)

        await wait_until(lambda: status("postcopy-active"), "postcopy running")
        target.kill()
        await wait_until(lambda: status("postcopy-paused"), "postcopy paused")
        # A new migrate is refused, in QEMU's words; a resume goes to QEMU, which
        # takes it (it connects afterwards, and pauses again when nobody answers).
        again = await c.execute("migrate", {"uri": incoming}, id="new")
        assert again == error(GENERIC, "There's a migration process in progress", "new")
        resumed = await c.execute("migrate", {"uri": incoming, "resume": True},
                                  id="resume")
        assert resumed == {"return": {}, "id": "resume"}
        d.wait_for_log(re.compile(r"migration to 'unix:.*' resumed by QEMU"))
    assert_clean_log(d)


async def test_adds_sent_together_each_count_against_max_blockers(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # Each add asks QEMU whether it migrates before it adds: all six wait for
    # QEMU at once, and the limit must still hold when they go on.
    d = gate(start_daemon, qemu, "--max-blockers", "2")
    await connected(d)
    async with d.clients(6) as clients:
        for n, c in enumerate(clients):
            c.send_raw(json.dumps({"execute": "add-blocker", "id": n,
                                   "arguments": {"reason": f"r{n}"}}).encode())
        replies = [await c.read_reply() for c in clients]
        assert sum("return" in r for r in replies) == 2, replies
        assert [r for r in replies if "return" not in r] == [
            error(GENERIC, "Too many migration blockers: 2 registered, max-blockers is 2",
                  r["id"]) for r in replies if "return" not in r]
        assert len(await clients[0].ok("query-blockers")) == 2
    assert_clean_log(d)


async def test_qemu_killed_and_restarted(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = gate(start_daemon, qemu)
    await connected(d)
    async with d.client() as c:
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        qemu.kill()
        d.wait_for_log(f"lost the connection to QEMU at {qemu.gate_socket}")
        # Forwarded commands say QEMU is away, naming its monitor.
        for command, args in (("migrate", {"uri": SINK}), ("query-migrate", {}),
                              ("migrate_cancel", {}), ("query-migrate-capabilities", {})):
            reply = await c.execute(command, args, id=command)
            desc = reply["error"]["desc"]
            assert f"Not connected to QEMU's monitor at '{qemu.gate_socket}'" in desc, reply
        # (migrate too: QEMU's order checks for a running migration before the blockers,
        # and only QEMU can say.)  Blocker commands keep working.
        await c.ok("add-blocker", {"reason": "held while QEMU is away", "id": "away"})
        assert [b["id"] for b in await c.ok("query-blockers")] == ["sev", "away"]
        await c.ok("del-blocker", {"id": "away"})
        # A new QEMU on the same socket: migblockd reconnects by itself and gates again.
        qemu.restart()
        d.wait_for_log("connected to QEMU 7.", timeout=30)

        async def gating() -> bool:
            reply = await c.execute("migrate", {"uri": SINK}, id="back")
            return bool(reply == error(GENERIC, SEV, "back"))

        await wait_until(gating, "migrate refused by migblockd's blocker again")
        async with qemu.monitor() as mon:
            assert (await mon.ok("query-migrate")).get("status") is None
    assert_clean_log(d)


async def test_clients_and_passthrough_against_a_gating_daemon(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Any,
) -> None:
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["query-status", "query-version", '
                      '"human-monitor-command"]\n')
    d = gate(start_daemon, qemu, "--config", str(config))
    await connected(d)
    # At the line of the file that gives it, the only place it can come from.
    assert (f"{config}:1: qemu-passthrough: ignoring query-version: migblockd's own "
            "command(s)") in d.log()
    assert (f"WARNING: {config}:1: qemu-passthrough: human-monitor-command lets admins "
            "migrate or snapshot the VM past migblockd's blockers (QEMU consults only its "
            "own for its HMP migrate and savevm)") in d.log()
    assert "query-status lets" not in d.log()
    qmp = QMPClient("gate-test")
    await qmp.connect(str(d.socket))
    try:
        status = await qmp.execute("query-status")  # QEMU's own command, forwarded
        assert isinstance(status, dict) and status["status"] == "prelaunch"
        commands = await qmp.execute("query-commands")
        assert isinstance(commands, list)
        names = [c["name"] for c in commands]
        assert "query-status" in names and "add-blocker" in names
        blocker = await qmp.execute("add-blocker", {"reason": SEV})
        assert isinstance(blocker, dict) and blocker["source"] == "migblockd"
    finally:
        await qmp.disconnect()
    async with d.client() as c:
        assert (await c.ok("query-version"))["package"].startswith("migblockd")
    assert_clean_log(d)


def xp(quadwords: int) -> dict[str, str]:
    """HMP's ``xp`` of ``quadwords`` 8-byte words of guest memory: QEMU's reply is about
    29.5 bytes per word, a size the test chooses."""
    return {"command-line": f"xp /{quadwords}xg 0"}


async def test_passing_xen_save_devices_state_through_is_warned_of(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Path,
) -> None:
    # Reproduced first: no warning, though QEMU saves the devices' state to a file with
    # its own blocker and migblockd's both there (it consults no blocker for it).
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["xen-save-devices-state"]\n')
    d = gate(start_daemon, qemu, "--config", str(config))
    await connected(d)
    assert (f"WARNING: {config}:1: qemu-passthrough: xen-save-devices-state lets admins "
            "save the VM's device state past every blocker, migblockd's and QEMU's own "
            "(QEMU consults none for it), into any file QEMU's user may write") in d.log()
    image, saved = tmp_path / "x.vdi", tmp_path / "devices.state"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", str(image), "1M"], check=True)
    async with qemu.monitor() as q, d.client() as c:
        await q.ok("blockdev-add", {"driver": "vdi", "node-name": "v", "read-only": True,
                                    "file": {"driver": "file", "filename": str(image),
                                             "read-only": True}})
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        assert [b["source"] for b in await c.ok("query-blockers")] == ["migblockd", "qemu"]
        await c.ok("xen-save-devices-state", {"filename": str(saved)})
    assert saved.stat().st_size > 0  # what the warning is about: saved all the same
    assert_clean_log(d)


async def test_descriptors_sent_to_migblockd_are_not_passed_on_and_that_is_said(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Path,
) -> None:
    # Reproduced first: getfd and add-fd passed through started with no word; every
    # one then failed in QEMU's words, "No file descriptor supplied via SCM_RIGHTS",
    # though the client had sent one (migblockd reads no ancillary data).
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["getfd", "add-fd"]\n')
    d = gate(start_daemon, qemu, "--config", str(config))
    await connected(d)
    for name in ("getfd", "add-fd"):
        assert (f"WARNING: {config}:1: qemu-passthrough: {name} takes a file descriptor "
                "sent with it (SCM_RIGHTS), which migblockd does not pass on to QEMU: QEMU "
                "answers it through migblockd 'No file descriptor supplied via "
                "SCM_RIGHTS'") in d.log()
    qmp = QMPClient("gate-test")
    await qmp.connect(str(d.socket))
    read_end, write_end = os.pipe()
    try:
        for name, args in (("getfd", {"fdname": "mig"}), ("add-fd", {})):
            qmp.send_fd_scm(write_end)
            with pytest.raises(ExecuteError) as refused:
                await qmp.execute(name, args)
            assert refused.value.error.error.desc == (
                "No file descriptor supplied via SCM_RIGHTS")
        # An fd: URI names a descriptor passed on the monitor connection the migrate
        # comes from: migblockd's, which no client can send one to.
        with pytest.raises(ExecuteError) as refused:
            await qmp.execute("migrate", {"uri": "fd:mig"})
        assert refused.value.error.error.desc == "File descriptor named 'mig' has not been found"
        # Dropped as it came (the kernel closes what is not read), not kept open.
        pipe = f"pipe:[{os.fstat(write_end).st_ino}]"
        fds = Path(f"/proc/{d.proc.pid}/fd")
        assert pipe not in [os.readlink(fd) for fd in fds.iterdir()]
    finally:
        os.close(read_end)
        os.close(write_end)
        await qmp.disconnect()
    assert_clean_log(d)


async def test_a_big_passthrough_reply_arrives_whole_and_a_bigger_one_is_named(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Any,
) -> None:
    # Reported: qemu.qmp reads lines of at most 10 MiB, and a longer reply dropped the
    # link with asyncio's words ("Separator is not found, and chunk exceed the limit").
    qemu = qemu_factory(memory="128M")  # xp reads guest memory: 128 MiB of it
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["human-monitor-command"]\n')
    d = gate(start_daemon, qemu, "--config", str(config), "--qemu-timeout", "0")
    await connected(d)
    qmp = QMPClient("gate-test", readbuflen=1 << 30)
    await qmp.connect(str(d.socket))
    try:
        dump = await qmp.execute("human-monitor-command", xp(450_000))  # 13 MB of text
        assert isinstance(dump, str) and len(dump) > 10 << 20
        lines = dump.splitlines()
        assert len(lines) == 225_000
        assert lines[-1] == "000000000036ee70: 0x0000000000000000 0x0000000000000000"
        # Past migblockd's limit (64 MiB: 2,300,000 words are 67.8 MB), in plain words.
        with pytest.raises(ExecuteError) as caught:
            await qmp.execute("human-monitor-command", xp(2_300_000))
        assert caught.value.error.error.desc == (
            "QEMU's reply to 'human-monitor-command' was larger than 67108864 bytes, the "
            f"most migblockd reads from QEMU: migblockd dropped the connection to QEMU's "
            f"monitor at '{qemu.gate_socket}' and reconnects; QEMU did run the command")
        d.wait_for_log(
            f"lost the connection to QEMU at {qemu.gate_socket}: QEMU's reply to "
            "'human-monitor-command' was larger than 67108864 bytes, the most migblockd "
            "reads from QEMU; migblockd dropped the connection; reconnecting")
        await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                         "migblockd connected to QEMU again")
        status = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        assert status == "VM status: paused (prelaunch)\r\n"  # the same QEMU, still there
    finally:
        await qmp.disconnect()
    assert "Separator" not in d.log()
    assert_clean_log(d)


async def test_a_gating_daemon_started_before_qemu_connects_when_it_appears(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    qemu = qemu_factory(start=False)
    d = gate(start_daemon, qemu)
    async with d.client() as c:
        reply = await c.execute("query-migrate", id=1)
        assert "Not connected to QEMU's monitor" in reply["error"]["desc"]
        qemu.start()
        await connected(d)
        assert await c.ok("query-migrate") == {}
    raw: RawClient
    async with d.client() as raw:
        assert (await raw.ok("query-blockers")) == []
    assert_clean_log(d)


async def test_a_qemu_path_that_can_never_work_is_a_warning(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Any,
) -> None:
    # Reported: logged at info only, so at --log-level warning (or journalctl -p
    # warning) the daemon said nothing while migrate never reached QEMU.
    qemu = qemu_factory(start=False)
    hmp = qemu.workdir / "hmp.sock"
    qemu.args = ("-monitor", f"unix:{hmp},server=on,wait=off")
    qemu.start()
    regular = tmp_path / "vm1.qmp"
    regular.write_text("")
    # QEMU's QMP monitor, which the daemon's user may not connect to: root without
    # CAP_DAC_OVERRIDE, and a socket whose owner (root) has no write permission.
    qemu.gate_socket.chmod(0)
    no_override = tmp_path / "python-no-dac-override"
    no_override.write_text("#!/bin/sh\nexec setpriv --bounding-set=-dac_override,"
                           f"-dac_read_search {sys.executable} \"$@\"\n")
    no_override.chmod(0o755)
    python = sys.executable if os.geteuid() != 0 else str(no_override)
    for path, why in (
            (regular, "not a socket (a regular file)"),
            (hmp, "this is QEMU's human monitor (HMP: -monitor, or -mon mode=readline), "
                  "not QMP: give migblockd a -qmp monitor"),
            (qemu.gate_socket, "Permission denied")):
        d = start_daemon("--qemu", str(path), "--log-level", "warning", "--ephemeral",
                         wait=False, python=python)
        d.wait_for_log(f"WARNING: QEMU at {path} is not available: {why}; retrying")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
        assert d.log().count("is not available") == 1  # once, not once per attempt
        assert_clean_log(d)
    # A QEMU that is not there yet is no warning: QEMU may start after migblockd.
    d = start_daemon("--qemu", str(tmp_path / "absent.qmp"), "--log-level", "warning",
                     wait=False)
    await wait_until(d.socket.exists, "the daemon's socket")
    async with d.client() as c:  # greeted: migblockd has tried QEMU once (gate.md)
        assert await c.ok("query-blockers") == []
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert "is not available" not in d.log()
    assert_clean_log(d)


def test_a_daemon_told_to_gate_its_own_socket_refuses_to_start(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Any,
) -> None:
    # Reported: it connected to itself as "QEMU 0.1.0", and every forwarded command
    # then waited for itself until qemu-timeout.
    own = tmp_path / "vm1.sock"
    (tmp_path / "alias").mkdir()
    (tmp_path / "alias" / "vm1.sock").symlink_to(own)
    for qemu in (own, tmp_path / "alias" / "vm1.sock"):
        d = start_daemon("--qemu", str(qemu), "--ephemeral", socket=own, wait=False)
        assert d.wait_exit() != 0
        d.wait_for_log(f"--qemu {qemu}: that is migblockd's own socket; --qemu names the "
                       "QMP monitor of the QEMU to gate (its -qmp)")
        assert "connected to QEMU" not in d.log()
        assert_clean_log(d)


async def test_a_daemon_told_to_gate_another_migblockd_says_so_and_gates_nothing(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Any,
) -> None:
    """--qemu naming another migblockd's socket (both serve QMP; the per-VM one is an easy
    slip for the VM's -qmp). Reported: "connected to QEMU 0.1.0" in the log, and every
    migrate refused with "The command query-status has not been found"."""
    other = start_daemon("--ephemeral", socket=tmp_path / "other.sock")
    d = start_daemon("--qemu", str(other.socket), "--ephemeral", "--log-level", "warning",
                     socket=tmp_path / "vm1.sock", wait=False)
    why = (f"that is a migblockd's socket (migblockd {__version__}), not QEMU's monitor: "
           "give migblockd the socket of QEMU's -qmp")
    d.wait_for_log(f"WARNING: QEMU at {other.socket} is not available: {why}; retrying")
    await wait_until(d.socket.exists, "the daemon's socket")
    async with d.client() as c:
        assert await c.execute("migrate", {"uri": SINK}, id=1) == error(
            GENERIC, f"Not connected to QEMU's monitor at '{other.socket}': {why}", 1)
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert "connected to QEMU" not in d.log()
    assert d.log().count("is not available") == 1  # once, not once per attempt
    assert_clean_log(d)


def test_migblock_shell_works_unchanged_against_a_gating_daemon(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = gate(start_daemon, qemu)
    d.wait_for_log("connected to QEMU 7.")
    script = f"add-blocker reason={SEV!r} id=sev\nquery-blockers\nmigrate uri='{SINK}'\n"
    result = subprocess.run(
        [sys.executable, "-m", "migblockd.shell", str(d.socket)], input=script,
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result  # the refused migrate
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert out[0]["return"]["id"] == "sev"
    assert [b["source"] for b in out[1]["return"]] == ["migblockd"]
    assert out[2] == error(GENERIC, SEV)
    assert_clean_log(d)


def test_migblock_shell_runs_and_explains_forwarded_commands(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Any,
) -> None:
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["query-status"]\n')
    d = gate(start_daemon, qemu, "--config", str(config))
    d.wait_for_log("connected to QEMU 7.")
    # Introspection does not describe QEMU's command, query-commands lists it: the
    # shell sends it by name instead of refusing it as unknown.
    result = subprocess.run(
        [sys.executable, "-m", "migblockd.shell", str(d.socket)],
        input="query-status\nhelp query-status\nquery-statu\n",
        capture_output=True, text=True, timeout=60, check=False)
    lines = result.stdout.splitlines()
    assert json.loads(lines[0])["return"]["status"] == "prelaunch", result
    assert lines[1] == "query-status (command, forwarded to QEMU)"
    assert "sends it unchecked" in result.stdout
    assert "unknown command 'query-statu'; did you mean 'query-status'?" in result.stderr
    assert_clean_log(d)


async def test_a_stopped_qemu_gets_a_timeout_error_instead_of_a_hang(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "1")
    await connected(d)
    late = re.compile(re.escape(f"QEMU's monitor at '{qemu.gate_socket}' did not answer ")
                      + r"'[a-z_-]+' within 1 s; it may still run it")
    async with d.client() as c, d.client() as other:
        qemu.proc.send_signal(signal.SIGSTOP)  # QEMU will not reply
        try:
            pending = asyncio.create_task(c.execute("query-migrate", id="q"))
            # migblockd itself still answers, while a forwarded command waits for QEMU.
            version = await asyncio.wait_for(other.ok("query-version"), 10)
            assert version["package"].startswith("migblockd")
            assert not pending.done()
            reply = await asyncio.wait_for(pending, 10)
            assert reply == error(GENERIC, f"QEMU's monitor at '{qemu.gate_socket}' did not "
                                  "answer 'query-migrate' within 1 s; it may still run it", "q")
            reply = await asyncio.wait_for(c.execute("migrate", {"uri": SINK}, id="m"), 10)
            # Its words named migblockd's own query as if the client had sent it.
            refusal = "migrate was not sent: QEMU did not answer migblockd's check of " \
                "whether it may migrate ("
            desc = reply["error"]["desc"]
            assert reply["error"]["class"] == GENERIC and desc.startswith(refusal) and (
                late.fullmatch(desc[len(refusal):-1])), reply
            d.wait_for_log(f"migrate to '{SINK}' refused: \"{refusal}")  # written off the loop
            # The blocker commands, which ask QEMU first, answer too (no hang).
            for command, args in (("add-blocker", {"reason": SEV, "id": "sev"}),
                                  ("query-blockers", {})):
                reply = await asyncio.wait_for(c.execute(command, args, id=command), 10)
                assert reply.get("id") == command, reply
            d.wait_for_log(f"QEMU at {qemu.gate_socket} did not answer 'query-migrate' "
                           "within 1 s")
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        # QEMU answers again, on the same connection: each reply to its own command.
        assert isinstance(await asyncio.wait_for(c.ok("query-migrate"), 10), dict)
        assert await asyncio.wait_for(c.ok("query-migrate-capabilities"), 10)
    assert "lost the connection" not in d.log()
    assert d.stop() == 0  # promptly: nothing left waiting for QEMU
    assert "dropped: still taking" not in d.log()
    assert_clean_log(d)


async def test_a_stopped_qemu_is_logged_once_and_shown_in_the_status_line(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
) -> None:
    # A stopped QEMU made a warning for each command of each client that timed out,
    # and STATUS= went on saying "QEMU 7.2.22 connected" all along.
    assert qemu.proc is not None
    notify = short_tmp / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    receiver.settimeout(10)
    d = start_daemon("--qemu", str(qemu.gate_socket), "--qemu-timeout", "1",
                     env={**os.environ, "NOTIFY_SOCKET": str(notify)})

    def status_until(wanted: Callable[[str], bool]) -> str:
        while True:
            for line in receiver.recv(4096).decode().splitlines():
                if line.startswith("STATUS=") and wanted(line):
                    return line.partition(", QEMU ")[2]

    try:
        await connected(d)
        async with d.client() as c:
            qemu.proc.send_signal(signal.SIGSTOP)  # QEMU will not reply
            try:
                for n in range(3):
                    reply = await asyncio.wait_for(c.execute("query-migrate", id=n), 10)
                    assert "did not answer 'query-migrate' within 1 s" in (
                        reply["error"]["desc"]), reply
                assert re.fullmatch(r"7\.\d+\.\d+ connected, not answering", status_until(
                    lambda line: "not answering" in line))
            finally:
                qemu.proc.send_signal(signal.SIGCONT)
            assert isinstance(await asyncio.wait_for(c.ok("query-migrate"), 10), dict)
            assert re.fullmatch(r"7\.\d+\.\d+ connected", status_until(
                lambda line: "not answering" not in line))
        d.wait_for_log(f"INFO: QEMU at {qemu.gate_socket} answers again (it had not "
                       "answered 'query-migrate' within 1 s)")
        said = [line for line in d.log().splitlines() if " did not answer " in line]
        assert [line.partition(" WARNING: ")[2] for line in said if " WARNING: " in line] == [
            f"QEMU at {qemu.gate_socket} did not answer 'query-migrate' within 1 s (stopped, "
            "or busy with a long command?); the client's command that sent it failed, QEMU may "
            "still run it; "
            "further commands it leaves unanswered are not logged until it answers"], said
    finally:
        receiver.close()
    assert d.stop() == 0
    assert_clean_log(d)


async def test_a_new_qemu_is_not_said_to_answer_again(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # The link kept the command the stopped QEMU left unanswered across the restart:
    # the new QEMU's first answer was logged as "QEMU at ... answers again (it had not
    # answered 'query-migrate' within 1 s)", of a process that had never been asked.
    assert qemu.proc is not None
    d = start_daemon("--qemu", str(qemu.gate_socket), "--qemu-timeout", "1")
    await connected(d)
    async with d.client() as c:
        qemu.proc.send_signal(signal.SIGSTOP)
        reply = await asyncio.wait_for(c.execute("query-migrate", id=1), 10)
        assert "did not answer 'query-migrate' within 1 s" in reply["error"]["desc"], reply
        qemu.restart()  # SIGKILL ends the stopped one; a new one on the same socket
        await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2, "reconnected")
        assert isinstance(await asyncio.wait_for(c.ok("query-migrate"), 10), dict)
    assert " answers again " not in d.log(), d.log()
    assert d.stop() == 0
    assert_clean_log(d)


async def test_a_client_gone_while_a_stopped_qemu_holds_its_command_is_let_go(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Reported: migblockd did not read a client whose command waited for QEMU, so its
    hang-up went unseen until QEMU answered, never for a stopped QEMU with qemu-timeout
    0: its slot stayed taken (max-clients turned newcomers away) and its connection's
    blockers stayed.  QEMU's own monitor sees a hang-up while a command runs."""
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "0", "--max-clients", "3")
    await connected(d)
    async with d.client() as watcher, d.client() as gone, d.client() as half:
        await gone.ok("add-blocker", {"reason": SEV, "id": "mine", "scope": "connection"})
        await watcher.wait_event("BLOCKER_ADDED")
        qemu.proc.send_signal(signal.SIGSTOP)
        try:
            await gone.send({"execute": "query-migrate", "id": "q"})
            await half.send({"execute": "query-migrate", "id": "h"})
            await half.write_eof()  # half-closed: it still reads, and is owed its reply
            await gone.close()
            deleted = await watcher.wait_event("BLOCKER_DELETED")
            assert deleted["data"] == {"id": "mine", "cause": "connection-closed"}
            async with d.client() as newcomer:  # gone's slot is free
                await newcomer.ok("query-version")
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        reply = await half.read_reply()
        assert reply["id"] == "h" and "return" in reply, reply
        assert isinstance(await watcher.ok("query-migrate"), dict)
    assert_clean_log(d)


async def test_a_connection_blocker_added_after_its_client_was_let_go_goes_too(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """The add of a client let go while QEMU held it still runs once QEMU answers; its
    blocker, of a connection already gone, must not outlive it."""
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "0")
    await connected(d)
    async with d.client() as watcher, d.client() as gone:
        qemu.proc.send_signal(signal.SIGSTOP)
        try:
            # With --qemu an add first asks QEMU whether it migrates: it waits.
            await gone.send({"execute": "add-blocker", "id": "a", "arguments": {
                "reason": SEV, "id": "late", "scope": "connection"}})
            await gone.close()
            d.wait_for_log(re.compile(r"client \d+ \(.*\) disconnected"))
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        added = await watcher.wait_event("BLOCKER_ADDED")
        deleted = await watcher.wait_event("BLOCKER_DELETED")
        assert added["data"]["id"] == deleted["data"]["id"] == "late"
        assert deleted["data"]["cause"] == "connection-closed"
        assert await watcher.ok("query-blockers") == []
    assert_clean_log(d)


async def test_migration_parameters_are_judged_as_qemu_judges_them(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # The simulation's answers, the gate's and QEMU's own, request by request:
    # size and uint64 take negative numbers and wrap them, and QEMU's
    # migrate_params_check() refuses a downtime over 2000 s, applying nothing.
    sim = start_daemon(socket=qemu.gate_socket.with_name("simulation.sock"))
    d = gate(start_daemon, qemu)
    await connected(d)
    requests: list[dict[str, Any]] = [
        {"downtime-limit": -1}, {"downtime-limit": 2000001}, {"downtime-limit": 2000000},
        {"downtime-limit": 1.5}, {"max-bandwidth": "fast"}, {"max-bandwidth": -5},
        {"max-bandwidth": 1000, "downtime-limit": 2000001}, {"downtime-limit": 2**64 - 1},
    ]
    async with qemu.monitor() as mon, sim.client() as s, d.client() as g:
        for i, args in enumerate(requests):
            want = await mon.execute("migrate-set-parameters", args, id=i)
            assert await s.execute("migrate-set-parameters", args, id=i) == want, args
            assert await g.execute("migrate-set-parameters", args, id=i) == want, args
        real = await mon.ok("query-migrate-parameters")
        simulated = await s.ok("query-migrate-parameters")
        assert real["max-bandwidth"] == simulated["max-bandwidth"] == 2**64 - 5
        assert real["downtime-limit"] == simulated["downtime-limit"] == 2000000


async def test_migrate_arguments_qemu_does_not_take_are_refused_first_in_its_words(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # migblockd's schema has channels (QEMU 8.2's); QEMU 7.2's has none and requires
    # uri, and its visitor says so before migrate_prepare() looks at any blocker.
    d = gate(start_daemon, qemu)
    await connected(d)
    channels = [{"channel-type": "main", "addr": {"transport": "exec", "args": ["true"]}}]
    # Nor does the gate judge a channel's address as the simulation does (QEMU's
    # visitor would, before qmp_migrate()): QEMU answers for itself.
    bad = [{"channel-type": "main", "addr": {"transport": "tcp"}}]
    cases: list[dict[str, Any]] = [
        {"uri": SINK, "channels": channels}, {"channels": channels},
        {"channels": channels, "resume": True}, {"channels": bad}, {"uri": SINK, "channels": bad},
    ]
    async with qemu.monitor() as mon, d.client() as c:
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        for i, args in enumerate(cases):
            want = await mon.execute("migrate", args, id=i)
            assert "error" in want, want
            assert await c.execute("migrate", args, id=i) == want, args
        # The next valid migrate is judged as before: by the blocker, then by QEMU.
        assert await c.execute("migrate", {"uri": SINK}, id="m") == error(GENERIC, SEV, "m")
        await c.ok("del-blocker", {"id": "sev"})
        await c.ok("migrate", {"uri": SINK})
    assert_clean_log(d)


async def test_migrate_arguments_are_judged_in_the_order_qemus_visitor_judges_them(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Found driving migblockd as management software: a value migblockd's schema
    refuses (channels that are no list, or no channel; a detach that is no boolean) was
    refused in migblockd's words, though QEMU 7.2 never looks at it: its visitor first
    misses uri, or finds channels unexpected, after every member it takes."""
    d = gate(start_daemon, qemu)
    await connected(d)
    cases: list[dict[str, Any]] = [
        {"uri": SINK, "channels": 1}, {"channels": 1}, {"channels": [{"bogus": 1}]},
        {"uri": SINK, "channels": [{"bogus": 1}]}, {"detach": "x"},
        {"resume": "x", "channels": 1},
        # QEMU's own members keep their types: these it refuses for the type.
        {"uri": 1, "channels": 1}, {"uri": SINK, "detach": "x", "channels": 1},
    ]
    async with qemu.monitor() as mon, d.client() as c:
        for i, args in enumerate(cases):
            want = await mon.execute("migrate", args, id=i)
            assert "error" in want, want
            assert await c.execute("migrate", args, id=i) == want, args
        await c.ok("migrate", {"uri": SINK})
    assert_clean_log(d)


async def test_the_client_library_lists_qemus_blockers_too(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # QEMU says nothing of when its blockers were added: the typed listing must cope.
    d = gate(start_daemon, qemu)
    await connected(d)
    async with qemu.monitor() as mon, MigblockClient(d.socket) as client:
        await mon.add_blocker("vdi1")
        mine = await client.add_blocker(SEV)
        listed = {b.id: b for b in await client.blockers()}
        assert set(listed) == {mine.id, "qemu:1"}
        theirs = listed["qemu:1"]
        assert (theirs.source, theirs.added, theirs.reason) == (
            "qemu", None, mon.blocker_text("vdi1"))
        assert (listed[mine.id].source, listed[mine.id].added) == ("migblockd", mine.added)
        assert mine.added is not None and mine.owner is not None
        assert mine.owner.user is not None  # the daemon's system knows this uid


async def test_commands_that_wait_for_qemu_refuse_exec_oob_as_qemu_does(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Reported: exec-oob migrate_cancel and query-migrate were accepted behind
    --qemu but waited behind the client's in-band command that waited for QEMU
    (QEMU runs what migblockd forwards in-band, in order): no out-of-band at all."""
    d = gate(start_daemon, qemu)
    await connected(d)
    waiting = {"migrate_cancel", "query-migrate", "query-migrate-parameters",
               "query-migrate-capabilities", "query-blockers"}
    async with d.client(negotiate=False) as c:
        assert await c.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        for name in sorted(waiting):
            await c.send({"exec-oob": name, "id": name})
            assert await c.read_reply() == error(
                GENERIC, f"The command {name} does not support OOB", name)
            assert "return" in await c.execute(name, id=name)  # in-band, as ever
        schema = await c.ok("query-qmp-schema")
        assert {e["name"] for e in schema if e.get("allow-oob")} == {
            "query-version", "query-commands", "query-qmp-schema"}
    # QEMU's own words, on QEMU's own monitor.
    mon = await QemuMonitor.connect(qemu.test_socket, negotiate=False)
    try:
        assert await mon.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        for name in ("migrate_cancel", "query-migrate"):
            await mon.send({"exec-oob": name, "id": name})
            assert await mon.read_reply() == error(
                GENERIC, f"The command {name} does not support OOB", name)
    finally:
        await mon.close()
    assert_clean_log(d)


async def test_a_stop_as_qemu_goes_away_logs_no_traceback(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Reported: stopped in the moment QEMU closed its end of the monitor's connection
    (a host's shutdown stops both), migblockd logged ``ERROR: _GatheringFuture
    exception was never retrieved`` and an EOFError's traceback: the stop cancelled
    the link while it was taking that connection down, and the library's gathered
    error was left to the garbage collector."""
    d = gate(start_daemon, qemu)
    await connected(d)
    # Both in one turn of the daemon's loop: QEMU's EOF, and the stop.
    d.signal(signal.SIGSTOP)
    try:
        qemu.kill()
        d.signal(signal.SIGTERM)
    finally:
        d.signal(signal.SIGCONT)
    await asyncio.to_thread(d.proc.wait, 30)
    assert "stopped" in d.log()
    assert_clean_log(d)


async def test_qemus_blockers_are_not_left_out_while_migblockd_reconnects_to_a_live_qemu(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Any,
) -> None:
    """Reported: right after migblockd dropped its connection to QEMU over a reply too
    long to read (QEMU running on, with a blocker of its own), ``query-blockers``
    answered ``[]`` and ``add-blocker`` was taken as for a QEMU that is away, until
    the link's next connection was accepted: QEMU was there all along."""
    qemu = qemu_factory(memory="128M")
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["human-monitor-command"]\n')
    d = gate(start_daemon, qemu, "--config", str(config), "--qemu-timeout", "0",
             "--log-level", "debug")
    await connected(d)
    async with qemu.monitor() as mon, d.client() as big, d.client() as c:
        await mon.add_blocker("vdi1")
        await big.send({"execute": "human-monitor-command", "arguments": xp(2_300_000),
                        "id": "big"})
        await wait_until(lambda: "xp /2300000xg" in d.log(), "the xp sent to QEMU")
        # Queued behind the xp in QEMU; then, each as the one before is answered.
        await c.send({"execute": "query-blockers", "id": 1})
        for n in range(2, 12):
            await c.send({"execute": "query-blockers", "id": n})
        await c.send({"execute": "add-blocker", "arguments": {"reason": SEV, "id": "sev"},
                      "id": "add"})
        # QEMU formats 2.3 million words before it answers: on a loaded machine that
        # takes longer than a reply usually may, and everything below waits behind it.
        assert "larger than 67108864 bytes" in (await big.read_reply(60))["error"]["desc"]
        for n in range(1, 12):
            reply = await c.read_reply()
            assert reply["id"] == n
            if "return" in reply:  # QEMU's blocker listed, never left out
                assert [b["id"] for b in reply["return"]] == ["qemu:1"], reply
        added = await c.read_reply()
        if "return" not in added:  # not told QEMU's state yet: refused as busy
            assert added == error(GENERIC, "disallowing migration blocker (migration/"
                                  f"snapshot in progress) for: {SEV}", "add")
    assert_clean_log(d)

"""A gate that cannot be got round: what a real QEMU 7.2 behind migblockd must never do.

Each test is a way through the gate that a review found, on real processes: a
restarted migblockd that served an ``add-blocker`` before it knew that QEMU was
migrating, a migration mode that QEMU 7.2 does not have (it migrated in ``normal``
past a ``normal`` blocker), a capability lost with a restarted QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, DaemonProcess, assert_clean_log
from faults import injecting
from qemu_strings import GENERIC, MDEV, SEV, VFIO, error
from qmpclient import RawClient
from realqemu import Qemu, QemuMonitor, migrate_slowly, source_and_target, wait_until
from test_gate import SINK, connected, gate
from test_metrics import scrape
from test_qemu_link import stopping_relay

from migblockd.contract import Contract
from migblockd.forwarding import Call, Pin
from migblockd.qemu.bridge import Bridge
from migblockd.qemu.lost_migration import EXIT_GRACE
from migblockd.qemu.reconnect import LinkState
from migblockd.qemu_facts import QemuRestarted
from migblockd.registry import Registry

#: How the debug log traces a query-migrate sent to QEMU.
QUERY_MIGRATE = '"execute":"query-migrate"'
CONTRACT = Contract.load()
EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}
EVENTS_OFF = {"capabilities": [{"capability": "events", "state": False}]}


async def gated(start_daemon: Callable[..., DaemonProcess], qemu: Qemu) -> DaemonProcess:
    """A daemon gating ``qemu``, connected to it."""
    d = gate(start_daemon, qemu)
    await connected(d)
    return d


async def start_slow_migration(c: RawClient) -> None:
    """A migration of QEMU's 1 GiB at 100 kB/s: it runs until cancelled."""
    await c.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
    await c.ok("migrate", {"uri": SINK})


async def read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 30))
    return message


async def quit_once_migrated(qemu: Qemu, mon: QemuMonitor) -> int:
    """Wait for QEMU's migration to complete, as its other monitor ``mon`` says, then
    have QEMU quit, as a migrated source does; QEMU's pid."""
    async def completed() -> bool:
        return bool((await mon.ok("query-migrate")).get("status") == "completed")

    await wait_until(completed, "QEMU's migration completed")
    assert qemu.proc is not None
    pid = qemu.proc.pid
    await mon.ok("quit")
    return pid


def heard(c: RawClient) -> list[str]:
    """The statuses of the MIGRATION events ``c`` has read so far, in order (among
    its other events: MIGRATION_PASS, read while it awaited a reply)."""
    return [e["data"]["status"] for e in c.events if e.get("event") == "MIGRATION"]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="needs systemd-socket-activate (apt install systemd)")
async def test_a_restarted_gate_knows_that_qemu_migrates_before_its_first_client(
    qemu_factory: Callable[..., Qemu], tmp_path: Path,
) -> None:
    """Under socket activation the first client's request is in the socket before
    the daemon runs: it must not be served before migblockd has asked QEMU."""
    qemu = qemu_factory(memory="1G")
    async with qemu.monitor() as mon:
        await mon.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
        await mon.ok("migrate", {"uri": SINK})

        async def active() -> bool:
            return bool((await mon.ok("query-migrate")).get("status") == "active")

        await wait_until(active, "QEMU migrating")
        sock = tmp_path / "gate.sock"
        log_path = tmp_path / "daemon.log"
        with log_path.open("wb") as log:
            activate = subprocess.Popen(
                ["systemd-socket-activate", "-l", str(sock), "--fdname=migblockd",
                 sys.executable, "-m", "migblockd", "--ephemeral", "--log-level", "info",
                 "--qemu", str(qemu.gate_socket)], stdout=log, stderr=log)
        try:
            await wait_until(sock.exists, "the activation socket")
            reader, writer = await asyncio.open_unix_connection(str(sock))
            # All at once, before the daemon even starts: it starts on this connection.
            writer.write(b'{"execute": "qmp_capabilities"}'
                         b'{"execute": "add-blocker", "arguments": {"reason": "' +
                         SEV.encode() + b'", "id": "early"}, "id": 1}'
                         b'{"execute": "query-blockers", "id": 2}')
            await writer.drain()
            assert "QMP" in await read_reply(reader)
            assert await read_reply(reader) == {"return": {}}
            assert await read_reply(reader) == error(
                GENERIC, f"disallowing migration blocker (migration/snapshot in progress) "
                f"for: {SEV}", 1)
            assert await read_reply(reader) == {"return": [], "id": 2}
            writer.close()
            await mon.ok("migrate_cancel")
        finally:
            activate.terminate()
            activate.wait(30)
    text = log_path.read_text()
    assert f"QEMU at {qemu.gate_socket} is migrating (status active)" in text
    assert text.index("is migrating") < text.index("refused blocker")
    assert "Traceback" not in text


async def deleted_while_migrate_asks(d: DaemonProcess, qemu: Qemu, migrator: RawClient,
                                     deleter: RawClient, blocker: str, del_id: str) -> None:
    """``migrator`` sends migrate (id ``m``); while its query-migrate waits for a
    stopped QEMU, ``deleter`` deletes ``blocker`` (id ``del_id``: its reply is the
    caller's to read); then QEMU goes on."""
    assert qemu.proc is not None
    asked = d.log().count(QUERY_MIGRATE)
    qemu.proc.send_signal(signal.SIGSTOP)
    try:
        await migrator.send({"execute": "migrate", "arguments": {"uri": SINK}, "id": "m"})
        await wait_until(lambda: d.log().count(QUERY_MIGRATE) > asked,
                         "migrate asking QEMU whether it migrates")
        await deleter.send({"execute": "del-blocker", "arguments": {"id": blocker},
                            "id": del_id})
        d.wait_for_log(f"deleted blocker {blocker}")
    finally:
        qemu.proc.send_signal(signal.SIGCONT)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)")
async def test_migrate_is_judged_by_blockers_on_disk_not_by_a_deletion_that_fails(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Path,
) -> None:
    """A del-blocker runs while migrate waits for QEMU's query-migrate; its commit
    then fails.  Reported: the migration went to QEMU, past a blocker still there."""
    assert qemu.proc is not None
    d = await gated(start_daemon, qemu)
    async with d.client() as a, d.client() as b, qemu.monitor() as mon:
        await a.ok("add-blocker", {"reason": SEV, "id": "sev"})
        # Each fdatasync of the state from now on waits 2 s, then fails.
        async with injecting(d.proc.pid, "fsync,fdatasync", "error=EIO:delay_enter=2000000",
                             "the daemon"):
            await deleted_while_migrate_asks(d, qemu, a, b, "sev", "del")
            assert (await b.read_reply())["error"]["desc"].endswith(
                "disk I/O error; nothing was changed")
            assert await a.read_reply() == error(GENERIC, SEV, "m")
        assert (await mon.ok("query-migrate")).get("status") is None  # never started
        assert [x["id"] for x in await a.ok("query-blockers")] == ["sev"]
    assert_clean_log(d)


async def test_a_mode_qemu_does_not_have_is_refused_not_migrated_in_normal(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = await gated(start_daemon, qemu)
    async with d.client() as c:
        await c.ok("add-blocker", {"reason": VFIO, "id": "vfio", "modes": ["normal"]})
        await c.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
        # migblockd's cpr-reboot list is empty, but QEMU 7.2 would migrate in normal.
        reply = await c.execute("migrate", {"uri": SINK}, id=1)
        version = reply["error"]["desc"].split()[1]
        assert reply == error(GENERIC, f"QEMU {version} has no migration modes (QEMU 8.2 "
                              "added them) and would migrate in mode 'normal', not "
                              "'cpr-reboot'; set mode 'normal' with migrate-set-parameters "
                              "first", 1)
        async with qemu.monitor() as mon:
            assert (await mon.ok("query-migrate")).get("status") is None
        await c.ok("migrate-set-parameters", {"mode": "normal"})
        assert await c.execute("migrate", {"uri": SINK}, id=2) == error(GENERIC, VFIO, 2)
    # (The log is written by its own thread, a little after the replies.)
    d.wait_for_log("migration mode cpr-reboot (was normal)")
    d.wait_for_log("migration mode normal (was cpr-reboot)")
    d.wait_for_log(f"migrate to '{SINK}' refused: \"QEMU {version} has no migration modes")
    assert_clean_log(d)


async def test_qemus_own_blockers_are_listed_in_the_mode_qemu_migrates_in(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Reported: with migblockd's mode set to cpr-reboot in front of QEMU 7.2, QEMU's
    own blockers were listed as cpr-reboot ones, and `query-blockers` with mode
    `normal` left them out, though they are what refuses QEMU 7.2's only migration,
    a normal one (and `migrate` in mode normal was refused with their words)."""
    d = await gated(start_daemon, qemu)
    async with qemu.monitor() as mon, d.client() as c:
        await mon.add_blocker("vdi1")
        theirs = {"id": "qemu:1", "reason": mon.blocker_text("vdi1"), "modes": ["normal"],
                  "internal": False, "scope": "daemon", "source": "qemu"}
        await c.ok("add-blocker", {"reason": VFIO, "id": "cpr", "modes": ["cpr-reboot"]})
        await c.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
        listing = await c.ok("query-blockers")
        assert [b["id"] for b in listing] == ["cpr", "qemu:1"]
        assert listing[1] == theirs
        assert await c.ok("query-blockers", {"mode": "normal"}) == [theirs]
        assert [b["id"] for b in await c.ok("query-blockers", {"mode": "cpr-reboot"})] \
            == ["cpr"]
        # Back in mode normal, QEMU's blocker is what refuses, as the listing said.
        await c.ok("migrate-set-parameters", {"mode": "normal"})
        assert await c.ok("query-blockers", {"mode": "normal"}) == [theirs]
        reply = await c.execute("migrate", {"uri": SINK}, id=1)
        assert reply == error(GENERIC, mon.blocker_text("vdi1"), 1)
    assert_clean_log(d)


async def test_the_events_capability_outlives_a_restarted_qemu(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = await gated(start_daemon, qemu)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        qemu.restart()  # a new QEMU starts with events off
        d.wait_for_log(f"QEMU at {qemu.gate_socket}: set the events capability clients "
                       "asked for", timeout=30)

        async def events_on() -> bool:
            caps = await c.execute("query-migrate-capabilities", id="caps")
            return {"capability": "events", "state": True} in caps.get("return", [])

        await wait_until(events_on, "QEMU's events capability on again")
        await c.ok("migrate", {"uri": SINK})

        async def completed() -> bool:
            c.events.extend(await c.sync())
            return "completed" in heard(c)

        await wait_until(completed, "MIGRATION events from the restarted QEMU")
    assert_clean_log(d)


async def events_stored(start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
                        state: tuple[str, ...]) -> None:
    """A migblockd on ``state``, gating ``qemu``, whose client turned events on: stopped."""
    first = start_daemon("--qemu", str(qemu.gate_socket), *state)
    await connected(first)
    async with first.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
    assert first.stop() == 0


async def test_a_gate_met_during_an_incoming_migration_sets_the_events_capability(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    # Reported: "is migrating (status active)", and no events capability: QEMU takes
    # it then, and the VM, once here, migrated on with no MIGRATION event for anyone.
    source, target, incoming = source_and_target(qemu_factory)
    state = ("--state-dir", str(tmp_path / "state"))
    await events_stored(start_daemon, target, state)
    async with target.monitor() as dst, source.monitor() as src:
        await dst.ok("migrate-set-capabilities", EVENTS_OFF)  # as a QEMU starts
        await migrate_slowly(src, dst, incoming)
        d = start_daemon("--qemu", str(target.gate_socket), *state)
        d.wait_for_log(f"QEMU at {target.gate_socket} is receiving a migration (status "
                       "active)")
        d.wait_for_log(f"QEMU at {target.gate_socket}: set the events capability clients "
                       "asked for")
        caps = await dst.ok("query-migrate-capabilities")
        assert {"capability": "events", "state": True} in caps
        await src.ok("migrate_cancel")
    assert "is migrating" not in d.log()
    assert_clean_log(d)


async def test_a_gate_met_during_a_migration_sets_the_events_capability_once_it_ends(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """Reported: QEMU refuses capabilities while it migrates, and the events capability
    clients had asked for was never set afterwards: every later migration migblockd
    forwarded sent no MIGRATION event, while migblockd's state said events were on."""
    source, target, incoming = source_and_target(qemu_factory)
    state = ("--state-dir", str(tmp_path / "state"))
    await events_stored(start_daemon, source, state)
    async with target.monitor() as dst, source.monitor() as src:
        await src.ok("migrate-set-capabilities", EVENTS_OFF)  # as a QEMU starts
        await migrate_slowly(src, dst, incoming)
        d = start_daemon("--qemu", str(source.gate_socket), *state)
        d.wait_for_log(f"QEMU at {source.gate_socket} is migrating (status active); the "
                       "events capability clients asked for is owed")
        await src.ok("migrate_cancel")

        async def cancelled() -> bool:
            return bool((await src.ok("query-migrate")).get("status") == "cancelled")

        await wait_until(cancelled, "the first migration cancelled")
        async with d.client() as c:
            await c.ok("migrate-set-parameters", {"max-bandwidth": 1 << 30})
            await c.ok("migrate", {"uri": SINK})

            async def completed() -> bool:
                c.events.extend(await c.sync())
                return "completed" in heard(c)

            await wait_until(completed, "MIGRATION events of the migration migblockd forwarded")
        assert heard(c)[:1] == ["setup"]
        caps = await src.ok("query-migrate-capabilities")
        assert {"capability": "events", "state": True} in caps
    d.wait_for_log(f"QEMU at {source.gate_socket}: set the events capability clients "
                   "asked for")
    assert_clean_log(d)


async def test_an_events_capability_qemu_did_not_take_is_set_before_the_next_migrate(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Path,
) -> None:
    """Setting the events capability clients asked for can fail (QEMU silent, here:
    the relay keeps the command from it); it stays owed and is set before the next
    migrate migblockd forwards, which then sends its MIGRATION events."""
    state = ("--state-dir", str(tmp_path / "state"))
    await events_stored(start_daemon, qemu, state)
    async with qemu.monitor() as mon:
        await mon.ok("migrate-set-capabilities", EVENTS_OFF)  # as a QEMU starts
        with Relay(qemu.gate_socket, tmp_path / "relay.sock") as relay:
            relay.swallow = b'"execute":"migrate-set-capabilities"'
            d = start_daemon("--qemu", str(relay.path), "--qemu-timeout", "1", *state)
            d.wait_for_log(f"QEMU at {relay.path}: cannot set the events capability clients "
                           "asked for: ")
            d.wait_for_log("migblockd tries again before it forwards the next migrate")
            relay.swallow = None
            async with d.client() as c:
                await c.ok("query-migrate")  # QEMU answers again
                assert {"capability": "events", "state": False} in await mon.ok(
                    "query-migrate-capabilities")
                await c.ok("migrate-set-parameters", {"max-bandwidth": 1 << 30})
                await c.ok("migrate", {"uri": SINK})
                d.wait_for_log(f"QEMU at {relay.path}: set the events capability clients "
                               "asked for")

                async def completed() -> bool:
                    c.events.extend(await c.sync())
                    return "completed" in heard(c)

                await wait_until(completed, "MIGRATION events of the migration forwarded")
            assert heard(c)[:1] == ["setup"]
    assert d.log().count(": set the events capability clients asked for") == 1
    assert d.log().count("cannot set the events capability") == 1


async def test_a_postcopy_destination_takes_blockers_as_qemu_does(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    # Reported: past the switch-over the destination runs (or stays paused), no
    # longer in run state inmigrate, while query-migrate still shows the incoming
    # migration: add-blocker got 'disallowing migration blocker (migration/snapshot
    # in progress)' while QEMU took a vdi node's blocker.
    source, target, incoming = source_and_target(qemu_factory)
    image = tmp_path / "x.vdi"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", str(image), "1M"], check=True)
    postcopy = {"capabilities": [{"capability": "postcopy-ram", "state": True}]}
    d = gate(start_daemon, target)
    await connected(d)
    async with target.monitor() as dst, source.monitor() as src, d.client() as c:
        await dst.ok("migrate-set-capabilities", postcopy)
        await src.ok("migrate-set-capabilities", postcopy)
        await migrate_slowly(src, dst, incoming,
                             **{"max-postcopy-bandwidth": 100_000})

        async def status(wanted: str) -> bool:
            return bool((await dst.ok("query-migrate")).get("status") == wanted)

        await src.ok("migrate-start-postcopy")
        await wait_until(lambda: status("postcopy-active"), "postcopy on the target")
        assert (await dst.ok("query-status"))["status"] != "inmigrate"
        await dst.ok("blockdev-add", {"driver": "vdi", "node-name": "v",
                                      "file": {"driver": "file", "filename": str(image)}})
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        # And migrate is judged as QEMU judges it there: by the blockers.
        assert await c.execute("migrate", {"uri": SINK}, id="m") == error(GENERIC, SEV, "m")
        await src.ok("migrate_cancel")
    assert_clean_log(d)


async def test_what_the_gate_refuses_and_forwards_is_in_the_log(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    qemu = qemu_factory(memory="1G")
    d = await gated(start_daemon, qemu)
    async with d.client() as c:
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=1)
                == error(GENERIC, "Duplicate blocker ID 'sev'", 1))
        await c.ok("del-blocker", {"id": "sev"})
        await start_slow_migration(c)
        assert (await c.execute("migrate", {"uri": SINK}, id=2)
                == error(GENERIC, "There's a migration process in progress", 2))
        await c.ok("migrate_cancel")
    d.wait_for_log("refused blocker 'sev': \"Duplicate blocker ID 'sev'\"")
    d.wait_for_log(f"migrate to '{SINK}' refused: \"There's a migration process in progress\"")
    d.wait_for_log("migrate_cancel sent to QEMU")
    assert_clean_log(d)


async def test_a_migration_cut_off_by_qemus_death_is_in_the_log(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """No MIGRATION event can follow from a dead QEMU: the operator is told once."""
    qemu = qemu_factory(memory="1G")
    d = await gated(start_daemon, qemu)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
        d.wait_for_log("QEMU migration status: active")
        assert qemu.proc is not None
        pid = qemu.proc.pid
        qemu.kill()
        d.wait_for_log(f"QEMU at {qemu.gate_socket} went away during a migration (last status "
                       "active): its outcome is unknown")
        # Once its process has exited, its migration has ended with it.
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited")
        await c.ok("add-blocker", {"reason": SEV})  # as while QEMU is away
    assert d.log().count("went away during a migration") == 1
    assert_clean_log(d)


async def cancel_then_add(c: RawClient, mon: QemuMonitor) -> None:
    """Cancel QEMU's migration; once QEMU says it is cancelled, a blocker is added."""
    await c.ok("migrate_cancel")

    async def cancelled() -> bool:
        return bool((await mon.ok("query-migrate"))["status"] == "cancelled")

    await wait_until(cancelled, "the migration cancelled")
    await c.ok("add-blocker", {"reason": SEV, "id": "sev"})


async def migration_statuses(watcher: RawClient) -> list[str]:
    """The statuses of the MIGRATION events ``watcher`` hears, up to the last one
    (``completed``, ``failed`` or ``cancelled``)."""
    statuses: list[str] = []
    while not statuses or statuses[-1] not in ("completed", "failed", "cancelled"):
        statuses.append((await watcher.wait_event("MIGRATION"))["data"]["status"])
    return statuses


class Relay:
    """The wire between migblockd and a real QEMU's monitor, with a cut in it.

    Bytes pass both ways until :meth:`cut`, which drops every connection while
    QEMU goes on (as a broken socket would).  While :meth:`hold` is in force a
    new connection is accepted but not carried on to QEMU, so that its greeting
    waits: QEMU is there, and has not answered yet.  It runs in a thread of its
    own: the tests' helpers that read the daemon's log block their loop.
    """

    def __init__(self, target: Path, path: Path) -> None:
        self.target, self.path = target, path
        self.accepted = 0
        #: Once set, what QEMU sends after it was sent a ``migrate`` is kept from
        #: migblockd: its reply (and events) never arrive.
        self.mute_after_migrate = False
        #: What migblockd sends that contains these bytes is kept from QEMU.
        self.swallow: bytes | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop.set)
        self._thread.join(10)

    def hold(self) -> None:
        self._call(self._open.clear)

    def release(self) -> None:
        self._call(self._open.set)

    def cut(self) -> None:
        self._call(self._cut)

    def _call(self, what: Callable[[], object]) -> None:
        self._loop.call_soon_threadsafe(what)

    def _cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open, self._stop = asyncio.Event(), asyncio.Event()
        self._open.set()
        self._writers: list[asyncio.StreamWriter] = []
        server = await asyncio.start_unix_server(self._carry, str(self.path))
        self._ready.set()
        await self._stop.wait()
        self._cut()
        server.close()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        await self._open.wait()
        if writer.transport.is_closing():
            return
        qemu_reader, qemu_writer = await asyncio.open_unix_connection(str(self.target))
        self._writers.append(qemu_writer)

        muted = False

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       upstream: bool) -> None:
            nonlocal muted
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if not upstream and muted:
                        continue
                    if upstream and self.swallow is not None and self.swallow in data:
                        continue
                    dst.write(data)
                    await dst.drain()
                    if upstream and self.mute_after_migrate and b'"execute":"migrate",' in data:
                        muted = True
            dst.transport.abort()

        await asyncio.gather(pipe(reader, qemu_writer, True), pipe(qemu_reader, writer, False))


async def test_a_lost_link_to_a_migrating_qemu_refuses_blockers_until_qemu_answers(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """Reported: the connection to QEMU's monitor was lost while QEMU migrated (it
    migrates on: a monitor's client is not its migration), and until QEMU answered
    on the new one, ``add-blocker`` was acknowledged, the link having forgotten the
    migration: a blocker that stops nothing, while QEMU migrates."""
    qemu = qemu_factory(memory="1G")
    with Relay(qemu.gate_socket, tmp_path / "relay.sock") as relay:
        d = start_daemon("--qemu", str(relay.path))
        await connected(d)
        async with d.client() as c, qemu.monitor() as mon:
            await c.ok("migrate-set-capabilities", EVENTS_ON)
            await start_slow_migration(c)
            d.wait_for_log("QEMU migration status: active")
            relay.hold()
            relay.cut()
            d.wait_for_log(f"QEMU at {relay.path} went away during a migration (last status "
                           "active): its outcome is unknown; query-migrate says it once QEMU "
                           "is back, and until then (or until QEMU is found to have exited) "
                           "add-blocker is refused")
            await wait_until(lambda: relay.accepted == 2, "migblockd connecting again")
            assert (await mon.ok("query-migrate"))["status"] == "active"
            # QEMU is there (the connection is accepted) and has not greeted yet.
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=1)
                    == error(GENERIC, BUSY_SEV, 1))
            relay.release()
            await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                             "migblockd connected again")
            # QEMU answers, and it migrates still.
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=2)
                    == error(GENERIC, BUSY_SEV, 2))
            assert await c.ok("query-blockers") == []
            await cancel_then_add(c, mon)
    assert d.log().count("went away during a migration") == 1
    assert_clean_log(d)


async def test_a_link_made_again_is_not_enough_until_qemu_says_what_it_does(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """Reported (on the fix above): the cut-off ended once the new connection was up,
    before QEMU had answered a query-migrate on it.  When QEMU left that unanswered
    (busy, stopped; here the relay keeps it from QEMU), add-blocker's own query-migrate
    timed out and the blocker was added while QEMU migrated."""
    qemu = qemu_factory(memory="1G")
    with Relay(qemu.gate_socket, tmp_path / "relay.sock") as relay:
        d = start_daemon("--qemu", str(relay.path), "--qemu-timeout", "1")
        await connected(d)
        async with d.client() as c, qemu.monitor() as mon:
            await c.ok("migrate-set-capabilities", EVENTS_ON)
            await start_slow_migration(c)
            d.wait_for_log("QEMU migration status: active")
            relay.swallow = b'"execute":"query-migrate"'
            relay.cut()
            d.wait_for_log(f"QEMU at {relay.path} went away during a migration")
            await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                             "migblockd connected again")
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=1)
                    == error(GENERIC, BUSY_SEV, 1))
            assert (await mon.ok("query-migrate"))["status"] == "active"
            relay.swallow = None
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=2)
                    == error(GENERIC, BUSY_SEV, 2))
            await cancel_then_add(c, mon)
    assert_clean_log(d)


async def test_a_migrate_whose_reply_the_lost_link_never_brought_refuses_blockers(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """The same with the ``events`` capability off, the link lost after QEMU took a
    ``migrate`` and before its reply came: nothing said that it migrates, and the
    command's failure (reported before the link's loss) left nothing awaited."""
    qemu = qemu_factory(memory="1G")
    with Relay(qemu.gate_socket, tmp_path / "relay.sock") as relay:
        d = start_daemon("--qemu", str(relay.path))
        await connected(d)
        async with d.client() as c, qemu.monitor() as mon:
            await c.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
            relay.mute_after_migrate = True
            migrate = asyncio.ensure_future(c.execute("migrate", {"uri": SINK}, id=1))

            async def active() -> bool:
                return bool((await mon.ok("query-migrate")).get("status") == "active")

            await wait_until(active, "QEMU migrating")
            relay.mute_after_migrate = False
            relay.hold()
            relay.cut()
            assert await migrate == error(
                GENERIC, f"The connection to QEMU's monitor at '{relay.path}' was lost "
                "before QEMU replied to 'migrate'", 1)
            d.wait_for_log(f"QEMU at {relay.path} went away while it may have been migrating "
                           "(last status not seen yet; QEMU sends no MIGRATION events, so the "
                           "end of a migration goes unseen)")
            await wait_until(lambda: relay.accepted == 2, "migblockd connecting again")
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=2)
                    == error(GENERIC, BUSY_SEV, 2))
            relay.release()
            await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                             "migblockd connected again")
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=3)
                    == error(GENERIC, BUSY_SEV, 3))
            await cancel_then_add(c, mon)
    assert d.log().count("went away while it may have been migrating") == 1
    assert_clean_log(d)


async def test_a_migrate_qemu_refused_after_its_events_is_not_counted_as_ended(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
) -> None:
    """QEMU's migrate_init() reports setup before the transport is opened, so a migrate
    whose fd: name QEMU cannot find sends MIGRATION setup and failed, then an error.
    Reported: that refusal counted as refused, and as a migration that ended failed,
    with none started (started 0, ended 1).  A migration QEMU takes and ends before its
    reply still counts as ended, once it is taken."""
    endpoint = short_tmp / "metrics.sock"
    d = gate(start_daemon, qemu, "--metrics", str(endpoint))
    await connected(d)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        assert await c.execute("migrate", {"uri": "fd:nosuch"}, id="m") == error(
            GENERIC, "File descriptor named 'nosuch' has not been found", "m")
        assert await migration_statuses(c) == ["setup", "failed"]
        d.wait_for_log("the migration failed: File descriptor named 'nosuch' has not been found")
        metrics = scrape(endpoint)
        assert metrics.value("migblockd_migrations_refused_total", reason="qemu") == 1
        assert metrics.value("migblockd_migrations_started_total") == 0
        assert metrics.value("migblockd_migrations_ended_total", status="failed") == 0
        assert await c.ok("migrate", {"uri": SINK}) == {}
        assert await migration_statuses(c) == ["setup", "active", "completed"]
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_started_total") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="completed") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="failed") == 0
    assert_clean_log(d)


async def test_a_migrate_whose_qemu_died_before_its_reply_is_not_counted_as_ended(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
) -> None:
    """QEMU is killed while it runs a migrate, before its reply: the command fails, and
    is not counted as started (whether QEMU took it is not known).  Reported: QEMU's
    exit counted it as a migration that ended failed (started 0, ended 1)."""
    endpoint = short_tmp / "metrics.sock"
    d = gate(start_daemon, qemu, "--metrics", str(endpoint))
    await connected(d)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        assert qemu.proc is not None
        pid = qemu.proc.pid
        # QEMU's migrate creates its migration thread before it replies: held there.
        async with injecting(pid, "clone,clone3", "delay_enter=4000000", "QEMU"):
            migrate = asyncio.ensure_future(c.execute("migrate", {"uri": SINK}, id="m"))
            # QEMU says setup (migrate_init()) before the clone that is held: killed
            # only once migblockd has heard it, else the status QEMU's exit is said
            # with is "not seen yet", by a race with the kill.
            await wait_until(lambda: "QEMU migration status: setup" in d.log(),
                             "QEMU's setup event for the migrate")
            qemu.kill()
        assert await migrate == error(
            GENERIC, f"The connection to QEMU's monitor at '{qemu.gate_socket}' was lost "
            "before QEMU replied to 'migrate'", "m")
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration it "
                       "ran (last status setup) cannot complete; clients are sent "
                       "MIGRATION failed")
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_refused_total", reason="qemu-unavailable") == 1
    assert metrics.value("migblockd_migrations_started_total") == 0
    assert metrics.value("migblockd_migrations_ended_total", status="failed") == 0
    assert_clean_log(d)


async def test_a_client_awaiting_the_end_of_a_migration_whose_qemu_died_hears_failed(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    short_tmp: Path,
) -> None:
    """SIGKILLed mid-migration, QEMU sends no last MIGRATION event.  Reported: a client
    waiting for one (completed, failed, cancelled) waited forever.  Once the link finds
    nobody listening on QEMU's monitor, it hears ``failed``; and the metrics count it
    as ended (reported: started 1, ended 0, for ever after)."""
    qemu = qemu_factory(memory="1G")
    endpoint = short_tmp / "metrics.sock"
    d = gate(start_daemon, qemu, "--metrics", str(endpoint))
    await connected(d)
    async with d.client() as c, d.client() as watcher:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
        d.wait_for_log("QEMU migration status: active")
        assert qemu.proc is not None
        pid = qemu.proc.pid
        qemu.kill()
        assert await migration_statuses(watcher) == ["setup", "active", "failed"]
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration it "
                       "ran (last status active) cannot complete; clients are sent MIGRATION "
                       "failed")
        # Said once, however often the link finds QEMU still gone.
        await asyncio.sleep(1)
        assert await watcher.sync() == []
        assert (await c.sync())[-1]["data"] == {"status": "failed"}
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_started_total") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="failed") == 1
    assert d.log().count("has exited") == 1
    assert_clean_log(d)


async def test_a_qemu_without_events_that_quits_after_its_migration_is_not_said_to_fail(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
) -> None:
    """The events capability off (QEMU's default): a migration handed to QEMU completes,
    as QEMU's other monitor says, and QEMU then quits, as a migrated source does.
    Reported: migblockd logged that QEMU "went away during a migration" whose outcome
    "cannot complete", and counted it failed: nothing had told it that it ended."""
    endpoint = short_tmp / "metrics.sock"
    d = gate(start_daemon, qemu, "--metrics", str(endpoint))
    await connected(d)
    async with d.client() as c, qemu.monitor() as mon:
        assert await c.ok("migrate", {"uri": SINK}) == {}
        pid = await quit_once_migrated(qemu, mon)
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration "
                       "it may have run (last status not seen yet) may have ended before it "
                       "did; how, nobody said: QEMU sent no MIGRATION events (its events "
                       "capability off)")
        d.wait_for_log(f"QEMU at {qemu.gate_socket} went away while it may have been "
                       "migrating (last status not seen yet; QEMU sends no MIGRATION events, "
                       "so the end of a migration goes unseen): its outcome is unknown")
    assert "cannot complete" not in d.log()
    assert "went away during a migration" not in d.log()
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_started_total") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="failed") == 0
    assert_clean_log(d)


async def test_events_turned_off_through_migblockd_are_not_taken_for_on_at_qemus_exit(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    short_tmp: Path,
) -> None:
    """A migration with events on ends (cancelled); a client turns the events
    capability off through migblockd; the next migration completes, unseen, and QEMU
    then quits, as a migrated source does.  Reported: migblockd still took that QEMU
    for one that sends MIGRATION events (it had sent some on that connection), told its
    clients that the completed migration ended ``failed`` and counted it so."""
    qemu = qemu_factory(memory="1G")
    endpoint = short_tmp / "metrics.sock"
    d = gate(start_daemon, qemu, "--metrics", str(endpoint))
    await connected(d)
    async with d.client() as c, d.client() as watcher, qemu.monitor() as mon:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
        d.wait_for_log("QEMU migration status: active")
        await c.ok("migrate_cancel")
        assert await migration_statuses(watcher) == ["setup", "active", "cancelling",
                                                     "cancelled"]
        await c.ok("migrate-set-capabilities", EVENTS_OFF)
        await c.ok("migrate-set-parameters", {"max-bandwidth": 134217728})  # QEMU's default
        assert await c.ok("migrate", {"uri": SINK}) == {}
        pid = await quit_once_migrated(qemu, mon)
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration "
                       "it may have run (last status cancelled) may have ended before it "
                       "did; how, nobody said: QEMU sent no MIGRATION events (its events "
                       "capability off)")
        watcher.events.clear()
        watcher.events.extend(m for m in await watcher.sync() if "event" in m)
        assert heard(watcher) == []  # no "failed" for a migration that completed
    assert "cannot complete" not in d.log()
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_started_total") == 2
    assert metrics.value("migblockd_migrations_ended_total", status="cancelled") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="failed") == 0
    assert_clean_log(d)


async def test_events_turned_off_on_another_monitor_are_found_off_by_the_next_migrate(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
) -> None:
    """Clients asked for the events capability through migblockd; an operator turns it
    off on another of QEMU's monitors; a migration handed to QEMU completes, unseen, and
    QEMU then quits, as a migrated source does.  Reported: migblockd took that QEMU for
    one that sends MIGRATION events, told its clients that the completed migration ended
    ``failed`` and counted it so.  QEMU sends ``setup`` before it answers a migrate it
    took when the capability is on: none came."""
    endpoint = short_tmp / "metrics.sock"
    d = gate(start_daemon, qemu, "--metrics", str(endpoint))
    await connected(d)
    async with d.client() as c, d.client() as watcher, qemu.monitor() as mon:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await mon.ok("migrate-set-capabilities", EVENTS_OFF)
        assert await c.ok("migrate", {"uri": SINK}) == {}
        pid = await quit_once_migrated(qemu, mon)
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration "
                       "it may have run (last status not seen yet) may have ended before it "
                       "did; how, nobody said: QEMU sent no MIGRATION events (its events "
                       "capability off)")
        assert [m for m in await watcher.sync() if "event" in m] == []
    assert "cannot complete" not in d.log()
    # Said as soon as it was seen: that QEMU's migrations go unseen, until it is set again.
    assert d.log().index(f"QEMU at {qemu.gate_socket} took a migration without sending "
                         "MIGRATION events: its events capability was turned off on another "
                         "of its monitors; its end goes unseen; the events capability "
                         "clients asked for is owed") < d.log().index("has exited")
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_started_total") == 1
    assert metrics.value("migblockd_migrations_ended_total", status="failed") == 0
    assert_clean_log(d)


async def test_a_migrate_left_unanswered_that_qemu_refused_is_not_counted_as_ended(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
) -> None:
    """QEMU stopped as it was sent a ``migrate``, which timed out, then refused it
    (paused by the migration before).  Reported: the next ``query-migrate`` showed
    that earlier migration's end, ``completed``, which counted as this one's: one
    migration ended of none started through migblockd."""
    endpoint = short_tmp / "metrics.sock"
    async with stopping_relay(qemu, b'"execute":"migrate",') as path:
        d = start_daemon("--qemu", str(path), "--qemu-timeout", "1", "--metrics",
                         str(endpoint))
        await wait_until(lambda: "connected to QEMU 7." in d.log(), "migblockd connected")
        async with d.client() as c, qemu.monitor() as mon:
            await mon.ok("migrate", {"uri": SINK})  # not through migblockd: not counted

            async def completed() -> bool:
                return bool((await c.ok("query-migrate")).get("status") == "completed")

            await wait_until(completed, "QEMU's migration completed")
            reply = await c.execute("migrate", {"uri": SINK}, id=1)
            assert reply["error"]["desc"].endswith("did not answer 'migrate' within 1 s; it "
                                                   "may still run it")
            assert qemu.proc is not None
            qemu.proc.send_signal(signal.SIGCONT)  # QEMU refuses it: "Can't migrate..."
            assert (await c.ok("query-migrate"))["status"] == "completed"  # the earlier one
            assert (await mon.ok("query-status"))["status"] == "postmigrate"
    metrics = scrape(endpoint)
    assert metrics.value("migblockd_migrations_started_total") == 0
    for status in ("completed", "failed", "cancelled"):
        assert metrics.value("migblockd_migrations_ended_total", status=status) == 0
    assert_clean_log(d)


async def test_a_migration_met_by_a_restarted_migblockd_ends_failed_for_its_clients(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """migblockd is restarted (killed, here) while QEMU migrates with events on, and
    QEMU is then killed.  Reported: the new migblockd relayed that migration's events,
    but took the capability for one still to set (QEMU takes none while it migrates),
    and its clients never heard the migration's end."""
    qemu = qemu_factory(memory="1G")
    state = str(tmp_path / "state")
    d = gate(start_daemon, qemu, "--state-dir", state)
    await connected(d)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
    d.wait_for_log("QEMU migration status: active")
    d.proc.kill()
    d.proc.wait()
    again = gate(start_daemon, qemu, "--state-dir", state)
    again.wait_for_log(f"QEMU at {qemu.gate_socket} is migrating (status active)\n")
    assert "capability clients asked for is owed" not in again.log()
    async with again.client() as watcher:
        assert qemu.proc is not None
        pid = qemu.proc.pid
        qemu.kill()
        assert await migration_statuses(watcher) == ["failed"]
    again.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration "
                       "it ran (last status active) cannot complete; clients are sent "
                       "MIGRATION failed")
    assert_clean_log(again)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
async def test_a_migration_whose_qemu_was_restarted_at_once_ends_failed_for_its_clients(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    reaped: bool,
) -> None:
    """Reported: a new QEMU listening on the monitor before the link tried it (a fast
    restart) hid the old one's death; its migration never ended for the clients that
    waited for its last MIGRATION event.  The old QEMU's process has exited: its
    migration ends ``failed``, also while the old one's parent has yet to reap it (a
    zombie has exited all the same)."""
    qemu = qemu_factory(memory="1G")
    restarted = qemu_factory(name="restarted")
    d = await gated(start_daemon, qemu)
    async with d.client() as c, d.client() as watcher:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
        d.wait_for_log("QEMU migration status: active")
        assert qemu.proc is not None and restarted.proc is not None
        old, new = qemu.proc.pid, restarted.proc.pid
        # The new QEMU takes the monitor's path before the old one dies: no attempt of
        # the link's can find nobody listening there.
        restarted.gate_socket.rename(qemu.gate_socket)
        if reaped:
            qemu.kill()
        else:
            qemu.proc.send_signal(signal.SIGKILL)  # not waited for (reaped at teardown)
        assert await migration_statuses(watcher) == ["setup", "active", "failed"]
        d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {old}) has exited: the migration it "
                       "ran (last status active) cannot complete; clients are sent MIGRATION "
                       "failed")
        await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                         f"migblockd connected to the new QEMU (pid {new})")
        # The new QEMU's own state, not the old one's: it migrates nothing.
        assert await c.ok("query-migrate") == {}
        await c.ok("add-blocker", {"reason": SEV})
    assert "nobody listens" not in d.log()
    assert_clean_log(d)


async def test_a_lost_migration_ends_when_its_qemu_exits_whatever_holds_the_monitor_path(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """Reported: a migration the link lost ended only when the link found nobody
    listening on the monitor's path, or a new QEMU answering there.  A path held by
    something else (a listener that never greets, as a QEMU whose monitor has a
    client already) kept the dead QEMU's migration "running" for good: every
    add-blocker was refused, and its clients never heard its last event.  Its end is
    the process's exit, which the kernel tells (a pidfd) whatever owns the path.  (What
    holds the path takes no blocker until it says whether it migrates, or goes.)"""
    qemu = qemu_factory(memory="1G")
    d = await gated(start_daemon, qemu)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
        held = tmp_path / "held.sock"
        holder.bind(str(held))
        holder.listen()  # accepts into its backlog; greets nobody
        async with d.client() as c, d.client() as watcher:
            await c.ok("migrate-set-capabilities", EVENTS_ON)
            await start_slow_migration(c)
            d.wait_for_log("QEMU migration status: active")
            assert qemu.proc is not None
            pid = qemu.proc.pid
            held.rename(qemu.gate_socket)  # QEMU's monitor path, from now on the holder's
            qemu.kill()
            assert await migration_statuses(watcher) == ["setup", "active", "failed"]
            d.wait_for_log(f"QEMU at {qemu.gate_socket} (pid {pid}) has exited: the migration "
                           "it ran (last status active) cannot complete; clients are sent "
                           "MIGRATION failed")
            # What holds the path now is there and has said nothing (as a QEMU whose
            # monitor has a client already): it may be migrating, and takes no blocker.
            refused = await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=1)
            assert refused == error(GENERIC, BUSY_SEV, 1)
            holder.close()

            async def added() -> bool:
                return "return" in await c.execute("add-blocker", {"reason": SEV, "id": "sev"})

            await wait_until(added, "a blocker taken once nothing holds the path")
            assert [b["id"] for b in await c.ok("query-blockers")] == ["sev"]
    assert d.log().count("has exited") == 1
    assert "nobody listens" not in d.log()
    assert_clean_log(d)


async def test_nobody_listening_ends_no_lost_migration_while_its_process_runs(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """Reported: a migration the link lost was taken to have ended as soon as nobody
    listened on the monitor's path (removed, or no longer listened on), though the
    process behind it ran on: add-blocker was acknowledged while QEMU migrated.  Here
    the relay is QEMU's end of the monitor, and its process (this test's) runs on
    after it stops listening, as QEMU does; QEMU itself migrates on behind it."""
    qemu = qemu_factory(memory="1G")
    relay_path = tmp_path / "relay.sock"
    with contextlib.ExitStack() as relaying:
        relaying.enter_context(Relay(qemu.gate_socket, relay_path))
        d = start_daemon("--qemu", str(relay_path))
        await connected(d)
        async with d.client() as c, qemu.monitor() as mon:
            await c.ok("migrate-set-capabilities", EVENTS_ON)
            await start_slow_migration(c)
            d.wait_for_log("QEMU migration status: active")
            relaying.close()  # its connections cut, nobody listening on its path
            d.wait_for_log(f"QEMU at {relay_path} is not available")
            assert (await mon.ok("query-migrate"))["status"] == "active"
            assert (await c.execute("add-blocker", {"reason": SEV, "id": "sev"}, id=1)
                    == error(GENERIC, BUSY_SEV, 1))
            assert await c.ok("query-blockers") == []
            d.wait_for_log(f"nobody listens on QEMU's monitor at {relay_path}, but the QEMU "
                           f"process it lost (pid {os.getpid()}) is still running and may be "
                           "migrating: add-blocker stays refused until it answers there or "
                           "exits")
            with Relay(qemu.gate_socket, relay_path):
                await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                                 "migblockd connected again")
                await cancel_then_add(c, mon)
    assert d.log().count("nobody listens on QEMU's monitor") == 1
    assert "has exited" not in d.log()
    assert_clean_log(d)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("setpriv") is None,
                    reason="needs root, unshare and setpriv (a /proc that hides others)")
def test_a_zombie_qemu_of_another_user_counts_as_exited_where_proc_hides_it() -> None:
    """The units run the daemon with ProtectProc=invisible, and QEMU runs as another user
    as a rule: such a QEMU, killed and not yet reaped when the new one answers, has
    exited all the same, though its /proc entry is hidden and kill(pid, 0) is refused.
    Judged here as the unit judges it: as another uid, in a mount namespace whose /proc
    is mounted hidepid=invisible."""
    zombie = subprocess.Popen(["true"])  # root's; not waited for until the end
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, left a zombie
        judge = ("from migblockd.qemu.process import process_exited; "
                 f"print(process_exited({zombie.pid}))")
        hidden = subprocess.run(
            ["unshare", "--mount", "sh", "-c",
             'mount -t proc -o hidepid=invisible proc /proc || exit 77; exec "$@"', "sh",
             "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", judge],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        if hidden.returncode == 77:
            pytest.skip(f"cannot mount a /proc of its own here: {hidden.stderr.strip()}")
        assert (hidden.returncode, hidden.stdout) == (0, "True\n"), hidden.stderr
    finally:
        zombie.wait()


async def test_a_migration_cancelled_by_qemus_quit_ends_cancelled_for_its_clients(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """QEMU's ``quit`` cancels its migration (``cancelling``) and exits before it can
    say ``cancelled``.  Reported: its clients heard ``failed`` after ``cancelling``, a
    step QEMU never takes (a cancelling migration always ends ``cancelled``)."""
    qemu = qemu_factory(memory="1G")
    d = await gated(start_daemon, qemu)
    async with d.client() as c, d.client() as watcher, qemu.monitor() as mon:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
        d.wait_for_log("QEMU migration status: active")
        await mon.send({"execute": "quit"})
        assert qemu.proc is not None
        qemu.proc.wait(timeout=30)
        assert await migration_statuses(watcher) == ["setup", "active", "cancelling", "cancelled"]
        d.wait_for_log("the migration it ran (last status cancelling) cannot complete; "
                       "clients are sent MIGRATION cancelled")
    assert_clean_log(d)


async def test_a_qemu_that_quits_is_not_said_to_run_on_while_it_exits(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """QEMU's ``quit`` closes and removes its monitor's socket, then exits once it has
    let go of its memory.  Reported: the link, reconnecting at once, found nobody
    listening while the process was still there, and the log warned that QEMU "is
    still running and may be migrating" a few milliseconds before it said that QEMU
    had exited.  Here QEMU's exit is held back half a second (strace), as a big
    guest's would be."""
    qemu = qemu_factory(memory="1G")
    d = await gated(start_daemon, qemu)
    async with d.client() as c, d.client() as watcher, qemu.monitor() as mon:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        await start_slow_migration(c)
        d.wait_for_log("QEMU migration status: active")
        assert qemu.proc is not None
        async with injecting(qemu.proc.pid, "exit_group", "delay_enter=500000", "QEMU"):
            await mon.send({"execute": "quit"})
            await asyncio.to_thread(qemu.proc.wait, 30)
        assert await migration_statuses(watcher) == ["setup", "active", "cancelling", "cancelled"]
        d.wait_for_log("the migration it ran (last status cancelling) cannot complete; "
                       "clients are sent MIGRATION cancelled")
    await asyncio.sleep(EXIT_GRACE)  # what it would have said is past its grace
    assert "nobody listens on QEMU's monitor" not in d.log(), d.log()[-3000:]
    assert_clean_log(d)


async def test_a_command_sent_as_qemu_connects_waits_for_the_events_capability(
    qemu_factory: Callable[..., Qemu],
) -> None:
    """Reported: a ``migrate`` forwarded at once after migblockd reconnected reached
    QEMU before the ``events`` capability clients had asked for was set again (1 run in
    8 of a client retrying it across restarts); QEMU refuses capabilities while it
    migrates, so that migration sent no MIGRATION event.  Here the bridge is driven by
    hand: the command is forwarded as soon as the link is up."""
    qemu = qemu_factory(memory="1G")
    registry = Registry(CONTRACT.enums["MigMode"])
    registry.set_events(True)
    bridge = Bridge(qemu.gate_socket, (), CONTRACT, registry, timeout=30)
    forwarded: list[asyncio.Task[object]] = []
    learn = bridge.link._on_state  # the bridge's: it starts learning what QEMU does
    assert learn is not None

    def on_state(state: LinkState) -> None:
        learn(state)
        if state == "connected" and not forwarded:
            forwarded.append(asyncio.ensure_future(bridge.forward(
                Call("migrate", {"uri": SINK}))))

    bridge.link._on_state = on_state
    bridge.link.start()
    try:
        await wait_until(lambda: forwarded and forwarded[0].done(), "migrate answered")
        assert forwarded[0].result() == {}
        async with qemu.monitor() as mon:
            capabilities = await mon.ok("query-migrate-capabilities")
            assert {"capability": "events", "state": True} in capabilities
            await mon.ok("migrate_cancel")
    finally:
        await bridge.close()


async def test_a_qemu_that_exits_without_migrating_sends_no_migration_event(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    d = await gated(start_daemon, qemu)
    async with d.client() as c:
        await c.ok("migrate-set-capabilities", EVENTS_ON)
        qemu.kill()
        d.wait_for_log(f"lost the connection to QEMU at {qemu.gate_socket}")
        d.wait_for_log("is not available: Connection refused")
        assert await c.sync() == []
    assert "has exited" not in d.log()
    assert_clean_log(d)


async def test_stopping_migblockd_after_a_migration_warns_of_nothing(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """QEMU's events off (its default): the end is seen only by asking.  Closing the
    link at migblockd's own stop is not QEMU going away."""
    d = await gated(start_daemon, qemu)
    async with d.client() as c:
        await c.ok("migrate", {"uri": SINK})
    # Asked on QEMU's other monitor: migblockd has not seen the end.
    async with qemu.monitor() as mon:

        async def completed() -> bool:
            return bool((await mon.ok("query-migrate")).get("status") == "completed")

        await wait_until(completed, "the migration completed")
    assert d.stop() == 0
    assert "went away" not in d.log()
    assert_clean_log(d)


async def test_events_have_their_members_in_qemus_order(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Compared with what a real QEMU writes on its own monitor, member by member."""
    d = await gated(start_daemon, qemu)
    async with qemu.monitor() as mon, d.client() as c:
        await mon.enable_migration_events()
        await c.ok("add-blocker", {"reason": SEV, "id": "sev"})
        await c.ok("del-blocker", {"id": "sev"})
        await c.ok("migrate", {"uri": SINK})

        async def seen() -> bool:
            mon.events.extend(m for m in await mon.sync() if "event" in m)
            c.events.extend(m for m in await c.sync() if "event" in m)
            return any(e["event"] == "MIGRATION" for e in mon.events) and any(
                e["event"] == "MIGRATION" for e in c.events)

        await wait_until(seen, "MIGRATION events on both monitors")
    qemus = next(e for e in mon.events if e["event"] == "MIGRATION")
    assert list(qemus) == ["timestamp", "event", "data"]
    for event in c.events:  # relayed from QEMU, or migblockd's own
        assert list(event) == list(qemus), event
    assert {e["event"] for e in c.events} >= {"BLOCKER_ADDED", "BLOCKER_DELETED", "MIGRATION"}


BUSY_SEV = f"disallowing migration blocker (migration/snapshot in progress) for: {SEV}"


async def refused_while_stopped(qemu: Qemu, c: RawClient, *, canceller: RawClient) -> None:
    """With a migration running, QEMU stopped: ``c``'s add-blocker is refused with
    QEMU's busy text.  Then ``canceller`` cancels the migration, and once it has
    ended a blocker is taken."""
    assert qemu.proc is not None
    qemu.proc.send_signal(signal.SIGSTOP)
    try:
        reply = await c.execute("add-blocker", {"reason": SEV, "id": "late"}, id=1)
    finally:
        qemu.proc.send_signal(signal.SIGCONT)
    assert reply == error(GENERIC, BUSY_SEV, 1)
    assert await c.ok("query-blockers") == []
    await canceller.ok("migrate_cancel")

    async def ended() -> bool:
        return bool((await canceller.ok("query-migrate")).get("status") == "cancelled")

    await wait_until(ended, "the migration cancelled")
    assert (await c.ok("add-blocker", {"reason": SEV, "id": "now"}))["id"] == "now"


async def test_a_silent_qemu_last_seen_migrating_takes_no_blocker(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """QEMU stops answering (stopped, or busy with a long command) while it migrates.
    Reported: add-blocker's question timed out, the blocker was added as while QEMU
    is away, and the migration went on once QEMU answered again."""
    qemu = qemu_factory(memory="1G")
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "1")
    await connected(d)
    async with d.client() as c, qemu.monitor() as mon:
        await start_slow_migration(mon)  # through QEMU's other monitor
        assert (await c.ok("query-migrate"))["status"] in {"setup", "active"}
        await refused_while_stopped(qemu, c, canceller=mon)
    assert_clean_log(d)


async def test_a_silent_qemu_migrating_unbeknown_to_migblockd_takes_no_blocker(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """Found by review: a migration started on QEMU's other monitor (the events
    capability off: nothing told migblockd), then QEMU stopped answering.  The
    status migblockd last saw was from before it ("none"), so add-blocker's
    timed-out question took the blocker, and the migration completed past it."""
    qemu = qemu_factory(memory="1G")
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "1")
    await connected(d)
    async with d.client() as c, qemu.monitor() as mon:
        assert (await c.ok("query-migrate")).get("status") is None  # seen: none
        await start_slow_migration(mon)
        qemu.proc.send_signal(signal.SIGSTOP)
        try:
            added = await c.execute("add-blocker", {"reason": SEV, "id": "late"}, id=1)
            listed = await c.execute("query-blockers", id=2)
            deleted = await c.execute("del-blocker", {"id": "qemu:1"}, id=3)
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        silent = (f"QEMU's monitor at '{qemu.gate_socket}' did not answer 'query-migrate' "
                  "within 1 s; it may still run it")
        assert added == error(GENERIC, "the blocker was not added: QEMU did not answer "
                              f"migblockd's check of whether it migrates ({silent})", 1)
        # Not "[]": QEMU's own blockers are there, unlisted.
        assert listed == error(GENERIC, "QEMU's own blockers cannot be listed: QEMU did "
                               f"not answer migblockd's query-migrate ({silent})", 2)
        assert deleted == error(GENERIC, "whether QEMU has a blocker 'qemu:1' cannot be "
                                f"told: QEMU did not answer migblockd's query-migrate "
                                f"({silent})", 3)
        # Answering again, QEMU says it migrates: from then on, QEMU's own refusal.
        assert (await c.ok("query-migrate"))["status"] in {"setup", "active"}
        await refused_while_stopped(qemu, c, canceller=mon)
    d.wait_for_log("refused blocker 'late': \"the blocker was not added: QEMU did not answer")
    assert_clean_log(d)


async def test_a_migrate_whose_check_loses_qemu_says_it_was_not_sent(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """Found by review: QEMU killed while migrate waited for its check's answer: the
    client heard of a query-migrate it never sent, and not whether its migrate went."""
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "0")
    await connected(d)
    async with d.client() as c:
        qemu.proc.send_signal(signal.SIGSTOP)
        await c.send({"execute": "migrate", "arguments": {"uri": SINK}, "id": "m"})
        d.wait_for_log("<- b'{\"execute\": \"migrate\"")
        qemu.proc.kill()
        reply = await c.read_reply()
    assert reply == error(GENERIC, "migrate was not sent: the connection to QEMU was lost "
                          "during migblockd's check of whether it may migrate (The connection "
                          f"to QEMU's monitor at '{qemu.gate_socket}' was lost before QEMU "
                          "replied to 'query-migrate')", "m")
    assert d.stop() == 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)")
async def test_a_migrate_qemu_has_not_answered_yet_takes_no_blocker(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """QEMU takes longer than qemu-timeout over a migrate migblockd handed it (the
    events capability off: no MIGRATION event says it started).  Reported: a
    blocker added meanwhile was accepted, and the migration ran past it."""
    assert qemu.proc is not None
    pid = qemu.proc.pid
    d = gate(start_daemon, qemu, "--qemu-timeout", "1")
    await connected(d)
    async with d.client() as a, d.client() as b:
        # QEMU's migrate creates its migration thread (and spawns the exec: command)
        # before it replies: each clone waits 4 s.
        async with injecting(pid, "clone,clone3", "delay_enter=4000000",
                             "QEMU"):
            reply = await a.execute("migrate", {"uri": SINK}, id="m")
            assert reply["error"]["desc"].endswith("did not answer 'migrate' within 1 s; "
                                                   "it may still run it"), reply
            reply = await b.execute("add-blocker", {"reason": SEV, "id": "late"}, id=1)
            assert reply == error(GENERIC, BUSY_SEV, 1)
        # Not "failed": the operator is told that its outcome is QEMU's to say.
        d.wait_for_log(f"migrate to '{SINK}' handed to QEMU, with no answer (\"QEMU's monitor "
                       f"at '{qemu.gate_socket}' did not answer 'migrate' within 1 s; it may "
                       "still run it\"); whether it started, query-migrate says")
        assert "failed in QEMU" not in d.log()

        # Once QEMU answers a later command, it has run the migrate: its status tells.
        async def ended() -> bool:
            return bool((await b.ok("query-migrate")).get("status") == "completed")

        await wait_until(ended, "QEMU's migration completed")
        assert (await b.ok("add-blocker", {"reason": SEV, "id": "now"}))["id"] == "now"
    assert_clean_log(d)


async def test_a_silent_qemu_migrating_as_migblockd_asked_takes_no_blocker(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """The migrate migblockd handed over was answered, the events capability is off
    (no MIGRATION event says it runs), then QEMU stops answering.  Reported: the
    status migblockd last saw was the one from before the migrate, so add-blocker's
    timed-out question added the blocker, and the migration went on past it."""
    qemu = qemu_factory(memory="1G")
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "1")
    await connected(d)
    async with d.client() as c:
        await c.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
        assert await c.ok("migrate", {"uri": SINK}) == {}
        await refused_while_stopped(qemu, c, canceller=c)
    assert_clean_log(d)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)")
async def test_a_mode_set_while_migrate_waits_for_a_commit_is_judged_too(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """migrate judges the mode, then waits for another client's commit; meanwhile a
    third client sets a mode QEMU 7.2 does not have.  Reported: the migration went to
    QEMU (which migrates in normal) past the normal blocker, judged by the new mode's
    empty list."""
    assert qemu.proc is not None
    d = await gated(start_daemon, qemu)
    async with d.client() as a, d.client() as b, d.client() as c, qemu.monitor() as mon:
        await a.ok("add-blocker", {"reason": VFIO, "id": "vfio", "modes": ["normal"]})
        await b.ok("add-blocker", {"reason": MDEV, "id": "mdev", "modes": ["cpr-exec"]})
        # Each fdatasync of the state from now on waits 2 s: commits are slow.
        async with injecting(d.proc.pid, "fsync,fdatasync", "delay_enter=2000000",
                             "the daemon"):
            # A change whose (slow) commit migrate will wait for.
            await deleted_while_migrate_asks(d, qemu, a, b, "mdev", "b")
            # QEMU's run state asked (a blocker is there) and its mode judged: the
            # migrate now waits for b's commit.
            d.wait_for_log('"status": "prelaunch"')
            await c.send({"execute": "migrate-set-parameters", "id": "c",
                          "arguments": {"mode": "cpr-reboot"}})
            assert await b.read_reply() == {"return": {}, "id": "b"}
            assert await c.read_reply() == {"return": {}, "id": "c"}
            reply = await a.read_reply()
        assert "error" in reply, reply
        assert reply["error"]["desc"].endswith(
            "would migrate in mode 'normal', not 'cpr-reboot'; set mode 'normal' with "
            "migrate-set-parameters first"), reply
        assert (await mon.ok("query-migrate")).get("status") is None  # never started
    assert_clean_log(d)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)")
async def test_a_migrate_answered_late_then_a_silent_qemu_takes_no_blocker(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """QEMU answers a migrate later than qemu-timeout (the events capability off), then
    another command, which says it has run the migrate; then it stops answering.
    Reported: the status migblockd last saw was the one from before the migrate, so
    add-blocker's timed-out question added the blocker, and the migration went on
    past it once QEMU answered again."""
    qemu = qemu_factory(memory="1G")
    assert qemu.proc is not None
    pid = qemu.proc.pid
    d = gate(start_daemon, qemu, "--qemu-timeout", "1")
    await connected(d)
    async with d.client() as a, d.client() as b:
        await a.ok("migrate-set-parameters", {"max-bandwidth": 100_000})
        # QEMU's migrate creates its migration thread before it replies: the clone waits.
        async with injecting(pid, "clone,clone3", "delay_enter=2000000",
                             "QEMU"):
            reply = await a.execute("migrate", {"uri": SINK}, id="m")
            assert reply["error"]["desc"].endswith("did not answer 'migrate' within 1 s; "
                                                   "it may still run it"), reply
        # Answered after the migrate: QEMU has run it (and says nothing of its status).
        while "error" in await b.execute("query-migrate-capabilities"):
            pass  # (timed out while QEMU still waits to create its thread)
        await refused_while_stopped(qemu, b, canceller=a)
    assert_clean_log(d)


async def test_a_stop_while_waiting_for_qemus_first_answer_serves_nobody(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    # Reported: the stop waited out the 5 s for QEMU's first answer, then said
    # "ready on", told systemd READY=1, accepted, and carried out a SIGHUP that
    # had come while starting, all during the stop.
    assert qemu.proc is not None
    qemu.proc.send_signal(signal.SIGSTOP)  # there, but answers nothing
    try:
        d = start_daemon("--qemu", str(qemu.gate_socket), "--log-level", "info", wait=False)
        d.wait_for_log("listening on")
        d.signal(signal.SIGHUP)
        d.signal(signal.SIGTERM)
        assert d.wait_exit(30) == 0
    finally:
        qemu.proc.send_signal(signal.SIGCONT)
    log = d.log()
    assert "received SIGTERM while starting: stopping before serving" in log
    for never in ("ready on", "serving anyway", "reload"):
        assert never not in log.replace("received SIGHUP while stopping: ignored", ""), log
    assert not d.socket.exists()
    assert_clean_log(d)


async def test_a_restarted_gate_takes_no_blocker_from_a_silent_qemu_it_never_heard(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
    tmp_path: Path,
) -> None:
    """migblockd is killed while QEMU migrates, and QEMU stops answering before the new
    migblockd starts.  Reported: after its 5 s wait at start the new migblockd took an
    add-blocker (as while QEMU is away), and the migration went on past it."""
    qemu = qemu_factory(memory="1G")
    assert qemu.proc is not None
    state = str(tmp_path / "state")
    d = gate(start_daemon, qemu, "--state-dir", state)
    await connected(d)
    async with d.client() as c:
        await start_slow_migration(c)
    d.proc.kill()
    d.proc.wait()
    qemu.proc.send_signal(signal.SIGSTOP)
    try:
        again = gate(start_daemon, qemu, "--state-dir", state)
        again.wait_for_log(f"QEMU at {qemu.gate_socket} is there but has not answered within "
                           "5 s of start; serving anyway (until it says whether it migrates, "
                           "add-blocker is refused as while it migrates)")
        async with again.client() as c:
            reply = await c.execute("add-blocker", {"reason": SEV, "id": "late"}, id=1)
    finally:
        qemu.proc.send_signal(signal.SIGCONT)
    assert reply == error(GENERIC, BUSY_SEV, 1)
    await connected(again)
    async with again.client() as c:
        assert await c.ok("query-blockers") == []
        assert (await c.ok("query-migrate"))["status"] == "active"
        await c.ok("migrate_cancel")

        async def ended() -> bool:
            return bool((await c.ok("query-migrate")).get("status") == "cancelled")

        await wait_until(ended, "the migration cancelled")
        assert (await c.ok("add-blocker", {"reason": SEV, "id": "now"}))["id"] == "now"
    again.wait_for_log(f"QEMU at {qemu.gate_socket} is migrating (status active)")
    assert_clean_log(again)


async def test_stopping_while_a_silent_qemu_holds_a_command_answers_its_client(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu,
) -> None:
    """SIGTERM while a migrate waits for a stopped QEMU, with qemu-timeout 0 (wait
    forever).  Reported: the drain waited its 30 s for the reply, then dropped the
    client, which heard nothing."""
    assert qemu.proc is not None
    d = gate(start_daemon, qemu, "--qemu-timeout", "0")
    await connected(d)
    async with d.client() as c:
        asked = d.log().count(QUERY_MIGRATE)
        qemu.proc.send_signal(signal.SIGSTOP)
        try:
            await c.send({"execute": "migrate", "arguments": {"uri": SINK}, "id": "m"})
            await wait_until(lambda: d.log().count(QUERY_MIGRATE) > asked,
                             "migrate asking QEMU whether it migrates")
            d.proc.send_signal(signal.SIGTERM)
            # (Longer than the client's own wait for a line: the drain's.)
            reply = json.loads(await asyncio.wait_for(c.reader.readline(), 60))
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
    assert reply == error(GENERIC, "migblockd stopped before QEMU answered; the command "
                          "may or may not have taken effect", "m")
    assert d.wait_exit(60) == 0
    d.wait_for_log("stopping: giving up on 1 command(s) still waiting for QEMU")
    assert "dropped" not in d.log()
    assert_clean_log(d)


async def test_stopping_while_a_silent_qemu_holds_the_blocker_commands_changes_nothing(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, tmp_path: Path,
) -> None:
    """As above, with an add-blocker, a query-blockers and a del-blocker of QEMU's own
    waiting for QEMU's query-migrate.  Reported: 25 s into the drain the add-blocker,
    given up on, added its blocker (as while QEMU is away) and was answered, its
    BLOCKER_ADDED sent and the blocker committed: the next start restored it."""
    assert qemu.proc is not None
    state = str(tmp_path / "state")
    d = gate(start_daemon, qemu, "--qemu-timeout", "0", "--state-dir", state)
    await connected(d)
    given_up = error(GENERIC, "migblockd stopped before QEMU answered; the command may or "
                     "may not have taken effect", "x")
    async with d.clients(3) as clients:
        asked = d.log().count(QUERY_MIGRATE)
        qemu.proc.send_signal(signal.SIGSTOP)
        try:
            requests: list[dict[str, Any]] = [
                {"execute": "add-blocker", "arguments": {"id": "w", "reason": SEV}},
                {"execute": "query-blockers"},
                {"execute": "del-blocker", "arguments": {"id": "qemu:1"}}]
            for c, request in zip(clients, requests, strict=True):
                await c.send({**request, "id": "x"})
            await wait_until(lambda: d.log().count(QUERY_MIGRATE) >= asked + 3,
                             "each command asking QEMU's query-migrate")
            d.proc.send_signal(signal.SIGTERM)
            # Each hears its error and nothing else (no BLOCKER_ADDED), then the close.
            heard = [await c.read_to_eof(60) for c in clients]
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
    assert [[json.loads(line) for line in got.splitlines()] for got in heard] == [
        [given_up]] * 3
    assert d.wait_exit(60) == 0
    d.wait_for_log("stopping: giving up on 3 command(s) still waiting for QEMU")
    assert "added blocker" not in d.log()
    assert_clean_log(d)
    again = gate(start_daemon, qemu, "--state-dir", state)
    again.wait_for_log("restored 0 blockers from ")
    await connected(again)
    async with again.client() as c:
        assert await c.ok("query-blockers") == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt install strace)")
async def test_a_migrate_checked_with_one_qemu_is_not_sent_to_the_next(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """migrate's checks are answered by one QEMU; while it waits for another client's
    commit, that QEMU is restarted on its monitor.  Reported: the migrate went to the
    new QEMU, judged by the old one's answers (with QEMU 8.2, by its mode)."""
    qemu = qemu_factory()
    restarted = qemu_factory(name="restarted")
    d = await gated(start_daemon, qemu)
    async with d.client() as a, d.client() as b:
        await a.ok("add-blocker", {"reason": SEV, "id": "sev"})
        # Each fdatasync of the state from now on waits 5 s: commits are slow.
        async with injecting(d.proc.pid, "fsync,fdatasync", "delay_enter=5000000",
                             "the daemon"):
            answers = d.log().count(f"QEMU {qemu.gate_socket} <- ")
            # b's del-blocker runs while migrate waits for query-migrate's answer.
            await deleted_while_migrate_asks(d, qemu, a, b, "sev", "del")
            await wait_until(lambda: d.log().count(f"QEMU {qemu.gate_socket} <- ") > answers,
                             "the first QEMU answering migrate's query-migrate")
            # migrate now waits for b's commit: QEMU is restarted meanwhile.
            restarted.gate_socket.rename(qemu.gate_socket)
            qemu.kill()
            await wait_until(lambda: d.log().count("connected to QEMU 7.") == 2,
                             "migblockd connected to the new QEMU")
            assert await b.read_reply() == {"return": {}, "id": "del"}
            reply = await a.read_reply()
        assert reply == error(GENERIC, f"QEMU at '{qemu.gate_socket}' was restarted while "
                              "migblockd checked the command: nothing was sent to the new "
                              "QEMU; try again", "m"), reply
        async with restarted.monitor() as mon:
            assert (await mon.ok("query-migrate")).get("status") is None  # never started
    # (The log is written on a thread of its own: the reply's trace comes last.)
    d.wait_for_log('"id": "m", "error"')
    said = [line for line in d.log().splitlines()
            if "was restarted while migblockd checked" in line and " DEBUG: " not in line]
    assert len(said) == 1 and "migrate to 'exec:cat > /dev/null' refused: " in said[0], said
    assert_clean_log(d)


@contextlib.asynccontextmanager
async def first_call_answered(qemu: Qemu) -> AsyncIterator[tuple[Bridge, Pin]]:
    """A bridge driven by hand, connected to ``qemu``, and the pin of a command whose
    first call (``query-migrate``) that QEMU has answered."""
    bridge = Bridge(qemu.gate_socket, (), CONTRACT, Registry(CONTRACT.enums["MigMode"]),
                    timeout=30)
    bridge.link.start()
    try:
        await wait_until(lambda: bridge.facts.connected, "the bridge connected")
        pin = Pin()
        assert await bridge.forward(Call("query-migrate", {}, pin)) == {}
        yield bridge, pin
    finally:
        await bridge.close()


async def test_the_bridge_sends_no_call_of_a_command_to_a_qemu_restarted_since_its_first(
    qemu_factory: Callable[..., Qemu],
) -> None:
    """The bridge driven by hand: a command's first call answered by one QEMU, the
    next one (with the same pin) after a restart on the same monitor path."""
    qemu = qemu_factory()
    restarted = qemu_factory(name="restarted")
    async with first_call_answered(qemu) as (bridge, pin):
        assert restarted.proc is not None
        new = restarted.proc.pid
        restarted.gate_socket.rename(qemu.gate_socket)
        qemu.kill()

        def reconnected() -> bool:
            info = bridge.link.info
            return info is not None and info.pid == new

        await wait_until(reconnected, "the bridge connected to the new QEMU")
        with pytest.raises(QemuRestarted, match="nothing was sent to the new QEMU"):
            await bridge.forward(Call("migrate", {"uri": SINK}, pin))
        async with restarted.monitor() as mon:
            assert (await mon.ok("query-migrate")).get("status") is None  # never started
        # Another command starts afresh with the QEMU that is there now.
        assert await bridge.forward(Call("query-migrate", {}, Pin())) == {}


def cut(path: Path) -> None:
    """Shut down this process's connections to the socket at ``path`` (the link's): the
    connection is lost, the process at the other end stays."""
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor)
        with sock:
            if sock.family == socket.AF_UNIX and sock.getpeername() == str(path):
                sock.shutdown(socket.SHUT_RDWR)


async def test_a_command_whose_connection_was_made_again_blames_no_restart(
    qemu: Qemu,
) -> None:
    """The link lost its connection between two calls of a command and made it again to
    the same QEMU: the command fails, without saying that QEMU was restarted."""
    async with first_call_answered(qemu) as (bridge, pin):
        before = bridge.link.info
        cut(qemu.gate_socket)
        # The link tries again at once after a loss, so the spell without a connection
        # can be shorter than a poll: wait for the next connection's own info instead.
        await wait_until(lambda: bridge.facts.connected and bridge.link.info is not before,
                         "the bridge lost its connection and connected again")
        info = bridge.link.info
        assert qemu.proc is not None and info is not None and info.pid == qemu.proc.pid
        with pytest.raises(QemuRestarted) as refused:
            await bridge.forward(Call("query-status", {}, pin))
        assert str(refused.value) == (
            f"The connection to QEMU at '{qemu.gate_socket}' was lost and made again while "
            "migblockd checked the command: nothing more of it was sent; try again")


async def test_a_qemu_met_again_takes_no_blocker_on_what_the_one_before_said(
    start_daemon: Callable[..., DaemonProcess], qemu_factory: Callable[..., Qemu],
) -> None:
    """Found by review: migblockd had heard from a QEMU that it did not migrate; that
    QEMU died, and another one, migrating, took the gate's path and did not greet
    (stopped).  migblockd took an add-blocker on the first one's word, the second one
    migrated on with the blocker listed, and query-blockers said QEMU had no blocker
    of its own while it could not tell."""
    first, second = qemu_factory(), qemu_factory(memory="1G")
    assert second.proc is not None
    d = gate(start_daemon, first)
    await connected(d)
    async with d.client() as c:
        assert (await c.ok("query-migrate")).get("status") is None  # heard: none
        async with second.monitor() as mon:
            await start_slow_migration(mon)
        second.proc.send_signal(signal.SIGSTOP)
        try:
            # The path first, then the kill: a connection made again at once to the
            # dying QEMU's socket (its backlog, then reset) would be taken for one to
            # the second QEMU, which then is not tried before the add.
            os.rename(second.gate_socket, first.gate_socket)
            first.kill()

            async def met() -> bool:
                reply = await c.execute("query-migrate")
                return "has not greeted yet" in reply.get("error", {}).get("desc", "")

            await wait_until(met, "migblockd connected to the stopped QEMU")
            added = await c.execute("add-blocker", {"reason": SEV, "id": "late"}, id=1)
            listed = await c.execute("query-blockers", id=2)
            deleted = await c.execute("del-blocker", {"id": "qemu:1"}, id=3)
        finally:
            second.proc.send_signal(signal.SIGCONT)
        assert added == error(GENERIC, BUSY_SEV, 1)
        unmet = (f"Not connected to QEMU's monitor at '{first.gate_socket}': QEMU accepted "
                 "the connection but has not greeted yet")
        # (After 5 s of it, a busy machine's, the reason adds a question: startswith.)
        assert listed["error"]["desc"].startswith(
            f"QEMU's own blockers cannot be listed: {unmet}"), listed
        assert deleted["error"]["desc"].startswith(
            f"whether QEMU has a blocker 'qemu:1' cannot be told: {unmet}"), deleted

        async def migrating() -> bool:
            reply = await c.execute("query-migrate")
            return reply.get("return", {}).get("status") in {"setup", "active"}

        await wait_until(migrating, "the second QEMU answering that it migrates")
        assert await c.ok("query-blockers") == []
        await c.ok("migrate_cancel")
    assert_clean_log(d)


@contextlib.asynccontextmanager
async def qemus_as(uid: int, *socks: Path) -> AsyncIterator[None]:
    """Real QEMUs (no guest) run as ``uid``, with no groups, one listening at each of
    ``socks`` for the block: another local user's processes at --qemu's paths."""
    qemus = [subprocess.Popen(
        ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
         "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for sock in socks]
    try:
        for sock in socks:
            await wait_until(sock.exists, f"QEMU listening at {sock}")
        yield
    finally:
        for qemu in qemus:
            qemu.kill()
            qemu.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: QEMU runs as another uid")
async def test_a_qemu_socket_another_user_could_have_put_there_is_not_taken_for_qemu(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    """Found by review: while QEMU is away its socket file is gone, and in a directory
    others may write (/tmp's sticky bit keeps no one from making a new name) any local
    user could listen at --qemu's path: migblockd took that user's process for QEMU,
    believed its blocked-reasons and migration status, and forwarded the migrate
    commands to it.  A real QEMU as another uid stands for that user's listener."""
    short_tmp.chmod(0o755)
    uid = 3_999_998  # no account: a local user like any other
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    own = short_tmp / "own"
    own.mkdir()
    os.chown(own, uid, uid)  # as libvirt's per-domain directory of QEMU's user
    async with qemus_as(uid, shared / "qmp.sock", own / "qmp.sock"):
        taken = start_daemon("--qemu", str(shared / "qmp.sock"), "--ephemeral",
                             socket=short_tmp / "a.sock")
        taken.wait_for_log(
            f"QEMU at {shared / 'qmp.sock'} is not available: what listens there runs as "
            f"uid {uid}, and {shared} others may write to it (mode 1777), so another user "
            "could have put that socket there while QEMU was away", timeout=30)
        c = await RawClient.connect(taken.socket)
        try:
            desc = (await c.execute("query-migrate"))["error"]["desc"]
        finally:
            await c.close()
        assert "Not connected to QEMU's monitor" in desc, desc
        assert "what listens there runs as" in desc, desc

        # QEMU's user's own directory: that uid's QEMU is QEMU.
        trusted = start_daemon("--qemu", str(own / "qmp.sock"), "--ephemeral",
                               socket=short_tmp / "b.sock")
        trusted.wait_for_log(re.compile(
            rf"connected to QEMU 7\.[0-9.]+ at {re.escape(str(own / 'qmp.sock'))}\n"), timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: QEMU runs as another uid")
async def test_a_directory_of_qemus_name_another_user_made_in_tmp_is_not_taken_for_qemus(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    """Found by review: a listener of a user who owns the socket's directory was QEMU,
    above it a sticky directory passing; but in /tmp any user may make the directory
    --qemu names (/tmp/vm1/qmp.sock) while it is missing, as themselves, and listen
    there.  A real QEMU as another uid in a directory of its own in a 1777 one (as
    /tmp) stands for that user."""
    short_tmp.chmod(0o755)
    uid = 3_999_997  # no account: a local user like any other
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    theirs = shared / "vm1"
    theirs.mkdir()
    os.chown(theirs, uid, uid)  # made by that user: mkdir /tmp/vm1
    sock = theirs / "qmp.sock"
    async with qemus_as(uid, sock):
        d = start_daemon("--qemu", str(sock), "--ephemeral", socket=short_tmp / "a.sock")
        d.wait_for_log(
            f"QEMU at {sock} is not available: what listens there runs as uid {uid}, and "
            f"{theirs}, of that user, is in {shared}, where others may make a name as "
            "themselves (mode 1777), so another user could have put that socket there",
            timeout=30)
        c = await RawClient.connect(d.socket)
        try:
            desc = (await c.execute("query-migrate"))["error"]["desc"]
        finally:
            await c.close()
        assert "Not connected to QEMU's monitor" in desc, desc
        assert "where others may make a name as themselves" in desc, desc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: QEMU runs as another uid")
async def test_a_qemu_path_that_is_a_symlink_into_tmp_is_judged_where_it_leads(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    """Found by review: only the directory --qemu names was judged, not where its last
    name leads: root's /run/qemu/vm1.qmp, a symlink to /tmp/vm1.qmp, was QEMU's socket
    whoever listened at /tmp/vm1.qmp.  So was --qemu /run/qemu/link/../vm1.qmp, folded
    as written rather than as the kernel follows link.  A real QEMU as another uid
    listening in a 1777 directory (as /tmp) stands for any local user."""
    short_tmp.chmod(0o755)
    uid = 3_999_996  # no account: a local user like any other
    shared = short_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    sock = shared / "vm1.qmp"
    run = short_tmp / "run"  # root's, 0755: as /run/qemu
    run.mkdir()
    (run / "vm1.qmp").symlink_to(sock)
    (shared / "sub").mkdir()
    (run / "link").symlink_to(shared / "sub")  # link/.. is shared
    async with qemus_as(uid, sock):
        for name, given in (("a", run / "vm1.qmp"), ("b", f"{run}/link/../vm1.qmp")):
            d = start_daemon("--qemu", str(given), "--ephemeral",
                             socket=short_tmp / f"{name}.sock")
            d.wait_for_log(
                f"QEMU at {given} is not available: what listens there runs as uid {uid}, "
                f"and {shared} others may write to it (mode 1777), so another user could "
                "have put that socket there", timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: QEMU runs as another uid")
async def test_a_qemu_socket_directory_others_may_write_by_its_acl_names_the_entries(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    """Found by review: a directory of root's, 0755, that setfacl -m u:UID:rwx made
    0775 for one more user was refused as "others may write to it (mode 0775)",
    which reads as the group's write bit: under an ACL the group bits are the mask,
    and the group (root's) may not write.  The refusal names the entries that let
    others write.  A real QEMU as another uid, in a directory with a real ACL."""
    short_tmp.chmod(0o755)
    uid, other, group = 3_999_995, 3_999_994, 3_999_993  # no accounts: local users
    shared = short_tmp / "acl"
    shared.mkdir()
    shared.chmod(0o755)
    os.chown(shared, 0, 0)
    subprocess.run(["setfacl", "-m", f"u:{uid}:rwx,u:{other}:rwx,g:{group}:rwx",
                    str(shared)], check=True)
    assert shared.stat().st_mode & 0o777 == 0o775  # the mask
    sock = shared / "qmp.sock"
    async with qemus_as(uid, sock):
        d = start_daemon("--qemu", str(sock), "--ephemeral", socket=short_tmp / "a.sock")
        d.wait_for_log(
            f"QEMU at {sock} is not available: what listens there runs as uid {uid}, and "
            f"{shared} has an ACL that lets uid {other}, the members of gid "
            f"{group} write to it (mode 0775, whose group bits are the ACL's mask), so "
            "another user could have put that socket there while QEMU was away", timeout=30)
        assert "others may write to it" not in d.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: QEMU runs as another uid")
async def test_a_qemu_socket_directory_whose_acl_lets_only_qemus_user_write_is_trusted(
        start_daemon: Callable[..., DaemonProcess], short_tmp: Path) -> None:
    """Found by review: the refusal above was decided by the mode's group bits,
    which under an ACL are only its mask: a directory of root's, 0755, that
    ``setfacl -m u:OTHER:rx,m::rwx`` made 0775, where no one but root may write,
    was refused, and so was one that lets QEMU's own user write (as libvirt's
    per-domain directories do), and one of QEMU's user's made there.  The entries
    decide, as the kernel reads them.  Real QEMUs as another uid, real ACLs."""
    short_tmp.chmod(0o755)
    uid, other = 3_999_992, 3_999_991  # no accounts: local users
    reading = short_tmp / "reading"  # only a mask that would let write, no entry that does
    writing = short_tmp / "writing"  # QEMU's user may write there, and made vm1 there
    for directory in (reading, writing):
        directory.mkdir()
        directory.chmod(0o755)
        subprocess.run(["setfacl", "-m", f"u:{uid}:rwx,u:{other}:rx", str(directory)],
                       check=True)
    (writing / "vm1").mkdir()
    os.chown(writing / "vm1", uid, uid)
    socks = [reading / "qmp.sock", writing / "qmp.sock", writing / "vm1" / "qmp.sock"]
    async with qemus_as(uid, *socks):
        # Bound: now no entry of reading's lets anyone write, though its mask would.
        subprocess.run(["setfacl", "-m", f"u:{uid}:rx,m::rwx", str(reading)], check=True)
        for directory in (reading, writing):
            assert directory.stat().st_mode & 0o777 == 0o775  # the mask
        for n, sock in enumerate(socks):
            d = start_daemon("--qemu", str(sock), "--ephemeral",
                             socket=short_tmp / f"{n}.sock")
            d.wait_for_log(re.compile(
                rf"connected to QEMU 7\.[0-9.]+ at {re.escape(str(sock))}\n"), timeout=30)
            assert "is not available" not in d.log()
            d.stop()

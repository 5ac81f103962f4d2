"""Every blocker rule of QEMU's, end to end through the real daemon.

The rules and strings are QEMU's (``include/migration/blocker.h``,
``migration/migration.c`` 8.2 to 10.2, ``qapi/migration.json``), as
docs/registry.md states them; strings are exact.  Tests that only add and
delete blockers with ids of their own share one daemon; tests that migrate, or
depend on the whole registry, start their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log, owner_info
from qemu_strings import (
    ALL_MODES,
    CPR_RAM,
    DEFAULT_PARAMETERS,
    DUMP,
    GENERIC,
    INVTSC,
    MDEV,
    NO_ID,
    SEV,
    TPM,
    VFIO,
    VHOST,
    VMDK,
    error,
)
from qmpclient import RawClient


def err(desc: str, id: Any = NO_ID) -> dict[str, Any]:
    return error(GENERIC, desc, id)


def only_migratable_desc(reason: str) -> str:
    return f"disallowing migration blocker (--only-migratable) for: {reason}"


def busy_desc(reason: str) -> str:
    return f"disallowing migration blocker (migration/snapshot in progress) for: {reason}"


async def enable_events(c: RawClient) -> None:
    assert await c.ok("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]}) == {}


async def wait_status(c: RawClient, status: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await c.ok("query-migrate")
        if info.get("status") == status:
            return info
        assert time.monotonic() < deadline, f"status never became {status}: {info}"
        await asyncio.sleep(0.02)


def check_info(info: dict[str, Any], *, id: str | None, reason: str, modes: list[str],
               internal: bool = False, scope: str = "daemon") -> None:
    """A BlockerInfo as add-blocker must answer it for this test process."""
    assert set(info) == {"id", "reason", "modes", "internal", "scope", "owner", "added",
                         "source"}, info
    assert info["source"] == "migblockd"
    if id is not None:
        assert info["id"] == id
    assert type(info["id"]) is str and info["id"]
    assert info["reason"] == reason
    assert info["modes"] == modes
    assert info["internal"] is internal
    assert info["scope"] == scope
    assert info["owner"] == owner_info(os.getpid())
    added = info["added"]
    assert set(added) == {"seconds", "microseconds"}
    assert 0 <= added["microseconds"] < 1_000_000
    assert abs(added["seconds"] + added["microseconds"] / 1e6 - time.time()) < 60


# --------------------------------------------------------------------------- add / del / query


async def test_add_query_delete(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        info = await c.ok("add-blocker", {"reason": INVTSC, "id": "cpu0"})
        check_info(info, id="cpu0", reason=INVTSC, modes=ALL_MODES)
        listed = [b for b in await c.ok("query-blockers") if b["id"] == "cpu0"]
        assert listed == [info]
        assert await c.ok("del-blocker", {"id": "cpu0"}) == {}
        assert not [b for b in await c.ok("query-blockers") if b["id"] == "cpu0"]
        assert await c.execute("del-blocker", {"id": "cpu0"}, id=1) == err(
            "Blocker 'cpu0' not found", 1)


async def test_modes_and_internal_flag(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        info = await c.ok("add-blocker", {"reason": VMDK, "modes": ["normal"], "id": "m-vmdk"})
        check_info(info, id="m-vmdk", reason=VMDK, modes=["normal"])
        info = await c.ok("add-blocker", {"reason": MDEV, "id": "m-mdev",
                                          "modes": ["cpr-exec", "cpr-transfer"]})
        check_info(info, id="m-mdev", reason=MDEV, modes=["cpr-transfer", "cpr-exec"])
        info = await c.ok("add-blocker", {"reason": DUMP, "internal": True, "id": "m-dump"})
        check_info(info, id="m-dump", reason=DUMP, modes=ALL_MODES, internal=True)
        info = await c.ok("add-blocker", {"reason": CPR_RAM, "id": "m-ram",
                                          "modes": ["cpr-transfer", "cpr-transfer"],
                                          "internal": False, "scope": "daemon"})
        check_info(info, id="m-ram", reason=CPR_RAM, modes=["cpr-transfer"])

        mine = {"m-vmdk", "m-mdev", "m-dump", "m-ram"}
        everything = [b["id"] for b in await c.ok("query-blockers") if b["id"] in mine]
        assert everything == ["m-vmdk", "m-mdev", "m-dump", "m-ram"]  # oldest first
        by_mode = {}
        for mode in ALL_MODES:
            by_mode[mode] = [b["id"] for b in await c.ok("query-blockers", {"mode": mode})
                             if b["id"] in mine]
        assert by_mode == {
            "normal": ["m-vmdk", "m-dump"],
            "cpr-reboot": ["m-dump"],
            "cpr-transfer": ["m-mdev", "m-dump", "m-ram"],
            "cpr-exec": ["m-mdev", "m-dump"],
        }
        for bid in ("m-mdev", "m-vmdk", "m-dump", "m-ram"):
            assert await c.ok("del-blocker", {"id": bid}) == {}
        for mode in ALL_MODES:
            assert not [b for b in await c.ok("query-blockers", {"mode": mode})
                        if b["id"] in mine]


async def test_empty_modes_is_refused(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        reply = await c.execute("add-blocker", {"reason": "none", "modes": [], "id": "empty"},
                                id=1)
        assert reply["id"] == 1 and reply["error"]["class"] == GENERIC, reply
        assert not [b for b in await c.ok("query-blockers") if b["id"] == "empty"]


async def test_same_reason_twice_is_two_blockers(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        a = await c.ok("add-blocker", {"reason": SEV})
        b = await c.ok("add-blocker", {"reason": SEV})
        check_info(a, id=None, reason=SEV, modes=ALL_MODES)
        check_info(b, id=None, reason=SEV, modes=ALL_MODES)
        assert a["id"] != b["id"]
        listed = [x["id"] for x in await c.ok("query-blockers") if x["reason"] == SEV]
        assert listed == [a["id"], b["id"]]
        assert await c.ok("del-blocker", {"id": a["id"]}) == {}
        listed = [x["id"] for x in await c.ok("query-blockers") if x["reason"] == SEV]
        assert listed == [b["id"]]
        assert await c.ok("del-blocker", {"id": b["id"]}) == {}
        # A generated id cannot be reused by a client, nor generated again.
        c2 = await c.ok("add-blocker", {"reason": SEV})
        assert c2["id"] not in (a["id"], b["id"])
        reply = await c.execute("add-blocker", {"reason": "x", "id": a["id"]}, id=2)
        assert reply == err("Parameter 'id' expects an identifier", 2)
        await c.ok("del-blocker", {"id": c2["id"]})


@pytest.mark.parametrize("bad_id", ["", "1abc", "-a", "_a", ".a", "a b", "a/b", "caf\u00e9",
                                    "a\n", "#blocker0", "a:b"])
async def test_invalid_ids(module_daemon: DaemonProcess, bad_id: str) -> None:
    async with module_daemon.client() as c:
        reply = await c.execute("add-blocker", {"reason": "bad id", "id": bad_id}, id="i")
        assert reply == err("Parameter 'id' expects an identifier", "i")
        assert not [b for b in await c.ok("query-blockers") if b["reason"] == "bad id"]


async def test_valid_and_duplicate_ids(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        for good in ("a", "Z", "a-b.c_d9", "x" * 128, "A1-._"):
            info = await c.ok("add-blocker", {"reason": "ok id", "id": good})
            assert info["id"] == good
        reply = await c.execute("add-blocker", {"reason": "again", "id": "a-b.c_d9"}, id=3)
        assert reply == err("Duplicate blocker ID 'a-b.c_d9'", 3)
        listed = [b for b in await c.ok("query-blockers") if b["id"] == "a-b.c_d9"]
        assert [b["reason"] for b in listed] == ["ok id"]
        # Ids are case-sensitive.
        assert (await c.ok("add-blocker", {"reason": "ok id", "id": "A-B.C_D9"}))["id"] == (
            "A-B.C_D9")
        for good in ("a", "Z", "a-b.c_d9", "x" * 128, "A1-._", "A-B.C_D9"):
            assert await c.ok("del-blocker", {"id": good}) == {}
        # Once deleted, an id is free again.
        assert (await c.ok("add-blocker", {"reason": "reuse", "id": "a"}))["id"] == "a"
        await c.ok("del-blocker", {"id": "a"})
        reply = await c.execute("del-blocker", {"id": "never-there"}, id=4)
        assert reply == err("Blocker 'never-there' not found", 4)


async def test_ids_and_reasons_are_bounded(start_daemon: Callable[..., DaemonProcess]) -> None:
    # A megabyte id was accepted and logged in full; an empty reason was accepted
    # and migrate then failed with desc "".  At debug level, which logs the wire too.
    d = start_daemon()
    async with d.client() as c:
        huge = "x" * 1_000_000
        for id_, request in ((1, {"reason": "long id", "id": huge}),
                             (2, {"reason": "long id", "id": "y" * 129})):
            reply = await c.execute("add-blocker", request, id=id_)
            assert reply == err(
                "Parameter 'id' expects an identifier of at most 128 characters", id_)
        reply = await c.execute("add-blocker", {"reason": "", "id": "empty"}, id=3)
        assert reply == err("Parameter 'reason' expects a non-empty string", 3)
        assert await c.ok("query-blockers") == []
        assert await c.ok("migrate", {"uri": "unix:/tmp/nowhere"}) == {}
    assert d.stop() == 0
    log = d.log()
    assert "x" * 3000 not in log  # the refusal is logged, the id nowhere in full
    assert "expects an identifier of at most 128 characters" in log
    assert len(log) < 100_000
    assert_clean_log(d)


async def test_events_with_cause_reach_every_negotiated_client(
    module_daemon: DaemonProcess,
) -> None:
    async with module_daemon.client() as actor, module_daemon.clients(3) as watchers:
        info = await actor.ok("add-blocker", {"reason": TPM, "id": "ev-tpm", "modes": ["normal"]})
        await actor.ok("del-blocker", {"id": "ev-tpm"})
        for c in [actor, *watchers]:
            added = await c.wait_event("BLOCKER_ADDED")
            assert added["data"] == info
            deleted = await c.wait_event("BLOCKER_DELETED")
            assert deleted["data"] == {"id": "ev-tpm", "cause": "command"}
            assert await c.sync() == []  # nothing else


async def test_connection_scoped_blockers_are_released_on_disconnect(
    module_daemon: DaemonProcess,
) -> None:
    async with module_daemon.client() as owner, module_daemon.client() as watcher:
        c1 = await owner.ok("add-blocker", {"reason": VFIO, "scope": "connection",
                                            "id": "conn-1", "modes": ["normal"]})
        check_info(c1, id="conn-1", reason=VFIO, modes=["normal"], scope="connection")
        c2 = await owner.ok("add-blocker", {"reason": VHOST, "scope": "connection",
                                            "id": "conn-2"})
        d1 = await owner.ok("add-blocker", {"reason": TPM, "id": "conn-daemon"})
        assert d1["scope"] == "daemon"
        assert c2["scope"] == "connection"
        # Deleting a connection blocker by command gives cause "command".
        c3 = await owner.ok("add-blocker", {"reason": "gone early", "scope": "connection",
                                            "id": "conn-3"})
        assert c3["scope"] == "connection"
        await owner.ok("del-blocker", {"id": "conn-3"})
        for name in ("BLOCKER_ADDED",) * 4:
            await watcher.wait_event(name)
        assert (await watcher.wait_event("BLOCKER_DELETED"))["data"] == {
            "id": "conn-3", "cause": "command"}
        await owner.close()
        got = [await watcher.wait_event("BLOCKER_DELETED") for _ in range(2)]
        assert sorted((e["data"]["id"], e["data"]["cause"]) for e in got) == [
            ("conn-1", "connection-closed"), ("conn-2", "connection-closed")]
        ids = [b["id"] for b in await watcher.ok("query-blockers")]
        assert "conn-1" not in ids and "conn-2" not in ids
        assert "conn-daemon" in ids
        await watcher.ok("del-blocker", {"id": "conn-daemon"})
        assert module_daemon.proc.poll() is None


async def test_owner_is_the_connecting_process(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        info = await c.ok("add-blocker", {"reason": "who", "id": "owner-check"})
        assert info["owner"] == owner_info(os.getpid())
        await c.ok("del-blocker", {"id": "owner-check"})
    # A blocker added by another process carries that process's pid.
    script = (
        "import socket, sys, json\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile('rwb')\n"
        "f.readline()\n"
        "f.write(b'{\"execute\": \"qmp_capabilities\"}'); f.flush(); f.readline()\n"
        "f.write(b'{\"execute\": \"add-blocker\", \"arguments\": "
        "{\"reason\": \"child\", \"id\": \"owner-child\"}}'); f.flush()\n"
        "while True:\n"
        "    line = f.readline()\n"
        "    if b'return' in line or b'error' in line or not line: break\n"
        "sys.stdout.write(line.decode())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "python3", "-c", script, str(module_daemon.socket), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    child = json.loads(out)["return"]
    assert child["owner"] == owner_info(proc.pid)
    async with module_daemon.client() as c:
        await c.ok("del-blocker", {"id": "owner-child"})


# --------------------------------------------------------------------------- only-migratable


async def test_only_migratable(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--only-migratable", "--migration-time", "0.3")
    async with d.client() as c:
        cases: list[dict[str, Any]] = [{"reason": INVTSC}, {"reason": VMDK, "modes": ["normal"]},
                     {"reason": MDEV, "modes": ["cpr-exec", "normal"]},
                     {"reason": VFIO, "modes": ["normal"], "internal": False}]
        for args in cases:
            reply = await c.execute("add-blocker", {**args, "id": "refused"}, id="om")
            assert reply == err(only_migratable_desc(args["reason"]), "om")
        assert await c.ok("query-blockers") == []
        assert c.events == []
        # Not normal, or internal: allowed.
        ok1 = await c.ok("add-blocker", {"reason": CPR_RAM, "modes": ["cpr-transfer"]})
        ok2 = await c.ok("add-blocker", {"reason": DUMP, "internal": True})
        ok3 = await c.ok("add-blocker", {"reason": VMDK, "internal": True, "modes": ["normal"]})
        assert [b["id"] for b in await c.ok("query-blockers")] == [
            ok1["id"], ok2["id"], ok3["id"]]
        # The argument errors come first.
        reply = await c.execute("add-blocker", {"reason": VMDK, "id": "9bad"}, id=1)
        assert reply == err("Parameter 'id' expects an identifier", 1)
        reply = await c.execute("add-blocker", {"reason": VMDK, "id": "x", "modes": ["bad"]}, id=2)
        assert reply == err("Parameter 'modes[0]' does not accept value 'bad'", 2)
    d.wait_for_log("disallowing migration blocker (--only-migratable)")


async def test_only_migratable_is_checked_before_busy(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--only-migratable", "--migration-time", "30")
    async with d.client() as c:
        assert await c.ok("migrate", {"uri": "unix:/tmp/dest"}) == {}
        assert (await c.ok("query-migrate"))["status"] in ("setup", "active")
        reply = await c.execute("add-blocker", {"reason": SEV}, id=1)
        assert reply == err(only_migratable_desc(SEV), 1)
        reply = await c.execute("add-blocker", {"reason": SEV, "modes": ["cpr-reboot"]}, id=2)
        assert reply == err(busy_desc(SEV), 2)
        reply = await c.execute("add-blocker", {"reason": DUMP, "internal": True}, id=3)
        assert reply == err(busy_desc(DUMP), 3)
        assert await c.ok("query-blockers") == []


# --------------------------------------------------------------------------- busy, migrate


async def test_fresh_daemon_query_migrate_is_empty(daemon: DaemonProcess) -> None:
    async with daemon.client() as c:
        assert await c.ok("query-migrate") == {}
        assert await c.ok("query-migrate-parameters") == {"mode": "normal", **DEFAULT_PARAMETERS}
        assert await c.ok("query-migrate-capabilities") == [
            {"capability": "events", "state": False}]
        assert await c.ok("query-blockers") == []
        # migrate_cancel with nothing running: {} and nothing happens.
        await enable_events(c)
        assert await c.execute("migrate_cancel", id="c") == {"return": {}, "id": "c"}
        assert await c.ok("query-migrate") == {}
        assert await c.sync() == []


async def test_busy_while_migrating(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--migration-time", "30")
    async with d.client() as c:
        pre = await c.ok("add-blocker", {"reason": MDEV, "modes": ["cpr-exec"], "id": "pre"})
        assert await c.ok("migrate", {"uri": "tcp:127.0.0.1:4444"}) == {}
        status = (await c.ok("query-migrate"))["status"]
        assert status in ("setup", "active")
        busy_cases: list[dict[str, Any]] = [
            {"reason": SEV}, {"reason": DUMP, "internal": True},
            {"reason": VMDK, "modes": ["cpr-reboot"], "id": "busy1"},
            {"reason": MDEV, "scope": "connection"}]
        for args in busy_cases:
            reply = await c.execute("add-blocker", args, id="b")
            assert reply == err(busy_desc(args["reason"]), "b")
        assert [b["id"] for b in await c.ok("query-blockers")] == [pre["id"]]
        # migrate while one runs.
        reply = await c.execute("migrate", {"uri": "unix:/x"}, id="m")
        assert reply == err("There's a migration process in progress", "m")
        # Deleting is allowed while migrating.
        assert await c.ok("del-blocker", {"id": "pre"}) == {}
        assert await c.ok("query-blockers") == []
        # Cancel: cancelling, then cancelled; then blockers may be added again.
        assert await c.ok("migrate_cancel") == {}
        await wait_status(c, "cancelled")
        info = await c.ok("add-blocker", {"reason": SEV, "id": "after"})
        assert info["id"] == "after"
        assert await c.ok("query-migrate") == {"status": "cancelled", "blocked-reasons": [SEV]}


async def test_migrate_blocked_by_newest_blocker_of_current_mode(
    daemon: DaemonProcess,
) -> None:
    async with daemon.client() as c, daemon.client() as watcher:
        await enable_events(c)
        await c.ok("add-blocker", {"reason": VMDK, "modes": ["normal"], "id": "a"})
        await c.ok("add-blocker", {"reason": INVTSC, "id": "b"})
        await c.ok("add-blocker", {"reason": CPR_RAM, "modes": ["cpr-transfer"], "id": "c"})
        await c.ok("add-blocker", {"reason": MDEV, "modes": ["cpr-transfer", "cpr-exec"],
                                   "id": "d"})
        expect = {
            "normal": ([VMDK, INVTSC], INVTSC),
            "cpr-reboot": ([INVTSC], INVTSC),
            "cpr-transfer": ([INVTSC, CPR_RAM, MDEV], MDEV),
            "cpr-exec": ([INVTSC, MDEV], MDEV),
        }
        c.events.clear()
        for mode in ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec", "normal"]:
            assert await c.ok("migrate-set-parameters", {"mode": mode}) == {}
            assert await c.ok("query-migrate-parameters") == {"mode": mode, **DEFAULT_PARAMETERS}
            reasons, newest = expect[mode]
            assert await c.ok("query-migrate") == {"blocked-reasons": reasons}
            # cpr-transfer sends its state on a channel of its own (QEMU 10).
            where = ({"channels": [{"channel-type": t, "addr": {"transport": "socket",
                                    "type": "unix", "path": f"/tmp/{t}"}} for t in ("main", "cpr")]}
                     if mode == "cpr-transfer" else {"uri": "unix:/tmp/dest"})
            reply = await c.execute("migrate", where, id=mode)
            assert reply == err(newest, mode)  # verbatim, no prefix
            assert await c.ok("query-migrate") == {"blocked-reasons": reasons}
        # No MIGRATION event and no state change for a blocked migrate.
        assert await c.sync() == []
        assert c.events == []
        assert [e for e in await watcher.sync() if e["event"] == "MIGRATION"] == []

        # Deleting the newest normal blocker: migrate now quotes the next one.
        await c.ok("del-blocker", {"id": "b"})
        reply = await c.execute("migrate", {"uri": "unix:/tmp/dest"}, id=1)
        assert reply == err(VMDK, 1)
        assert await c.ok("query-migrate") == {"blocked-reasons": [VMDK]}
        # cpr-reboot's list is now empty: switching mode unblocks at once.
        await c.ok("migrate-set-parameters", {"mode": "cpr-reboot"})
        assert await c.ok("query-migrate") == {}
        c.events.clear()
        await c.send({"execute": "migrate", "arguments": {"uri": "exec:cat > /dev/null"},
                      "id": "go"})
        first = await c.read()
        second = await c.read()
        assert first.get("event") == "MIGRATION", first
        assert first["data"] == {"status": "setup"}, first
        assert second == {"return": {}, "id": "go"}
        await c.wait_event("MIGRATION")  # active
        done = await c.wait_event("MIGRATION")
        assert done["data"] == {"status": "completed"}
        info = await c.ok("query-migrate")
        assert info["status"] == "completed"
        assert "blocked-reasons" not in info
        # Back to normal: blocked-reasons reappear, whatever the status.
        await c.ok("migrate-set-parameters", {"mode": "normal"})
        info = await c.ok("query-migrate")
        assert info["status"] == "completed" and info["blocked-reasons"] == [VMDK], info
        # A migrate-set-parameters without mode changes nothing.
        assert await c.ok("migrate-set-parameters", {}) == {}
        assert await c.ok("query-migrate-parameters") == {"mode": "normal", **DEFAULT_PARAMETERS}


async def test_migration_events_and_completion(daemon: DaemonProcess) -> None:
    async with (daemon.client() as c, daemon.client() as watcher,
                daemon.client(negotiate=False) as quiet):
        # Events off (default): a whole migration produces no MIGRATION event.
        assert await c.ok("migrate", {"uri": "tcp:localhost:1"}) == {}
        info = await wait_status(c, "completed")
        assert type(info["total-time"]) is int and info["total-time"] >= 0
        assert type(info["setup-time"]) is int and 0 <= info["setup-time"] <= info["total-time"]
        assert "blocked-reasons" not in info
        assert await c.sync() == [] and c.events == []
        assert await watcher.sync() == [] and watcher.events == []

        await enable_events(c)
        assert await c.ok("query-migrate-capabilities") == [
            {"capability": "events", "state": True}]
        # A new migration may start once the previous one ended.
        await c.send({"execute": "migrate", "arguments": {"uri": "file:/tmp/x"}, "id": 2})
        first = await c.read()
        assert first.get("event") == "MIGRATION" and first["data"] == {"status": "setup"}, first
        assert await c.read() == {"return": {}, "id": 2}
        statuses = ["setup"]
        while statuses[-1] != "completed":
            statuses.append((await c.wait_event("MIGRATION"))["data"]["status"])
        assert statuses == ["setup", "active", "completed"]
        seen: list[str] = []
        while len(seen) < 3:
            seen.append((await watcher.wait_event("MIGRATION"))["data"]["status"])
        assert seen == ["setup", "active", "completed"]
        # The unnegotiated client saw nothing.
        await quiet.send({"execute": "query-version", "id": "q"})
        assert (await quiet.read())["id"] == "q"


async def test_cancel(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--migration-time", "30")
    async with d.client() as c:
        await enable_events(c)
        await c.send({"execute": "migrate", "arguments": {"uri": "unix:/tmp/d"}, "id": "m"})
        assert (await c.read())["data"] == {"status": "setup"}
        assert await c.read() == {"return": {}, "id": "m"}
        await c.send({"execute": "migrate_cancel", "id": "x"})
        first = await c.read()
        assert first.get("event") == "MIGRATION" and first["data"] == {
            "status": "cancelling"}, first
        assert await c.read() == {"return": {}, "id": "x"}
        ev = await c.wait_event("MIGRATION")
        assert ev["data"] == {"status": "cancelled"}
        assert await c.ok("query-migrate") == {"status": "cancelled"}
        # Cancelling again when nothing runs: {} and no event.
        assert await c.ok("migrate_cancel") == {}
        assert await c.sync() == [] and c.events == []
        # Capabilities can be changed now that nothing runs, and a new one starts.
        await c.ok("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": False}]})
        assert await c.ok("migrate", {"uri": "unix:/tmp/d"}) == {}
        assert (await c.ok("query-migrate"))["status"] in ("setup", "active")
        assert await c.sync() == [] and c.events == []


@pytest.mark.parametrize("uri", ["ftp://host/x", "", "tcp", "TCP:127.0.0.1:1", "unix",
                                 "/tmp/socket", " tcp:x", "http:"])
async def test_uri_errors(module_daemon: DaemonProcess, uri: str) -> None:
    async with module_daemon.client() as c:
        before = await c.ok("query-migrate")
        reply = await c.execute("migrate", {"uri": uri}, id="u")
        assert reply["id"] == "u" and reply["error"]["class"] == GENERIC, reply
        assert reply["error"]["desc"] == f"unknown migration protocol: {uri}"
        assert await c.ok("query-migrate") == before


async def test_every_known_uri_scheme_starts_a_migration(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--migration-time", "30")
    async with d.client() as c:
        for uri in ("tcp:127.0.0.1:4444", "unix:/tmp/sock", "exec:cat > /dev/null", "fd:migfd",
                    "file:/tmp/state", "rdma:192.168.0.1:4444", "vsock:3:4444"):
            assert await c.execute("migrate", {"uri": uri}, id=uri) == {"return": {}, "id": uri}
            assert (await c.ok("query-migrate"))["status"] in ("setup", "active")
            assert await c.ok("migrate_cancel") == {}
            await wait_status(c, "cancelled")
    assert_clean_log(d)

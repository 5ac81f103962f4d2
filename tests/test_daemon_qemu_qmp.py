"""The standard Python QMP client (``qemu.qmp``) and its qmp-shell, against the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log, owner_info
from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu_strings import DEFAULT_PARAMETERS, GENERIC, NOT_FOUND, SEV, VMDK
from qmpclient import qemu_qmp_client


async def next_event(listener: EventListener, name: str) -> dict[str, Any]:
    while True:
        event = await asyncio.wait_for(listener.get(), 10)
        if event["event"] == name:
            return dict(event)


async def test_qmpclient_drives_every_command(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # Long enough that the cancel below comes before the end, on a busy machine too.
    d = start_daemon("--migration-time", "2")
    listener = EventListener(("BLOCKER_ADDED", "BLOCKER_DELETED", "MIGRATION"))
    async with qemu_qmp_client(d.socket, "migblockd-test", [listener]) as qmp:
        assert qmp.greeting is not None
        greeting: Any = qmp.greeting._raw
        assert greeting["QMP"]["capabilities"] == ["oob"]
        version: Any = await qmp.execute("query-version")
        assert version == greeting["QMP"]["version"]
        commands: Any = await qmp.execute("query-commands")
        names = {c["name"] for c in commands}
        assert {"qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
                "add-blocker", "del-blocker", "query-blockers", "migrate", "migrate_cancel",
                "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
                "migrate-set-capabilities", "query-migrate-capabilities"} <= names
        schema: Any = await qmp.execute("query-qmp-schema")
        assert {e["name"] for e in schema if e["meta-type"] == "command"} == names
        # qemu.qmp enabled OOB during negotiation: exec-oob works.
        assert await qmp.execute("query-version", oob=True) == version

        info: Any = await qmp.execute("add-blocker", {"reason": SEV, "id": "sev"})
        assert info["id"] == "sev" and info["reason"] == SEV
        assert info["owner"] == owner_info(os.getpid())
        added = await next_event(listener, "BLOCKER_ADDED")
        assert added["data"] == info
        blockers: Any = await qmp.execute("query-blockers")
        assert [b["id"] for b in blockers] == ["sev"]
        assert await qmp.execute("query-blockers", {"mode": "cpr-exec"}) == [info]

        with pytest.raises(ExecuteError) as exc:
            await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert str(exc.value) == SEV
        assert exc.value.error_class == GENERIC
        assert await qmp.execute("query-migrate") == {"blocked-reasons": [SEV]}

        with pytest.raises(ExecuteError) as exc:
            await qmp.execute("add-blocker", {"reason": VMDK, "id": "sev"})
        assert str(exc.value) == "Duplicate blocker ID 'sev'"

        assert await qmp.execute("migrate-set-parameters", {"mode": "cpr-reboot"}) == {}
        assert await qmp.execute("query-migrate-parameters") == {"mode": "cpr-reboot",
                                                               **DEFAULT_PARAMETERS}
        assert await qmp.execute("migrate-set-parameters", {"mode": "normal"}) == {}

        assert await qmp.execute("del-blocker", {"id": "sev"}) == {}
        deleted = await next_event(listener, "BLOCKER_DELETED")
        assert deleted["data"] == {"id": "sev", "cause": "command"}
        with pytest.raises(ExecuteError) as exc:
            await qmp.execute("del-blocker", {"id": "sev"})
        assert str(exc.value) == "Blocker 'sev' not found"

        assert await qmp.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": "events", "state": True}]}) == {}
        assert await qmp.execute("query-migrate-capabilities") == [
            {"capability": "events", "state": True}]
        assert await qmp.execute("migrate", {"uri": "unix:/tmp/dest"}) == {}
        statuses = [(await next_event(listener, "MIGRATION"))["data"]["status"]
                    for _ in range(3)]
        assert statuses == ["setup", "active", "completed"]
        info = await qmp.execute("query-migrate")
        assert info["status"] == "completed"

        assert await qmp.execute("migrate", {"uri": "unix:/tmp/dest"}) == {}
        assert (await next_event(listener, "MIGRATION"))["data"] == {"status": "setup"}
        assert await qmp.execute("migrate_cancel", oob=True) == {}
        # Setup is a tenth of the migration time: a loaded machine may reach active first.
        status = (await next_event(listener, "MIGRATION"))["data"]
        if status == {"status": "active"}:
            status = (await next_event(listener, "MIGRATION"))["data"]
        assert status == {"status": "cancelling"}
        assert (await next_event(listener, "MIGRATION"))["data"] == {"status": "cancelled"}
        assert await qmp.execute("migrate_cancel") == {}
        assert (await qmp.execute("query-migrate")) == {"status": "cancelled"}

        with pytest.raises(ExecuteError) as exc:
            await qmp.execute("no-such-command")
        assert exc.value.error_class == NOT_FOUND
        assert str(exc.value) == "The command no-such-command has not been found"
    d.wait_for_log(re.compile("disconnect", re.I))
    assert d.stop() == 0
    assert_clean_log(d)


async def test_qmp_shell_script(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon()
    script = "\n".join([
        "query-version",
        "add-blocker reason=SEV:not-implemented id=sev",
        "add-blocker reason=vmdk modes=[\"normal\"] id=vmdk",
        "query-blockers mode=cpr-exec",
        "query-migrate",
        "migrate uri=tcp:127.0.0.1:1",
        "del-blocker id=sev",
        "del-blocker id=sev",
        "del-blocker id=vmdk",
        "query-migrate",
        "",
    ])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qemu.qmp.qmp_shell", str(d.socket),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, errout = await asyncio.wait_for(proc.communicate(script.encode()), 30)
    text = out.decode()
    assert proc.returncode == 0, (text, errout)
    assert "Connected to QEMU" in text
    replies = []
    for line in text.splitlines():
        start = line.find("{")
        if start >= 0:
            replies.append(json.loads(line[start:]))
    assert len(replies) == 10, text
    version, sev, vmdk, by_mode, blocked, refused, del1, del2, del3, free = replies
    assert version["return"]["package"].startswith("migblockd ")
    assert sev["return"]["id"] == "sev" and sev["return"]["reason"] == "SEV:not-implemented"
    assert vmdk["return"]["modes"] == ["normal"]
    assert [b["id"] for b in by_mode["return"]] == ["sev"]
    assert blocked == {"return": {"blocked-reasons": ["SEV:not-implemented", "vmdk"]}}
    assert refused == {"error": {"class": GENERIC, "desc": "vmdk"}}
    assert del1 == {"return": {}}
    assert del2 == {"error": {"class": GENERIC, "desc": "Blocker 'sev' not found"}}
    assert del3 == {"return": {}}
    assert free == {"return": {}}
    assert "Traceback" not in errout.decode()
    assert_clean_log(d)


async def test_a_long_lived_qmpclient_set_up_as_the_readme_says(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # qemu.qmp's defaults: lines of at most 10 MiB, and a default listener that keeps
    # every event.  The README names both and the two settings that avoid them.
    d = start_daemon("--ephemeral")
    reason = "\u00e9" * 1024  # six bytes each on the wire: \u00e9
    async with qemu_qmp_client(d.socket, "filler") as filler:
        for first in range(0, 1800, 300):
            await asyncio.gather(*(filler.execute("add-blocker", {"reason": reason})
                                   for _ in range(first, first + 300)))
    plain = QMPClient("plain")
    await asyncio.wait_for(plain.connect(str(d.socket)), 10)
    try:
        with pytest.raises(ExecInterruptedError):  # about 11 MB in one line
            await asyncio.wait_for(plain.execute("query-blockers"), 60)
    finally:
        with contextlib.suppress(Exception):
            await plain.disconnect()

    agent = QMPClient("agent", readbuflen=1 << 30)
    agent.events.event_filter = lambda event: False
    mine = EventListener("BLOCKER_ADDED")
    agent.register_listener(mine)
    await asyncio.wait_for(agent.connect(str(d.socket)), 10)
    try:
        listing: Any = await asyncio.wait_for(agent.execute("query-blockers"), 60)
        assert len(listing) == 1800
        await agent.execute("add-blocker", {"reason": "seen", "id": "seen"})
        assert (await next_event(mine, "BLOCKER_ADDED"))["data"]["id"] == "seen"
        assert agent.events.history == () and agent.events.empty()
    finally:
        await agent.disconnect()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert 'QMPClient("agent", readbuflen=1 << 30)' in readme
    assert "qmp.events.event_filter = lambda event: False" in readme

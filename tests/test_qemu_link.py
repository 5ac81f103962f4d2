"""The QEMU link against a real QEMU: connect, execute, relay events, survive QEMU's death.

One test uses a scripted QMP peer instead: two replies and their events in one read, an
interleaving a real QEMU produces only by chance.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import select
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from qmpclient import RawClient
from realqemu import Qemu, wait_until

from migblockd.qemu import (
    LinkState,
    QemuCommandError,
    QemuInterrupted,
    QemuLink,
    QemuLinkError,
    QemuNotConnected,
)
from migblockd.qemu.errors import QemuTimedOut

EXEC_NULL = "exec:cat > /dev/null"
EVENTS_ON = {"capabilities": [{"capability": "events", "state": True}]}


@dataclass
class Recorder:
    """What the link handed to its callbacks, in order."""

    events: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    states: list[LinkState] = field(default_factory=list)

    def on_event(self, name: str, data: Mapping[str, object],
                 timestamp: Mapping[str, object]) -> None:
        self.events.append((name, dict(data), dict(timestamp)))

    def statuses(self) -> list[str]:
        return [d["status"] for n, d, _ in self.events if n == "MIGRATION"]


@contextlib.asynccontextmanager
async def running_link(path: Path, **kwargs: Any) -> AsyncIterator[tuple[QemuLink, Recorder]]:
    rec = Recorder()
    link = QemuLink(path, on_event=rec.on_event, on_state=rec.states.append, **kwargs)
    link.start()
    try:
        yield link, rec
    finally:
        await link.close()


async def connected(link: QemuLink) -> None:
    await wait_until(lambda: link.state == "connected", f"link connected to {link.path}")


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The link's log lines (INFO and above) that contain ``text``."""
    return [r.getMessage() for r in caplog.records
            if r.name == "migblockd.qemu" and r.levelno >= logging.INFO
            and text in r.getMessage()]


def levels(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The levels of the link's log lines that contain ``text``, in order."""
    return [r.levelname for r in caplog.records
            if r.name == "migblockd.qemu" and text in r.getMessage()]


@pytest.fixture(autouse=True)
def _quiet_and_tidy(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test: qemu.qmp logs nothing (the link speaks for it) and asyncio has no complaint
    (no task destroyed while pending, no exception never retrieved) once the link is closed."""
    caplog.set_level(logging.DEBUG)
    yield
    gc.collect()
    # In teardown, caplog.records holds only teardown's records: ask for the test's own.
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    library = [r.getMessage() for r in records if r.name.startswith("qemu")]
    assert not library, library
    asyncio_errors = [r.getMessage() for r in records
                      if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not asyncio_errors, asyncio_errors


async def test_connects_and_learns_version_and_commands(
        qemu: Qemu, caplog: pytest.LogCaptureFixture) -> None:
    async with qemu.monitor() as mon:
        version = await mon.ok("query-version")
        schema = await mon.ok("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}

    def arguments(command: str) -> set[str]:
        return {m["name"] for m in by_name[by_name[command]["arg-type"]]["members"]}

    async with running_link(qemu.gate_socket) as (link, rec):
        await connected(link)
        assert rec.states == ["connected"]
        assert link.version == version
        info = link.info
        assert info is not None
        q = version["qemu"]
        assert info.version_string == f"{q['major']}.{q['minor']}.{q['micro']}"
        assert set(info.commands) == {e["name"] for e in schema if e["meta-type"] == "command"}
        assert info.arguments("migrate") == arguments("migrate")
        assert "uri" in info.arguments("migrate")
        assert info.arguments("migrate-set-parameters") == arguments("migrate-set-parameters")
        assert info.knows("query-migrate") and not info.knows("no-such-command")
        assert {"MIGRATION", "MIGRATION_PASS"} <= info.events
        assert qemu.proc is not None and info.pid == qemu.proc.pid  # which process it is
    assert rec.states == ["connected", "closed"]
    assert link.info is None
    assert logged(caplog, "connected to QEMU") == [
        f"connected to QEMU {info.version_string} at {qemu.gate_socket}"]


async def test_query_migrate_shows_qemus_own_blockers(qemu: Qemu) -> None:
    async with qemu.monitor() as mon, running_link(qemu.gate_socket) as (link, _):
        await connected(link)
        assert await link.execute("query-migrate") == {}
        await mon.add_blocker("blocker1")
        await mon.add_blocker("blocker2")
        assert await link.execute("query-migrate") == {"blocked-reasons": [
            "The vdi format used by node 'blocker1' does not support live migration",
            "The vdi format used by node 'blocker2' does not support live migration"]}
        await mon.remove_blocker("blocker1")
        assert await link.execute("query-migrate") == {
            "blocked-reasons": [mon.blocker_text("blocker2")]}
        await mon.remove_blocker("blocker2")
        assert await link.execute("query-migrate") == {}


async def test_qemus_errors_come_back_verbatim(qemu: Qemu) -> None:
    async with qemu.monitor() as mon, running_link(qemu.gate_socket) as (link, _):
        await connected(link)
        await mon.add_blocker("blocker1")
        await mon.add_blocker("blocker2")
        with pytest.raises(QemuCommandError) as refused:
            await link.execute("migrate", {"uri": EXEC_NULL})
        # The same command on the test's own monitor: QEMU's reply, untouched.
        raw = await mon.execute("migrate", {"uri": EXEC_NULL})
        assert raw["error"] == {"class": refused.value.error_class, "desc": refused.value.desc}
        assert str(refused.value) == mon.blocker_text("blocker2")  # the newest blocker
        assert refused.value.error_class == "GenericError"

        with pytest.raises(QemuCommandError) as unknown:
            await link.execute("no-such-command")
        assert (unknown.value.error_class, unknown.value.desc) == (
            "CommandNotFound", "The command no-such-command has not been found")
        with pytest.raises(QemuCommandError) as missing:
            await link.execute("migrate", {})
        assert missing.value.desc == "Parameter 'uri' is missing"

        # Not strict JSON: refused before anything is sent, and the connection stays up.
        with pytest.raises(QemuLinkError, match="not valid JSON"):
            await link.execute("migrate-set-parameters", {"max-bandwidth": float("inf")})
        assert link.state == "connected"
        assert await link.execute("query-migrate") == {"blocked-reasons": [
            mon.blocker_text("blocker1"), mon.blocker_text("blocker2")]}


async def test_migration_events_are_relayed_in_qemus_order(qemu: Qemu) -> None:
    async with qemu.monitor() as mon, running_link(qemu.gate_socket) as (link, rec):
        await connected(link)
        await link.execute("migrate-set-capabilities", EVENTS_ON)
        assert await link.execute("migrate", {"uri": EXEC_NULL}) == {}
        # QEMU sends MIGRATION setup before its reply to migrate: relayed before execute
        # returned.
        assert rec.events[:1] and rec.events[0][:2] == ("MIGRATION", {"status": "setup"})
        await wait_until(lambda: "completed" in rec.statuses(), "migration completed")
        assert rec.statuses() == ["setup", "active", "completed"]
        passes = [d["pass"] for n, d, _ in rec.events if n == "MIGRATION_PASS"]
        assert passes == list(range(1, len(passes) + 1)) and passes
        # Exactly what QEMU sent its other monitor: same events, order and timestamps.
        seen = [(m["event"], m.get("data", {}), m["timestamp"]) for m in await mon.sync()]
        assert rec.events == seen


async def scripted_monitor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A QMP peer that answers two commands in one write, each reply followed by an
    event: an interleaving a real QEMU produces only by chance (see the test)."""
    greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                    "package": ""}, "capabilities": []}}
    writer.write(json.dumps(greeting).encode() + b"\r\n")
    try:
        await _answer(reader, writer)
    finally:
        # Closed here: from Python 3.12 on, Server.wait_closed() waits for it.
        writer.close()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    waiting: list[str] = []
    decoder, buffered = json.JSONDecoder(), ""
    while True:
        try:  # qemu.qmp ends its messages with no line feed
            msg, end = decoder.raw_decode(buffered.lstrip())
        except ValueError:
            data = await reader.read(4096)
            if not data:
                return
            buffered += data.decode()
            continue
        buffered = buffered.lstrip()[end:]
        name, id = msg["execute"], msg.get("id")
        if name in ("qmp_capabilities", "query-qmp-schema"):
            reply = {"return": {} if name == "qmp_capabilities" else [], "id": id}
            writer.write(json.dumps(reply).encode() + b"\r\n")
        else:
            waiting.append(id)
        if len(waiting) == 2:
            writer.write(b"".join(json.dumps(m).encode() + b"\r\n" for m in (
                {"return": "A", "id": waiting[0]}, event("after A"),
                {"return": "B", "id": waiting[1]}, event("after B"))))
        await writer.drain()


def event(status: str) -> dict[str, Any]:
    return {"event": "MIGRATION", "data": {"status": status},
            "timestamp": {"seconds": 1, "microseconds": 0}}


async def test_events_after_two_replies_in_one_read_keep_their_places(short_tmp: Path) -> None:
    # Each reply's caller runs one loop turn after the reader read it, and the
    # events QEMU sent after a reply must reach on_event after its caller has run
    # (the reply before its events, for the clients). Reported: with two replies
    # and two events in one read, "after B" came before B's reply.
    path = short_tmp / "scripted.sock"
    server = await asyncio.start_unix_server(scripted_monitor, path)
    seen: list[str] = []
    link = QemuLink(path, on_event=lambda name, data, ts: seen.append(str(data["status"])))
    link.start()
    try:
        await connected(link)

        async def call(name: str) -> None:
            seen.append(f"reply {await link.execute(name)}")

        await asyncio.gather(call("query-a"), call("query-b"))
        assert seen == ["reply A", "after A", "reply B", "after B"]
    finally:
        await link.close()
        server.close()
        async with asyncio.timeout(10):  # a hang is a failure
            await server.wait_closed()


async def test_a_lasting_migration_can_be_cancelled(qemu_factory: Callable[..., Qemu]) -> None:
    qemu = qemu_factory(memory="1G")
    async with running_link(qemu.gate_socket) as (link, rec):
        await connected(link)
        await link.execute("migrate-set-capabilities", EVENTS_ON)
        # 1 GiB of never-touched RAM is a ~2.4 MB stream; at 100 kB/s it lasts ~25 s.
        await link.execute("migrate-set-parameters", {"max-bandwidth": 100_000})
        await link.execute("migrate", {"uri": EXEC_NULL})
        await wait_until(lambda: "active" in rec.statuses(), "migration active")
        with pytest.raises(QemuCommandError) as busy:
            await link.execute("migrate", {"uri": EXEC_NULL})
        assert busy.value.desc == "There's a migration process in progress"
        assert (await link.execute("query-migrate"))["status"] == "active"  # type: ignore[index]
        assert await link.execute("migrate_cancel") == {}
        assert "cancelling" in rec.statuses()  # sent before migrate_cancel's reply
        await wait_until(lambda: "cancelled" in rec.statuses(), "migration cancelled")
        assert rec.statuses() == ["setup", "active", "cancelling", "cancelled"]
        assert await link.execute("query-migrate") == {"status": "cancelled"}


async def test_qemu_killed_then_restarted(qemu: Qemu, caplog: pytest.LogCaptureFixture) -> None:
    async with running_link(qemu.gate_socket, min_delay=0.01, max_delay=0.05) as (link, rec):
        await connected(link)
        async with qemu.monitor() as mon:
            await mon.add_blocker("old")
        assert await link.execute("query-migrate") == {"blocked-reasons": [
            "The vdi format used by node 'old' does not support live migration"]}

        qemu.kill()
        await wait_until(lambda: link.state == "disconnected", "link noticed QEMU's death")
        with pytest.raises(QemuNotConnected) as down:
            await link.execute("query-migrate")
        assert str(down.value).startswith(
            f"Not connected to QEMU's monitor at '{qemu.gate_socket}': ")
        assert down.value.path == qemu.gate_socket
        # The socket file stays behind and refuses: the link keeps trying, and says so once.
        await wait_until(lambda: link.attempts >= 5, "five failed reconnection attempts")
        assert link.state == "disconnected"
        assert len(logged(caplog, "lost the connection to QEMU")) == 1
        assert logged(caplog, "is not available") == [
            f"QEMU at {qemu.gate_socket} is not available: Connection refused; retrying"]
        assert levels(caplog, "is not available") == ["INFO"]  # QEMU may come back
        later = await _not_connected_error(link)
        assert later.reason == "Connection refused"

        await asyncio.to_thread(qemu.start)  # a new process on the same paths
        await connected(link)
        assert await link.execute("query-migrate") == {}  # the new QEMU has no blocker
    assert rec.states == ["connected", "disconnected", "connected", "closed"]
    assert len(logged(caplog, "connected to QEMU")) == 2


async def test_a_reply_too_long_to_read_is_named_and_the_link_reconnects(
        qemu_factory: Callable[..., Qemu], caplog: pytest.LogCaptureFixture) -> None:
    # HMP's xp prints 29.5 bytes per 8-byte word of guest memory: 2,300,000 words are a
    # 67.8 MB reply, past READ_LIMIT (64 MiB); 450,000 are 13 MB, past qemu.qmp's 10 MiB.
    qemu = qemu_factory(memory="128M")
    path = qemu.gate_socket
    async with running_link(path, timeout=0) as (link, rec):
        await connected(link)
        dump = await link.execute("human-monitor-command", {"command-line": "xp /450000xg 0"})
        assert isinstance(dump, str) and len(dump) > 10 << 20
        big = asyncio.create_task(
            link.execute("human-monitor-command", {"command-line": "xp /2300000xg 0"}))
        after = asyncio.create_task(link.execute("query-status"))  # sent after it
        with pytest.raises(QemuInterrupted) as own:
            await big
        assert str(own.value) == (
            "QEMU's reply to 'human-monitor-command' was larger than 67108864 bytes, the "
            f"most migblockd reads from QEMU: migblockd dropped the connection to QEMU's "
            f"monitor at '{path}' and reconnects; QEMU did run the command")
        with pytest.raises(QemuInterrupted) as other:
            await after
        assert str(other.value) == (
            f"migblockd dropped the connection to QEMU's monitor at '{path}' before QEMU "
            "replied to 'query-status': QEMU's reply to 'human-monitor-command' was larger "
            "than 67108864 bytes (a command sent before it), the most migblockd reads from "
            "QEMU; it reconnects")
        await wait_until(lambda: rec.states == ["connected", "disconnected", "connected"],
                         "the link connected again")
        assert await link.execute("query-status") == {"status": "prelaunch",
                                                       "singlestep": False, "running": False}
    assert logged(caplog, "lost the connection") == [
        f"lost the connection to QEMU at {path}: QEMU's reply to 'human-monitor-command' "
        "was larger than 67108864 bytes, the most migblockd reads from QEMU; migblockd "
        "dropped the connection; reconnecting"]


async def _not_connected_error(link: QemuLink) -> QemuNotConnected:
    with pytest.raises(QemuNotConnected) as exc:
        await link.execute("query-migrate")
    return exc.value


async def test_link_started_before_qemu_connects_when_it_appears(
        qemu_factory: Callable[..., Qemu], caplog: pytest.LogCaptureFixture) -> None:
    qemu = qemu_factory(start=False)
    async with running_link(qemu.gate_socket, min_delay=0.01, max_delay=0.05) as (link, rec):
        await wait_until(lambda: link.attempts >= 5, "five failed connection attempts")
        assert link.state == "disconnected" and rec.states == []
        error = await _not_connected_error(link)
        assert str(error) == (f"Not connected to QEMU's monitor at '{qemu.gate_socket}': "
                              "No such file or directory")
        assert logged(caplog, "is not available") == [
            f"QEMU at {qemu.gate_socket} is not available: No such file or directory; retrying"]
        assert levels(caplog, "is not available") == ["INFO"]  # QEMU is yet to start
        await asyncio.to_thread(qemu.start)
        await connected(link)
        assert await link.execute("query-migrate") == {}
    assert rec.states == ["connected", "closed"]


@pytest.mark.parametrize(("make", "kind"), [
    (lambda path: path.write_text("not QEMU\n"), "a regular file"),
    (lambda path: path.mkdir(), "a directory"),
])
async def test_a_path_that_is_not_a_socket_is_named_so_not_a_qemu_that_is_down(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, make: Callable[[Path], object],
        kind: str) -> None:
    """Reported: "Connection refused", the kernel's answer for a path that is not a
    socket as for a socket nobody listens on, which reads as "QEMU is down"."""
    path = tmp_path / "vm1.qmp"
    make(path)
    async with running_link(path, min_delay=0.01, max_delay=0.05) as (link, _):
        await wait_until(lambda: link.attempts >= 3, "three attempts")
        with pytest.raises(QemuNotConnected) as refused:
            await link.execute("query-migrate")
        assert str(refused.value) == (
            f"Not connected to QEMU's monitor at '{path}': not a socket ({kind})")
    assert logged(caplog, "not available") == [
        f"QEMU at {path} is not available: not a socket ({kind}); retrying"]
    # No QEMU will ever answer there: at info level, --log-level warning said nothing.
    assert levels(caplog, "not available") == ["WARNING"]


async def test_link_waits_while_another_client_holds_the_monitor(
        qemu: Qemu, caplog: pytest.LogCaptureFixture) -> None:
    other = await RawClient.connect(qemu.gate_socket)
    try:
        async with running_link(qemu.gate_socket, greeting_notice=0.2) as (link, _):
            await wait_until(lambda: logged(caplog, "has not greeted"), "greeting notice")
            assert link.state == "disconnected"
            # Reported: "Connection refused", as if QEMU were not running.
            with pytest.raises(QemuNotConnected) as refused:
                await link.execute("query-migrate")
            assert str(refused.value) == (
                f"Not connected to QEMU's monitor at '{qemu.gate_socket}': QEMU accepted the "
                "connection but has not greeted yet (QEMU serves one client per monitor: is "
                "another one connected?)")
            await other.close()  # QEMU now greets the link, which was waiting
            await connected(link)
            assert await link.execute("query-migrate") == {}
    finally:
        await other.close()


async def test_a_silent_qemu_is_not_said_to_serve_another_client_before_the_notice(
        qemu: Qemu) -> None:
    """Reported: a QEMU that had just accepted the link's connection (restarted a moment
    ago, or stopped) was said to serve another client at once, with nobody else
    connected.  That guess comes with the greeting notice, not before."""
    assert qemu.proc is not None
    qemu.stop()  # accepts (the kernel's backlog), never greets
    try:
        async with running_link(qemu.gate_socket, greeting_notice=600) as (link, _):
            await wait_until(lambda: link.awaiting_greeting, "connection accepted")
            with pytest.raises(QemuNotConnected) as refused:
                await link.execute("query-migrate")
            assert str(refused.value) == (
                f"Not connected to QEMU's monitor at '{qemu.gate_socket}': QEMU accepted the "
                "connection but has not greeted yet")
            qemu.proc.send_signal(signal.SIGCONT)
            await connected(link)
    finally:
        qemu.proc.send_signal(signal.SIGCONT)


def drain(fd: int) -> None:
    """Read the pipe ``fd`` to its end."""
    os.set_blocking(fd, True)
    while os.read(fd, 1 << 20):
        pass


async def test_a_greeted_qemu_whose_main_loop_is_busy_is_not_said_to_serve_another_client(
        qemu_factory: Callable[..., Qemu], caplog: pytest.LogCaptureFixture) -> None:
    """Reported: "has not greeted (... is another one connected?)" for a QEMU that had
    greeted, its main loop busy (here dumping the guest's memory into a pipe nobody
    reads): the monitor's I/O thread greets, the main loop answers qmp_capabilities."""
    qemu = qemu_factory(memory="64M")
    fifo = qemu.workdir / "dump.fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # QEMU's open() of it returns at once
    try:
        async with qemu.monitor() as mon:
            await mon.send({"execute": "dump-guest-memory",
                            "arguments": {"paging": False, "protocol": f"file:{fifo}"}})
            # The dump has begun: the main loop writes 64 MiB into a pipe that holds 64 kiB.
            await wait_until(lambda: select.select([fd], [], [], 0)[0], "the dump writing")
            async with running_link(qemu.gate_socket, greeting_notice=0.2) as (link, _):
                await wait_until(lambda: logged(caplog, "has not answered qmp_capabilities"),
                                 "the notice")
                with pytest.raises(QemuNotConnected) as refused:
                    await link.execute("query-migrate")
                assert str(refused.value) == (
                    f"Not connected to QEMU's monitor at '{qemu.gate_socket}': QEMU has "
                    "greeted but does not answer qmp_capabilities (its main loop is busy or "
                    "stopped)")
                assert link.awaiting_greeting  # QEMU is there
                await asyncio.to_thread(drain, fd)
                await connected(link)
    finally:
        os.close(fd)
    assert logged(caplog, "has not answered qmp_capabilities") == [
        f"QEMU at {qemu.gate_socket} greeted but has not answered qmp_capabilities after "
        "0.2 s (its main loop is busy or stopped); still waiting"]
    assert not logged(caplog, "greeted after")


@contextlib.asynccontextmanager
async def stopping_relay(qemu: Qemu, marker: bytes) -> AsyncIterator[Path]:
    """A socket that relays to QEMU's gate monitor, and stops QEMU (SIGSTOP) when the
    link's bytes it relays hold ``marker``, before QEMU reads them: QEMU stopped at a
    step of the link's set-up that no signal could be timed to."""
    path = qemu.workdir / "relay.sock"

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   stop: bool) -> None:
        while data := await reader.read(1 << 20):
            if stop and marker in data:
                qemu.stop()
            writer.write(data)
            await writer.drain()
        writer.close()

    writers: list[asyncio.StreamWriter] = []
    relays: list[asyncio.Future[tuple[BaseException | None, BaseException | None]]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(qemu.gate_socket))
        writers.extend((writer, up_writer))
        both = asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False),
                              return_exceptions=True)
        relays.append(both)
        await both

    server = await asyncio.start_unix_server(relay, str(path))
    try:
        yield path
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await asyncio.gather(*relays)
        await server.wait_closed()


async def test_a_qemu_that_stops_before_it_answers_query_qmp_schema_is_said_to(
        qemu: Qemu, caplog: pytest.LogCaptureFixture) -> None:
    """Reported: QEMU stopped (or its main loop busy) after it answered qmp_capabilities
    and before query-qmp-schema: the link waited for ever, with no line in the log, and
    clients were told that migblockd "is still reading its commands"."""
    assert qemu.proc is not None
    try:
        async with stopping_relay(qemu, b"query-qmp-schema") as path, \
                running_link(path, greeting_notice=0.2) as (link, _):
            await wait_until(lambda: logged(caplog, "query-qmp-schema after"), "the notice")
            with pytest.raises(QemuNotConnected) as refused:
                await link.execute("query-migrate")
            assert str(refused.value) == (
                f"Not connected to QEMU's monitor at '{path}': QEMU has greeted but does "
                "not answer query-qmp-schema (its main loop is busy or stopped)")
            assert link.awaiting_greeting  # QEMU is there
            qemu.proc.send_signal(signal.SIGCONT)
            await connected(link)
    finally:
        qemu.proc.send_signal(signal.SIGCONT)
    assert logged(caplog, "query-qmp-schema after") == [
        f"QEMU at {path} has not answered query-qmp-schema after 0.2 s (its main loop is "
        "busy or stopped); still waiting"]
    assert levels(caplog, "query-qmp-schema after") == ["WARNING"]
    assert not logged(caplog, "has not greeted")


@pytest.mark.parametrize(("option", "why"), [
    # Reported: "Did not understand Greeting: Failed to deserialize QMP message.",
    # then, on a line of its own, the bytes it could not read.
    ("-qmp-pretty", "QEMU's monitor pretty-prints its JSON (-qmp-pretty, or -mon pretty=on), "
     "which migblockd cannot read: give migblockd a monitor without it"),
    # -monitor instead of -qmp, an easy slip: reported as "Did not understand
    # Greeting: Failed to deserialize QMP message. raw bytes were: b"QEMU 7.2.22
    # monitor - type 'help' for more information\\r\\n"".
    ("-monitor", "this is QEMU's human monitor (HMP: -monitor, or -mon mode=readline), not "
     "QMP: give migblockd a -qmp monitor"),
])
async def test_a_monitor_migblockd_cannot_read_is_named_as_the_reason_in_one_line(
        qemu_factory: Callable[..., Qemu], caplog: pytest.LogCaptureFixture,
        option: str, why: str) -> None:
    qemu = qemu_factory(start=False)
    path = qemu.workdir / "other.sock"
    qemu.args = (option, f"unix:{path},server=on,wait=off")
    qemu.start()
    async with running_link(path, min_delay=0.01, max_delay=0.05) as (link, _):
        await wait_until(lambda: link.attempts >= 3, "three attempts")
        with pytest.raises(QemuNotConnected) as refused:
            await link.execute("query-migrate")
        assert str(refused.value) == f"Not connected to QEMU's monitor at '{path}': {why}"
    assert logged(caplog, "not available") == [
        f"QEMU at {path} is not available: {why}; retrying"]
    assert levels(caplog, "not available") == ["WARNING"]  # a wrong --qemu, for good


@pytest.mark.parametrize(("first", "why"), [
    # Reported: "Did not understand Greeting: Failed to deserialize QMP message. raw
    # bytes were: b'SSH-2.0-OpenSSH_9.2\\r\\n'", at info level, as for a QEMU not
    # started yet.
    (b"SSH-2.0-OpenSSH_9.2\r\n", "what listens there is not a QMP monitor (its first "
     "line, b'SSH-2.0-OpenSSH_9.2\\r\\n', is not QEMU's greeting): give migblockd the "
     "socket of QEMU's -qmp"),
    # Reported: "Did not understand Greeting: \"'Greeting' object requires 'QMP'
    # member\"".
    (b'{"hello": 1}\r\n', "what listens there is not a QMP monitor (its first "
     "message is JSON, but not QEMU's greeting): give migblockd the socket of QEMU's "
     "-qmp"),
], ids=["an SSH banner", "JSON that is not QMP"])
async def test_a_listener_that_is_not_a_qmp_monitor_is_named_so_and_warned_of(
        short_tmp: Path, caplog: pytest.LogCaptureFixture, first: bytes, why: str) -> None:
    """--qemu naming the socket of another service (a typo, another VM's serial console
    or agent channel): a warning saying what is wrong, not qemu.qmp's parser error."""

    async def not_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()
        writer.close()

    path = short_tmp / "not-qemu.sock"
    server = await asyncio.start_unix_server(not_qemu, path)
    try:
        async with running_link(path, min_delay=0.01, max_delay=0.05) as (link, _):
            await wait_until(lambda: link.attempts >= 3, "three attempts")
            with pytest.raises(QemuNotConnected) as refused:
                await link.execute("query-migrate")
            assert str(refused.value) == f"Not connected to QEMU's monitor at '{path}': {why}"
    finally:
        server.close()
        async with asyncio.timeout(10):
            await server.wait_closed()
    assert logged(caplog, "not available") == [
        f"QEMU at {path} is not available: {why}; retrying"]
    assert levels(caplog, "not available") == ["WARNING"]


async def test_close_interrupts_a_command_in_flight(qemu: Qemu) -> None:
    assert qemu.proc is not None
    async with running_link(qemu.gate_socket) as (link, _):
        await connected(link)
        os.kill(qemu.proc.pid, signal.SIGSTOP)  # QEMU will not reply
        try:
            pending = asyncio.create_task(link.execute("query-migrate"))
            for _ in range(10):
                await asyncio.sleep(0)
            assert not pending.done()
            await link.close()
            with pytest.raises(QemuInterrupted, match=str(qemu.gate_socket)):
                await pending
        finally:
            os.kill(qemu.proc.pid, signal.SIGCONT)
        assert link.state == "closed"
        error = await _not_connected_error(link)
        assert error.reason == "the link is closed"


# migblockd's own commands (the query-migrate and query-status it sends when QEMU
# connects) have no client: the warning said "the client was told" all the same.
@pytest.mark.parametrize(("for_client", "whose"), [
    (True, "the client's command that sent it failed"), (False, "migblockd sent it for itself")],
    ids=["client's", "migblockd's own"])
async def test_a_stopped_qemu_times_out_and_the_link_stays_connected(
        qemu: Qemu, caplog: pytest.LogCaptureFixture, for_client: bool, whose: str) -> None:
    assert qemu.proc is not None
    async with running_link(qemu.gate_socket, timeout=0.5) as (link, rec):
        await connected(link)
        qemu.proc.send_signal(signal.SIGSTOP)  # QEMU will not reply
        try:
            with pytest.raises(QemuTimedOut) as late:
                await asyncio.wait_for(
                    link.execute("query-migrate", for_client=for_client), 30)
            assert isinstance(late.value, QemuLinkError)
            assert str(late.value) == (f"QEMU's monitor at '{qemu.gate_socket}' did not "
                                       "answer 'query-migrate' within 0.5 s; it may still run it")
            assert logged(caplog, "did not answer") == [
                f"QEMU at {qemu.gate_socket} did not answer 'query-migrate' within 0.5 s "
                f"(stopped, or busy with a long command?); {whose}, QEMU may still run it; "
                "further commands it leaves unanswered are not logged until it answers"]
            assert link.silent == "query-migrate"
            assert link.state == "connected"  # not a lost connection
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        # QEMU now sends the late reply (dropped: its id is no longer awaited), then this
        # one's: each reply still goes to its own command.
        assert await link.execute("query-version") == link.version
        assert link.silent is None
        assert logged(caplog, "answers again") == [
            f"QEMU at {qemu.gate_socket} answers again (it had not answered "
            "'query-migrate' within 0.5 s)"]
        assert await link.execute("query-migrate") == {}
        assert link.state == "connected"
        assert len(logged(caplog, "did not answer")) == 1
    assert rec.states == ["connected", "closed"]
    # The late reply did arrive after the timeout, and only the trace says so.
    ours = [r.getMessage() for r in caplog.records if r.name == "migblockd.qemu"]
    after = ours[next(i for i, m in enumerate(ours) if "did not answer" in m):]
    replies = [m for m in after if " <- " in m and '"return"' in m]
    assert len(replies) == 3, after  # the late query-migrate, query-version, query-migrate


async def test_a_timeout_of_zero_waits_forever(qemu: Qemu) -> None:
    assert qemu.proc is not None
    async with running_link(qemu.gate_socket, timeout=0) as (link, _):
        await connected(link)
        qemu.proc.send_signal(signal.SIGSTOP)
        try:
            pending = asyncio.create_task(link.execute("query-migrate"))
            await asyncio.sleep(0.5)
            assert not pending.done()
        finally:
            qemu.proc.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(pending, 30) == {}


def test_link_lifecycle_on_every_python(python: str, qemu: Qemu) -> None:
    """Connect, lose QEMU, reconnect, close: under 3.11, 3.12 and 3.13, in asyncio's debug
    mode, with nothing on stderr but the link's own log lines."""
    script = Path(__file__).with_name("qemu_link_scenario.py")
    proc = subprocess.Popen([python, "-X", "dev", str(script), str(qemu.gate_socket)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == "connected\n", first + proc.communicate(timeout=60)[1]
        qemu.restart()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "CommandNotFound: The command no-such-command has not been found",
        "query-migrate: {}",
        "states: connected disconnected connected closed",
    ], err
    for line in err.splitlines():
        assert line.startswith("migblockd.qemu "), err
    for marker in ("Traceback", "never retrieved", "was destroyed"):
        assert marker not in err, err
    assert "connected to QEMU" in err and "lost the connection" in err

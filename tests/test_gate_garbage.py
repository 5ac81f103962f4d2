"""What the gate does with a message from its QMP peer that is no QMP: garbage, or a
number that strict JSON does not have.

A real QEMU sends neither, so a relay stands between migblockd and a real QEMU 7.2: it
passes QEMU's messages on as they are, but for the reply to a command it is told to
spoil (sent in its place, held until the test lets it go) and the lines the test
has it send between QEMU's.  It runs on a thread of its own: the test's waits for
the daemon's log block the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log
from fakeqmp import Line, serving
from qemu_strings import GENERIC, SEV, error
from realqemu import Qemu, wait_until

#: QEMU's query-qmp-schema answer is some 200 kB: lines of up to this are relayed.
LINE_LIMIT = 1 << 24


class Relay:
    """A QMP peer at ``path`` that is QEMU's monitor at ``qemu``, relayed (see the
    module doc); one connection at a time, as QEMU serves."""

    def __init__(self, path: Path, qemu: Path) -> None:
        self.path = path
        self.qemu = qemu
        #: The commands migblockd sent, by name, in order, over every connection.
        self.commands: list[str] = []
        #: Command -> the line sent in place of QEMU's reply to it (``ID``: its id).
        self.spoil: dict[str, bytes] = {}
        #: Set: a spoiled reply is sent (it waits until then).
        self.release = threading.Event()
        self._spoiled: set[str] = set()
        self._to_migblockd: asyncio.StreamWriter | None = None
        self.loop = asyncio.new_event_loop()
        self._serving: set[asyncio.Task[Any]] = set()

    def send(self, line: bytes) -> None:
        """Send ``line`` to migblockd now, between two of QEMU's messages."""
        writer = self._to_migblockd
        assert writer is not None, "migblockd is not connected"
        self.loop.call_soon_threadsafe(writer.write, line + b"\r\n")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        qemu_reader, qemu_writer = await asyncio.open_unix_connection(self.qemu,
                                                                      limit=LINE_LIMIT)
        self._to_migblockd = writer
        down = asyncio.ensure_future(self._down(qemu_reader, writer))
        try:
            await self._up(reader, qemu_writer)
        finally:
            qemu_writer.close()
            down.cancel()
            await asyncio.wait({down})
            writer.close()
            self._serving.discard(task)

    async def stop(self) -> None:
        """Every connection ended."""
        self.release.set()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        await self.loop.shutdown_default_executor()

    async def _up(self, reader: asyncio.StreamReader, qemu: asyncio.StreamWriter) -> None:
        # qemu.qmp ends its messages with no line feed: a stream of JSON objects.
        decoder, pending = json.JSONDecoder(), ""
        while data := await reader.read(65536):
            qemu.write(data)
            pending += data.decode()
            while pending.strip():
                try:
                    msg, end = decoder.raw_decode(pending.lstrip())
                except ValueError:
                    break  # not whole yet
                pending = pending.lstrip()[end:]
                self.commands.append(msg["execute"])
                if msg["execute"] in self.spoil:
                    self._spoiled.add(json.dumps(msg["id"]))

    async def _down(self, qemu: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while line := await qemu.readline():
                msg_id = json.dumps(json.loads(line).get("id"))
                if msg_id in self._spoiled:
                    self._spoiled.discard(msg_id)
                    await asyncio.to_thread(self.release.wait)
                    line = self.spoil_line(msg_id) + b"\r\n"
                writer.write(line)
                await writer.drain()

    def spoil_line(self, msg_id: str) -> bytes:
        (template,) = set(self.spoil.values())
        return template.replace(b"ID", msg_id.encode())


@contextlib.asynccontextmanager
async def relaying(path: Path, qemu: Qemu) -> AsyncIterator[Relay]:
    """A :class:`Relay` at ``path`` in front of ``qemu``, on a thread of its own."""
    relay = Relay(path, qemu.gate_socket)
    stop = asyncio.Event()  # the relay loop's
    listening = threading.Event()

    async def run() -> None:
        server = await asyncio.start_unix_server(relay.serve, path, limit=LINE_LIMIT)
        listening.set()
        await stop.wait()
        server.close()
        await relay.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await server.wait_closed()

    thread = threading.Thread(target=relay.loop.run_until_complete, args=(run(),))
    thread.start()
    try:
        listening.wait(10)
        yield relay
    finally:
        relay.loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join)
        relay.loop.close()


def gate(start_daemon: Callable[..., DaemonProcess], relay: Relay, tmp_path: Path,
         *args: str) -> DaemonProcess:
    config = tmp_path / "gate.toml"
    config.write_text('qemu-passthrough = ["human-monitor-command"]\n')
    return start_daemon("--qemu", str(relay.path), "--config", str(config), *args)


def connections(d: DaemonProcess) -> int:
    return d.log().count("connected to QEMU 7.")


INFO_STATUS = {"command-line": "info status"}


@pytest.mark.parametrize(("spoiled", "why"), [
    (b'{"return": {"size": 1e400}, "id": ID}', "not strict JSON (1e400 is out of a "
     "double's range), b'{\"return\": {\"size\": 1e400}, \"id\": "),
    (b'{"return": NaN, "id": ID}', "not strict JSON (NaN is not a JSON number), "
     "b'{\"return\": NaN, \"id\": "),
    (b'{"return": {}, "id": ID,}', "not JSON, b'{\"return\": {}, \"id\": "),
])
async def test_a_reply_that_is_no_strict_json_drops_the_connection_as_garbage(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
    tmp_path: Path, spoiled: bytes, why: str,
) -> None:
    """Reported: a reply with 1e400 in it (read by Python's json as inf) was taken in
    and failed as it was sent on: "Internal error" for the client, and a traceback
    in the log. It is garbage, as QEMU's parser and migblockd's clients see it."""
    async with relaying(short_tmp / "relay.sock", qemu) as relay:
        relay.spoil["human-monitor-command"] = spoiled
        relay.release.set()
        d = gate(start_daemon, relay, tmp_path)
        await wait_until(lambda: connections(d) == 1, "migblockd connected")
        async with d.client() as c:
            reply = await c.execute("human-monitor-command", INFO_STATUS, id=1)
            assert reply == error(GENERIC, f"The connection to QEMU's monitor at "
                                  f"'{relay.path}' was lost before QEMU replied to "
                                  "'human-monitor-command'", 1)
            d.wait_for_log(f"lost the connection to QEMU at {relay.path}: QEMU sent a "
                           f"message that is {why}")
            d.wait_for_log("; migblockd dropped the connection; reconnecting")
            await wait_until(lambda: connections(d) == 2, "migblockd connected again")
            del relay.spoil["human-monitor-command"]
            reply = await c.execute("human-monitor-command", INFO_STATUS, id=2)
            assert reply == {"return": "VM status: paused (prelaunch)\r\n", "id": 2}
    assert "Internal error" not in d.log()
    assert_clean_log(d)


async def test_an_event_with_a_number_past_a_double_is_garbage_not_a_traceback(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
    tmp_path: Path,
) -> None:
    """Reported: a MIGRATION event with 1e400 in it logged an internal error and its
    traceback, and reached no client."""
    async with relaying(short_tmp / "relay.sock", qemu) as relay:
        d = gate(start_daemon, relay, tmp_path)
        await wait_until(lambda: connections(d) == 1, "migblockd connected")
        async with d.client() as c:
            relay.send(b'{"event": "MIGRATION", "data": {"status": "active"}, '
                       b'"timestamp": {"seconds": 1e400, "microseconds": 0}}')
            d.wait_for_log(f"lost the connection to QEMU at {relay.path}: QEMU sent a "
                           "message that is not strict JSON (1e400 is out of a double's "
                           "range), b'{\"event\": \"MIGRATION\", ")
            await wait_until(lambda: connections(d) == 2, "migblockd connected again")
            assert [m for m in await c.sync() if "event" in m] == []
    assert "QEMU migration status" not in d.log()  # nor taken for one
    assert_clean_log(d)


async def test_qemus_blockers_are_not_left_out_while_migblockd_reconnects_after_garbage(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
    tmp_path: Path,
) -> None:
    """Reported: after migblockd dropped its connection over a message it could not
    take, the peer, still there with its blockers, counted as away until the next
    connection was accepted: query-blockers answered without QEMU's blocker, as it
    did after a reply too long to read (fixed before)."""
    async with relaying(short_tmp / "relay.sock", qemu) as relay, \
            qemu.monitor() as mon:
        await mon.add_blocker("vdi1")
        relay.spoil["human-monitor-command"] = b"garbage"
        d = gate(start_daemon, relay, tmp_path, "--qemu-timeout", "0")
        await wait_until(lambda: connections(d) == 1, "migblockd connected")
        async with d.client() as spoiled, d.client() as c:
            await spoiled.send({"execute": "human-monitor-command", "arguments": INFO_STATUS,
                                "id": "hmp"})
            await wait_until(lambda: "human-monitor-command" in relay.commands,
                             "the command sent to QEMU")
            sent = len(relay.commands)
            # The first waits for QEMU behind it; then each as the one before is answered.
            for n in range(1, 12):
                await c.send({"execute": "query-blockers", "id": n})
            await c.send({"execute": "add-blocker", "arguments": {"reason": SEV, "id": "sev"},
                          "id": "add"})
            await wait_until(lambda: "query-migrate" in relay.commands[sent:],
                             "query-blockers' question sent to QEMU")
            relay.release.set()  # the garbage, in place of the command's reply
            reply = await spoiled.read_reply()
            assert "was lost before QEMU replied" in reply["error"]["desc"], reply
            for n in range(1, 12):
                reply = await c.read_reply()
                assert reply["id"] == n
                if "return" in reply:  # QEMU's blocker listed, never left out
                    assert [b["id"] for b in reply["return"]] == ["qemu:1"], reply
            added = await c.read_reply()
            if "return" not in added:  # not told QEMU's state yet: refused as busy
                assert added == error(GENERIC, "disallowing migration blocker (migration/"
                                      f"snapshot in progress) for: {SEV}", "add")
        d.wait_for_log(f"lost the connection to QEMU at {relay.path}: QEMU sent a message "
                       "that is not JSON, b'garbage\\r\\n'; migblockd dropped the connection")
    assert_clean_log(d)


async def test_a_peer_that_sends_garbage_on_every_connection_is_tried_again_with_backoff(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
) -> None:
    """Reported: a peer that answers every connection with garbage (here, the link's
    own query-migrate on connecting) had the link reconnect at once each time, with
    a warning each: some 27 a second. After the first, a drop in a row waits as an
    attempt that found nobody does, up to 5 s."""
    peer = short_tmp / "peer.sock"
    with serving(peer, returns={"query-migrate": Line("not JSON")}):
        d = start_daemon("--qemu", str(peer))
        for drops, wait in ((2, "0.1"), (3, "0.2"), (4, "0.4")):
            d.wait_for_log(f"QEMU at {peer}: {drops} connections in a row dropped over "
                           f"messages migblockd could not take; trying again in {wait} s")
    # Each connection after the second waited for its attempt.
    steps = ["lost" if "lost the connection" in line else "wait"
             for line in d.log().splitlines()
             if "lost the connection to QEMU" in line or "trying again in" in line]
    assert steps[:7] == ["lost", "lost", "wait", "lost", "wait", "lost", "wait"], steps
    assert_clean_log(d)


async def test_a_connection_that_served_starts_the_count_of_drops_over(
    start_daemon: Callable[..., DaemonProcess], qemu: Qemu, short_tmp: Path,
    tmp_path: Path,
) -> None:
    """Found by the review of the backoff: the count of connections dropped in a row
    was started over only by one that ended otherwise, so a QEMU whose connections
    served for hours each, and then each sent one message migblockd could not take,
    had the link wait before reconnecting from the second such drop on, and longer
    with each, up to 5 s, the link down meanwhile.  A connection that carried a message
    migblockd took once it was up is a good one: the next drop is the first again."""
    async with relaying(short_tmp / "relay.sock", qemu) as relay:
        d = gate(start_daemon, relay, tmp_path)
        async with d.client() as c:
            for n in range(1, 4):
                def up(n: int = n) -> bool:
                    return connections(d) == n

                def lost(n: int = n) -> bool:
                    return d.log().count("lost the connection to QEMU") == n

                await wait_until(up, f"connection {n}")
                # This connection serves: a client's command is answered through it.
                reply = await c.execute("human-monitor-command", INFO_STATUS, id=n)
                assert reply == {"return": "VM status: paused (prelaunch)\r\n", "id": n}
                relay.send(b"garbage")
                await wait_until(lost, f"connection {n} lost")
            await wait_until(lambda: connections(d) == 4, "connected again")
    assert "in a row dropped" not in d.log()
    assert_clean_log(d)


@pytest.mark.parametrize("bad_id", ["[1]", '{"a": 1}', "7"])
async def test_a_reply_whose_id_migblockd_never_gave_is_ignored_with_a_warning(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path, bad_id: str,
) -> None:
    """Reported: a reply whose id was a list or an object (qemu.qmp's ids are
    strings) failed the library's look-up of it (unhashable type: 'list') and lost
    the connection, with that for a reason. It answers nothing migblockd sent:
    dropped, as QMP clients drop a reply of an unknown id, and said so."""
    peer = short_tmp / "peer.sock"
    line = f'{{"return": {{}}, "id": {bad_id}}}'
    sent = (line + "\r\n").encode()  # as the peer sends it
    with serving(peer, returns={"query-migrate": Line(line)}):
        d = start_daemon("--qemu", str(peer))
        d.wait_for_log(f"QEMU at {peer} sent a reply with an id migblockd never gave "
                       f"({sent!r}), ignored")
        assert "lost the connection" not in d.log()
        assert d.stop() == 0
    assert "unhashable" not in d.log()
    assert_clean_log(d)

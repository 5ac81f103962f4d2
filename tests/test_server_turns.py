"""The server's turns on a real event loop, with socket pairs for clients.

A lone client's request is run and answered as its bytes arrive; when a
request leaves output for other connections (events) or a change to commit,
the flush waits for the turn, so that what else arrives in the same loop
iteration goes out with it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from migblockd.adapter import READ_SIZE, ClientProtocol
from migblockd.config import Config
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.notify import Notifier
from migblockd.registry import Change, Registry
from migblockd.server import Server

CONTRACT = Contract.load()


@dataclass
class Client:
    sock: socket.socket
    buffer: bytes = b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    async def read(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` messages (replies and events)."""
        loop = asyncio.get_running_loop()
        while self.buffer.count(b"\n") < count:
            data = await loop.sock_recv(self.sock, 65536)
            assert data, "the server closed the connection"
            self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n", count)
        return [json.loads(line) for line in lines]


@dataclass
class Harness:
    server: Server
    turns: list[int] = field(default_factory=list)
    groups: list[list[Change]] = field(default_factory=list)

    async def connect(self) -> Client:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        await self.server.loop.connect_accepted_socket(
            lambda: ClientProtocol(self.server), theirs)
        client = Client(ours)
        assert "QMP" in (await client.read(1))[0]
        client.send({"execute": "qmp_capabilities"})
        assert await client.read(1) == [{"return": {}}]
        return client


async def harness(durable: bool) -> Harness:
    registry = Registry(CONTRACT.enums["MigMode"], migration_time=1.0)
    core = Core(CONTRACT, registry, Config().limits, durable=durable)
    h: Harness

    def commit(changes: list[Change]) -> None:
        h.groups.append(changes)

    server = Server(Config(), {}, core, await Notifier.open({}),
                    commit if durable else None)
    h = Harness(server)
    turn = server._turn

    def counted() -> None:
        h.turns.append(1)
        turn()

    server._turn = counted  # type: ignore[method-assign]
    return h


@pytest.fixture
async def memory() -> AsyncIterator[Harness]:
    yield await harness(durable=False)


@pytest.fixture
async def durable() -> AsyncIterator[Harness]:
    yield await harness(durable=True)


async def test_a_lone_clients_requests_are_answered_without_waiting_for_a_turn(
        memory: Harness) -> None:
    client = await memory.connect()
    memory.turns.clear()
    for n in range(5):
        client.send({"execute": "query-version", "id": n})
        (reply,) = await client.read(1)
        assert reply["id"] == n and "qemu" in reply["return"]
    assert memory.turns == []


async def test_events_for_others_wait_for_the_turn_and_arrive_before_the_reply(
        memory: Harness) -> None:
    a, b = await memory.connect(), await memory.connect()
    memory.turns.clear()
    a.send({"execute": "add-blocker", "arguments": {"id": "x", "reason": "r"}, "id": 1})
    event, reply = await a.read(2)
    assert event["event"] == "BLOCKER_ADDED" and reply == {"return": event["data"], "id": 1}
    assert [m["event"] for m in await b.read(1)] == ["BLOCKER_ADDED"]
    assert memory.turns, "the fan-out was flushed without a turn"


async def test_pipelined_requests_of_a_lone_client_all_get_answers_in_order(
        memory: Harness) -> None:
    client = await memory.connect()
    client.sock.sendall(b"".join(
        json.dumps({"execute": "query-version", "id": n}).encode() for n in range(100)))
    replies = await client.read(100)
    assert [r["id"] for r in replies] == list(range(100))


async def test_changes_arriving_in_one_loop_iteration_share_one_commit(
        durable: Harness) -> None:
    a, b = await durable.connect(), await durable.connect()
    # Settings: durable changes that send no event, so only the commit is left
    # for the turn.  Both are sent before the loop runs again: one poll sees
    # both sockets readable.
    a.send({"execute": "migrate-set-parameters", "arguments": {"mode": "cpr-reboot"}, "id": 1})
    b.send({"execute": "migrate-set-parameters", "arguments": {"mode": "normal"}, "id": 2})
    assert await a.read(1) == [{"return": {}, "id": 1}]
    assert await b.read(1) == [{"return": {}, "id": 2}]
    assert [[(c.kind, c.new) for c in group] for group in durable.groups] == [
        [("mode", "cpr-reboot"), ("mode", "normal")]]


async def test_a_lone_change_is_committed_and_answered(durable: Harness) -> None:
    client = await durable.connect()
    client.send({"execute": "add-blocker", "arguments": {"id": "x", "reason": "r"}, "id": 1})
    event, reply = await client.read(2)
    assert event["event"] == "BLOCKER_ADDED" and reply["id"] == 1
    assert [[c.kind for c in group] for group in durable.groups] == [["add"]]


async def test_connections_read_through_one_buffer_keep_their_own_bytes(
        memory: Harness) -> None:
    # Every read lands in the server's one buffer (recv_into): what a read
    # brought must be copied out before the next read overwrites it.
    clients = [await memory.connect() for _ in range(3)]
    assert all(isinstance(p, ClientProtocol) for p in memory.server.protocols.values())
    for round_ in range(20):
        for n, client in enumerate(clients):
            # Each message arrives in two reads, the reads of all three interleaved.
            message = json.dumps({"execute": "query-version", "id": [n, round_, "x" * 300 * n]})
            client.sock.sendall(message[:150].encode())
        await asyncio.sleep(0)
        for n, client in enumerate(clients):
            message = json.dumps({"execute": "query-version", "id": [n, round_, "x" * 300 * n]})
            client.sock.sendall(message[150:].encode())
        for n, client in enumerate(clients):
            (reply,) = await client.read(1)
            assert reply["id"] == [n, round_, "x" * 300 * n]
    assert memory.server.read_buffer.nbytes == READ_SIZE

"""A deliberately plain QMP client for integration tests: raw bytes in and out.

It checks nothing itself, so tests see exactly what the daemon sent.  Tests open
it with ``async with qmp_client(path) as c:`` (or ``daemon.client()``), which
closes the connection however the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

TIMEOUT = 10.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


def strict_loads(data: bytes | str) -> Any:
    """``json.loads`` that refuses what strict JSON refuses (``NaN``, ``Infinity``)."""
    return json.loads(data, parse_constant=_reject_constant)


def ordered_keys(line: bytes) -> list[str]:
    """The top-level member names of one JSON object, in the order they were sent."""
    keys: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys[:] = [k for k, _ in pairs]  # the outermost object is decoded last
        return dict(pairs)

    json.loads(line, object_pairs_hook=hook, parse_constant=_reject_constant)
    return keys


def encode(obj: Any) -> bytes:
    """One request as compact JSON bytes, no newline (as ``qemu.qmp`` sends it)."""
    return json.dumps(obj, separators=(",", ":")).encode()


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._ids = 0

    @classmethod
    async def connect(cls, path: Path, *, negotiate: bool = True,
                      read_greeting: bool = True) -> RawClient:
        """Connect; read the greeting and negotiate unless told not to.

        ``read_greeting=False`` leaves every byte, the greeting included, to the test.
        """
        assert read_greeting or not negotiate, "cannot negotiate before the greeting"
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        client = cls(reader, writer)
        if read_greeting:
            client.greeting = await client.read()
        if negotiate:
            reply = await client.execute("qmp_capabilities")
            assert reply == {"return": {}}, reply
        return client

    async def read_line(self, timeout: float = TIMEOUT) -> bytes:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("daemon closed the connection")
        return line

    async def read(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        line = await self.read_line(timeout)
        assert line.endswith(b"\r\n"), line
        value: dict[str, Any] = strict_loads(line)
        return value

    async def read_reply(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next message that is not an event (events are kept in ``self.events``);
        ``timeout``: how long to wait for each line."""
        while True:
            msg = await self.read(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    async def wait_event(self, name: str) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        while True:
            msg = await self.read()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)
            else:
                raise AssertionError(f"reply while waiting for {name}: {msg}")

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def send(self, obj: Any) -> None:
        self.writer.write(json.dumps(obj).encode())
        await self.writer.drain()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      **kw: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": command, **kw}
        if arguments is not None:
            msg["arguments"] = arguments
        await self.send(msg)
        return await self.read_reply()

    async def ok(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command that must succeed; return its ``return`` value."""
        reply = await self.execute(command, arguments)
        assert "return" in reply, reply
        return reply["return"]

    async def read_replies(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` messages that are not events (events go to ``self.events``)."""
        return [await self.read_reply() for _ in range(n)]

    async def read_until_reply(self, id: Any) -> list[dict[str, Any]]:
        """Every message up to and including the reply whose ``id`` is ``id``."""
        msgs: list[dict[str, Any]] = []
        while True:
            msg = await self.read()
            msgs.append(msg)
            if "event" not in msg and msg.get("id") == id:
                return msgs

    async def sync(self, marker: str = "sync") -> list[dict[str, Any]]:
        """Send ``query-version`` with id ``marker``; return what came before its reply."""
        await self.send({"execute": "query-version", "id": marker})
        msgs = await self.read_until_reply(marker)
        assert "return" in msgs[-1], msgs[-1]
        return msgs[:-1]

    async def write_eof(self) -> None:
        """Half-close: no more requests (``shutdown(SHUT_WR)``); replies can still be read."""
        await self.writer.drain()
        self.writer.write_eof()

    async def read_to_eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything the daemon sends until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        """Close the connection; closing it again does nothing."""
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def qmp_client(path: Path, *, negotiate: bool = True,
                     read_greeting: bool = True) -> AsyncIterator[RawClient]:
    """A connected client (greeted and negotiated by default), closed when the block ends."""
    client = await RawClient.connect(path, negotiate=negotiate, read_greeting=read_greeting)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def qmp_clients(path: Path, count: int, *,
                      negotiate: bool = True) -> AsyncIterator[list[RawClient]]:
    """``count`` clients connected concurrently, all closed when the block ends."""
    results = await asyncio.gather(
        *(RawClient.connect(path, negotiate=negotiate) for _ in range(count)),
        return_exceptions=True)
    clients = [c for c in results if isinstance(c, RawClient)]
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


@contextlib.asynccontextmanager
async def qemu_qmp_client(path: Path, name: str, listeners: Iterable[EventListener] = (),
                          timeout: float = TIMEOUT) -> AsyncIterator[QMPClient]:
    """The standard ``qemu.qmp`` client, connected (listeners registered first), then
    disconnected when the block ends: an independent check on the daemon."""
    client = QMPClient(name)
    for listener in listeners:
        client.register_listener(listener)
    await asyncio.wait_for(client.connect(str(path)), timeout)
    try:
        yield client
    finally:
        await client.disconnect()


def blocking_client(path: Path, *, negotiate: bool = True) -> socket.socket:
    """A plain blocking socket, greeted (and negotiated): for a client that stops reading.

    Nothing reads it behind the test's back (an asyncio stream would keep reading
    into its own buffer), so unread output really piles up at the daemon.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(str(path))
    _recv_line(sock)
    if negotiate:
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        reply = strict_loads(_recv_line(sock))
        assert reply == {"return": {}}, reply
    return sock


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError("daemon closed the connection")
        data += chunk
    return data


def recv_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything left to read until the daemon closes (or resets) the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    return data

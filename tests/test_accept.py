"""The acceptor on a real listening socket: every accepted connection gets its
protocol, on asyncio's loop (transports made directly) and on uvloop (through
``connect_accepted_socket``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import uvloop

from migblockd.accept import Acceptor


class Made(asyncio.Protocol):
    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_connections_accepted_before_close_get_their_protocols(
        tmp_path: Path, loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "s"))
        listener.listen(16)
        listener.setblocking(False)
        made: list[asyncio.BaseTransport] = []
        acceptor = Acceptor(loop, listener, lambda: Made(made), lambda: len(made))
        clients = []
        for _ in range(5):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(tmp_path / "s"))
            clients.append(client)
        acceptor._accept()  # accepts all five, as a readable listener would
        await acceptor.close()  # says: connections already accepted get their protocols
        assert len(made) == 5
        for transport in made:
            cast(asyncio.Transport, transport).write(b"hello")
        await asyncio.sleep(0.05)
        for client in clients:
            assert client.recv(16) == b"hello"
            client.close()
        for transport in made:
            transport.close()
        await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())

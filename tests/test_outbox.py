"""The outbox on a real transport (a socket pair on asyncio's loop): slices,
backpressure, and how many unread event bytes count against max-output."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from migblockd.outbox import HIGH_WATER, Outbox


@dataclass
class Pair:
    outbox: Outbox
    transport: asyncio.Transport
    peer: socket.socket

    async def read_all(self) -> bytes:
        """Read until the outbox and the transport have nothing left."""
        loop = asyncio.get_running_loop()
        data = b""
        while self.outbox.waiting or self.transport.get_write_buffer_size():
            data += await loop.sock_recv(self.peer, 1 << 20)
            self.outbox.write_some()
        while True:  # what the kernel still holds
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return data
            data += chunk


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Small kernel buffers: a few hundred KB fill them, and the rest waits.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    transport.set_write_buffer_limits(high=HIGH_WATER)
    yield Pair(Outbox(transport), transport, theirs)
    transport.abort()
    theirs.close()


def put(pair: Pair, pieces: list[bytes], events: int) -> int:
    return pair.outbox.put(pieces, sum(map(len, pieces)), events)


async def test_output_read_promptly_never_counts(pair: Pair) -> None:
    for n in range(50):
        assert put(pair, [b'{"event": "E"}\r\n', b'{"return": {}, "id": %d}\r\n' % n], 16) == 0
        data = await pair.read_all()
        assert data == b'{"event": "E"}\r\n{"return": {}, "id": %d}\r\n' % n


async def test_unread_events_count_only_from_earlier_writes(pair: Pair) -> None:
    burst = [b"e" * 1000 + b"\r\n"] * 500  # 501,000 bytes of events: more than fits
    assert put(pair, burst, 501_000) == 0  # its own events never count at once
    assert pair.outbox.waiting or pair.transport.get_write_buffer_size()
    # The next write finds the burst unread: all of it counts (nothing was read).
    assert put(pair, [b'{"return": {}}\r\n'], 0) == 501_000
    data = await pair.read_all()
    assert data == b"".join(burst) + b'{"return": {}}\r\n'
    assert put(pair, [b"x\r\n"], 3) == 0  # read: it counts no more


async def test_a_big_reply_goes_out_in_slices_as_the_peer_reads(pair: Pair) -> None:
    reply = [b"r" * 100_000 for _ in range(30)]  # 3 MB
    assert put(pair, reply, 0) == 0
    # No more than about HIGH_WATER beyond the kernel's buffers is handed over.
    assert pair.transport.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
    assert pair.outbox.waiting
    assert await pair.read_all() == b"".join(reply)

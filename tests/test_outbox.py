"""The outbox on a real transport (a socket pair on asyncio's loop): slices,
backpressure, and how many unread event bytes count against max-output."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from migblockd.outbox import BURST, HIGH_WATER, SLICE, Outbox


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
            self.outbox.write_some()
            data += await loop.sock_recv(self.peer, 1 << 20)
        while True:  # what the kernel still holds
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return data
            data += chunk


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    # Small kernel buffers: a few hundred KB fill them, and the rest waits.
    async for made in make_pair(16384):
        yield made


@pytest.fixture
async def wide_pair() -> AsyncIterator[Pair]:
    # Kernel buffers as big as the system allows (at least 400 KB or so).
    async for made in make_pair(4 << 20):
        yield made


async def make_pair(kernel_buffer: int) -> AsyncIterator[Pair]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, kernel_buffer)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, kernel_buffer)
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


async def test_events_unread_counts_all_output_so_far_until_it_is_read(pair: Pair) -> None:
    # What a client kept past max-output is judged by while nothing is written to it.
    burst = [b"e" * 1000 + b"\r\n"] * 500
    put(pair, burst, 501_000)
    assert pair.outbox.events_unread() == 501_000
    assert put(pair, [b'{"return": {}}\r\n'], 0) == 501_000
    await pair.read_all()
    assert pair.outbox.events_unread() == 0


async def test_a_big_reply_goes_out_in_slices_as_the_peer_reads(pair: Pair) -> None:
    reply = [b"r" * 100_000 for _ in range(30)]  # 3 MB
    assert put(pair, reply, 0) == 0
    # No more than about HIGH_WATER beyond the kernel's buffers is handed over.
    assert pair.transport.get_write_buffer_size() <= HIGH_WATER + 256 * 1024
    assert pair.outbox.waiting
    assert await pair.read_all() == b"".join(reply)


async def test_a_piece_bigger_than_a_slice_is_handed_over_a_slice_at_a_time(
        pair: Pair) -> None:
    # Reported: a listing's segment of 6.6 MB went to the transport whole, and
    # Python 3.11's asyncio copies what the kernel does not take into its own
    # buffer: 50 clients that never read made 300 MB of copies of one listing.
    segment = bytes(range(256)) * (3 * SLICE // 256 + 1)
    assert put(pair, [segment, b"\r\n"], 0) == 0
    assert pair.transport.get_write_buffer_size() <= SLICE
    assert pair.outbox.waiting
    assert await pair.read_all() == segment + b"\r\n"


async def test_a_peer_that_reads_as_fast_as_we_write_gets_a_slice_per_call(
        wide_pair: Pair) -> None:
    # The kernel takes more than a slice and the peer reads everything between
    # two calls, so the transport never fills: only the slice per call lets
    # the loop serve other clients in between.
    pair = wide_pair
    loop = asyncio.get_running_loop()
    per_call = BURST * (SLICE // 100_000 * 100_000)  # the pieces of BURST slices
    reply = [bytes([65 + n % 26]) * 100_000 for n in range(3 * per_call // 100_000)]
    assert put(pair, reply, 0) == 0
    data = b""
    handed = []
    while True:
        handed.append(pair.outbox.sent() + pair.transport.get_write_buffer_size())
        while len(data) < handed[-1]:  # read all of it: nothing is left to wait on
            data += await loop.sock_recv(pair.peer, 1 << 20)
        if not pair.outbox.waiting:
            break
        pair.outbox.write_some()
    assert data == b"".join(reply)
    # Each call handed over the pieces that fit BURST slices, and no more.
    steps = [b - a for a, b in zip([0, *handed], handed, strict=False)]
    assert steps == [per_call] * 3

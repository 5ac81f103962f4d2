"""Many clients at once, slow clients, pipelining clients, clients that hang up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import selectors
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, assert_clean_log, owner_info
from qemu_strings import VMDK
from qmpclient import RawClient, blocking_client, encode, recv_until_closed, strict_loads

CLIENTS = 500
SMALL_OUTPUT = 32768
DROP_LINE = re.compile(r".*max-output.*")


def send_until_stalled(s: socket.socket, payload: bytes) -> int:
    """Send ``payload`` without blocking until all is sent or nothing went for 1 s
    (the daemon stopped reading and the kernel's buffers are full); the bytes sent."""
    s.setblocking(False)
    sent, last_progress = 0, time.monotonic()
    while sent < len(payload) and time.monotonic() - last_progress < 1.0:
        try:
            sent += s.send(payload[sent : sent + 65536])
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.02)
    return sent


def send_rest_and_read(s: socket.socket, payload: bytes, sent: int, wanted: int) -> list[bytes]:
    """Send the rest of ``payload`` (from ``sent`` on) while reading, until ``wanted``
    lines that are not events came (or 60 s passed); those lines."""
    buf, lines = b"", list[bytes]()
    deadline = time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while len(lines) < wanted and time.monotonic() < deadline:
            for _key, mask in sel.select(1.0):
                if mask & selectors.EVENT_WRITE and sent < len(payload):
                    with contextlib.suppress(BlockingIOError):
                        sent += s.send(payload[sent : sent + 65536])
                if mask & selectors.EVENT_READ:
                    chunk = s.recv(1 << 20)
                    assert chunk, "the daemon closed the connection"
                    buf += chunk
                    *more, buf = buf.split(b"\r\n")
                    lines.extend(line for line in more if b'"event"' not in line)
            if sent == len(payload):
                sel.modify(s, selectors.EVENT_READ)
    return lines


async def test_500_concurrent_clients(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--log-level", "info")
    start = asyncio.Event()
    me = owner_info(os.getpid())
    # Per client: the events it received, as (name, blocker id, reason or cause).
    seen: list[list[tuple[str, str, str]]] = [[] for _ in range(CLIENTS)]

    async def work(i: int, c: RawClient) -> None:
        events = seen[i]
        await start.wait()
        c.send_raw(encode({"execute": "add-blocker", "id": f"add{i}",
                           "arguments": {"reason": f"reason {i}", "id": f"c{i}",
                                         "modes": ["normal", "cpr-exec"]}}))
        expect = f"add{i}"
        buf = b""
        # Read in large chunks: 500 clients x 1000 events is half a million lines.
        while expect or len(events) < 2 * CLIENTS:
            chunk = await asyncio.wait_for(c.reader.read(1 << 20), 60)
            if not chunk:
                raise EOFError(f"client {i}: daemon closed the connection")
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                msg = strict_loads(line)
                if "event" in msg:
                    data = msg["data"]
                    extra = data["reason"] if msg["event"] == "BLOCKER_ADDED" else data["cause"]
                    events.append((msg["event"], data["id"], extra))
                    if msg["event"] == "BLOCKER_ADDED":
                        assert data["owner"] == me and data["modes"] == ["normal", "cpr-exec"]
                    continue
                if expect == f"add{i}":
                    assert msg["id"] == expect, (i, msg)
                    info = msg["return"]
                    assert info["id"] == f"c{i}" and info["reason"] == f"reason {i}", info
                    assert info["modes"] == ["normal", "cpr-exec"] and info["owner"] == me
                    # Our own BLOCKER_ADDED came before our reply.
                    assert ("BLOCKER_ADDED", f"c{i}", f"reason {i}") in events, i
                    expect = f"del{i}"
                    c.send_raw(encode({"execute": "del-blocker", "arguments": {"id": f"c{i}"},
                                       "id": expect}))
                else:
                    assert msg == {"return": {}, "id": f"del{i}"}, (i, msg)
                    assert ("BLOCKER_DELETED", f"c{i}", "command") in events, i
                    expect = ""
        assert buf == b"", (i, buf[:200])

    async with d.clients(CLIENTS) as clients:
        tasks = [asyncio.create_task(work(i, c)) for i, c in enumerate(clients)]
        start.set()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), 180)
        finally:
            for t in tasks:
                t.cancel()
        expected_added = {("BLOCKER_ADDED", f"c{i}", f"reason {i}") for i in range(CLIENTS)}
        expected_deleted = {("BLOCKER_DELETED", f"c{i}", "command") for i in range(CLIENTS)}
        for n, events in enumerate(seen):
            assert len(events) == 2 * CLIENTS, (n, len(events))
            assert set(events) == expected_added | expected_deleted, n
            position = {(name, bid): k for k, (name, bid, _) in enumerate(events)}
            assert all(position[("BLOCKER_ADDED", f"c{b}")] < position[("BLOCKER_DELETED", f"c{b}")]
                       for b in range(CLIENTS)), n
        # Nothing more: no duplicate events pending.
        extra = await asyncio.gather(*(c.sync() for c in clients[:20]))
        assert extra == [[]] * 20
        assert await clients[0].ok("query-blockers") == []
    assert d.proc.poll() is None
    assert_clean_log(d)


async def test_client_that_never_reads(start_daemon: Callable[..., DaemonProcess]) -> None:
    # Large reasons (3.5 KB) make large events: past the default max-reason-length.
    d = start_daemon("--max-output", str(SMALL_OUTPUT), "--log-level", "info",
                     "--max-reason-length", "4096")
    slow = blocking_client(d.socket)  # negotiated, and from now on it reads nothing
    async with d.client() as actor, d.client() as reader:
        events_seen: Counter[str] = Counter()

        async def keep_reading() -> None:
            while True:
                msg = await reader.read()
                assert "event" in msg, msg
                events_seen[msg["event"]] += 1

        reading = asyncio.create_task(keep_reading())
        reason = f"{VMDK} " * 50
        rounds = 0
        try:
            while rounds < 3000:
                for _ in range(10):
                    await actor.send({"execute": "add-blocker",
                                      "arguments": {"reason": reason, "id": f"n{rounds}"},
                                      "id": rounds})
                    reply = await actor.read_reply()
                    assert reply["id"] == rounds and reply["return"]["reason"] == reason, reply
                    reply = await actor.execute("del-blocker", {"id": f"n{rounds}"})
                    assert reply == {"return": {}}, reply
                    actor.events.clear()
                    rounds += 1
                if "max-output" in d.log():
                    break
            drops = [line for line in d.log().splitlines() if DROP_LINE.match(line)]
            assert len(drops) == 1, f"after {rounds} rounds: {drops}"
            # A few more rounds: the others keep working normally.
            for k in range(20):
                info = await actor.ok("add-blocker", {"reason": "after", "id": f"after{k}"})
                assert info["id"] == f"after{k}"
                assert await actor.ok("del-blocker", {"id": f"after{k}"}) == {}
            total = 2 * (rounds + 20)
            for _ in range(1000):
                if sum(events_seen.values()) >= total:
                    break
                await asyncio.sleep(0.01)
            assert events_seen == {"BLOCKER_ADDED": rounds + 20, "BLOCKER_DELETED": rounds + 20}
            # The slow client was cut off: it gets what was buffered, then the end.
            received = await asyncio.to_thread(recv_until_closed, slow)
            assert received.count(b"\r\n") < total, "the non-reader got everything: not dropped"
            assert d.proc.poll() is None
            # Its drop was logged, and it was the only client dropped.
            assert "dropped" in drops[0] or "disconnect" in drops[0], drops
        finally:
            reading.cancel()
            slow.close()
    assert_clean_log(d)


async def test_pipelining_client_is_not_dropped(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--max-output", str(SMALL_OUTPUT), "--log-level", "info")
    async with d.client() as c:
        n = 20000
        parts = []
        for i in range(n):
            cmd = "query-qmp-schema" if i % 100 == 0 else "query-version"
            parts.append(encode({"execute": cmd, "id": i}))
        c.send_raw(b"".join(parts))
        await asyncio.sleep(1.0)  # the daemon answers while we do not read
        replies = await c.read_replies(n)
        assert [r["id"] for r in replies] == list(range(n))
        assert all("return" in r for r in replies)
        assert (await c.execute("query-version", id="last"))["id"] == "last"
    assert "max-output" not in d.log()
    assert_clean_log(d)


async def test_command_then_immediate_close_takes_effect(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as watcher:
        for i in range(20):
            _, writer = await asyncio.open_unix_connection(str(module_daemon.socket))
            writer.write(encode({"execute": "qmp_capabilities"})
                         + encode({"execute": "add-blocker",
                                   "arguments": {"reason": "hung up", "id": f"hup{i}"}}))
            writer.close()  # no read at all, not even the greeting
        got = [await watcher.wait_event("BLOCKER_ADDED") for _ in range(20)]
        assert sorted(e["data"]["id"] for e in got) == sorted(f"hup{i}" for i in range(20))
        # Only now: requests on different connections have no order (as in QEMU,
        # whose monitors are independent). A connection whose greeting could
        # not be written has its requests read once the loop reports the broken
        # pipe, which uvloop does later than asyncio.
        for i in range(20):
            _, writer = await asyncio.open_unix_connection(str(module_daemon.socket))
            writer.write(encode({"execute": "qmp_capabilities"})
                         + encode({"execute": "del-blocker", "arguments": {"id": f"hup{i}"}}))
            writer.write_eof()
            writer.close()
        gone = [await watcher.wait_event("BLOCKER_DELETED") for _ in range(20)]
        assert sorted(e["data"]["id"] for e in gone) == sorted(f"hup{i}" for i in range(20))
        assert not [b for b in await watcher.ok("query-blockers") if b["id"].startswith("hup")]


async def test_a_client_that_hangs_up_takes_turns_with_the_others_for_its_last_requests(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # Reported: the requests a client left unread when it hung up all ran in one
    # callback; 15,000 pipelined query-qmp-schema held every other client for 13 s.
    d = start_daemon("--ephemeral", "--max-blockers", "10000", "--log-level", "info")
    count = 2000
    gone = blocking_client(d.socket)
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    async with d.client() as watcher:
        d.signal(signal.SIGSTOP)  # all of it in the socket before the daemon reads any
        try:
            gone.sendall(b"".join(encode({"execute": "add-blocker", "arguments": {
                "reason": "gone", "id": f"gone{i}"}}) for i in range(count)))
            gone.close()  # the first reply finds it gone: the rest are its last words
            await watcher.send({"execute": "query-version", "id": 0})
        finally:
            d.signal(signal.SIGCONT)
        stream: list[str] = []  # the ids of its events, and "reply" for each reply
        asked = 0
        while f"gone{count - 1}" not in stream:
            message = await watcher.read()
            if "event" in message:
                stream.append(message["data"]["id"])
            else:
                stream.append("reply")
                asked += 1
                await watcher.send({"execute": "query-version", "id": asked})
        # Well past the first turn's requests, the watcher was served between them.
        first = stream.index(f"gone{count // 2}")
        assert "reply" in stream[first:], stream[first:first + 100]
    assert d.stop() == 0
    assert_clean_log(d)


async def test_half_close_still_gets_every_reply(module_daemon: DaemonProcess) -> None:
    data = b""
    for i in range(100):
        if i % 2 == 0:
            data += encode({"execute": "add-blocker",
                            "arguments": {"reason": "hc", "id": f"hc{i}"}, "id": i})
        else:
            data += encode({"execute": "del-blocker", "arguments": {"id": f"hc{i - 1}"},
                            "id": i})
    data += b"{broken}\n" + encode({"execute": "query-version", "id": "end"})
    async with module_daemon.client() as c:
        c.send_raw(data)
        await c.write_eof()
        rest = await c.read_to_eof()
    assert rest.endswith(b"\r\n")
    msgs: list[dict[str, Any]] = [strict_loads(x) for x in rest.split(b"\r\n")[:-1]]
    replies = [m for m in msgs if "event" not in m]
    assert [r.get("id", "ERR") for r in replies] == [*range(100), "ERR", "end"]
    assert all("return" in r for r in replies if "id" in r)
    assert sum(1 for m in msgs if "event" in m) == 100


async def test_many_clients_interleaved_pipelines(module_daemon: DaemonProcess) -> None:
    async def run(k: int, c: RawClient) -> None:
        data = b""
        for j in range(30):
            data += encode({"execute": "add-blocker",
                            "arguments": {"reason": f"il{k}", "id": f"il{k}x{j}"}, "id": j})
            # glue and split: send in odd-sized pieces
        for off in range(0, len(data), 97):
            c.writer.write(data[off:off + 97])
            await c.writer.drain()
        replies = await c.read_replies(30)
        assert [r["return"]["id"] for r in replies] == [f"il{k}x{j}" for j in range(30)]
        for j in range(30):
            assert await c.ok("del-blocker", {"id": f"il{k}x{j}"}) == {}

    async with module_daemon.clients(10) as clients:
        await asyncio.wait_for(asyncio.gather(*(run(k, c) for k, c in enumerate(clients))), 60)
        assert not [b for b in await clients[0].ok("query-blockers")
                    if b["id"].startswith("il")]


async def test_max_clients(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--max-clients", "2")
    async with d.client() as a, d.client() as b:
        async with d.client(negotiate=False, read_greeting=False) as extra:
            rest = await extra.read_to_eof()
        # No greeting: one error line that says why, then the daemon hangs up.
        assert [strict_loads(line) for line in rest.splitlines()] == [{"error": {
            "class": "GenericError",
            "desc": "migblockd is already serving max-clients=2 clients; try again later"}}]
        assert rest.endswith(b"\r\n")
        d.wait_for_log("refused: migblockd is already serving max-clients=2 clients")
        # The two served clients are unaffected.
        assert (await a.execute("query-version", id="a"))["id"] == "a"
        assert (await b.execute("query-version", id="b"))["id"] == "b"
        await a.close()
        d.wait_for_log("disconnected")
        async with d.client() as c:  # a slot is free again
            assert (await c.execute("query-version", id="c"))["id"] == "c"
    assert_clean_log(d)


async def refusal_read_after_sending(path: Path) -> bytes:
    """The first line a client that sends a request at once, as it connects, reads
    (with asyncio's streams, as a script would)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        await asyncio.sleep(0.05)  # the daemon has refused it by now
        return await reader.readline()
    finally:
        writer.close()


async def test_a_client_past_max_clients_that_sent_at_once_still_reads_why(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # Reported: closed with the request unread, the connection was reset, and the
    # client's stream raised ConnectionResetError (or BrokenPipeError) instead of
    # giving the line.
    d = start_daemon("--max-clients", "1")
    async with d.client():
        lines = [await refusal_read_after_sending(d.socket) for _ in range(10)]
    assert {strict_loads(line)["error"]["desc"] for line in lines} == {
        "migblockd is already serving max-clients=1 clients; try again later"}
    assert_clean_log(d)


async def test_max_clients_lowered_by_a_reload_below_those_served(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reported: a newcomer heard "already serving max-clients=2 clients" while 3 were.
    path = tmp_path / "m.toml"
    path.write_text("max-clients = 5\n")
    d = start_daemon("--config", str(path))
    async with d.client() as a, d.client() as b, d.client() as c:
        path.write_text("max-clients = 2\n")
        d.signal(signal.SIGHUP)
        d.wait_for_log("reloaded configuration: max-clients=2")
        async with d.client(negotiate=False, read_greeting=False) as extra:
            rest = await extra.read_to_eof()
        assert [strict_loads(line) for line in rest.splitlines()] == [{"error": {
            "class": "GenericError",
            "desc": "migblockd is serving 3 clients, max-clients=2; try again later"}}]
        for client in (a, b, c):  # kept, not turned out
            await client.ok("query-version")
    assert_clean_log(d)


def test_a_client_that_does_not_read_is_not_read_either(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Backpressure: the daemon stops reading a client that does not read its replies,
    so that client's requests wait in its own socket instead of the daemon's memory;
    once it reads, every request is answered, in order, and it was never dropped."""
    d = start_daemon("--log-level", "info")
    n = 60_000  # ~2.6 MB of requests, ~6 MB of replies: more than --max-output
    payload = b"".join(encode({"execute": "query-version", "id": i}) for i in range(n))
    with blocking_client(d.socket) as s:
        sent = send_until_stalled(s, payload)
        # The daemon stopped reading long before all requests were in: the
        # kernel buffers filled up and our sends stalled.
        assert sent < len(payload) // 2, sent
        # Now read (and finish sending): every reply comes, in order.
        ids = [strict_loads(line)["id"] for line in send_rest_and_read(s, payload, sent, n)]
    assert ids == list(range(n))
    assert "dropped" not in d.log()
    assert_clean_log(d)


def test_a_client_that_does_not_read_its_big_answer_is_not_read_either(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Backpressure while an answer too big for one write still waits (the outbox
    has a backlog): before, the daemon went on reading such a client, so one that
    asked for a listing and then only sent made it buffer 1.6 GB in 5 s."""
    d = start_daemon("--ephemeral", "--log-level", "info")
    reason = "x" * 1000
    with blocking_client(d.socket) as s:
        f = s.makefile("rb")
        for i in range(0, 400, 50):  # a listing of ~440 kB: more than one slice
            s.sendall(b"".join(encode({"execute": "add-blocker", "arguments": {
                "reason": reason, "id": f"big{j}"}}) for j in range(i, i + 50)))
            replies = 0
            while replies < 50:
                replies += b'"return"' in f.readline()
        f.close()
        s.sendall(b'{"execute": "query-blockers", "id": "all"}')
        time.sleep(0.2)  # its answer is written, as far as the socket takes it
        n = 400_000  # ~17 MB of requests
        payload = b"".join(encode({"execute": "query-version", "id": i}) for i in range(n))
        sent = send_until_stalled(s, payload)
        # At most a read's worth in the daemon, the rest in the kernel's buffers.
        assert sent < 4 << 20, sent
        # Now read (and finish sending what the last send cut short): the listing,
        # then a reply to every request sent, in order.
        end = payload.find(b"}", sent - 1) + 1
        count = payload.count(b"}", 0, end)
        lines = send_rest_and_read(s, payload[:end], sent, 1 + count)
    listing = strict_loads(lines[0])
    assert listing["id"] == "all" and len(listing["return"]) == 400
    assert [strict_loads(line)["id"] for line in lines[1:]] == list(range(count))
    assert "dropped" not in d.log()
    assert_clean_log(d)

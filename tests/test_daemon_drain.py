"""Shutdown answers everyone, and a dropped client's last words still count.

Reproduced before: SIGTERM while 50 clients pipelined adds dropped 45 of them
for ``--max-output`` during shutdown, and 79,884 executed requests got no
reply; a client dropped for ``--max-output`` had the requests still in its
socket silently discarded.

"Executed" is read from the durable state afterwards (a fresh daemon on the
same state directory), so each test compares what the clients were told with
what really happened.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import re
import select
import signal
import socket
import sqlite3
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, assert_clean_log
from qmpclient import RawClient, blocking_client, encode, strict_loads

from migblockd.adapter import LINGER
from migblockd.drain import DRAIN_POLL, SHUTDOWN_STALL
from migblockd.peer import received

ADDERS = 3
READERS = 12
#: Enough that the daemon has not read all of it when the signal comes (a read
#: takes at most 256 KiB, the socket holds about as much).
ADDS = 800
QUERIES = 3000
REASON = "pipelined " + "x" * 1000


async def stored_ids(start_daemon: Callable[..., DaemonProcess], state: Path) -> set[str]:
    """The ids of the blockers that reached the disk, as a fresh daemon restores them."""
    d = start_daemon("--state-dir", str(state), socket=state.parent / "check.sock")
    async with d.client() as c:
        ids = {b["id"] for b in await c.ok("query-blockers")}
    assert d.stop() == 0
    return ids


async def pipeline(client: RawClient, requests: list[bytes]) -> list[dict[str, object]]:
    """Send every request at once, then read every reply until the daemon closes."""
    client.send_raw(b"".join(requests))
    replies = []
    with contextlib.suppress(EOFError, ConnectionError):
        while True:
            line = await client.read_line()
            if not line.startswith(b'{"timestamp"'):  # QEMU's events start so
                replies.append(strict_loads(line))
    await client.close()  # as a client does when the daemon has hung up
    return replies


async def pipelines_cut_by_sigterm(
    start_daemon: Callable[..., DaemonProcess], state: Path,
) -> tuple[DaemonProcess, list[list[dict[str, object]]], set[int]]:
    """Adders and readers pipeline; SIGTERM comes well into the pipelines.

    Returns the daemon (exited), each client's replies (adders first) and the
    adders (0 to ADDERS - 1) dropped for ``--max-output`` before the signal.
    """
    # A small max-output: before, shutdown ran every pending request at once and
    # dropped whoever that left with more unread events than this.
    d = start_daemon("--state-dir", str(state), "--max-output", "65536", "--log-level", "info",
                     socket=state.parent / f"{state.name}.sock")
    adders = [await RawClient.connect(d.socket) for _ in range(ADDERS)]
    readers = [await RawClient.connect(d.socket) for _ in range(READERS)]
    jobs = [asyncio.create_task(pipeline(c, [
        encode({"execute": "add-blocker", "id": f"a{k}-{i}",
                "arguments": {"reason": REASON, "id": f"a{k}-{i}"}})
        for i in range(ADDS)])) for k, c in enumerate(adders)]
    jobs += [asyncio.create_task(pipeline(c, [
        encode({"execute": "query-version", "id": f"q{k}-{i}"}) for i in range(QUERIES)]))
        for k, c in enumerate(readers)]
    while f"added blocker a{ADDERS - 1}-" not in d.log():  # well into the pipelines
        await asyncio.sleep(0.01)
    d.signal(signal.SIGTERM)
    results = await asyncio.gather(*jobs)
    assert d.wait_exit() == 0
    for c in adders + readers:
        await c.close()
    before = d.log().split("received SIGTERM")[0]
    # Adders are clients 1 to ADDERS.
    dropped = {int(n) - 1 for n in re.findall(r"client (\d+) \([^)]*\): dropped", before)}
    return d, results, dropped & set(range(ADDERS))


async def test_sigterm_answers_every_request_read_and_drops_nobody(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Before the signal a client that falls behind may be dropped, as always.
    # A run that lost every adder so shows nothing of the drain's adds: a loaded
    # machine starving this test's reads can do that, so such a run is repeated.
    for attempt in range(3):
        state = tmp_path / f"state{attempt}"
        d, results, dropped = await pipelines_cut_by_sigterm(start_daemon, state)
        if len(dropped) < ADDERS:
            break
    assert len(dropped) < ADDERS, "every adder was dropped before the signal, three times"
    log = d.log()
    # The drain itself drops nobody.
    drain = log[log.index("received SIGTERM"):]
    assert "dropped" not in drain, drain[-3000:]
    answered_adds: set[str] = set()
    for k, replies in enumerate(results):
        # Each client's replies are a whole prefix of its requests, every one a success.
        prefix = "a" if k < ADDERS else "q"
        number = k if k < ADDERS else k - ADDERS
        assert [r.get("id") for r in replies] == [f"{prefix}{number}-{i}"
                                                   for i in range(len(replies))]
        assert all("return" in r for r in replies), [r for r in replies if "return" not in r]
        if k < ADDERS:
            answered_adds.update(str(r["id"]) for r in replies)
    # Some of the work was cut off by the signal, and some done: a real drain.
    assert 0 < len(answered_adds) < ADDERS * ADDS
    # Every add that took effect was answered, and every answered add took effect;
    # except that an adder dropped before the signal had what it had sent and we
    # had not read run all the same, unanswered, as for any dropped client
    # (ClientProtocol.drop).
    stored = await stored_ids(start_daemon, state)
    for k in range(ADDERS):
        mine = {i for i in stored if i.startswith(f"a{k}-")}
        answered = {i for i in answered_adds if i.startswith(f"a{k}-")}
        assert mine == {f"a{k}-{i}" for i in range(len(mine))}  # run in order
        if k in dropped:
            assert answered <= mine
        else:
            assert mine == answered, (k, sorted(mine ^ answered)[:5])
    assert_clean_log(d)


async def test_a_client_whose_reply_waits_for_a_slow_commit_is_not_dropped(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reported: after 2 s of shutdown such a client was dropped "for taking none
    # of its last replies", though it had none to take; its add was committed.
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state), "--log-level", "info")
    async with d.client() as c:
        # Another program holds the database's write lock: the commit waits for it
        # (SQLite's busy timeout, 5 s), longer than the drain's stall limit (2 s).
        other = sqlite3.connect(state / "state.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            await c.send({"execute": "add-blocker", "id": "t1",
                          "arguments": {"reason": "slow disk", "id": "t1"}})
            d.wait_for_log("added blocker t1")
            d.signal(signal.SIGTERM)
            d.wait_for_log("received SIGTERM")
            await asyncio.sleep(SHUTDOWN_STALL + 2 * DRAIN_POLL + 0.5)
        finally:
            other.execute("COMMIT")
            other.close()
        reply = await c.read_reply()
        assert reply["id"] == "t1" and reply["return"]["id"] == "t1", reply
    assert d.wait_exit() == 0
    assert "dropped" not in d.log()
    assert await stored_ids(start_daemon, state) == {"t1"}
    assert_clean_log(d)


async def test_signals_during_the_drain_do_not_cut_it_short(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    d = start_daemon("--state-dir", str(tmp_path / "state"), "--log-level", "info")
    client = await RawClient.connect(d.socket)
    # More replies than the socket holds, unread: the drain waits for this client.
    count = 5000
    client.send_raw(b"".join(encode({"execute": "query-version", "id": i})
                             for i in range(count)))
    d.signal(signal.SIGTERM)
    d.wait_for_log("received SIGTERM")
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        d.signal(sig)
        d.wait_for_log(f"received {sig.name} while stopping: ignored")
    replies = []
    with contextlib.suppress(EOFError, ConnectionError):
        while True:
            replies.append(strict_loads(await client.read_line()))
    await client.close()
    assert d.wait_exit() == 0
    assert not d.socket.exists()
    # Every request the daemon had read was answered before it exited.
    assert replies and [r["id"] for r in replies] == list(range(len(replies)))
    assert "dropped" not in d.log()
    assert_clean_log(d)


async def test_a_sighup_sent_with_the_sigterm_reloads_nothing(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: the SIGHUP handler stayed in place until the stop got to
    # its own, so a SIGHUP sent right after SIGTERM reloaded during the stop (and
    # told systemd RELOADING=1 after STOPPING=1).
    d = start_daemon("--state-dir", str(tmp_path / "state"), "--log-level", "info")

    def back_to_back() -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGHUP):
            d.signal(sig)
    await sighup_with_sigterm(d, back_to_back)


async def test_a_sighup_pending_with_the_sigterm_reloads_nothing(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Both pending when the daemon next runs: the kernel hands over the
    # lower-numbered SIGHUP first, so its handler runs before the SIGTERM's.
    d = start_daemon("--state-dir", str(tmp_path / "state"), "--log-level", "info")

    def both_pending() -> None:
        d.signal(signal.SIGSTOP)
        d.signal(signal.SIGTERM)
        d.signal(signal.SIGHUP)
        d.signal(signal.SIGCONT)
    await sighup_with_sigterm(d, both_pending)


async def sighup_with_sigterm(d: DaemonProcess, send: Callable[[], None]) -> None:
    """Have ``send`` signal the daemon a SIGTERM and SIGHUP(s) while a client it
    owes replies to holds the drain open; the SIGHUP must be ignored."""
    client = await RawClient.connect(d.socket)
    client.send_raw(b"".join(encode({"execute": "query-version", "id": i})
                             for i in range(5000)))  # unread: the drain waits for it
    await client.read_line()  # the daemon is at them; the rest stay unread
    send()
    d.wait_for_log("received SIGHUP while stopping: ignored")
    with contextlib.suppress(EOFError, ConnectionError):
        while True:
            await client.read_line()
    await client.close()
    assert d.wait_exit() == 0
    log = d.log()
    assert "RELOADING" not in log
    assert [line for line in log.splitlines()
            if "reload" in line and "ignored" not in line] == [], log
    assert_clean_log(d)


async def nudge_until_dropped(d: DaemonProcess) -> None:
    """Add blockers from other clients until the first client, which reads
    nothing, is dropped for the events they send it (max-output=1).

    A nudger reads, but with max-output=1 it can be dropped too, when events
    (the first client's own adds) come faster than it reads them: then the
    next nudger goes on.
    """
    first = re.compile(r"client 1 \(.*dropped: more than max-output=1 bytes")
    for i in range(1000):
        if first.search(d.log()):
            return
        with contextlib.suppress(EOFError, ConnectionError, AssertionError):
            async with d.client() as nudger:
                for j in range(100):
                    if first.search(d.log()):
                        return
                    await nudger.ok("add-blocker", {"reason": "nudge", "id": f"n{i}-{j}",
                                                    "scope": "connection"})
    raise AssertionError(f"the first client was never dropped:\n{d.log()[-3000:]}")


def send_all_it_can(sock: socket.socket, data: bytes, at_least: int = 0) -> int:
    """Send ``data`` without blocking until all is sent, the daemon takes no more
    for a while, or it hangs up; how many bytes it took.  Until ``at_least`` are
    taken, "a while" is long: a daemon slow to read its next chunk (a loaded
    machine, a slower Python) has not stopped reading."""
    sock.setblocking(False)
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < len(data):
            try:
                sent += sock.send(data[sent:sent + 65536])
            except BlockingIOError:
                patience = 10.0 if sent <= at_least else 0.5
                if not select.select([], [sock], [], patience)[1]:
                    break  # the daemon reads no more: the rest waits in its socket
    return sent


async def test_a_client_dropped_for_max_output_still_has_its_last_words_run(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state), "--max-output", "1", "--log-level", "info")
    # A client that never reads: big replies first, then adds, more than one read
    # of the daemon's (256 KiB) takes, so that some are still in its socket when
    # it is dropped.
    sock = blocking_client(d.socket)
    head = b"".join(encode({"execute": "query-qmp-schema", "id": i}) for i in range(40))
    adds = [encode({"execute": "add-blocker", "arguments": {"reason": REASON, "id": f"l{i}"}})
            for i in range(600)]
    sent = send_all_it_can(sock, head + b"".join(adds), at_least=256 * 1024)
    # The whole messages the daemon took are what it said before the drop (the
    # drop may come while it is still sending).
    said, end = set(), len(head)
    for i, message in enumerate(adds):
        end += len(message)
        if end <= sent:
            said.add(f"l{i}")
    assert sent > 256 * 1024 and said
    await nudge_until_dropped(d)  # events for it pile up until it is dropped
    d.wait_for_log("dropped: more than max-output=1 bytes of unread events")
    sock.close()
    assert d.stop() == 0
    assert_clean_log(d)
    # Everything it sent before the drop ran, though it heard none of the replies.
    assert await stored_ids(start_daemon, state) == said


async def test_what_is_past_the_bound_is_logged_not_silently_lost(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # The bound on what is read after a drop is max-message-size + 64 KiB; a client
    # that stuffed more into its socket is told of in the log.
    d = start_daemon("--max-output", "1", "--max-message-size", "4096", "--ephemeral")
    sock = blocking_client(d.socket)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    request = encode({"execute": "query-qmp-schema"})
    sent = 0
    with contextlib.suppress(BlockingIOError, OSError):
        while sent < 4 << 20:
            sent += sock.send(request * 64)
    await nudge_until_dropped(d)  # its replies wait; events pile up until it is dropped
    d.wait_for_log(" bytes it sent were left unread (past the 69632-byte bound); whatever "
                   "requests they held were not run")
    sock.close()
    assert d.stop() == 0
    assert_clean_log(d)


def test_what_is_read_after_a_drop_stops_at_the_bound() -> None:
    # Found by review: the log named a 69632-byte bound (max-message-size 4096 + 64
    # KiB), but the reads went on by whole 64 KiB chunks while any of it was left:
    # 131072 bytes were read, and their requests run.  A real socket pair, with more
    # than twice the bound in it.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        theirs.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 256 * 1024:
                sent += theirs.send(b"x" * (256 * 1024 - sent))
        assert sent > 2 * 69632, sent
        read = sum(len(data) for data in received(ours, 69632))
        left = array.array("i", [0])
        fcntl.ioctl(ours.fileno(), termios.FIONREAD, left)
    assert read == 69632 and left[0] == sent - read, (read, left[0], sent)


async def test_a_client_taking_its_last_replies_slowly_gets_them_all(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    """The drain drops a client that takes none of its last replies for 2 s.  It
    judged that by the size of the transport's buffer, which the daemon keeps as
    full as before while the client reads: a client reading steadily but slowly
    (a busy machine) was dropped as stalled, and the replies of adds that took
    effect were lost.  Then, answered in full and half-closed, the connection was
    closed 2 s later however steadily the client still read, and what the
    transport held was thrown away (seen once, on Python 3.12: the last line cut)."""
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state), "--log-level", "info")
    sock = blocking_client(d.socket)
    sock.setblocking(False)
    adds = [encode({"execute": "add-blocker", "id": f"s{i}",
                    "arguments": {"reason": REASON, "id": f"s{i}"}}) for i in range(2000)]
    send_all_it_can(sock, b"".join(adds))  # until the daemon reads no more: we do not read
    d.signal(signal.SIGTERM)
    d.wait_for_log("received SIGTERM")
    sock.setblocking(True)
    data, ended = b"", "eof"
    try:
        while chunk := sock.recv(1024):  # about 50 kB/s: several seconds of replies
            data += chunk
            await asyncio.sleep(0.02)
    except ConnectionResetError:
        ended = "reset"
    sock.close()
    assert d.wait_exit(timeout=60) == 0
    assert ended == "eof"
    assert len(data) > 200 * 1024, len(data)  # more than LINGER seconds of reading
    answered = {str(strict_loads(line)["id"]) for line in data.splitlines()
                if line.startswith(b'{"return"')}
    assert answered and await stored_ids(start_daemon, state) == answered
    assert_clean_log(d)


def test_a_client_that_takes_none_of_its_last_replies_is_dropped_and_said_so(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # Once all its replies were written, a client that read none of them was
    # closed LINGER seconds later without a word in the log, though they were
    # lost to it: the drain says so of the clients it gives up on, and so is
    # this one.
    d = start_daemon("--ephemeral")
    sock = blocking_client(d.socket)
    sock.sendall(b'{"execute": "query-version", "id": "unread"}')
    assert select.select([sock], [], [], 10)[0]  # its reply is there, and stays unread
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    # The number is the kernel's buffer memory (SIOCOUTQ), not the replies' bytes: it
    # used to read "took none of its last 1280 bytes" for about 300 bytes of replies.
    assert re.search(rf"client 1 .*dropped: took none of its last replies for {LINGER:g}s "
                     r"after our EOF \(\d+ bytes of socket buffer memory held for it\)",
                     d.log()), d.log()
    sock.close()


def test_a_client_still_sending_after_shutdown_is_waited_for(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # A client that reads nothing for a while but still sends is alive: what
    # it sends after our EOF is read away, and the connection stays until it
    # closes.  Before, it was closed LINGER seconds after the EOF, and the
    # client's next write failed.
    d = start_daemon("--ephemeral")
    sock = blocking_client(d.socket)
    failed: list[OSError] = []
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.wait(LINGER / 8):
            try:
                sock.sendall(b'{"execute": "query-version"}')
            except OSError as exc:
                failed.append(exc)
                return

    sender = threading.Thread(target=keep_sending)
    sender.start()
    d.signal(signal.SIGTERM)
    time.sleep(3 * LINGER / 2)  # nothing read meanwhile
    stop.set()
    sender.join()
    assert failed == []
    assert sock.recv(4096) == b""  # our EOF, after the replies (none were owed)
    sock.close()
    assert d.wait_exit() == 0
    assert "dropped" not in d.log()




async def test_one_sigterm_is_received_once(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: the signal caught in Python ran the stop, which set the
    # stopping handlers; the same signal's byte in the loop's wakeup descriptor,
    # read after that, ran the new handler: "received SIGTERM while stopping:
    # ignored" for a signal sent once.
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = start_daemon("--state-dir", str(tmp_path / sig.name), "--log-level", "info")
        d.signal(sig)
        assert d.wait_exit() == 0
        log = d.log()
        assert f"received {sig.name}" in log, log
        assert "while stopping" not in log, log
        assert_clean_log(d)

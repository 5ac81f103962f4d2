"""Hostile clients against the real daemon on a real socket.

After every attack: a fresh valid command still gets its reply, the daemon's
log holds no traceback, and it stops cleanly.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Callable

import pytest
from conftest import DaemonProcess, assert_clean_log
from qmpclient import blocking_client, encode, recv_until_closed

PROBE = b'{"execute": "query-version", "id": "probe"}'


async def probe(daemon: DaemonProcess) -> None:
    async with daemon.client() as c:
        reply = await c.execute("query-version", id="probe")
        assert reply["id"] == "probe" and "return" in reply, reply


async def test_random_bytes_then_reset_and_newline(module_daemon: DaemonProcess) -> None:
    rnd = random.Random(20261125)
    alphabet = b'{}[]":,\\ \n\r\t\x00\x04\x1b\xff\xfe\xc3\xa9\xed\xa0\x80\xf0\x9f' \
               b"'abcdeflnrstu0123456789-+.eE"
    words = [b'"execute"', b'"exec-oob"', b'"arguments"', b'"id"', b'"add-blocker"',
             b'"reason"', b'"query-version"', b'"qmp_capabilities"', b"NaN", b"1e400"]
    for negotiate in (False, True):
        async with module_daemon.client(negotiate=negotiate) as c:
            for _ in range(300):
                burst = b"".join(
                    rnd.choice(words) if rnd.random() < 0.1 else bytes([rnd.choice(alphabet)])
                    for _ in range(rnd.randint(1, 120))
                )
                c.send_raw(burst)
            c.send_raw(b"\x04\n" + PROBE)
            msgs = await c.read_until_reply("probe")
            for m in msgs[:-1]:
                assert "event" in m or set(m) <= {"error", "id", "return"}, m
    await probe(module_daemon)
    assert_clean_log(module_daemon)


async def test_weird_reason_round_trips_to_every_client(module_daemon: DaemonProcess) -> None:
    weird = "\x00\x1f\x7f \u2028\u2029 \ufeff \U0001f600 \\ \" / \r\n\t é"
    async with module_daemon.client() as watcher, module_daemon.client() as c:
        c.send_raw(json.dumps({"execute": "add-blocker", "id": "w1", "arguments": {
            "reason": weird, "id": "hostile-weird"}}, ensure_ascii=False).encode())
        reply = await c.read_reply()
        assert reply["return"]["reason"] == weird, reply
        event = await watcher.wait_event("BLOCKER_ADDED")
        while event["data"]["id"] != "hostile-weird":
            event = await watcher.wait_event("BLOCKER_ADDED")
        assert event["data"]["reason"] == weird
        listing = await c.ok("query-blockers")
        assert [b["reason"] for b in listing if b["id"] == "hostile-weird"] == [weird]
        assert await c.ok("del-blocker", {"id": "hostile-weird"}) == {}


async def test_hanging_and_trickling_clients_do_not_hold_up_others_or_shutdown(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon()
    hung = blocking_client(d.socket)
    hung.sendall(b'{"execute": "add-blocker", "arguments": {"reason": "half')
    trickle = blocking_client(d.socket)
    silent = blocking_client(d.socket, negotiate=False)  # never negotiates, never reads
    silent.sendall(b'{"execute": "query-qmp-schema"}' * 500)
    for b in b'{"execute": "query-version", "id": "slow"}'[:-1]:
        trickle.send(bytes([b]))
    # Connect and hang up at once, many times: nothing may leak a slot.
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        s.close()
    await probe(d)
    trickle.send(b"}")
    reply = b""
    while not reply.endswith(b"\r\n"):
        reply += trickle.recv(4096)
    assert json.loads(reply)["id"] == "slow"
    # SIGTERM while one client is mid-message and another is paused for backpressure.
    assert d.stop() == 0
    assert_clean_log(d)
    for s in (hung, trickle, silent):
        s.close()


async def test_clients_beyond_max_clients_are_refused_and_slots_come_back(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    d = start_daemon("--max-clients", "3")
    async with d.clients(3) as held:
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(10)
        extra.connect(str(d.socket))
        # Refused: no greeting, one error line saying why, then closed.
        assert recv_until_closed(extra).endswith(
            b"max-clients=3 clients; try again later\"}}\r\n")
        extra.close()
        for c in held:
            await c.close()
    # The slots are free again once the daemon has seen the three go.
    for _ in range(500):
        if d.log().count(" disconnected") >= 3:
            break
        await asyncio.sleep(0.02)
    for _ in range(3):
        await probe(d)
    assert d.stop() == 0
    assert_clean_log(d)


# --------------------------------------------------------------------------- output and logs


async def test_a_prompt_reader_is_not_dropped_for_one_large_reply(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    # 800 KiB of UTF-8 (within the 1 MiB message limit) is 2.4 MB as escaped JSON;
    # the event and the reply together pass the default max-output of 4 MiB.
    d = start_daemon("--max-reason-length", "200000")
    try:
        async with d.client() as c:
            c.send_raw(json.dumps({"execute": "add-blocker", "id": "big", "arguments": {
                "reason": "\U0001f600" * 200_000, "id": "hostile-big"}},
                ensure_ascii=False).encode())
            try:
                reply = await c.read_reply()
            except (AssertionError, EOFError, ConnectionError):
                pytest.fail("dropped while reading its reply")
            assert reply["id"] == "big" and reply["return"]["id"] == "hostile-big"
    finally:
        async with d.client() as cleanup:
            await cleanup.execute("del-blocker", {"id": "hostile-big"})


async def test_client_strings_cannot_forge_log_lines(start_daemon: Callable[..., DaemonProcess],
                                                     ) -> None:
    d = start_daemon("--log-level", "info")
    async with d.client() as c:
        forged = "x\n2026-01-01 00:00:00,000 migblockd[1] INFO: forged\nTraceback (most recent"
        await c.ok("add-blocker", {"reason": forged, "id": "forge"})
        reply = await c.execute("migrate", {"uri": "tcp:\nforged uri"})
        assert "error" in reply
    assert d.stop() == 0
    lines = d.log().splitlines()
    assert not [line for line in lines if line.startswith(("2026-01-01", "Traceback", "forged"))]


def test_encode_helper_is_compact() -> None:
    # Guard for the tests above: qmpclient.encode sends no newline, like qemu.qmp.
    assert b"\n" not in encode({"a": "\n"})


async def test_a_client_polling_a_big_listing_is_not_dropped_for_its_own_answers(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """max-output bounds the *events* a client leaves unread, not its own replies.

    A listing several times max-output, polled back to back while another client's
    adds and deletes send events to everyone: the poller reads steadily and stays.
    """
    d = start_daemon("--max-output", "200000", "--ephemeral", "--log-level", "info")
    reason = "x" * 1000
    async with d.client() as adder:
        for i in range(1000):  # ~1.1 MB of listing: five times max-output
            adder.send_raw(encode({"execute": "add-blocker",
                                   "arguments": {"reason": reason, "id": f"big{i}"}}))
        await adder.read_replies(1000)

        async def churn() -> None:
            for i in range(300):
                await adder.ok("add-blocker", {"reason": "churn", "id": f"churn{i}"})
                await adder.ok("del-blocker", {"id": f"churn{i}"})

        async with d.client() as poller:
            task = asyncio.get_running_loop().create_task(churn())
            polls = 0
            while not task.done():
                listing = await poller.ok("query-blockers")
                assert len([b for b in listing if b["id"].startswith("big")]) == 1000
                polls += 1
            await task
            assert polls >= 2
            assert await poller.ok("query-version")
    assert "dropped" not in d.log()


@pytest.mark.parametrize("bad", [
    b"}",
    b'{"execute": "query-version", "id": 0}}',
    b'{"execute": "query-version", "id": 0]',
    b'{"execute": "query-version", "id": ' + b"[" * 70 + b"]" * 70 + b"}",
], ids=["stray", "one-too-many", "mismatched", "too-deep"])
async def test_a_client_that_sends_no_newline_goes_on_after_a_bad_message(
    module_daemon: DaemonProcess, bad: bytes
) -> None:
    """qemu.qmp, and programs like it, never send a line feed: after one bad
    message the next request must still be answered, as QEMU answers it."""
    async with module_daemon.client() as c:
        c.send_raw(bad)
        await c.writer.drain()
        reply = await c.read_reply()
        if reply.get("id") == 0:  # the request before the extra "}"
            reply = await c.read_reply()
        assert "error" in reply and "id" not in reply, reply
        assert await c.execute("query-version", id="next") == {
            "return": (await c.ok("query-version")), "id": "next"}


#: Member names and values a structured fuzz draws from: the schema's own, and
#: what is wrong for them.
_NAMES = ["reason", "modes", "internal", "id", "scope", "uri", "channels", "resume",
          "enable", "capabilities", "capability", "state", "mode", "downtime-limit",
          "max-bandwidth", "channel-type", "addr", "transport", "type", "path", "x"]
_LEAVES: list[object] = [
    0, -0.0, 1, -1, 2**63, -(2**63) - 1, 2**64, 1.5, 1e300, 10**40, True, False, None,
    "", "oob", "normal", "cpr-reboot", "events", "connection", "daemon", "main", "socket",
    "unix:/x", "tcp:1:2", "file:/x", "#blocker0", "a" * 129, "\u00e9\U0001f600", "x\u0000y",
]


def _value(rnd: random.Random, depth: int = 0) -> object:
    k = rnd.random()
    if k < 0.55 or depth > 3:
        return rnd.choice(_LEAVES)
    if k < 0.75:
        return [_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    return {rnd.choice(_NAMES): _value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))}


@pytest.mark.parametrize("state", ["durable", "ephemeral"])
async def test_seeded_structured_requests_each_get_one_reply(
    start_daemon: Callable[..., DaemonProcess], state: str
) -> None:
    """Requests that are JSON objects, every command of the schema with arguments
    drawn from its members' names and values wrong and right for them, in-band and
    out-of-band, pipelined: each gets exactly one reply with its id, none an
    internal error, and the daemon goes on (a seeded sample, the same at each run).
    A daemon of its own: the blockers and settings the sample changes stay."""
    d = start_daemon("--migration-time", "0.2", *(["--ephemeral"] if state == "ephemeral" else []))
    rnd = random.Random(20261207)
    async with d.client() as c:
        commands = [entry["name"] for entry in await c.ok("query-commands")]
    for round_ in range(30):
        async with d.client(negotiate=rnd.random() < 0.9) as c:
            sent: list[str] = []
            for number in range(rnd.randint(1, 30)):
                request: dict[str, object] = {
                    "exec-oob" if rnd.random() < 0.2 else "execute":
                        rnd.choice(commands) if rnd.random() < 0.9 else _value(rnd)}
                if rnd.random() < 0.8:
                    request["arguments"] = (_value(rnd) if rnd.random() < 0.2 else {
                        rnd.choice(_NAMES): _value(rnd) for _ in range(rnd.randint(0, 4))})
                if rnd.random() < 0.05:
                    request[rnd.choice(["control", "x"])] = _value(rnd)
                sent.append(f"r{round_}.{number}")
                request["id"] = sent[-1]
                c.send_raw(json.dumps(request, ensure_ascii=rnd.random() < 0.5).encode())
            c.send_raw(PROBE)
            msgs = await c.read_until_reply("probe")
            replies = [m for m in msgs[:-1] if "event" not in m]
            assert sorted(m["id"] for m in replies) == sorted(sent), (sent, replies)
            for m in replies:
                assert "Internal error" not in m.get("error", {}).get("desc", ""), m
    await probe(d)
    assert d.stop() == 0
    assert_clean_log(d)

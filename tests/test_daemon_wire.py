"""QMP on the wire, against the real daemon on a real socket: every rule of docs/protocol.md.

The rules and strings are QEMU's (``docs/interop/qmp-spec.rst``, ``monitor/qmp.c``,
``qapi/qmp-dispatch.c``, ``qapi/qobject-input-visitor.c``, ``qobject/json-*.c``),
except where docs/protocol.md says migblockd differs; strings are exact.  Most tests
share one daemon (fresh connections, ids of their own); the limit tests start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import DaemonProcess, assert_clean_log
from qemu_strings import GENERIC, NOT_FOUND, error
from qmpclient import RawClient, encode, ordered_keys, strict_loads

import migblockd

NEGOTIATE_FIRST = "Expecting capabilities negotiation with 'qmp_capabilities'"
LIMIT_DESCS = (
    "JSON token size limit exceeded",
    "JSON token count limit exceeded",
    "JSON nesting depth limit exceeded",
)

def is_parse_error(msg: dict[str, Any]) -> bool:
    """A framing error reply: no ``id``, class GenericError, a JSON-parse desc."""
    if set(msg) != {"error"} or msg["error"].get("class") != GENERIC:
        return False
    desc = msg["error"].get("desc", "")
    return desc.startswith("JSON parse error, ") or desc in LIMIT_DESCS


async def exchange(client: RawClient, data: bytes, marker: str = "marker") -> list[dict[str, Any]]:
    """Send raw bytes followed (on a new line) by a marker command; return every
    message that came before the marker's reply, and check that reply."""
    client.send_raw(data + b"\n" + encode({"execute": "query-version", "id": marker}))
    msgs = await client.read_until_reply(marker)
    assert "return" in msgs[-1], msgs
    return msgs[:-1]


# --------------------------------------------------------------------------- greeting


async def test_greeting_shape_and_version(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client(negotiate=False, read_greeting=False) as c:
        line = await c.read_line()
        assert line.endswith(b"\r\n") and line.count(b"\n") == 1, line
        greeting = strict_loads(line)
        assert ordered_keys(line) == ["QMP"]
        qmp = greeting["QMP"]
        assert list(qmp) == ["version", "capabilities"], qmp
        assert qmp["capabilities"] == ["oob"]
        version = qmp["version"]
        assert list(version) == ["qemu", "package"], version
        assert list(version["qemu"]) == ["micro", "minor", "major"], version
        triple = version["qemu"]
        assert all(type(triple[k]) is int for k in ("major", "minor", "micro")), triple
        assert re.fullmatch(r"migblockd \d+\.\d+\.\d+", version["package"]), version
        assert version["package"] == (
            f"migblockd {triple['major']}.{triple['minor']}.{triple['micro']}"
        )
        assert version["package"] == f"migblockd {migblockd.__version__}"

        # Nothing else before we speak.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.reader.readline(), 0.3)

        c.send_raw(encode({"execute": "qmp_capabilities", "id": 1}))
        c.send_raw(encode({"execute": "query-version", "id": 2}))
        assert strict_loads(await c.read_line()) == {"return": {}, "id": 1}
        reply = strict_loads(await c.read_line())
        assert reply == {"return": version, "id": 2}


# --------------------------------------------------------------------------- negotiation


async def test_commands_before_negotiation(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client(negotiate=False) as c:
        for cmd in ("query-version", "add-blocker", "query-blockers", "no-such-command"):
            reply = await c.execute(cmd, {"reason": "r"} if cmd == "add-blocker" else None,
                                    id=cmd)
            assert reply == error(NOT_FOUND, NEGOTIATE_FIRST, cmd)
        # The refused add-blocker had no effect.
        async with module_daemon.client() as other:
            reasons = [b["reason"] for b in await other.ok("query-blockers")]
        assert "r" not in reasons
        # Envelope errors are still envelope errors.
        reply = await c.execute("query-version", foo=1, id=9)
        assert reply == error(GENERIC, "QMP input member 'foo' is unexpected", 9)
        assert await c.execute("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
        assert (await c.execute("query-version", id=1))["id"] == 1


async def test_second_qmp_capabilities(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        assert await c.execute("qmp_capabilities", id=5) == error(
            NOT_FOUND, "Capabilities negotiation is already complete, command ignored", 5)
        assert await c.execute("qmp_capabilities", {"enable": ["oob"]}, id=6) == error(
            NOT_FOUND, "Capabilities negotiation is already complete, command ignored", 6)
        # Still a working session.
        assert "return" in await c.execute("query-version", id=7)


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({"enable": ["foo"]}, "Parameter 'enable[0]' does not accept value 'foo'"),
        ({"enable": ["oob", "bar"]}, "Parameter 'enable[1]' does not accept value 'bar'"),
        ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
        ({"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
        ({"other": True}, "Parameter 'other' is unexpected"),
    ],
)
async def test_qmp_capabilities_argument_errors(
    module_daemon: DaemonProcess, arguments: dict[str, Any], desc: str
) -> None:
    async with module_daemon.client(negotiate=False) as c:
        assert await c.execute("qmp_capabilities", arguments, id="cap") == error(
            GENERIC, desc, "cap")
        # A failed negotiation negotiates nothing.
        assert await c.execute("query-version", id=2) == error(NOT_FOUND, NEGOTIATE_FIRST, 2)
        assert await c.execute("qmp_capabilities", id=3) == {"return": {}, "id": 3}


async def test_no_events_before_negotiation_and_no_backlog(
    module_daemon: DaemonProcess,
) -> None:
    async with (module_daemon.client(negotiate=False) as quiet, module_daemon.client() as actor,
                module_daemon.client() as watcher):
        await actor.ok("add-blocker", {"reason": "seen by negotiated only", "id": "nb-1"})
        await actor.ok("del-blocker", {"id": "nb-1"})
        # The negotiated watcher got both events...
        assert (await watcher.wait_event("BLOCKER_ADDED"))["data"]["id"] == "nb-1"
        assert (await watcher.wait_event("BLOCKER_DELETED"))["data"]["id"] == "nb-1"
        # ... the unnegotiated client nothing: its next line is its reply.
        await quiet.send({"execute": "query-version", "id": "q"})
        assert await quiet.read() == error(NOT_FOUND, NEGOTIATE_FIRST, "q")
        # Negotiating late brings no backlog of earlier events.
        await quiet.send({"execute": "qmp_capabilities", "id": "cap"})
        assert await quiet.read() == {"return": {}, "id": "cap"}
        await quiet.send({"execute": "query-blockers", "id": "after"})
        reply = await quiet.read()
        assert reply.get("id") == "after" and "return" in reply, reply
        # From now on it gets events.
        await actor.ok("add-blocker", {"reason": "now seen", "id": "nb-2"})
        ev = await quiet.read()
        assert ev["event"] == "BLOCKER_ADDED" and ev["data"]["id"] == "nb-2", ev
        await actor.ok("del-blocker", {"id": "nb-2"})


# --------------------------------------------------------------------------- envelope

ENVELOPE_CASES: list[tuple[bytes, dict[str, Any]]] = [
    (b"42", error(GENERIC, "QMP input must be a JSON object")),
    (b"[]", error(GENERIC, "QMP input must be a JSON object")),
    (b'[{"execute": "query-version", "id": 1}]', error(GENERIC, "QMP input must be a JSON object")),
    (b'"x"', error(GENERIC, "QMP input must be a JSON object")),
    (b"null", error(GENERIC, "QMP input must be a JSON object")),
    (b"true", error(GENERIC, "QMP input must be a JSON object")),
    (b'{"execute": 1, "id": "a"}',
     error(GENERIC, "QMP input member 'execute' must be a string", "a")),
    (b'{"execute": null, "id": [1, {"x": null}]}',
     error(GENERIC, "QMP input member 'execute' must be a string", [1, {"x": None}])),
    (b'{"execute": "query-version", "arguments": [], "id": 2}',
     error(GENERIC, "QMP input member 'arguments' must be an object", 2)),
    (b'{"execute": "query-version", "arguments": null, "id": 3}',
     error(GENERIC, "QMP input member 'arguments' must be an object", 3)),
    (b'{"execute": "query-version", "foo": 1, "id": {"deep": [1, 2]}}',
     error(GENERIC, "QMP input member 'foo' is unexpected", {"deep": [1, 2]})),
    (b'{"execute": "no-such-command", "foo": 1, "id": 4}',
     error(GENERIC, "QMP input member 'foo' is unexpected", 4)),
    (b'{"execute": "query-version", "exec-oob": "query-version", "id": 5}',
     error(GENERIC, "QMP input member 'exec-oob' is unexpected", 5)),
    (b'{"exec-oob": "query-version", "id": 6}',
     error(GENERIC, "QMP input member 'exec-oob' is unexpected", 6)),
    (b'{"id": 7}', error(GENERIC, "QMP input lacks member 'execute'", 7)),
    (b'{"id": null}', error(GENERIC, "QMP input lacks member 'execute'", None)),
    (b"{}", error(GENERIC, "QMP input lacks member 'execute'")),
    (b'{"arguments": {}, "id": 8}', error(GENERIC, "QMP input lacks member 'execute'", 8)),
    (b'{"execute": "no-such-command", "id": 9}',
     error(NOT_FOUND, "The command no-such-command has not been found", 9)),
    (b'{"execute": "query_version", "id": 10}',
     error(NOT_FOUND, "The command query_version has not been found", 10)),
    (b'{"execute": "Query-Version", "id": 11}',
     error(NOT_FOUND, "The command Query-Version has not been found", 11)),
    (b'{"execute": "migrate-cancel", "id": 12}',
     error(NOT_FOUND, "The command migrate-cancel has not been found", 12)),
    (b'{"execute": "", "id": 13}', error(NOT_FOUND, "The command  has not been found", 13)),
    # The documented order of the checks.
    (b'{"execute": 1, "arguments": 1, "foo": 1, "id": 14}',
     error(GENERIC, "QMP input member 'execute' must be a string", 14)),
    (b'{"foo": 1, "arguments": 1, "id": 15}',
     error(GENERIC, "QMP input member 'arguments' must be an object", 15)),
    (b'{"foo": 1, "id": 16}', error(GENERIC, "QMP input member 'foo' is unexpected", 16)),
    (b'{"execute": "no-such-command", "arguments": {"x": 1}, "id": 17}',
     error(NOT_FOUND, "The command no-such-command has not been found", 17)),
]


@pytest.mark.parametrize(("request_bytes", "expected"), ENVELOPE_CASES,
                         ids=[c[0].decode()[:60] for c in ENVELOPE_CASES])
async def test_envelope_errors(
    module_daemon: DaemonProcess, request_bytes: bytes, expected: dict[str, Any]
) -> None:
    async with module_daemon.client() as c:
        msgs = await exchange(c, request_bytes)
        assert msgs == [expected]


async def test_id_is_echoed_verbatim(module_daemon: DaemonProcess) -> None:
    ids: list[Any] = [0, -1, 1.5, "x", "", None, True, [], {}, [1, "a", None],
                      {"a": {"b": [1.25, False]}}, "\u00e9\u2603\U0001f600", 2**70]
    async with module_daemon.client() as c:
        for i in ids:
            reply = await c.execute("query-version", id=i)
            assert reply["id"] == i and type(reply["id"]) is type(i), reply
            reply = await c.execute("del-blocker", {"id": "nope-echo"}, id=i)
            assert reply == error(GENERIC, "Blocker 'nope-echo' not found", i)


# --------------------------------------------------------------------------- arguments

ARGUMENT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("add-blocker", {}, "Parameter 'reason' is missing"),
    ("add-blocker", {"reason": "r", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("add-blocker", {"reason": 1}, "Invalid parameter type for 'reason', expected: string"),
    ("add-blocker", {"reason": None}, "Invalid parameter type for 'reason', expected: string"),
    ("add-blocker", {"reason": "r", "internal": "yes"},
     "Invalid parameter type for 'internal', expected: boolean"),
    ("add-blocker", {"reason": "r", "internal": 1},
     "Invalid parameter type for 'internal', expected: boolean"),
    ("add-blocker", {"reason": "r", "modes": "normal"},
     "Invalid parameter type for 'modes', expected: array"),
    ("add-blocker", {"reason": "r", "modes": {"normal": True}},
     "Invalid parameter type for 'modes', expected: array"),
    ("add-blocker", {"reason": "r", "modes": ["normal", 1]},
     "Invalid parameter type for 'modes[1]', expected: string"),
    ("add-blocker", {"reason": "r", "modes": ["normal", "bogus"]},
     "Parameter 'modes[1]' does not accept value 'bogus'"),
    ("add-blocker", {"reason": "r", "modes": ["Normal"]},
     "Parameter 'modes[0]' does not accept value 'Normal'"),
    ("add-blocker", {"reason": "r", "scope": "forever"},
     "Parameter 'scope' does not accept value 'forever'"),
    ("add-blocker", {"reason": "r", "id": 5},
     "Invalid parameter type for 'id', expected: string"),
    ("del-blocker", {}, "Parameter 'id' is missing"),
    ("del-blocker", {"id": ["a"]}, "Invalid parameter type for 'id', expected: string"),
    ("query-blockers", {"mode": 3}, "Invalid parameter type for 'mode', expected: string"),
    ("query-blockers", {"mode": "all"}, "Parameter 'mode' does not accept value 'all'"),
    ("query-blockers", {"modes": ["normal"]}, "Parameter 'modes' is unexpected"),
    ("query-version", {"verbose": True}, "Parameter 'verbose' is unexpected"),
    ("migrate", {}, "need either 'uri' or 'channels' argument"),  # QEMU 10's qmp_migrate()
    ("migrate", {"channels": [{"channel-type": "main"}]},
     "Parameter 'channels[0].addr' is missing"),
    ("migrate", {"channels": [{"channel-type": "other", "addr": {}}]},
     "Parameter 'channels[0].channel-type' does not accept value 'other'"),
    ("migrate", {"uri": 7}, "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:x", "bandwidth": 1}, "Parameter 'bandwidth' is unexpected"),
    ("migrate-set-parameters", {"mode": "fast"},
     "Parameter 'mode' does not accept value 'fast'"),
    ("migrate-set-capabilities", {}, "Parameter 'capabilities' is missing"),
    ("migrate-set-capabilities", {"capabilities": {}},
     "Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-set-capabilities", {"capabilities": [1]},
     "Invalid parameter type for 'capabilities[0]', expected: object"),
    ("migrate-set-capabilities", {"capabilities": [{"state": True}]},
     "Parameter 'capabilities[0].capability' is missing"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events"}]},
     "Parameter 'capabilities[0].state' is missing"),
    ("migrate-set-capabilities",
     {"capabilities": [{"capability": "events", "state": True},
                       {"capability": "events", "state": "on"}]},
     "Invalid parameter type for 'capabilities[1].state', expected: boolean"),
    ("migrate-set-capabilities",
     {"capabilities": [{"capability": "xbzrle", "state": True}]},
     "Parameter 'capabilities[0].capability' does not accept value 'xbzrle'"),
    ("migrate-set-capabilities",
     {"capabilities": [{"capability": "events", "state": True, "extra": 1}]},
     "Parameter 'capabilities[0].extra' is unexpected"),
    # Schema order decides which error is reported: the first wrong member in
    # schema order, unexpected members only when nothing else is wrong.
    ("add-blocker", {"bogus": 1, "internal": "x", "reason": 5},
     "Invalid parameter type for 'reason', expected: string"),
    # migrate's channels come second, as in QEMU 8.2 and later.
    ("migrate", {"resume": "yes", "channels": [{"channel-type": "other", "addr": {}}]},
     "Parameter 'channels[0].channel-type' does not accept value 'other'"),
    ("migrate", {"detach": 1, "blk": 0, "channels": [{"channel-type": "main"}]},
     "Parameter 'channels[0].addr' is missing"),
    ("add-blocker", {"scope": "bad", "internal": "x", "modes": [1]},
     "Parameter 'reason' is missing"),
    ("add-blocker", {"scope": "bad", "id": 3, "internal": 1, "modes": [2], "reason": "r"},
     "Invalid parameter type for 'modes[0]', expected: string"),
    ("add-blocker", {"scope": "bad", "id": 3, "internal": 1, "reason": "r"},
     "Invalid parameter type for 'internal', expected: boolean"),
    ("add-blocker", {"scope": "bad", "id": 3, "reason": "r"},
     "Invalid parameter type for 'id', expected: string"),
    ("add-blocker", {"zzz": 0, "scope": "bad", "reason": "r"},
     "Parameter 'scope' does not accept value 'bad'"),
    ("migrate-set-capabilities",
     {"capabilities": [{"state": 1, "capability": "nope"}]},
     "Parameter 'capabilities[0].capability' does not accept value 'nope'"),
]


@pytest.mark.parametrize(("command", "arguments", "desc"), ARGUMENT_CASES,
                         ids=[f"{c}-{json.dumps(a)[:50]}" for c, a, _ in ARGUMENT_CASES])
async def test_argument_errors(
    module_daemon: DaemonProcess, command: str, arguments: dict[str, Any], desc: str
) -> None:
    async with module_daemon.client() as c:
        before = await c.ok("query-blockers")
        migration_before = await c.ok("query-migrate")
        parameters_before = await c.ok("query-migrate-parameters")
        capabilities_before = await c.ok("query-migrate-capabilities")
        reply = await c.execute(command, arguments, id=["arg", command])
        assert reply == error(GENERIC, desc, ["arg", command])
        # Errors are reported before the command has any effect.
        assert await c.ok("query-blockers") == before
        assert await c.ok("query-migrate") == migration_before
        assert await c.ok("query-migrate-parameters") == parameters_before
        assert await c.ok("query-migrate-capabilities") == capabilities_before
        assert c.events == []


# --------------------------------------------------------------------------- out-of-band


@contextlib.asynccontextmanager
async def oob_client(daemon: DaemonProcess) -> AsyncIterator[RawClient]:
    """A client that negotiated the ``oob`` capability."""
    async with daemon.client(negotiate=False) as c:
        assert await c.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        yield c


async def test_exec_oob_follows_the_schema(module_daemon: DaemonProcess) -> None:
    async with oob_client(module_daemon) as c:
        schema = await c.ok("query-qmp-schema")
        commands = {e["name"]: e for e in schema if e["meta-type"] == "command"}
        oob = {name for name, e in commands.items() if e.get("allow-oob") is True}
        assert oob == {"query-version", "query-commands", "query-qmp-schema", "query-blockers",
                       "migrate_cancel", "query-migrate", "query-migrate-parameters",
                       "query-migrate-capabilities"}
        for name in sorted(commands):
            if name == "qmp_capabilities":
                continue
            await c.send({"exec-oob": name, "id": f"oob-{name}"})
            reply = await c.read_reply()
            if name in oob:
                assert "return" in reply and reply["id"] == f"oob-{name}", reply
            else:
                assert reply == error(
                    GENERIC, f"The command {name} does not support OOB", f"oob-{name}")
        await c.send({"exec-oob": "no-such-command", "id": "x"})
        assert await c.read_reply() == error(
            NOT_FOUND, "The command no-such-command has not been found", "x")
        await c.send({"execute": "query-version", "exec-oob": "query-version", "id": "both"})
        assert await c.read_reply() == error(
            GENERIC, "QMP input member 'execute' clashes with 'exec-oob'", "both")
        await c.send({"exec-oob": 5, "id": "num"})
        reply = await c.read_reply()
        assert reply["id"] == "num" and reply["error"]["class"] == GENERIC, reply
        # exec-oob with a refused argument is an argument error as usual.
        await c.send({"exec-oob": "query-blockers", "arguments": {"mode": "x"}, "id": "arg"})
        assert await c.read_reply() == error(
            GENERIC, "Parameter 'mode' does not accept value 'x'", "arg")
        # In-band commands still work on an OOB session.
        assert (await c.execute("query-version", id="ib"))["id"] == "ib"


async def test_exec_oob_among_pipelined_in_band_commands(module_daemon: DaemonProcess) -> None:
    async with oob_client(module_daemon) as c:
        data = b"".join(encode({"execute": "query-blockers", "id": i}) for i in range(100))
        data += encode({"exec-oob": "query-migrate", "id": "oob"})
        data += b"".join(encode({"execute": "query-version", "id": i}) for i in range(100, 150))
        c.send_raw(data)
        replies = await c.read_replies(151)
        assert [r["id"] for r in replies if r["id"] != "oob"] == list(range(150))
        assert ["oob" for r in replies if r["id"] == "oob"] == ["oob"]
        assert all("return" in r for r in replies), [r for r in replies if "return" not in r]
        # Out-of-band: answered ahead of in-band requests that arrived before it
        # and were still queued (in arrival order it would be reply 100).
        position = [r["id"] for r in replies].index("oob")
        assert position < 100, position


async def test_exec_oob_looks_ahead_of_a_bounded_number_of_in_band_requests(
        module_daemon: DaemonProcess) -> None:
    # QEMU queues 8 in-band requests and stops reading while they wait
    # (QMP_REQ_QUEUE_LEN_MAX): an exec-oob behind more is not seen before they
    # run.  Parsing everything one read brought, to find it sooner, held every
    # other client for seconds when that was 256 KiB of "[]" (128 Ki messages):
    # the daemon looks 64 ahead (migblockd.qmp.session.LOOKAHEAD).
    async with oob_client(module_daemon) as c:
        c.send_raw(b"[]" * 1000 + encode({"exec-oob": "query-migrate", "id": "oob"}))
        msgs = await c.read_until_reply("oob")
        assert "return" in msgs[-1], msgs[-1]
        assert len(msgs) - 1 >= 1000 - 64, len(msgs)
        assert msgs[:-1] == [error(GENERIC, "QMP input must be a JSON object")] * (len(msgs) - 1)


# --------------------------------------------------------------------------- output format


async def test_reply_member_order_in_raw_bytes(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        await c.send({"id": 7, "execute": "query-version"})
        line = await c.read_line()
        assert ordered_keys(line) == ["return", "id"], line
        assert line.endswith(b"\r\n") and line.count(b"\n") == 1

        await c.send({"id": 8, "execute": "del-blocker", "arguments": {"id": "absent"}})
        line = await c.read_line()
        assert ordered_keys(line) == ["id", "error"], line
        err = strict_loads(line)["error"]
        assert list(err) == ["class", "desc"], line

        await c.send({"execute": "query-version"})
        line = await c.read_line()
        assert ordered_keys(line) == ["return"], line

        await c.send({"execute": "del-blocker", "arguments": {"id": "absent"}})
        line = await c.read_line()
        assert ordered_keys(line) == ["error"], line

        c.send_raw(b"{bad json}\n")
        line = await c.read_line()
        assert ordered_keys(line) == ["error"], line


async def test_every_line_ends_in_crlf(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client(negotiate=False, read_greeting=False) as c:
        c.send_raw(encode({"execute": "qmp_capabilities"}))
        c.send_raw(encode({"execute": "add-blocker",
                           "arguments": {"reason": "line\nbreak\r\nand \u2028 sep",
                                         "id": "crlf"}}))
        c.send_raw(encode({"execute": "query-blockers", "id": 1}))
        c.send_raw(encode({"execute": "del-blocker", "arguments": {"id": "crlf"}}))
        c.send_raw(b"{oops}\n")
        c.send_raw(encode({"execute": "query-qmp-schema", "id": 2}))
        await c.write_eof()
        data = await c.read_to_eof()
    lines = data.split(b"\r\n")
    assert lines[-1] == b"", data[-200:]
    lines = lines[:-1]
    assert len(lines) >= 9, lines  # greeting, 6 replies, 2 events
    for line in lines:
        assert b"\n" not in line and b"\r" not in line, line
        strict_loads(line)
    blockers = next(m for m in map(strict_loads, lines) if m.get("id") == 1)
    crlf = [b for b in blockers["return"] if b["id"] == "crlf"]
    assert crlf and crlf[0]["reason"] == "line\nbreak\r\nand \u2028 sep"


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1E+999", b"123456789e300"])
async def test_huge_numbers_never_give_invalid_json(
    module_daemon: DaemonProcess, number: bytes
) -> None:
    async with module_daemon.client() as c:
        c.send_raw(b'{"execute": "query-version", "id": ' + number + b"}\n")
        line = await c.read_line()
        assert not re.search(rb"\b(inf|Infinity|NaN|nan)\b", line), line
        reply = strict_loads(line)  # raises on non-strict JSON
        assert "return" in reply or "error" in reply, reply
        c.send_raw(b'{"execute": "add-blocker", "arguments": {"reason": "big", "id": '
                   + number + b"}}\n")
        line = await c.read_line()
        assert not re.search(rb"\b(inf|Infinity|NaN|nan)\b", line), line
        reply = strict_loads(line)
        assert "error" in reply, reply
        assert await c.sync() == []


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"undefined"])
async def test_non_json_constants_are_parse_errors(
    module_daemon: DaemonProcess, token: bytes
) -> None:
    async with module_daemon.client() as c:
        msgs = await exchange(c, b'{"execute": "query-version", "id": ' + token + b"}")
        assert len(msgs) == 1 and is_parse_error(msgs[0]), msgs


async def test_unicode_round_trip(module_daemon: DaemonProcess) -> None:
    reason = "disk \u00e9\u00e8 \u2603 \U0001f600 \"quoted\" back\\slash \t tab \u0001 ctl"
    async with module_daemon.client() as c:
        info = await c.ok("add-blocker", {"reason": reason, "id": "uni"})
        assert info["reason"] == reason
        listed = [b for b in await c.ok("query-blockers") if b["id"] == "uni"]
        assert listed[0]["reason"] == reason
        await c.ok("del-blocker", {"id": "uni"})


# --------------------------------------------------------------------------- framing


async def test_glued_commands_in_one_write(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        c.send_raw(b'{"execute":"query-version","id":1}{"execute":"query-migrate","id":2}'
                   b' {"execute":"query-commands","id":3}\t{"execute":"no-such","id":4}')
        replies = await c.read_replies(4)
        assert [r["id"] for r in replies] == [1, 2, 3, 4]
        assert all("return" in r for r in replies[:3])
        assert replies[3] == error(NOT_FOUND, "The command no-such has not been found", 4)


async def test_command_split_byte_by_byte(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        data = encode({"execute": "add-blocker",
                       "arguments": {"reason": "split \u00e9", "id": "split"}, "id": "s"})
        data += b'\n{\n "execute"\n:\n"del-blocker",\n"arguments": {"id": "split"},\n"id": "t"\n}'
        for i in range(len(data)):
            c.writer.write(data[i:i + 1])
            await c.writer.drain()
            if i % 16 == 0:
                await asyncio.sleep(0.001)
        first = await c.read_reply()
        assert first["id"] == "s" and first["return"]["reason"] == "split \u00e9", first
        second = await c.read_reply()
        assert second == {"return": {}, "id": "t"}


async def test_no_trailing_newline_needed(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        c.send_raw(b'{"execute": "query-version", "id": "nl"}')
        await c.writer.drain()
        reply = await c.read()  # would time out if the daemon waited for a newline
        assert reply["id"] == "nl" and "return" in reply


async def test_200_pipelined_commands_in_one_write(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        cmds: list[bytes] = []
        for i in range(200):
            if i % 4 == 0:
                cmds.append(encode({"execute": "add-blocker",
                                    "arguments": {"reason": f"p{i}", "id": f"pipe{i}"}, "id": i}))
            elif i % 4 == 1:
                cmds.append(encode({"execute": "del-blocker",
                                    "arguments": {"id": f"pipe{i - 1}"}, "id": i}))
            elif i % 4 == 2:
                cmds.append(encode({"execute": "query-version", "id": i}))
            else:
                cmds.append(encode({"execute": "del-blocker", "arguments": {"id": "gone"},
                                    "id": i}))
        c.send_raw(b"".join(cmds))
        replies = await c.read_replies(200)
        assert [r["id"] for r in replies] == list(range(200))
        for i, r in enumerate(replies):
            if i % 4 == 0:
                assert r["return"]["id"] == f"pipe{i}", r
            elif i % 4 == 1:
                assert r == {"return": {}, "id": i}
            elif i % 4 == 2:
                assert r["return"]["package"].startswith("migblockd "), r
            else:
                assert r == error(GENERIC, "Blocker 'gone' not found", i)
        assert len(c.events) == 100


# --------------------------------------------------------------------------- malformed JSON

PARSE_ERROR_INPUTS = [
    b'{"execute": }',
    b'{"execute": xyz}',
    b'{"execute": "query-version", "id": 1, "id": 2}',
    b'{"execute" "query-version"}',
    b'{"execute": "query-version",}',
    b"}",
    b"]]]]",
    b'{"execute": "query-version", "id": 01}',
    b'{"execute": "query-version", "id": "\\x"}',
    b"{'execute': 'query-version'}",
    b'{"execute": "query-version" garbage garbage garbage garbage',
    b'{"execute": "query-version", "id": 1 garbage',
    b'{"execute": "query-version" 1',
    b'{"execute": "\xc3\x28"}',
    b'"unterminated',
]


@pytest.mark.parametrize("bad", PARSE_ERROR_INPUTS, ids=[repr(b)[:40] for b in PARSE_ERROR_INPUTS])
async def test_one_parse_error_per_bad_message_then_resync_at_newline(
    module_daemon: DaemonProcess, bad: bytes
) -> None:
    async with module_daemon.client() as c:
        msgs = await exchange(c, bad)
        assert len(msgs) == 1, msgs
        assert is_parse_error(msgs[0]), msgs
        # The connection is fully usable afterwards.
        assert (await c.execute("query-version", id="after"))["id"] == "after"


async def test_a_request_on_the_line_after_an_unfinished_one_is_answered(
    module_daemon: DaemonProcess,
) -> None:
    # Reported as a wedge: the unfinished line swallowed the request after it,
    # which never ends in a line feed (qemu.qmp sends none), until the idle timeout.
    async with module_daemon.client() as c:
        c.send_raw(b'{"execute": "query-version",\n')
        await asyncio.sleep(0.05)  # two reads
        c.send_raw(encode({"execute": "query-version", "id": 9}))
        assert await c.read() == {"error": {
            "class": GENERIC, "desc": "JSON parse error, key is not a string in object"}}
        assert (await c.read())["id"] == 9
        # And in one write, line by line.
        c.send_raw(b'[1, 2\n{"execute": "query-version", "id": 10}\n')
        assert await c.read() == {"error": {
            "class": GENERIC, "desc": "JSON parse error, expected separator in list"}}
        assert (await c.read())["id"] == 10


async def test_duplicate_key_is_a_parse_error(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        msgs = await exchange(
            c, b'{"execute": "add-blocker", "arguments": {"reason": "a", "reason": "b"}}')
        assert len(msgs) == 1 and is_parse_error(msgs[0]), msgs
        assert not [b for b in await c.ok("query-blockers") if b["reason"] in ("a", "b")]


async def test_parse_errors_are_answered_in_order(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        c.send_raw(b'{"execute": "query-version", "id": 1}{bad}\n{"execute": "query-version",'
                   b' "id": 2}\n{"execute": nope}\n{"execute": "query-version", "id": 3}')
        msgs = await c.read_until_reply(3)
        assert [m.get("id", "ERR") for m in msgs] == [1, "ERR", 2, "ERR", 3], msgs
        assert is_parse_error(msgs[1]) and is_parse_error(msgs[3])


@pytest.mark.parametrize("reset", [b"\x01", b"\x1b", b"\x00", b"\xff", b"\x04", b"\x1f"])
async def test_resync_at_control_character(module_daemon: DaemonProcess, reset: bytes) -> None:
    async with module_daemon.client() as c:
        # A half-sent request, then the reset byte, then (same line) a good request.
        c.send_raw(b'{"execute": "add-blocker", "arguments": {"reason": "half", "id": "half"'
                   + reset + b'{"execute": "query-version", "id": "good"}')
        msgs = await c.read_until_reply("good")
        assert len(msgs) == 2, msgs
        assert is_parse_error(msgs[0]), msgs
        assert "return" in msgs[1]
        assert not [b for b in await c.ok("query-blockers") if b["id"] == "half"]


async def test_2000_open_brackets_do_not_wedge_the_connection(
    module_daemon: DaemonProcess,
) -> None:
    async with module_daemon.client() as c:
        msgs = await exchange(c, b"[" * 2000)
        assert msgs == [error(GENERIC, "JSON nesting depth limit exceeded")], msgs
        msgs = await exchange(c, b'{"a":' * 2000)
        assert msgs == [error(GENERIC, "JSON nesting depth limit exceeded")], msgs


async def test_very_deep_nesting_is_an_error_not_a_crash(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        msgs = await exchange(c, b"[" * 200_000 + b"]" * 200_000)
        assert msgs == [error(GENERIC, "JSON nesting depth limit exceeded")], msgs
        assert module_daemon.proc.poll() is None
        assert_clean_log(module_daemon)
        assert "RecursionError" not in module_daemon.log()


async def test_huge_message_gives_one_error(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as c:
        # 2 MiB, above the default limit (1 MiB): QEMU answered such a line 102,561 times.
        big = (b'{"execute": "add-blocker", "arguments": {"reason": "' + b"x" * (2 << 20)
               + b'", "id": "huge"}, "id": "huge"}')
        msgs = await exchange(c, big)
        assert len(msgs) == 1 and is_parse_error(msgs[0]), [str(m)[:200] for m in msgs]
        many = (b'{"execute": "query-version", "arguments": {"x": ['
                + b"1," * (1 << 20) + b'1]}, "id": "many"}')
        msgs = await exchange(c, many)
        assert len(msgs) == 1 and is_parse_error(msgs[0]), [str(m)[:200] for m in msgs]
        assert not [b for b in await c.ok("query-blockers") if b["id"] == "huge"]


async def test_a_stray_byte_alone_is_answered_at_once(module_daemon: DaemonProcess) -> None:
    # QEMU answers a byte that no JSON token can start with the moment it reads
    # it; a client that sends one and waits must not wait for the idle timeout.
    async with module_daemon.client() as c:
        # (After an error QEMU skips to a line end, a bracket or a reset byte.)
        for data, desc in ((b"+", "stray '+'"), (b"\n\x80", "stray '\ufffd'"),
                           (b"\n01", "stray '01'")):
            c.send_raw(data)
            assert await c.read() == error(GENERIC, "JSON parse error, " + desc)
        assert (await c.execute("query-version", id="after"))["id"] == "after"


async def test_a_lexical_error_before_the_nesting_limit_is_the_one_named(
        module_daemon: DaemonProcess) -> None:
    # QEMU's lexer fails at the "+" as it reads it, before its streamer counts
    # the brackets after it: the message ends there (json-streamer.c), so the
    # error is the stray, whether or not the brackets come in the same read.
    async with module_daemon.client() as c:
        for split in (False, True):
            head, rest = b"[+", b"[" * 100
            if split:
                c.send_raw(head)
                assert await c.read() == error(GENERIC, "JSON parse error, stray '+'")
                msgs = await exchange(c, rest)
            else:
                msgs = await exchange(c, head + rest)
                assert msgs[0] == error(GENERIC, "JSON parse error, stray '+'"), msgs
                msgs = msgs[1:]
            # What follows it is a message of its own, begun at the next "[".
            assert msgs == [error(GENERIC, "JSON nesting depth limit exceeded")], msgs


async def test_past_the_token_limit_a_later_lexical_error_is_not_the_one_named(
        module_daemon: DaemonProcess) -> None:
    # QEMU's streamer refuses the message at its 16,385th token; its lexer fails
    # at the byte that is not ASCII only after that (json-streamer.c), whether
    # or not that byte ends a read.
    message = b'{"a": [' + b"1," * 9000 + b"\x80" + b"]}"
    cut = message.index(b"\x80") + 1
    async with module_daemon.client() as c:
        for split in (False, True):
            if split:
                c.send_raw(message[:cut])
                assert await c.read() == error(GENERIC, "JSON token count limit exceeded")
                assert await exchange(c, message[cut:]) == []
            else:
                assert await exchange(c, message) == [
                    error(GENERIC, "JSON token count limit exceeded")]


async def test_past_the_token_limit_a_control_character_is_not_the_one_named(
        module_daemon: DaemonProcess) -> None:
    # A control character in a string (or a reset byte) is an error of QEMU's
    # lexer, met after the token past the limit: the limit is named, as QEMU's
    # streamer names it first (json-streamer.c); the request after it runs.
    async with module_daemon.client() as c:
        for bad in (b'"x\x01"', b"\x1b"):
            message = b'{"a": [' + b"1," * 9000 + bad + b"]}"
            assert await exchange(c, message) == [
                error(GENERIC, "JSON token count limit exceeded")], bad


async def test_past_the_token_limit_the_nesting_or_a_parser_error_is_not_the_one_named(
        module_daemon: DaemonProcess) -> None:
    # QEMU's streamer checks the token count at each token before the nesting, and
    # before its parser sees the message (json-streamer.c; QEMU 7.2 says "JSON token
    # count limit exceeded" for 2 Mi tokens then 1100 brackets, and for 2 Mi tokens
    # then a "}" closing a "["): past 16,384 tokens, those later errors are not it.
    many = b'{"a": [' + b"1," * 9000
    async with module_daemon.client() as c:
        for message in (many + b"[" * 70 + b"]" * 70 + b"1]}", many + b"1}}"):
            assert await exchange(c, message) == [
                error(GENERIC, "JSON token count limit exceeded")]


async def test_past_the_token_limit_within_the_size_limit_the_token_limit_is_named(
        module_daemon: DaemonProcess) -> None:
    # 1 MiB of 1,1,... holds 16,385 tokens by its 33rd KiB: QEMU's streamer refuses
    # it for them there, not for its size (json-streamer.c).
    async with module_daemon.client() as c:
        assert await exchange(c, b'{"a": [' + b"1," * 600000 + b"1]}") == [
            error(GENERIC, "JSON token count limit exceeded")]


async def test_a_request_glued_after_a_string_broken_by_a_line_feed_runs(
        module_daemon: DaemonProcess) -> None:
    # QEMU's lexer skips the rest of the broken string (its closing quote too) to
    # the next bracket, so the next request runs; read as the start of a new
    # string, the closing quote would swallow it.
    async with module_daemon.client() as c:
        c.send_raw(b'{"execute": "add-blocker", "arguments": {"reason": "two\n"}, "id": 1}'
                   + encode({"execute": "query-version", "id": "glued"}))
        assert await c.read() == error(GENERIC, "JSON parse error, stray '\"two\n'")
        assert (await c.read())["id"] == "glued"


# --------------------------------------------------------------------------- limits (own daemons)


async def test_max_message_size(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--max-message-size", "1024")
    async with d.client() as c:
        ok = encode({"execute": "add-blocker", "arguments": {"reason": "y" * 800, "id": "fits"},
                     "id": "fits"})
        assert len(ok) < 1024
        reply = [m for m in await exchange(c, ok) if "event" not in m]
        assert len(reply) == 1 and reply[0]["id"] == "fits" and "return" in reply[0], reply
        for big in (
            encode({"execute": "add-blocker", "arguments": {"reason": "z" * 5000, "id": "big"},
                    "id": "big"}),
            encode({"execute": "add-blocker",
                    "arguments": {"reason": "r", "id": "big2", "modes": ["normal"] * 300},
                    "id": "big2"}),
            b"[" + b"[]," * 2000 + b"[]]",
        ):
            msgs = await exchange(c, big)
            assert len(msgs) == 1 and is_parse_error(msgs[0]), msgs
        c.events.clear()
        ids = [b["id"] for b in await c.ok("query-blockers")]
        assert ids == ["fits"]
    # The client is told in QEMU's words, which name no setting; the log names it, once
    # per connection (three refusals above, one line).  The records are written in
    # order by the log writer: once the connection's end is in the log, so is the rest.
    d.wait_for_log(re.compile(r"request refused[\s\S]* disconnected"))
    lines = [line for line in d.log().splitlines() if "request refused" in line]
    assert len(lines) == 1, lines
    assert lines[0].endswith(": request refused (JSON token size limit exceeded): past "
                             "max-message-size=1024 bytes; further ones on this connection "
                             "are not logged"), lines
    assert " WARNING: client " in lines[0], lines
    assert_clean_log(d)


async def test_a_run_past_max_message_size_whose_token_ends_sooner_is_not_one_token(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # QEMU's lexer fails at the first "@" and skips what follows to a bracket
    # (IN_RECOVERY, qobject/json-lexer.c): one stray, as when the "@" comes in a
    # read of its own.  "12" cut short by a byte that is not ASCII is a number,
    # then a stray.  (A run longer than one read is seen a read at a time.)
    d = start_daemon("--max-message-size", "1024")
    async with d.client() as c:
        for run, expected in (
                (b"@" * 2000, [error(GENERIC, "JSON parse error, stray '@'")]),
                (b"12\x80" + b"1" * 2000, [error(GENERIC, "QMP input must be a JSON object"),
                                          error(GENERIC, "JSON parse error, stray '\ufffd'")])):
            assert await exchange(c, run) == expected
            c.send_raw(run[:1])
            assert await exchange(c, run[1:]) == expected
    assert_clean_log(d)


async def test_max_nesting(start_daemon: Callable[..., DaemonProcess]) -> None:
    d = start_daemon("--max-nesting", "4")
    async with d.client() as c:
        assert (await c.execute("query-blockers", {"mode": "normal"}, id=1))["id"] == 1
        deep = {"execute": "add-blocker", "id": 2,
                "arguments": {"reason": "r", "x": [[[[[[[[1]]]]]]]]}}
        msgs = await exchange(c, encode(deep))
        assert msgs == [error(GENERIC, "JSON nesting depth limit exceeded")], msgs
        assert await c.ok("query-blockers") == []
    assert d.wait_for_log("request refused (JSON nesting depth limit exceeded): past "
                          "max-nesting=4; further ones")
    assert_clean_log(d)


# --------------------------------------------------------------------------- events


async def test_event_shape_and_event_before_reply(module_daemon: DaemonProcess) -> None:
    async with module_daemon.client() as actor, module_daemon.client() as other:
        await actor.send({"execute": "add-blocker",
                          "arguments": {"reason": "ordered", "id": "ev-order"}, "id": "add"})
        first = await actor.read()
        second = await actor.read()
        assert first.get("event") == "BLOCKER_ADDED", (first, second)
        assert second.get("id") == "add" and "return" in second, second
        assert first["data"] == second["return"]
        assert set(first) == {"event", "data", "timestamp"}
        ts = first["timestamp"]
        assert set(ts) == {"seconds", "microseconds"}
        assert type(ts["seconds"]) is int and type(ts["microseconds"]) is int
        assert 0 <= ts["microseconds"] < 1_000_000
        assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - time.time()) < 60

        await actor.send({"execute": "del-blocker", "arguments": {"id": "ev-order"}, "id": "del"})
        first = await actor.read()
        second = await actor.read()
        assert first["event"] == "BLOCKER_DELETED", first
        assert first["data"] == {"id": "ev-order", "cause": "command"}
        assert second == {"return": {}, "id": "del"}

        ev = await other.read()
        assert ev["event"] == "BLOCKER_ADDED" and ev["data"]["id"] == "ev-order"
        ev = await other.read()
        assert ev["event"] == "BLOCKER_DELETED" and ev["data"]["id"] == "ev-order"


def test_a_client_that_hangs_up_with_events_unread_is_logged_as_such(
        daemon: DaemonProcess) -> None:
    # How most clients end: events still coming.  The kernel resets the daemon's end,
    # and the log said "disconnected: [Errno 104] Connection reset by peer", which
    # reads as a failure.
    def negotiated() -> tuple[socket.socket, Any]:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(daemon.socket))
        lines = sock.makefile("rb")
        assert b'"QMP"' in lines.readline()
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        assert lines.readline() == b'{"return": {}}\r\n'
        return sock, lines

    quiet, quiet_lines = negotiated()
    other, lines = negotiated()
    other.sendall(b'{"execute": "add-blocker", "arguments": {"reason": "r", "id": "x"}}')
    assert b'"BLOCKER_ADDED"' in lines.readline() and b'"return"' in lines.readline()
    assert select.select([quiet], [], [], 30)[0]  # the event reached it, unread
    quiet_lines.close()
    quiet.close()
    daemon.wait_for_log(" disconnected: it hung up with output unread "
                        "(Connection reset by peer)")
    lines.close()
    other.close()
    assert "Errno" not in daemon.log()

"""The session state machine: bytes in, bytes out, no event loop."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import pytest

from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.qmp.encoding import encode_event
from migblockd.qmp.envelope import Command
from migblockd.qmp.errors import QMPError
from migblockd.qmp.limits import Limits
from migblockd.qmp.output import DISCARD, DROP, RESUME, fan_out
from migblockd.qmp.qdict import EXACT_MEMBERS, qdict_order
from migblockd.qmp.session import Session
from migblockd.registry import BlockerError, FakeClock, Registry

CONTRACT = Contract.load()
LIMITS = Config().limits
NEGOTIATION = "Expecting capabilities negotiation with 'qmp_capabilities'"


class Boom(RuntimeError):
    pass


def spy(core: Core, log: list[str]) -> None:
    """Record calls of add-blocker and query-blockers; some reasons misbehave on purpose."""
    table = dict(core.table)
    add, query = table["add-blocker"], table["query-blockers"]
    assert callable(add.handler) and callable(query.handler)
    real_add, real_query = add.handler, query.handler

    def add_blocker(conn: Connection, args: dict[str, Any]) -> object:
        log.append(f"add {args['reason']}")
        if args["reason"] == "dup":
            raise BlockerError("Blocker 'x' already exists")
        if args["reason"] == "qmp":
            raise QMPError("refused")
        if args["reason"] == "bug":
            raise Boom("secret traceback material")
        if args["reason"] == "nan":
            return {"x": float("nan")}
        return real_add(conn, args)

    def query_blockers(conn: Connection, args: dict[str, Any]) -> object:
        log.append("noop")
        return real_query(conn, args)

    table["add-blocker"] = Command(add.name, add.allow_oob, add.validate, add_blocker)
    table["query-blockers"] = Command(query.name, query.allow_oob, query.validate,
                                      query_blockers)
    core.table = table


class Client:
    """Drives one connection of a real Core (the production class) over bytes only."""

    def __init__(self, *, capabilities: list[str] | None = None,
                 limits: Limits = LIMITS) -> None:
        self.log: list[str] = []
        self.core = Core(CONTRACT, Registry(CONTRACT.enums["MigMode"], clock=FakeClock()),
                         limits)
        spy(self.core, self.log)
        if capabilities is not None:
            self.core.greeting = {"QMP": {**self.core.greeting["QMP"],
                                          "capabilities": capabilities}}
        self.conn = self.core.connect(None)
        self.session = self.conn.session
        self.greeting = self.core.data_to_send(self.conn)

    def raw(self, data: bytes, *, eof: bool = False) -> bytes:
        self.core.receive_data(self.conn, data)
        if eof:
            self.core.receive_eof(self.conn)
        while self.core.has_pending(self.conn):
            self.core.execute(self.conn, 7)
        return self.core.data_to_send(self.conn)

    def send(self, data: bytes, *, eof: bool = False) -> list[dict[str, Any]]:
        out = self.raw(data, eof=eof)
        assert out == b"" or out.endswith(b"\r\n")
        lines = out.split(b"\r\n")[:-1]
        return [json.loads(line) for line in lines]

    def cmd(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return self.send(json.dumps(request).encode())

    def negotiate(self, *, oob: bool = False) -> None:
        args = {"enable": ["oob"]} if oob else {}
        assert self.cmd({"execute": "qmp_capabilities", "arguments": args}) == [{"return": {}}]


def replies(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if "event" not in m]


def err(desc: str, id: object = ..., cls: str = "GenericError") -> dict[str, Any]:
    body = {"class": cls, "desc": desc}
    return {"error": body} if id is ... else {"id": id, "error": body}


# -- greeting and negotiation -----------------------------------------------------------


def test_greeting_pending_at_once() -> None:
    client = Client()
    assert client.greeting == json.dumps(client.core.greeting).encode() + b"\r\n"
    assert json.loads(client.greeting)["QMP"]["capabilities"] == ["oob"]
    assert client.session.data_to_send() == b""


def test_commands_before_negotiation_are_refused() -> None:
    client = Client()
    assert client.cmd({"execute": "query-blockers", "id": 1}) == [
        err(NEGOTIATION, 1, "CommandNotFound")
    ]
    assert client.cmd({"execute": "no-such-command"}) == [err(NEGOTIATION, cls="CommandNotFound")]
    # envelope errors are not rewritten
    assert client.cmd({"id": 2}) == [err("QMP input lacks member 'execute'", 2)]
    assert client.log == []
    assert not client.session.negotiated


def test_negotiation_then_commands() -> None:
    client = Client()
    assert client.cmd({"execute": "qmp_capabilities", "id": "n"}) == [{"return": {}, "id": "n"}]
    assert client.session.negotiated and not client.session.oob_enabled
    assert client.cmd({"execute": "query-blockers"}) == [{"return": []}]


def test_second_negotiation_is_refused() -> None:
    client = Client()
    client.negotiate()
    assert client.cmd({"execute": "qmp_capabilities", "id": 3}) == [
        err("Capabilities negotiation is already complete, command ignored", 3, "CommandNotFound")
    ]
    # arguments are still validated first, as in QEMU
    assert client.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}) == [
        err("Parameter 'enable[0]' does not accept value 'x'")
    ]


def test_capability_not_offered() -> None:
    client = Client(capabilities=[])
    assert client.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == [
        err("Capability oob not available")
    ]
    assert not client.session.negotiated
    client.negotiate()


def test_unknown_capability() -> None:
    client = Client()
    assert client.cmd(
        {"execute": "qmp_capabilities", "arguments": {"enable": ["foo"], "id": 1}}
    ) == [err("Parameter 'enable[0]' does not accept value 'foo'")]
    assert client.cmd({"execute": "qmp_capabilities", "arguments": {"bogus": 1}}) == [
        err("Parameter 'bogus' is unexpected")
    ]
    assert not client.session.negotiated


# -- envelope errors ---------------------------------------------------------------


@pytest.mark.parametrize("value", [42, [], "x", None, [1, {"execute": "x"}]])
def test_input_must_be_an_object(value: object) -> None:
    client = Client()
    client.negotiate()
    assert client.send(json.dumps(value).encode() + b"\n") == [
        err("QMP input must be a JSON object")
    ]


@pytest.mark.parametrize("id", [1, "abc", None, [1, {"a": None}], {"nested": {"x": 1.5}}, -7, True])
def test_envelope_errors_echo_id_verbatim(id: object) -> None:
    client = Client()
    client.negotiate()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"execute": 1}, "QMP input member 'execute' must be a string"),
        ({"execute": None}, "QMP input member 'execute' must be a string"),
        (
            {"execute": "query-blockers", "arguments": []},
            "QMP input member 'arguments' must be an object",
        ),
        (
            {"execute": "query-blockers", "arguments": None},
            "QMP input member 'arguments' must be an object",
        ),
        ({"execute": "query-blockers", "extra": 1}, "QMP input member 'extra' is unexpected"),
        (
            {"execute": "query-blockers", "exec-oob": "x"},
            "QMP input member 'exec-oob' is unexpected",
        ),
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
    ]
    for request, desc in cases:
        assert client.cmd({**request, "id": id}) == [err(desc, id)], request
    assert client.cmd({"execute": "nope", "id": id}) == [
        err("The command nope has not been found", id, "CommandNotFound")
    ]
    assert client.log == []


def test_envelope_check_order() -> None:
    # QEMU checks the members in the order its QDict holds them (qapi/qmp-dispatch.c,
    # qobject/qdict.c: by the hash of their names), and reports the first bad one.
    client = Client()
    client.negotiate()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x": 1, "arguments": 1, "execute": 1}, "QMP input member 'x' is unexpected"),
        ({"foo": 1, "execute": 1}, "QMP input member 'execute' must be a string"),
        ({"bar": 1, "execute": 1}, "QMP input member 'bar' is unexpected"),
        ({"arguments": 1, "zz": 1}, "QMP input member 'zz' is unexpected"),
        ({"arguments": 1, "foo": 1}, "QMP input member 'arguments' must be an object"),
        ({"execute": "query-blockers", "foo": 1, "bar": 2}, "QMP input member 'bar' is unexpected"),
        ({"exec-oob": 5, "execute": 5}, "QMP input member 'exec-oob' is unexpected"),
        ({"foo": 1}, "QMP input member 'foo' is unexpected"),
        # unexpected members come before the command lookup
        ({"execute": "nope", "x": 1}, "QMP input member 'x' is unexpected"),
    ]
    for request, desc in cases:
        assert client.cmd(request) == [err(desc)], request
    assert client.log == []


def test_past_exact_members_the_envelope_is_checked_in_the_order_sent() -> None:
    # Modelling QEMU's QDict costs 10-40 µs a member, on the event loop.
    client = Client()
    client.negotiate()
    names = [f"k{i}" for i in range(EXACT_MEMBERS)]
    assert qdict_order(names) != names
    request: dict[str, Any] = {**dict.fromkeys(names, 1), "execute": 5}
    assert client.cmd(request) == [err("QMP input member 'k0' is unexpected")]
    request = {"execute": 5, **dict.fromkeys(names, 1)}
    assert client.cmd(request) == [err("QMP input member 'execute' must be a string")]


def test_envelope_check_order_with_oob() -> None:
    client = Client()
    client.negotiate(oob=True)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"execute": 5, "exec-oob": 5}, "QMP input member 'exec-oob' must be a string"),
        ({"execute": "query-blockers", "exec-oob": 5},
         "QMP input member 'exec-oob' must be a string"),
        # the clash is found among the members, before anything is looked up
        ({"execute": "nope", "exec-oob": "nope"},
         "QMP input member 'execute' clashes with 'exec-oob'"),
        ({"execute": "query-blockers", "exec-oob": "query-blockers", "arguments": 5},
         "QMP input member 'execute' clashes with 'exec-oob'"),
        ({"exec-oob": "nope", "arguments": 5}, "QMP input member 'arguments' must be an object"),
    ]
    for request, desc in cases:
        assert client.cmd(request) == [err(desc)], request
    assert client.log == []


def test_command_names_are_exact() -> None:
    client = Client()
    client.negotiate()
    for name in ("query_blockers", "Query-Blockers", "query-blockers "):
        assert client.cmd({"execute": name}) == [
            err(f"The command {name} has not been found", cls="CommandNotFound")
        ]


def test_reply_member_order_and_line_format() -> None:
    client = Client()
    client.negotiate()
    assert client.raw(b'{"execute": "query-blockers", "id": 5}') == b'{"return": [], "id": 5}\r\n'
    assert client.raw(b'{"id": 5, "execute": "nope"}') == (
        b'{"id": 5, "error": {"class": "CommandNotFound", '
        b'"desc": "The command nope has not been found"}}\r\n'
    )
    assert client.raw(b'{"execute": "query-blockers"}') == b'{"return": []}\r\n'


# -- argument errors through the session ----------------------------------------------


def test_argument_errors_have_no_effect() -> None:
    client = Client()
    client.negotiate()
    assert client.cmd({"execute": "add-blocker", "arguments": {"modes": ["x"]}, "id": 1}) == [
        err("Parameter 'reason' is missing", 1)
    ]
    assert client.cmd(
        {"execute": "add-blocker", "arguments": {"reason": "r", "modes": ["normal", 3]}}
    ) == [err("Invalid parameter type for 'modes[1]', expected: string")]
    assert client.log == []


# -- domain and internal errors --------------------------------------------------------


def test_domain_error_maps_to_generic_error() -> None:
    client = Client()
    client.negotiate()
    assert client.cmd({"execute": "add-blocker", "arguments": {"reason": "dup"}, "id": 9}) == [
        err("Blocker 'x' already exists", 9)
    ]
    assert client.cmd({"execute": "add-blocker", "arguments": {"reason": "qmp"}}) == [
        err("refused")
    ]


def test_unexpected_exception_does_not_kill_the_session(caplog: pytest.LogCaptureFixture) -> None:
    client = Client()
    client.negotiate()
    replies = client.cmd({"execute": "add-blocker", "arguments": {"reason": "bug"}, "id": 1})
    assert replies == [err("Internal error while executing command add-blocker", 1)]
    assert "secret" not in json.dumps(replies)
    # The traceback goes to the log, and only there.
    internal = [r for r in caplog.records if "internal error in add-blocker" in r.getMessage()]
    assert len(internal) == 1 and internal[0].exc_info is not None
    assert internal[0].exc_info[0] is Boom
    # an unencodable return value is an internal error too, not invalid JSON
    assert client.cmd({"execute": "add-blocker", "arguments": {"reason": "nan"}}) == [
        err("Internal error while executing command add-blocker")
    ]
    assert client.cmd({"execute": "query-blockers", "id": 2}) == [{"return": [], "id": 2}]


# -- OOB --------------------------------------------------------------------------------


def test_oob_requires_enabling() -> None:
    client = Client()
    client.negotiate()
    assert client.cmd({"exec-oob": "add-blocker", "arguments": {"reason": "r"}, "id": 1}) == [
        err("QMP input member 'exec-oob' is unexpected", 1)
    ]


def test_oob_enabled() -> None:
    client = Client()
    client.negotiate(oob=True)
    assert client.session.oob_enabled
    assert client.cmd({"exec-oob": "query-blockers", "id": "o"}) == [{"return": [], "id": "o"}]
    assert client.cmd({"exec-oob": "add-blocker", "arguments": {"reason": "r"}, "id": 2}) == [
        err("The command add-blocker does not support OOB", 2)
    ]
    assert client.cmd({"exec-oob": "nope", "id": 3}) == [
        err("The command nope has not been found", 3, "CommandNotFound")
    ]
    assert client.cmd({"exec-oob": 5, "id": 4}) == [
        err("QMP input member 'exec-oob' must be a string", 4)
    ]
    assert client.cmd({"execute": "query-blockers", "exec-oob": "query-blockers", "id": 5}) == [
        err("QMP input member 'execute' clashes with 'exec-oob'", 5)
    ]
    assert client.cmd({"execute": "add-blocker", "exec-oob": "add-blocker", "id": 6}) == [
        err("QMP input member 'execute' clashes with 'exec-oob'", 6)
    ]
    # The schema does not mark qmp_capabilities allow-oob (nor does QEMU's).
    assert client.cmd({"exec-oob": "qmp_capabilities", "id": 7}) == [
        err("The command qmp_capabilities does not support OOB", 7)
    ]
    assert client.log == ["noop"]


def test_oob_runs_ahead_of_queued_in_band_requests() -> None:
    client = Client()
    client.negotiate(oob=True)
    data = (
        b'{"execute": "add-blocker", "arguments": {"reason": "r"}, "id": 1}'
        b'{"exec-oob": "query-blockers", "id": 2}'
        b'{"execute": "add-blocker", "arguments": {"reason": "s"}, "id": 3}'
        b'{"exec-oob": "no-such", "id": 4}'  # an OOB error is answered at once too
    )
    client.core.receive_data(client.conn, data)
    # The first turn runs both OOB requests, then one in-band request.
    assert client.core.execute(client.conn, 3) == 3
    lines = client.core.data_to_send(client.conn).split(b"\r\n")[:-1]
    first = [reply for reply in map(json.loads, lines) if "id" in reply]
    assert [reply["id"] for reply in first] == [2, 4, 1]
    assert first[0]["return"] == []  # ran before the add that came first
    assert first[1]["error"]["class"] == "CommandNotFound"
    assert client.core.has_pending(client.conn)
    ids = [reply["id"] for reply in client.send(b"") if "id" in reply]
    assert ids == [3]  # in-band requests keep their order
    assert client.log == ["noop", "add r", "add s"]


def test_without_oob_enabled_exec_oob_is_answered_in_turn() -> None:
    client = Client()
    client.negotiate()
    data = (
        b'{"execute": "query-blockers", "id": 1}'
        b'{"exec-oob": "query-blockers", "id": 2}'
        b'{"execute": "query-blockers", "id": 3}'
    )
    replies = client.send(data)
    assert [reply["id"] for reply in replies] == [1, 2, 3]
    assert replies[1]["error"]["desc"] == "QMP input member 'exec-oob' is unexpected"


# -- ordering, pipelining, events ---------------------------------------------------------


def test_200_pipelined_replies_in_order() -> None:
    client = Client()
    client.negotiate()
    data = b"".join(b'{"execute": "query-blockers", "id": %d}' % i for i in range(200))
    assert client.send(data) == [{"return": [], "id": i} for i in range(200)]


def test_split_at_every_offset_through_the_session() -> None:
    data = (
        b'{"execute": "qmp_capabilities"}'
        b'{"execute": "add-blocker", "arguments": {"reason": "r"}, "id": 1}'
    )
    expected = Client().send(data)
    for cut in range(len(data) + 1):
        client = Client()
        assert client.send(data[:cut]) + client.send(data[cut:]) == expected


def test_execute_respects_max_requests() -> None:
    client = Client()
    core, conn = client.core, client.conn
    core.receive_data(conn, b'{"execute": "qmp_capabilities"}'
                      + b'{"execute": "query-blockers"}' * 5)
    assert core.execute(conn, 2) == 2
    assert core.has_pending(conn)
    assert core.execute(conn, 100) == 4
    assert not core.has_pending(conn)
    assert core.execute(conn, 100) == 0
    assert core.data_to_send(conn).count(b"\r\n") == 6


def test_a_flood_of_bad_messages_is_served_in_turns_too() -> None:
    client = Client()
    client.negotiate()
    core, conn = client.core, client.conn
    core.receive_data(conn, b"}\n" * 100 + b'{"execute": "query-version", "id": 1}')
    assert core.execute(conn, 32) == 32  # each bad message counts as one request
    assert core.data_to_send(conn).count(b"\r\n") == 32
    assert core.has_pending(conn)


def test_receive_data_executes_nothing() -> None:
    client = Client()
    client.session.receive_data(b'{"execute": "qmp_capabilities"}')
    assert client.session.data_to_send() == b""
    assert not client.session.negotiated
    assert client.session.has_pending()


@dataclass(eq=False)
class To:
    """A connection as :func:`fan_out` sees it."""

    session: Session
    closed: bool = False


def test_event_before_reply_and_only_after_negotiation() -> None:
    client = Client()
    event = encode_event("BLOCKER_ADDED", {"id": "b"}, 1.5)
    to = [To(client.session)]
    assert fan_out(to, event, 0, False, {}) == 0
    assert client.session.data_to_send() == b""
    client.negotiate()
    out = client.raw(b'{"execute": "add-blocker", "arguments": {"reason": "r"}, "id": 1}')
    first, second = map(json.loads, out.split(b"\r\n")[:2])
    assert first["event"] == "BLOCKER_ADDED" and first["data"]["reason"] == "r"
    assert second == {"return": first["data"], "id": 1}
    mark: dict[To, None] = {}
    assert fan_out(to, event, 0, False, mark) == 0
    assert client.session.data_to_send() == event
    assert list(mark) == to
    to[0].closed = True
    assert fan_out(to, event, 0, False, {}) == 0
    assert client.session.data_to_send() == b""


def test_encode_event() -> None:
    assert encode_event("X", {"a": 1}, 12.000034) == (
        b'{"timestamp": {"seconds": 12, "microseconds": 34}, "event": "X", "data": {"a": 1}}\r\n'
    )
    assert encode_event("STOP", {}, 1700000000.9999996) == (
        b'{"timestamp": {"seconds": 1700000001, "microseconds": 0}, "event": "STOP"}\r\n'
    )


# -- parse errors through the session ---------------------------------------------------


def test_parse_errors_have_no_id_and_come_in_order() -> None:
    client = Client()
    client.negotiate()
    replies = client.send(
        b'{"execute": "query-blockers", "id": 1}\n'
        b'{"execute": "query-blockers" "id": 2}\n'
        b'{"execute": "query-blockers", "id": 3}'
    )
    assert replies == [
        {"return": [], "id": 1},
        err("JSON parse error, expected separator in dict"),
        {"return": [], "id": 3},
    ]


def test_parse_error_before_negotiation_is_not_rewritten() -> None:
    client = Client()
    assert client.send(b"{]\n") == [err("JSON parse error, expecting value")]


def test_2000_brackets_then_a_command() -> None:
    client = Client()
    client.negotiate()
    replies = client.send(b"[" * 2000 + b"\n" + b'{"execute": "query-blockers", "id": 1}')
    assert replies == [err("JSON nesting depth limit exceeded"), {"return": [], "id": 1}]


def test_oversize_message_then_a_command() -> None:
    client = Client(limits=replace(LIMITS, max_message_size=4096))
    client.negotiate()
    big = b'{"execute": "add-blocker", "arguments": {"reason": "' + b"x" * 10_000 + b'"}}\n'
    replies = client.send(big + b'{"execute": "query-blockers", "id": 1}')
    assert replies == [err("JSON token size limit exceeded"), {"return": [], "id": 1}]
    assert client.log == ["noop"]


def test_control_character_reset() -> None:
    client = Client()
    client.negotiate()
    replies = client.send(
        b'{"execute": "add-blocker", "argu\x04{"execute": "query-blockers", "id": 1}'
    )
    assert len(replies) == 2
    assert replies[0]["error"]["desc"].startswith("JSON parse error, ")
    assert replies[1] == {"return": [], "id": 1}


def test_output_is_strict_json() -> None:
    client = Client()
    client.negotiate()
    out = client.raw(
        b'{"execute": "nope", "id": 1e400}\n{"execute": "nope", "id": NaN}\n'
        b'{"execute": "nope", "id": 1e300}\n{"execute": "nope", "id": "\xc3\xa9"}'
    )
    for line in out.split(b"\r\n")[:-1]:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
        line.decode("ascii")
    assert out.count(b"JSON parse error, number out of range") == 1
    assert b'"id": 1e+300' in out
    assert b'"id": "\\u00E9"' in out


# -- EOF ----------------------------------------------------------------------------


def test_everything_before_eof_is_executed() -> None:
    client = Client()
    replies = client.send(
        b'{"execute": "qmp_capabilities"}{"execute": "add-blocker", "arguments": {"reason": "r"}}',
        eof=True,
    )
    assert replies[-1]["return"]["reason"] == "r"
    assert client.log == ["add r"]


def test_truncated_request_at_eof_gets_one_error() -> None:
    client = Client()
    client.negotiate()
    assert client.send(b'{"execute": "query-blockers"', eof=True) == [
        err("JSON parse error, premature EOI")
    ]
    assert client.send(b'{"execute": "query-blockers"}') == []  # input after EOF is ignored


def test_a_reader_past_max_output_holding_a_connection_blocker_misses_events_not_its_blocker(
        ) -> None:
    """Past --max-output of unread events a client is dropped, unless that would release
    its connection-scoped blockers: then its events are discarded, not queued, until it
    is back within the bound, and its replies still come."""
    c = Client()
    c.negotiate()
    asked: list[bool] = []

    def kept() -> bool:
        asked.append(True)
        return bool(c.core.registry.held_by(c.conn))

    # Holding nothing: dropped, as ever (and nothing is discarded).
    assert c.session.judge_unread(5000, 4096, kept) is DROP
    assert not c.session.discarding
    added = c.cmd({"execute": "add-blocker",
                   "arguments": {"id": "agentA", "reason": "held", "scope": "connection"}})
    assert [m.get("event") for m in added] == ["BLOCKER_ADDED", None]
    assert c.core.registry.held_by(c.conn) == ["agentA"]
    asked.clear()
    assert c.session.judge_unread(4097, 4096, kept) is DISCARD
    # Once an episode: its blockers are not looked at again, nor is it logged again.
    assert c.session.judge_unread(9999, 4096, kept) is None
    assert asked == [True]
    out = c.cmd({"execute": "add-blocker", "arguments": {"id": "b1", "reason": "r"}})
    assert len(out) == 1 and out[0]["return"]["id"] == "b1", out  # its reply, no event
    assert c.session.missed == 1 and c.core.stats.events_discarded == 1
    # Back within the bound: events are queued again; missed still says how many.
    assert c.session.judge_unread(4096, 4096, kept) is RESUME
    assert not c.session.discarding and c.session.missed == 1
    out = c.cmd({"execute": "add-blocker", "arguments": {"id": "b2", "reason": "r"}})
    assert [m.get("event") for m in out] == ["BLOCKER_ADDED", None]
    assert out[0]["data"]["id"] == "b2" and out[1]["return"]["id"] == "b2"
    assert c.session.judge_unread(0, 4096, kept) is None
    assert c.core.stats.events_discarded == 1 and c.core.registry.held_by(c.conn) == ["agentA"]

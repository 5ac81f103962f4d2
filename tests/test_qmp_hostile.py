"""Hostile input against the sans-I/O core: the real command table, no event loop.

Each test states the property a hostile peer must not break: no internal
error, strict JSON out, one reply per bad message, the next valid command
works, and no input that costs the daemon's single thread far more than its
size (a request that takes seconds to check stalls every other client).
Cost is measured by counting work (parses, jsonschema calls), never by time.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from typing import Any

import pytest
from conftest import count_calls
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migblockd.access import Policy, Role
from migblockd.config import Config
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.core import Core
from migblockd.qmp import (
    characters,
    decoder,
    patterns,
    resync,
    scanner,
    structure,
    unfinished,
    wording,
)
from migblockd.qmp.errors import QMPError
from migblockd.qmp.framing import StreamDecoder
from migblockd.qmp.limits import Limits, count_tokens
from migblockd.qmp.validation import ArgumentValidator
from migblockd.qmp.wording import TOKEN_COUNT_EXCEEDED, ParseError
from migblockd.registry import FakeClock, Owner, Registry

CONTRACT = Contract.load()
LIMITS = Config().limits
PROBE = b'{"execute": "query-version", "id": "probe"}'


def _strict(line: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(line, parse_constant=refuse)


class _Alarm(logging.Handler):
    """Collects the core's internal-error log records: there must be none."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Daemonless:
    """The production core with a fake clock: sessions over bytes, no sockets."""

    def __init__(self) -> None:
        self.registry = Registry(CONTRACT.enums["MigMode"], migration_time=0.3,
                                 clock=FakeClock())
        # Everyone is admin: these tests are about the protocol, not who may use it.
        self.core = Core(CONTRACT, self.registry, LIMITS, policy=Policy(Role.ADMIN))
        self.table = self.core.table
        self.alarm = _Alarm()
        logging.getLogger("migblockd").addHandler(self.alarm)

    def session(self, limits: Limits = LIMITS, negotiate: bool = True) -> Connection:
        self.core.limits = limits
        conn = self.core.connect(Owner(pid=1, uid=2, gid=3))
        self.core.data_to_send(conn)  # the greeting
        if negotiate:
            request = (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
                       if limits.max_nesting >= 3 else b'{"execute": "qmp_capabilities"}')
            assert self.feed(conn, request) == [{"return": {}}]
        return conn

    def feed(self, conn: Connection, data: bytes, *, eof: bool = False) -> list[Any]:
        """Feed bytes, run everything complete, return the output as strict JSON lines."""
        core = self.core
        core.receive_data(conn, data)
        if eof:
            core.receive_eof(conn)
        while core.has_pending(conn):
            core.execute(conn, 32)
        out = core.data_to_send(conn)
        assert out == b"" or out.endswith(b"\r\n"), out[-200:]
        lines = out.split(b"\r\n")[:-1]
        for line in lines:
            assert b"\n" not in line and b"\r" not in line, line[:200]
            assert line.isascii()
        assert not self.alarm.records, [r.getMessage() for r in self.alarm.records]
        return [_strict(line) for line in lines]

    def forget_connections(self) -> None:
        for conn in list(self.core.connections):
            self.core.disconnect(conn)


_SHARED: list[Daemonless] = []


def _shared() -> Daemonless:
    """One command table for all examples (compiling the validators takes a while)."""
    if not _SHARED:
        _SHARED.append(Daemonless())
    world = _SHARED[0]
    world.forget_connections()
    return world


# --------------------------------------------------------------------------- fuzzing

_ATOMS = [
    b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\n", b"\r", b"\t", b" ", b"\x00",
    b"\x04", b"\xff", b"\xfe", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xf0\x9f", b"\x98\x80",
    b"'", b"\\u", b"\\ud800", b"\\u0000", b"\\u2028", b"1", b"-0", b"1e400", b"1e-400",
    b"NaN", b"true", b"null", b'"execute"', b'"exec-oob"', b'"arguments"', b'"id"',
    b'"query-version"', b'"add-blocker"', b'"del-blocker"', b'"reason"', b'"modes"',
    b'"qmp_capabilities"', b'"enable"', b'"oob"', b'"migrate"', b'"uri"', b'"tcp:x"',
    b'"scope"', b'"connection"', b'"migrate_cancel"', b'"#blocker0"',
]
_BURSTS = st.lists(st.lists(st.sampled_from(_ATOMS), max_size=40).map(b"".join), max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(_BURSTS, st.integers(80, 300), st.integers(1, 6), st.booleans())
def test_random_tokens_never_break_the_session(
    bursts: list[bytes], size: int, nesting: int, negotiate: bool
) -> None:
    world = _shared()
    s = world.session(replace(LIMITS, max_message_size=size, max_nesting=nesting),
                      negotiate=negotiate)
    for burst in bursts:
        world.feed(s, burst)
    # The documented way to reset the parser, then a valid command on a new line.
    out = world.feed(s, b"\x04\n" + PROBE)
    # Answered (before negotiation, with the negotiation error): it was parsed.
    assert out and out[-1].get("id") == "probe", (bursts, out)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(_BURSTS)
def test_a_bad_message_then_a_newline_never_swallows_the_next_command(
    bursts: list[bytes],
) -> None:
    world = _shared()
    s = world.session()
    for burst in bursts:
        world.feed(s, burst)
    decoder = s.session._decoder
    if decoder._mode in (resync.STRUCT, resync.SCALAR_MODE):
        # Only a message that is already bad must give way at the newline; a
        # valid beginning ({"a": ) legitimately swallows what follows.
        pending = bytes(decoder._buf[decoder._start:]).decode("utf-8", "replace")
        if wording.viable(pending):
            return
    out = world.feed(s, b"\n" + PROBE)
    assert out and out[-1].get("id") == "probe" and "return" in out[-1], (bursts, out)


# --------------------------------------------------------------------------- cost


def test_a_refusal_late_in_a_long_multiline_message_costs_few_parses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4,000 line feeds and then NaN: the line with the error is found by bisection.

    Before: one parse of the whole prefix per line feed, about 0.1 s per 4 KiB
    message, so 64 of them in one 260 KiB write held the daemon for 3 s.
    """
    calls = count_calls(monkeypatch, unfinished, "viable")
    world = Daemonless()
    s = world.session()
    bad = b'{"x":' + b"\n" * 4000 + b"NaN\n"
    out = world.feed(s, bad + PROBE)
    assert out[0] == {"error": {"class": "GenericError",
                                "desc": "JSON parse error, stray 'N'"}}
    assert out[-1]["id"] == "probe" and len(out) == 2, out
    assert 0 < len(calls) <= 16, len(calls)


def test_the_lines_after_a_number_out_of_range_are_not_rewritten_at_each_line_feed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message whose lines come one read at a time, with 1e400 on its first.

    Its complete lines are read at each line feed, reading on past 1e400 as
    QEMU's parser does.  Before, each read rewrote every number of the lines
    (a Python call for each): 4 KiB of such lines cost most of a second of the
    only thread, 160 times what the same lines without 1e400 cost.
    """
    calls = count_calls(monkeypatch, decoder, "_finite_number")
    world = Daemonless()
    s = world.session()
    out: list[dict[str, object]] = []
    for line in [b'{"id": [1e400,\n'] + [b"1,\n"] * 1000:
        out += world.feed(s, line)
    assert out == []
    out = world.feed(s, b"1]}" + PROBE)
    assert out[0] == {"error": {"class": "GenericError",
                                "desc": "JSON parse error, number out of range"}}
    assert out[-1]["id"] == "probe" and len(out) == 2, out
    assert len(calls) <= 1002, len(calls)  # the complete message's, once


def test_where_a_string_is_no_character_is_found_in_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A repeated key, then a megabyte of surrogate pairs ending in a lone one, and
    bytes that are not UTF-8 after it: which error QEMU meets first depends on where
    the lone surrogate is.  Found by review: it was found by a search over prefixes,
    each read escape by escape, about 20 reads of the whole string (seconds of the
    daemon's loop for one request); now one read gives the place and the words."""
    pairs = 20_000
    calls = count_calls(monkeypatch, characters, "_code_point")
    world = Daemonless()
    s = world.session()
    bad = (b'{"execute": "x", "id": {"a": 1, "a": 2, "b": "' + b"\\ud83d\\ude00" * pairs
           + b'\\ud800", "c": "\xc3"}}')
    out = world.feed(s, bad + PROBE)
    assert out[0] == {"error": {"class": "GenericError",
                                "desc": "JSON parse error, duplicate key"}}, out[0]
    assert out[-1]["id"] == "probe" and len(out) == 2, out
    assert len(calls) <= 3 * 2 * pairs, len(calls)


#: About 1 MiB of short tokens, each bad in its own way at the end.
_MANY = 340_000
_PAST_THE_TOKEN_LIMIT = [
    # A missing comma: the parser's error, which QEMU's parser never reaches.
    (b'{"execute": "x", "arguments": {"a": [' + b'"",' * _MANY + b"1 2]}}",
     TOKEN_COUNT_EXCEEDED),
    # Not UTF-8, and a lone surrogate: its parser's errors too.
    (b'{"execute": "x", "arguments": {"a": [' + b'"\xc3(",' * 150_000 + b"1]}}",
     TOKEN_COUNT_EXCEEDED),
    (b'{"execute": "x", "arguments": {"a": [' + b'"\\ud800",' * 100_000 + b"1]}}",
     TOKEN_COUNT_EXCEEDED),
    # Its lexer's error before the limit comes first.
    (b'{"execute": "x", "arguments": {"a": [1, @, ' + b'"",' * _MANY + b"1 2]}}",
     "JSON parse error, stray '@'"),
]


@pytest.mark.parametrize(("bad", "desc"), _PAST_THE_TOKEN_LIMIT,
                         ids=["parser", "utf-8", "surrogate", "lexer"])
def test_a_bad_message_past_the_token_limit_is_refused_without_rereading_it(
    monkeypatch: pytest.MonkeyPatch, bad: bytes, desc: str,
) -> None:
    """QEMU's streamer refuses a message at the token past its limit, before its
    parser runs.  Before, such a message went through the wording of its
    parser's error, which re-reads it in Python loops: 1.3 s of the only
    thread for 1 MiB of ``"",``, every other client waiting."""
    calls = count_calls(monkeypatch, wording, "describe_error")
    world = Daemonless()
    s = world.session()
    out = world.feed(s, bad + PROBE)
    assert out[0] == {"error": {"class": "GenericError", "desc": desc}}
    assert out[-1]["id"] == "probe" and len(out) == 2, out
    assert len(calls) <= (desc != TOKEN_COUNT_EXCEEDED), len(calls)


def test_a_string_left_open_is_one_token_to_its_end() -> None:
    """Which objects are open, and which keys they hold, where QEMU's parser stops
    in a string: the string is left open there, and all of it is one token.

    Before, a search failed at it and began again at each quote in it, escaped
    ones too, reading on to its end each time: quadratic time, and what it held
    taken for brackets.  A request of 32 KiB of escaped quotes, with a repeated
    key and a string that is no character, took 12 s of the only thread."""
    text = '{"a": 1, "a": 2, "b": "' + '\\"[\\": {' * 3
    assert decoder._open_containers(text, len(text)) == [0]
    assert [m.group(1) for m in decoder._STRINGS.finditer(text) if m.group(2)] == ["a", "a", "b"]
    assert decoder.finite_numbers(text + "1e400") == text + "1e400"
    world = Daemonless()
    s = world.session()
    bad = b'{"a": 1, "a": 1, "b": "' + b'\\"' * 200_000 + b'\\uffff\xc3"}'
    out = world.feed(s, bad + PROBE)
    assert out[0] == {"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}
    assert out[-1]["id"] == "probe" and len(out) == 2, out


_BRACKET_FLOODS = [
    # Valid, and past the token limit: the scan went on to its end, a step per
    # bracket (the one-match path takes only messages nested three deep).
    b'{"execute": "query-version", "id": {"a": [' + b"[]," * _MANY + b"1]}}",
    # Past the nesting limit: the rest was skipped a step per bracket.
    b"[" * 65 + b"[]," * _MANY + b"]" * 65,
    # Broken by a closer, then the same.
    b'{"execute": "query-version", "id": [}' + b"[]," * _MANY + b"1]",
]


@pytest.mark.parametrize("bad", _BRACKET_FLOODS, ids=["tokens", "nesting", "closer"])
def test_a_message_of_a_million_brackets_costs_few_steps_per_bracket(
    monkeypatch: pytest.MonkeyPatch, bad: bytes,
) -> None:
    """1 MiB of ``[],`` took the daemon's only thread 1.4 to 2 s, every other
    client waiting: the scan and the skipping of a broken message's rest took
    a step of Python per bracket.  Now the scan stops at the token limit and
    the rest is counted in bulk: its steps are bounded by the limit."""
    # The scan between messages, and inside one.
    scanned = count_calls(monkeypatch, scanner, "match_end")
    scanned_in = count_calls(monkeypatch, structure, "match_end")
    skipped = count_calls(monkeypatch, patterns, "match_end")
    walked = count_calls(monkeypatch, patterns, "counted")
    world = Daemonless()
    s = world.session()
    out = world.feed(s, bad + PROBE)
    assert "error" in out[0], out[0]
    assert out[-1]["id"] == "probe" and len(out) == 2, out
    steps = len(scanned) + len(scanned_in) + len(skipped) + len(walked)
    assert steps <= 6 * LIMITS.max_tokens, steps


@pytest.mark.parametrize("split", [1, 7, 4096])
def test_bisection_gives_the_same_outcome_however_the_input_is_split(split: int) -> None:
    world = Daemonless()
    s = world.session()
    data = (b'{"execute": "query-version",\n"arguments": {"a": [1,\n2,\n{"k": 1, "k": 2},\n'
            b'3]}\n' + PROBE)
    whole = world.feed(s, data)
    s2 = world.session()
    pieces: list[Any] = []
    for i in range(0, len(data), split):
        pieces += world.feed(s2, data[i : i + split])
    assert pieces == whole
    assert whole[0]["error"]["desc"] == "JSON parse error, duplicate key"
    assert whole[-1]["id"] == "probe"


class _NoJsonschema:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"jsonschema consulted ({name})")


def test_huge_arrays_stop_at_the_token_limit_before_jsonschema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """jsonschema took 4 to 6 s for one valid 1 MiB request (170,000 array elements).

    The codec's token limit (QEMU's own kind of limit) refuses such a message as
    one parse error, so jsonschema never sees it, and the next command works.
    """
    world = Daemonless()
    for command in world.table.values():
        validator = command.validate.__self__  # type: ignore[attr-defined]
        assert isinstance(validator, ArgumentValidator)
        monkeypatch.setattr(validator, "_validator", _NoJsonschema())
    s = world.session(negotiate=False)
    limit = LIMITS.max_tokens
    too_many = TOKEN_COUNT_EXCEEDED
    for request in (
        {"execute": "qmp_capabilities", "id": 1, "arguments": {"enable": ["oob"] * 100_000}},
        {"execute": "add-blocker", "id": 2,
         "arguments": {"reason": "r", "modes": ["normal"] * (limit // 2)}},
        {"execute": "migrate-set-capabilities", "id": 3, "arguments": {
            "capabilities": [{"capability": "events", "state": True}] * 20_000}},
    ):
        assert world.feed(s, json.dumps(request).encode()) == [
            {"error": {"class": "GenericError", "desc": too_many}}
        ]
    monkeypatch.undo()
    assert world.feed(s, b'{"execute": "qmp_capabilities", "id": 4}') == [{"return": {}, "id": 4}]


def test_the_token_count_is_qemus() -> None:
    # {"a": [1, 2]} is { "a" : [ 1 , 2 ] } : 9 tokens.
    assert count_tokens({"a": [1, 2]}, 100) == 9
    assert count_tokens([], 100) == 2
    assert count_tokens({}, 100) == 2
    assert count_tokens("x", 100) == 1
    limits = replace(LIMITS, max_tokens=9)
    at_limit = b'{"a": [1, 2]}' + b" " * 20  # longer than 9 bytes, exactly 9 tokens
    decoder = StreamDecoder(limits)
    decoder.feed(at_limit + b'{"a": [1, 2, 3]}')
    assert decoder.next_message() == {"a": [1, 2]}
    assert decoder.next_message() == ParseError(TOKEN_COUNT_EXCEEDED)


# --------------------------------------------------------------------------- argument wording


#: The four argument errors of QEMU's QAPI visitor (qapi/qobject-input-visitor.c).
QEMU_WORDING = re.compile(
    r"Parameter '[^']*' is missing|Parameter '[^']*' is unexpected"
    r"|Invalid parameter type for '[^']*', expected: "
    r"(string|integer|number|boolean|null|object|array)"
    r"|Parameter '[^']*' does not accept value '.*'"
    r"|Parameter '[^']*' expects u?int(8|16|32|64)(_t)?", re.DOTALL)


def _values(names: list[str], enums: list[str]) -> st.SearchStrategy[Any]:
    keys = st.sampled_from([*names, "zz", "x"])
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(1 << 65), 1 << 65), st.floats(allow_nan=False,
        allow_infinity=False), st.sampled_from([*enums, "", "bogus"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(keys, inner, max_size=5)),
        max_leaves=12,
    )


def _names(schema: object, names: set[str], enums: set[str]) -> None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties":
                names.update(value)
            if key == "enum":
                enums.update(value)
            _names(value, names, enums)
    elif isinstance(schema, list):
        for value in schema:
            _names(value, names, enums)


@pytest.mark.parametrize("name", list(CONTRACT.commands))
def test_jsonschema_judges_and_every_refusal_is_worded_as_qemu_words_it(name: str) -> None:
    schema = CONTRACT.commands[name].arguments
    validator = ArgumentValidator(schema)
    names: set[str] = set()
    enums: set[str] = set()
    _names(schema, names, enums)
    args_strategy = st.dictionaries(st.sampled_from(sorted(names | {"zz"})),
                                    _values(sorted(names), sorted(enums)), max_size=6)

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(args_strategy)
    def agree(args: dict[str, Any]) -> None:
        if validator._validator.is_valid(args):
            validator.check(args)
        else:
            with pytest.raises(QMPError) as info:
                validator.check(args)
            assert QEMU_WORDING.fullmatch(info.value.desc), info.value.desc
            # A cached verdict (same shape, other strings) says exactly what judging anew says.
            assert info.value.desc == validator.judge(args)

    agree()


def test_a_verdict_is_cached_per_shape_and_strings_do_not_split_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    validator = ArgumentValidator(CONTRACT.commands["add-blocker"].arguments)
    calls = count_calls(monkeypatch, validator, "judge")
    for i in range(100):
        validator.check({"reason": f"reason {i}", "id": f"b{i}"})
    assert len(calls) == 1
    for modes in (["normal"], ["cpr-reboot"], ["normal"]):
        validator.check({"reason": "r", "modes": modes})
    assert len(calls) == 3  # enum values are part of the shape
    for bad in ({"reason": 1}, {"reason": True}, {"reason": 1}):
        with pytest.raises(QMPError, match="expected: string"):
            validator.check(bad)
    assert len(calls) == 5  # 1 and True are different shapes: a bool is no integer
    with pytest.raises(QMPError, match="'modes\\[0\\]' does not accept value 'nope'"):
        validator.check({"reason": "r", "modes": ["nope"]})
    big = {"reason": "r", "modes": ["normal"] * 100}
    validator.check(big)
    validator.check(big)
    assert len(calls) == 8  # too big to cache: judged each time


def test_schemas_beyond_the_generator_fall_back_to_jsonschema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array", "minItems": 2}}}
    validator = ArgumentValidator(schema)
    with pytest.raises(QMPError, match=r"^Parameter 'a' is invalid: \[1\] is too short$"):
        validator.check({"a": [1]})
    validator.check({"a": [1, 2]})


def test_recursive_definitions() -> None:
    schema = {
        "type": "object",
        "properties": {"tree": {"$ref": "#/$defs/Tree"}},
        "additionalProperties": False,
        "$defs": {"Tree": {"type": "object", "properties": {
            "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}},
            "name": {"type": "string"}}, "additionalProperties": False}},
    }
    validator = ArgumentValidator(schema)
    validator.check({"tree": {"kids": [{"kids": [{"name": "x"}]}]}})
    with pytest.raises(QMPError, match=r"'tree\.kids\[0\]\.kids\[1\]\.name', expected: string"):
        validator.check({"tree": {"kids": [{"kids": [{}, {"name": 1}]}]}})


# --------------------------------------------------------------------------- output


WEIRD = "\x00\x1f\x7f \u2028\u2029 \ufeff \U0001f600 \\ \" / \r\n\t é"


def test_weird_reasons_round_trip_exactly_in_strict_ascii_json() -> None:
    world = Daemonless()
    s = world.session()
    request = json.dumps({"execute": "add-blocker", "id": WEIRD,
                          "arguments": {"reason": WEIRD, "id": "weird"}}, ensure_ascii=False)
    out = world.feed(s, request.encode())
    assert [m.get("event") for m in out] == ["BLOCKER_ADDED", None]
    assert out[0]["data"]["reason"] == WEIRD
    assert out[1]["return"]["reason"] == WEIRD and out[1]["id"] == WEIRD
    (listing,) = world.feed(s, b'{"execute": "query-blockers"}')
    assert listing["return"][0]["reason"] == WEIRD
    (migrate,) = world.feed(s, b'{"execute": "migrate", "arguments": {"uri": "tcp:h:1"}}')
    assert migrate == {"error": {"class": "GenericError", "desc": WEIRD}}
    (query,) = world.feed(s, b'{"execute": "query-migrate"}')
    assert query == {"return": {"blocked-reasons": [WEIRD]}}


def test_generated_ids_cannot_be_chosen_or_clash() -> None:
    world = Daemonless()
    s = world.session()
    out = world.feed(s, b'{"execute": "add-blocker", "arguments": {"reason": "a", '
                        b'"id": "#blocker0"}}')
    assert out == [{"error": {"class": "GenericError",
                              "desc": "Parameter 'id' expects an identifier"}}]
    out = world.feed(s, b'{"execute": "add-blocker", "arguments": {"reason": "a"}}')
    assert out[-1]["return"]["id"] == "#blocker0"
    out = world.feed(s, b'{"execute": "del-blocker", "arguments": {"id": "#blocker0"}}')
    assert out[-1] == {"return": {}}
    # Serial numbers are never reused, even after the blocker is gone.
    out = world.feed(s, b'{"execute": "add-blocker", "arguments": {"reason": "b"}}')
    assert out[-1]["return"]["id"] == "#blocker1"


@pytest.mark.parametrize("last", [b'\\uDBFF', b'\\uDBFF\\uDFFF', b'\xef\xbf\xbe', b'\\uD800'])
def test_a_repeated_key_after_valid_surrogate_pairs_is_named_before_a_later_bad_string(
    last: bytes,
) -> None:
    """Checked against QEMU 7.2: a pair's high half alone is no character, so the
    old search over prefixes (which took every longer prefix of a refused one to be
    refused too) stopped inside the valid pair and named the later string, not the
    repeated key that QEMU's parser meets first."""
    world = Daemonless()
    s = world.session()
    bad = b'{"a": 1, "s": "\\uD800\\uDC00", "a": 2, "t": "' + last + b'"}'
    out = world.feed(s, bad + PROBE)
    assert out[0] == {"error": {"class": "GenericError",
                                "desc": "JSON parse error, duplicate key"}}, out[0]
    assert out[-1]["id"] == "probe" and len(out) == 2, out

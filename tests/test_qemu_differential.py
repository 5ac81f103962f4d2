"""The same bytes to a real QEMU 7.2 and to migblockd: the same reply bytes.

Each case is sent on a fresh, negotiated connection to QEMU's monitor and to the
daemon, followed by a marker request; everything each answers before the marker
must be byte for byte the same, but for the version in ``query-version``.
Where migblockd deliberately differs (docs/protocol.md), the case is not here,
but for the cases of malformed input compared by :func:`same_outcome`, which
allows for one of those differences: one error for a bad message where QEMU
may give several.  The seeded generator at the end makes such cases.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections.abc import Iterator, Sequence

import pytest
from conftest import DaemonProcess
from realqemu import Qemu

MARKER = b'{"execute": "query-version", "id": "marker"}'
_VERSION = re.compile(rb'"return": \{"qemu": \{[^{}]*\}, "package": "[^"]*"\}')


@pytest.fixture(scope="module")
def module_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    qemu = Qemu(tmp_path_factory.mktemp("qemu"))
    qemu.start()
    yield qemu
    qemu.kill()


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def connect(path: object) -> socket.socket:
    """A connection to ``path``.  QEMU serves one client per monitor and listens
    again only once it has closed the last one: a connection made right after
    that may be refused, so it is tried again (for up to 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        return sock


def answers(path: object, data: bytes | Sequence[bytes], *, oob: bool = False,
            negotiate: bool = True) -> bytes:
    """What the server at ``path`` answers ``data`` (or its pieces, each written
    on its own) with, up to the marker's reply."""
    with connect(path) as sock:
        read_line(sock)  # the greeting
        if negotiate:
            enable = b', "arguments": {"enable": ["oob"]}' if oob else b""
            sock.sendall(b'{"execute": "qmp_capabilities"' + enable + b"}")
            assert read_line(sock) == b'{"return": {}}\r\n'
        for piece in [data] if isinstance(data, bytes) else data:
            sock.sendall(piece)
        sock.sendall(MARKER)
        out = b""
        while b'"id": "marker"' not in (line := read_line(sock)):
            out += line
        return _VERSION.sub(b'"return": "VERSION"', out)


def same_answers(qemu: Qemu, daemon: DaemonProcess, data: bytes, *, oob: bool = False) -> None:
    theirs = answers(qemu.test_socket, data, oob=oob)
    assert theirs, "QEMU answered nothing: not a case"
    assert answers(daemon.socket, data, oob=oob) == theirs


def outcome(stream: bytes) -> list[object]:
    """A reply stream as :func:`same_outcome` compares it: each line's JSON value
    (numbers as floats, members in any order: an echoed ``id`` keeps its value,
    not QEMU's form, docs/protocol.md), and of a run of errors without ``id``,
    the first only (one error per bad message where QEMU may give several)."""
    out: list[object] = []
    run = False
    for line in stream.splitlines():
        error = line.startswith(b'{"error": ')
        if not (error and run):
            out.append(json.loads(line, parse_int=float))
        run = error
    return out


def same_outcome(qemu: Qemu, daemon: DaemonProcess, data: bytes | Sequence[bytes], *,
                 oob: bool = False, negotiate: bool = True) -> None:
    theirs = answers(qemu.test_socket, data, oob=oob, negotiate=negotiate)
    ours = answers(daemon.socket, data, oob=oob, negotiate=negotiate)
    assert outcome(ours) == outcome(theirs), (theirs, ours)


#: Requests with several things wrong: QEMU reports the member it meets first in
#: its QDict's order (qapi/qmp-dispatch.c, qobject/qdict.c).
ENVELOPE = [
    b'{"x": 1, "arguments": 1, "execute": 1}',
    b'{"foo": 1, "execute": 5, "id": 1}',
    b'{"bar": 1, "execute": 5, "id": 1}',
    b'{"execute": "query-version", "foo": 1, "bar": 2, "id": 1}',
    b'{"arguments": 5, "zz": 1, "id": 1}',
    b'{"exec-oob": 5, "execute": 5, "id": 1}',
    b'{"exec-oob": "x", "arguments": 5, "id": 1}',
    b'{"execute": "nope", "x": 1}',
]
ENVELOPE_OOB = [
    b'{"execute": 5, "exec-oob": 5, "id": 1}',
    b'{"execute": "query-version", "exec-oob": 5, "id": 1}',
    b'{"execute": "query-version", "exec-oob": "query-version", "id": 1}',
    b'{"execute": "nope", "exec-oob": "nope", "id": 1}',
    b'{"execute": "query-version", "exec-oob": "query-version", "arguments": 5, "id": 1}',
    b'{"exec-oob": "nope", "arguments": 5, "id": 1}',
]


@pytest.mark.parametrize("data", ENVELOPE, ids=[c.decode() for c in ENVELOPE])
def test_envelope_errors(module_qemu: Qemu, module_daemon: DaemonProcess, data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


@pytest.mark.parametrize("data", ENVELOPE_OOB, ids=[c.decode() for c in ENVELOPE_OOB])
def test_envelope_errors_with_oob(module_qemu: Qemu, module_daemon: DaemonProcess,
                                  data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data, oob=True)


#: What QEMU writes back: escapes as its JSON writer prints them (qobject/json-writer.c).
ECHOES = [
    '{"execute": "query-version", "id": "caf\u00e9 \U0001f600 \x7f"}'.encode(),
    b'{"execute": "query-version", "id": "\\u00e9\\u001b\\ud83d\\ude00\\\\u00ff"}',
    b'{"execute": "query-version", "id": ["\\u00ff", {"k": "\\u0100"}]}',
    b'{"execute": "n\\u00e9"}',
]


@pytest.mark.parametrize("data", ECHOES, ids=[repr(c)[2:-1] for c in ECHOES])
def test_echoes(module_qemu: Qemu, module_daemon: DaemonProcess, data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


#: QEMU's parser takes \' for an apostrophe in any string (qobject/json-parser.c).
APOSTROPHES = [
    b'{"execute": "query-version", "id": "it\\\'s"}',
    b'{"execute": "query-version", "id": "a\\\\\'b"}',
    b'{"execute": "query-version", "id": {"it\\\'s": 1, "it\'s": 2}}',
    # ... before what else is wrong after them
    b'{"execute": "query-version", "id": {"it\\\'s": 1, "it\'s": 2, "k": "\\uffff"}}',
    b'{"execute": "query-version", "id": {"it\\\'s": 1, "it\'s": 2, "k": truex}}',
    b'{"execute": "query-version", "id": {"it\\\'s": 1, "it\'s": 2 "k": 1}}',
    b'{"execute": "query-version", "id": [{"it\\\'s": 1, "it\'s": 2}, "\\ud800"]}',
    b'{"execute": "query-version",\n "id": "\\\'"}',
    b'{"execute": "query-version", "id": "\\\'\\q"}',
]


@pytest.mark.parametrize("data", APOSTROPHES, ids=[repr(c)[2:-1] for c in APOSTROPHES])
def test_escaped_apostrophes(module_qemu: Qemu, module_daemon: DaemonProcess,
                             data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


#: What QEMU takes for a character in a string (util/unicode.c, mod_utf8_codepoint()
#: and is_valid_codepoint(); qobject/json-parser.c, parse_string()): no surrogates,
#: none of Unicode's 66 noncharacters, and C0 80 (modified UTF-8) for U+0000.
CHARACTERS = [
    b'{"execute": "query-version", "id": "\\uffff"}',
    b'{"execute": "query-version", "id": "\\uFDD0"}',
    b'{"execute": "query-version", "id": "\\ufdef\\ufdf0"}',
    b'{"execute": "query-version", "id": "\\udbff\\udfff"}',
    b'{"execute": "query-version", "id": "\\uD83F\\uDFFE"}',
    b'{"execute": "query-version", "id": "\\ud83d\\ude00\\ud800\\u0041"}',
    b'{"execute": "query-version", "id": "\\\\uffff"}',
    b'{"execute": "query-version", "id": "\xef\xbf\xbf"}',
    b'{"execute": "query-version", "id": "\xef\xb7\x90"}',
    b'{"execute": "query-version", "id": "\xf4\x8f\xbf\xbe"}',
    b'{"execute": "query-version", "id": "\xef\xbf\xbd\xef\xb7\xaf"}',
    b'{"execute": "query-version", "id": ["\\uffff", "\xef\xbf\xbf"]}',
    b'{"execute": "query-version", "id": ["\xef\xbf\xbf", "\\uffff"]}',
    b'{"execute": "query-version", "id": "a\xc0\x80b"}',
    b'{"execute": "query-version\xc0\x80"}',
    b'{"execute": "query-version", "id": "\\\\\xc0\x80"}',
    # QEMU reads a string's characters in order: an escape that is no character
    # before a byte that is not UTF-8 is the error, unless a bad escape is first.
    b'{"execute": "query-version", "id": "\x7f\\udc00\xc3x"}',
    b'{"execute": "query-version", "id": "\\\\x\\udc00\xc3x"}',
    b'{"execute": "query-version", "id": "\\x\\udc00\xc3x"}',
    b'{"execute": "query-version", "id": "\\ud800\\u0041\xc3x"}',
    b'{"execute": "query-version", "id": "\\ufdd0\xc0\xafx"}',
    b'{"execute": "query-version", "id": "\\u00e9\xc3x"}',
    # ... or in an earlier string.
    b'{"execute": "query-version", "id": "\\uD800\\u0041x", "execu\x80te": "x"}',
    b'{"execute": "query-version", "id": ["\\ufdd0", "\\x", "\x80"]}',
    # A repeated key is refused once its pair's value is read, a number out of a
    # double's range never: a string that is no character before is the error.
    b'{"execute": {"k0": "\\uD800\\u0041x"}, "id": 1, "id": 2}',
    b'{"execute": "query-version", "id": 1, "id": "\\uD800"}',
    b'{"execute": "query-version", "id": [1, 2], "x": "\\ufdd0", "id": 2}',
    b'{"execute": "query-version", "id": {"a": 1, "a": 2}, "x": "\\uffff"}',
    b'{"execute": "query-version", "id": [1e400, "\\uffff"]}',
    # ... in an array's element read whole, too (parse_array()).
    b'{"execute": "query-version", "id": [{"a": 1, "a": 2}, "\\uffff"]}',
    b'{"execute": "query-version", "id": [[{"": [], "": []}], "\xf4\x8f\xbf\xbf"]}',
    b'{"execute": "query-version", "id": [{"a": 1, "a": 2} "\\ud800"]}',
    # A repeated key whose pair is whole comes before a byte that is not UTF-8 and
    # before a bad keyword, which are its parser's errors; a backslash before such
    # a byte is an escape it refuses.
    b'{"execute": "x", "execute": "x", "arguments": ["\xc3x"]}',
    b'{"execute": "x", "arguments": ["\xc3x"], "execute": "x"}',
    b'{"execute": "x", "id": ["\\uffff", {"a": 1, "a": 2}, "\xc3x"]}',
    b'{"execute": "x", "id": [{"k": "\\ud800", "a": 1, "a": 2}, "\xc3x"]}',
    b'{"execute": "x", "id": [{"it\\\'s": 1, "it\'s": 2}, "\xc3x"]}',
    b'{"execute": "x", "id": ["\xe4\xb8\xad\xe6\x96\x87", "\\ud800", "\xc3x"]}',
    b'{"execute": "x", "id": {"\xc3\xa9\xc3\xa9\xc3\xa9": "\\uffff", "k": "\xc3x"}}',
    b'{"execute": "x", "id": [{"\xc3": 0e5,\n "b": 1}]}\n',
    b'{"execute": "x", "id": [["\xc3x"],\n 1 2,\n 3]}\n',
    b'{"execute": "x", "id": [{"a": 0.5,\n "k": "\\uffff", "a": 1},\n 1]}\n',
    b'{"execute": "x", "id": {"\xc0\x80": 1, "b": [,\n]}}\n',
    b'{"execute": "x", "id": {"\xc0\x80": "\\ud800", "k": "\xc3x"}}',
    b'{"execute": "x", "id": {"\xc0\x80": nul, "k": "\xc3x"}}',
    b'{"execute": "x", "id": ["\xc0\x80", "\\q", "\xc3x"]}',
    b'{"execute": "x", "execute": "x", "arguments": truex}',
    # ... but not one whose value is a keyword that begins as a literal.
    b'{"execute": "x", "id": {"a": [], "a": truex}}',
    b'{"execute": "x", "id": "\\\xc0\x80u"}',
    b'{"execute": "x", "id": "\\\\\\\xc3x"}',
    # A string token where none may be is refused before its bytes are read.
    b'{"execute": 1234567890"\\\'\xc3x"}',
    b'{"execute": "x", "id": [1 "\xc3"]}',
    # A lone surrogate, then a \u escape cut short by the end of what was parsed.
    b'{"execute": "nope", "id": {"k0": "\\uD800\\u0041\\x41x", "k1":} true}',
    # A message a closer that does not match ends: its strings are read in order
    # before its parser stops, so one not UTF-8 is the error, unless one before it is.
    b'{"execute": "x", "id\xc1" 1]',
    b'["execute", "\xed\xa0\x80", 1}',
    b'{"execute": "x", "id": "\xc3x" 1]',
    b'{"execute": "x" 1, "id": "\xc3x"]',
    b'{"execute": "x", "id": "\\q\xc3x"]',
    b'{"execute": "x", "id": "\xc0\x80" 1]',
]


#: QEMU reads a number out of a double's range as infinity, which migblockd refuses
#: (docs/protocol.md); but an error QEMU's parser finds elsewhere in the message is
#: the one both name.
OUT_OF_RANGE = [
    b'{"execute": "query-version", "id": [1e400, "\xc3x"]}',
    b'{"execute": "query-version", "id": [-1e400 1]}',
    b'{"execute": "query-version", "id": [1e400, {"a": 1, "a": 2}]}',
    b'{"execute": "query-version", "id": {"a": 1e400, "b": truex}}',
    b'{"execute": "query-version", "id": [' + b"9" * 5000 + b" 1]}",
    b'{"execute": "query-version",\n "id": [1e400,\n truex]}\n',
    b'{"execute": "query-version", "id": {"a": -1e400, "b": nul, "\\uffff": 1}}',
    b'{"execute": "query-version", "id": {"a": [1e400, 0e5], "\\uffff": 1}}',
]


@pytest.mark.parametrize("data", OUT_OF_RANGE, ids=[repr(c)[2:-1][:80] for c in OUT_OF_RANGE])
def test_an_error_besides_a_number_out_of_range(module_qemu: Qemu,
                                                module_daemon: DaemonProcess,
                                                data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


@pytest.mark.parametrize("data", CHARACTERS, ids=[repr(c)[2:-1] for c in CHARACTERS])
def test_what_is_a_character(module_qemu: Qemu, module_daemon: DaemonProcess,
                             data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


#: Of several unexpected arguments, QEMU names the first its input visitor's glib
#: hash table holds (qapi/qobject-input-visitor.c, qobject_input_check_struct()).
UNEXPECTED = [
    b'{"execute": "query-migrate", "arguments": {"foo": 1, "bar": 2}}',
    b'{"execute": "query-migrate", "arguments": {"a": 1, "b": 2, "c": 3}}',
    b'{"execute": "query-migrate",'
    b' "arguments": {"c": 1, "b": 2, "a": 3, "d": 4, "e": 5, "f": 6, "g": 7}}',
    b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 5, "zz": 1, "yy": 2}}',
    b'{"execute": "migrate-set-capabilities",'
    b' "arguments": {"capabilities": [{"capability": "events", "state": true, "x": 1, "y": 2}]}}',
    b'{"execute": "qmp_capabilities", "arguments": {"p": 1, "q": 2, "\\u00e9": 3}}',
    # Eight names and more: the table grows, and its names move.
    b'{"execute": "query-migrate",'
    b' "arguments": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7, "h": 8, "i": 9}}',
    b'{"execute": "migrate-set-parameters", "arguments": {"zz1": 1, "zz2": 2, "zz3": 3,'
    b' "zz4": 4, "zz5": 5, "zz6": 6, "max-bandwidth": 0, "downtime-limit": 0}}',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability":'
    b' "events", "state": true, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}]}}',
    # Taking the five known members shrinks the table of eight: 'e' moves first.
    b'{"execute": "migrate", "arguments": {"uri": "unix:/nonexistent", "blk": false,'
    b' "inc": false, "detach": true, "resume": false, "a": 1, "b": 2, "e": 3}}',
]


@pytest.mark.parametrize("data", UNEXPECTED, ids=[repr(c)[2:-1] for c in UNEXPECTED])
def test_which_unexpected_argument(module_qemu: Qemu, module_daemon: DaemonProcess,
                                   data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


#: Of two bad arguments, the first in QEMU's member order is named: its
#: MigrateSetParameters (qapi/migration.json) has mode after the limits, and
#: QEMU 7.2, which has no mode, names an unexpected member only when nothing
#: else is wrong: the limit, either way.
MEMBER_ORDER = [
    b'{"execute": "migrate-set-parameters", "arguments": {"mode": 5, "downtime-limit": "x"}}',
    b'{"execute": "migrate-set-parameters", "arguments": {"mode": "x", "max-bandwidth": "y"}}',
]


@pytest.mark.parametrize("data", MEMBER_ORDER, ids=[c.decode() for c in MEMBER_ORDER])
def test_which_bad_argument(module_qemu: Qemu, module_daemon: DaemonProcess,
                            data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


#: QEMU's parser reads an object's key as a value first (qobject/json-parser.c,
#: parse_pair()): a literal is a value that is not a string, a bad keyword no value.
KEYS = [
    b'{false "execute": "nope"}',
    b'{"execute": "nope", null: 1}',
    b'{"a": {true}}',
    b'{truex: 1}',
]


@pytest.mark.parametrize("data", KEYS, ids=[c.decode() for c in KEYS])
def test_a_key_that_is_no_string(module_qemu: Qemu, module_daemon: DaemonProcess,
                                 data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)


#: After its lexer's error QEMU forgets the message, brackets still open included
#: (qobject/json-streamer.c), and reads on: the request glued after it runs.
RECOVERY = [
    b'{"a": [+, "b": 1}{"execute": "query-version", "id": 2}',
    b'{"a": [{"b": 1.}{"execute": "query-version", "id": 2}',
    b'[{"c": 01]{"execute": "query-version", "id": 2}',
    b'{"a": [01, \'x\'}{"execute": "query-version", "id": 2}',
    b'{"a": [+, {"execute": "query-version", "id": 3}}',
    # What is left of the broken message after a request in it is garbage with an
    # error of its own, as QEMU answers it (one for each of its tokens).
    b'{"a": [+, {"execute": "query-version", "id": 3}, "b": 1]}',
    b'{"a": [+, {"execute": "query-version", "id": 3}, [1, 2]]}',
    b'{"a": {"b": [-x, {"execute": "query-version", "id": 3}]}}',
    b'{"a": {+}}{"execute": "query-version", "id": 2}',
    # A string after garbage is one to QEMU's lexer: a "{" in it begins nothing.
    b'] "{x"}{"execute": "query-version", "id": 5}',
    b'{"a": +, "b": "{x"}{"execute": "query-version", "id": 5}',
    b'nope "{" {"execute": "query-version", "id": 5}',
    # After its lexer's error QEMU skips to a structural or control character, a
    # quote on the way beginning no string.
    b'{"execute": "q\tuery-migrate"}{"execute": "query-version", "id": 6}',
    b'{"a": "x\x01y", "b": "{z"}{"execute": "query-version", "id": 6}',
    b'+uery"}{"execute": "query-version", "id": 6}',
    # The byte that cuts a number short is in the stray token: no request begins.
    b'1e+{"execute": "query-version", "id": 1}',
    b'-{"execute": "query-version", "id": 1}\n{"execute": "query-version", "id": 2}',
    b'{"a": 1.{"execute": "query-version", "id": 1}',
    # Whole in one write: the lexer's error comes before the line feed, or the byte
    # the scan stops at, and the request after it runs all the same.
    b'{\xc3\xa9-{"execute": "query-version", "id": 7}\n',
    b'[+{"execute": "query-version", "id": 7}\xff',
    # A carriage return ends the skipping after a reset byte: a string begins.
    b'\xff\r"{"execute": "query-version", "id": 8}"\n',
]


@pytest.mark.parametrize("data", RECOVERY, ids=[repr(c)[2:-1] for c in RECOVERY])
def test_a_request_after_a_lexical_error_runs(module_qemu: Qemu, module_daemon: DaemonProcess,
                                              data: bytes) -> None:
    same_outcome(module_qemu, module_daemon, data)
    # The same, a byte at a time: QEMU's lexer answers as the bytes arrive.
    same_outcome(module_qemu, module_daemon, [data[i : i + 1] for i in range(len(data))])


#: A bad keyword at the top level, then a reset byte: QEMU's lexer ends the keyword
#: at it, its parser answers the keyword, and the reset byte is an error of its own.
KEYWORD_THEN_RESET = [
    b'tru\x00{"execute": "query-version", "id": 1}',
    b'x\x1b{"execute": "query-version", "id": 2}',
    b'nul\xff {"execute": "query-version", "id": 3}',
    b'12x\x0b{"execute": "query-version", "id": 4}',
    b'{"execute": "query-version", "id": 5}tru\x0c{"execute": "query-version", "id": 6}',
]


@pytest.mark.parametrize("data", KEYWORD_THEN_RESET,
                         ids=[repr(c)[2:-1] for c in KEYWORD_THEN_RESET])
def test_a_reset_byte_after_a_bad_keyword(module_qemu: Qemu, module_daemon: DaemonProcess,
                                          data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)
    # The reset byte in a write of its own, as a client resetting after garbage sends it.
    at = next(i for i, c in enumerate(data) if c in b"\x00\x0b\x0c\x1b\xff")
    assert answers(module_daemon.socket, [data[:at], data[at:]]) == answers(
        module_qemu.test_socket, [data[:at], data[at:]])


def same_outcome_but_first_error(qemu: Qemu, daemon: DaemonProcess,
                                 data: bytes | Sequence[bytes]) -> None:
    """As :func:`same_outcome`, the errors' wording aside: after a closer that does
    not match, migblockd names it where QEMU names a lexical error further on
    (docs/protocol.md)."""
    def masked(stream: bytes) -> list[object]:
        return [{"error": "..."} if isinstance(v, dict) and "error" in v and "id" not in v
                else v for v in outcome(stream)]
    theirs = answers(qemu.test_socket, data)
    ours = answers(daemon.socket, data)
    assert masked(ours) == masked(theirs), (theirs, ours)


_R = b'{"execute": "query-version", "id": "R"}'
#: Bad messages after which QEMU's streamer starts over where migblockd once waited
#: (for a bracket, or a line feed) or began a request QEMU does not run.
RESTARTS = [
    # A closer that does not match, then a token QEMU's lexer fails at: its streamer
    # forgets the message there, the "[" still open with it.
    b'{"a": [}+' + _R,
    b'{"a": [}@' + _R,
    b'{"a": [}01 ' + _R,
    b'{"a": [}\xc3\xa9' + _R,
    b'{"a": [} + ' + _R,
    # A reset byte, then a quote: QEMU's lexer skips to the "{" in the string, and
    # its errors in the "message" that begins there put it back in step.
    b'\x1b"{"' + _R,
    b'\x01"{"' + _R,
    b'\x1b"a\\q"x"{"' + _R,
    b'\x1b x"{"' + _R,
    # Garbage, then "[": an array begins, which is no request, whatever it holds.
    b'x[' + _R + b']',
    b'][' + _R + b']',
    b'\x01[' + _R + b']',
    b'\xff[' + _R + b']',
    b'x [1, ' + _R + b']',
    # A stray closer, then a token that takes the "{" with it.
    b']-' + _R,
    b'}-' + _R,
    b']1.' + _R,
    # A string in garbage broken by a tab, a carriage return or a line feed: the
    # lexer's error, after which a quote begins no string.
    b']"\t"' + _R,
    b']"a\tb"' + _R,
    b']"\r"' + _R,
    b'x"ab\ncd"' + _R,
    # A single-quoted string at the top level: a "{" in it begins nothing.
    b"'{'" + _R,
]


#: A bad escape on a complete line of a message that goes on: one error, and the
#: request glued after the message runs.
BAD_ESCAPE_LINES = [
    b'{"execute": "query-version", "id": "\\u", "x": "{"\n}' + _R,
    b'{"execute": "query-version", "id": "\\u", "x": {\n}}' + _R,
    b'{"execute": "query-version", "id": ["\\q"], "x": "]"\n}' + _R,
]


#: A line feed in a string of a message's rest skipped after an error on a line:
#: QEMU's lexer fails there, and the request glued after the message runs.
LINE_FEED_IN_SKIPPED_STRING = [
    b'{"execute": "query-version", "id": 1 2,\n "y": "\n"}' + _R,
    b'{"execute": "query-version", "id": [1 2],\n "y": "{\n"}' + _R,
]


@pytest.mark.parametrize("data", LINE_FEED_IN_SKIPPED_STRING,
                         ids=[repr(c)[2:60] for c in LINE_FEED_IN_SKIPPED_STRING])
def test_a_line_feed_in_a_skipped_string_then_a_request(module_qemu: Qemu,
                                                        module_daemon: DaemonProcess,
                                                        data: bytes) -> None:
    # The error differs: migblockd answers the line's at its line feed, before
    # QEMU's lexer meets the next (docs/protocol.md); then the same.
    theirs = outcome(answers(module_qemu.test_socket, data))
    pieces = [data[i : i + 1] for i in range(len(data))]
    for ours in (outcome(answers(module_daemon.socket, each)) for each in (data, pieces)):
        errors = [isinstance(first, dict) and "error" in first for first in (ours[0], theirs[0])]
        assert errors == [True, True] and ours[1:] == theirs[1:], (theirs, ours)


@pytest.mark.parametrize("data", BAD_ESCAPE_LINES, ids=[repr(c)[2:60] for c in BAD_ESCAPE_LINES])
def test_a_bad_escape_in_a_line_then_a_request(module_qemu: Qemu, module_daemon: DaemonProcess,
                                                data: bytes) -> None:
    same_answers(module_qemu, module_daemon, data)
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert answers(module_daemon.socket, pieces) == answers(module_qemu.test_socket, data)


@pytest.mark.parametrize("data", RESTARTS, ids=[repr(c)[2:-1] for c in RESTARTS])
def test_where_qemu_starts_over(module_qemu: Qemu, module_daemon: DaemonProcess,
                                data: bytes) -> None:
    same_outcome_but_first_error(module_qemu, module_daemon, data)
    same_outcome_but_first_error(module_qemu, module_daemon,
                                 [data[i : i + 1] for i in range(len(data))])


_PRETTY = json.dumps({"execute": "query-version", "arguments": {
    "capabilities": [{"capability": "events", "state": False}]}, "id": 1}, indent=2).encode()
#: A pretty-printed request with one fault its parser finds: QEMU's parser sees the
#: message once its brackets balance, and answers it once.
PRETTY = [
    _PRETTY.replace(b'"events",', b'"events"'),
    _PRETTY.replace(b'"capability":', b'"capability"'),
    _PRETTY.replace(b"    ]\n", b"    ],\n"),
    _PRETTY.replace(b'"state": false', b'"state": false nope'),
    _PRETTY.replace(b"\n    ]", b"\n    }"),
    _PRETTY.replace(b"      }", b'      }\n      {"capability": "x"}'),
]


@pytest.mark.parametrize("data", PRETTY, ids=range(len(PRETTY)))
def test_a_pretty_printed_bad_request_gets_one_error(module_qemu: Qemu,
                                                     module_daemon: DaemonProcess,
                                                     data: bytes) -> None:
    data += b"\n"
    same_answers(module_qemu, module_daemon, data)
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert answers(module_daemon.socket, pieces) == answers(module_qemu.test_socket, data)


# -- a seeded generator of hostile requests -----------------------------------------
# Requests made from the envelope's members, with values and bytes QEMU's lexer and
# parser refuse or take oddly, glued two to a write or split at odd offsets, sent
# before or after negotiation.  Left out, as docs/protocol.md
# says migblockd differs there on purpose: numbers out of a double's range (QEMU
# takes 1e400 as inf), and line feeds inside a message (an unfinished message's
# complete lines are checked at each line feed).  A case either breaks the
# request's bytes (lexical) or its structure (a stray bracket or separator), not
# both: after a closer that does not match, migblockd reports its parser's error
# where QEMU reports a lexical error further on (docs/protocol.md).

FUZZ_SEED = 35
FUZZ_CASES = 60

_NUMBERS = [b"-0", b"-0.0", b"1e-400", b"123456789012345678901234567890", b"0x1", b"01",
            b"1.", b".5", b"-", b"+1", b"1e", b"1e+", b"0e5", b"0.0e5", b"9223372036854775808",
            b"18446744073709551615", b"1E5", b"1.5e308", b"NaN", b"Infinity", b"0", b"42"]
_KEYWORDS = [b"true", b"false", b"null", b"True", b"nul", b"truex"]
_ESCAPES = [b"\\u0000", b"\\ud800", b"\\udc00", b"\\ud83d\\ude00", b"\\uD800\\u0041",
            b"\\x41", b"\\u12", b"\\q", b"\\/", b"\\b\\f\\n\\r\\t", b"\\'", b"\\uffff",
            b"\\u00e9", b"\\\\" * 300]
_RAW = [b"\xff", b"\xfe", b"\xc0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\x80",
        b"\xc3", b"\xf4\x90\x80\x80", b"\xc3\xa9", b"\x7f", b"\x01", b"\x00", b"\t", b"\x0c",
        b"\x1b", b"\xef\xbf\xbf"]
_BLANKS = [b" ", b"\t", b"\r", b"  ", b"\x0c", b"\xc2\xa0"]
_COMMANDS = [b'"query-version"', b'"qmp_capabilities"', b'"nope"', b'"query-migrate"']


def _string(r: random.Random, lexical: bool) -> bytes:
    parts = [r.choice(_ESCAPES) if r.random() < 0.5 or not lexical else r.choice(_RAW)
             for _ in range(r.randint(0, 3))]
    return b'"' + b"".join(parts) + b'x"'


def _value(r: random.Random, lexical: bool, depth: int = 0) -> bytes:
    k = r.random()
    if k < 0.3:
        return r.choice(_NUMBERS) if lexical else b"42"
    if k < 0.4:
        return r.choice(_KEYWORDS) if lexical else b"true"
    if k < 0.65 or depth > 2:
        return _string(r, lexical)
    items = [_value(r, lexical, depth + 1) for _ in range(r.randint(0, 3))]
    if k < 0.8:
        return b"[" + b", ".join(items) + b"]"
    return b"{" + b", ".join(b'"k%d": ' % i + v for i, v in enumerate(items)) + b"}"


def _request(r: random.Random, lexical: bool) -> bytes:
    members = [(b'"execute"', r.choice(_COMMANDS) if r.random() < 0.8 else _value(r, lexical))]
    for name, odds in ((b'"id"', 0.6), (b'"arguments"', 0.3), (b'"exec-oob"', 0.15),
                       (b'"control"', 0.1)):
        if r.random() < odds:
            members.append((name, r.choice(_COMMANDS) if name == b'"exec-oob"'
                            else b'{"enable": ["oob"]}' if r.random() < 0.3
                            else _value(r, lexical)))
    if r.random() < 0.1:
        members.append(r.choice(members))  # a repeated key
    r.shuffle(members)

    def blank() -> bytes:
        return r.choice(_BLANKS) if lexical and r.random() < 0.2 else b" "
    text = b"{" + b",".join(blank() + k + blank() + b":" + blank() + v for k, v in members) + b"}"
    if r.random() < 0.5:
        at = r.randint(0, len(text))
        # No stray opener: QEMU would wait for its closer, and not answer the marker.
        insert = r.choice([b"}", b"]", b",", b":"]) if not lexical else r.choice(
            _RAW + _NUMBERS + _KEYWORDS)
        text = text[:at] + insert + text[at:]
    return text


def fuzz_cases() -> list[tuple[list[bytes], bool, bool]]:
    """``(pieces, negotiate, oob)`` for each case, the same at every run."""
    r = random.Random(FUZZ_SEED)
    cases = []
    for _ in range(FUZZ_CASES):
        lexical = r.random() < 0.6
        data = b"".join(_request(r, lexical) for _ in range(r.randint(1, 2)))
        cuts = sorted(r.sample(range(1, len(data)), r.randint(0, 3)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        # OOB stays off: with it on, QEMU 7.2 now and then aborts on such a burst
        # (docs/protocol.md); the envelope cases above cover OOB.
        cases.append((pieces, r.random() < 0.85, False))
    return cases


def test_seeded_hostile_requests(module_qemu: Qemu, module_daemon: DaemonProcess) -> None:
    for number, (pieces, negotiate, oob) in enumerate(fuzz_cases()):
        try:
            same_outcome(module_qemu, module_daemon, pieces, negotiate=negotiate, oob=oob)
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"case {number} {pieces!r} (negotiate={negotiate},"
                                 f" oob={oob}): {exc!r}") from exc


#: SocketAddress bodies QEMU's visitor refuses (qapi/sockets.json).  QEMU 7.2 has
#: no migrate channels, but visits the same union as blockdev-add's nbd ``server``;
#: migblockd's simulation visits it as a migrate channel's socket address.  Enum
#: and sized-integer errors are left out: QEMU names only the member there
#: (docs/protocol.md), and so are members newer than 7.2's.
SOCKET_ADDRESSES = [
    {},
    {"path": "/x"},
    {"type": "inet"},
    {"type": "inet", "port": "1", "path": "/x"},
    {"type": "inet", "host": "h"},
    {"type": "inet", "host": "h", "port": 1},
    {"type": "inet", "host": "h", "port": "1", "ipv4": "yes"},
    {"type": "inet", "host": "h", "port": "1", "keep-alive": 1},
    {"type": "inet", "host": "h", "port": "1", "bogus": 1},
    {"type": "unix"},
    {"type": "unix", "path": "/x", "tight": "no"},
    {"type": "unix", "path": "/x", "host": "h"},
    {"type": "unix", "path": "/x", "a": 1, "b": 2, "c": 3},
    {"type": "vsock", "port": "1"},
    {"type": "vsock", "cid": "3"},
    {"type": "fd"},
    {"type": "fd", "str": 3},
]


@pytest.mark.parametrize("body", SOCKET_ADDRESSES, ids=[json.dumps(b) for b in SOCKET_ADDRESSES])
def test_a_socket_address_is_refused_in_qemus_words(module_qemu: Qemu,
                                                    module_daemon: DaemonProcess,
                                                    body: dict[str, object]) -> None:
    nbd = {"driver": "nbd", "node-name": "n", "server": body}
    theirs = answers(module_qemu.test_socket, json.dumps(
        {"execute": "blockdev-add", "arguments": nbd}).encode())
    addr = {"transport": "socket", **body}
    ours = answers(module_daemon.socket, json.dumps(
        {"execute": "migrate", "arguments": {"channels": [
            {"channel-type": "main", "addr": addr}]}}).encode())
    desc = json.loads(theirs)["error"]["desc"]
    assert "'server." in desc, theirs
    assert json.loads(ours) == {"error": {"class": "GenericError", "desc": desc.replace(
        "'server.", "'channels[0].addr.")}}

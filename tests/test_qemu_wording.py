"""Malformed JSON is worded as a real QEMU words it: each case is sent to QEMU 7.2's
monitor and to migblockd's decoder, and the first error of each must be the same.

(QEMU may answer one bad message with several errors; migblockd answers it with
one, the first, and resynchronises: docs/protocol.md.)
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from realqemu import Qemu

from migblockd.config import Config
from migblockd.qmp.framing import ParseError, StreamDecoder

CASES = [
    b'{"a": truex}', b'{"a": tru}', b'{"a": x}', b'{"a": True}', b'{"a": xY}',
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b'{"a": 01}', b'{"a": -01}', b'{"a": 00}', b'{"a": 1.}', b'{"a": 1e}', b'{"a": 1E+}',
    b'{"a": 1.5.}', b'{"a": 5-}', b'{"a": --1}', b'{"a": -}', b'[1.e5]',
    b'{"a": +1}', b'{"a": .5}', b'{"a": 1, +}', b'[@]', b'{"a": #}',
    b'{"a": 12x}', b'{"a": 1e5 2}', b'[true}', b'{"a": 1 "b": 2}', b'{"a": [1 2]}',
    b'{"a" 1}', b'{"a": }', b'{"a": [1,]}', b'{1: 2}', b'{A: 1}', b'01',
    # Control characters: raw, as QEMU prints them, with the string token so far.
    b'\x04', b'\x1f', b'\x00', b'{"a": "tab\there"}', b'{"a": "ab\x00cd"}', b'"\x03"',
    b'{"a": "x\x1b[31m"}', b'{"b\\"x": 1, "a": "q\\"r\rs"}', b'["\\u00e9\x02"]',
    b'{"a": "\\\x01"}', b'"\xc3\xa9\x04"', b'{"a": "0123456789abcdefghij\tz"}',
    b'{"a": 123456789012.}',
    # A leading 0 takes no exponent: 0, then the keyword e, where a separator belongs.
    b'{"a": 0e5}', b'[0e5]', b'{"a": -0e5}', b'{"a": 0e-5}', b'{"a": 0ex}', b'{"a": 0e}',
    b'{"a": 0E5}', b'{"a": 0eE}', b'{"a": 0e5e}', b'[1, {"b": "0e1", "c": [0e1]}]',
    b'["\\ud800", 0e5]', b'{"\xef\xbf\xbf": 0e5}', b'{"a": "\\q", "b": -0e1}',
    # A repeated key is refused once its pair's value is read, before what follows.
    b'{"a": 1, "a": 0e5}', b'{"a": 1, "a": 2 3}', b'{"a": 1, "a": 2,}', b'{"a": 1, "a": x}',
    b'{"a": 1, "a": 2, "b": "\\ud800" 3}', b'{"b": "\\ud800", "a": 1, "a": 2 3}',
    b'{"a": 1, "a": [1 2]}', b'{"a": 1, "a": 2, "b": [1 2]}', b'{"a": 1, "b": {"c": 1, "c": }}',
    b'{"a": 1, "a": 2 3\n}', b'{"b": "\\ud800", "a": 1, "a": 2 3\n}', b'{"a": 1, "a": 0e5\n}',
    # What is not a character: one U+FFFD a sequence, in the reply's valid UTF-8.
    b'\x80', b'\xc3\xa9', b'\xef\xbb\xbf', b'{"a": "qu\xff"}', b'{"a": "\xc3\xa9\xfe"}',
    b'{"a": "x\xed\xa0\x80\x01"}', b'{"a": "x\xc0\x80\x01"}', b'{"a": "x\xef\xbf\xbf\x01"}',
    b'{"a": "x\xf8\x88\x80\x80\x80\x02"}', b'{"a": "\xe2\x82\xfe"}', b'{"a": "\xe2\x82A\x03"}',
    # ... and its parser stops at the first string with one, before a later error;
    # C0 80 is a character to it.
    b'{"a": "\\uffff", "b": "\\uq"}', b'{"a": "\\ud800", "b": x}',
    b'{"a": "\xef\xbf\xbf", "b": "\\q"}',
    b'{"a": "x\xc0\x80y", "b": 1,}', b'{"a": "\xc0\x80", "b": "\\ursion"}',
    b'{"a":\xc0\x80 "b"}', b'{"a": "b"\xc0\x80}', b'{"\xc0\x80x\ty": 1}',
    # A string cut short by a line feed: the token up to its first control character.
    b'{"a": "ab\n', b'{"a": "ab\r\n', b'{"a": "a\tb\r\n', b'{"a": "\\\n',
    # QEMU parses a message only once it is complete: a lexical error anywhere in
    # it comes before any error of its parser.
    b'{"a": x, "b": 1.}', b'{"a": x, "b": @}', b'{"a" 1, "b": 01}', b'{"a": [1 2], "b": "\x01"}',
    b'{"execute": query-version", "id": "x"}', b'{"a": 1e400, "b": +1}',
    b'{"a": 1, "a": 2, "b": 1e+}', b'{"a": "\\q", "b": True}', b'{"a": "\\ud800", "b": 1.5.}',
    b'{"id": [1, 2.\x005]}', b'{"a": 1."x\n', b'{"a": @ \x01', b'{"a": fa\\u0\'e9b"}',
    b"{\"a\": 1.'x'}",
    # ... in a message still open at a line feed too, which only its lexer has read.
    b'{"a": [1, -2: "x"], "b": 1-x', b'{"a": {"b": 1x.5}tru', b'{"a": [1 2], "b": @',
    b'{"a": [1, -\n2]}', b'{"a": [11e\n2]}', b'{"a": 1.\r\n}',
    # ... and its parser's errors come in the order of the tokens
    b'{"e": "x", "a\xc3g": {}, "id":9 {"k": 1}}', b'{"a": [1 2], "b": "\xc3("}',
    # A number cut short by a character that is not ASCII: its lexer reads bytes,
    # so the token ends at that character's first byte.
    b'{"a": -\xc3\xa9}', b'{"a": 1.\xe2\x82\xac}', b'{"a": 1e\xf0\x9f\x98\x80}',
    b'{"a": 1e+\xc3\xa9}', b'[1, -\xc3\xa9]', b'{"a": 1\xc3\xa9}', b'{"a": tru\xc3\xa9}',
]


def line(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "QEMU closed the monitor"
        data += chunk
    message: dict[str, Any] = json.loads(data)
    return message


@contextlib.contextmanager
def monitor(qemu: Qemu) -> Iterator[socket.socket]:
    """A raw, negotiated connection to QEMU's test monitor."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(qemu.test_socket))
        line(sock)  # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        assert line(sock) == {"return": {}}
        yield sock


def qemus_first_error(qemu: Qemu, data: bytes) -> str:
    with monitor(qemu) as sock:
        sock.sendall(data + b"\n")
        desc: str = line(sock)["error"]["desc"]
        return desc


def ours(data: bytes) -> str:
    decoder = StreamDecoder(Config().limits)
    decoder.feed(data + b"\n")
    first = next(iter(decoder))
    assert isinstance(first, ParseError), first
    return first.desc


@pytest.mark.parametrize("data", CASES, ids=[repr(c)[2:-1] for c in CASES])
def test_malformed_json_is_worded_as_qemu_words_it(qemu: Qemu, data: bytes) -> None:
    assert ours(data) == qemus_first_error(qemu, data)


#: Bad tokens outside any object.  QEMU's parser takes each top-level token as
#: it ends, so a number or keyword run into more is two messages there: the
#: value ("QMP input must be a JSON object"), then the rest.
TOP_LEVEL = [
    b'1.}', b'1e}', b'-}', b'1e+ ', b'12x', b'1e5x', b'1.5.}', b'0x10', b'trueX', b'xY',
    b'nul1', b'ab.c', b'-1-', b'truex', b'01}', b'0e5 ', b'0E5 ', b'-0e1x',
    b'-\xc3\xa9', b'1.\xe2\x82\xac', b'1\xc3\xa9', b'tru\xc3\xa9',
]
NOT_AN_OBJECT = "QMP input must be a JSON object"


def qemus_errors(qemu: Qemu, data: bytes) -> list[str]:
    """Every error QEMU answers ``data`` with, up to a marker request."""
    with monitor(qemu) as sock:
        sock.sendall(data + b'\n{"execute": "query-version", "id": "end"}\n')
        errors = []
        while (reply := line(sock)).get("id") != "end":
            errors.append(reply["error"]["desc"])
        return errors


def our_errors(data: bytes) -> list[str]:
    decoder = StreamDecoder(Config().limits)
    decoder.feed(data + b"\n")
    # A value that is not an object is the session's error, worded as QEMU's.
    return [item.desc if isinstance(item, ParseError) else NOT_AN_OBJECT
            for item in decoder if not isinstance(item, dict)]


@pytest.mark.parametrize("data", TOP_LEVEL, ids=[repr(c)[2:-1] for c in TOP_LEVEL])
def test_top_level_tokens_are_split_and_worded_as_qemu_does(qemu: Qemu, data: bytes) -> None:
    ours = our_errors(data)
    # One error per bad message (docs/protocol.md): where QEMU goes on about
    # the same message, migblockd has said its first error and resynchronised.
    assert ours and ours == qemus_errors(qemu, data)[:len(ours)]


#: Messages broken by a closing bracket: QEMU's streamer counts "{" and "[" each
#: on its own and ends the message as soon as either count is below zero, or
#: once neither is above it (``qobject/json-streamer.c``).
BROKEN_BY_A_CLOSER = [
    b'{"a": {]', b'{"a": {"b": [1, {]]', b'[{]]', b'{"a": [}]', b'{{}]', b'[{"a": {}]]',
]
GLUED = b'{"execute": "query-version", "id": "glued"}'


def qemus_replies(qemu: Qemu, data: bytes) -> list[str]:
    """QEMU's errors and the ids it answered, for ``data`` then a marker request."""
    with monitor(qemu) as sock:
        sock.sendall(data + b'\n{"execute": "query-version", "id": "end"}\n')
        out = []
        while (reply := line(sock)).get("id") != "end":
            out.append(reply["error"]["desc"] if "error" in reply else reply["id"])
        return out


@pytest.mark.parametrize("data", BROKEN_BY_A_CLOSER,
                         ids=[repr(c)[2:-1] for c in BROKEN_BY_A_CLOSER])
def test_a_request_glued_after_a_message_broken_by_a_closer_runs_where_qemu_runs_it(
        qemu: Qemu, data: bytes) -> None:
    decoder = StreamDecoder(Config().limits)
    decoder.feed(data + GLUED + b"\n")
    ours = [item.desc if isinstance(item, ParseError) else item.get("id")
            for item in decoder if isinstance(item, (ParseError, dict))]
    theirs = qemus_replies(qemu, data + GLUED)
    # One error per bad message (docs/protocol.md): QEMU may say more before it.
    assert ours[0] == theirs[0]
    assert ("glued" in ours) == ("glued" in theirs), (ours, theirs)

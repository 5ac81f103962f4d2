"""The same bytes to a real QEMU 7.2 and to migblockd: the same reply bytes.

Each case is sent on a fresh, negotiated connection to QEMU's monitor and to the
daemon, followed by a marker request; everything each answers before the marker
must be byte for byte the same, but for the version in ``query-version``.
Where migblockd deliberately differs (docs/protocol.md), the case is not here.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

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


def answers(path: object, data: bytes, *, oob: bool = False) -> bytes:
    """What the server at ``path`` answers ``data`` with, up to the marker's reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        read_line(sock)  # the greeting
        enable = b', "arguments": {"enable": ["oob"]}' if oob else b""
        sock.sendall(b'{"execute": "qmp_capabilities"' + enable + b"}")
        assert read_line(sock) == b'{"return": {}}\r\n'
        sock.sendall(data + MARKER)
        out = b""
        while b'"id": "marker"' not in (line := read_line(sock)):
            out += line
        return _VERSION.sub(b'"return": VERSION', out)


def same_answers(qemu: Qemu, daemon: DaemonProcess, data: bytes, *, oob: bool = False) -> None:
    theirs = answers(qemu.test_socket, data, oob=oob)
    assert theirs, "QEMU answered nothing: not a case"
    assert answers(daemon.socket, data, oob=oob) == theirs


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
    # A lone surrogate, then a \u escape cut short by the end of what was parsed.
    b'{"execute": "nope", "id": {"k0": "\\uD800\\u0041\\x41x", "k1":} true}',
]


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

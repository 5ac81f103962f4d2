"""Malformed JSON is worded as a real QEMU words it: each case is sent to QEMU 7.2's
monitor and to migblockd's decoder, and the first error of each must be the same.

(QEMU may answer one bad message with several errors; migblockd answers it with
one, the first, and resynchronises: docs/protocol.md.)
"""

from __future__ import annotations

import json
import socket
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
]


def line(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "QEMU closed the monitor"
        data += chunk
    message: dict[str, Any] = json.loads(data)
    return message


def qemus_first_error(qemu: Qemu, data: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(qemu.test_socket))
        line(sock)  # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        assert line(sock) == {"return": {}}
        sock.sendall(data + b"\n")
        desc: str = line(sock)["error"]["desc"]
        return desc


def ours(data: bytes) -> str:
    decoder = StreamDecoder(Config().limits)
    decoder.feed(data + b"\n")
    first = next(iter(decoder))
    assert isinstance(first, ParseError), first
    return first.desc


@pytest.mark.parametrize("data", CASES, ids=[c.decode() for c in CASES])
def test_malformed_json_is_worded_as_qemu_words_it(qemu: Qemu, data: bytes) -> None:
    assert ours(data) == qemus_first_error(qemu, data)

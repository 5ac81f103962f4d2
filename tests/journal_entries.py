"""A reader of journald's native protocol, written from systemd's description of it.

Independent of ``migblockd.logs.journal`` (which writes the protocol), so that
the tests check the daemon's datagrams against the protocol, not against itself.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path


def parse_entry(data: bytes) -> list[tuple[str, bytes]]:
    """The fields of one datagram, in order.

    Each is ``KEY=value\\n``, or ``KEY\\n``, a 64-bit little-endian length, the
    value and ``\\n``.
    """
    fields: list[tuple[str, bytes]] = []
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = end + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 9
            value = data[start:start + size]
            assert len(value) == size and data[start + size:start + size + 1] == b"\n", data
            i = start + size + 1
        fields.append((key.decode("ascii"), value))
    return fields


class Entry:
    """One received entry: ``entry["MESSAGE"]`` (first value), ``entry.all("KEY")``."""

    def __init__(self, fields: list[tuple[str, bytes]]) -> None:
        self.fields = fields

    def all(self, key: str) -> list[str]:
        return [v.decode() for k, v in self.fields if k == key]

    def __getitem__(self, key: str) -> str:
        values = self.all(key)
        if not values:
            raise KeyError(f"{key} not in {self.fields!r}")
        return values[0]

    def get(self, key: str) -> str | None:
        values = self.all(key)
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"Entry({self.fields!r})"


class JournalSocket:
    """An ``AF_UNIX``/``SOCK_DGRAM`` socket standing in for journald's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.entries: list[Entry] = []

    def wait_for(self, match: Callable[[Entry], bool], timeout: float = 10.0) -> Entry:
        """The first entry (received so far or later) for which ``match`` is true."""
        for entry in self.entries:
            if match(entry):
                return entry
        self.sock.settimeout(timeout)
        while True:
            try:
                data = self.sock.recv(1 << 17)
            except TimeoutError:
                raise AssertionError(f"no such entry within {timeout} s; got "
                                     f"{self.entries!r}") from None
            entry = Entry(parse_entry(data))
            self.entries.append(entry)
            if match(entry):
                return entry

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)

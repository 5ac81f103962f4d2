"""journald: is stderr the journal, and its native protocol for structured entries.

``$JOURNAL_STREAM`` (systemd.exec(5)) holds ``DEVICE:INODE`` of the stream
systemd connected stdout/stderr to.  stderr *is* the journal only when
fstat(2) of descriptor 2 matches it: a child whose stderr was redirected
inherits the variable but not the stream (the check sd_journal_stream_fd(3)'s
users make).

The native protocol (systemd's JOURNAL_NATIVE_PROTOCOL document): one entry
per datagram on the ``AF_UNIX``/``SOCK_DGRAM`` socket
``/run/systemd/journal/socket``; each field is ``KEY=value\\n``, or, when the
value contains a newline, ``KEY\\n``, the value's length as a 64-bit
little-endian integer, the value, ``\\n``.  Keys are uppercase ASCII letters,
digits and underscores, do not start with an underscore (those are journald's
own, trusted fields) or a digit, and are at most 64 characters.

Entries too big for one datagram may go in a memfd passed with
``SCM_RIGHTS``; asyncio-dgram sends plain datagrams only, so instead we
**truncate**: the entry is bounded by :data:`MAX_ENTRY` (the structured fields
are already bounded by ``migblockd.logs.fields``; ``MESSAGE`` is cut to fit).

``$MIGBLOCKD_JOURNAL_SOCKET`` replaces the socket's path; it exists for the
tests, which receive the datagrams on a socket of their own.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import struct
from collections.abc import Iterable, Mapping

import asyncio_dgram

from migblockd.logs.formats import priority

__all__ = ["DEFAULT_SOCKET", "MAX_ENTRY", "SOCKET_ENV", "JournalSender", "encode_entry",
           "encode_field", "for_stderr", "marked", "socket_path", "stderr_is_journal"]

DEFAULT_SOCKET = "/run/systemd/journal/socket"
#: Overrides :data:`DEFAULT_SOCKET`; for the tests.
SOCKET_ENV = "MIGBLOCKD_JOURNAL_SOCKET"
IDENTIFIER = "migblockd"
#: Largest entry we send: well below the default send buffer (wmem_default,
#: 208 KiB), which bounds an AF_UNIX datagram.
MAX_ENTRY = 64 * 1024
_TRUNCATED = b"... [truncated]"
_KEY = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_LENGTH = struct.Struct("<Q")


def for_stderr(levelno: int, lines: Iterable[str]) -> str:
    """``lines`` as ``migblockd: LINE``, for stderr before the log is set up (a bad
    file, a setting the start refuses), :func:`marked`."""
    return marked(levelno, (f"migblockd: {line}" for line in lines))


def marked(levelno: int, lines: Iterable[str]) -> str:
    """``lines``, for stderr before the log is set up, each marked with the priority
    of ``levelno`` (``<3>``, sd-daemon(3)) when stderr is the journal, as the log's
    lines are: so that ``journalctl -p err`` shows why a start, or a reload's check,
    failed.  Each line, since journald reads a priority per line: an unmarked one
    (argparse's usage above its error) would be info."""
    mark = f"<{priority(levelno)}>" if stderr_is_journal() else ""
    return "\n".join(f"{mark}{line}" for line in lines)


def stderr_is_journal(env: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` names the very stream open on ``fd``."""
    raw = env.get("JOURNAL_STREAM", "")
    device, sep, inode = raw.partition(":")
    try:
        st = os.fstat(fd)
        return bool(sep) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def socket_path(env: Mapping[str, str] = os.environ) -> str | None:
    """The journal's native socket, if there is one (None: native sending is off)."""
    path = env.get(SOCKET_ENV) or DEFAULT_SOCKET
    try:
        return path if stat.S_ISSOCK(os.stat(path).st_mode) else None
    except OSError:
        return None


def encode_field(key: str, value: str | bytes) -> bytes:
    """One field of an entry, in the binary-safe form when the value has a newline."""
    if _KEY.fullmatch(key) is None:
        raise ValueError(f"invalid journal field name {key!r}")
    data = value if isinstance(value, bytes) else value.encode("utf-8", "backslashreplace")
    name = key.encode("ascii")
    if b"\n" in data:
        return name + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
    return name + b"=" + data + b"\n"


def encode_entry(message: str, priority: int,
                 fields: Iterable[tuple[str, str]] = (), limit: int = MAX_ENTRY) -> bytes:
    """A whole entry: ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``fields``, then ``MESSAGE``.

    ``MESSAGE`` comes last and is cut (ending in ``... [truncated]``) so that
    the entry fits in ``limit`` bytes; the other fields must leave it room.
    """
    head = b"".join([encode_field("PRIORITY", str(priority)),
                     encode_field("SYSLOG_IDENTIFIER", IDENTIFIER),
                     *(encode_field(k, v) for k, v in fields)])
    text = message.encode("utf-8", "backslashreplace")
    entry = head + encode_field("MESSAGE", text)
    if len(entry) <= limit:
        return entry
    # The binary form is the longest a value can take: name, \n, 8 bytes, value, \n.
    room = limit - len(head) - len("MESSAGE") - 10 - len(_TRUNCATED)
    if room < 0:
        raise ValueError(f"the fields alone exceed {limit} bytes")
    # Cut on a character boundary, so that the journal still sees UTF-8.
    cut = text[:room].decode("utf-8", "ignore").encode("utf-8")
    return head + encode_field("MESSAGE", cut + _TRUNCATED)


def _count_only_what_waits(transport: asyncio.WriteTransport) -> None:
    """Work around CPython 3.13.0 to 3.13.5 (gh-135444): their datagram transport
    counts 8 bytes more for each datagram that had to wait and never takes them
    off, so once journald had made the writer wait, the buffer never looked
    empty again, and ``send()`` waited forever.  Whatever the count says, nothing
    is buffered when the transport's queue is empty."""
    queue = getattr(transport, "_buffer", None)
    if queue is None:
        return
    counted = transport.get_write_buffer_size
    setattr(transport, "get_write_buffer_size",  # noqa: B010 (a method, not a field)
            lambda: counted() if queue else 0)


class JournalSender:
    """Entries to journald's native socket, with asyncio-dgram, from the log writer's loop.

    The socket is *connected* to journald's: then the kernel reports it
    writable only while journald's queue has room, so asyncio waits for
    journald instead of retrying ``sendto()`` in a loop (an unconnected
    AF_UNIX datagram socket always polls writable).  When a send fails
    (journald restarted, or is gone) the connection is dropped and made
    again for the next entry.  A send that fails returns False: the caller
    writes that record on stderr instead, without its fields.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: asyncio_dgram.aio.DatagramClient | None = None

    async def _connect(self) -> bool:
        try:
            stream = await asyncio_dgram.connect(self.path)
        except OSError:
            self._stream = None
            return False
        # asyncio keeps a datagram the socket refused in a buffer and lets
        # send() return; with no room allowed there, send() returns only once
        # journald has the entry: nothing is left behind at exit, and a stuck
        # journal holds up the writer (whose own list is bounded) instead.
        transport = getattr(stream, "_transport", None)
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=0)
            _count_only_what_waits(transport)
        self._stream = stream
        return True

    async def send(self, entry: bytes) -> bool:
        if self._stream is None and not await self._connect():
            return False
        stream = self._stream
        assert stream is not None
        try:
            # Waits (this loop, not the daemon's) while journald has not taken
            # the datagrams before it: a stuck journal stalls the writer alone.
            await stream.send(entry)
            # A failed send() is reported through the protocol's error queue.
            _ = stream.exception
        except (OSError, asyncio_dgram.TransportClosed):
            self.close()
            return False
        return True

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

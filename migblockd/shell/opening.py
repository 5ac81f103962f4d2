"""The opening of the shell's connection: from the socket to the server's greeting.

Which socket may be used (the fallback directory's safety), how long the opening
waits, and what a first line that is not QMP's greeting is (QEMU's other monitors,
a refusal of migblockd's) are decided here; :mod:`migblockd.shell.client` then
exchanges the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

from migblockd.paths import (
    NO_GREETING,
    before_greeting,
    connect_failure,
    connect_unix,
    fallback_refusal,
)
from migblockd.shell.strict_json import loads

GREETING_TIMEOUT = 10.0
#: How to name a socket other than the default, in the refusal of an unsafe default.
GIVE_SOCKET = "give its path (migblock-shell SOCKET)"

Message = dict[str, Any]


class ClientError(Exception):
    """Base class; ``str()`` is a one-line message for the operator."""


class ConnectError(ClientError):
    """Could not connect, or the server did not greet / negotiate."""


#: What QEMU's human monitor says first (``monitor/hmp.c``, ``monitor_event()``).
_HMP_BANNER = re.compile(rb"QEMU \S+ monitor - type 'help' for more information")


def _not_qmp(line: bytes) -> str:
    """Why the first line a server sent is no QMP greeting: one of QEMU's monitors
    the shell cannot use is named, as migblockd's --qemu names it."""
    if _HMP_BANNER.match(line):
        return ("this is QEMU's human monitor (HMP: -monitor, or -mon mode=readline), "
                "not QMP: give the shell a -qmp monitor")
    if line.rstrip() == b"{":
        # Every message spread over lines; QMP clients read one message per line.
        return ("QEMU's monitor pretty-prints its JSON (-qmp-pretty, or -mon pretty=on), "
                "which the shell cannot read: give it a monitor without it")
    return NO_GREETING


def _is_greeting(message: Any) -> TypeGuard[Message]:
    """Whether ``message`` is QMP's greeting, as ``qemu.qmp`` (and so
    ``migblockd.client``) judges it: ``QMP`` an object, its ``version`` an object
    and its ``capabilities`` a list."""
    qmp = message.get("QMP") if isinstance(message, dict) else None
    return (isinstance(qmp, dict) and isinstance(qmp.get("version"), dict)
            and isinstance(qmp.get("capabilities"), list))


@dataclass(frozen=True)
class OpeningWait:
    """How long each wait of a connection's opening lasts (the greeting, then each
    answer the shell asks for before the first command), and how its messages say so."""

    seconds: float
    said: str

    @classmethod
    def bounded(cls, timeout: float | None) -> OpeningWait:
        """:data:`GREETING_TIMEOUT`, or a script's ``--timeout`` when that is shorter:
        past it the daemon is broken (stopped, hung), and a script's --timeout
        promises it ends its run rather than wait longer than that on anything."""
        if timeout is not None and timeout < GREETING_TIMEOUT:
            return cls(timeout, f"{timeout:g} s (--timeout)")
        return cls(GREETING_TIMEOUT, f"{GREETING_TIMEOUT:g}s")


async def _abort(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, RuntimeError):
        await writer.wait_closed()


async def open_qmp(
    path: str, opening: OpeningWait, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Message]:
    """Connect to ``path`` and read its greeting; raises :class:`ConnectError`
    (the connection closed) when there is none, or the server is not QMP.
    ``limit``: the longest line the reader takes."""
    # A default socket under the shared temporary directory may be someone
    # else's, listening there to read what is sent: judged before and after
    # (migblockd.paths.fallback_refusal).
    refusal = fallback_refusal(path, GIVE_SOCKET)
    if refusal is not None:
        raise ConnectError(f"cannot connect to {path}: {refusal}")
    try:
        sock = connect_unix(path)
    except OSError as err:
        raise ConnectError(f"cannot connect to {path}: {connect_failure(path, err)}") from None
    try:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise
    try:
        greeting = await _greeting(path, opening, reader)
    except ConnectError:
        await _abort(writer)
        raise
    except BaseException:  # Ctrl-C (cancellation): the socket is let go of all the same
        writer.close()
        raise
    return reader, writer, greeting


async def _greeting(path: str, opening: OpeningWait, reader: asyncio.StreamReader) -> Message:
    """The greeting ``reader`` brings; :class:`ConnectError` when there is none."""
    refusal = fallback_refusal(path, GIVE_SOCKET, connected=True)
    if refusal is not None:
        raise ConnectError(f"cannot connect to {path}: {refusal}")
    try:
        line = await asyncio.wait_for(reader.readline(), opening.seconds)
    except TimeoutError:
        raise ConnectError(f"{path}: no QMP greeting within {opening.said}") from None
    except ConnectionResetError as err:
        raise ConnectError(f"{path}: {before_greeting(err)}") from None
    except (OSError, ValueError) as err:
        raise ConnectError(f"{path}: reading the greeting failed: {err}") from None
    try:
        greeting = loads(line.decode())
    except ValueError:  # not QMP: named below
        greeting = None
    refusal = greeting.get("error") if isinstance(greeting, dict) else None
    if isinstance(refusal, dict) and isinstance(refusal.get("desc"), str):
        # Turned away (max-clients...): one error line in place of the greeting.
        raise ConnectError(f"{path}: migblockd refused the connection: {refusal['desc']}")
    if not _is_greeting(greeting):
        what = before_greeting(None) if not line else _not_qmp(line)
        raise ConnectError(f"{path}: {what}")
    return greeting

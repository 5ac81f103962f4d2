"""What the kernel knows of a client's socket: who it is, and what it left unread.

Small helpers of the asyncio adapter (:mod:`migblockd.server`), apart so that
the adapter holds only the flow of bytes.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Iterator

from migblockd.registry import Owner
from migblockd.userns import unmapped_uid

__all__ = ["client_owner", "discard_unread", "hung_up", "leftovers", "lost_words",
           "ordinary_loss", "peer_owner", "received", "unread", "unsent"]

LEFTOVER_CHUNK = 64 * 1024

#: struct ucred: pid_t is signed, uid_t and gid_t are not (4294967294 is a uid,
#: nfsnobody's on some systems; read signed it was -2, which restore refuses).
_PEERCRED = struct.Struct("=iII")


def client_owner(transport: asyncio.BaseTransport) -> Owner | None:
    """A client's credentials, as access control takes them (:func:`peer_owner`): None
    also when the kernel reported the overflow uid in place of one this process's user
    namespace does not map, which names no one."""
    owner = peer_owner(transport)
    return None if owner is None or owner.uid == unmapped_uid() else owner


def peer_owner(transport: asyncio.BaseTransport) -> Owner | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Owner(pid=pid, uid=uid, gid=gid)


def leftovers(transport: asyncio.BaseTransport, budget: int) -> Iterator[bytes]:
    """What is left in the socket of a connection asyncio has given up on.

    asyncio calls ``connection_lost`` before closing the socket, so the data is
    still there; a duplicate descriptor reads it without disturbing the
    transport.  At most ``budget`` bytes, so a peer cannot keep us here;
    :func:`unread` then says what remains (the socket is shut for reading
    first, so nothing can arrive unseen after that).
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        dup = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return
    with dup:
        yield from received(dup, budget)


def received(sock: socket.socket, budget: int) -> Iterator[bytes]:
    """What the peer has sent on ``sock`` and nobody read, at most ``budget`` bytes;
    ``sock`` is left shut for reading (and non-blocking)."""
    sock.setblocking(False)
    for last in (False, True):
        while budget > 0:
            try:
                # No more than the budget left: a whole chunk past it read up to
                # 64 KiB more than the bound the log names (128 KiB of a 68 KiB one).
                data = sock.recv(min(LEFTOVER_CHUNK, budget))
            except OSError:
                break
            if not data:
                break
            budget -= len(data)
            yield data
        if not last:
            # No more may come (the peer's writes fail from now on): then what
            # is read, or counted as unread, is all it ever sent.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)


def discard_unread(transport: asyncio.BaseTransport, budget: int = 4 << 20) -> int:
    """Read away what the peer sent that nobody will run (as :func:`leftovers`
    reads it: nothing can arrive after), so that closing the socket ends the
    connection with EOF, not a reset; how many bytes that was."""
    return sum(len(data) for data in leftovers(transport, budget))


def hung_up(transport: asyncio.BaseTransport) -> bool:
    """The peer has closed its end, not only shut it for writing (``shutdown(SHUT_WR)``,
    after which it still reads): a Unix socket polls ``POLLHUP`` only then."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), 0)  # POLLHUP is reported whatever the mask
        ready = poller.poll(0)
    except (OSError, ValueError):
        return False
    return any(mask & select.POLLHUP for _, mask in ready)


#: How a client's end reads when it hangs up with output unread.
_HANGUPS = (ConnectionResetError, BrokenPipeError)


def lost_words(exc: Exception | None) -> str:
    """Why a connection ended, for its "disconnected" line: the kernel's words, except
    where they read as a failure and are none.

    A Unix socket closed with data in its receive queue resets its peer
    (``unix_release_sock()``, net/unix/af_unix.c), and a write after the close finds
    a broken pipe: so ends a client that hangs up while events still come to it,
    which is how most end.
    """
    if exc is None:
        return ""
    if isinstance(exc, _HANGUPS):
        return f"it hung up with output unread ({exc.strerror})"
    return str(exc)


def ordinary_loss(exc: Exception | None) -> bool:
    """Whether a connection lost with ``exc`` ended as clients end (see
    :func:`lost_words`), no failure: its line is bounded as a plain one is."""
    return exc is None or isinstance(exc, _HANGUPS)



def unread(transport: asyncio.BaseTransport) -> int:
    """Bytes received by the kernel that nobody has read (0 if it cannot say)."""
    return _queued(transport, termios.FIONREAD)


def unsent(transport: asyncio.BaseTransport) -> int:
    """What we wrote to the socket that the peer has not read yet, as the kernel
    counts it (``SIOCOUTQ``: for a Unix socket, the memory it still holds for the
    peer, not exactly bytes); 0 if it cannot say."""
    return _queued(transport, termios.TIOCOUTQ)


def _queued(transport: asyncio.BaseTransport, request: int) -> int:
    """The count the ``ioctl`` ``request`` gives for the transport's socket, or 0."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), request, count)
    except (OSError, ValueError):
        return 0
    return count[0]

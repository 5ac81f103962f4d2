"""``qemu.qmp``'s ``QMPClient`` as :class:`~migblockd.qemu.link.QemuLink` uses it.

The link is built on the library's client, adjusted in seven ways:

* events are handed to the link's ``on_event`` from the library's reader task, in
  QEMU's order with its replies.  The reader handles QEMU's messages one at a time and
  passes a reply to the ``execute()`` that waits for it, so an event QEMU sent before a
  reply (QEMU sends an event caused by a command before that command's reply) reaches
  ``on_event`` before ``execute()`` returns.  An event QEMU sent after a reply waits
  until the caller of that ``execute()`` has taken the reply (the reader goes on reading
  at once, while the caller resumes only at the loop's next turn), so that it reaches
  clients after the reply too: ``MIGRATION active`` after ``migrate``'s return.  The
  library's own event queues are bypassed: its default listener keeps every event in a
  history list, which grows for as long as the connection lives;
* the library's logging is silenced: it logs every failed connection attempt as an error
  (and a traceback at debug level).  The link logs what matters itself;
* the wire traffic is logged at debug level on the link's logger, as the server logs its
  clients' traffic;
* it reads QEMU's messages as strict JSON: ``NaN``, ``Infinity`` or ``1e400`` make
  a message garbage, which ends the connection as any other does
  (:mod:`.garbage`), not a value that no client can be sent;
* a reply whose ``id`` is no string (the library's are) answers nothing migblockd
  sent: it is dropped with a warning, where the library's look-up of a list or an
  object would fail and end the connection;
* it reads messages of up to :data:`~migblockd.qemu.too_long.READ_LIMIT`, not the
  library's 10 MiB, and one longer than that, which ends the connection (the library can
  do nothing else with it), is named for what it is: the reply to which command, of what
  size (:mod:`.too_long`);
* a message cut short by the end of the stream (QEMU killed while it wrote) is that
  end, not garbage.

The client and its link are one object in two classes: the client calls the link's
private hooks (``_deliver``, ``_answers``, ``_greeting_awaited``, ``_greeted``) and
fills its ``_after_replies``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qemu.qmp import ExecInterruptedError, Message, QMPClient

from migblockd.peer import peer_owner
from migblockd.qemu.garbage import StrictMessage, shown
from migblockd.qemu.too_long import READ_LIMIT, Interrupted, ReplyTooLong, TooLong

if TYPE_CHECKING:
    from migblockd.qemu.link import QemuLink

__all__ = ["LinkClient"]

log = logging.getLogger("migblockd.qemu")

# Outside the logging hierarchy and enabled for no level: the library's records are never
# even created, so no configuration of the root logger can bring them back.
_SILENT = logging.Logger("qemu.qmp (silenced by migblockd.qemu)", logging.CRITICAL + 1)


class LinkClient(QMPClient):
    """The library's client, adjusted for the link (see the module doc)."""

    def __init__(self, link: QemuLink) -> None:
        super().__init__(readbuflen=READ_LIMIT)
        self._link = link
        #: The commands sent on this connection that QEMU has not answered (a command
        #: given up on included: its reply still comes), by id, oldest first.  QEMU
        #: answers in the order it was sent them: migblockd sends it no exec-oob.
        self._unanswered: dict[str, str] = {}
        #: The message too long that ended the last connection to end so.
        self._too_long: TooLong | None = None

    # The library picks its logger when its name is set (in its __init__): pick ours.
    @property
    def name(self) -> str | None:
        return self._name

    @name.setter
    def name(self, name: str | None) -> None:
        self._name = name
        self.logger = _SILENT

    async def _on_message(self, msg: Message) -> None:
        # Called by the reader task for each message, in QEMU's order (see the module doc).
        link = self._link
        if link.state == "connected":
            link.served = True  # (the set-up's own answers come before it is up)
        if "event" in msg:
            if link._after_replies:
                link._after_replies[-1].append(msg)
            else:
                link._deliver(msg)
            return
        msg_id = msg.get("id")
        if "id" in msg and not isinstance(msg_id, str):
            # The library's ids are strings: this answers nothing migblockd sent, and
            # the library, looking it up, would fail on a list or an object (unhashable)
            # and end the connection.  Dropped, as QMP clients drop a reply whose id is
            # unknown (docs/interop/qmp-spec.rst, "Commands Responses").
            log.warning("QEMU at %s sent a reply with an id migblockd never gave (%s), "
                        "ignored", link.path, shown(bytes(msg)))
            return
        if isinstance(msg_id, str):
            self._unanswered.pop(msg_id, None)
        answered = msg_id in self._pending
        await super()._on_message(msg)  # wakes the execute() that waits for it
        if not answered and "id" in msg:
            # The reply to a command given up on (qemu-timeout), dropped: late, but
            # QEMU answers, and with nobody else asking it nothing else would say so.
            link._answers()
        elif answered:
            # Runs after the woken caller's turn, which was scheduled first; the
            # events up to the next reply wait with this one.
            link._after_replies.append([])
            asyncio.get_running_loop().call_soon(link._deliver_after_reply)

    def peer_pid(self) -> int | None:
        """The connected QEMU's process id (0 from the kernel: not in our PID namespace)."""
        writer = self._writer  # the library's stream (qemu/qmp/protocol.py)
        owner = peer_owner(writer.transport) if writer is not None else None
        return owner.pid if owner is not None and owner.pid > 0 else None

    def peer_uid(self) -> int | None:
        """The uid the connected listener runs as (``SO_PEERCRED``), or None."""
        writer = self._writer
        owner = peer_owner(writer.transport) if writer is not None else None
        return None if owner is None else owner.uid

    async def _issue(self, msg: Message) -> str | None:
        msg_id, command = msg.get("id"), msg.get("execute")
        if isinstance(msg_id, str):
            self._unanswered[msg_id] = str(command)  # before the writer can send it
        try:
            return await super()._issue(msg)
        except BaseException:
            self._unanswered.pop(str(msg_id), None)  # not sent
            raise

    async def _readline(self) -> bytes:
        try:
            line = await super()._readline()
        except ValueError:  # asyncio's StreamReader: no line feed within the limit
            oldest = next(iter(self._unanswered.values()), None)
            self._too_long = TooLong(oldest, self.readbuflen, tuple(self._unanswered))
            raise ReplyTooLong(self._too_long.reason()) from None
        if not line.endswith(b"\n"):
            # The stream ended in the middle of a message: QEMU was killed while it
            # wrote a reply bigger than the socket holds.  Its end, as between two
            # messages: parsed, the part would be garbage migblockd dropped QEMU over.
            raise EOFError(f"the connection ended {len(line)} bytes into a message")
        return line

    async def _do_recv(self) -> Message:
        # The library's, with QEMU's message read as strict JSON (.garbage): a number
        # no client can be sent is refused as any garbage is, here.
        return StrictMessage(await self._readline())

    async def _reply(self, msg_id: str | None) -> Message:
        try:
            return await super()._reply(msg_id)
        except ExecInterruptedError:
            too_long = self._too_long
            if too_long is None or msg_id not in too_long.unanswered:
                raise
            raise Interrupted(too_long, own=msg_id == too_long.unanswered[0]) from None

    async def _establish_session(self) -> None:
        # The socket is connected: what is awaited now is QEMU's greeting.
        self._unanswered.clear()
        self._link._greeting_awaited()
        await super()._establish_session()

    async def _negotiate(self) -> None:
        # The library calls it once the greeting has come: qmp_capabilities is awaited.
        self._link._greeted()
        await super()._negotiate()

    def _cb_inbound(self, msg: Message) -> Message:
        if log.isEnabledFor(logging.DEBUG):
            _trace(self._link.path, "<-", bytes(msg))
        return msg

    def _cb_outbound(self, msg: Message) -> Message:
        if log.isEnabledFor(logging.DEBUG):
            _trace(self._link.path, "->", bytes(msg))
        return msg


#: query-qmp-schema's reply is ~200 kB: the trace shows each message's beginning only.
TRACE_LIMIT = 1000


def _trace(path: Path, direction: str, data: bytes) -> None:
    if len(data) <= TRACE_LIMIT:
        log.debug("QEMU %s %s %r", path, direction, data)
    else:
        log.debug("QEMU %s %s %r... (%d bytes)", path, direction, data[:TRACE_LIMIT], len(data))


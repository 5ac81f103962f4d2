"""One client connection as the core sees it: who is on the other end, and its session.

This is the typed context every command handler receives.  It holds no socket:
the asyncio adapter keeps its transport next to it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from migblockd.access import Role
from migblockd.qmp.envelope import Request
from migblockd.qmp.session import Session
from migblockd.registry import Owner

if TYPE_CHECKING:  # (forwarding's handlers take a Connection)
    from migblockd.forwarding import Pin

__all__ = ["Connection"]


class Connection:
    """A client: its number (for logs), peer credentials, and QMP session.

    ``owner`` is the peer's ``SO_PEERCRED`` (None when the kernel would not
    say); it is recorded as the owner of the blockers this client adds, and
    identity (not equality) ties ``scope: connection`` blockers to it.
    ``refused`` marks a connection turned away at ``max-clients``: its only
    output is the error line, and then it must be closed.  ``closed``: the
    peer is gone, and the core finishes what it sent.  ``waiting`` is a request
    taken from the session whose turn has not come yet (it waits for a commit),
    or, with ``suspended`` set, one that waits for QEMU's answer to a call or,
    with ``answer`` set too, one that goes on with ``answer`` (a value, or the
    error to throw in) once the changes made so far are on disk.  ``pin``: the QEMU
    connection the calls of its latest command that talks to QEMU go to.
    ``role`` is what the access policy grants it (:mod:`migblockd.guard` fills
    it in when it is accepted, and again at its first request after a reload,
    which clears it); None until then.
    """

    __slots__ = ("answer", "closed", "counted", "label", "number", "owner", "pin", "pooled",
                 "quiet", "refused", "role", "session", "suspended", "waiting")

    def __init__(self, number: int, owner: Owner | None, session: Session) -> None:
        self.number = number
        self.owner = owner
        self.session = session
        self.refused = False
        #: Its connection was not logged (one of a flood): nor is its plain end.
        self.quiet = False
        self.closed = False
        self.waiting: Request | None = None
        self.suspended: Generator[object, object, object] | None = None
        self.answer: tuple[object, BaseException | None] | None = None
        self.pin: Pin | None = None
        self.role: Role | None = None
        #: The uid its slot counts against (--max-clients-per-uid), fixed at admission.
        self.counted = None if owner is None else owner.uid
        #: Whether its slot counts against ``counted``'s bound: not an admin's, which is
        #: exempt from it, and must not use up the bound of its subordinate uids either
        #: (set at admission, and again as a reload changes the role).
        self.pooled = False
        if owner is None:
            self.label = f"client {number}"
        else:
            self.label = (f"client {number} (pid {owner.pid}, uid {owner.uid}, "
                          f"gid {owner.gid})")

    def __repr__(self) -> str:
        return f"<Connection {self.label}>"

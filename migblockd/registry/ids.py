"""Blocker ids: the ones clients choose, and the ones the registry generates.

QEMU identifies a blocker by its ``Error *`` pointer; a daemon's clients need
a name.  A chosen id follows QEMU's rule for ids (``util/id.c``
``id_wellformed()``), bounded in length here; a generated one starts with
``#``, as QEMU's ``id_generate()`` does, so no client can ever choose an id
that is generated later.
"""

from __future__ import annotations

import re
from typing import Final

from migblockd.registry.changes import Change
from migblockd.registry.errors import IdTooLong, InvalidId

__all__ = ["GENERATED_PREFIX", "ID_CHUNK", "MAX_ID_LENGTH", "IdSource", "check_id"]

# id_wellformed(): qemu_isalpha()/qemu_isalnum() are ASCII-only.
_IDENTIFIER: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")

#: The longest id a client may choose.  QEMU bounds none, but here ids are
#: logged, listed to every client and stored: 128 characters name anything.
MAX_ID_LENGTH: Final = 128

GENERATED_PREFIX: Final = "#blocker"

#: Generated ids are reserved on disk this many at a time: an id below the
#: reserved floor is never handed out again, even after a crash, and only one
#: add in ID_CHUNK has to wait for the floor to move.
ID_CHUNK: Final = 1024


def check_id(id: str) -> None:
    """Raise :class:`IdTooLong` or :class:`InvalidId` unless a client may choose ``id``."""
    if len(id) > MAX_ID_LENGTH:
        raise IdTooLong(id, MAX_ID_LENGTH)
    if _IDENTIFIER.fullmatch(id) is None:
        raise InvalidId(id)


class IdSource:
    """Generated ids, ``#blocker0`` onwards, never reused across restarts.

    ``floor``: the ids below it may have been handed out (it is on disk, when
    durable).  Moving it is a durable change of its own.
    """

    __slots__ = ("floor", "serial")

    def __init__(self) -> None:
        self.serial = 0  # the number in the next generated id
        self.floor = 0

    def take(self) -> tuple[str, Change | None]:
        """The next id, and the change that reserves more ids when it was the last."""
        reserve = None
        if self.serial >= self.floor:
            floor = self.serial + ID_CHUNK
            reserve = Change("id-floor", True, old=self.floor, new=floor)
            self.floor = floor
        id = f"{GENERATED_PREFIX}{self.serial}"
        self.serial += 1
        return id, reserve

    def restart(self, floor: int) -> None:
        """Continue from a stored ``floor``, after a restart."""
        self.serial = self.floor = floor

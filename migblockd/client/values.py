"""Typed values of the client: a blocker as ``BlockerInfo`` describes it, and an event."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from migblockd.client.errors import ClientError

__all__ = ["Blocker", "BlockerOwner", "Event"]


#: What a value that is not the shape the schema gives raises while it is read:
#: ``OverflowError`` and ``OSError`` (``EOVERFLOW``) from a time out of datetime's range.
_NOT_ITS_SHAPE = (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError)


def _time(value: object) -> datetime:
    """A QMP ``{"seconds": S, "microseconds": US}`` as an aware UTC datetime."""
    if not isinstance(value, Mapping):
        raise TypeError(f"not a timestamp: {value!r}")
    return datetime.fromtimestamp(_int(value["seconds"]), UTC) + timedelta(
        microseconds=_int(value["microseconds"]))


@dataclass(frozen=True)
class BlockerOwner:
    """The peer credentials of the connection that added a blocker."""

    pid: int
    uid: int
    gid: int
    #: The name of ``uid``, when the daemon's system knows one.
    user: str | None = None


@dataclass(frozen=True)
class Blocker:
    """A migration blocker, as the schema's ``BlockerInfo`` describes it."""

    #: Unique among current blockers; what :meth:`MigblockClient.del_blocker` takes.
    id: str
    #: Why migration is blocked; ``migrate`` reports it verbatim.
    reason: str
    #: The migration modes it blocks (``"normal"``, ``"cpr-reboot"``...), in MigMode order.
    modes: tuple[str, ...]
    #: Whether it ignores the daemon's --only-migratable.
    internal: bool
    #: ``"daemon"`` (until deleted) or ``"connection"`` (until deleted or its connection closes).
    scope: str
    #: When it was added (UTC); None for QEMU's own blockers, of which QEMU says nothing.
    added: datetime | None = None
    #: Who added it; None when the daemon did not know.
    owner: BlockerOwner | None = None
    #: ``"migblockd"``, or ``"qemu"`` for the gated QEMU's own (ids ``qemu:N``), which
    #: only QEMU deletes.
    source: str = "migblockd"

    @classmethod
    def from_qmp(cls, data: Mapping[str, Any]) -> Blocker:
        """A ``BlockerInfo`` object as the daemon sends it (unknown members are ignored)."""
        try:
            owner, added = data.get("owner"), data.get("added")
            if owner is not None and not isinstance(owner, Mapping):
                raise TypeError(f"owner {owner!r} is not an object")
            modes = data["modes"]
            if not isinstance(modes, list):
                raise TypeError(f"modes {modes!r} is not a list")
            return cls(
                id=_str(data["id"]), reason=_str(data["reason"]),
                modes=tuple(_str(m) for m in modes), internal=_bool(data["internal"]),
                scope=_str(data["scope"]), added=None if added is None else _time(added),
                owner=None if owner is None else BlockerOwner(
                    pid=_int(owner["pid"]), uid=_int(owner["uid"]), gid=_int(owner["gid"]),
                    user=None if owner.get("user") is None else _str(owner["user"])),
                source=_str(data.get("source", "migblockd")),
            )
        except _NOT_ITS_SHAPE as exc:
            raise ClientError(f"not a BlockerInfo: {data!r} ({exc!r})") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not a boolean")
    return value


@dataclass(frozen=True)
class Event:
    """A QMP event: ``BLOCKER_ADDED``, ``BLOCKER_DELETED``, ``MIGRATION``..."""

    name: str
    #: The event's ``data`` member as sent (empty when the event has none).
    data: Mapping[str, Any] = field(hash=False)
    #: When the daemon emitted it (UTC).
    timestamp: datetime

    @classmethod
    def from_qmp(cls, message: Mapping[str, Any]) -> Event:
        """A QMP event message as the daemon sends it (``event``, ``data``, ``timestamp``)."""
        try:
            data = message.get("data", {})
            if not isinstance(data, Mapping):
                raise TypeError("data is not an object")
            return cls(name=_str(message["event"]), data=dict(data),
                       timestamp=_time(message["timestamp"]))
        except _NOT_ITS_SHAPE as exc:
            raise ClientError(f"not a QMP event: {dict(message)!r} ({exc!r})") from None

    @property
    def blocker(self) -> Blocker | None:
        """The new blocker of a ``BLOCKER_ADDED`` event; None for other events."""
        return Blocker.from_qmp(self.data) if self.name == "BLOCKER_ADDED" else None

"""Domain objects as the schema's wire values: ``BlockerInfo`` and event lines.

The registry speaks in blockers and domain events; clients read the shapes
of the schema (``schema/migration.json``).  This is the one place that
translates, so a member added to ``BlockerInfo`` is added here only.
"""

from __future__ import annotations

from typing import Any

from migblockd.databases import caches
from migblockd.qmp.encoding import Encoded, encode, encode_event, timestamp
from migblockd.registry import Blocker, Event

__all__ = ["blocker_info", "blocker_text", "event_data", "event_line"]


def blocker_info(blocker: Blocker) -> dict[str, Any]:
    """The blocker as ``BlockerInfo`` (members in schema order)."""
    info: dict[str, Any] = {
        "id": blocker.id,
        "reason": blocker.reason,
        "modes": list(blocker.modes),
        "internal": blocker.internal,
        "scope": blocker.scope,
    }
    owner = blocker.owner
    if owner is not None:
        who: dict[str, Any] = {"pid": owner.pid, "uid": owner.uid, "gid": owner.gid}
        # As looked up when its client connected, at the start or at the last reload:
        # never here (a database that does not answer must not hold a listing).
        name = caches().users.get(owner.uid)
        if name is not None:
            who["user"] = name
        info["owner"] = who
    info["added"] = timestamp(blocker.added)
    info["source"] = "migblockd"
    return info


def blocker_text(blocker: Blocker) -> str:
    """``blocker_info`` encoded, once per blocker: listings join these."""
    text = blocker.cache
    if type(text) is not str:
        text = blocker.cache = encode(blocker_info(blocker))
    return text


def event_data(event: Event) -> dict[str, Any]:
    """The ``data`` member of a registry event."""
    blocker = event.blocker
    if event.name == "BLOCKER_ADDED":
        assert blocker is not None
        return blocker_info(blocker)
    if event.name == "BLOCKER_DELETED":
        assert blocker is not None
        return {"id": blocker.id, "cause": event.detail}
    return {"status": event.detail}


def event_line(event: Event) -> bytes:
    """The QMP event line for a registry event."""
    if event.name == "BLOCKER_ADDED":
        assert event.blocker is not None
        # The blocker's encoded form, which its reply and listings share.
        return encode_event(event.name, Encoded(blocker_text(event.blocker)), event.when)
    return encode_event(event.name, event_data(event), event.when)

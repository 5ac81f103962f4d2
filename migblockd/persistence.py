"""Between the registry and its database: what a change writes, what a start reads back.

The registry journals its mutations (:class:`migblockd.registry.Change`); the
durable ones become the store's rows and settings here, in order.  At start
the snapshot on disk becomes the registry's state again: same ids, same
order, same mode, and generated ids that continue past every one handed out
before.
"""

from __future__ import annotations

from collections.abc import Iterable

from migblockd import state
from migblockd.registry import DEFAULT_MODE, Blocker, Change, Owner, Registry

__all__ = ["restore", "to_store"]

MODE, EVENTS, ID_FLOOR = "mode", "events", "id-floor"
_EDITED = "restore the file from a backup, or move it away to start from scratch"


def to_store(changes: Iterable[Change]) -> list[state.Change]:
    """The store's changes for the durable ones among ``changes``, in order."""
    out: list[state.Change] = []
    for change in changes:
        if not change.durable:
            continue
        blocker = change.blocker
        if change.kind == "add":
            assert blocker is not None
            owner = blocker.owner
            out.append(state.Put(state.BlockerRow(
                blocker.id, blocker.reason, blocker.modes, blocker.internal,
                None if owner is None else (owner.pid, owner.uid, owner.gid),
                blocker.added, blocker.seq)))
        elif change.kind == "delete":
            assert blocker is not None
            out.append(state.Delete(blocker.id))
        else:
            key = {"mode": MODE, "events": EVENTS, "id-floor": ID_FLOOR}[change.kind]
            out.append(state.Setting(key, change.new))
    return out


def restore(registry: Registry, snapshot: state.Snapshot) -> None:
    """Give an empty registry what ``snapshot`` holds.

    Raises ValueError (naming the blocker) when a stored blocker blocks a
    mode the schema no longer defines: dropping it silently could let a
    migration through that it was there to stop.  Likewise when the registry
    is ``-only-migratable`` and a stored blocker is one it refuses (added
    before that was turned on): QEMU never holds such a blocker, and keeping
    it would contradict what the daemon says it enforces.
    """
    known = set(registry.modes)
    blockers: list[Blocker] = []
    for row in snapshot.blockers:
        unknown = [mode for mode in row.modes if mode not in known]
        if unknown:
            raise ValueError(f"stored blocker {row.id!r} blocks modes the schema does not "
                             f"define ({', '.join(unknown)}); use a --schema that defines "
                             "them, or move the state directory away to start from scratch")
        if registry.only_migratable and not row.internal and DEFAULT_MODE in row.modes:
            raise ValueError(f"stored blocker {row.id!r} blocks the {DEFAULT_MODE} mode and is "
                             "not internal, which --only-migratable refuses; start without "
                             "--only-migratable and delete it, or move the state directory "
                             "away to start from scratch")
        owner = None if row.owner is None else Owner(*row.owner)
        blockers.append(Blocker(row.id, row.reason, row.modes, row.internal, "daemon",
                                owner, row.added, row.seq))
    seqs: dict[int, str] = {}
    for row in snapshot.blockers:
        if row.seq in seqs:
            raise ValueError(f"stored blockers {seqs[row.seq]!r} and {row.id!r} have the same "
                             f"seq {row.seq}, so their order is lost; {_EDITED}")
        seqs[row.seq] = row.id
    # Settings are checked as strictly: a hand-edited floor could hand out ids twice,
    # an unknown mode would silently become another.
    settings = snapshot.settings
    mode = settings.get(MODE, DEFAULT_MODE)
    if type(mode) is not str:
        raise ValueError(f"stored mode {mode!r} is not the name of a mode; {_EDITED}")
    if mode not in known:
        raise ValueError(f"stored mode {mode!r} is not one the schema defines; use a --schema "
                         "that defines it, or move the state directory away to start from "
                         "scratch")
    floor = settings.get(ID_FLOOR, 0)
    if type(floor) is not int or floor < 0:
        raise ValueError(f"stored id-floor {floor!r} is not a count of ids; {_EDITED}")
    events = settings.get(EVENTS, False)
    if type(events) is not bool:
        raise ValueError(f"stored events {events!r} is not true or false; {_EDITED}")
    registry.restore(blockers, mode=str(mode), events=events, id_floor=floor)

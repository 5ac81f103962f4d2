"""Between the registry and its database: what a change writes, what a start reads back.

The registry journals its mutations (:class:`migblockd.registry.Change`); the
durable ones become the store's rows and settings here, in order.  At start
the snapshot on disk becomes the registry's state again: same ids, same
order, same mode, and generated ids that continue past every one handed out
before.

A file edited by hand could hold values no daemon writes; each is refused
with the blocker it is in, rather than served: the store checks that every
value has its type, and here each is held to what it stands for.  ``added``
is a wall-clock time as QMP timestamps carry it (whole seconds since the
epoch, which clients turn into dates: 1970 to 9999, ``migblockd.clock``'s range,
into which the daemon clamps the clock it stamps them with).  ``seq`` is the order,
numbered from 0 one add at a time and stored in SQLite's 64-bit INTEGER, so
it stays below 2**62 and leaves room for the blockers added after it.  An
owner is what ``SO_PEERCRED`` reports: a ``pid_t``, a ``uid_t`` and a
``gid_t``.  ``modes`` name MigMode values, each once (QEMU keeps them as a
bit set); their order is the schema's, which a new ``--schema`` may change.
A blocker added for every mode is stored as such (``modes`` None), and comes
back blocking every mode of the schema it is restored with: QEMU's
``MIG_MODE_ALL``, which a mode added to MigMode since does not escape.
The id is one a client may choose or one the daemon generated below the
stored ``id-floor`` (above it, the same id would be generated again).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from migblockd import state
from migblockd.clock import in_range
from migblockd.registry import (
    DEFAULT_MODE,
    Blocker,
    BlockerError,
    Change,
    Owner,
    Registry,
    only_migratable_refuses,
)
from migblockd.registry.ids import GENERATED_PREFIX, MAX_ID_LENGTH, check_id
from migblockd.state.rows import CHUNK

__all__ = ["only_migratable_refusal", "restore", "schema_refusal", "to_store"]

MODE, EVENTS, ID_FLOOR = "mode", "events", "id-floor"
_EDITED = "restore the file from a backup, or move it away to start from scratch"
#: Beyond any seq a daemon hands out, and far enough below SQLite's 2**63 for the
#: ones handed out after it.
_LAST_SEQ = 1 << 62
_PID_END, _ID_END = 1 << 31, 1 << 32  # pid_t is signed; uid_t and gid_t are not


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
                blocker.id, blocker.reason, None if blocker.every_mode else blocker.modes,
                blocker.internal,
                None if owner is None else (owner.pid, owner.uid, owner.gid),
                blocker.added, blocker.seq)))
        elif change.kind == "delete":
            assert blocker is not None
            out.append(state.Delete(blocker.id))
        else:
            key = {"mode": MODE, "events": EVENTS, "id-floor": ID_FLOOR}[change.kind]
            out.append(state.Setting(key, change.new))
    return out


def restore(registry: Registry, snapshot: state.Snapshot,
            progress: Callable[[int, int], None] | None = None) -> None:
    """Give an empty registry what ``snapshot`` holds.  ``progress`` is told how
    many blockers have been checked, of how many, every
    :data:`~migblockd.state.rows.CHUNK` (a long start says so: migblockd.progress).

    Raises ValueError (naming the blocker) when a stored blocker blocks a
    mode the schema no longer defines: dropping it silently could let a
    migration through that it was there to stop.  Likewise when the registry
    is ``-only-migratable`` and a stored blocker is one it refuses (added
    before that was turned on): QEMU never holds such a blocker, and keeping
    it would contradict what the daemon says it enforces.  And when a value
    is out of its range (see the module's doc).
    """
    known = set(registry.modes)
    # Settings are checked as strictly: a hand-edited floor could hand out ids twice,
    # an unknown mode would silently become another.
    settings = snapshot.settings
    mode = settings.get(MODE, DEFAULT_MODE)
    if type(mode) is not str:
        raise ValueError(f"stored mode {_json(mode)} is not the name of a mode; {_EDITED}")
    if mode not in known:
        raise ValueError(_mode_not_defined(mode))
    floor = settings.get(ID_FLOOR, 0)
    if type(floor) is not int or floor < 0:
        raise ValueError(f"stored id-floor {_json(floor)} is not a count of ids; {_EDITED}")
    if floor >= _LAST_SEQ:
        # Ids are generated one per add, as seqs are: no daemon gets near, and one of
        # thousands of digits fails every generated id (Python refuses to write it).
        shown = _json(floor) if floor < 10**40 else f"of {len(str(floor))} digits"
        raise ValueError(f"stored id-floor {shown} is past any count of ids a daemon hands "
                         f"out (0 to {_LAST_SEQ - 1}); {_EDITED}")
    events = settings.get(EVENTS, False)
    if type(events) is not bool:
        raise ValueError(f"stored events {_json(events)} is not true or false; {_EDITED}")
    blockers: list[Blocker] = []
    total = len(snapshot.blockers)
    for done, row in enumerate(snapshot.blockers):
        if progress is not None and done % CHUNK == 0:
            progress(done, total)
        _check_values(row, floor if ID_FLOOR in settings else None)
        listed = registry.modes if row.modes is None else row.modes  # None: every mode
        unknown = [mode for mode in listed if mode not in known]
        if unknown:
            raise ValueError(_modes_not_defined(row.id, unknown))
        if registry.only_migratable and only_migratable_refuses(row.internal, listed):
            raise ValueError(_refused_by_only_migratable(row.id))
        owner = None if row.owner is None else Owner(*row.owner)
        modes = tuple(mode for mode in registry.modes if mode in listed)  # MigMode order
        blockers.append(Blocker(row.id, row.reason, modes, row.internal, "daemon",
                                owner, row.added, row.seq, every_mode=row.modes is None))
    seqs: dict[int, str] = {}
    first_seq: dict[str, int] = {}  # by id: the seq of its first (oldest) row
    for row in snapshot.blockers:
        if row.seq in seqs:
            raise ValueError(f"stored blockers {seqs[row.seq]!r} and {row.id!r} have the same "
                             f"seq {row.seq}, so their order is lost; {_EDITED}")
        seqs[row.seq] = row.id
        # Only a table rebuilt by hand without its primary key holds such rows: both
        # would be served, and del-blocker would delete one of them, then neither.
        if row.id in first_seq:
            raise ValueError(f"stored blockers at seq {first_seq[row.id]} and {row.seq} have "
                             f"the same id {row.id!r}, which names one blocker; {_EDITED}")
        first_seq[row.id] = row.seq
    if progress is not None:
        progress(total, total)
    registry.restore(blockers, mode=str(mode), events=events, id_floor=floor)


def only_migratable_refusal(blockers: Iterable[Blocker]) -> str | None:
    """Why a start with ``--only-migratable`` would refuse what a running daemon
    keeps of ``blockers`` (its daemon-scoped ones, oldest first), in the words of
    :func:`restore`; None when it would not.  A reload that turns the setting on
    (applied only by a restart) says it while the blocker can still be deleted."""
    for blocker in blockers:
        if blocker.scope == "daemon" and only_migratable_refuses(blocker.internal, blocker.modes):
            return _refused_by_only_migratable(blocker.id)
    return None


def schema_refusal(blockers: Iterable[Blocker], mode: str, modes: Iterable[str]) -> str | None:
    """Why a start with a schema whose MigMode has ``modes`` would refuse what a
    running daemon keeps: its migration ``mode`` and its daemon-scoped ``blockers``
    (oldest first), in the words of :func:`restore`; None when it would not.
    A blocker of every mode blocks every mode of any schema."""
    known = set(modes)
    if mode not in known:
        return _mode_not_defined(mode)
    for blocker in blockers:
        unknown = [] if blocker.every_mode else [m for m in blocker.modes if m not in known]
        if blocker.scope == "daemon" and unknown:
            return _modes_not_defined(blocker.id, unknown)
    return None


def _mode_not_defined(mode: str) -> str:
    return (f"stored mode {_json(mode)} is not one the schema defines; use a --schema that "
            "defines it, or move the state directory away to start from scratch")


def _modes_not_defined(id: str, unknown: list[str]) -> str:
    return (f"stored blocker {id!r} blocks modes the schema does not define "
            f"({', '.join(unknown)}); use a --schema that defines them, or move the state "
            "directory away to start from scratch")


def _refused_by_only_migratable(id: str) -> str:
    return (f"stored blocker {id!r} blocks the {DEFAULT_MODE} mode and is not internal, which "
            "--only-migratable refuses; start without --only-migratable and delete it, or "
            "move the state directory away to start from scratch")


def _json(value: object) -> str:
    """A stored setting's value as the file holds it (JSON), for a message."""
    return json.dumps(value, ensure_ascii=True)


def _check_values(row: state.BlockerRow, floor: int | None) -> None:
    """Raise ValueError, naming the blocker, for a value no daemon writes;
    ``floor`` is the stored id-floor (None: the file has none, so 0)."""
    cut = row.id if len(row.id) <= MAX_ID_LENGTH else row.id[:MAX_ID_LENGTH] + "..."
    where = f"stored blocker {cut!a}"  # an edited id may hold anything
    serial = row.id.removeprefix(GENERATED_PREFIX)
    if serial != row.id:  # generated: "#blocker" and the serial, as IdSource writes it
        valid = serial.isascii() and serial.isdigit() and (serial == "0" or serial[0] != "0")
        # Compared as digits: int() refuses strings of more than 4300 of them.
        if valid and floor is None:
            raise ValueError(f"{where} has a generated id but no id-floor is stored, so the "
                             f"daemon would generate it again; {_EDITED}")
        if valid and (len(serial), serial) >= (len(str(floor)), str(floor)):
            raise ValueError(f"{where} has a generated id at or past the stored id-floor "
                             f"{floor}, so the daemon would generate it again; {_EDITED}")
    else:
        try:
            check_id(row.id)
            valid = True
        except BlockerError:
            valid = False
    if not valid:
        raise ValueError(f"{where} has an id that no client may choose and the daemon does "
                         f"not generate; {_EDITED}")
    if not row.reason:
        raise ValueError(f"{where} has an empty reason; {_EDITED}")
    if row.modes is not None and len(set(row.modes)) != len(row.modes):
        raise ValueError(f"{where} lists a mode twice ({', '.join(row.modes)}); {_EDITED}")
    if not 0 <= row.seq < _LAST_SEQ:
        raise ValueError(f"{where} has seq {row.seq}, outside the order's range (0 to "
                         f"{_LAST_SEQ - 1}); {_EDITED}")
    if not in_range(row.added):
        raise ValueError(f"{where} was added at {row.added!r}, which is not a time from 1970 "
                         f"to 9999 (seconds since the epoch); {_EDITED}")
    if row.owner is not None:
        pid, uid, gid = row.owner
        if not (0 <= pid < _PID_END and 0 <= uid < _ID_END and 0 <= gid < _ID_END):
            raise ValueError(f"{where} has owner pid {pid}, uid {uid}, gid {gid}, which no "
                             f"process has; {_EDITED}")

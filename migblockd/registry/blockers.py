"""The blocker store: blockers in QEMU's per-mode lists, indexed by id and connection.

QEMU keeps one singly linked list of ``Error`` objects per migration mode
(``static GSList *migration_blockers[MIG_MODE__MAX]`` in
``migration/migration.c``), newest first.  Here each blocker sits in one
doubly linked list per mode it blocks, plus the list of all blockers: O(1)
worst-case insertion, removal and "newest of a mode" (a dict keyed by id would
leave dead slots that ``reversed()`` must skip after deletions, making
"newest" O(deleted) until the next resize).

The blocker object is its own list node: its ``_older``/``_newer`` lists hold
its neighbours in each list it is in (index 0: all blockers; then one per
mode, in MigMode order), so a blocker costs three objects the garbage
collector tracks, whatever the number of modes.  This module knows no rules:
:mod:`migblockd.registry.registry` decides what may be added or removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter

__all__ = ["Blocker", "BlockerStore", "Chain", "Owner"]


@dataclass(frozen=True, slots=True)
class Owner:
    """Peer credentials (``SO_PEERCRED``) of the connection that added a blocker."""

    pid: int
    uid: int
    gid: int


class Blocker:
    """One registered blocker.  Treat it as read-only: the store indexes it.

    ``modes`` lists the modes it blocks in MigMode order; ``every_mode`` says
    that it was added for every mode (QEMU's ``MIG_MODE_ALL``, ``add-blocker``
    without ``modes``), which ``modes`` then lists as the schema of now has
    them: the disk keeps "every mode", so a restart with a schema that adds a
    mode blocks that one too.  A list that names each mode is not that (in
    QEMU ``migrate_add_blocker_modes()`` with each mode, not
    ``migrate_add_blocker()``): it stays that list.  ``internal`` only
    exempts it from ``-only-migratable`` (QEMU's ``migrate_add_blocker_internal``
    is for QEMU's own temporary blockers, such as dump-guest-memory's).
    ``connection`` is the connection that added a ``scope: connection``
    blocker (identity, not equality, is what counts), else None.  ``seq``
    orders blockers by age across restarts: a larger ``seq`` is newer.
    ``cache`` is free for the wire layer to keep this blocker's encoded form.
    """

    __slots__ = ("_chains", "_newer", "_older", "added", "cache", "connection", "every_mode",
                 "id", "internal", "modes", "owner", "reason", "scope", "seq")

    def __init__(self, id: str, reason: str, modes: tuple[str, ...], internal: bool,
                 scope: str, owner: Owner | None, added: float, seq: int,
                 connection: object | None = None, *, every_mode: bool = False) -> None:
        self.id = id
        self.reason = reason
        self.modes = modes
        self.every_mode = every_mode
        self.internal = internal
        self.scope = scope
        self.owner = owner
        self.added = added
        self.seq = seq
        self.connection = connection
        self.cache: object = None
        self._chains: tuple[int, ...] = ()
        self._older: list[Blocker | None] = []
        self._newer: list[Blocker | None] = []

    def __repr__(self) -> str:
        modes = "every" if self.every_mode else repr(self.modes)
        return (f"Blocker(id={self.id!r}, reason={self.reason!r}, modes={modes}, "
                f"internal={self.internal!r}, scope={self.scope!r}, seq={self.seq!r})")


class Chain:
    """One ordered list: ``k`` is the blocker's slot for it in ``_older``/``_newer``."""

    __slots__ = ("count", "k", "newest", "oldest")

    def __init__(self, k: int) -> None:
        self.k = k
        self.oldest: Blocker | None = None
        self.newest: Blocker | None = None
        self.count = 0

    def push(self, b: Blocker, slot: int) -> None:
        """Append ``b`` as the newest; ``slot`` is this chain's index in ``b``'s lists."""
        b._older[slot] = self.newest
        b._newer[slot] = None
        if self.newest is None:
            self.oldest = b
        else:
            self.newest._newer[self._slot(self.newest)] = b
        self.newest = b
        self.count += 1

    def insert(self, b: Blocker, slot: int) -> None:
        """Put ``b`` back where its ``seq`` belongs (undoing a removal)."""
        after = self.newest
        while after is not None and after.seq > b.seq:
            after = after._older[self._slot(after)]
        before = self.oldest if after is None else after._newer[self._slot(after)]
        b._older[slot] = after
        b._newer[slot] = before
        if after is None:
            self.oldest = b
        else:
            after._newer[self._slot(after)] = b
        if before is None:
            self.newest = b
        else:
            before._older[self._slot(before)] = b
        self.count += 1

    def unlink(self, b: Blocker, slot: int) -> None:
        older, newer = b._older[slot], b._newer[slot]
        if older is None:
            self.oldest = newer
        else:
            older._newer[self._slot(older)] = newer
        if newer is None:
            self.newest = older
        else:
            newer._older[self._slot(newer)] = older
        b._older[slot] = b._newer[slot] = None
        self.count -= 1

    def _slot(self, b: Blocker) -> int:
        # Chain 0 (all blockers) is slot 0 of every blocker; a mode's chain is
        # at the position of that mode among the blocker's own chains.
        return 0 if self.k == 0 else b._chains.index(self.k)

    def __iter__(self) -> Iterator[Blocker]:
        b = self.oldest
        while b is not None:
            yield b
            b = b._newer[self._slot(b)]


class BlockerStore:
    """Blockers in insertion order, per mode, by id and by connection.

    ``modes`` are the MigMode members in schema order.  Operations trust their
    caller (the registry): ids are unique, modes known.
    """

    __slots__ = ("_all", "_by_connection", "_by_id", "_chains", "_index", "_owner_of",
                 "_per_owner", "_per_uid")

    def __init__(self, modes: Sequence[str]) -> None:
        self._all = Chain(0)
        self._index = {mode: k for k, mode in enumerate(modes, start=1)}
        self._chains: dict[str, Chain] = {mode: Chain(k) for mode, k in self._index.items()}
        self._by_id: dict[str, Blocker] = {}
        # Keyed by id(connection): connection objects need not be hashable, and
        # each indexed blocker holds a reference to its connection, so the id
        # cannot be reused while the entry exists.
        self._by_connection: dict[int, dict[str, Blocker]] = {}
        # How many blockers each owner uid holds (None: no known owner), kept
        # here where every addition and removal passes, for O(1) quotas.
        self._per_uid: dict[int | None, int] = {}
        # And how many the subordinate uids of each user hold (see share_counts).
        self._owner_of: Callable[[int], int | None] | None = None
        self._per_owner: dict[int, int] = {}

    def share_counts(self, owner_of: Callable[[int], int | None] | None) -> None:
        """Count the blockers of each subordinate uid for the user it belongs to
        too (``owner_of``: that user's uid, or None; None: no user has any)."""
        self._owner_of = owner_of
        self._per_owner = {}
        if owner_of is not None:
            for uid, held in self._per_uid.items():
                if uid is not None and (owner := owner_of(uid)) is not None:
                    self._per_owner[owner] = self._per_owner.get(owner, 0) + held

    def add(self, b: Blocker) -> None:
        """Index ``b`` as the newest blocker (or, by ``seq``, where it belongs)."""
        chains = tuple(self._index[mode] for mode in b.modes)
        b._chains = (0, *chains)
        b._older = [None] * (len(chains) + 1)
        b._newer = [None] * (len(chains) + 1)
        newest = self._all.newest
        put = Chain.push if newest is None or newest.seq < b.seq else Chain.insert
        put(self._all, b, 0)
        for slot, mode in enumerate(b.modes, start=1):
            put(self._chains[mode], b, slot)
        self._by_id[b.id] = b
        uid = None if b.owner is None else b.owner.uid
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        if self._owner_of is not None and uid is not None:
            owner = self._owner_of(uid)
            if owner is not None:
                self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        if b.connection is not None:
            self._by_connection.setdefault(id(b.connection), {})[b.id] = b

    def remove(self, b: Blocker) -> None:
        del self._by_id[b.id]
        self._all.unlink(b, 0)
        for slot, mode in enumerate(b.modes, start=1):
            self._chains[mode].unlink(b, slot)
        uid = None if b.owner is None else b.owner.uid
        left = self._per_uid[uid] - 1
        if left:
            self._per_uid[uid] = left
        else:
            del self._per_uid[uid]
        if self._owner_of is not None and uid is not None:
            owner = self._owner_of(uid)
            if owner is not None:
                shared = self._per_owner[owner] - 1
                if shared:
                    self._per_owner[owner] = shared
                else:
                    del self._per_owner[owner]
        if b.connection is not None:
            key = id(b.connection)
            owned = self._by_connection[key]
            del owned[b.id]
            if not owned:
                del self._by_connection[key]

    def get(self, id: str) -> Blocker | None:
        return self._by_id.get(id)

    def count_owned(self, uid: int | None) -> int:
        """How many blockers ``uid`` owns (None: those with no known owner)."""
        return self._per_uid.get(uid, 0)

    def count_held(self, user: int | None) -> int:
        """How many blockers ``user`` and its subordinate uids own (see
        :meth:`share_counts`): what counts against its quota."""
        shared = 0 if user is None else self._per_owner.get(user, 0)
        return self._per_uid.get(user, 0) + shared

    def owners(self) -> list[int | None]:
        """The uids that own blockers (None: blockers with no known owner)."""
        return list(self._per_uid)

    def owned_by(self, connection: object) -> list[Blocker]:
        """The connection-scoped blockers ``connection`` added, oldest first."""
        owned = self._by_connection.get(id(connection))
        # By seq, not by insertion: a delete a failed commit took back puts its
        # blocker back last here, though it stays the oldest.
        return sorted(owned.values(), key=attrgetter("seq")) if owned else []

    def chain(self, mode: str | None) -> Chain:
        """The list of ``mode`` (None: every blocker).  KeyError for an unknown mode."""
        return self._all if mode is None else self._chains[mode]

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, id: object) -> bool:
        return id in self._by_id

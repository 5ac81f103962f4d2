"""The order in which QEMU walks the members of a JSON object (``qobject/qdict.c``).

QEMU keeps an object as a ``QDict``: a hash table of 512 buckets, each a list
with the member added last first.  ``qdict_first()``/``qdict_next()`` walk the
buckets in order, so QEMU meets an object's members in an order that depends on
their names, not on the order they were sent in.  That order decides which of
several errors QEMU reports: ``qmp_dispatch_check_obj()``
(``qapi/qmp-dispatch.c``) checks a request's members in it and stops at the
first bad one, so ``{"foo": 1, "bar": 2, "execute": "x"}`` is refused for
``bar``, and ``exec-oob`` is met before ``execute``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

_BUCKETS: Final = 512  # QDICT_BUCKET_MAX
_MASK: Final = 0xFFFFFFFF


def tdb_hash(name: bytes) -> int:
    """QEMU's ``tdb_hash()``, with C's unsigned 32-bit arithmetic.

    Byte ``i`` is shifted by ``i * 5 % 24``, which repeats every 24 bytes, so
    the bytes are summed in 24 strides at C speed: a member name can be as long
    as a message.
    """
    value = 0x238F13AF * len(name)
    for k in range(min(24, len(name))):
        value += sum(name[k::24]) << (k * 5 % 24)
    return (1103515243 * (value & _MASK) + 12345) & _MASK


def bucket(key: str) -> int:
    """The bucket of member ``key``.  QEMU holds strings in modified UTF-8, where
    U+0000 is the two bytes C0 80.  (Not cached: a name can be as long as a
    message, and only requests with something wrong are looked at this way.)"""
    return tdb_hash(key.encode("utf-8").replace(b"\0", b"\xc0\x80")) % _BUCKETS


#: Members past which an object's order is the one it was sent in, not QEMU's:
#: modelling QEMU's hash tables costs 10-40 µs per member in Python, and no real
#: client sends an object of this many; a hostile one (``max-tokens`` allows about
#: 4,000 members) would hold the event loop for 0.1 s per request.
EXACT_MEMBERS: Final = 64


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys``, given in the order they were added, in the order QEMU walks them
    (past :data:`EXACT_MEMBERS`, as given)."""
    added = list(keys)
    if len(added) > EXACT_MEMBERS:
        return added
    order = sorted(range(len(added)), key=lambda i: (bucket(added[i]), -i))
    return [added[i] for i in order]


def _g_str_hash(key: str) -> int:
    """glib's ``g_str_hash()`` (djb2 over signed chars) of ``key`` as QEMU holds it."""
    value = 5381
    for byte in key.encode("utf-8").replace(b"\0", b"\xc0\x80"):
        value = (value * 33 + (byte - 256 if byte > 127 else byte)) & _MASK
    return value


#: glib's ``prime_mod``: a table of ``1 << shift`` slots indexes modulo this.
_PRIME_MOD: Final = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381,
                     32749, 65521, 131071, 262139, 524287, 1048573, 2097143, 4194301,
                     8388593, 16777213, 33554393, 67108859, 134217689, 268435399,
                     536870909, 1073741789, 2147483647)
_MIN_SHIFT: Final = 3
_UNUSED, _TOMBSTONE = 0, 1  # slot hashes; a real hash is at least 2


class _GHashTable:
    """Where glib 2.74's ``GHashTable`` (``glib/ghash.c``) keeps string keys: open
    addressing, quadratic probing, grown past 15/16 occupied and shrunk below 1/4
    full, rehashed in place (``g_hash_table_resize()``)."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size, self.mod, self.mask = 1 << shift, _PRIME_MOD[shift], (1 << shift) - 1

    def _index(self, hash_value: int) -> int:
        return (hash_value * 11 & _MASK) % self.mod

    def _lookup(self, key: str) -> tuple[int, bool, int]:
        hash_value = max(_g_str_hash(key), 2)
        index, step, tombstone = self._index(hash_value), 0, None
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index, True, hash_value
            if self.hashes[index] == _TOMBSTONE and tombstone is None:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (index if tombstone is None else tombstone), False, hash_value

    def insert(self, key: str) -> None:
        index, found, hash_value = self._lookup(key)
        if found:
            return
        old = self.hashes[index]
        self.hashes[index], self.keys[index] = hash_value, key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index, found, _ = self._lookup(key)
        if found:
            self.hashes[index], self.keys[index] = _TOMBSTONE, None
            self.nnodes -= 1
            self._maybe_resize()

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT) \
                or self.size <= self.noccupied + self.noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        self._set_shift(max(int(self.nnodes * 1.333).bit_length(), _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            hash_value = self.hashes[i]
            if hash_value < 2:
                self.hashes[i] = _UNUSED  # tombstones go
                continue
            if moved[i]:
                continue
            self.hashes[i], key, self.keys[i] = _UNUSED, self.keys[i], None
            while True:  # place it, evicting what is there to be placed next
                index, step = self._index(hash_value), 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced, self.hashes[index] = self.hashes[index], hash_value
                key, self.keys[index] = self.keys[index], key
                if replaced < 2:
                    break
                hash_value = replaced
        del self.hashes[self.size:], self.keys[self.size:]
        self.noccupied = self.nnodes

    def __iter__(self) -> Iterator[str]:
        return (key for key in self.keys if key is not None)


def unvisited_order(keys: Iterable[str], visited: Iterable[str] = ()) -> list[str]:
    """The order in which QEMU's input visitor names an object's unexpected members.

    ``qobject_input_start_struct()`` (``qapi/qobject-input-visitor.c``) puts the
    object's member names, in its QDict's order, into a glib ``GHashTable``;
    each member the visitor then takes (``visited``, in the order it takes
    them: its schema's) is removed, and ``qobject_input_check_struct()``
    reports the first name left, in the table's slot order.  Removals matter
    only to a table that grew past 8 slots: it shrinks when a quarter full,
    and its names move.  Past :data:`EXACT_MEMBERS` members, the order sent.
    """
    names = list(keys)
    if len(names) > EXACT_MEMBERS:
        return names
    table = _GHashTable()
    for name in qdict_order(names):
        table.insert(name)
    for name in visited:
        table.remove(name)
    return list(table)

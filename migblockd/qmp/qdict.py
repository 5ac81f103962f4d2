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

from collections.abc import Iterable
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


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys``, given in the order they were added, in the order QEMU walks them."""
    added = list(keys)
    order = sorted(range(len(added)), key=lambda i: (bucket(added[i]), -i))
    return [added[i] for i in order]


#: Up to this many members, a GHashTable keeps its first size: 8 slots, modulus 7.
_GHASH_SMALL: Final = 7


def _g_str_hash(key: str) -> int:
    """glib's ``g_str_hash()`` (djb2 over signed chars) of ``key`` as QEMU holds it."""
    value = 5381
    for byte in key.encode("utf-8").replace(b"\0", b"\xc0\x80"):
        value = (value * 33 + (byte - 256 if byte > 127 else byte)) & _MASK
    return value


def unvisited_order(keys: Iterable[str]) -> list[str] | None:
    """The order in which QEMU's input visitor names an object's unexpected members.

    ``qobject_input_start_struct()`` (``qapi/qobject-input-visitor.c``) puts the
    object's member names, in its QDict's order, into a glib ``GHashTable``;
    ``qobject_input_check_struct()`` reports the first name left there.  A
    table of up to seven names has eight slots, indexed by the name's hash times
    11 modulo 7, collisions probed quadratically (glib 2.74's
    ``g_hash_table_hash_to_index()`` and ``g_hash_table_lookup_node()``).
    None for bigger tables, which grow and move their names around.
    """
    names = qdict_order(keys)
    if len(names) > _GHASH_SMALL:
        return None
    slots: list[str | None] = [None] * 8
    for name in names:
        index = (max(_g_str_hash(name), 2) * 11 & _MASK) % 7
        step = 0
        while slots[index] is not None:
            step += 1
            index = (index + step) & 7
        slots[index] = name
    return [name for name in slots if name is not None]

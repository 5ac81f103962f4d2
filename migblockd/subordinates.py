"""Subordinate uids and gids (subuid(5), subgid(5)): whose each one is.

Shadow-utils grants users ranges of ids in ``/etc/subuid`` and ``/etc/subgid``
(Debian's ``useradd`` gives every new user 65,536 of each).  A user can become any
of them in a user namespace of their own (``newuidmap``, ``newgidmap``), and the
kernel's ``SO_PEERCRED`` then reports that uid, or gid, for the user's
connections.  So access control (:mod:`migblockd.resolver`) gives such an id no
more than its owner gets, and the quotas (:mod:`migblockd.guard`) count what a
subordinate uid holds as its owner's.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from typing import Final

from migblockd.access import is_number

__all__ = ["SUBGID_FILE", "SUBUID_FILE", "Subordinates", "c_ulong", "subordinate_ranges"]

#: Where shadow-utils grants subordinate uids (subuid(5)).
SUBUID_FILE: Final = "/etc/subuid"
#: And subordinate gids (subgid(5)).
SUBGID_FILE: Final = "/etc/subgid"


class Subordinates:
    """The ranges one file grants, looked up by id.

    ``uid_of`` turns an owner's name into its uid (None: no such user, whose
    ranges are nobody's).  Names are looked up once, here: a quota asks at
    every ``add-blocker``, and a reload reads the file again.
    """

    __slots__ = ("_overlapping", "_ranges", "_starts")

    def __init__(self, path: str, uid_of: Callable[[str], int | None]) -> None:
        ranges = []
        for start, count, key in subordinate_ranges(path):
            owner = int(key) if is_number(key) else uid_of(key)
            if owner is not None and count > 0:
                ranges.append((start, start + count, owner))
        #: (first, past the last, owner's uid), sorted.
        self._ranges = sorted(ranges)
        self._starts = [start for start, _, _ in self._ranges]
        self._overlapping = any(later[0] < earlier[1] for earlier, later
                                in itertools.pairwise(self._ranges))

    def owner_of(self, id: int) -> int | None:
        """The uid of the user granted ``id``, or None.  Overlapping ranges: the one
        that starts last (the user whose count a subordinate uid shares)."""
        owners = self.owners_of(id)
        return owners[0] if owners else None

    def owners_of(self, id: int) -> list[int]:
        """The uids of every user granted ``id``, the range that starts last first:
        each of them can make it theirs, so a cap takes the least of their roles."""
        at = bisect.bisect_right(self._starts, id) - 1
        owners = []
        # Ranges rarely overlap (useradd never makes them so); when they do, an
        # earlier one may hold id too.
        while at >= 0:
            start, end, owner = self._ranges[at]
            if start <= id < end:
                owners.append(owner)
                if not self._overlapping:
                    break
            elif not self._overlapping:
                break
            at -= 1
        return owners

    def __bool__(self) -> bool:
        return bool(self._ranges)


def subordinate_ranges(path: str) -> list[tuple[int, int, str]]:
    """The ranges in ``path`` (``user:start:count``, the user by name or number)
    as (start, count, user); none when it cannot be read (no such file: nobody
    has any).  The numbers are read as :func:`c_ulong` reads them, as newuidmap
    does: a line it refuses grants nothing, and is skipped."""
    ranges = []
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                user, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                first, many = c_ulong(start), c_ulong(count)
                if user and first is not None and many is not None:
                    ranges.append((first, many, user))
    except OSError:
        pass
    return ranges


#: What C's isspace() takes for a blank, in the C locale (strtoul() skips them).
_C_BLANKS: Final = " \t\n\v\f\r"
_ULONG_MAX: Final = 2**64 - 1
_DIGITS: Final = {8: frozenset("01234567"), 10: frozenset("0123456789"),
                  16: frozenset("0123456789abcdefABCDEF")}


def c_ulong(text: str) -> int | None:
    """``text`` as shadow-utils reads a subordinate range's start and count (its
    ``getulong()``, ``str2ul()`` in later releases: ``strtoul()`` in base 0, the
    whole field, no sign but ``+``, at most ``ULONG_MAX``), or None when it refuses it.

    So ``0x100000`` is hexadecimal and ``0100000`` octal, as newuidmap grants
    them: read as decimal, a hexadecimal range would be nobody's here, and its
    uids would escape their owner's role and quotas.
    """
    rest = text.lstrip(_C_BLANKS)
    if rest[:1] in ("+", "-"):
        if rest[0] == "-":
            return None  # strtoul_noneg(): a negative number is refused
        rest = rest[1:]
    base = 10
    if rest[:2] in ("0x", "0X") and rest[2:3] and rest[2] in _DIGITS[16]:
        base, rest = 16, rest[2:]
    elif rest[:1] == "0":
        base = 8
    if not rest or not set(rest) <= _DIGITS[base]:
        return None  # nothing read, or something left unread: refused
    value = int(rest, base)
    return value if value <= _ULONG_MAX else None

"""``query-blockers``' answer, kept encoded as the registry changes.

With 100,000 blockers the answer is some 35 MB of JSON.  Encoding it again
for every poll, or even joining 100,000 encoded blockers into one string,
would hold the only thread for a good part of a second.  So the listing is
kept in *segments*: the blockers whose age rank (``Blocker.seq``, which is the
order of the list of all blockers) falls in the same block of
:data:`SEGMENT` ranks, each segment joined once and again only after one of
its blockers came or went.  A listing is then the segments in order, handed to
the transport as they are: a change costs one segment, and a poll costs a list
of about a hundred references.

One listing per mode that has been asked for (None: every blocker); the core
feeds each of them every addition and removal.
"""

from __future__ import annotations

from typing import Final

from migblockd.registry import Blocker, Registry
from migblockd.render import blocker_text

__all__ = ["SEGMENT", "Listing", "Listings"]

#: Blockers per segment: a change re-joins this many encoded blockers.
SEGMENT: Final = 1024


class Listing:
    """The encoded blockers of one mode (None: all of them), oldest first."""

    __slots__ = ("_joined", "_segments", "mode")

    def __init__(self, mode: str | None, blockers: list[Blocker]) -> None:
        self.mode = mode
        self._segments: dict[int, dict[int, bytes]] = {}
        self._joined: dict[int, bytes] = {}
        for blocker in blockers:
            self.add(blocker)

    def wants(self, blocker: Blocker) -> bool:
        return self.mode is None or self.mode in blocker.modes

    def add(self, blocker: Blocker) -> None:
        key = blocker.seq // SEGMENT
        self._segments.setdefault(key, {})[blocker.seq] = blocker_text(blocker).encode("ascii")
        self._joined.pop(key, None)

    def remove(self, blocker: Blocker) -> None:
        key = blocker.seq // SEGMENT
        segment = self._segments.get(key)
        if segment is None or segment.pop(blocker.seq, None) is None:
            return
        self._joined.pop(key, None)
        if not segment:
            del self._segments[key]

    def parts(self) -> list[bytes]:
        """The JSON array, in pieces to be written one after the other."""
        segments = self._segments
        if not segments:
            return [b"[]"]
        joined = self._joined
        out = [b"["]
        for key in sorted(segments):
            text = joined.get(key)
            if text is None:
                segment = segments[key]
                # Ranks arrive in order, except when a failed commit puts one back.
                text = joined[key] = b", ".join(segment[seq] for seq in sorted(segment))
            if len(out) > 1:
                out.append(b", ")
            out.append(text)
        out.append(b"]")
        return out


class Listings:
    """The listings asked for so far, kept current from the registry's changes."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._by_mode: dict[str | None, Listing] = {}

    def get(self, mode: str | None) -> Listing:
        listing = self._by_mode.get(mode)
        if listing is None:
            listing = self._by_mode[mode] = Listing(mode, self.registry.blockers(mode))
        return listing

    def added(self, blocker: Blocker) -> None:
        for listing in self._by_mode.values():
            if listing.wants(blocker):
                listing.add(blocker)

    def removed(self, blocker: Blocker) -> None:
        for listing in self._by_mode.values():
            if listing.wants(blocker):
                listing.remove(blocker)

    def reset(self) -> None:
        """Forget everything: the next listing is built from the registry afresh."""
        self._by_mode.clear()

"""The encoded listing kept in segments always equals encoding the registry afresh."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from migblockd.contract import Contract
from migblockd.listing import SEGMENT, Listings
from migblockd.registry import Change, FakeClock, Registry
from migblockd.render import blocker_info

CONTRACT = Contract.load()
MODES = CONTRACT.enums["MigMode"]

Step = tuple[str, int, tuple[str, ...]]
steps = st.lists(st.tuples(st.sampled_from(["add", "del", "undo"]), st.integers(0, 40),
                           st.lists(st.sampled_from(MODES), min_size=1, max_size=2).map(tuple)),
                 max_size=80)


def listing(listings: Listings, mode: str | None) -> list[object]:
    return json.loads(b"".join(listings.get(mode).parts()))  # type: ignore[no-any-return]


@settings(max_examples=150, deadline=None, database=None)
@given(steps)
def test_the_listing_follows_every_change_in_order(plan: list[Step]) -> None:
    registry = Registry(MODES, clock=FakeClock())
    listings = Listings(registry)
    listing(listings, None), listing(listings, "normal")  # kept from now on
    uncommitted: list[Change] = []
    for action, n, modes in plan:
        if action == "add" and f"b{n}" not in registry:
            registry.add("r" * (n + 1), modes=modes, id=f"b{n}")
        elif action == "del" and f"b{n}" in registry:
            registry.delete(f"b{n}")
        elif action == "undo":
            # A failed commit: everything since the last undo goes back, the
            # listings start over (as Core.commit_failed does).
            registry.undo(uncommitted, alive=lambda connection: True)
            uncommitted.clear()
            listings.reset()
        for change in registry.take_changes():
            uncommitted.append(change)
            if change.kind == "add":
                listings.added(change.blocker)  # type: ignore[arg-type]
            elif change.kind == "delete":
                listings.removed(change.blocker)  # type: ignore[arg-type]
        for mode in (None, "normal", "cpr-exec"):
            assert listing(listings, mode) == [blocker_info(b) for b in registry.blockers(mode)]


def test_a_change_rebuilds_one_segment_only() -> None:
    registry = Registry(MODES, clock=FakeClock())
    listings = Listings(registry)
    for i in range(3 * SEGMENT):
        registry.add("r", id=f"b{i}")
    first = listings.get(None).parts()
    registry.delete("b5")
    listings.removed(registry.take_changes()[-1].blocker)  # type: ignore[arg-type]
    second = listings.get(None).parts()
    # The segments after the first are the very same objects: not joined again.
    assert second[3] is first[3] and second[5] is first[5] and second[1] is not first[1]
    assert len(json.loads(b"".join(second))) == 3 * SEGMENT - 1

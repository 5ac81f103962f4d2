"""migblockd.logs.throttle: lines a client can repeat at will, bounded per key and window."""

from __future__ import annotations

from migblockd.logs.throttle import Throttle


def test_a_burst_per_window_then_counted_then_summed_up() -> None:
    throttle = Throttle(burst=3, window=10.0)
    said = [throttle.admit("k", 1000, 0.0) for _ in range(8)]
    assert said == ["", "", " [more like it within 10 s are counted, not logged]",
                    None, None, None, None, None]
    assert throttle.admit("k", 1000, 9.9) is None  # still the first window
    assert throttle.admit("k", 1000, 10.0) == " [6 more like it were not logged]"
    assert throttle.admit("k", 1000, 10.1) == ""  # a new window starts afresh


def test_keys_are_counted_apart() -> None:
    throttle = Throttle(burst=1, window=10.0)
    assert throttle.admit("refused", 1000, 0.0) == (
        " [more like it within 10 s are counted, not logged]")
    assert throttle.admit("refused", 1000, 1.0) is None
    # Another uid's refusals, and another kind of line, are still logged.
    assert throttle.admit("refused", 1001, 1.0) is not None
    assert throttle.admit("connection", 1000, 1.0) is not None


def test_a_kind_counts_and_sums_up_its_own_lines_alone() -> None:
    throttle = Throttle(burst=2, window=10.0)
    for _ in range(5):
        throttle.admit("migrate", 1000, 0.0)
    # The uid's other kind of line is not hidden by the first one's flood...
    assert throttle.admit("del-blocker", 1000, 1.0) == ""
    # ... and each window's count of unlogged lines goes on a line of its kind.
    assert throttle.admit("migrate", 1000, 10.0) == " [3 more like it were not logged]"
    assert throttle.admit("del-blocker", 1000, 11.0) == ""


def test_past_the_keys_followed_the_rest_share_one_window_per_kind() -> None:
    throttle = Throttle(burst=1, window=10.0, keys=4)
    for uid in range(4):
        assert throttle.admit("k", uid, 0.0) is not None
    # Many uids at once: the fifth and later share a window, so memory and lines stay bounded.
    assert throttle.admit("k", 4, 1.0) is not None
    assert throttle.admit("k", 5, 1.0) is None
    # Still, one kind's flood does not hide another kind's lines about those uids.
    assert throttle.admit("other", 5, 1.0) is not None
    assert throttle.admit("other", 6, 1.0) is None
    # Once the windows are over, keys are followed apart again.
    assert throttle.admit("k", 6, 20.0) is not None
    assert throttle.admit("k", 7, 20.0) is not None

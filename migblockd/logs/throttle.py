"""How many lines of one kind a flood of requests may cost the log.

Some lines are logged for each request or connection a client can repeat at
will: a refusal for its role or quota, a connection turned away at
``max-clients``.  Each is worth a line, but a client that retries in a loop
would make thousands a second (measured: a connect loop at ``max-clients``,
3,800 warnings a second), and journald, past its rate limit
(``RateLimitBurst=``, 10,000 per 30 s by default), then drops the daemon's
lines wholesale, the real problems with them.  So, per key (a kind of line
and what it is about, the uid of a client), at most :data:`BURST` lines go out
in a window of :data:`WINDOW` seconds; the last of them says that more will be
counted, not logged, and the first line of a later window says how many were.
This is the Linux kernel's printk rate limit (``___ratelimit()`` in
lib/ratelimit.c: ``N callbacks suppressed``) and journald's own, per key.

Kinds are apart so that a flood of one does not hide another: ten refused
``migrate`` requests must not silence the same uid's refused ``del-blocker`` of
root's blocker.  A kind is one the code names (a command and the class of its
refusal, say), never a string a client chose: there are few of them.  What a
line is about is not so bounded (any uid may connect), so at most :data:`KEYS`
are followed apart; past them, a kind's lines about all the others share one
window, still apart from the other kinds'.

Decided without I/O: the caller passes the time (its clock's monotonic
seconds) and writes the line itself.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["BURST", "KEYS", "WINDOW", "Throttle"]

#: Lines of one key logged per window ...
BURST = 10
#: ... of this many seconds.
WINDOW = 10.0
#: Keys followed apart at once; past them (a flood from that many uids), a kind's
#: lines about the rest share one key (so at most KEYS + one per kind).
KEYS = 256
_OTHERS = ("others",)


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    unlogged: int = 0


class Throttle:
    """At most ``burst`` lines per key per ``window`` seconds, the rest counted."""

    __slots__ = ("_windows", "burst", "keys", "window")

    def __init__(self, burst: int = BURST, window: float = WINDOW, keys: int = KEYS) -> None:
        self.burst = burst
        self.window = window
        self.keys = keys
        self._windows: dict[Hashable, _Window] = {}

    def admit(self, kind: Hashable, about: Hashable, now: float) -> str | None:
        """Whether a line of ``kind`` about ``about`` (a uid, say) goes out at
        ``now``: None if not (it is counted), else what to append to it: ``""``,
        or a sentence that says the next ones are counted, or how many were not
        logged before it."""
        windows = self._windows
        key = (kind, about)
        current = windows.get(key)
        if current is None and len(windows) >= self.keys:
            self._forget(now)
            if len(windows) >= self.keys:
                key = (kind, _OTHERS)
                current = windows.get(key)
        said = ""
        if current is None or now - current.start >= self.window:
            if current is not None and current.unlogged:
                said = f" [{current.unlogged} more like it were not logged]"
            current = windows[key] = _Window(now)
        elif current.logged >= self.burst:
            current.unlogged += 1
            return None
        current.logged += 1
        if current.logged == self.burst:
            said += f" [more like it within {self.window:g} s are counted, not logged]"
        return said

    def _forget(self, now: float) -> None:
        """Drop the windows that are over (what they did not log is lost with them)."""
        over = [key for key, w in self._windows.items() if now - w.start >= self.window]
        for key in over:
            del self._windows[key]

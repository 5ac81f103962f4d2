"""Who may take a client slot: ``--max-clients`` in all, ``--max-clients-per-uid`` each.

Sans-I/O, as the core that uses it: :class:`Admission` counts the connections
served per peer uid and words the refusal of one too many.  Without a per-uid
bound one local user could open every slot (1,024 idle connections locked
everyone out); administrators are exempt from it, not from ``max_clients``.
Users that together fill the slots would still lock out the administrator who
comes to see why, and to delete a stale blocker: as PostgreSQL keeps
``superuser_reserved_connections``, the last few slots are the administrators'.
"""

from __future__ import annotations

from collections import Counter

from migblockd.registry import Owner
from migblockd.resolver import named as who

__all__ = ["ADMIN_SLOTS_MAX", "Admission", "admin_slots", "exempt_from_uid_limit"]

#: The most slots of ``--max-clients`` kept for administrators: enough for an
#: operator's shell, a script and the metrics scraper; as few as fit, since
#: everyone else loses them.
ADMIN_SLOTS_MAX = 8


def admin_slots(max_clients: int) -> int:
    """How many of ``max_clients`` slots only administrators may take: an eighth,
    at most :data:`ADMIN_SLOTS_MAX`, so that a daemon of fewer than 8 slots (a
    test's, a tiny one's) keeps none and serves everyone alike."""
    return min(ADMIN_SLOTS_MAX, max_clients // 8)


def exempt_from_uid_limit(owner: Owner | None, daemon_uid: int) -> bool:
    """Whether ``owner``'s connections are exempt from ``--max-clients-per-uid``
    (and may take the slots kept for administrators).

    The administrators: root and the daemon's own user.  (Access control may
    name more; this is the one place that decides.)  A peer whose credentials
    the kernel would not give counts against the limit, under ``None``.
    """
    return owner is not None and owner.uid in (0, daemon_uid)


class Admission:
    """The client slots: ``max_clients`` in all, ``max_clients_per_uid`` per
    non-exempt uid (0: no per-uid bound).  Both may change between connections
    (a reload); connections already served are never turned out for it.
    """

    def __init__(self, max_clients: int, max_clients_per_uid: int = 0, *,
                 daemon_uid: int = 0) -> None:
        self.max_clients = max_clients
        self.max_clients_per_uid = max_clients_per_uid
        self.daemon_uid = daemon_uid
        #: About how many clients the file descriptors allow, when fewer than
        #: ``max_clients`` (``RLIMIT_NOFILE``: accept.fit_descriptor_limit): the
        #: admins' slots are kept below that, or users could take every
        #: descriptor before they reached them.
        self.room: int | None = None
        self._per_uid: Counter[int | None] = Counter()

    def refusal(self, owner: Owner | None, served: int, *, admin: bool = False,
                counted: int | None = None) -> tuple[str, str] | None:
        """Why a new connection from ``owner`` cannot be served, or None if it can:
        which limit (``max-clients``, ``max-clients-per-uid``) and the client's message.

        ``admin``: the access policy makes ``owner`` an admin, exempt from the
        per-uid bound like root and the daemon's own user, and served in the
        slots kept for them (:func:`admin_slots`).  ``counted``: the uid
        the bound counts it under, when not its own (the user a subordinate uid
        belongs to).
        """
        if served >= self.max_clients:
            serving = _serving(served, "max-clients", self.max_clients)
            return "max-clients", f"migblockd is {serving}; try again later"
        privileged = admin or exempt_from_uid_limit(owner, self.daemon_uid)
        room = self.max_clients if self.room is None else min(self.max_clients, self.room)
        kept = admin_slots(room)
        if not privileged and served >= room - kept:
            allowed = (f"max-clients={self.max_clients}" if room == self.max_clients else
                       f"the file descriptors allow about {room}")
            last = ("" if not kept else " of which the last one is kept for administrators"
                    if kept == 1 else f" of which the last {kept} are kept for administrators")
            return "max-clients", (f"migblockd is serving {served} clients, {allowed}{last}; "
                                   "try again later")
        limit = self.max_clients_per_uid
        if limit and not privileged:
            uid = owner.uid if owner is not None else None
            key = uid if counted is None else counted
            if self._per_uid[key] >= limit:
                whose = ("peers without credentials" if key is None else who(key)
                         if key == uid else f"{who(key)} and its subordinate uids")
                serving = _serving(self._per_uid[key], "max-clients-per-uid", limit, whose)
                return "max-clients-per-uid", f"migblockd is {serving}; try again later"
        return None

    def serving(self, counted: int | None) -> int:
        """How many connections counted under ``counted`` are served and bound by the
        per-uid limit (admins' are not)."""
        return self._per_uid[counted]

    def admit(self, counted: int | None) -> None:
        """A connection counted under ``counted`` (a uid; None: no credentials) is served."""
        self._per_uid[counted] += 1

    def release(self, counted: int | None) -> None:
        """A connection admitted under ``counted`` has gone."""
        self._per_uid[counted] -= 1
        if self._per_uid[counted] <= 0:
            del self._per_uid[counted]


def _serving(served: int, key: str, limit: int, whose: str | None = None) -> str:
    """``already serving max-clients=2 clients``, or, when a reload has lowered
    the bound below the clients it keeps serving, how many there are."""
    of = "" if whose is None else f" of {whose}"
    if served == limit:
        return f"already serving {key}={limit} clients{of}"
    return f"serving {served} clients{of}, {key}={limit}"

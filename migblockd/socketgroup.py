"""``--socket-group``'s look-ups at the start, each given a bounded wait.

The start binds its own socket with the group it is given, so the group's gid
must be known before the socket exists: unlike the access policy's names, which
the start looks up off the event loop and is ready without (:mod:`.judge`),
there is nothing to serve with meanwhile.  A group database that does not
answer (an LDAP server out of reach, an NFS-mounted ``/etc/group``) held the
start for ever: never ready, nothing in the log to say why, until systemd's
``TimeoutStartSec=`` killed it.

The look-up runs on a daemon thread of its own (one stuck in the C library
keeps no process from exiting, as :mod:`.lookups`' do).  After :data:`WAIT`
seconds, the time after which every other look-up is said to be slow, the log
says what the start waits for; after :data:`LIMIT` the start is refused, naming
the look-up: the socket cannot be given a group it does not know, and given no
group, or another one, it would keep out, or let in, others than the operator
asked.  Not at :data:`WAIT`: a database that answers slowly is no broken one
(sssd with its LDAP server away at boot answers from its cache once its own
network timeouts, 6 to 8 s by default, have run out), and refusing it would
take the service down for a start that was about to work.  A SIGTERM or
SIGINT ends the wait, and the start, at once (:class:`.StoppedStarting`): a
stop asked of a starting daemon is not to wait 20 s for a refusal, nor for a
start that would then serve nobody.  A refused start
is said and, under ``Restart=on-failure``, tried again; a number needs no
look-up at all.  The warnings about the group (a number that is also a name,
a directory that keeps the group out) are not worth a wait: they are left out
when their look-ups do not answer within :data:`WAIT`, and that is said.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from migblockd.detached import Unanswered, within
from migblockd.lookups import SLOW
from migblockd.resolver import group_id
from migblockd.startup import StartupError

__all__ = ["LIMIT", "WAIT", "group_gid"]

log = logging.getLogger("migblockd")

#: Seconds after which the start says it waits for a look-up of ``socket-group``.
WAIT: Final = SLOW
#: Seconds after which it gives the look-up up, and the start with it: past a slow
#: database's own timeouts, well within systemd's ``TimeoutStartSec=`` (90 s).
LIMIT: Final = 20.0


def group_gid(group: str, setting: str,
              stop: Callable[[], str | None] | None = None) -> int | None:
    """The gid of ``group`` (a name or a number); None when no group has that name.
    StartupError when the group database has not answered within :data:`LIMIT`;
    StoppedStarting when ``stop()`` names a stop that came meanwhile
    (:func:`~migblockd.detached.within`)."""
    def slow() -> None:
        log.warning("%s: the group database has not answered (getgrnam(%r)) for %g s: "
                    "the socket waits for its group, %g s at most", setting, group, WAIT, LIMIT)

    try:
        return within(lambda: group_id(group), "migblockd-socket-group", LIMIT, slow, stop)
    except Unanswered:
        raise StartupError(
            f"{setting}: the group database did not answer (getgrnam({group!r})) within "
            f"{LIMIT:g} s: the socket cannot be given a group it does not know, so the start "
            "is refused; start again once the database answers, or give the group's "
            "number, which needs no look-up") from None

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
import threading
import time
from collections.abc import Callable
from typing import Final, TypeVar

from migblockd import signalmask
from migblockd.lookups import SLOW
from migblockd.resolver import group_id
from migblockd.startup import StartupError, StoppedStarting

__all__ = ["LIMIT", "WAIT", "Unanswered", "group_gid", "within"]

log = logging.getLogger("migblockd")

#: Seconds after which the start says it waits for a look-up of ``socket-group``.
WAIT: Final = SLOW
#: Seconds after which it gives the look-up up, and the start with it: past a slow
#: database's own timeouts, well within systemd's ``TimeoutStartSec=`` (90 s).
LIMIT: Final = 20.0
#: Seconds between two looks at whether a stop was asked while a look-up is waited for.
POLL: Final = 0.1

T = TypeVar("T")


class Unanswered(Exception):
    """A look-up that did not answer within its wait (it goes on, on its thread)."""


def within(work: Callable[[], T], seconds: float = WAIT,
           slow: Callable[[], object] | None = None,
           stop: Callable[[], str | None] | None = None) -> T:
    """``work()``'s result (or what it raised), run on a daemon thread of its own;
    :class:`Unanswered` when it has not returned within ``seconds``.  ``slow`` is
    called once if it has not returned within :data:`WAIT` (and ``seconds`` is more).
    ``stop()``: the name of a SIGTERM or SIGINT that came (``EarlySignals.stop``);
    one that has come, before or during the wait, raises :class:`.StoppedStarting`."""
    if stop is not None and (name := stop()) is not None:
        raise StoppedStarting(name)
    done = threading.Event()
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the waiter, which raises it
            outcome.append((False, exc))
        finally:
            done.set()

    try:
        # With the signals blocked, as every thread of the daemon's: they are the
        # main thread's to take.
        signalmask.start(threading.Thread(target=run, name="migblockd-socket-group",
                                          daemon=True))
    except RuntimeError:  # no thread to be had: asked here, unbounded, as before
        return work()
    start = time.monotonic()
    deadline, said = start + seconds, slow is None or seconds <= WAIT
    # In slices, to look at the stop: the handler that keeps a signal cannot wake
    # this wait itself (Event.set in a signal handler may take the lock that the
    # very wait it interrupts holds).
    while not done.wait(max(0.0, min(POLL, deadline - time.monotonic()))):
        if stop is not None and (name := stop()) is not None:
            raise StoppedStarting(name)  # the look-up goes on, on its daemon thread
        now = time.monotonic()
        if now >= deadline:
            raise Unanswered
        if not said and now >= start + WAIT:
            said = True
            assert slow is not None
            slow()
    answered, value = outcome[0]
    if not answered:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]  # work()'s own


def group_gid(group: str, setting: str,
              stop: Callable[[], str | None] | None = None) -> int | None:
    """The gid of ``group`` (a name or a number); None when no group has that name.
    StartupError when the group database has not answered within :data:`LIMIT`;
    StoppedStarting when ``stop()`` names a stop that came meanwhile (:func:`within`)."""
    def slow() -> None:
        log.warning("%s: the group database has not answered (getgrnam(%r)) for %g s: "
                    "the socket waits for its group, %g s at most", setting, group, WAIT, LIMIT)

    try:
        return within(lambda: group_id(group), LIMIT, slow, stop)
    except Unanswered:
        raise StartupError(
            f"{setting}: the group database did not answer (getgrnam({group!r})) within "
            f"{LIMIT:g} s: the socket cannot be given a group it does not know, so the start "
            "is refused; start again once the database answers, or give the group's "
            "number, which needs no look-up") from None

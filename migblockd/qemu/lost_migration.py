"""A migration whose QEMU the link lost: watched until that QEMU exits or answers.

When the link loses the QEMU that migrates (its connection ends, or a ``migrate``
it was sent goes unanswered), nothing more is heard of that migration on that
connection: no ``MIGRATION`` event ends it for the clients that wait for one,
and QEMU may migrate on past any blocker added meanwhile.  So the facts'
``cut_off`` is set, and holds until that QEMU answers a ``query-migrate`` again
(:mod:`migblockd.qemu_facts`) or is found to have exited: its process's exit
(:mod:`migblockd.qemu.process`), or nobody listening at its monitor's path when
the process is not known.  Its exit ends the migration without the event QEMU
would have sent, so the clients are sent one (``failed``, or ``cancelled``) if
that QEMU sent them events at all.

The bridge (:mod:`migblockd.qemu.bridge`) owns one :class:`LostMigration` and
tells it of the link's connections and losses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from migblockd.qemu.process import ProcessWatch
from migblockd.qemu_facts import QemuFacts
from migblockd.registry import is_running

__all__ = ["LostMigration"]

log = logging.getLogger("migblockd")

#: Seconds a QEMU whose monitor nobody listens on any more is given to exit before
#: the log says that it runs on: its ``quit`` closes and removes the monitor's
#: socket first, and exits only once it has let go of the rest (its memory).
EXIT_GRACE = 2.0


class LostMigration:
    """The migration of the QEMU at ``path`` that the link lost, if any.

    ``evented()`` says whether the connected QEMU's migration sends MIGRATION
    events; ``on_end(status)`` is called once that QEMU is found to have exited,
    with the status of the migration's last event owed to the clients (None: none).
    """

    def __init__(self, path: Path, facts: QemuFacts, *, evented: Callable[[], bool],
                 on_end: Callable[[str | None], None]) -> None:
        self._path = path
        self._facts = facts
        self._evented = evented
        self._on_end = on_end
        #: The process of the QEMU connected, or last connected (None: its id unknown).
        self._process: ProcessWatch | None = None
        #: Whether its exit is awaited: the link lost it with the facts' ``cut_off``
        #: set, which its exit ends.
        self._watching = False
        #: Whether the log has said that nobody listens at the monitor's path while
        #: that process runs on (said once per loss), and its timer until it is.
        self._alive_said = False
        self._alive_timer: asyncio.TimerHandle | None = None
        #: A migration whose QEMU the link lost: its last status, whether that
        #: QEMU sent MIGRATION events, and whether migblockd handed it over and
        #: awaited its end (None: none lost, or QEMU answered again, or it has
        #: exited).  Kept for the migration's last event, and its count; whether
        #: QEMU may migrate on is the facts' ``cut_off``, until QEMU says otherwise.
        self._cut_off: tuple[str, bool, bool] | None = None

    def connected(self, pid: int | None) -> None:
        """The link connected to QEMU process ``pid`` (None: unknown)."""
        if self._watching and self._process is not None and self._process.exited():
            self._process_exited()  # a new QEMU on the path before the exit was seen
        self._watching = False
        self._cancel_alive_timer()
        self._cut_off = None  # QEMU answers: its query-migrate says how that one ended
        if self._process is not None:
            self._process.close()
        self._process = ProcessWatch(pid) if pid is not None else None

    def disconnected(self) -> None:
        """The link lost its QEMU (migblockd did not close it): a migration it runs, or
        may run, is lost with it, and that QEMU's exit is watched for."""
        facts = self._facts
        if not facts.cut_off and (is_running(facts.status) or facts.awaiting):
            self.lose()
        if facts.cut_off:
            self._watch_for_exit()

    def close(self) -> None:
        self._watching = False
        self._cancel_alive_timer()
        if self._process is not None:
            self._process.close()
            self._process = None

    def lose(self) -> None:
        """The link lost the QEMU that migrates (or may: a ``migrate`` it was sent went
        unanswered): no MIGRATION event will follow from it on this connection, and
        until it answers a query-migrate or is found to have exited it may migrate on."""
        facts = self._facts
        evented = self._evented()
        # Without MIGRATION events, the last status is that of the last query-migrate
        # (or none): the migration may have ended since, unseen.
        log.warning("QEMU at %s went away %s (last status %s%s): its outcome is unknown; "
                    "query-migrate says it once QEMU is back, and until then (or until QEMU "
                    "is found to have exited) add-blocker is refused", self._path,
                    "during a migration" if evented else "while it may have been migrating",
                    facts.status or "not seen yet", "" if evented else
                    "; QEMU sends no MIGRATION events, so the end of a migration goes unseen")
        # (Nor counted when it ends: one whose migrate QEMU never answered, taking, is
        # counted among the refusals, not as started.)
        awaited = facts.awaiting and not facts.uncounted and not facts.taking
        facts.awaiting = facts.uncounted = False
        self._cut_off = (facts.status or "not seen yet", evented, awaited)
        facts.cut_off = True  # until a query-migrate answers, or QEMU has exited
        if not facts.connected:  # the link's loss was reported first
            self._watch_for_exit()

    def gone(self) -> None:
        """Nobody listens on QEMU's monitor (the link's ``on_gone``).

        The QEMU the link lost has exited, or (when its process is known) it runs on
        and its monitor's path was removed or no longer listened on: its migration
        goes on, and so does the cut-off.
        """
        process = self._process
        if self._watching and process is not None:
            if process.exited():
                self._process_exited()
            elif not self._alive_said and self._alive_timer is None:
                self._alive_timer = asyncio.get_running_loop().call_later(
                    EXIT_GRACE, self._still_running)
            return
        self._ended(f"QEMU at {self._path} has exited (nobody listens on its monitor)")

    def _still_running(self) -> None:
        """Nobody has listened on the monitor for :data:`EXIT_GRACE`, and the QEMU
        process the link lost has not exited: say so, once per loss.  Not at once:
        a QEMU that quits is found gone before it has exited."""
        self._alive_timer = None
        process = self._process
        if not self._watching or process is None or process.exited() or self._alive_said:
            return
        self._alive_said = True
        log.warning("nobody listens on QEMU's monitor at %s, but the QEMU process it lost "
                    "(pid %d) is still running and may be migrating: add-blocker stays "
                    "refused until it answers there or exits", self._path, process.pid)

    def _cancel_alive_timer(self) -> None:
        if self._alive_timer is not None:
            self._alive_timer.cancel()
            self._alive_timer = None

    def _watch_for_exit(self) -> None:
        """The link lost its QEMU while it may migrate: that QEMU's exit ends that
        (unknown process: the link's finding nobody listening does)."""
        process = self._process
        if self._watching or process is None or not process.telling:
            return
        self._watching, self._alive_said = True, False
        process.on_exit(self._process_exited)

    def _process_exited(self) -> None:
        """The QEMU whose migration the link lost has exited: whatever it ran has
        ended with it, whatever now owns its monitor's path."""
        if not self._watching or self._process is None:
            return
        self._watching = False
        self._cancel_alive_timer()
        self._process.stop()
        self._ended(f"QEMU at {self._path} (pid {self._process.pid}) has exited")

    def _ended(self, why: str) -> None:
        """The QEMU the link lost has exited (``why``): it migrates no more."""
        facts = self._facts
        if self._cut_off is not None:
            self._cut_off_ended(why)
        elif facts.cut_off:
            # Lost again before it answered on a connection made again.
            facts.cut_off = False
            log.warning("%s: the migration it may have run has ended with it", why)
            self._on_end(None)

    def _cut_off_ended(self, why: str) -> None:
        """The QEMU whose migration the link lost has exited (``why``): say so, and
        send the clients the migration's last event.

        That migration cannot end now in any status QEMU would report, and its
        clients would wait for a last ``MIGRATION`` event forever: they get
        ``failed``, the status QEMU gives a migration that ended without completing
        other than by ``migrate_cancel`` (``MigrationStatus``, qapi/migration.json),
        or ``cancelled`` for one that was being cancelled, if that QEMU sent
        MIGRATION events at all (its ``events`` capability was on).  Without them the
        last status is that of a ``query-migrate`` (or none): the migration may have
        completed since, unseen, so how it ended is neither told nor counted.
        """
        assert self._cut_off is not None
        (cut_off, evented, awaited), self._cut_off = self._cut_off, None
        self._facts.cut_off = False
        if not evented:
            # Its last status is what a query-migrate said (if anything did) before the
            # migration went on, perhaps to complete, unseen: how it ended is unknown,
            # neither counted nor told (its clients were sent no event of it).
            log.warning("%s: the migration it may have run (last status %s) may have ended "
                        "before it did; how, nobody said: QEMU sent no MIGRATION events (its "
                        "events capability off)", why, cut_off)
            self._on_end(None)
            return
        # QEMU ends a cancelling migration (migrate_cancel, or its own quit) cancelled,
        # whatever else happens (migrate_fd_cleanup(), migration/migration.c).
        ending = "cancelled" if cut_off == "cancelling" else "failed"
        if awaited:  # one migblockd handed over: it ended, as its clients are told
            self._facts.ended[ending] += 1
        log.warning("%s: the migration it ran (last status %s) cannot complete; clients are "
                    "sent MIGRATION %s", why, cut_off, ending)
        self._on_end(ending)

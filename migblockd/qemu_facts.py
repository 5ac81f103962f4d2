"""What migblockd knows of the QEMU it gates, and the errors that QEMU fails with (pure).

The gate's handlers (:mod:`migblockd.gate`) ask QEMU; this module holds what
the rest of the daemon shares of the answers, with no handler in it:

* :class:`QemuFacts`: the connected QEMU's version and commands, whether a
  ``migrate`` that migblockd forwarded waits for QEMU, and what its
  ``query-migrate`` answers and ``MIGRATION`` events showed (for the metrics).
  The adapter (:mod:`migblockd.qemu.bridge`) keeps it current; the handlers
  consult it.
* reading ``query-migrate``'s answer: its status, its ``blocked-reasons``, and
  whether the migration it shows comes in rather than goes out
  (:func:`incoming`);
* the argument names a command of this QEMU does not take, worded as its
  input visitor words them (:meth:`QemuFacts.argument_error`);
* QEMU's errors: its own error reply (:class:`QemuError`, relayed verbatim),
  no answer (:class:`QemuUnavailable`; :class:`QemuRestarted` when the
  connection changed between a command's calls, :class:`QemuGivenUp` when
  migblockd stopped waiting for it), the refusals QEMU's
  ``migrate_prepare()`` (``migration/migration.c``) gives in some run states,
  and migblockd's refusal of a migration in a mode QEMU would not use
  (:class:`ModeMismatch`).  :mod:`migblockd.failures` turns them into the
  client's QMP error, :mod:`migblockd.stats` counts them by cause.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from migblockd.qmp.errors import QMPError
from migblockd.qmp.qdict import unvisited_order
from migblockd.registry import is_running

__all__ = [
    "ENDINGS", "ModeMismatch", "QemuError", "QemuFacts", "QemuGivenUp", "QemuRestarted",
    "QemuSilent", "QemuUnavailable", "check_runstate", "incoming", "not_understood",
    "reasons_of", "status_of",
]

#: What QEMU's ``migrate_prepare()`` (``migration/migration.c``) answers in these run
#: states (``query-status``), after a migration in progress and before any blocker.
RUNSTATE_REFUSALS: Final = {
    "inmigrate": "Guest is waiting for an incoming migration",
    "postmigrate": "Can't migrate the vm that was paused due to previous migration",
}

#: The statuses a migration ends in (``completed`` and ``failed`` are the
#: others' only way out; ``cancelled`` follows ``migrate_cancel``).
ENDINGS: Final = ("completed", "failed", "cancelled")


class QemuError(Exception):
    """QEMU answered with an error: its class and desc, verbatim."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class QemuUnavailable(Exception):
    """No answer from QEMU (not connected, or the connection broke); ``str()`` says why."""


class QemuSilent(QemuUnavailable):
    """QEMU did not answer a call within ``--qemu-timeout``; it may still run it."""


class QemuGivenUp(QemuUnavailable):
    """migblockd stopped before QEMU answered a call (the drain gave up on it).

    No handler sees it: the core closes the command's handler and fails the
    command with it (``Core._go_on``), changing nothing, whatever the handler
    would have made of a silent or an absent QEMU: its client hears the stop's
    words, and the stop does not wait for it to ask QEMU again."""


class QemuLost(QemuUnavailable):
    """The connection to QEMU was lost after a call was sent, before its reply."""


class QemuRestarted(QemuUnavailable):
    """A command's later call was not sent: the QEMU connection that answered its
    earlier ones is gone, and another one is (or none is) there now.  What the
    command decided stands on the earlier QEMU's answers, not on this one's."""


class ModeMismatch(QMPError):
    """QEMU would not migrate in migblockd's mode: ``migrate`` is refused."""


def _never() -> bool:
    return False


@dataclass
class QemuFacts:
    """What the core knows of the QEMU behind it; the adapter keeps it current.

    ``commands`` maps each command the connected QEMU knows to its argument
    names (empty while disconnected).  ``busy`` is set while a ``migrate``
    that migblockd forwarded waits for QEMU: from migblockd's decision to
    QEMU's reply, a new blocker would slip past that decision.
    ``unanswered`` is set once such a ``migrate`` was given up on (no reply
    within ``qemu-timeout``) while QEMU still holds it, and stays set until
    QEMU answers a command sent after it (it has then run the ``migrate``) or
    the connection ends: QEMU may yet start that migration.

    For the metrics: ``blockers`` is how many blockers of its own QEMU listed
    in the latest ``query-migrate`` answer migblockd saw (None: none seen
    since it connected); ``ended`` counts how the migrations migblockd
    handed to QEMU ended, as QEMU's MIGRATION events or ``query-migrate``
    answers showed (``awaiting``: one was handed over and its end not seen;
    ``uncounted``: that one is a ``migrate`` QEMU left unanswered, which was not
    counted as started, QEMU may have refused, and whose end QEMU's status may
    not be: an earlier migration's ``completed`` looks the same).

    ``learnt``: migblockd has heard from QEMU whether it migrates (a
    ``query-migrate`` answer, a ``MIGRATION`` event) since it last connected to
    it.  Until then, a QEMU that is there may be migrating (one migblockd handed
    over before a restart, or one that another client of QEMU's monitors started
    while migblockd was not connected, or another QEMU's, on the same path).
    """

    path: Path
    connected: bool = False
    version: str = ""
    commands: Mapping[str, frozenset[str]] = field(default_factory=dict)
    required: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Each command's arguments in the order of QEMU's schema (no union variant's).
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    status: str | None = None
    busy: bool = False
    unanswered: bool = False
    blockers: int | None = None
    ended: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDINGS, 0))
    awaiting: bool = False
    uncounted: bool = False
    #: A new migration's ``migrate`` awaits QEMU's reply: an end QEMU reports meanwhile
    #: is ``held``, counted once QEMU has taken the migrate, not if it refuses it
    #: (``migrate_init()`` reports ``setup`` before the transport is opened, and a
    #: failure there ends it ``failed``, then refuses the command).
    taking: bool = False
    held: str | None = None
    learnt: bool = False
    #: Whether QEMU accepted the connection and the link's set-up waits for it (its
    #: greeting, or its first answers: a busy main loop), or the link dropped the
    #: connection to a QEMU that runs on and has yet to connect again (the link's).
    greeting_awaited: Callable[[], bool] = _never
    #: Whether that set-up has waited for QEMU long enough for the log to say so
    #: (GREETING_NOTICE): QEMU is there and silent (the link's).
    set_up_late: Callable[[], bool] = _never
    #: Whether a command forwarded on this connection timed out and QEMU has
    #: answered none since (the link's: it logs when that starts and ends).
    timed_out: Callable[[], bool] = _never
    #: The link to a QEMU that was migrating was lost, and that QEMU has neither
    #: answered a ``query-migrate`` since (a connection made again is not enough: it
    #: may be lost again before QEMU says) nor been found to have exited: its
    #: migration may still run, whatever the link's state (the adapter's).
    cut_off: bool = False
    #: Connections to QEMU that were up and were lost, by who ended them: ``closed``
    #: (QEMU) or ``dropped`` (migblockd, over a message it could not take) (the
    #: link's, for the metrics).
    lost: Mapping[str, int] = field(default_factory=dict)

    @property
    def silent(self) -> bool:
        """QEMU is connected but answers nothing (stopped, wedged)."""
        return self.connected and self.timed_out()

    @property
    def unresponsive(self) -> bool:
        """QEMU is there and answers nothing: connected and silent, or it accepted the
        connection and has not greeted or answered its set-up in GREETING_NOTICE."""
        return self.silent or self.set_up_late()

    @property
    def present(self) -> bool:
        """A QEMU is there: connected, or it accepted the connection (not set up yet)."""
        return self.connected or self.greeting_awaited()

    @property
    def shown_status(self) -> str:
        """The migration's status as the STATUS line says it.  A migration migblockd
        handed over and has seen neither run nor end (the events capability off, and
        no ``query-migrate`` since) is not given the status last seen, from before it
        (``none``, or an earlier migration's ``completed``): QEMU may be migrating."""
        if self.awaiting and not is_running(self.status):
            return "handed to QEMU and not seen since (no MIGRATION events)"
        return self.status or "none"

    def knows(self, command: str, argument: str | None = None) -> bool:
        if argument is None:
            return command in self.commands
        return argument in self.commands.get(command, frozenset())

    def argument_error(self, command: str, args: Mapping[str, object]) -> QMPError | None:
        """The error this QEMU's input visitor (``qapi/qobject-input-visitor.c``) gives
        ``command`` for argument names it does not take, before anything else is checked:
        an argument it requires that is absent (its first, in its schema's order), then
        one it does not know (the one it names first).  migblockd's schema is QEMU's
        newest: ``channels`` is unknown to QEMU 7.2, whose ``uri`` is required, and
        ``blk`` and ``inc`` are unknown to QEMU 9.1 and later.  None when this QEMU
        takes the names (or is not connected): migblockd has checked the types."""
        if not self.connected or command not in self.commands:
            return None
        for name in self.required.get(command, ()):
            if name not in args:
                return QMPError(f"Parameter '{name}' is missing")
        known = self.commands[command]
        for name in unvisited_order(args):
            if name not in known:
                return QMPError(f"Parameter '{name}' is unexpected")
        return None

    def may_migrate(self) -> bool:
        """Whether QEMU, not answering now, may be migrating.

        A QEMU that is there: nothing said whether it does since migblockd
        last connected to it, or a ``migrate`` handed to it is unanswered, or one it took has
        not been seen to end (``awaiting``: with the events capability off,
        nothing reports its start, and ``status`` may be what QEMU said before
        it), or the last status it reported (an event, a ``query-migrate``) is
        that of a migration running.  Whether it is there or not: the link was
        lost during its migration (``cut_off``).  A lost connection ends no
        migration: QEMU migrates on while its monitor waits for a new client
        (``monitor_qmp_event()``, ``monitor/qmp.c``), and until it answers a
        ``query-migrate`` or is found to have exited, a blocker added would not
        stop that one.
        """
        return self.cut_off or (self.present and (
            self.busy or self.unanswered or self.awaiting or not self.learnt
            or is_running(self.status)))

    def saw(self, info: object) -> None:
        """QEMU answered ``query-migrate`` with ``info``."""
        if not self.connected:
            # The answer of a connection lost since: it says nothing of the QEMU
            # that may be there now (what it said was forgotten with the link).
            return
        if isinstance(info, dict):
            self.learnt = True
            self.cut_off = False  # QEMU has said whether it migrates
            self.blockers = len(reasons_of(info))
            status = status_of(info)
            self.status = status
            if not self.busy:  # else the answer may predate the migrate in flight
                self.saw_status(status)
                if status is None:  # QEMU has run no migration: none handed over started
                    self.awaiting = self.uncounted = False

    def saw_status(self, status: object) -> None:
        """QEMU said its migration's status is ``status`` (an event or ``query-migrate``)."""
        if self.awaiting and status in ENDINGS:
            assert isinstance(status, str)
            if self.taking:
                self.held = status
            elif not self.uncounted:
                self.ended[status] += 1
            self.awaiting = self.uncounted = False

    def count_held(self) -> None:
        """QEMU took the ``migrate`` it reported an end for before its reply: count it."""
        if self.held is not None:
            self.ended[self.held] += 1
            self.held = None


def not_understood(command: str, answer: object) -> QemuUnavailable:
    text = json.dumps(answer, ensure_ascii=True)
    shown = text if len(text) <= 200 else text[:200] + "..."
    return QemuUnavailable(f"QEMU's answer to {command} was not understood: {shown}")


def incoming(info: object, runstate: str) -> bool:
    """Whether the migration that ``query-migrate`` shows (``info``, with QEMU in
    ``runstate``) comes in rather than goes out: QEMU shows the incoming one when
    none goes out.  Until the switch-over QEMU is in run state ``inmigrate``; in
    postcopy the VM runs here already, and only one going out has ``ram`` figures."""
    return runstate == "inmigrate" or (
        str(status_of(info)).startswith("postcopy-") and isinstance(info, dict)
        and "ram" not in info)


def check_runstate(runstate: str) -> None:
    """Refuse as QEMU's ``migrate_prepare()`` does in ``runstate``, if it does."""
    if runstate in RUNSTATE_REFUSALS:
        raise QemuError("GenericError", RUNSTATE_REFUSALS[runstate])


def status_of(info: object) -> str | None:
    status = info.get("status") if isinstance(info, dict) else None
    return status if isinstance(status, str) else None


def reasons_of(info: object) -> list[str]:
    reasons = info.get("blocked-reasons") if isinstance(info, dict) else None
    if not isinstance(reasons, list):
        return []
    return [reason for reason in reasons if isinstance(reason, str)]

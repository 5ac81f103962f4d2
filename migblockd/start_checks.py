"""What ``migrate`` checks in front of a real QEMU before QEMU is sent it, with no I/O.

QEMU refuses a migration in this order (``qmp_migrate()`` and ``migrate_prepare()``,
migration/migration.c): one in progress, its run state (``runstate_check()``: not while
in ``inmigrate`` and the like), then its blockers.  migblockd asks QEMU
(``query-migrate``, ``query-status``) and refuses with QEMU's words where QEMU would,
then for migblockd's own blockers: those of the current mode, which QEMU must then
migrate in (``query-migrate-parameters``' ``mode``).  Everything asked is asked again if
another client changed the registry while QEMU answered, so that what is handed to QEMU
was judged against what is committed.

:class:`StartChecks` is a part of :class:`~migblockd.gate.GateHandlers` (a base class
of it), as :class:`~migblockd.forwarding.Forwarding` is of this one.
"""

from __future__ import annotations

from collections.abc import Generator

from migblockd.connection import Connection
from migblockd.forwarding import SETTLE, Call, Forwarding, Settle
from migblockd.qemu_facts import (
    ModeMismatch,
    QemuError,
    QemuFacts,
    QemuLost,
    QemuSilent,
    QemuUnavailable,
    check_runstate,
    incoming,
    not_understood,
    status_of,
)
from migblockd.qmp.errors import QMPError
from migblockd.registry import BlockerError, MigrationInProgress, is_running

__all__ = ["StartChecks"]


class StartChecks(Forwarding):
    """Whether QEMU may be handed a new migration: QEMU's verdict, then migblockd's."""

    qemu: QemuFacts

    def _check_start(self, conn: Connection, uri: str) -> Generator[Call | Settle, object, None]:
        """Refuse a new migration, as QEMU would and for migblockd's blockers."""
        try:
            info = yield Call("query-migrate", {})
            if not isinstance(info, dict):  # cannot tell whether one runs: do not start one
                raise not_understood("query-migrate", info)
            self.qemu.saw(info)
            if self.qemu.busy:
                raise MigrationInProgress()
            running = is_running(status_of(info))
            runstate = None
            if running or self._may_refuse():
                # QEMU judges its run state before any blocker (and an incoming
                # migration shows in query-migrate as running too): the refusal,
                # if any, is the one QEMU would give.
                runstate = yield from self._runstate()
                if running and not incoming(info, runstate):
                    raise MigrationInProgress()
                check_runstate(runstate)
            mode = self.registry.mode
            yield from self._check_mode()
            while True:
                # Another client's del-blocker may have run while QEMU answered: a
                # migration let through by it would outlive its failed commit.
                yield SETTLE
                if self.qemu.busy:  # handed to QEMU while this one asked
                    raise MigrationInProgress()
                if self.registry.mode != mode:
                    # Set meanwhile (and committed): the blockers consulted are the new
                    # mode's, so QEMU must migrate in it, or a blocker of the mode QEMU
                    # migrates in would not stop it.
                    mode = self.registry.mode
                    yield from self._check_mode()
                    continue
                if runstate is not None or not self._may_refuse():
                    break
                # A blocker came (or came back, its deletion undone) meanwhile:
                # QEMU's run state still comes first.
                runstate = yield from self._runstate()
                check_runstate(runstate)
            self.registry.check_migrate()  # the current mode's newest blocker
        except QemuSilent as exc:
            # Its words name migblockd's own question, which the client never sent.
            refused = QemuSilent(f"migrate was not sent: QEMU did not answer migblockd's "
                                 f"check of whether it may migrate ({exc})")
            self._refused(conn, refused, uri=uri)
            raise refused from None
        except QemuLost as exc:
            lost = QemuLost(f"migrate was not sent: the connection to QEMU was lost during "
                            f"migblockd's check of whether it may migrate ({exc})")
            self._refused(conn, lost, uri=uri)
            raise lost from None
        except (BlockerError, QMPError, QemuError, QemuUnavailable) as exc:
            self._refused(conn, exc, uri=uri)
            raise

    def _may_refuse(self) -> bool:
        """Whether migblockd's blockers or mode might refuse a migration now."""
        registry = self.registry
        return registry.newest() is not None or registry.mode != "normal"

    def _runstate(self) -> Generator[Call, object, str]:
        """QEMU's run state, as ``query-status`` names it."""
        answer = yield Call("query-status", {})
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, str):
            raise not_understood("query-status", answer)
        return status

    def _check_mode(self) -> Generator[Call, object, None]:
        """Refuse unless QEMU would migrate in migblockd's mode: the blockers
        consulted are that mode's, and QEMU must not run another one.  A QEMU
        older than 8.2 has no modes: it always migrates in ``normal``."""
        mode = self.registry.mode
        if self.qemu.knows("migrate-set-parameters", "mode"):
            params = yield Call("query-migrate-parameters", {})
            theirs = params.get("mode", "normal") if isinstance(params, dict) else None
            if theirs != mode:
                raise ModeMismatch(f"QEMU's migration mode is '{theirs}' but migblockd's is "
                                   f"'{mode}': set the mode with migrate-set-parameters "
                                   "through migblockd")
        elif mode != "normal":
            version = self.qemu.version or "the gated QEMU"
            raise ModeMismatch(f"QEMU {version} has no migration modes (QEMU 8.2 added them) "
                               f"and would migrate in mode 'normal', not '{mode}'; set mode "
                               "'normal' with migrate-set-parameters first")

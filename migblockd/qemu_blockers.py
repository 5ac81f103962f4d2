"""QEMU's own blockers, in front of a real QEMU: listed beside migblockd's, with no I/O.

QEMU's own blockers (its ``query-migrate`` ``blocked-reasons``; QEMU 7.2 sends no
event when they change) show up in ``query-blockers`` after migblockd's, with
``source: qemu``, named by their position there (``qemu:1``, ``qemu:2``...), in the
mode they block in QEMU.  ``del-blocker`` of one is refused: it goes away when QEMU
removes it.

:class:`QemuBlockers` is a part of :class:`~migblockd.gate.GateHandlers` (a base class
of it), as :class:`~migblockd.start_checks.StartChecks` is of this one.
"""

from __future__ import annotations

from typing import Any, Final

from migblockd.commands import Args, reads_state
from migblockd.connection import Connection
from migblockd.forwarding import Call, Step
from migblockd.qemu_facts import QemuSilent, QemuUnavailable, reasons_of
from migblockd.qmp.encoding import Parts, encode
from migblockd.qmp.errors import QMPError
from migblockd.registry import NotFound
from migblockd.start_checks import StartChecks

__all__ = ["QEMU_BLOCKER_PREFIX", "QemuBlockers"]

#: QEMU's own blockers are listed as ``qemu:1``, ``qemu:2``... (oldest first): a
#: ``:`` is not allowed in the ids clients choose, so these never clash.
QEMU_BLOCKER_PREFIX: Final = "qemu:"


class QemuBlockers(StartChecks):
    """QEMU's own blockers, as ``query-blockers`` lists them and ``del-blocker`` names them."""

    def del_blocker(self, conn: Connection, args: Args) -> Step:
        id = args["id"]
        if not id.startswith(QEMU_BLOCKER_PREFIX):
            return super().del_blocker(conn, args)
        # Named as query-blockers names them: by position in QEMU's blocked-reasons.
        listed = 0
        if self.qemu.present:
            try:
                info = yield Call("query-migrate", {})
            except QemuSilent as exc:
                raise QemuSilent(f"whether QEMU has a blocker '{id}' cannot be told: QEMU "
                                 f"did not answer migblockd's query-migrate ({exc})") from None
            except QemuUnavailable as exc:
                if self.qemu.present:  # there, not answering: not set up yet
                    raise QemuUnavailable(f"whether QEMU has a blocker '{id}' cannot be "
                                          f"told: {exc}") from None
                # Gone meanwhile: query-blockers would list none of QEMU's.
            else:
                self.qemu.saw(info)
                listed = len(reasons_of(info))
        number = id[len(QEMU_BLOCKER_PREFIX):]
        # Only as query-blockers writes them: qemu:1, never qemu:01.
        if not (number.isdecimal() and number.isascii() and number == str(int(number))
                and 1 <= int(number) <= listed):
            raise NotFound(id)
        raise QMPError(f"Blocker '{id}' is QEMU's own: it goes away when QEMU "
                       "removes it, and cannot be deleted through migblockd")

    @reads_state
    def query_blockers(self, conn: Connection, args: Args) -> Step:
        ours = super().query_blockers(conn, args)
        assert isinstance(ours, Parts)
        mode = args.get("mode")
        if not self.qemu.present or (mode is not None and mode not in self._qemu_modes()):
            return ours
        try:
            info = yield Call("query-migrate", {})
        except QemuSilent as exc:
            # Connected, and silent: its blockers are there, unlisted; "[]" of a
            # QEMU with blockers would say that nothing blocks migration.
            raise QemuSilent(f"QEMU's own blockers cannot be listed: QEMU did not answer "
                             f"migblockd's query-migrate ({exc})") from None
        except QemuUnavailable as exc:
            if self.qemu.present:
                # There (it accepted the connection) and not set up yet: as silent.
                raise QemuUnavailable(f"QEMU's own blockers cannot be listed: {exc}"
                                      ) from None
            return ours  # gone meanwhile: as while QEMU is away
        self.qemu.saw(info)
        qemu_mode = self._qemu_mode()  # (of the QEMU that answered: connected now)
        if mode is not None and mode != qemu_mode:
            return ours
        theirs = ", ".join(encode(self._qemu_blocker(n, reason, qemu_mode))
                           for n, reason in enumerate(reasons_of(info), start=1))
        if not theirs:
            return ours
        # ours.pieces is "[", the encoded blockers..., "]": QEMU's go before the "]".
        head = ours.pieces[:-1] if ours.pieces != [b"[]"] else [b"["]
        between = [b", "] if len(head) > 1 else []
        return Parts([*head, *between, theirs.encode("ascii"), b"]"])

    def _qemu_mode(self) -> str:
        return self.qemu_mode(self.registry.mode)

    def _qemu_modes(self) -> tuple[str, ...]:
        """The modes QEMU's own blockers may be listed in: the connected QEMU's; of one
        not set up yet (its version unknown), migblockd's or ``normal``.  Another
        mode lists none of them, and needs no answer of a QEMU that may not give one."""
        if self.qemu.connected:
            return (self._qemu_mode(),)
        return (self.registry.mode, "normal")

    def qemu_mode(self, ours: str) -> str:
        """The mode of the blockers the connected QEMU's ``query-migrate`` lists, with
        migblockd's mode ``ours``: its current mode's (QEMU 8.2 and later), which
        migblockd sets to its own.  A QEMU older than 8.2 has no modes: its blockers
        refuse its one kind of migration, ``normal``, whatever migblockd's mode (which
        stays migblockd's alone).  (The metrics count them in this mode too.)"""
        return ours if self.qemu.knows("migrate-set-parameters", "mode") else "normal"

    def _qemu_blocker(self, n: int, reason: str, mode: str) -> dict[str, Any]:
        # QEMU lists the blockers of its current mode; it says nothing of when
        # each was added, nor whether it is internal.
        return {"id": f"{QEMU_BLOCKER_PREFIX}{n}", "reason": reason,
                "modes": [mode], "internal": False, "scope": "daemon", "source": "qemu"}

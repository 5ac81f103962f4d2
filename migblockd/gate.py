"""Gating a real QEMU (``--qemu SOCKET``): the commands that talk to it, with no I/O.

With a QEMU behind it, migblockd's blockers stop QEMU's real migration:
``migrate`` goes through migblockd's own checks first (a migration in
progress, then the current mode's newest blocker, QEMU's order) and only then
reaches QEMU, whose reply comes back verbatim.  QEMU's own blockers (from its
``query-migrate`` ``blocked-reasons``; QEMU 7.2 sends no event when they
change) show up in ``query-blockers`` after migblockd's, with ``source:
qemu``; the migration commands are forwarded; ``add-blocker`` is refused with
QEMU's busy text while QEMU migrates.

Handlers here are generators that ``yield Call(...)`` for each command for
QEMU and ``yield SETTLE`` to wait for the changes other clients made meanwhile
to be on disk: how the core drives them, the pass-through commands and the
command table are :mod:`migblockd.forwarding`'s, what ``migrate`` checks before
QEMU is sent it is :mod:`migblockd.start_checks`'s, how QEMU's own blockers are
listed and named is :mod:`migblockd.qemu_blockers`'s (base classes of
:class:`GateHandlers`).  What the handlers know of QEMU (:class:`QemuFacts`),
how they read its answers and the errors it fails with are
:mod:`migblockd.qemu_facts`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Final

from migblockd.commands import Args, log, reads_state
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.forwarding import SETTLE, Call, Forwarded, Settle, Step
from migblockd.logs import about, shown
from migblockd.qemu_blockers import QEMU_BLOCKER_PREFIX, QemuBlockers
from migblockd.qemu_facts import (
    QemuError,
    QemuFacts,
    QemuRestarted,
    QemuSilent,
    QemuUnavailable,
    incoming,
    not_understood,
    reasons_of,
    status_of,
)
from migblockd.qmp.encoding import encode
from migblockd.qmp.envelope import Command
from migblockd.qmp.validation import ArgumentValidator
from migblockd.registry import (
    BlockerError,
    MigrationBusy,
    Registry,
    is_running,
)

__all__ = ["QEMU_BLOCKER_PREFIX", "SETTLE", "Call", "Forwarded", "GateHandlers", "Settle"]

#: Commands whose arguments are judged as the gated QEMU's input visitor judges them
#: (its members, its order, what it requires) before migblockd's schema has its say:
#: QEMU parses them before it checks anything else, and their members differ between
#: QEMU's releases (``migrate``: ``channels`` since 8.2, no ``blk``/``inc`` since 9.1).
PARSED_AS_QEMU: Final = ("migrate",)


class GateHandlers(QemuBlockers):
    """The schema's commands in front of a real QEMU, plus the pass-through ones."""

    def __init__(self, contract: Contract, registry: Registry, qemu: QemuFacts,
                 passthrough: tuple[str, ...] = ()) -> None:
        self.qemu = qemu
        super().__init__(contract, registry, passthrough)

    def migration_status(self) -> str:
        return self.qemu.shown_status

    def table(self) -> dict[str, Command]:
        table = super().table()
        for name in PARSED_AS_QEMU:
            if name in table:
                ours = table[name].validate
                table[name] = dataclasses.replace(
                    table[name], validate=self._parsed_as_qemu(name, ours))
        return table

    def _parsed_as_qemu(self, name: str,
                        ours: Callable[[Args], None]) -> Callable[[Args], None]:
        """``ours``, after the gated QEMU's input visitor's own verdict on ``args``.

        QEMU visits its members in its schema's order: the first one it requires that is
        absent, or present with a wrong value, is its error; an argument it does not take
        comes after every member.  Its members' types are migblockd's (a member migblockd's
        schema lacks takes anything here; migblockd's check then names it)."""
        schema = self.contract.commands[name].arguments
        validators: dict[tuple[tuple[str, ...], tuple[str, ...]], ArgumentValidator] = {}

        def validate(args: Args) -> None:
            members = self.qemu.members.get(name) if self.qemu.connected else None
            # Not with a union's variants: their members depend on the tag.
            if members and frozenset(members) == self.qemu.commands.get(name):
                key = (members, tuple(self.qemu.required.get(name, ())))
                validator = validators.get(key)
                if validator is None:
                    properties = schema.get("properties", {})
                    validator = ArgumentValidator({
                        **schema, "properties": {m: properties.get(m, {}) for m in members},
                        "required": list(key[1]), "additionalProperties": False})
                    validators[key] = validator
                validator.check(args)
            ours(args)

        return validate

    def qemu_state(self) -> str | None:
        if self.qemu.connected:
            # Connected says nothing of a stopped QEMU: each command waits qemu-timeout.
            silent = ", not answering" if self.qemu.silent else ""
            return f"{self.qemu.version} connected{silent}".lstrip()
        if self.qemu.set_up_late():
            # Its adds are refused as busy, unlike those of a QEMU not running.
            return "not answering (it accepted the connection)"
        return "not connected"

    # -- blockers -----------------------------------------------------------
    def add_blocker(self, conn: Connection, args: Args) -> Step:
        try:
            self.registry.check_add(args["reason"], modes=args.get("modes"),
                                    internal=args.get("internal", False), id=args.get("id"),
                                    scope=args.get("scope", "daemon"), connection=conn)
            if self.qemu.busy or (not self.qemu.connected and self.qemu.may_migrate()):
                # (A QEMU that has not greeted yet, say, since migblockd started.)
                raise MigrationBusy(args["reason"])
            if self.qemu.connected:
                try:
                    info = yield Call("query-migrate", {})
                except QemuSilent as exc:
                    if self.qemu.may_migrate():
                        raise MigrationBusy(args["reason"]) from None
                    # Connected but silent, and not known to migrate: nor known not
                    # to.  A migration that another monitor's client started since
                    # migblockd last asked (the events capability off) says nothing
                    # here, and would outlive the blocker, as QEMU refuses to let it.
                    refused = QemuSilent(f"the blocker was not added: QEMU did not answer "
                                         f"migblockd's check of whether it migrates ({exc})")
                    self._refused(conn, refused, blocker_id=args.get("id"))
                    raise refused from None
                except QemuUnavailable:
                    # Gone meanwhile: as while QEMU is away (unless it was migrating).
                    if self.qemu.may_migrate():
                        raise MigrationBusy(args["reason"]) from None
                else:
                    self.qemu.saw(info)
                    running = is_running(status_of(info))
                    if running and not self.qemu.busy:
                        # An incoming migration shows in query-migrate too, and QEMU
                        # refuses blockers only while one goes out.
                        try:
                            running = not incoming(info, (yield from self._runstate()))
                        except QemuRestarted:
                            raise  # not to be judged by the next QEMU: try again
                        except QemuUnavailable:
                            pass  # busy, as said
                    if running or self.qemu.busy:
                        raise MigrationBusy(args["reason"])
        except BlockerError as exc:
            raise self._add_refused(conn, exc, args) from None
        except QemuRestarted as exc:
            self._refused(conn, exc, blocker_id=args.get("id"))
            raise
        return super().add_blocker(conn, args)

    # -- migration ----------------------------------------------------------
    @reads_state
    def migrate(self, conn: Connection, args: Args) -> Step:
        uri = shown(args["uri"]) if "uri" in args else "its channels"
        # A resume goes on with a paused postcopy migration, let through when it
        # started: QEMU's migrate_prepare() checks that one is paused and, like
        # migblockd, no blocker (none could be added while it ran).
        resume = bool(args.get("resume", False))
        # QEMU parses its arguments before it checks anything else: one it does not
        # take is refused in its words, even where a blocker would refuse too.
        unparsed = self.qemu.argument_error("migrate", args)
        if unparsed is not None:
            self._refused(conn, unparsed, uri=args.get("uri", "its channels"))
            raise unparsed
        if not resume:
            yield from self._check_start(conn, args.get("uri", "its channels"))
        # Awaiting its end from now: QEMU's events may tell it before the reply comes.
        # A refused resume leaves the paused migration as awaited as it was.
        awaited = self.qemu.awaiting and resume
        uncounted = self.qemu.uncounted and awaited
        self.qemu.busy = self.qemu.awaiting = True
        self.qemu.uncounted = uncounted
        # (A resume's end is the paused migration's, counted as it was.)
        self.qemu.taking, self.qemu.held = not resume, None
        try:
            result = yield Call("migrate", args)
        except QemuError as exc:
            self.qemu.awaiting = awaited
            log.info("%s: migrate to %s failed in QEMU: %s", conn.label, uri, shown(exc),
                     extra=about(conn))
            raise
        except QemuRestarted as exc:
            # Not sent: the QEMU that passed the checks is gone.
            self.qemu.awaiting = awaited
            self._refused(conn, exc, uri=args.get("uri", "its channels"))
            raise
        except QemuUnavailable as exc:
            # Sent, but no answer: QEMU may have started the migration, or may yet.
            # Still connected, it has it (unanswered): awaited until its end is seen,
            # for once QEMU has run it and goes silent, the status last seen is older.
            self.qemu.awaiting = awaited or self.qemu.unanswered
            # Not counted as started, nor is its end: QEMU may refuse it yet, and the
            # end its query-migrate shows may then be an earlier migration's.
            self.qemu.uncounted = uncounted if awaited else self.qemu.unanswered
            log.warning("%s: migrate to %s handed to QEMU, with no answer (%s); whether it "
                        "started, query-migrate says", conn.label, uri, shown(exc),
                        extra=about(conn))
            raise
        except BaseException:
            self.qemu.awaiting = awaited
            raise
        else:
            self.qemu.count_held()  # taken: an end QEMU reported before its reply is its own
        finally:
            self.qemu.busy = self.qemu.taking = False
            self.qemu.held = None
        log.info("%s: migration to %s %s QEMU", conn.label, uri,
                 "resumed by" if resume else "handed to", extra=about(conn))
        return result

    def migrate_cancel(self, conn: Connection, args: Args) -> Step:
        result = yield Call("migrate_cancel", args)
        log.info("%s: migrate_cancel sent to QEMU", conn.label, extra=about(conn))
        return result

    @reads_state
    def query_migrate(self, conn: Connection, args: Args) -> Step:
        info = yield Call("query-migrate", args)
        if not isinstance(info, dict):
            raise not_understood("query-migrate", info)
        self.qemu.saw(info)
        # migblockd's blockers first (as query-blockers lists them), then QEMU's.
        reasons = [*self.registry.blocked_reasons(), *reasons_of(info)]
        if reasons:
            info["blocked-reasons"] = reasons
        return info

    def migrate_set_parameters(
        self, conn: Connection, args: Args
    ) -> Step:
        forward = dict(args)
        mode = forward.get("mode")
        if mode is not None and not self.qemu.knows("migrate-set-parameters", "mode"):
            del forward["mode"]  # a QEMU older than 8.2: the mode is migblockd's alone
        if not forward:
            if mode is not None:
                self._set_mode(conn, mode)
            return {}
        # QEMU applies all of them or, refusing, none (qmp_migrate_set_parameters()
        # checks before it applies, migration/options.c); its reply is the last word
        # on them, but the mode's commit comes after: if that fails, they stay.
        yield Call("migrate-set-parameters", forward)
        if mode is not None:
            self._set_mode(conn, mode)
        return Forwarded({}, ", ".join(f"{k}={encode(v)}" for k, v in forward.items()))

    @reads_state
    def query_migrate_parameters(
        self, conn: Connection, args: Args
    ) -> Step:
        params = yield Call("query-migrate-parameters", args)
        if not isinstance(params, dict):
            raise not_understood("query-migrate-parameters", params)
        if "mode" not in params:
            params["mode"] = self.registry.mode
        return params

    def migrate_set_capabilities(
        self, conn: Connection, args: Args
    ) -> Step:
        result = yield Call("migrate-set-capabilities", args)
        # Kept (durably) to be set again on a QEMU that migblockd connects to later;
        # QEMU has them already, whatever that commit's outcome.
        for cap in args["capabilities"]:
            if cap["capability"] == "events":
                self.registry.set_events(cap["state"])
        return Forwarded(result, ", ".join(f"{cap['capability']}={encode(cap['state'])}"
                                           for cap in args["capabilities"]))

    @reads_state
    def query_migrate_capabilities(
        self, conn: Connection, args: Args
    ) -> Step:
        return (yield Call("query-migrate-capabilities", args))

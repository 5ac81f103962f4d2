"""QMP command handlers: validated arguments in, registry calls, return values out.

One method per command of the schema, named after it (``add-blocker`` ->
``add_blocker``).  A handler receives the :class:`Connection` that sent the
command and arguments already checked against the command's JSON Schema, so
it indexes them without re-checking types.  It returns the JSON value of
``"return"`` or raises: a :class:`~migblockd.registry.BlockerError` or a
:class:`~migblockd.qmp.errors.QMPError`, which the core turns into the error
reply.  Handlers are synchronous and do no I/O; events the registry queues are
delivered by the core before the reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from migblockd import __version__, logs
from migblockd.connection import Connection
from migblockd.contract import Contract
from migblockd.guard import refusal_kind, same_uid, whose
from migblockd.listing import Listings
from migblockd.logs import about, shown
from migblockd.qmp.addresses import check_channels
from migblockd.qmp.encoding import Encoded, Parts, encode
from migblockd.qmp.envelope import QMP_CAPABILITIES, Command
from migblockd.qmp.errors import QMPError
from migblockd.qmp.validation import ArgumentValidator
from migblockd.registry import (
    BlockerError,
    Change,
    DuplicateId,
    MigrationBlocked,
    Owner,
    Registry,
)
from migblockd.render import blocker_text

log = logging.getLogger("migblockd")

Args = dict[str, Any]
Handler = Callable[[Connection, Args], object]
#: Whether a log line of a kind about an owner's uid goes out now, and what it
#: adds (:meth:`migblockd.guard.Guard.bounded`).
Bounded = Callable[[Hashable, Owner | None], str | None]
H = TypeVar("H", bound=Callable[..., object])


def reads_state(handler: H) -> H:
    """Mark a handler whose answer depends on the blockers or the settings.

    With durable state on, the core runs such a command only once every
    earlier change is on disk: no client may act on, or hear of, a change
    that a crash could still take back (``migrate`` least of all).
    """
    handler.reads_state = True  # type: ignore[attr-defined]
    return handler


#: QEMU's ``MAX_MIGRATE_DOWNTIME`` (``migration/options.c``), in milliseconds.
MAX_DOWNTIME = 2000 * 1000


#: The schema commands migblockd has a handler for: each is the method named
#: after it (``add-blocker`` -> ``add_blocker``); ``qmp_capabilities`` is the
#: session's own.  Listed rather than found by name alone: a schema command
#: called ``table`` or ``migration-status`` found a method that is no handler,
#: and ``migrate-cancel`` found ``migrate_cancel``'s.
HANDLED = frozenset({
    "query-version", "query-commands", "query-qmp-schema",
    "add-blocker", "del-blocker", "query-blockers",
    "migrate", "migrate_cancel", "query-migrate",
    "migrate-set-parameters", "query-migrate-parameters",
    "migrate-set-capabilities", "query-migrate-capabilities",
})


def has_handler(name: str) -> bool:
    """Whether migblockd serves the schema command ``name`` (see :data:`HANDLED`)."""
    return name in HANDLED or name == QMP_CAPABILITIES


def version_info() -> dict[str, Any]:
    """``query-version``'s answer, also the greeting's ``version``."""
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": f"migblockd {__version__}",
    }


class Handlers:
    """The commands of the schema, bound to one registry."""

    def __init__(self, contract: Contract, registry: Registry) -> None:
        self.contract = contract
        self.registry = registry
        self._version = version_info()
        self._command_list = [{"name": name} for name in contract.commands]
        #: query-qmp-schema's answer, encoded once: it never changes while the daemon
        #: runs, and encoding it took half a millisecond a request, which the
        #: thousands pipelined by a client that hung up cost a stop in seconds.
        self._introspection = Encoded(encode(contract.introspection))
        self.listings = Listings(registry)
        # A client may repeat a request the registry refuses (a duplicate id) in a
        # loop, as one the guard refuses: the core that serves these handlers gives
        # its guard's bound (Core.__init__), one throttle for every refusal's line.
        self.bounded: Bounded = lambda kind, owner: ""

    # -- control ------------------------------------------------------------
    def query_version(self, conn: Connection, args: Args) -> object:
        return self._version

    def query_commands(self, conn: Connection, args: Args) -> object:
        return self._command_list

    def query_qmp_schema(self, conn: Connection, args: Args) -> object:
        return self._introspection

    # -- blockers -----------------------------------------------------------
    def add_blocker(self, conn: Connection, args: Args) -> object:
        try:
            blocker = self.registry.add(
                args["reason"],
                modes=args.get("modes"),
                internal=args.get("internal", False),
                id=args.get("id"),
                scope=args.get("scope", "daemon"),
                owner=conn.owner,
                connection=conn,
            )
        except BlockerError as exc:
            raise self._add_refused(conn, exc, args) from None
        logs.info(log, "%s: added blocker %s (%s): %s", conn.label,
                  shown(blocker.id, quoted=False), ",".join(blocker.modes), shown(blocker.reason),
                  extra=about(conn, blocker_id=blocker.id))
        return Encoded(blocker_text(blocker))

    def del_blocker(self, conn: Connection, args: Args) -> object:
        blocker = self.registry.delete(args["id"])
        owner, mine = blocker.owner, conn.owner
        # Another uid's (an admin's delete): the line says whose, since the one that
        # said who added it may be long gone (rotated, or from before a restart).
        logs.info(log, "%s: deleted blocker %s%s", conn.label, shown(blocker.id, quoted=False),
                  "" if same_uid(owner, mine) else f", which belonged to {whose(owner)}",
                  extra=about(conn, blocker_id=blocker.id))
        return {}

    @staticmethod
    def undone(conn: Connection, changes: list[Change]) -> None:
        """The log lines of one command's changes its commit failed to keep, as its
        own lines said they were made: each blocker (its id in the fields), and a
        setting once, from what the command found to what it left.  A command may
        name the events capability more than once, and its line said only that."""
        settings: dict[str, tuple[object, object]] = {}  # kind: (old, new)
        for change in changes:
            blocker = change.blocker
            if blocker is not None:
                did = "added" if change.kind == "add" else "deleted"
                log.warning("%s: undone, the commit failed: %s blocker %s", conn.label, did,
                            shown(blocker.id, quoted=False),
                            extra=about(conn, blocker_id=blocker.id))
            elif change.kind in ("mode", "events"):
                first = settings.get(change.kind, (change.old, None))[0]
                settings[change.kind] = (first, change.new)
        old, new = settings.get("mode", (None, None))
        if new != old:
            log.warning("%s: undone, the commit failed: migration mode %s (back to %s)",
                        conn.label, new, old, extra=about(conn))
        old, new = settings.get("events", (None, None))
        if new != old:
            log.warning("%s: undone, the commit failed: migration capability events %s "
                        "(back to %s)", conn.label, on_off(bool(new)), on_off(bool(old)),
                        extra=about(conn))

    @reads_state
    def query_blockers(self, conn: Connection, args: Args) -> object:
        # Polled by every agent: kept encoded as blockers come and go.
        return Parts(self.listings.get(args.get("mode")).parts())

    # -- migration ----------------------------------------------------------
    @reads_state
    def migrate(self, conn: Connection, args: Args) -> object:
        uri = args.get("uri")
        where = uri if uri is not None else "its channels"
        # QEMU's visitor judges the addresses before qmp_migrate() runs.
        check_channels(args.get("channels"))
        try:
            self.registry.migrate(uri, args.get("resume", False), args.get("channels"))
        except BlockerError as exc:
            self._refused(conn, exc, uri=where)
            raise
        log.info("%s: migration to %s started", conn.label, shown(where), extra=about(conn))
        return {}

    def _add_refused(self, conn: Connection, exc: BlockerError, args: Args) -> BlockerError:
        """What a refused ``add-blocker`` answers, its line logged: the gated path
        (:mod:`migblockd.gate`) and this one say a refusal alike.  A duplicate of
        another uid's id names its holder: the plain form tells an agent re-adding
        after a reconnection that the id is already its own."""
        if isinstance(exc, DuplicateId):
            held = self.registry.get(exc.id)
            if held is not None and not same_uid(held.owner, conn.owner):
                exc = DuplicateId(exc.id, whose(held.owner))
        self._refused(conn, exc, blocker_id=args.get("id"))
        return exc

    def _refused(self, conn: Connection, exc: Exception, *, uri: str | None = None,
                 blocker_id: str | None = None) -> None:
        """The log line of a refused ``migrate`` (to ``uri``) or ``add-blocker``:
        what was refused and why, in the refusal's own words.  Bounded as the
        guard's refusals are, per uid, command and class of refusal: a client
        pipelining 2,000 duplicate ids made 2,000 lines in 0.2 s."""
        more = self.bounded(refusal_kind("add-blocker" if uri is None else "migrate",
                                         type(exc)), conn.owner)
        if more is None:
            return
        if isinstance(exc, MigrationBlocked):
            # The reason alone may be shared by several blockers: the id is what an
            # operator deletes, and its field puts the refusal in the blocker's history.
            log.info("%s: migrate to %s refused by blocker %s: %s%s", conn.label, shown(uri),
                     shown(exc.blocker.id, quoted=False), shown(exc), more,
                     extra=about(conn, blocker_id=exc.blocker.id))
        elif uri is not None:
            log.info("%s: migrate to %s refused: %s%s", conn.label, shown(uri), shown(exc),
                     more, extra=about(conn))
        else:
            # Quoted: the id may be the very thing refused (not an identifier).
            named = "" if blocker_id is None else " " + shown(blocker_id)
            log.info("%s: refused blocker%s: %s%s", conn.label, named, shown(exc), more,
                     extra=about(conn, blocker_id=blocker_id))

    def migrate_cancel(self, conn: Connection, args: Args) -> object:
        # Who cancelled: the status lines that follow name no client.
        log.info("%s: migrate_cancel (migration status: %s)", conn.label,
                 self.registry.status or "none", extra=about(conn))
        self.registry.cancel()
        return {}

    @reads_state
    def query_migrate(self, conn: Connection, args: Args) -> object:
        return self.registry.query_migrate()

    def migrate_set_parameters(self, conn: Connection, args: Args) -> object:
        # Both are unsigned in QEMU (size, uint64), whose visitor wraps a
        # negative number; migrate_params_check() then refuses the command
        # whole, before anything is applied.  (QEMU 7.2's wording; later ones
        # say "Option downtime_limit expects ...".)
        values = {k: v % (1 << 64) for k, v in args.items() if k != "mode"}
        if values.get("downtime-limit", 0) > MAX_DOWNTIME:
            raise QMPError("Parameter 'downtime_limit' expects an integer in the range of "
                           "0 to (2000 * 1000) ms")
        if "mode" in args:
            self._set_mode(conn, args["mode"])
        self.registry.set_parameters(values)
        return {}

    def _set_mode(self, conn: Connection, mode: str) -> None:
        # Which blockers migrate consults from now on: worth a line in the log.
        old = self.registry.mode
        self.registry.set_mode(mode)
        if mode != old:
            log.info("%s: migration mode %s (was %s)", conn.label, mode, old, extra=about(conn))

    @reads_state
    def query_migrate_parameters(self, conn: Connection, args: Args) -> object:
        return {"mode": self.registry.mode, **self.registry.parameters}

    def migrate_set_capabilities(self, conn: Connection, args: Args) -> object:
        # Capabilities are checked before any is applied: all or nothing.
        self.registry.check_capabilities_settable()
        # Whether clients hear of migrations is kept on disk like the mode, and
        # worth a line as the mode is: one for the list, however often it names it.
        old = self.registry.events_enabled
        for cap in args["capabilities"]:
            if cap["capability"] == "events":
                self.registry.set_events(cap["state"])
        new = self.registry.events_enabled
        if new != old:
            log.info("%s: migration capability events %s (was %s)", conn.label, on_off(new),
                     on_off(old), extra=about(conn))
        return {}

    @reads_state
    def query_migrate_capabilities(self, conn: Connection, args: Args) -> object:
        return [
            {"capability": "events", "state": self.registry.events_enabled},
        ]

    def track(self, changes: list[Change]) -> None:
        """Keep the listings current: the core hands over every change it takes."""
        listings = self.listings
        for change in changes:
            if change.kind == "add":
                assert change.blocker is not None
                listings.added(change.blocker)
            elif change.kind == "delete":
                assert change.blocker is not None
                listings.removed(change.blocker)

    def migration_status(self) -> str:
        """The migration's status, for systemd's STATUS line."""
        return self.registry.status or "none"

    def qemu_state(self) -> str | None:
        """The link to a gated QEMU, for the STATUS line: None when there is none."""
        return None

    def handler(self, name: str) -> Handler | None:
        """The handler of the schema command ``name``; None for ``qmp_capabilities``
        and for a command migblockd does not serve."""
        if name not in HANDLED:
            return None
        found: Handler = getattr(self, name.replace("-", "_"))
        return found

    def table(self) -> dict[str, Command]:
        """One ``Command`` per schema command; validators are built here, once.

        ``qmp_capabilities`` has no handler: the session negotiates itself.
        """
        table: dict[str, Command] = {}
        for name, spec in self.contract.commands.items():
            if not has_handler(name):  # the start refuses such a schema first (served.py)
                raise LookupError(f"schema command {name!r} has no handler in migblockd.commands")
            handler = self.handler(name)
            table[name] = Command(name, spec.allow_oob, ArgumentValidator(spec.arguments).check,
                                  handler)
        return table


def on_off(state: bool) -> str:
    """A capability's state as QEMU's HMP ``info migrate_capabilities`` prints it."""
    return "on" if state else "off"

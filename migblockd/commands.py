"""QMP command handlers: validated arguments in, registry calls, return values out.

Every handler is synchronous: the registry is in memory, so a command runs to
completion the moment it is dispatched and replies stay in request order for
free.  Arguments have already been checked against the command's JSON Schema,
so handlers index them without re-checking types.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from migblockd import __version__
from migblockd.contract import Contract
from migblockd.qmp.codec import Encoded
from migblockd.qmp.session import Command, Session
from migblockd.qmp.validation import ArgumentValidator
from migblockd.registry import BlockerError, Owner, Registry

log = logging.getLogger("migblockd")

Args = dict[str, Any]


class Client(Protocol):
    """What a handler knows about the connection that sent the command."""

    @property
    def owner(self) -> Owner | None: ...
    @property
    def label(self) -> str: ...


class Hub(Protocol):
    """The server side that handlers report to: it delivers the registry's events."""

    def publish_events(self) -> None: ...


def shown(text: object, limit: int = 200) -> str:
    """A client-supplied string as one log field: escaped (no forged lines), truncated."""
    s = str(text)
    return ascii(s if len(s) <= limit else s[:limit] + "...")


def version_info() -> dict[str, Any]:
    """``query-version``'s answer, also the greeting's ``version``."""
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": f"migblockd {__version__}",
    }


class Handlers:
    """The commands of the schema, bound to one registry."""

    def __init__(self, contract: Contract, registry: Registry, hub: Hub) -> None:
        self.contract = contract
        self.registry = registry
        self.hub = hub
        self._version = version_info()
        self._command_list = [{"name": name} for name in contract.commands]
        self._listings: dict[str | None, Encoded] = {}
        self._listing_changes = -1

    # -- control ------------------------------------------------------------
    def qmp_capabilities(self, client: Client, args: Args) -> object:
        return {}  # negotiation itself is the session's business

    def query_version(self, client: Client, args: Args) -> object:
        return self._version

    def query_commands(self, client: Client, args: Args) -> object:
        return self._command_list

    def query_qmp_schema(self, client: Client, args: Args) -> object:
        return self.contract.introspection

    # -- blockers -----------------------------------------------------------
    def add_blocker(self, client: Client, args: Args) -> object:
        try:
            blocker = self.registry.add(
                args["reason"],
                modes=args.get("modes"),
                internal=args.get("internal", False),
                id=args.get("id"),
                scope=args.get("scope", "daemon"),
                owner=client.owner,
                connection=client,
            )
        except BlockerError as exc:
            log.info("%s: refused blocker: %s", client.label, shown(exc))
            raise
        log.info("%s: added blocker %s (%s): %s", client.label, blocker.id,
                 ",".join(blocker.modes), shown(blocker.reason))
        return blocker.info()

    def del_blocker(self, client: Client, args: Args) -> object:
        blocker = self.registry.delete(args["id"])
        log.info("%s: deleted blocker %s", client.label, blocker.id)
        return {}

    def query_blockers(self, client: Client, args: Args) -> object:
        # Polled by every agent and changed rarely: encode it once per change.
        mode = args.get("mode")
        changes = self.registry.changes
        if self._listing_changes != changes:
            self._listings.clear()
            self._listing_changes = changes
        listing = self._listings.get(mode)
        if listing is None:
            listing = Encoded([b.info() for b in self.registry.blockers(mode)])
            self._listings[mode] = listing
        return listing

    # -- migration ----------------------------------------------------------
    def migrate(self, client: Client, args: Args) -> object:
        try:
            self.registry.migrate(args["uri"])
        except BlockerError as exc:
            log.info("%s: migrate to %s refused: %s", client.label, shown(args["uri"]),
                     shown(exc))
            raise
        log.info("%s: migration to %s started", client.label, shown(args["uri"]))
        return {}

    def migrate_cancel(self, client: Client, args: Args) -> object:
        self.registry.cancel()
        return {}

    def query_migrate(self, client: Client, args: Args) -> object:
        return self.registry.query_migrate()

    def migrate_set_parameters(self, client: Client, args: Args) -> object:
        if "mode" in args:
            self.registry.set_mode(args["mode"])
        return {}

    def query_migrate_parameters(self, client: Client, args: Args) -> object:
        return {"mode": self.registry.mode}

    def migrate_set_capabilities(self, client: Client, args: Args) -> object:
        # Capabilities are checked before any is applied: all or nothing.
        self.registry.check_capabilities_settable()
        for cap in args["capabilities"]:
            if cap["capability"] == "events":
                self.registry.set_events(cap["state"])
        return {}

    def query_migrate_capabilities(self, client: Client, args: Args) -> object:
        return [
            {"capability": "events", "state": self.registry.events_enabled},
        ]

    def table(self) -> dict[str, Command]:
        """One ``Command`` per schema command; validators are compiled here, once."""
        table: dict[str, Command] = {}
        for name, spec in self.contract.commands.items():
            handler = getattr(self, name.replace("-", "_"), None)
            if handler is None:
                raise LookupError(f"schema command {name!r} has no handler in migblockd.commands")
            table[name] = Command(
                name=name,
                allow_oob=spec.allow_oob,
                validate=ArgumentValidator(spec.arguments).check,
                run=self._runner(handler),
            )
        return table

    def _runner(
        self, handler: Callable[[Client, Args], object]
    ) -> Callable[[Session, Args], object]:
        hub = self.hub

        def run(session: Session, args: Args) -> object:
            client: Client = session.context  # type: ignore[assignment]
            try:
                return handler(client, args)
            finally:
                # Events the command caused go out before its reply (QEMU's order).
                hub.publish_events()

        return run

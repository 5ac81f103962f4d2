"""The shell's connection to the daemon: connect, greet, negotiate, load the schema,
and reconnect when the daemon has gone away."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from migblockd.shell.client import ConnectionLost, QMPClient
from migblockd.shell.opening import ConnectError, Message
from migblockd.shell.schema import Schema, SchemaError


def describe_greeting(greeting: Message) -> str:
    """``migblockd 0.1.0 (QMP server version 0.1.0)`` from a greeting (whose
    ``QMP.version`` :class:`QMPClient` has checked is an object)."""
    version = greeting["QMP"]["version"]
    qemu = version.get("qemu")
    if not isinstance(qemu, dict):  # not QMP's shape, but only shown: as unknown
        qemu = {}
    triple = ".".join(str(qemu.get(k, "?")) for k in ("major", "minor", "micro"))
    package = str(version.get("package", "")).strip()
    return f"{package} (QMP server version {triple})" if package else f"QMP server {triple}"


def _command_names(answer: Any) -> list[str]:
    """The names in ``query-commands``'s answer; ValueError when it is not a list of
    objects with a string ``name``."""
    if not isinstance(answer, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in answer):
        raise ValueError("not a list of objects with a string 'name'")
    return [c["name"] for c in answer]


def _schema(reply: Message, names: list[str]) -> Schema:
    """The schema a ``query-qmp-schema`` reply describes; SchemaError when the
    answer is not a list of SchemaInfo objects."""
    if "return" not in reply:
        return Schema.empty()
    infos: Any = reply["return"]
    if not isinstance(infos, list):
        raise SchemaError("not a list")
    return Schema(infos, names)


class Connection:
    """Holds at most one live :class:`QMPClient` and the schema it reported."""

    def __init__(
        self,
        path: str,
        on_event: Callable[[Message], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.path = path
        self._on_event = on_event
        self._on_lost = on_lost
        #: A script's --timeout, which bounds each wait of the opening too.
        self._timeout = timeout
        self._client: QMPClient | None = None
        self.schema = Schema.empty()
        self.greeting: Message = {}
        #: The ids of the blockers added with scope connection on this connection
        #: that are still there, oldest first: they end with it, which the
        #: interactive shell says, since it then reconnects as if nothing went.
        self.held: dict[str, None] = {}

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def open(self) -> Message:
        """Connect, negotiate and fetch ``query-qmp-schema``; raises ConnectError,
        also when a wait of it passes its bound
        (:class:`~migblockd.shell.opening.OpeningWait`)."""
        await self.close()
        self.held = {}
        client = QMPClient(self._event, self._on_lost, self._timeout)
        try:
            greeting = await client.connect(self.path)  # its errors name the path
            try:
                await client.negotiate()
                reply = await client.ask("query-qmp-schema")
                # Also the commands forwarded to QEMU, which introspection leaves out.
                listed = await client.ask("query-commands")
            except (ConnectError, ConnectionLost) as err:
                raise ConnectError(f"{self.path}: {err}") from None
            # An error instead (a server without them) leaves the shell without a
            # schema: it then sends what is typed unchecked.  An answer of the wrong
            # shape is a broken server, said in one line rather than a traceback.
            try:
                names = _command_names(listed["return"]) if "return" in listed else []
            except ValueError as err:
                raise ConnectError(f"{self.path}: the server's answer to query-commands "
                                   f"is malformed: {err}") from None
            try:
                schema = _schema(reply, names)
            except SchemaError as err:
                raise ConnectError(f"{self.path}: the server's answer to query-qmp-schema "
                                   f"is malformed: {err}") from None
        except BaseException:  # also Ctrl-C (cancellation) in the interactive shell
            await client.close()
            raise
        self.schema = schema
        self.greeting = greeting
        self._client = client
        return greeting

    def _event(self, message: Message) -> None:
        data = message.get("data")
        if message.get("event") == "BLOCKER_DELETED" and isinstance(data, dict):
            self.held.pop(str(data.get("id")), None)
        if self._on_event is not None:
            self._on_event(message)

    async def ensure_open(self) -> bool:
        """Reconnect if needed; True when a new connection was made."""
        if self.connected:
            return False
        await self.open()
        return True

    @property
    def lost_reason(self) -> str:
        """Why the connection ended (:attr:`QMPClient.lost_reason`)."""
        return self._client.lost_reason if self._client is not None else "not connected"

    def awaits(self, id: object) -> bool:
        """Whether a request with ``id`` still awaits its reply (QMPClient.awaits)."""
        return self._client is not None and self._client.awaits(id)

    @property
    def awaiting(self) -> bool:
        """Whether a request sent still awaits its reply (QMPClient.awaiting)."""
        return self._client is not None and self._client.awaiting

    async def execute(self, message: Message, text: str | None = None) -> Message:
        """Run one request; the shell's own ``id`` is removed from the reply.
        ``text``: the request as typed, which is what is sent (QMPClient.execute).

        Raises ConnectionLost when not connected or when the connection drops.
        """
        if self._client is None:
            raise ConnectionLost("not connected", sent=False)
        # A reply that comes after Ctrl-C abandoned its request is noted too: the
        # blocker it reports is held all the same, and goes with the connection.
        reply = await self._client.execute(
            message, text, late=lambda late: self._note(message, late))
        self._note(message, reply)
        if "id" not in message:
            reply = {k: v for k, v in reply.items() if k != "id"}
        return reply

    def _note(self, message: Message, reply: Message) -> None:
        """Keep the id of the blocker ``reply`` reports added with scope connection."""
        added = reply.get("return")
        if (message.get("execute") == "add-blocker" and isinstance(added, dict)
                and added.get("scope") == "connection" and isinstance(added.get("id"), str)):
            self.held[added["id"]] = None

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

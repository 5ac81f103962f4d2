"""The commands of a :class:`~migblockd.client.MigblockClient`: any of the schema, and typed ones.

:meth:`Commands.execute` sends any command, its arguments checked first to be what
the daemon reads (strict JSON in UTF-8, nested no deeper than half Python's recursion
limit, on every version alike) and copied as they are when it is called; it raises
the daemon's refusal as :class:`CommandError` and a connection lost before the
answer as :class:`DisconnectedError`.  The typed commands (``add-blocker``,
``del-blocker``, ``query-blockers``) take and return
:class:`~migblockd.client.values.Blocker` values.

:class:`Commands` is a base class of :class:`~migblockd.client.MigblockClient`, as
:class:`~migblockd.client.connection.Connection` is of this one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from qemu.qmp import ExecInterruptedError, ExecuteError, QMPError, StateError

from migblockd.client.connection import Connection
from migblockd.client.errors import ClientError, CommandError, DisconnectedError
from migblockd.client.values import Blocker

__all__ = ["Commands"]


class Commands(Connection):
    """The commands a :class:`~migblockd.client.MigblockClient` sends."""

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None
                      ) -> Any:
        """Run any command of the schema; return its ``return`` value as decoded JSON.

        Raises :class:`CommandError` when the daemon answers with an error,
        :class:`DisconnectedError` when not connected or when the connection is lost
        before the answer, and :class:`ClientError` for arguments that are not JSON
        (nothing is sent then).  ``arguments`` are sent as they are when it is called,
        whatever the caller changes in them afterwards.  Cancelled
        (``asyncio.timeout()``) after it was sent, the command still runs; its answer
        is dropped.
        """
        self._in_its_loop()
        if self._qmp is None:
            raise DisconnectedError(f"not connected to migblockd at {self.path}")
        if arguments is not None:
            arguments = dict(arguments)  # the encoder takes dicts only, not any Mapping
        try:
            # The library serializes in its writer task, where a failure would drop the
            # connection; and the daemon, like QEMU, takes strict JSON in UTF-8 only (a
            # lone surrogate, as os.fsdecode() makes of a byte that is not UTF-8, is not).
            text = json.dumps(arguments, allow_nan=False, ensure_ascii=False)
            text.encode()
        except (TypeError, ValueError, RecursionError) as exc:  # the last: nested too deep
            raise ClientError(f"arguments of {command} are not JSON: {exc}") from None
        # From Python 3.12 the C encoder nests past the recursion limit, where 3.11's
        # fails (above): bounded here, on every version alike (the daemon reads 256
        # levels at most, --max-nesting).
        limit = sys.getrecursionlimit() // 2
        if text.count("[") + text.count("{") > limit and _deeper(arguments, limit):
            raise ClientError(f"arguments of {command} are not JSON: nested deeper than "
                              f"{limit} levels")
        if arguments is not None:
            # A copy of what was checked: the writer task encodes it a turn later, when
            # the caller may have changed what it passed.
            arguments = json.loads(text)
        qmp = self._qmp
        try:
            return await qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandError(command, exc.error_class, exc.error.error.desc) from None
        except (ExecInterruptedError, StateError) as exc:
            # Chained to what ended the connection (the socket's error, the stream's
            # end), not to the library's report of it.
            raise DisconnectedError(self._lost(
                qmp, f" before the reply to {command}" if isinstance(
                    exc, ExecInterruptedError) else "")) from qmp.ended or exc
        except QMPError as exc:
            raise ClientError(f"the reply to {command} was not understood: {exc}") from exc

    async def add_blocker(self, reason: str, *, modes: Iterable[str] | None = None,
                          internal: bool = False, id: str | None = None,
                          scope: str | None = None) -> Blocker:
        """Add a migration blocker (``add-blocker``) and return it.

        ``modes`` defaults to every mode, ``id`` to one the daemon picks, ``scope``
        to ``"daemon"``; ``internal`` ignores the daemon's --only-migratable.
        """
        arguments: dict[str, object] = {"reason": reason}
        if modes is not None:
            if isinstance(modes, str):
                raise TypeError("modes is a list of mode names, not one string")
            arguments["modes"] = list(modes)
        if internal:
            arguments["internal"] = True
        if id is not None:
            arguments["id"] = id
        if scope is not None:
            arguments["scope"] = scope
        return Blocker.from_qmp(await self.execute("add-blocker", arguments))

    async def del_blocker(self, blocker: Blocker | str) -> None:
        """Delete a blocker (``del-blocker``), given it or its id."""
        blocker_id = blocker.id if isinstance(blocker, Blocker) else blocker
        await self.execute("del-blocker", {"id": blocker_id})

    async def blockers(self, mode: str | None = None) -> list[Blocker]:
        """The current blockers, oldest first; only those blocking ``mode`` if given."""
        reply = await self.execute("query-blockers", None if mode is None else {"mode": mode})
        if not isinstance(reply, list):
            raise ClientError(f"query-blockers returned {reply!r}, not a list")
        return [Blocker.from_qmp(item) for item in reply]


def _deeper(value: object, limit: int) -> bool:
    """Whether ``value`` nests lists and objects deeper than ``limit`` (without recursion)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1)
                         for child in (item.values() if isinstance(item, dict) else item))
    return False

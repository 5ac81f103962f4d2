"""Which ``migrate`` requests need ``admin``: those that would make QEMU act as its own user.

A ``migrate`` by a role below admin may not make QEMU run a command or write a
file as its own user: not to an ``exec:`` or ``file:`` URI (prefixes QEMU
matches case-sensitively), nor with ``channels`` that use the ``exec`` or
``file`` transport or that it cannot judge (a channel that is not an object
with a string ``addr.transport``).  The rule applies with or without ``--qemu``.

Pure: :func:`needs_admin` says why, and :mod:`migblockd.guard` refuses with it.
"""

from __future__ import annotations

from typing import Any

from migblockd.access import Role

__all__ = ["needs_admin"]

# What QEMU would do, as migrate's refusals say it.
_RUNS = "QEMU would run the command as its own user"
_WRITES = "QEMU would write the file as its own user"
#: URI prefixes that need admin, as QEMU's migrate_uri_parse() matches them
#: (strstart(): case-sensitive, nothing skipped): what each refusal names.
_ADMIN_URIS: tuple[tuple[str, str], ...] = (
    ("exec:", f"migrate to an exec: URI needs role {Role.ADMIN} ({_RUNS})"),
    ("file:", f"migrate to a file: URI needs role {Role.ADMIN} ({_WRITES})"),
)
#: Channel transports (MigrationAddressType, matched exactly) that need admin.
_ADMIN_TRANSPORTS: dict[str, str] = {
    "exec": f"migrate with a channel of transport exec needs role {Role.ADMIN} ({_RUNS})",
    "file": f"migrate with a channel of transport file needs role {Role.ADMIN} ({_WRITES})",
}
_UNJUDGED_CHANNEL = (f"migrate with a channel that has no string addr.transport needs role "
                     f"{Role.ADMIN} (migblockd cannot tell what QEMU would do with it)")


def needs_admin(args: dict[str, Any]) -> str | None:
    """Why a ``migrate`` with ``args`` needs ``admin`` (the first reason, in the order
    the URI, then each channel), as its refusal says it; None: it does not."""
    # exec: runs a command through /bin/sh as QEMU's user, file: writes wherever
    # QEMU may write; channels can say the same, so they are judged too.
    uri = args.get("uri")
    if isinstance(uri, str):
        for prefix, what in _ADMIN_URIS:
            if uri.startswith(prefix):
                return what
    channels = args.get("channels")
    if channels is None:
        return None
    if not isinstance(channels, list):  # the schema says a list: defensive only
        return _UNJUDGED_CHANNEL
    for channel in channels:
        addr = channel.get("addr") if isinstance(channel, dict) else None
        transport = addr.get("transport") if isinstance(addr, dict) else None
        if not isinstance(transport, str):
            return _UNJUDGED_CHANNEL
        needs = _ADMIN_TRANSPORTS.get(transport)
        if needs is not None:
            return needs
    return None

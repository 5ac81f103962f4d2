"""``migrate``'s channel addresses, checked as QEMU's QAPI visitor checks them.

QEMU's ``MigrationChannel`` (``qapi/migration.json``, 8.2 and later) carries an
``addr`` of type ``MigrationAddress``: a union on its ``transport`` member,
whose ``socket`` branch is itself a union, ``SocketAddress``
(``qapi/sockets.json``), on its ``type`` member.  migblockd's QAPI subset has
no unions, so its schema declares ``addr`` as ``any``; this module is the rest
of QEMU's visit: the members of each branch, in the order QEMU's generated
visitor takes them (the discriminator first, then the branch's members, then,
once all were taken, a member no branch knows), worded as
:mod:`migblockd.qmp.validation` words the schema's own errors
(``Parameter 'channels[0].addr.transport' is missing``).

=============  ==========================================================
transport      members (``*`` optional)
=============  ==========================================================
``socket``     ``type``, then by type: ``inet``: ``host``, ``port``,
               ``*numeric``, ``*to`` (uint16), ``*ipv4``, ``*ipv6``,
               ``*keep-alive``, ``*keep-alive-count``, ``*keep-alive-idle``,
               ``*keep-alive-interval`` (uint32), ``*mptcp``;
               ``unix``: ``path``, ``*abstract``, ``*tight``;
               ``vsock``: ``cid``, ``port``; ``fd``: ``str``
``exec``       ``args`` (a list of strings)
``rdma``       ``inet``'s members
``file``       ``filename``, ``offset`` (uint64)
=============  ==========================================================

These are QEMU's members on a Linux host (``InetSocketAddress`` is QEMU
10.1's, whose keep-alive tuning and ``mptcp`` are conditional on the host's
TCP options; ``abstract`` and ``tight`` on Linux).  QEMU judges the address
before ``qmp_migrate()`` runs, and so before anything else of the command;
migblockd judges it once the schema found nothing wrong, so an error the
schema finds in another argument (a later channel's type, ``resume``, an
unknown member) is reported before the address's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Final

from migblockd.qmp.distinct import value_key
from migblockd.qmp.errors import QMPError
from migblockd.qmp.validation import ArgumentValidator

__all__ = ["TRANSPORTS", "check_channels"]

#: ``MigrationAddressType``'s members, in QEMU's order.
TRANSPORTS: Final[tuple[str, ...]] = ("socket", "exec", "rdma", "file")
#: ``SocketAddressType``'s members, in QEMU's order.
SOCKET_TYPES: Final[tuple[str, ...]] = ("inet", "unix", "vsock", "fd")

_STR: Final = {"type": "string"}
_BOOL: Final = {"type": "boolean"}


def _uint(bits: int) -> dict[str, Any]:
    # The range QEMU's input visitor takes for the type (migblockd.qapi.jsonschema's).
    low = -(1 << 63) if bits == 64 else 0
    return {"type": "integer", "format": f"uint{bits}", "minimum": low,
            "maximum": (1 << bits) - 1}


Members = tuple[tuple[str, Mapping[str, Any], bool], ...]  # (name, schema, required)

_INET: Final[Members] = (
    ("host", _STR, True), ("port", _STR, True), ("numeric", _BOOL, False),
    ("to", _uint(16), False), ("ipv4", _BOOL, False), ("ipv6", _BOOL, False),
    ("keep-alive", _BOOL, False), ("keep-alive-count", _uint(32), False),
    ("keep-alive-idle", _uint(32), False), ("keep-alive-interval", _uint(32), False),
    ("mptcp", _BOOL, False),
)
_SOCKETS: Final[dict[str, Members]] = {
    "inet": _INET,
    "unix": (("path", _STR, True), ("abstract", _BOOL, False), ("tight", _BOOL, False)),
    "vsock": (("cid", _STR, True), ("port", _STR, True)),
    "fd": (("str", _STR, True),),
}
_BRANCHES: Final[dict[str, Members]] = {
    "exec": (("args", {"type": "array", "items": _STR}, True),),
    "rdma": _INET,
    "file": (("filename", _STR, True), ("offset", _uint(64), True)),
}


def _object(members: Members, closed: bool) -> ArgumentValidator:
    """A validator of an object with ``members`` in visit order; ``closed``: no others."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: member for name, member, _ in members},
        "required": [name for name, _, required in members if required],
    }
    if closed:
        schema["additionalProperties"] = False
    return ArgumentValidator(schema)


_TRANSPORT: Final[Members] = (("transport", {"type": "string", "enum": list(TRANSPORTS)}, True),)
_SOCKET_TYPE: Final[Members] = (("type", {"type": "string", "enum": list(SOCKET_TYPES)}, True),)
# The discriminators alone, to pick a branch; then each branch whole, discriminators
# first (so that their errors, and the order of unexpected members, are QEMU's).
_BY_TRANSPORT: Final = _object(_TRANSPORT, closed=False)
_BY_SOCKET_TYPE: Final = _object(_TRANSPORT + _SOCKET_TYPE, closed=False)
_VARIANTS: Final[dict[tuple[str, str | None], ArgumentValidator]] = {
    **{(transport, None): _object(_TRANSPORT + members, closed=True)
       for transport, members in _BRANCHES.items()},
    **{("socket", kind): _object(_TRANSPORT + _SOCKET_TYPE + members, closed=True)
       for kind, members in _SOCKETS.items()},
}


def address_error(addr: object, path: str) -> str | None:
    """QEMU's error for the ``MigrationAddress`` ``addr`` named ``path``, if any."""
    desc = _BY_TRANSPORT.error_at(addr, path)
    if desc is not None:
        return desc
    assert isinstance(addr, dict)  # the walk above refuses anything else
    transport: str = addr["transport"]
    kind: str | None = None
    if transport == "socket":
        desc = _BY_SOCKET_TYPE.error_at(addr, path)
        if desc is not None:
            return desc
        kind = addr["type"]
    return _VARIANTS[(transport, kind)].error_at(addr, path)


def check_channels(channels: Sequence[Mapping[str, Any]] | None) -> None:
    """Raise :class:`QMPError` for the first channel whose ``addr`` QEMU refuses
    (``channels`` as the schema took them: objects, each with an ``addr``)."""
    # A request may repeat one address a thousand times: each is judged once.
    judged: set[Hashable] = set()
    for index, channel in enumerate(channels or ()):
        addr = channel["addr"]
        key = value_key(addr)
        if key in judged:
            continue
        desc = address_error(addr, f"channels[{index}].addr")
        if desc is not None:
            raise QMPError(desc)
        judged.add(key)

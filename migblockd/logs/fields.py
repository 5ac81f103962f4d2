"""What a log record says about its subject: client strings made safe, structured fields.

Two rules hold for every record the daemon logs about a client:

* A client-supplied string reaches a log line only through :func:`shown`:
  escaped, so that it cannot start a line of its own (a forged record, a fake
  ``Traceback``), and truncated, so that a 1 MiB reason costs a 200-character
  field, not a 1 MiB line in the journal.
* A record about a client or a blocker carries structured fields, passed as
  ``extra=about(conn, blocker_id=...)``.  The text, JSON and journal formats
  all read them from the record's ``fields`` attribute: JSON shows them as
  keys (``"peer_uid": 1000``), the journal as ``MIGBLOCKD_PEER_UID=1000``, so
  ``journalctl MIGBLOCKD_BLOCKER_ID=x`` finds every record about blocker x.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from migblockd.registry import Owner

__all__ = ["FIELD_LIMIT", "VALUES_LIMIT", "WIRE_LIMIT", "Peer", "about", "shown"]

#: Characters of one client string in a log line.
SHOWN_LIMIT = 200
#: Bytes of one wire message in a debug line (``<-``/``->``).
WIRE_LIMIT = 1024
#: Characters of one structured field value; values of a repeated field kept.
FIELD_LIMIT = 256
VALUES_LIMIT = 64

FieldValue = int | str | list[str]


def shown(value: object, limit: int = SHOWN_LIMIT, *, quoted: bool = True) -> str:
    """A client-supplied value as one log field: escaped (no forged lines), truncated.

    Strings are shown as :func:`ascii` shows them, quotes included unless
    ``quoted`` is false (for identifiers, which the registry has already
    restricted to letters, digits and ``-._#``, so only truncation applies);
    ``bytes`` (wire messages) as ``b'...'`` with their total size when cut;
    lists and dicts (a migrate's ``channels``) as the compact JSON the client
    sent, not a Python repr: JSON's own escapes leave nothing but printable
    ASCII (DEL escaped too), and :func:`ascii` on top would double every
    backslash the client sent.
    """
    if isinstance(value, bytes | bytearray):
        if len(value) <= limit:
            return repr(bytes(value))
        return f"{bytes(value[:limit])!r}... ({len(value)} bytes)"
    if isinstance(value, list | dict):
        text = json.dumps(value, separators=(",", ":"), default=str).replace("\x7f", "\\u007f")
        return text if len(text) <= limit else text[:limit] + "..."
    s = str(value)
    text = ascii(s if len(s) <= limit else s[:limit] + "...")
    return text if quoted else text[1:-1]


class Peer(Protocol):
    """What :func:`about` needs of a connection (``migblockd.connection.Connection``)."""

    @property
    def number(self) -> int: ...

    @property
    def owner(self) -> Owner | None: ...


def about(conn: Peer | None, **more: FieldValue | None) -> dict[str, Any]:
    """``extra=`` for a record about ``conn`` (and more: ``blocker_id=``...).

    The connection gives ``client`` (its number) and, when the kernel told us
    (``SO_PEERCRED``), ``peer_pid``, ``peer_uid`` and ``peer_gid``.  ``None``
    values are left out; strings are cut to :data:`FIELD_LIMIT` characters and
    lists to :data:`VALUES_LIMIT` values, so that a record stays small
    whatever a client sent.
    """
    fields: dict[str, FieldValue] = {}
    if conn is not None:
        fields["client"] = conn.number
        owner = conn.owner
        if owner is not None:
            fields["peer_pid"] = owner.pid
            fields["peer_uid"] = owner.uid
            fields["peer_gid"] = owner.gid
    for key, value in more.items():
        if isinstance(value, str):
            fields[key] = value[:FIELD_LIMIT]
        elif isinstance(value, list):
            fields[key] = [v[:FIELD_LIMIT] for v in value[:VALUES_LIMIT]]
        elif value is not None:
            fields[key] = value
    return {"fields": fields}

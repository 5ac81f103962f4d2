"""A message from QEMU that is not strict JSON, refused as garbage and named for what it is.

``qemu.qmp`` reads each message with Python's ``json``, which takes ``NaN``,
``Infinity`` and numbers past a double's range (``1e400`` becomes ``inf``): JSON
has no such values (RFC 8259, section 6), QEMU's parser takes no ``NaN`` or
``Infinity`` (``parse_keyword()``, ``qobject/json-parser.c``), and migblockd's
clients cannot be sent them (its encoder writes strict JSON only,
``migblockd/qmp/encoding.py``).  Taken in, such a
number failed later, deep in whatever relayed it: an event reached no client and
logged a traceback, a reply became an ``Internal error``.  The link reads QEMU's
messages as :class:`StrictMessage` instead, so that such a message is refused where
any other garbage is (``DeserializationError``): the library drops the connection,
and the link reconnects.

:func:`garbage` words a message the library could not take for the log line of that
loss (and the next commands' errors, until the link is up again), with as much of
the message as a log line can hold: the library's own words quote all of it, up to
the 64 MiB the link reads.
"""

from __future__ import annotations

import json
import math
from typing import Final

from qemu.qmp import Message
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import DeserializationError, UnexpectedTypeError

__all__ = ["SHOWN", "StrictMessage", "garbage", "shown"]

#: How much of a message the log line quotes.
SHOWN: Final = 60
DROPPED: Final = "migblockd dropped the connection"


class NotStrictJson(ValueError):
    """A number that strict JSON does not have."""


def _constant(name: str) -> object:
    # json calls it for NaN, Infinity and -Infinity, which are no JSON at all.
    raise NotStrictJson(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotStrictJson(f"{text} is out of a double's range")
    return number


class StrictMessage(Message):
    """A message of QEMU's, read as strict JSON (see the module doc)."""

    @classmethod
    def _deserialize(cls, data: bytes) -> dict[str, object]:
        try:
            obj = json.loads(data, parse_constant=_constant, parse_float=_finite)
        except (ValueError, RecursionError) as err:
            # ValueError: JSONDecodeError, NotStrictJson, bytes that are not UTF-8, an
            # integer of more digits than int() takes.  RecursionError: nested past
            # what the decoder recurses.  Each one is garbage as the library's is.
            raise DeserializationError("Failed to deserialize QMP message.", data) from err
        if not isinstance(obj, dict):
            raise UnexpectedTypeError("QMP message is not a JSON object.", obj)
        return obj


def shown(raw: bytes) -> str:
    """``raw``'s first :data:`SHOWN` bytes, for one line of the log."""
    return repr(raw[:SHOWN]) + (f"... ({len(raw)} bytes)" if len(raw) > SHOWN else "")


def garbage(exc: BaseException) -> str | None:
    """Why a message ``exc`` says the library could not take ended the connection,
    in one line; None when ``exc`` is no such failure."""
    if isinstance(exc, DeserializationError):
        cause = exc.__cause__
        what = (f"not strict JSON ({cause})" if isinstance(cause, NotStrictJson)
                else "not JSON")
        return f"QEMU sent a message that is {what}, {shown(exc.raw)}; {DROPPED}"
    if isinstance(exc, UnexpectedTypeError):
        text = json.dumps(exc.value).encode()  # its own values: JSON again
        return f"QEMU sent JSON that is not an object, {shown(text)}; {DROPPED}"
    if isinstance(exc, ProtocolError):  # a message of the wrong shape (qmp_client.py)
        msg = getattr(exc, "msg", None)
        quoted = f", {shown(bytes(msg))}" if isinstance(msg, Message) else ""
        return f"{' '.join(exc.error_message.split())}{quoted}; {DROPPED}"
    return None

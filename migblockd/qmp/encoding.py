"""Output: replies and events as strict JSON lines, in QEMU's layout.

QEMU ends every message with ``\\r\\n``, separates members with ``", "`` and
``": "``, writes ASCII only (everything else as ``\\uXXXX``, upper-case hex) and puts
``return`` before ``id`` and ``id`` before ``error`` (``monitor/qmp.c``).
Clients must not rely on member order, but matching it costs nothing.
Nothing here emits ``NaN`` or ``Infinity``: output is always strict JSON.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from migblockd.qmp.errors import NO_ID, QMPError, error_reply


def _not_json(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# Separators ", " and ": " are what QEMU emits ({"return": {}}); ASCII-only
# output escapes everything else as \uXXXX, as QEMU does; allow_nan=False
# keeps the output strict JSON.  json.dumps() with any non-default option
# builds a new encoder per call, so build one once -- the C one when present
# (it is what json.dumps uses too), which roughly halves the cost per reply.
_ENCODER: Final = json.JSONEncoder(allow_nan=False, default=_not_json)
_C_ENCODER: Final[Callable[[object, int], list[str]] | None] = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _not_json, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, False,
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)


def _upper_escapes(text: str) -> str:
    """``text``, JSON from Python's ASCII encoder, with its ``\\uXXXX`` escapes
    in upper-case hex as QEMU's ``json-writer.c`` prints them (``\\u%04X``).

    No Python call per escape: an id of 512 Ki "é" held the loop for 0.4 s
    matched one escape at a time.  A raw NUL is never in such text (controls
    are escaped), so it stands for an escaped backslash meanwhile: then every
    ``\\u`` left begins an escape (``\\\\u00e9`` is a backslash and the text
    ``u00e9``), and the four characters after it are its hex digits.
    """
    pieces = text.replace("\\\\", "\0").split("\\u")
    pieces[1:] = [p.upper() if len(p) == 4 else p[:4].upper() + p[4:] for p in pieces[1:]]
    return "\\u".join(pieces).replace("\0", "\\\\")


def encode_line(obj: object) -> bytes:
    """One output line: strict JSON + CRLF.

    Raises ValueError for NaN/infinity, TypeError for values JSON cannot
    represent, RecursionError for cyclic or absurdly deep values.
    """
    return (encode(obj) + "\r\n").encode("ascii")


def encode(obj: object) -> str:
    """Strict JSON text of ``obj`` (no line ending), QEMU's separators and escapes:
    ``json-writer.c`` prints ``\\u%04X``, upper-case hex, Python lower case."""
    text = "".join(_C_ENCODER(obj, 0)) if _C_ENCODER is not None else _ENCODER.encode(obj)
    return _upper_escapes(text) if "\\u" in text else text


class Encoded:
    """JSON text encoded ahead of time; a reply splices ``text`` in as it is.

    For answers that many clients ask for and that rarely change (the blocker
    list): a command returns an ``Encoded`` built from cached pieces instead
    of re-encoding the same values for every request.  ``text`` must be one
    strict JSON value.
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @classmethod
    def array(cls, items: Iterable[str]) -> Encoded:
        """The JSON array of already encoded ``items``."""
        return cls("[" + ", ".join(items) + "]")


class Parts:
    """One JSON value, encoded ahead of time in pieces to be written in order.

    For an answer too big to join (35 MB of blockers): a reply carries the
    pieces as they are, and the transport writes them one after the other.
    """

    __slots__ = ("pieces",)

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces


def timestamp(when: float) -> dict[str, int]:
    """QEMU's ``{"seconds": S, "microseconds": US}`` for wall time ``when``.

    Rounded to whole microseconds before splitting, so that 1.9999999 gives
    ``{2, 0}`` rather than ``{1, 1000000}``.
    """
    seconds, micro = divmod(round(when * 1_000_000), 1_000_000)
    return {"seconds": seconds, "microseconds": micro}


def encode_event(name: str, data: Mapping[str, Any] | Encoded, when: float) -> bytes:
    """One event line: ``{"timestamp": {...}, "event": ..., "data": ...}\\r\\n``.

    Members in the order QEMU writes them (its QDict's order for these three
    keys, the same for every event).  ``data`` is omitted when empty, as QEMU
    does for events without data (``monitor/monitor.c``); it may be
    :class:`Encoded` already.  Encode once and queue the same line for every
    client.
    """
    seconds, micro = divmod(round(when * 1_000_000), 1_000_000)
    head = (f'{{"timestamp": {{"seconds": {seconds}, "microseconds": {micro}}}, '
            f'"event": {encode(name)}')
    if type(data) is Encoded:
        return (head + f', "data": {data.text}}}\r\n').encode("ascii")
    if data:
        return (head + f', "data": {encode(data)}}}\r\n').encode("ascii")
    return (head + "}\r\n").encode("ascii")


def encode_return_parts(result: Parts, id_: object) -> list[bytes]:
    """:func:`encode_return` for a value in :class:`Parts`: the line, in pieces."""
    tail = b"}\r\n" if id_ is NO_ID else f", \"id\": {encode(id_)}}}\r\n".encode("ascii")
    return [b'{"return": ', *result.pieces, tail]


def encode_return(result: object, id_: object) -> bytes:
    """The success reply line, ``{"return": R, "id": I}``; no ``id`` when ``id_ is NO_ID``."""
    text = result.text if type(result) is Encoded else encode(result)
    if id_ is NO_ID:
        return f'{{"return": {text}}}\r\n'.encode("ascii")
    return f'{{"return": {text}, "id": {encode(id_)}}}\r\n'.encode("ascii")



def encode_error(error: QMPError, id_: object) -> bytes:
    """The error reply line, ``{"id": I, "error": {"class": C, "desc": D}}``."""
    try:
        return encode_line(error_reply(error, id_))
    except (ValueError, TypeError):  # pragma: no cover - ids come from our own parser
        return encode_line(error_reply(error))

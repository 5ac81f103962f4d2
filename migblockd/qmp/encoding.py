"""Output: replies and events as strict JSON lines, in QEMU's layout.

QEMU ends every message with ``\\r\\n``, separates members with ``", "`` and
``": "``, writes ASCII only (everything else as ``\\uXXXX``, upper-case hex) and puts
``return`` before ``id`` and ``id`` before ``error`` (``monitor/qmp.c``).
Clients must not rely on member order, but matching it costs nothing.
Nothing here emits ``NaN`` or ``Infinity``: output is always strict JSON.
"""

from __future__ import annotations

import codecs
import json
import json.encoder
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from migblockd.qmp.errors import NO_ID, QMPError, error_reply


def _not_json(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# Separators ", " and ": " are what QEMU emits ({"return": {}}); allow_nan=False
# keeps the output strict JSON.  json.dumps() with any non-default option
# builds a new encoder per call, so build one once -- the C one when present
# (it is what json.dumps uses too), which roughly halves the cost per reply.
# Non-ASCII is left as it is: _qemu_escapes() writes it as QEMU does, which
# Python's ASCII-only encoder does not (lower-case hex).
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=_not_json)
_C_ENCODER: Final[Callable[[object, int], list[str]] | None] = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _not_json, json.encoder.encode_basestring, None, ": ", ", ",
        False, False, False,
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)

#: json's escapes of control characters (``\u%04x``) that have a hex letter,
#: and QEMU's (``\u%04X``).
_CONTROLS: Final = tuple((f"\\u{c:04x}", f"\\u{c:04X}") for c in range(0x20)
                         if f"{c:04x}" != f"{c:04X}")
_UTF16: Final = "utf-16-le" if sys.byteorder == "little" else "utf-16-be"


def _unit_text(unit: int) -> str:
    """How QEMU writes a UTF-16 code unit of a string: printable ASCII as it is,
    anything else as ``\\u%04X`` (a character beyond the BMP is two units, so a
    surrogate pair, as QEMU writes it)."""
    return chr(unit) if 0x20 <= unit < 0x7F else f"\\u{unit:04X}"


class _Full(Exception):
    pass


class _Units(dict[int, str]):
    """:func:`_unit_text` of the units met so far, up to :data:`UNITS_KEPT` of
    them: a client could send every one there is, and that table would take
    8 MB."""

    def __missing__(self, unit: int) -> str:
        if len(self) >= UNITS_KEPT:
            raise _Full
        text = self[unit] = _unit_text(unit)
        return text


#: Code units whose text is kept between replies.
UNITS_KEPT: Final = 8192
_UNITS: Final = _Units()


def _units_text(text: str) -> str:
    """``text`` with every character but printable ASCII as QEMU escapes it."""
    units = array("H")
    units.frombytes(text.encode(_UTF16, "surrogatepass"))
    try:
        return "".join(map(_UNITS.__getitem__, units))
    except _Full:
        table = {unit: _unit_text(unit) for unit in set(units)}
        return "".join(map(table.__getitem__, units))


def _escape_run(exc: UnicodeError) -> tuple[str, int]:
    """The ASCII encoder's error handler: a run of other characters, escaped."""
    assert isinstance(exc, UnicodeEncodeError)
    return _units_text(exc.object[exc.start:exc.end]), exc.end


_ESCAPE_RUNS: Final = "migblockd-qemu-escapes"
codecs.register_error(_ESCAPE_RUNS, _escape_run)


def _qemu_escapes(text: str) -> str:
    """``text``, JSON from Python's encoder (non-ASCII left as it is), written
    as QEMU's ``json-writer.c`` writes strings: everything but printable ASCII
    as ``\\u%04X``, in upper-case hex.

    Python code runs per distinct character or per run of them, never per
    character: matched one escape at a time, an id of 512 Ki "é" held the
    loop for 0.4 s.

    * json's escapes of control characters are in lower case.  A raw NUL is
      never in its output, so it stands for an escaped backslash meanwhile:
      then every ``\\u`` left begins an escape (``\\\\u001a`` is a backslash
      and the text ``u001a``), and a ``str.replace`` for each of the nine with a
      hex letter that is there puts it in upper case.
    * Characters other than ASCII are looked up one UTF-16 code unit at a
      time in :class:`_Units` (``map`` over an ``array``), about 35 ns each.
      When they are few (an error quoting a megabyte of ASCII and one "é"),
      the ASCII encoder copies the rest and calls :func:`_escape_run` for each
      run.
    """
    if "\\u" in text:
        fixes = [pair for pair in _CONTROLS if pair[0] in text]
        if fixes:
            text = text.replace("\\\\", "\0")
            for lower, upper in fixes:
                text = text.replace(lower, upper)
            text = text.replace("\0", "\\\\")
    if "\x7f" in text:
        text = text.replace("\x7f", "\\u007F")
    if text.isascii():
        return text
    # At most one run per 64 characters: a Python call per run costs about as
    # much as 64 looked-up characters.
    if (len(text) - len(text.encode("ascii", "ignore"))) * 64 < len(text):
        return text.encode("ascii", _ESCAPE_RUNS).decode("ascii")
    return _units_text(text)


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
    if text.isascii() and "\\u" not in text and "\x7f" not in text:
        return text
    return _qemu_escapes(text)


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

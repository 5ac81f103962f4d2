"""QEMU's wording for malformed JSON, and the strict parse of one message.

QEMU's JSON parser (``qobject/json-lexer.c``, ``qobject/json-parser.c``,
``qobject/json-streamer.c``) answers bad input with ``JSON parse error, ...``
and a handful of limit messages.  migblockd parses each message with Python's
``json`` on its exact slice and, only on the error path, maps Python's
messages onto QEMU's.

Python's ``json`` would accept ``NaN``, ``Infinity`` and turn ``1e400`` into
``inf``, none of which can be written back as JSON (QEMU echoes ``1e400`` as
bare ``inf``).  :func:`decode_message` rejects them as parse errors
(``invalid keyword 'NaN'``, ``number out of range``), so that what the daemon
later echoes (an ``id``) is always strict JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

# QEMU's wording (qobject/json-streamer.c, qobject/json-parser.c).
TOKEN_SIZE_EXCEEDED: Final = "JSON token size limit exceeded"
TOKEN_COUNT_EXCEEDED: Final = "JSON token count limit exceeded"
NESTING_EXCEEDED: Final = "JSON nesting depth limit exceeded"
PARSE_ERROR_PREFIX: Final = "JSON parse error, "

@dataclass(frozen=True, slots=True)
class ParseError:
    """A framing or syntax error in place of a message; answered without ``id``."""

    desc: str


def _viable(text: str) -> bool:
    """Whether ``text`` can still begin a valid JSON value."""
    try:
        _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text.rstrip())
    except (_Reject, ValueError, RecursionError):
        return False
    return True


SINGLE_QUOTE: Final = PARSE_ERROR_PREFIX + "single-quoted strings are not supported"


def stray(data: bytes) -> str:
    shown = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in data[:8])
    return f"{PARSE_ERROR_PREFIX}stray '{shown}'"


# --------------------------------------------------------------------------- parsing


class _Reject(Exception):
    """Raised from json's hooks to refuse input that Python would accept."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Reject(PARSE_ERROR_PREFIX + "duplicate key")
    return obj


def _parse_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf (1e400); NaN cannot come from a JSON number
        raise _Reject(PARSE_ERROR_PREFIX + "number out of range")
    return value


def _parse_constant(name: str) -> object:
    raise _Reject(f"{PARSE_ERROR_PREFIX}invalid keyword '{name}'")


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_float=_parse_float, parse_constant=_parse_constant
)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_message(data: bytes | bytearray) -> object:
    """Parse one complete message: its JSON value, or a :class:`ParseError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        desc = describe_error(text)
        if desc is None:
            desc = PARSE_ERROR_PREFIX + "invalid UTF-8 sequence in string"
        return ParseError(desc)
    try:
        value, end = _DECODER.raw_decode(text)
    except (ValueError, _Reject, RecursionError):
        return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
    if end != len(text):
        return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
    # json decodes a lone \uD800 escape to a lone surrogate, which no UTF-8
    # encoder (logging, the shell) can handle later; QEMU refuses it too.
    if "\\u" in text:
        bad = _find_lone_surrogate(value)
        if bad is not None:
            escape = f"\\u{ord(bad):04X}"
            return ParseError(f"{PARSE_ERROR_PREFIX}{escape} is not a valid Unicode character")
    return value


def _find_lone_surrogate(value: object) -> str | None:
    if isinstance(value, str):
        m = _LONE_SURROGATE.search(value)
        return m.group() if m else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_lone_surrogate(key) or _find_lone_surrogate(item)
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _find_lone_surrogate(item)
            if found:
                return found
    return None


_KEYWORD = re.compile(r"[A-Za-z]+")
_CONTAINER_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_VALUE_END = frozenset("}],:")


def describe_error(data: str | bytes) -> str | None:
    """QEMU's wording for why ``data`` is not one JSON value; None if it is one.

    Used only on the error path, so it may take its time: it re-parses and maps
    Python's ``json`` messages onto QEMU's (``qobject/json-parser.c``).
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        value, end = _DECODER.raw_decode(text)
    except _Reject as exc:
        return exc.desc
    except RecursionError:
        return NESTING_EXCEEDED
    except json.JSONDecodeError as exc:
        return PARSE_ERROR_PREFIX + _qemu_reason(exc.msg, text, exc.pos)
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        return PARSE_ERROR_PREFIX + "number out of range"
    if end != len(text):
        kw = _KEYWORD.match(text)
        if kw:
            return f"{PARSE_ERROR_PREFIX}invalid keyword '{kw.group()}'"
        return stray(text[:end + 1].encode("utf-8", "replace"))
    del value
    return None


def _qemu_reason(msg: str, text: str, pos: int) -> str:
    kw = _KEYWORD.match(text, pos)
    if msg.startswith(("Expecting value", "Illegal trailing comma")):
        return f"invalid keyword '{kw.group()}'" if kw else "expecting value"
    if msg.startswith("Expecting property name"):
        if kw:
            return f"invalid keyword '{kw.group()}'"
        if pos >= len(text) or text[pos] in _VALUE_END:
            return "expecting value"  # QEMU parses the key as a value first
        return "key is not a string in object"
    if msg.startswith("Expecting ':'"):
        return "missing : in object pair"
    if msg.startswith("Expecting ','"):
        inner = _innermost_container(text, pos)
        return "expected separator in dict" if inner == "{" else "expected separator in list"
    if msg.startswith("Invalid \\uXXXX"):
        start = pos - 1 if pos and text[pos - 1] == "\\" else pos
        return f"{text[start:start + 6]} is not a valid Unicode character"
    if msg.startswith("Invalid \\escape"):
        return "invalid escape sequence in string"
    if msg.startswith("Invalid control character"):
        return stray(text[pos : pos + 1].encode())[len(PARSE_ERROR_PREFIX) :]
    return msg[:1].lower() + msg[1:]


def _innermost_container(text: str, pos: int) -> str:
    stack: list[str] = []
    for m in _CONTAINER_TOKENS.finditer(text, 0, pos):
        token = m.group()
        if token in "[{":
            stack.append(token)
        elif token in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""




def prefix_error(buf: bytearray, start: int, lf: int) -> tuple[str, int] | None:
    """The error in ``buf[start:lf]``, the complete lines of an unfinished message.

    None when those lines are a valid beginning of a JSON value; else QEMU's
    desc and the offset in ``buf`` from which the rest of the message is
    skipped (where the error was found, or the line feed of the first line a
    line-by-line check would have refused).
    """
    text = buf[start:lf].decode("utf-8", "replace")
    try:
        _DECODER.raw_decode(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            return None
        desc = PARSE_ERROR_PREFIX + _qemu_reason(exc.msg, text, exc.pos)
        return desc, start + len(text[: exc.pos].encode("utf-8", "replace"))
    except (_Reject, ValueError, RecursionError):
        pass
    else:  # pragma: no cover - a complete value would have ended the scan
        return None
    # Refused by a hook (NaN, a duplicate key, ...), which knows no position:
    # the first line feed whose prefix is refused is where a line-by-line
    # check would have caught it.  Viability is monotonic (a prefix refused at
    # one line feed is refused at every later one), so a binary search finds
    # that line feed with a logarithmic number of parses: trying them one by
    # one costs a parse per line, quadratic in the window, and a peer could
    # stall the whole daemon for seconds with a few hundred KiB of such lines.
    desc_or_none = describe_error(text)
    feeds: list[int] = []
    at = buf.find(b"\n", start, lf)
    while 0 <= at < lf:
        feeds.append(at)
        at = buf.find(b"\n", at + 1, lf)
    lo, hi = 0, len(feeds)  # feeds[hi:] are refused, feeds[:lo] viable
    while lo < hi:
        mid = (lo + hi) // 2
        if _viable(buf[start : feeds[mid]].decode("utf-8", "replace")):
            lo = mid + 1
        else:
            hi = mid
    skip = feeds[lo] if lo < len(feeds) else lf
    return desc_or_none or PARSE_ERROR_PREFIX + "expecting value", skip

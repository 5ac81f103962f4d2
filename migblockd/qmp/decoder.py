"""Python's ``json`` decoder fitted to QEMU's parser: what it refuses, and when.

Python's ``json`` takes what QEMU's parser (``qobject/json-parser.c``) refuses:
``NaN`` and ``Infinity``, ``1e400`` (as ``inf``), a repeated key, ``0e5`` (QEMU's
lexer ends that number at the 0), ``\\'`` as no escape.  Its hooks here refuse
each with :class:`Reject`, and :data:`DECODER` is the decoder with them.

QEMU's parser also meets some errors sooner than Python does: it refuses a
repeated key as soon as that pair's value is read, where Python sees the keys
only once the object is closed (:func:`duplicate_before`), and it says which
container it is in (:func:`innermost_container`).  The wording of an error is
:mod:`migblockd.qmp.wording`'s; this module knows only where the parse stops.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from migblockd.qmp.characters import ESCAPE
from migblockd.qmp.lexer import PARSE_ERROR_PREFIX, keyword_error, stray

__all__ = [
    "DECODER",
    "OUT_OF_RANGE",
    "SAME_CHARACTER",
    "SAME_LENGTH",
    "STRING",
    "STRING_OR_REST",
    "ZERO_EXPONENT",
    "Reject",
    "apostrophes",
    "duplicate_before",
    "finite_numbers",
    "finite_numbers_bytes",
    "innermost_container",
    "read_on",
]


class Reject(Exception):
    """Raised from json's hooks to refuse input that Python would accept."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Reject(PARSE_ERROR_PREFIX + "duplicate key")
    return obj


#: Raised for a number with an exponent after a bare leading zero (``0e5``),
#: which Python reads; QEMU's lexer ends the number at the 0 and reads a
#: keyword, and its parser then wants a separator.  The hook knows no
#: position, so :func:`migblockd.qmp.wording.describe_error` finds it.
ZERO_EXPONENT: Final = "zero exponent"


OUT_OF_RANGE: Final = PARSE_ERROR_PREFIX + "number out of range"


def _parse_float(text: str) -> float:
    if text[text[0] == "-"] == "0" and text[1 + (text[0] == "-")] in "eE":
        raise Reject(ZERO_EXPONENT)
    value = float(text)
    if value - value != 0.0:  # inf (1e400); NaN cannot come from a JSON number
        raise Reject(OUT_OF_RANGE)
    return value


def _parse_constant(name: str) -> object:
    if name.startswith("-"):  # QEMU's lexer stops at the letter after the sign
        raise Reject(stray(name[:2].encode()))
    raise Reject(PARSE_ERROR_PREFIX + keyword_error(name))


DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_float=_parse_float, parse_constant=_parse_constant
)
#: ``\\'`` as an escape of the same length that Python takes: where only the
#: positions of errors matter, and the client's own text is quoted.
SAME_LENGTH: Final = "\\/"
#: ``\\'`` as the escape of the very character: where keys must compare as
#: QEMU's parser compares them (``"it\\'s"`` and ``"it's"`` are one key).
SAME_CHARACTER: Final = "\\u0027"


def apostrophes(text: str, escape: str) -> str:
    """``text`` with each ``\\'`` escape written as ``escape``: QEMU's parser takes
    ``\\'`` for an apostrophe in any string (``json-parser.c``, ``parse_string()``);
    Python's json does not."""
    if "\\'" not in text:
        return text
    # ESCAPE takes the escapes left to right: in "\\\\'" the apostrophe is not escaped.
    return ESCAPE.sub(lambda m: escape if m.group() == "\\'" else m.group(), text)


#: A whole string, as a pattern to build others with.  Unrolled: a run of
#: ordinary characters is one step, and the match keeps no state to backtrack
#: into (``"(?:[^"\\]|\\.)*"`` keeps some for every character: 150 MB for a
#: 1 MiB string).  Each character of a string is either ordinary or taken by the
#: escape before it, so there is one way to read it, and the possessive form
#: matches what the plain one does.
STRING: Final = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
#: A string, or one left open (the text ends in it): to the end of the text.  A
#: search that failed at a string left open would try again at each quote in it,
#: escaped ones too, each time reading on to its end: quadratic time, seconds of
#: the only thread for 32 KiB of \".  (With the flag ``(?s)``.)
STRING_OR_REST: Final = r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)'
_CONTAINER_TOKENS: Final = re.compile(rf"(?s){STRING_OR_REST}|[\[\]{{}}]")

#: A number outside strings (a string is skipped whole, one left open too).
_NUMBER: Final = r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][-+]?[0-9]++)?"
_STRING_OR_NUMBER: Final = re.compile(rf"(?s){STRING_OR_REST}|{_NUMBER}")
_STRING_OR_NUMBER_BYTES: Final = re.compile(rf"(?s){STRING_OR_REST}|{_NUMBER}".encode())


def _finite_number(token: str) -> str:
    if token[0] == '"' or float(token) - float(token) == 0.0:
        return token
    return "0." + "0" * (len(token) - 2)  # "1e309" is the shortest infinity


def finite_numbers(text: str) -> str:
    """``text`` with each number QEMU's parser reads as infinity (``1e400``, and an
    integer past a double's range, which Python refuses past 4300 digits) written
    as a finite one of the same length.  QEMU's parser goes on past such a number,
    so the error it finds in the message, if any, is elsewhere."""
    return _STRING_OR_NUMBER.sub(lambda m: _finite_number(m.group()), text)


def _read_on_float(text: str) -> float:
    if text[text[0] == "-"] == "0" and text[1 + (text[0] == "-")] in "eE":
        raise Reject(ZERO_EXPONENT)
    return float(text)  # inf too: QEMU's parser reads on past it


#: :data:`DECODER`, but taking a number out of a double's range (``1e400``) as
#: QEMU's parser takes it; and with ``float`` for ``int``, an integer past 4300
#: digits too (``int`` refuses it; ``float`` costs a call for each integer).
_READ_ON: Final = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_float=_read_on_float,
    parse_constant=_parse_constant)
_READ_ON_LONG: Final = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_float=_read_on_float, parse_int=float,
    parse_constant=_parse_constant)


def read_on(text: str) -> None:
    """``DECODER.raw_decode(text)``, reading on past a number out of a double's
    range as QEMU's parser does: for where errors are, not for the value.

    A parse with other hooks, not a rewrite of the text (:func:`finite_numbers`):
    the complete lines of an unfinished message are read at each line feed, and
    a Python call for each of their numbers and strings made 4 KiB of ``1,``
    lines after ``1e400`` cost most of a second of the only thread."""
    for decoder in (DECODER, _READ_ON):
        try:
            decoder.raw_decode(text)
        except Reject as exc:
            if exc.desc != OUT_OF_RANGE:
                raise
        except json.JSONDecodeError:
            raise
        except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
            _READ_ON_LONG.raw_decode(text)
            return
        else:
            return


def finite_numbers_bytes(data: bytes) -> bytes:
    """:func:`finite_numbers` of what is to be read as UTF-8."""
    return _STRING_OR_NUMBER_BYTES.sub(
        lambda m: _finite_number(m.group().decode("ascii")).encode("ascii")
        if m.group()[:1] != b'"' else m.group(), data)


def innermost_container(text: str, pos: int) -> str:
    stack = _open_containers(text, pos)
    return text[stack[-1]] if stack else ""


def _open_containers(text: str, pos: int) -> list[int]:
    """Where the brackets still open at ``pos`` are, outermost first."""
    stack: list[int] = []
    for m in _CONTAINER_TOKENS.finditer(text, 0, pos):
        token = m.group()
        if token in "[{":
            stack.append(m.start())
        elif token in "]}" and stack:
            stack.pop()
    return stack


#: What tells a pair from the next in an object: strings skipped whole.
_PAIR_TOKENS: Final = re.compile(rf"(?s){STRING_OR_REST}|[\[\]{{}},]")


#: Every string's text, and (group 2) whether a colon follows it: a key.  Every
#: string, not only keys, so that a search never begins inside one.
_STRINGS: Final = re.compile(r'(?s)"([^"\\]*+(?:\\.[^"\\]*+)*+)(?:("\s*+:)|"|\\?\Z)')


def duplicate_before(text: str, pos: int) -> bool:
    """Whether an object or array still open at ``pos`` repeats a key in the
    pairs or elements it has read whole.  QEMU's parser refuses a repeated key
    as soon as it has read the pair's value (``parse_pair()``), before whatever
    error comes after it; Python's json sees the keys only once the object is
    closed.  A container holding the one the error is in is still reading its
    last pair's value or element: that one is not whole."""
    keys = [m.group(1) for m in _STRINGS.finditer(text, 0, pos) if m.group(2)]
    if len(set(keys)) == len(keys) and not any("\\" in key for key in keys):
        return False  # no key written twice, nor escaped: none is repeated
    opened = _open_containers(text, pos)
    ends = [*opened[1:], pos] if opened else []
    for start, end in zip(opened, ends, strict=True):
        # An array's elements before its last comma are whole too: a repeated
        # key in one of them was met before the error (parse_array() reads
        # each element as it comes).
        closer = "}" if text[start] == "{" else "]"
        pairs = text[start:end]
        depth, comma = 0, 0
        for m in _PAIR_TOKENS.finditer(pairs):
            token = m.group()
            depth += token in "[{"
            depth -= token in "]}"
            if token == "," and depth == 1:
                comma = m.start()
        # The innermost may end with a whole pair; else the pairs before its last comma.
        for whole in ([pairs] if end == pos else []) + ([pairs[:comma]] if comma else []):
            try:
                read_on(apostrophes(whole + closer, SAME_CHARACTER))
            except Reject as exc:
                if exc.desc == PARSE_ERROR_PREFIX + "duplicate key":
                    return True
            except (ValueError, RecursionError):
                continue
            break
    return False

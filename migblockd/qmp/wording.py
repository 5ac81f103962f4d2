"""QEMU's wording for malformed JSON, and the strict parse of one message.

QEMU's JSON parser (``qobject/json-lexer.c``, ``qobject/json-parser.c``,
``qobject/json-streamer.c``) answers bad input with ``JSON parse error, ...``
and a handful of limit messages.  migblockd parses each message with Python's
``json`` on its exact slice and, only on the error path, maps Python's
messages onto QEMU's.

Python's ``json`` would accept ``NaN``, ``Infinity`` and turn ``1e400`` into
``inf``, none of which can be written back as JSON (QEMU echoes ``1e400`` as
bare ``inf``).  :func:`decode_message` rejects them as parse errors
(``stray 'N'``, as QEMU's lexer has it, ``number out of range``), so that what the daemon
later echoes (an ``id``) is always strict JSON.
"""

from __future__ import annotations

import collections
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
        _DECODER.raw_decode(_apostrophes(text, _SAME_LENGTH))
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text.rstrip())
    except (_Reject, ValueError, RecursionError):
        return False
    return True


SINGLE_QUOTE: Final = PARSE_ERROR_PREFIX + "single-quoted strings are not supported"


#: Bytes that are not UTF-8 decode to lone surrogates and encode back to
#: themselves: positions and stray bytes stay the client's.
_RAW: Final = "surrogateescape"


def stray(token: bytes) -> str:
    """QEMU's error for the token its lexer could not go on with, as it prints it:
    raw (JSON escapes control characters), cut at a NUL (it is a C string), and
    what is not a character as U+FFFD (see :func:`as_qemu_prints`)."""
    shown = as_qemu_prints(token.split(b"\0", 1)[0])
    return f"{PARSE_ERROR_PREFIX}stray '{shown}'"


_ESCAPED_BYTES: Final = re.compile("[\udc80-\udcff]+")
#: What ``mod_utf8_codepoint()`` (``util/unicode.c``) reads as one sequence that is not
#: a character: a lead byte with the continuation bytes it has (up to those it
#: wants; 0xF8-0xFD lead five- and six-byte forms), or a byte no sequence starts with.
_BAD_SEQUENCE: Final = re.compile(
    rb"[\xc0-\xdf][\x80-\xbf]?|[\xe0-\xef][\x80-\xbf]{0,2}|[\xf0-\xf7][\x80-\xbf]{0,3}"
    rb"|[\xf8-\xfb][\x80-\xbf]{0,4}|[\xfc-\xfd][\x80-\xbf]{0,5}|[\x80-\xbf\xfe\xff]")
#: Unicode's 66 noncharacters, which QEMU takes for no character either.
NONCHARACTERS: Final = "\ufdd0-\ufdef" + "".join(
    chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
_NONCHARACTER: Final = re.compile(f"[{NONCHARACTERS}]")


def as_qemu_prints(raw: bytes) -> str:
    """``raw`` as QEMU's JSON writer prints a string (``qobject/json-writer.c``,
    ``quoted_str()``): each sequence ``mod_utf8_codepoint()`` cannot read as a
    character (not UTF-8, a surrogate, a noncharacter, overlong) as one U+FFFD,
    but C0 80, modified UTF-8's U+0000, as U+0000.  So a reply is valid UTF-8
    and says what QEMU's says."""
    text = raw.decode("utf-8", _RAW)
    if text.isascii():
        return text
    return _NONCHARACTER.sub("\ufffd", _ESCAPED_BYTES.sub(_bad_bytes, text))


def _bad_bytes(m: re.Match[str]) -> str:
    # Python's decoder leaves every valid character alone, so a run of bytes it
    # refused starts and ends where QEMU's sequences do.
    raw = m.group().encode("utf-8", _RAW)
    return "\0".join(_BAD_SEQUENCE.sub(b"\xef\xbf\xbd", part).decode("utf-8")
                     for part in raw.split(b"\xc0\x80"))


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
    if name.startswith("-"):  # QEMU's lexer stops at the letter after the sign
        raise _Reject(stray(name[:2].encode()))
    raise _Reject(PARSE_ERROR_PREFIX + _keyword(name))


def _keyword(word: str) -> str:
    """QEMU's error for a run of letters where a value belongs: its lexer's
    keywords are lower case, so an upper-case letter is a stray character
    (``NaN`` is ``stray 'N'``, ``xY`` is ``stray 'Y'``)."""
    upper = next((c for c in word if c.isupper()), None)
    return f"stray '{upper}'" if upper is not None else f"invalid keyword '{word}'"


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_pairs, parse_float=_parse_float, parse_constant=_parse_constant
)
#: ``\\'`` as an escape of the same length that Python takes: where only the
#: positions of errors matter, and the client's own text is quoted.
_SAME_LENGTH: Final = "\\/"


def _apostrophes(text: str, escape: str) -> str:
    """``text`` with each ``\\'`` escape written as ``escape``: QEMU's parser takes
    ``\\'`` for an apostrophe in any string (``json-parser.c``, ``parse_string()``);
    Python's json does not."""
    if "\\'" not in text:
        return text
    # _ESCAPE takes the escapes left to right: in "\\\\'" the apostrophe is not escaped.
    return _ESCAPE.sub(lambda m: escape if m.group() == "\\'" else m.group(), text)


#: C0 80, and the escapes before it (so that a backslash does not escape it).
_MODIFIED_NUL: Final = re.compile(rb"\\[\s\S]|\xc0\x80")


def _nul_escape(m: re.Match[bytes]) -> bytes:
    return b"\\u0000" if m.group() == b"\xc0\x80" else m.group()


def decode_message(data: bytes | bytearray) -> object:
    """Parse one complete message: its JSON value, or a :class:`ParseError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", _RAW)
        # Its lexer's error first: C0 80 is a character only in a string.
        lexical = _first_lexical_error(text)
        if lexical is None and b"\xc0\x80" in data:
            # Modified UTF-8's U+0000, which QEMU takes in a string
            # (mod_utf8_codepoint(), util/unicode.c): as the escape json takes.
            escaped = _MODIFIED_NUL.sub(_nul_escape, bytes(data))
            value = decode_message(escaped) if escaped != data else None
            if value is not None and (not isinstance(value, ParseError) or _is_utf8(escaped)):
                return value  # its error is the message's, C0 80 being a character
        return ParseError(lexical or _bad_utf8(text, exc.start) or describe_error(text)
                          or PARSE_ERROR_PREFIX + _BAD_UTF8)
    parsed = _apostrophes(text, "\\u0027") if "\\'" in text else text
    try:
        value, end = _DECODER.raw_decode(parsed)
    except _Reject as exc:  # the parse itself is exact: "it\\'s" and "it's" are one key
        return ParseError(_first_lexical_error(text) or exc.desc)
    except (ValueError, RecursionError):
        return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
    if end != len(parsed):
        return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
    # json takes a lone surrogate (\uD800, which no UTF-8 encoder can handle
    # later) and noncharacters (\uFFFF, or as UTF-8); QEMU refuses them.
    if ("\\u" in text and _SUSPECT_ESCAPE.search(text)) or not text.isascii():
        desc = _not_a_character(text)
        if desc is not None:
            return ParseError(PARSE_ERROR_PREFIX + desc)
    return value


_BAD_UTF8: Final = "invalid UTF-8 sequence in string"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bad_utf8(text: str, first: int) -> str | None:
    """QEMU's error for the string with the first byte that is not UTF-8, at
    ``first``, if its parser gets that far: nothing before the string is wrong."""
    before = _BEFORE_OPEN_STRING.match(text, 0, first)
    if before is None or before.end() >= first or not _viable(text[: before.end()]):
        return None
    # An escape before it in the string, which QEMU reads first, may be the error.
    return None if "\\" in text[before.end() : first] else PARSE_ERROR_PREFIX + _BAD_UTF8


#: Every escape in a JSON text, in order (``\\\\`` is one, so ``\\\\u`` is none).
_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|.)", re.DOTALL)


#: A ``\\u`` escape that may be of a surrogate or a noncharacter (a pair beyond the
#: BMP begins with a surrogate); a cheap test before the exact one.
_SUSPECT_ESCAPE: Final = re.compile(r"\\u(?:[dD][89a-fA-F]|[fF][dDfF])")
#: Those whole, each where an escape begins (after any escaped backslashes: in
#: ``\\\\uffff`` the ``u`` is text).
_SUSPECT_ONLY: Final = re.compile(
    r"(?<!\\)(?:\\\\)*+(\\u(?:[dD][89a-fA-F]|[fF][dDfF])[0-9a-fA-F]{2})")


def _not_a_character(text: str) -> str | None:
    """What QEMU's ``parse_string()`` (``json-parser.c``) says about the first
    string content of a parsed ``text`` that is no character, if any: a
    noncharacter written as UTF-8 is an ``invalid UTF-8 sequence in string``
    (``mod_utf8_codepoint()``, ``util/unicode.c``); an escape of a lone
    surrogate or of a noncharacter ``is not a valid Unicode character``, shown
    as the client wrote it (a pair of escapes read as one, both)."""
    raw = _NONCHARACTER.search(text)
    found = raw.start() if raw is not None else len(text)
    # Only the escapes that may be no character: this runs on every request that
    # is not ASCII, and a loop over all its escapes (\n, \", \u0041) cost more
    # than the rest of its decoding.
    if _SUSPECT_ESCAPE.search(text, 0, found) is None:
        return None if raw is None else "invalid UTF-8 sequence in string"
    escapes = _SUSPECT_ONLY.finditer(text, 0, found)
    for m in escapes:
        cp = _code_point(m.group(1))
        start, end = m.start(1), m.end()
        if 0xD800 <= cp <= 0xDBFF and text.startswith("\\u", end):
            trailing = _ESCAPE.match(text, end)
            low = _code_point(trailing.group()) if trailing is not None else -1
            if not 0xDC00 <= low <= 0xDFFF:
                return f"{text[start:end]} is not a valid Unicode character"
            cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
            end += 6
            next(escapes, None)  # the trailing one, taken
        if cp >= 0 and not _is_character(cp):
            return f"{text[start:end]} is not a valid Unicode character"
    return None if raw is None else "invalid UTF-8 sequence in string"


def _is_character(cp: int) -> bool:
    """``is_valid_codepoint()`` of ``util/unicode.c``."""
    return not (0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE)


_KEYWORD = re.compile(r"[A-Za-z]+")
_LOWER = re.compile(r"[a-z]+")
#: QEMU's lexer (qobject/json-lexer.c) on numbers: state -> {character class: next
#: state}; the states in _NUMBER_ENDS may end a number, the others may not, and a
#: character with no transition there is a lexical error (``stray`` of the token
#: so far, that character included).  "bad" is a second digit after a leading 0.
_NUMBER: Final[dict[str, dict[str, str]]] = {
    "start": {"-": "neg", "0": "zero", "1": "int"},
    "neg": {"0": "zero", "1": "int"},
    "zero": {"0": "bad", "1": "bad", ".": "dot", "e": "e"},
    "int": {"0": "int", "1": "int", ".": "dot", "e": "e"},
    "dot": {"0": "frac", "1": "frac"},
    "frac": {"0": "frac", "1": "frac", "e": "e"},
    "e": {"+": "sign", "-": "sign", "0": "exp", "1": "exp"},
    "sign": {"0": "exp", "1": "exp"},
    "exp": {"0": "exp", "1": "exp"},
}
_NUMBER_ENDS: Final = frozenset({"zero", "int", "frac", "exp"})
#: What may start a token: anything else is a stray character to QEMU's lexer.
_TOKEN_START: Final = frozenset("{}[]:,\"'-0123456789")


def _number_class(c: str) -> str:
    if c == "0":
        return "0"
    if "1" <= c <= "9":
        return "1"
    return "e" if c in "eE" else c


def _lexical_error(text: str, pos: int) -> str | None:
    """QEMU's lexer error for the token that the parse failed in at ``pos``, if
    its lexer stops there rather than its parser: a keyword run on (``truex``),
    a number cut short (``1.}``, ``1e}``, ``01``, ``-}``), a character no token
    starts with (``+``, ``.``)."""
    if pos >= len(text):
        return None
    start = pos
    while start and text[start - 1] in "0123456789.eE+-":
        start -= 1
    while start < pos and text[start] not in "-0123456789":
        start += 1  # the run began inside a keyword ("true" ends in e)
    # Lex as QEMU does from the run's start: a whole number may end before
    # ``pos``, and the next token begin there ("1.5." is 1.5, then ".").
    while start < pos or (start == pos and text[pos] in "-0123456789"):
        end = _number_error(text, start)
        if isinstance(end, str):
            return end
        if end > pos:
            return None  # a whole number: what follows is the parser's error
        if text[end] not in "-0123456789":
            if end == pos:
                break  # the failing character starts the next token: as below
            return None if text[end].isalpha() else _stray_char(text[end])
        start = end
    c = text[pos]
    if c.isascii() and c.isalpha():
        begin = pos
        while begin and text[begin - 1].isascii() and text[begin - 1].isalpha():
            begin -= 1
        kw = _KEYWORD.match(text, begin)
        return _keyword(kw.group()) if begin < pos and kw else None
    if c in _TOKEN_START or c.isspace():
        return None
    return _stray_char(c)


def _number_error(text: str, start: int) -> str | int:
    """The lexer's error in the number at ``start``, or where the number ends."""
    state = "start"
    for i in range(start, len(text)):
        following = _NUMBER[state].get(_number_class(text[i]))
        if following is None:
            return i if state in _NUMBER_ENDS else _stray_text(text[start:i + 1])
        if following == "bad":
            return _stray_text(text[start:i + 1])
        state = following
    return len(text)


def first_token_end(token: bytes) -> int | None:
    """Where QEMU's lexer ends the first token of ``token``, a run of bytes with
    no delimiter, if that token is a whole number or a run of lower-case
    letters cut from more (``12x`` is 12, then ``x``; ``xY`` is the keyword
    ``x``, then ``Y``); else None.  At the top level QEMU's parser takes each
    token as it ends, so each is a message of its own."""
    text = token.decode("utf-8", _RAW)
    if text[:1] and text[0] in "-0123456789":
        end = _number_error(text, 0)
        return end if isinstance(end, int) and 0 < end < len(text) else None
    run = _LOWER.match(text)  # the lexer's keywords are lower case
    if run is not None:
        end = run.end()
        return end if end < len(text) else None
    return None


def lexer_waits(buf: bytes | bytearray, start: int, end: int) -> bool:
    """Whether QEMU's lexer, having read ``buf[start:end]`` (a run of bytes with no
    delimiter, outside any object), waits for what follows before it says
    anything: the run is a keyword so far (lower-case letters) or a number that
    may go on.  Otherwise its first token is over (``12x``) or it has already
    failed (``@``, ``01``, a byte that is not ASCII), and QEMU answers at once."""
    # Asked again at each read while a long token arrives: one regular
    # expression (_NUMBER's states that are no error), not a loop per character.
    return _WAITING.fullmatch(buf, start, end) is not None


#: A keyword so far, or a number so far in one of _NUMBER's states.
_WAITING: Final = re.compile(
    rb"[a-z]++"
    rb"|-?+(?:(?:0|[1-9][0-9]*+)(?:\.(?:[0-9]++(?:[eE][-+]?+[0-9]*+)?+)?+|[eE][-+]?+[0-9]*+)?+)?+")
_NUMBER_START: Final = frozenset("-0123456789")


def _stray_char(c: str) -> str:
    # QEMU's lexer reads bytes: the first byte of a character is the stray one.
    return stray(c.encode("utf-8", _RAW)[:1])[len(PARSE_ERROR_PREFIX):]


def _stray_text(token: str) -> str:
    return stray(token.encode("utf-8", _RAW))[len(PARSE_ERROR_PREFIX):]


#: Everything up to the opening quote of a string left open (complete strings
#: and what is outside strings).
_BEFORE_OPEN_STRING = re.compile(r'(?:[^"]++|"(?:[^"\\]|\\.)*+")*+')
_CONTAINER_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_VALUE_END = frozenset("}],:")


#: What QEMU's lexer (``qobject/json-lexer.c``) refuses in a string: control
#: characters and the bytes 0xFE, 0xFF (here as the surrogates they decode to).
_NOT_IN_STRING = "\\x00-\\x1f\\udcfe\\udcff"
#: A run of whole tokens as QEMU's lexer reads them.
_TOKENS: Final = re.compile(
    r"(?:([ \t\r\n]+|[{}\[\]:,]|[a-z]+"
    rf'|"(?:[^"\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*"'
    rf"|'(?:[^'\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*'"
    # a number the lexer would not take on with a "." "e" or digit after it
    r"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?![.eE0-9])))*+")
#: A string token as far as QEMU's lexer takes it.
_STRING_SO_FAR: Final = {
    quote: re.compile(rf"{quote}(?:[^{quote}\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*")
    for quote in "\"'"}


def _first_lexical_error(text: str) -> str | None:
    """QEMU's error for the first token of ``text`` its lexer cannot read, if any.

    QEMU lexes a message as it arrives and parses it only once it is complete,
    so a lexical error anywhere in a message is what QEMU reports, before any
    error of its parser (``{"a": x, "b": 1.}`` is ``stray '1.}'``, not
    ``invalid keyword 'x'``).  A token still open at the end is no error yet.
    """
    pos = 0
    while True:
        m = _TOKENS.match(text, pos)
        assert m is not None  # the pattern matches the empty string
        pos = m.end()
        if pos == len(text):
            return None
        c = text[pos]
        if c not in _NUMBER_START:
            break
        # A number the pattern would not end where it did: lex it as QEMU does.
        end = _number_error(text, pos)
        if isinstance(end, str):
            return PARSE_ERROR_PREFIX + end
        if end == len(text):
            return None
        pos = end  # it ended at the byte after it, which begins the next token
    if c in _STRING_SO_FAR:
        bad = _STRING_SO_FAR[c].match(text, pos)
        assert bad is not None
        end = bad.end()
        end += end < len(text) and text[end] == "\\"  # the byte after "\\" is the bad one
        return None if end >= len(text) else PARSE_ERROR_PREFIX + _stray_text(text[pos : end + 1])
    return PARSE_ERROR_PREFIX + _stray_char(c)


def lexical_error(data: bytes) -> str | None:
    """:func:`_first_lexical_error` of the start of a message, in bytes."""
    return _first_lexical_error(data.decode("utf-8", _RAW))


def describe_error(data: str | bytes) -> str | None:
    """QEMU's wording for why ``data`` is not one JSON value; None if it is one.

    Used only on the error path, so it may take its time: it re-parses and maps
    Python's ``json`` messages onto QEMU's (``qobject/json-parser.c``).
    """
    text = data.decode("utf-8", _RAW) if isinstance(data, bytes) else data
    lexical = _first_lexical_error(text)
    if lexical is not None:
        return lexical
    try:
        value, end = _DECODER.raw_decode(_apostrophes(text, _SAME_LENGTH))
    except _Reject as exc:
        return exc.desc
    except RecursionError:
        return NESTING_EXCEEDED
    except json.JSONDecodeError as exc:
        # QEMU's parser reads each string as it meets it: one before the error
        # with what is no character in it is where it stops.
        if "\\u" in text or not text.isascii():
            earlier = _not_a_character(text[: exc.pos])
            if earlier is not None:
                return PARSE_ERROR_PREFIX + earlier
        return PARSE_ERROR_PREFIX + _qemu_reason(exc.msg, text, exc.pos)
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        return PARSE_ERROR_PREFIX + "number out of range"
    if end != len(text):
        kw = _KEYWORD.match(text)
        if kw:
            return PARSE_ERROR_PREFIX + _keyword(kw.group())
        lexical = _lexical_error(text, end)
        if lexical is not None:
            return PARSE_ERROR_PREFIX + lexical
        return stray(text[:end + 1].encode("utf-8", _RAW))
    del value
    return None


def _qemu_reason(msg: str, text: str, pos: int) -> str:
    if msg.startswith(("Expecting value", "Expecting ','", "Illegal trailing comma",
                       "Expecting property name")):
        lexical = _lexical_error(text, pos)
        if lexical is not None:
            return lexical
    kw = _KEYWORD.match(text, pos)
    if msg.startswith(("Expecting value", "Illegal trailing comma")):
        return _keyword(kw.group()) if kw else "expecting value"
    if msg.startswith("Expecting property name"):
        if kw:
            return _keyword(kw.group())
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
        return _not_unicode(text, start)
    if msg.startswith("Invalid \\escape"):
        return "invalid escape sequence in string"
    if msg.startswith("Invalid control character"):
        # QEMU's lexer names the string token so far, from its opening quote.
        before = _BEFORE_OPEN_STRING.match(text, 0, pos)  # matches, if only ""
        start = before.end() if before is not None else pos
        return stray(text[start : pos + 1].encode("utf-8", _RAW))[len(PARSE_ERROR_PREFIX) :]
    return msg[:1].lower() + msg[1:]


def _not_unicode(text: str, start: int) -> str:
    """QEMU's error for the ``\\u`` escape at ``text[start]``, as it prints it:
    six bytes of the client's text from the backslash, cut at the end of the
    string token (``json-parser.c``: ``"%.*s is not a valid Unicode
    character"``, from a copy of the token).  A leading surrogate's escape just
    before is the one QEMU names: it reads the two as a pair."""
    before = collections.deque(_ESCAPE.finditer(text, 0, start), maxlen=1)
    if before and before[0].end() == start and 0xD800 <= _code_point(before[0].group()) <= 0xDBFF:
        start = before[0].start()
    end = start + 2
    while end < min(start + 6, len(text)) and text[end] != '"':
        end += 2 if text[end] == "\\" else 1
    if end < len(text) and text[end] == '"':
        end += 1  # the closing quote is the token's last character
    shown = text[start:end].encode("utf-8", _RAW)[:6]
    return f"{as_qemu_prints(shown)} is not a valid Unicode character"


def _code_point(escape: str) -> int:
    """The code point of a ``\\uXXXX`` escape (an :data:`_ESCAPE` match); -1 for others."""
    return int(escape[2:], 16) if escape[1] == "u" else -1


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
    """The error in ``buf[start:lf]``, the complete lines of an unfinished message
    (and the "{" that begins the next, if any).

    None when those lines are a valid beginning of a JSON value; else QEMU's
    desc and the offset in ``buf`` from which the rest of the message is
    skipped (where the error was found, or the line feed of the first line a
    line-by-line check would have refused).
    """
    text = buf[start:lf].decode("utf-8", _RAW)
    try:
        _DECODER.raw_decode(_apostrophes(text, _SAME_LENGTH))
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            return None
        # QEMU's parser never sees an unfinished message: what QEMU says of these
        # lines is the error of its lexer, if they hold one in what is taken for
        # this message: up to the end of the line decoding resumes after, or up to
        # the "{" beginning a line it resumes at (what follows is the next request's).
        line_start = text.rfind("\n", 0, exc.pos) + 1
        if line_start and text.startswith("{", exc.pos) and not text[line_start : exc.pos].strip(
                " \t\r"):
            scope = text[: exc.pos]
        else:
            # With the line feed that ends the line: it ends a token cut short
            # there too ("-\n", "1e\n").
            line_end = text.find("\n", exc.pos)
            scope = (text[: line_end + 1] if line_end >= 0
                     else text + "\n" if buf[lf : lf + 1] == b"\n" else text)
        desc = _first_lexical_error(scope) or PARSE_ERROR_PREFIX + _qemu_reason(
            exc.msg, text, exc.pos)
        return desc, start + len(text[: exc.pos].encode("utf-8", _RAW))
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
        if _viable(buf[start : feeds[mid]].decode("utf-8", _RAW)):
            lo = mid + 1
        else:
            hi = mid
    skip = feeds[lo] if lo < len(feeds) else lf
    return desc_or_none or PARSE_ERROR_PREFIX + "expecting value", skip

"""The strict parse of one message, and QEMU's wording of malformed JSON.

QEMU's JSON parser (``qobject/json-lexer.c``, ``qobject/json-parser.c``,
``qobject/json-streamer.c``) answers bad input with ``JSON parse error, ...``
and a handful of limit messages.  migblockd parses each message with Python's
``json`` on its exact slice and, only on the error path, maps Python's
messages onto QEMU's.  Its parser's words are here; its lexer's, which come
first, are :mod:`migblockd.qmp.lexer`'s, and what QEMU takes for no character
in a string is :mod:`migblockd.qmp.characters`'.  This module is what framing
calls once a message is complete; on the complete lines of one that is not, it
calls :mod:`migblockd.qmp.unfinished`, which words its errors with this one's.

Python's ``json`` would accept ``NaN``, ``Infinity`` and turn ``1e400`` into
``inf``, none of which can be written back as JSON (QEMU echoes ``1e400`` as
bare ``inf``).  :func:`decode_message` rejects them as parse errors
(``stray 'N'``, as QEMU's lexer has it, ``number out of range``), so that what the daemon
later echoes (an ``id``) is always strict JSON: the decoder and its hooks, and
where QEMU's parser stops sooner than Python's, are :mod:`migblockd.qmp.decoder`'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from migblockd.qmp.characters import (
    ESCAPE,
    RAW,
    SUSPECT_ESCAPE,
    first_bad_byte,
    first_not_a_character,
    not_a_character,
    not_unicode,
    nul_escaped,
)
from migblockd.qmp.decoder import (
    DECODER,
    OUT_OF_RANGE,
    SAME_CHARACTER,
    SAME_LENGTH,
    STRING,
    ZERO_EXPONENT,
    Reject,
    apostrophes,
    duplicate_before,
    finite_numbers_bytes,
    innermost_container,
    read_on,
)
from migblockd.qmp.lexer import (
    KEYWORD,
    PARSE_ERROR_PREFIX,
    first_lexical_error,
    keyword_error,
    lexical_error_at,
    more_tokens_than,
    stray,
)

# QEMU's wording (qobject/json-streamer.c, qobject/json-parser.c).
TOKEN_SIZE_EXCEEDED: Final = "JSON token size limit exceeded"
TOKEN_COUNT_EXCEEDED: Final = "JSON token count limit exceeded"
NESTING_EXCEEDED: Final = "JSON nesting depth limit exceeded"


@dataclass(frozen=True, slots=True)
class ParseError:
    """A framing or syntax error in place of a message; answered without ``id``."""

    desc: str


def viable(text: str) -> bool:
    """Whether ``text`` can still begin a valid JSON value."""
    parsed = apostrophes(text, SAME_CHARACTER)  # "it\\'s" and "it's" are one key
    try:
        read_on(parsed)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(parsed.rstrip())
    except (Reject, ValueError, RecursionError):
        return False
    return True


SINGLE_QUOTE: Final = PARSE_ERROR_PREFIX + "single-quoted strings are not supported"


# --------------------------------------------------------------------------- parsing


def decode_message(data: bytes | bytearray, max_tokens: int | None = None) -> object:
    """Parse one complete message: its JSON value, or a :class:`ParseError`.

    A number out of a double's range is refused (docs/protocol.md) only when the
    message has no error that QEMU's parser, which reads it as infinity and goes
    on, finds: that one is reported.
    """
    item = _decode_message(data, max_tokens)
    if isinstance(item, ParseError) and item.desc == OUT_OF_RANGE:
        finite = finite_numbers_bytes(bytes(data))
        if finite != data and isinstance(other := _decode_message(finite, max_tokens),
                                          ParseError):
            return other
    return item


def _decode_message(data: bytes | bytearray, max_tokens: int | None = None) -> object:
    """Parse one complete message: its JSON value, or a :class:`ParseError`.

    With ``max_tokens``, a message that is no JSON value and has more tokens
    than that is refused for them, as QEMU's streamer refuses it before its
    parser runs, and before the wording of any other error re-reads it: that
    costs up to a second of the only thread for a 1 MiB message of short
    tokens.  (A valid one is counted by the caller, on its value.)
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", RAW)
        if _too_many_tokens(text, max_tokens):
            return ParseError(TOKEN_COUNT_EXCEEDED)
        # Its lexer's error first: C0 80 is a character only in a string.
        lexical = first_lexical_error(text)
        if lexical is None and b"\xc0\x80" in data:
            # Modified UTF-8's U+0000, which QEMU takes in a string
            # (mod_utf8_codepoint(), util/unicode.c): as the escape json takes.
            escaped = nul_escaped(bytes(data))
            value = _decode_message(escaped) if escaped != data else None
            if value is not None:
                return value  # its error is the message's, C0 80 being a character
        # exc.start counts bytes; before it, each character is whole UTF-8.
        first = len(data[: exc.start].decode("utf-8"))
        return ParseError(lexical or bad_utf8(text, first) or describe_error(text)
                          or PARSE_ERROR_PREFIX + _BAD_UTF8)
    parsed = apostrophes(text, SAME_CHARACTER) if "\\'" in text else text
    try:
        value, end = DECODER.raw_decode(parsed)
    except Reject as exc:  # the parse itself is exact: "it\\'s" and "it's" are one key
        if _too_many_tokens(text, max_tokens):
            return ParseError(TOKEN_COUNT_EXCEEDED)
        if exc.desc is ZERO_EXPONENT:
            return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
        if exc.desc == OUT_OF_RANGE:  # decode_message() looks past it
            return ParseError(first_lexical_error(text) or OUT_OF_RANGE)
        return ParseError(first_lexical_error(text) or _character_first(text, exc.desc)
                          or exc.desc)
    except (ValueError, RecursionError):
        if _too_many_tokens(text, max_tokens):
            return ParseError(TOKEN_COUNT_EXCEEDED)
        return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
    if end != len(parsed):
        if _too_many_tokens(text, max_tokens):
            return ParseError(TOKEN_COUNT_EXCEEDED)
        return ParseError(describe_error(text) or PARSE_ERROR_PREFIX + "expecting value")
    # json takes a lone surrogate (\uD800, which no UTF-8 encoder can handle
    # later) and noncharacters (\uFFFF, or as UTF-8); QEMU refuses them.
    if ("\\u" in text and SUSPECT_ESCAPE.search(text)) or not text.isascii():
        desc = not_a_character(text)
        if desc is not None:
            if _too_many_tokens(text, max_tokens):
                return ParseError(TOKEN_COUNT_EXCEEDED)
            return ParseError(PARSE_ERROR_PREFIX + desc)
    return value


def _character_first(text: str, refused: str) -> str | None:
    """QEMU's error for a string that is no character (a lone surrogate's escape, a
    noncharacter), if its parser meets it before what a json hook ``refused``:
    it reads each string as it meets it, and a repeated key once the pair's
    value is read (``parse_pair()``, ``json-parser.c``); a number out of a
    double's range it does not refuse at all."""
    if "\\u" not in text and text.isascii():
        return None
    found = first_not_a_character(text)
    if found is None:
        return None
    at, desc = found
    if refused == _DUPLICATE_KEY and duplicate_before(text, at):
        return None
    return PARSE_ERROR_PREFIX + desc


_DUPLICATE_KEY: Final = PARSE_ERROR_PREFIX + "duplicate key"


def _repeated_key_first(text: str) -> str | None:
    """QEMU's error for ``text`` when json's hook refused a repeated key in it,
    None for any other refusal (the rest of the error path words those)."""
    try:
        read_on(apostrophes(text, SAME_CHARACTER))
    except Reject as exc:
        if exc.desc == _DUPLICATE_KEY:
            return _character_first(text, exc.desc) or exc.desc
    except (ValueError, RecursionError):
        pass
    return None


_LITERALS: Final = frozenset({"true", "false", "null"})


def _too_many_tokens(text: str, max_tokens: int | None) -> bool:
    # Every token is at least one character: only a longer message can have too many.
    return max_tokens is not None and len(text) > max_tokens \
        and more_tokens_than(text, max_tokens)


_BAD_UTF8: Final = "invalid UTF-8 sequence in string"


def bad_utf8(text: str, first: int) -> str | None:
    """QEMU's error for the string with the first byte that is not UTF-8, at
    ``first``, if its parser gets that far: nothing before the string is wrong."""
    before = BEFORE_OPEN_STRING.match(text, 0, first)
    if before is None or before.end() >= first:
        return None
    # With a string where this one begins (its parser refuses a string token
    # where none may be, "1 "x"", before it reads the string).
    if not viable(prefix := text[: before.end()] + '""'):
        # A repeated key in an object read whole before the string is its error,
        # unless a string before that key is no character.
        return _repeated_key_first(prefix)
    # An escape QEMU reads first may be the error: one of a lone surrogate or a
    # noncharacter, in this string or an earlier one (json takes them, so the
    # prefix is viable), as parse_string() (json-parser.c) reads characters in
    # order; or, in this string, one its parser refuses (the rest of the error
    # path words it).
    content = text[before.end() : first]
    bad_escape = next((m.start() for m in ESCAPE.finditer(content)
                       if len(m.group()) == 2 and m.group()[1] not in _ESCAPED), len(content))
    # A backslash just before the byte escapes it: an escape QEMU refuses.
    cut = bad_escape == len(content) and (len(content) - len(content.rstrip("\\"))) % 2 == 1
    end = before.end() + bad_escape - cut
    found = first_not_a_character(text[:end])
    if found is not None:
        at, desc = found
        return PARSE_ERROR_PREFIX + ("duplicate key" if duplicate_before(text, at) else desc)
    if bad_escape < len(content):
        return None  # the rest of the error path words the bad escape
    # And a repeated key, once its pair is read, before either (parse_pair()).
    if duplicate_before(text, end):
        return PARSE_ERROR_PREFIX + "duplicate key"
    return PARSE_ERROR_PREFIX + ("invalid escape sequence in string" if cut else _BAD_UTF8)


#: What QEMU's parser takes after a backslash, but a \u escape's four digits.
_ESCAPED: Final = frozenset('"\\/bfnrt\'')


#: Everything up to the opening quote of a string left open (complete strings
#: and what is outside strings).
BEFORE_OPEN_STRING: Final = re.compile(rf'(?:[^"]++|{STRING})*+')
_VALUE_END = frozenset("}],:")


def describe_error(data: str | bytes) -> str | None:
    """QEMU's wording for why ``data`` is not one JSON value; None if it is one.

    Used only on the error path, so it may take its time: it re-parses and maps
    Python's ``json`` messages onto QEMU's (``qobject/json-parser.c``).
    """
    text = data.decode("utf-8", RAW) if isinstance(data, bytes) else data
    lexical = first_lexical_error(text)
    if lexical is not None:
        return lexical
    # Python's json takes such bytes in a string; QEMU's parser refuses the string
    # as it meets it, before a later error (a closer that does not match, say).
    if not text.isascii() and (first := first_bad_byte(text)) is not None \
            and (bad := bad_utf8(text, first)) is not None:
        return bad
    try:
        value, end = DECODER.raw_decode(apostrophes(text, SAME_LENGTH))
    except Reject as exc:
        if exc.desc == _DUPLICATE_KEY:  # unless a string before it is no character
            return _character_first(text, exc.desc) or exc.desc
        return _zero_exponent(text) if exc.desc is ZERO_EXPONENT else exc.desc
    except RecursionError:
        return NESTING_EXCEEDED
    except json.JSONDecodeError as exc:
        return PARSE_ERROR_PREFIX + qemu_reason(exc.msg, text, exc.pos)
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        return OUT_OF_RANGE
    if end != len(text):
        kw = KEYWORD.match(text)
        if kw:
            return PARSE_ERROR_PREFIX + keyword_error(kw.group())
        lexical = lexical_error_at(text, end)
        if lexical is not None:
            return PARSE_ERROR_PREFIX + lexical
        return stray(text[:end + 1].encode("utf-8", RAW))
    del value
    return None


#: A number starting with a bare 0 and an exponent, outside strings.
_ZERO_EXPONENT_AT: Final = re.compile(rf"{STRING}|(?<![0-9.])-?0([eE])")


def _zero_exponent(text: str) -> str:
    """QEMU's error for ``text`` whose first ``0e...`` Python read as a number.

    QEMU's lexer ends that number at the 0 and reads a keyword where its parser
    wants a separator; but its parser met every token before it first, and a
    string there with what is no character in it is its error.  So the text is
    described again as QEMU tokenises it, the 0 parted from the keyword."""
    for m in _ZERO_EXPONENT_AT.finditer(text):
        if m.group(1) is not None:
            parted = text[: m.start(1)] + " " + text[m.start(1) :]
            return describe_error(parted) or PARSE_ERROR_PREFIX + "expecting value"
    return PARSE_ERROR_PREFIX + "expecting value"  # pragma: no cover - the hook saw one


def qemu_reason(msg: str, text: str, pos: int) -> str:
    """QEMU's words, without :data:`PARSE_ERROR_PREFIX`, for the error json raised
    with ``msg`` at ``pos`` of ``text``: its lexer's at that token, or the first
    error its parser meets in reading the tokens in order up to there."""
    lexical = None
    if msg.startswith(("Expecting value", "Expecting ','", "Illegal trailing comma",
                       "Expecting property name")):
        lexical = lexical_error_at(text, pos)
        # A bad keyword is its parser's error, not its lexer's: one before it
        # (a repeated key whose pair is whole, say) comes first.
        if lexical is not None and not lexical.startswith("invalid keyword"):
            return lexical
        if lexical is not None:
            # json read the keyword's start as a literal ("true" of "truex"): QEMU's
            # parser fails at the keyword, before the pair it ends is whole.
            while pos and text[pos - 1].isascii() and text[pos - 1].isalpha():
                pos -= 1
    # QEMU's parser reads each string as it meets it, and each key once its
    # pair's value is read: one of those before the error is where it stops.
    if "\\u" in text or not text.isascii():
        found = first_not_a_character(text[:pos])
        if found is not None:
            at, earlier = found
            return "duplicate key" if duplicate_before(text, at) else earlier
    if duplicate_before(text, pos):
        return "duplicate key"
    if lexical is not None:
        return lexical
    kw = KEYWORD.match(text, pos)
    if msg.startswith(("Expecting value", "Illegal trailing comma")):
        return keyword_error(kw.group()) if kw else "expecting value"
    if msg.startswith("Expecting property name"):
        # QEMU's parser reads the key as a value (parse_pair(), json-parser.c):
        # true, false and null are values, but not strings.
        if kw and kw.group() not in _LITERALS:
            return keyword_error(kw.group())
        if pos >= len(text) or text[pos] in _VALUE_END:
            return "expecting value"  # QEMU parses the key as a value first
        return "key is not a string in object"
    if msg.startswith("Expecting ':'"):
        return "missing : in object pair"
    if msg.startswith("Expecting ','"):
        inner = innermost_container(text, pos)
        return "expected separator in dict" if inner == "{" else "expected separator in list"
    if msg.startswith("Invalid \\uXXXX"):
        start = pos - 1 if pos and text[pos - 1] == "\\" else pos
        return not_unicode(text, start)
    if msg.startswith("Invalid \\escape"):
        return "invalid escape sequence in string"
    if msg.startswith("Invalid control character"):
        # QEMU's lexer names the string token so far, from its opening quote.
        before = BEFORE_OPEN_STRING.match(text, 0, pos)  # matches, if only ""
        start = before.end() if before is not None else pos
        return stray(text[start : pos + 1].encode("utf-8", RAW))[len(PARSE_ERROR_PREFIX) :]
    return msg[:1].lower() + msg[1:]

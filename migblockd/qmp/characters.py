"""What QEMU takes for a character, and how it prints what is not one.

QEMU reads strings as modified UTF-8 (``mod_utf8_codepoint()``,
``util/unicode.c``) and refuses what is no character: bytes that are not UTF-8,
overlong forms, surrogates, and Unicode's noncharacters, written as UTF-8 or as
``\\u`` escapes (``is_valid_codepoint()``; ``qobject/json-parser.c``,
``parse_string()``).  Where its error quotes the client's bytes, its JSON writer
(``qobject/json-writer.c``) prints each such sequence as U+FFFD.

These rules are apart from the parse (:mod:`migblockd.qmp.wording`) and the
lexer (:mod:`migblockd.qmp.lexer`) because both use them (each quotes the
client's text in its errors), and because here Unicode's rules decide, not
JSON's grammar.
"""

from __future__ import annotations

import codecs
import collections
import re
from typing import Final

#: Bytes that are not UTF-8 decode to lone surrogates and encode back to
#: themselves: positions and stray bytes stay the client's.
RAW: Final = "surrogateescape"


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


def _may_hold_noncharacters(utf8: bytes) -> bool:
    """False when UTF-8 ``utf8`` holds no noncharacter: a test in C, where the
    regular expression takes about 80 ns a character (a megabyte of "é":
    40 ms).  U+FDD0-U+FDEF are EF B7 xx; every U+xFFFE and U+xFFFF ends in
    BF BE or BF BF."""
    return b"\xef\xb7" in utf8 or b"\xbf\xbe" in utf8 or b"\xbf\xbf" in utf8


def as_qemu_prints(raw: bytes) -> str:
    """``raw`` as QEMU's JSON writer prints a string (``qobject/json-writer.c``,
    ``quoted_str()``): each sequence ``mod_utf8_codepoint()`` cannot read as a
    character (not UTF-8, a surrogate, a noncharacter, overlong) as one U+FFFD,
    but C0 80, modified UTF-8's U+0000, as U+0000.  So a reply is valid UTF-8
    and says what QEMU's says."""
    text = raw.decode("utf-8", RAW)
    if text.isascii():
        return text
    # Each run of bytes that are not UTF-8 (lone surrogates in ``text``) is
    # handed to _bad_bytes by the encoder, which copies the rest in C.
    text = text.encode("utf-8", _BAD_BYTES).decode("utf-8")
    return _NONCHARACTER.sub("\ufffd", text) if _may_hold_noncharacters(raw) else text


def _bad_bytes(exc: UnicodeError) -> tuple[bytes, int]:
    # Python's decoder leaves every valid character alone, so a run of bytes it
    # refused starts and ends where QEMU's sequences do.  (UTF-8 out: the
    # encoder takes a str from a handler only if it is ASCII.)
    assert isinstance(exc, UnicodeEncodeError)
    raw = exc.object[exc.start:exc.end].encode("utf-8", RAW)
    return b"\0".join(_BAD_SEQUENCE.sub(b"\xef\xbf\xbd", part)
                       for part in raw.split(b"\xc0\x80")), exc.end


_BAD_BYTES: Final = "migblockd-qemu-bad-bytes"
codecs.register_error(_BAD_BYTES, _bad_bytes)


#: C0 80, and the escapes before it (so that a backslash does not escape it).
_MODIFIED_NUL: Final = re.compile(rb"\\[\s\S]|\xc0\x80")


def _nul_escape(m: re.Match[bytes]) -> bytes:
    return b"\\u0000" if m.group() == b"\xc0\x80" else m.group()


def nul_escaped(data: bytes) -> bytes:
    """``data`` with each C0 80 outside an escape as the escape json takes for U+0000."""
    return _MODIFIED_NUL.sub(_nul_escape, data)


#: In text decoded with :data:`RAW`, a byte that is not UTF-8 (a lone surrogate);
#: C0 80 is taken whole first, modified UTF-8's U+0000 being a character to QEMU.
_NOT_UTF8: Final = re.compile("\udcc0\udc80|([\udc80-\udcff])")


def first_bad_byte(text: str) -> int | None:
    """Where the first byte ``mod_utf8_codepoint()`` (``util/unicode.c``) reads as
    no part of a character is in ``text``, bytes decoded with :data:`RAW`."""
    for m in _NOT_UTF8.finditer(text):
        if m.group(1) is not None:
            return m.start(1)
    return None


#: Every escape in a JSON text, in order (``\\\\`` is one, so ``\\\\u`` is none).
ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|.)", re.DOTALL)


#: A ``\\u`` escape that may be of a surrogate or a noncharacter (a pair beyond the
#: BMP begins with a surrogate); a cheap test before the exact one.
SUSPECT_ESCAPE: Final = re.compile(r"\\u(?:[dD][89a-fA-F]|[fF][dDfF])")
#: Those whole, each where an escape begins (after any escaped backslashes: in
#: ``\\\\uffff`` the ``u`` is text).
_SUSPECT_ONLY: Final = re.compile(
    r"(?<!\\)(?:\\\\)*+(\\u(?:[dD][89a-fA-F]|[fF][dDfF])[0-9a-fA-F]{2})")


def not_a_character(text: str) -> str | None:
    """What QEMU's ``parse_string()`` (``json-parser.c``) says about the first
    string content of a parsed ``text`` that is no character, if any: a
    noncharacter written as UTF-8 is an ``invalid UTF-8 sequence in string``
    (``mod_utf8_codepoint()``, ``util/unicode.c``); an escape of a lone
    surrogate or of a noncharacter ``is not a valid Unicode character``, shown
    as the client wrote it (a pair of escapes read as one, both)."""
    found = first_not_a_character(text)
    return None if found is None else found[1]


def first_not_a_character(text: str) -> tuple[int, str] | None:
    """:func:`not_a_character`'s words, and where what they name ends in ``text``:
    the shortest prefix of ``text`` that holds it.  One pass: the error path asks
    where it is, and a search by prefixes cost seconds on a megabyte of escapes."""
    raw = (_NONCHARACTER.search(text)
           if _may_hold_noncharacters(text.encode("utf-8", "surrogatepass")) else None)
    found = raw.start() if raw is not None else len(text)
    # Only the escapes that may be no character: this runs on every request that
    # is not ASCII, and a loop over all its escapes (\n, \", \u0041) cost more
    # than the rest of its decoding.
    if SUSPECT_ESCAPE.search(text, 0, found) is not None:
        escapes = _SUSPECT_ONLY.finditer(text, 0, found)
        for m in escapes:
            cp = _code_point(m.group(1))
            start, end = m.start(1), m.end()
            if 0xD800 <= cp <= 0xDBFF and text.startswith("\\u", end):
                trailing = ESCAPE.match(text, end)
                low = _code_point(trailing.group()) if trailing is not None else -1
                if not 0xDC00 <= low <= 0xDFFF:
                    return end, f"{text[start:end]} is not a valid Unicode character"
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
                end += 6
                next(escapes, None)  # the trailing one, taken
            if cp >= 0 and not _is_character(cp):
                return end, f"{text[start:end]} is not a valid Unicode character"
    return None if raw is None else (raw.end(), "invalid UTF-8 sequence in string")


def _is_character(cp: int) -> bool:
    """``is_valid_codepoint()`` of ``util/unicode.c``."""
    return not (0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE)


def not_unicode(text: str, start: int) -> str:
    """QEMU's error for the ``\\u`` escape at ``text[start]``, as it prints it:
    six bytes of the client's text from the backslash, cut at the end of the
    string token (``json-parser.c``: ``"%.*s is not a valid Unicode
    character"``, from a copy of the token).  A leading surrogate's escape just
    before is the one QEMU names: it reads the two as a pair."""
    before = collections.deque(ESCAPE.finditer(text, 0, start), maxlen=1)
    if before and before[0].end() == start and 0xD800 <= _code_point(before[0].group()) <= 0xDBFF:
        start = before[0].start()
    end = start + 2
    while end < min(start + 6, len(text)) and text[end] != '"':
        end += 2 if text[end] == "\\" else 1
    if end < len(text) and text[end] == '"':
        end += 1  # the closing quote is the token's last character
    shown = text[start:end].encode("utf-8", RAW)[:6]
    return f"{as_qemu_prints(shown)} is not a valid Unicode character"


def _code_point(escape: str) -> int:
    """The code point of a ``\\uXXXX`` escape (an :data:`ESCAPE` match); -1 for others."""
    return int(escape[2:], 16) if escape[1] == "u" and len(escape) == 6 else -1

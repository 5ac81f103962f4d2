"""QEMU's JSON lexer: where its tokens end, and what it refuses, in its words.

QEMU lexes a message as it arrives (``qobject/json-lexer.c``) and parses it
only once it is complete, so an error of its lexer anywhere in a message is
the error QEMU reports, before any of its parser's; the streamer words it
``JSON parse error, stray '...'`` with the token so far
(``qobject/json-streamer.c``).  At the top level a whole token is a message of
its own, so the lexer also decides where a number or keyword ends
(:func:`first_token_end`) and whether QEMU would still wait for more input
(:func:`lexer_waits`).

Python's ``json`` has no lexer of its own to ask: this module re-lexes the
client's text the way QEMU's state machine does.  It is apart from the parse of
one message (:mod:`migblockd.qmp.wording`) because framing asks it too, while a
message is still arriving.
"""

from __future__ import annotations

import re
from typing import Final

from migblockd.qmp.characters import RAW, as_qemu_prints

#: How QEMU's streamer and parser begin every error they word
#: (``qobject/json-streamer.c``, ``qobject/json-parser.c``).
PARSE_ERROR_PREFIX: Final = "JSON parse error, "


def stray(token: bytes) -> str:
    """QEMU's error for the token its lexer could not go on with, as it prints it:
    raw (JSON escapes control characters), cut at a NUL (it is a C string), and
    what is not a character as U+FFFD (see :func:`as_qemu_prints`)."""
    shown = as_qemu_prints(token.split(b"\0", 1)[0])
    return f"{PARSE_ERROR_PREFIX}stray '{shown}'"


def keyword_error(word: str) -> str:
    """QEMU's error for a run of letters where a value belongs: its lexer's
    keywords are lower case, so an upper-case letter is a stray character
    (``NaN`` is ``stray 'N'``, ``xY`` is ``stray 'Y'``)."""
    upper = next((c for c in word if c.isupper()), None)
    return f"stray '{upper}'" if upper is not None else f"invalid keyword '{word}'"


KEYWORD = re.compile(r"[A-Za-z]+")
_LOWER = re.compile(r"[a-z]+")
#: QEMU's lexer (qobject/json-lexer.c) on numbers: state -> {character class: next
#: state}; the states in _NUMBER_ENDS may end a number, the others may not, and a
#: character with no transition there is a lexical error (``stray`` of the token
#: so far, that character included).  "bad" is a second digit after a leading 0;
#: a leading 0 takes no exponent either (its state has no "e"), so ``0e5`` is the
#: number 0, then the keyword ``e``, then 5.
_NUMBER: Final[dict[str, dict[str, str]]] = {
    "start": {"-": "neg", "0": "zero", "1": "int"},
    "neg": {"0": "zero", "1": "int"},
    "zero": {"0": "bad", "1": "bad", ".": "dot"},
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


def lexical_error_at(text: str, pos: int) -> str | None:
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
        kw = KEYWORD.match(text, begin)
        return keyword_error(kw.group()) if begin < pos and kw else None
    if c in _TOKEN_START or c.isspace():
        return None
    return _stray_char(c)


def _number_error(text: str, start: int) -> str | int:
    """The lexer's error in the number at ``start``, or where the number ends."""
    end = _number_failure(text, start)
    return end if isinstance(end, int) else end[0]


def _number_failure(text: str, start: int) -> tuple[str, int] | int:
    """:func:`_number_error`, with the error the index of the character it fails at."""
    state = "start"
    for i in range(start, len(text)):
        following = _NUMBER[state].get(_number_class(text[i]))
        if following is None:
            return i if state in _NUMBER_ENDS else (_stray_through(text, start, i), i)
        if following == "bad":
            return _stray_through(text, start, i), i
        state = following
    return len(text)


def number_token(data: bytes) -> tuple[int, bool] | None:
    """QEMU's lexer on the number that begins ``data``: where its token ends, and
    whether that token is an error (it then takes the byte the lexer failed at,
    a ``{`` included); None when ``data`` ends first (more input may make it
    either).  Bytes, as the lexer reads them: one that is not ASCII ends or
    breaks a number as any other byte."""
    text = data.decode("ascii", "replace")
    found = _number_failure(text, 0)
    if isinstance(found, int):
        return None if found == len(text) else (found, False)
    return found[1] + 1, True


def number_cut_short(token: bytes) -> bool:
    """Whether ``token`` is a number QEMU's lexer has begun but cannot end there
    (``-``, ``1.``, ``1e``, ``1e+``).  At the end of the input its lexer fails on
    it with the token so far (``json_lexer_flush()``, ``qobject/json-lexer.c``),
    as it does at a byte that cuts the number short."""
    state = "start"
    for c in token.decode("ascii", "replace"):
        following = _NUMBER[state].get(_number_class(c))
        if following is None or following == "bad":
            return False
        state = following
    return state not in _NUMBER_ENDS


def first_token_end(token: bytes) -> int | None:
    """Where QEMU's lexer ends the first token of ``token``, a run of bytes with
    no delimiter, if that token is a whole number or a run of lower-case
    letters cut from more (``12x`` is 12, then ``x``; ``xY`` is the keyword
    ``x``, then ``Y``); else None.  At the top level QEMU's parser takes each
    token as it ends, so each is a message of its own."""
    text = token.decode("utf-8", RAW)
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
    rb"|-?+(?:0(?:\.(?:[0-9]++(?:[eE][-+]?+[0-9]*+)?+)?+)?+"
    rb"|[1-9][0-9]*+(?:\.(?:[0-9]++(?:[eE][-+]?+[0-9]*+)?+)?+|[eE][-+]?+[0-9]*+)?+)?+")
_NUMBER_START: Final = frozenset("-0123456789")


def _stray_char(c: str) -> str:
    # QEMU's lexer reads bytes: the first byte of a character is the stray one.
    return stray(c.encode("utf-8", RAW)[:1])[len(PARSE_ERROR_PREFIX):]


def _stray_text(token: str) -> str:
    return stray(token.encode("utf-8", RAW))[len(PARSE_ERROR_PREFIX):]


def _stray_through(text: str, start: int, bad: int) -> str:
    """The token from ``start`` that fails at ``bad``: QEMU's lexer reads bytes,
    so it ends at the first byte of that character (``-é`` is ``-`` and 0xC3,
    shown as U+FFFD), however the input was split into reads."""
    token = text[start:bad].encode("utf-8", RAW) + text[bad].encode("utf-8", RAW)[:1]
    return stray(token)[len(PARSE_ERROR_PREFIX):]


#: What QEMU's lexer (``qobject/json-lexer.c``) refuses in a string: control
#: characters and the bytes 0xFE, 0xFF (here as the surrogates they decode to).
_NOT_IN_STRING = "\\x00-\\x1f\\udcfe\\udcff"


def _string_so_far(quote: str) -> str:
    """A string token as far as QEMU's lexer takes it, its closing quote not
    included, unrolled: a run of ordinary characters is one step, and the match
    keeps no state to backtrack into (``(?:[^"\\\\]|\\\\.)*`` keeps some for every
    character: 150 MB for a 1 MiB string).  Each character of a string is
    either ordinary or taken by the escape before it, so there is one way to
    read it, and the possessive form matches what the plain one does."""
    plain = rf"[^{quote}\\{_NOT_IN_STRING}]*+"
    return rf"{quote}{plain}(?:\\[^{_NOT_IN_STRING}]{plain})*+"


#: A run of whole tokens as QEMU's lexer reads them.
_TOKENS: Final = re.compile(
    r"(?:([ \t\r\n]+|[{}\[\]:,]|[a-z]+"
    rf"""|{_string_so_far('"')}"|{_string_so_far("'")}'"""
    # a number the lexer would not take on with a "." "e" or digit after it
    r"|-?(?:0(?![.0-9])|(?:0\.[0-9]+|[1-9][0-9]*(?:\.[0-9]+)?)(?:[eE][-+]?[0-9]+)?(?![.eE0-9]))))*+")
#: A string token as far as QEMU's lexer takes it.
_STRING_SO_FAR: Final = {quote: re.compile(_string_so_far(quote)) for quote in "\"'"}


#: One token as QEMU's lexer reads it, with the blanks before it: one of _TOKENS'.
_ONE_TOKEN: Final = re.compile(
    r"[ \t\r\n]*+(?:[{}\[\]:,]|[a-z]++"
    rf"""|{_string_so_far('"')}"|{_string_so_far("'")}'"""
    r"|-?(?:0(?![.0-9])|(?:0\.[0-9]+|[1-9][0-9]*(?:\.[0-9]+)?)(?:[eE][-+]?[0-9]+)?(?![.eE0-9])))")


def tokens_read(text: str, limit: int) -> tuple[int, int]:
    """How many tokens QEMU's lexer reads at the start of ``text``, at most
    ``limit + 1``, and where it stopped: at a token it cannot read (or one not
    over yet), or after the last it read."""
    pos = count = 0
    match = _ONE_TOKEN.match
    while count <= limit:
        m = match(text, pos)
        if m is None:
            break
        pos = m.end()
        count += 1
    return count, pos


def more_tokens_than(text: str, limit: int) -> bool:
    """Whether ``text`` begins with more than ``limit`` tokens that QEMU's lexer
    reads: its streamer (``qobject/json-streamer.c``) then refuses the message
    at the one past the limit, before its parser sees it, and so before any
    error its parser would find.  False when the text has fewer, or when a
    token the lexer cannot read comes first (its error comes first then).
    Stops after ``limit + 1`` tokens, whatever the length of ``text``."""
    return tokens_read(text, limit)[0] > limit


def lexical_error_before(text: str, limit: int) -> str | None:
    """QEMU's lexer error in ``text`` (which holds more than ``limit`` tokens) if it
    comes before the token past the limit; else None: the token limit it is."""
    count, pos = tokens_read(text, limit)
    return None if count > limit else first_lexical_error(text[pos:])


def first_lexical_error(text: str) -> str | None:
    """QEMU's error for the first token of ``text`` its lexer cannot read, if any.

    QEMU lexes a message as it arrives and parses it only once it is complete,
    so a lexical error anywhere in a message is what QEMU reports, before any
    error of its parser (``{"a": x, "b": 1.}`` is ``stray '1.}'``, not
    ``invalid keyword 'x'``).  A token still open at the end is no error yet.
    """
    found = lexical_failure(text)
    return None if found is None else found[0]


def lexical_failure(text: str) -> tuple[str, int] | None:
    """:func:`first_lexical_error`, and the index in ``text`` just after the
    character the lexer failed at: there QEMU's lexer starts skipping to its
    next structural character (``IN_RECOVERY`` in ``qobject/json-lexer.c``),
    its streamer having forgotten the message (``json-streamer.c``)."""
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
        end = _number_failure(text, pos)
        if not isinstance(end, int):
            return PARSE_ERROR_PREFIX + end[0], end[1] + 1
        if end == len(text):
            return None
        pos = end  # it ended at the byte after it, which begins the next token
    if c in _STRING_SO_FAR:
        bad = _STRING_SO_FAR[c].match(text, pos)
        assert bad is not None
        end = bad.end()
        end += end < len(text) and text[end] == "\\"  # the byte after "\\" is the bad one
        if end >= len(text):
            return None
        return PARSE_ERROR_PREFIX + _stray_text(text[pos : end + 1]), end + 1
    return PARSE_ERROR_PREFIX + _stray_char(c), pos + 1


def lexical_error(data: bytes) -> str | None:
    """:func:`first_lexical_error` of the start of a message, in bytes."""
    return first_lexical_error(data.decode("utf-8", RAW))


def lexical_progress(text: str) -> tuple[str, int] | int:
    """:func:`lexical_failure` of ``text``, the start of a message's tokens so far;
    or, with no error, where lexing may later go on from with the same result:
    after its last whole token, but before a number at its end (one more digit,
    ``.`` or ``e`` may still make it an error such as ``1.}``)."""
    found = lexical_failure(text)
    if found is not None:
        return found
    m = _TOKENS.match(text)
    assert m is not None  # the pattern matches the empty string
    # Back over a number at the end: one C-level pass, not a step of Python per
    # digit (1 MiB of digits arriving in 4 KiB reads took 7 s).
    return len(text[: m.end()].rstrip(_NUMBER_CHARS))


_NUMBER_CHARS: Final = "0123456789.eE+-"
#: A number, so far, in a state of QEMU's lexer that takes any digit and stays
#: in it: more digits never make it an error (``0`` does not: ``01`` is one).
DIGIT_LOOP: Final = re.compile(
    r"-?(?:[1-9][0-9]*|(?:0|[1-9][0-9]*)\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
DIGITS: Final = re.compile(rb"[0-9]*+")


def lexical_failure_bytes(data: bytes) -> tuple[str, int] | None:
    """:func:`lexical_failure` of the start of a message, in bytes: the offset is
    of the byte after the one the lexer failed at (QEMU's lexer reads bytes)."""
    text = data.decode("utf-8", RAW)
    found = lexical_failure(text)
    if found is None:
        return None
    desc, after = found
    # Of a character of several bytes, the lexer failed at the first.
    return desc, len(text[: after - 1].encode("utf-8", RAW)) + 1

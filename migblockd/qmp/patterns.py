"""The byte-level grammar the QMP scanner steps with (:mod:`migblockd.qmp.scanner`).

Compiled regular expressions that step over whole runs of ordinary bytes and
whole strings at C speed, stopping only at what matters to framing: brackets,
quotes, line feeds and *reset bytes* (the control characters that the QMP spec
lets a client send to force the parser back into a known state).  All of them
can match the empty string, so :func:`match_end` never fails.  :func:`skip_broken`
steps over the rest of a message whose structure is lost.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Final

# Reset bytes: control characters other than \t \n \r, and 0xFE/0xFF.
RESET_CLASS = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
# Bytes that end a string scan: reset bytes and the line feed.  A raw \t or
# \r in a string is invalid JSON too, but harmless to framing, so json rejects
# it later and the message keeps its boundaries; a raw line feed means the
# string was never closed, and the line feed is the resynchronisation point.
STRING_BAD = rb"\x00-\x08\x0a-\x0c\x0e-\x1f\xfe\xff"

WHITESPACE = re.compile(rb"[ \t\r\n]*+")
# Inside a structure: skip everything that is neither a bracket, a quote nor a
# reset byte, and skip whole well-formed strings.  Possessive quantifiers: the
# alternatives cannot overlap, so backtracking could only waste time.
STRING_CHARS = rb'(?:[^"\\' + STRING_BAD + rb"]++|\\[^" + STRING_BAD + rb"])*+"
STRUCTURE = re.compile(
    rb"(?:[^\"{}\[\]'" + RESET_CLASS + rb']++|"' + STRING_CHARS + rb'")*+'
)
STRING_BODY = re.compile(STRING_CHARS)
_WHOLE_STRING = re.compile(rb'"' + STRING_CHARS + rb'"')


def _nested(depth: int) -> bytes:
    """A pattern for one whole object nested at most ``depth`` deep."""
    plain = rb"[^\"{}\[\]'" + RESET_CLASS + rb"]++"
    body = rb'(?:' + plain + rb'|"' + STRING_CHARS + rb'")*+'
    for _ in range(depth - 1):
        inner = rb"\{" + body + rb"\}|\[" + body + rb"\]"
        body = rb'(?:' + plain + rb'|"' + STRING_CHARS + rb'"|' + inner + rb")*+"
    return rb"\{" + body + rb"\}"


# Fast path: a complete request that is already in the buffer, nested at most
# three deep ({"arguments": {"modes": [...]}}), is found by one match.
FAST_DEPTH: Final = 3
FAST_MESSAGE = re.compile(_nested(FAST_DEPTH))
SCALAR = re.compile(rb"[^ \t\r\n{}\[\]\",:'" + STRING_BAD + rb"]++")
RESYNC = re.compile(rb"[\n" + RESET_CLASS + rb"]")
# Garbage at the top level, token by token as QEMU's lexer reads it
# (qobject/json-lexer.c): blanks but the line feed, closers and separators,
# keywords, whole strings (no control character in them: the lexer fails at
# one) and numbers it ends cleanly.  Each must be followed by a byte that ends
# it: a keyword or number at the end of the input may go on ("1." then "{": the
# "{" is in the lexer's error, and begins no request).
GARBAGE_STRING_BODY = re.compile(rb'(?:[^"\\\x00-\x1f\xfe\xff]++|\\[^\x00-\x1f\xfe\xff])*+')
# QEMU's lexer reads a single-quoted string too (which migblockd refuses in a request).
GARBAGE_SQ_STRING_BODY = re.compile(rb"(?:[^'\\\x00-\x1f\xfe\xff]++|\\[^\x00-\x1f\xfe\xff])*+")
GARBAGE_TOKENS = re.compile(
    rb"(?:[ \t\r]++|[}\],:]|[a-z]++(?=[^a-z])|\"" + GARBAGE_STRING_BODY.pattern + rb"\""
    rb"|'" + GARBAGE_SQ_STRING_BODY.pattern + rb"'"
    rb"|-?+(?:0(?=[^.0-9])|(?:0\.[0-9]++|[1-9][0-9]*+(?:\.[0-9]++)?+)"
    rb"(?:[eE][-+]?+[0-9]++)?+(?=[^.eE0-9])))*+")
# A run of what may be a number, and the byte after it: all QEMU's lexer reads
# of one before it ends or fails.
NUMBER_RUN = re.compile(rb"[-+0-9.eE]*+")
# Where a message may begin after garbage, and a line feed.
GARBAGE_STOPS: Final = frozenset(b"{[\n")
NUMBER_START: Final = frozenset(b"-0123456789")
# Where QEMU's lexer stops skipping after an error (IN_RECOVERY): a structural
# character, or a control character but the tab.
RECOVERY_END = re.compile(rb"[{}\[\],:\n\r" + RESET_CLASS + rb"]")
# The body of a single-quoted string, which QEMU's lexer reads as it reads a
# double-quoted one: its brackets count for nothing in a broken message either.
SQ_STRING_CHARS = rb"(?:[^'\\" + STRING_BAD + rb"]++|\\[^" + STRING_BAD + rb"])*+"
SQ_STRING_BODY = re.compile(SQ_STRING_CHARS)
# The rest of a broken message: whole strings and ordinary bytes, up to a
# bracket (counted), a quote that starts a string not whole in the buffer, a
# line feed or a reset byte.
SKIP_BODY = re.compile(
    rb"(?:[^\"'{}\[\]\n" + RESET_CLASS + rb']++|"' + STRING_CHARS + rb'"'
    rb"|'" + SQ_STRING_CHARS + rb"')*+")
RESET_RUN = re.compile(rb"[" + RESET_CLASS + rb"]*+")
# A run of the rest of a broken message with no string in it: brackets and
# ordinary bytes, up to a quote, a line feed or a reset byte.
FLAT = re.compile(rb"[^\"'\n" + RESET_CLASS + rb"]*+")
# A control character, where QEMU's lexer ends a string with an error.
CONTROL = re.compile(rb"[\x00-\x1f]")
BLANKS = re.compile(rb"[ \t\r]*+")

OPENERS: Final = {0x7B: 0x7D, 0x5B: 0x5D}  # { -> }, [ -> ]
CLOSERS: Final = frozenset(b"}]")
QUOTE: Final = 0x22
#: What begins a string to QEMU's lexer.
QUOTES: Final = frozenset(b"\"'")
APOSTROPHE: Final = 0x27
BACKSLASH: Final = 0x5C
LF: Final = 0x0A
RESET_BYTES: Final = frozenset(bytes(range(0x20)) + b"\xfe\xff") - frozenset(b"\t\r\n")
#: What AFTER_RESET swallows: blanks and reset bytes.
BLANKS_AND_RESETS: Final = b" \t\r" + bytes(sorted(RESET_BYTES))


#: :func:`skip_broken` stopped after the broken message's last bracket.
MESSAGE_END: Final = 0
#: :func:`skip_broken` stopped at a line feed or a reset byte.
RESYNC_POINT: Final = 1


#: The brackets still open in a broken message, as QEMU's streamer counts them:
#: ``{`` less ``}``, and ``[`` less ``]``, each on its own.
Open = tuple[int, int]


def open_brackets(stack: bytearray | bytes) -> Open:
    """The counts of a scan's stack of expected closers (``}`` or ``]`` each)."""
    braces = stack.count(0x7D)
    return braces, len(stack) - braces


def brackets_open(text: bytes) -> Open:
    """The counts of brackets open at the end of ``text``, a valid beginning of
    a JSON value (its strings whole)."""
    flat = _WHOLE_STRING.sub(b"", text)
    return flat.count(b"{") - flat.count(b"}"), flat.count(b"[") - flat.count(b"]")


def counted(counts: Open, bracket: int) -> Open:
    """``counts`` after one more bracket token ``bracket``."""
    braces, brackets = counts
    if bracket == 0x7B:
        return braces + 1, brackets
    if bracket == 0x7D:
        return braces - 1, brackets
    return (braces, brackets + 1) if bracket == 0x5B else (braces, brackets - 1)


def message_over(counts: Open) -> bool:
    """Whether QEMU's streamer (``qobject/json-streamer.c``) ends the message at
    these counts: once neither is above zero, or as soon as either is below it
    (``{"a": {]`` ends at its ``]``, however many ``{`` are still open)."""
    braces, brackets = counts
    return braces < 0 or brackets < 0 or (braces <= 0 and brackets <= 0)


def skip_broken(buf: bytearray, n: int, pos: int, counts: Open,
                quote: int) -> tuple[int, Open, int, int | None]:
    """Step over the rest of a message broken with ``counts`` brackets open
    (inside a string quoted with ``quote``, if not 0), from ``pos``, counting
    brackets as QEMU's streamer does.  Returns ``(pos, counts, quote, stop)``:
    ``stop`` None when input ran out (go on from there later), :data:`MESSAGE_END`
    with ``pos`` after its last bracket, :data:`RESYNC_POINT` with ``pos`` at a
    line feed or a reset byte (``quote`` then says whether it broke a string)."""
    while True:
        if quote:
            p = match_end(STRING_BODY if quote == QUOTE else SQ_STRING_BODY, buf, pos)
            if p >= n:
                return p, counts, quote, None
            c = buf[p]
            if c == quote:
                quote, pos = 0, p + 1
                continue
            if c == BACKSLASH:
                if p + 1 >= n:
                    return p, counts, quote, None  # the escape is split across reads
                p += 1  # "\X" with X a line feed or a reset byte
            return p, counts, quote, RESYNC_POINT
        p = match_end(SKIP_BODY, buf, pos)
        if p >= n:
            return p, counts, 0, None
        c = buf[p]
        if c in QUOTES:
            quote, pos = c, p + 1
            continue
        if c in OPENERS or c in CLOSERS:
            end = match_end(FLAT, buf, p)
            if end - p >= _BULK:
                counts, over = _count_run(buf, p, end, counts)
                if over < 0:
                    pos = end
                    continue
                return over, counts, 0, MESSAGE_END
            counts = counted(counts, c)
            pos = p + 1
            if not message_over(counts):
                continue
            return pos, counts, 0, MESSAGE_END
        return p, counts, 0, RESYNC_POINT


#: Runs at least this long are counted in bulk (:func:`_count_run`): a step of
#: the loop above per bracket took 1.5 s for 1 MiB of ``[],``.
_BULK: Final = 64
#: Bulk counts go this many bytes at a time.
_CHUNK: Final = 1 << 16
_DELTA: Final = tuple(1 if b in b"{[" else -1 if b in b"}]" else 0 for b in range(256))
_OTHER_THAN_BRACES: Final = bytes(b for b in range(256) if b not in b"{}")
_OTHER_THAN_SQUARE: Final = bytes(b for b in range(256) if b not in b"[]")
_OTHER_THAN_BRACKETS: Final = bytes(b for b in range(256) if b not in b"{}[]")


def _lowest(run: bytes, start: int) -> int:
    """The lowest a count that is ``start`` before ``run`` gets in it (C-level
    passes: a running sum and its minimum, no step of Python per bracket)."""
    return min(accumulate(map(_DELTA.__getitem__, run), initial=start))


def _count_run(buf: bytearray, start: int, end: int, counts: Open) -> tuple[Open, int]:
    """:func:`skip_broken` over ``buf[start:end]``, which holds no string: the counts
    after it and -1, or the counts where the message is over and the position
    after its last bracket.  The message is over where either count is below
    zero or both are zero (their sum is, neither being below): three running
    minimums tell whether that happens in a chunk, and only the chunk where it
    does is walked bracket by bracket."""
    braces, brackets = counts
    for at in range(start, end, _CHUNK):
        run = bytes(buf[at : min(end, at + _CHUNK)])
        curly = run.translate(None, _OTHER_THAN_BRACES)
        square = run.translate(None, _OTHER_THAN_SQUARE)
        low_curly = _lowest(curly, braces)
        low_square = _lowest(square, brackets) if low_curly >= 0 else -1
        if low_curly >= 0 and low_square >= 0 and (
                low_curly > 0 or low_square > 0
                or _lowest(run.translate(None, _OTHER_THAN_BRACKETS), braces + brackets) > 0):
            braces += curly.count(b"{") - curly.count(b"}")
            brackets += square.count(b"[") - square.count(b"]")
            continue
        for i, c in enumerate(run):
            if c in OPENERS or c in CLOSERS:
                braces, brackets = counted((braces, brackets), c)
                if message_over((braces, brackets)):
                    return (braces, brackets), at + i + 1
        raise AssertionError("the running minimums said the message ends in this chunk")
    return (braces, brackets), -1


def match_end(pattern: re.Pattern[bytes], buf: bytearray, pos: int, endpos: int = -1) -> int:
    # All the patterns used here can match the empty string, so match() never fails.
    m = pattern.match(buf, pos) if endpos < 0 else pattern.match(buf, pos, endpos)
    assert m is not None
    return m.end()

"""QEMU's error for an unfinished message, from its complete lines.

QEMU's streamer hands its parser a message only once its brackets balance, but
its lexer judges every byte as it comes: a line feed ends a token, and a lexical
error there makes QEMU forget the message and read what follows as new input.
The daemon must answer the same, in order with the other replies, without
waiting for a message that may never end (``qemu.qmp`` sends no line feed): the
framing (:mod:`migblockd.qmp.lines`) asks :func:`prefix_error` about the
complete lines of a message not yet whole, and skips what it says to skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from migblockd.qmp.characters import RAW, first_bad_byte
from migblockd.qmp.decoder import SAME_LENGTH, Reject, apostrophes, finite_numbers, read_on
from migblockd.qmp.lexer import PARSE_ERROR_PREFIX, first_lexical_error
from migblockd.qmp.wording import (
    BEFORE_OPEN_STRING,
    bad_utf8,
    describe_error,
    qemu_reason,
    viable,
)

__all__ = ["LineError", "prefix_error"]


@dataclass(frozen=True, slots=True)
class LineError:
    """What :func:`prefix_error` found in an unfinished message's lines."""

    desc: str  #: QEMU's words
    #: The offset in the buffer from which the rest of the message is skipped:
    #: where the error was found, or the line feed of the first line a
    #: line-by-line check would have refused.
    skip: int
    #: The error is QEMU's lexer's: its streamer forgets the message there and
    #: reads what follows as new input.  Else its parser's, which sees the
    #: message whole once its brackets balance.
    lexical: bool


def prefix_error(buf: bytearray, start: int, lf: int) -> LineError | None:
    """The error in ``buf[start:lf]``, the complete lines of an unfinished message
    (and the "{" that begins the next, if any); None when those lines are a
    valid beginning of a JSON value."""
    text = buf[start:lf].decode("utf-8", RAW)
    try:
        # QEMU's parser reads on past 1e400: it is refused once the message is whole.
        read_on(apostrophes(text, SAME_LENGTH))
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
        lexical = first_lexical_error(scope)
        desc = (lexical or _bad_utf8_before(text, exc.pos)
                or PARSE_ERROR_PREFIX + qemu_reason(exc.msg, text, exc.pos))
        at = exc.pos
        if lexical is None:
            # Skipped whole from the string the error is in, if in one (a bad escape):
            # from inside it, its closing quote would be taken for an opening one.
            before = BEFORE_OPEN_STRING.match(text, 0, at)
            at = before.end() if before is not None else at
        return LineError(desc, start + len(text[:at].encode("utf-8", RAW)), lexical is not None)
    except (Reject, ValueError, RecursionError):
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
    desc_or_none = describe_error(finite_numbers(text))
    feeds: list[int] = []
    at = buf.find(b"\n", start, lf)
    while 0 <= at < lf:
        feeds.append(at)
        at = buf.find(b"\n", at + 1, lf)
    lo, hi = 0, len(feeds)  # feeds[hi:] are refused, feeds[:lo] viable
    while lo < hi:
        mid = (lo + hi) // 2
        if viable(buf[start : feeds[mid]].decode("utf-8", RAW)):
            lo = mid + 1
        else:
            hi = mid
    skip = feeds[lo] if lo < len(feeds) else lf
    its_lexer = desc_or_none is not None and desc_or_none == first_lexical_error(text)
    if not its_lexer:
        desc_or_none = _bad_utf8_before(text, None) or desc_or_none
    return LineError(desc_or_none or PARSE_ERROR_PREFIX + "expecting value", skip, its_lexer)


def _bad_utf8_before(text: str, pos: int | None) -> str | None:
    """QEMU's error for the first string of ``text`` (decoded with ``RAW``) with bytes
    that are not UTF-8, if its parser meets that string before the error json
    found at ``pos`` (None: a hook's, whose position is not known: the string
    is met first if what precedes it is a valid beginning)."""
    first = first_bad_byte(text)
    if first is not None and (pos is None or first < pos):
        return bad_utf8(text, first)
    return None

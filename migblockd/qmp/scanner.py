"""The scan behind :class:`~migblockd.qmp.framing.StreamDecoder`: message boundaries.

:class:`Scanner` finds message boundaries, mode by mode: where the next message
begins, a top-level scalar, and the skipping of what is left of a bad one.  A
message begun with a bracket or a quote is scanned to its end by its base class,
:class:`~migblockd.qmp.structure.Structure`.  Both step with compiled regular
expressions (:mod:`migblockd.qmp.patterns`) over whole runs of ordinary bytes
and whole strings at C speed, stopping only at brackets, quotes and bytes that
matter for error recovery; each complete message is then parsed with ``json``
on its exact slice (:mod:`migblockd.qmp.wording`).  No Python code runs per
byte.

Limits are enforced while scanning, so a 2000-deep ``[[[[...`` or an endless
string is refused as soon as it passes the limit, and nothing ever recurses
deeper than ``max_nesting`` (never a ``RecursionError``).

The scan is apart from the decoder's interface (:mod:`migblockd.qmp.framing`:
buffering, lookahead, end of input) and from the recovery after a bad message
(:mod:`migblockd.qmp.resync`, and :mod:`migblockd.qmp.lines` for the lines of
one that is unfinished), which it calls on its error paths.
"""

from __future__ import annotations

__all__ = ["NEED_DATA", "Scanner"]

from migblockd.qmp.lexer import (
    PARSE_ERROR_PREFIX,
    first_token_end,
    lexer_waits,
    number_cut_short,
    stray,
)
from migblockd.qmp.patterns import (
    APOSTROPHE,
    BLANKS,
    CLOSERS,
    FAST_DEPTH,
    FAST_MESSAGE,
    GARBAGE_STOPS,
    LF,
    MESSAGE_END,
    OPENERS,
    QUOTE,
    RESET_BYTES,
    RESET_RUN,
    RESYNC,
    SCALAR,
    WHITESPACE,
    match_end,
    skip_broken,
)
from migblockd.qmp.resync import (
    AFTER_RESET,
    IDLE,
    SCALAR_MODE,
    SKIP,
    SKIP_LINE,
    SKIP_REST,
    SKIP_TOP,
    STRUCT,
)
from migblockd.qmp.structure import NEED_DATA, Structure
from migblockd.qmp.wording import (
    SINGLE_QUOTE,
    TOKEN_SIZE_EXCEEDED,
    ParseError,
    describe_error,
)


class Scanner(Structure):
    """:class:`~migblockd.qmp.framing.StreamDecoder`'s scan, mode by mode.

    The state it works on is set by ``StreamDecoder.__init__``.
    """

    def _advance(self) -> object:
        buf = self._buf
        n = len(buf)
        while True:
            mode = self._mode
            if mode == IDLE:
                i = match_end(WHITESPACE, buf, self._scan)
                self._start = self._scan = i
                if i >= n:
                    return NEED_DATA
                c = buf[i]
                self._checked = self._lexed = i
                self._digits_from = -1
                self._tally = 0
                if c == 0x7B and self.max_nesting >= FAST_DEPTH:
                    m = FAST_MESSAGE.match(buf, i, min(n, i + self.max_message_size))
                    if m is not None:
                        self._mode = STRUCT
                        item = self._finish(buf, m.end())
                        if item is None:
                            continue
                        return item
                closer = OPENERS.get(c)
                if closer is not None:
                    self._stack.append(closer)
                    self._mode = STRUCT
                    self._scan = i + 1
                elif c == QUOTE:
                    self._mode = STRUCT  # a top-level string: empty stack
                    self._in_string = True
                    self._string_start = i
                    self._scan = i + 1
                elif c in RESET_BYTES:
                    end = match_end(RESET_RUN, buf, i)
                    self._mode = AFTER_RESET
                    self._recovering = True  # QEMU's lexer failed at it
                    self._start = self._scan = end
                    # Name the first byte only: the run may continue in the next read.
                    return ParseError(stray(bytes(buf[i : i + 1])))
                elif c in CLOSERS or c in b",:":
                    self._skip_to_top(i + 1)
                    return ParseError(PARSE_ERROR_PREFIX + "expecting value")
                elif c == APOSTROPHE:
                    # QEMU's lexer reads a single-quoted string, a "{" in it
                    # beginning nothing: the garbage begins inside it.
                    self._skip_to_top(i + 1)
                    self._in_string = True
                    self._quote = APOSTROPHE
                    return ParseError(SINGLE_QUOTE)
                else:
                    self._mode = SCALAR_MODE
            elif mode == STRUCT:
                item = self._scan_structure(buf, n)
                if item is not None:
                    return item
            elif mode == SCALAR_MODE:
                limit = self._start + self.max_message_size
                end = match_end(SCALAR, buf, self._start, min(n, limit + 1))
                if end > limit:
                    if lexer_waits(buf, self._start, limit):
                        self._skip_to_top(limit)
                        return ParseError(TOKEN_SIZE_EXCEEDED)
                    # QEMU's lexer ended the first token, or failed, within the
                    # limit (``12\xac...``, ``@@@...``): as if the run stopped there.
                    end = limit
                if end == n and not self._eof and lexer_waits(buf, self._start, end):
                    return NEED_DATA  # a number or keyword ends at its delimiter
                start = self._start
                item = self._complete(end)
                if isinstance(item, ParseError):
                    split = first_token_end(bytes(buf[start:end]))
                    if split is not None:
                        # Two tokens to QEMU's lexer: a value (not an object,
                        # which the session says), then the rest on its own.
                        self._start = start
                        return self._complete(start + split)
                    if end < n and buf[end] in RESET_BYTES and lexer_waits(buf, start, end) \
                            and not number_cut_short(bytes(buf[start:end])):
                        # QEMU's lexer ends a keyword or a whole number at any byte,
                        # its parser answers it, and the reset byte, read afresh, is
                        # an error of its own ("tru" then a reset: two errors).
                        return item
                    if end < n:
                        # QEMU's lexer names a number cut short with the byte it
                        # could not take ("stray '1.}'", "stray '-\n'"), and that
                        # byte is gone with it: the "{" of "1e+{" begins no request.
                        if (lexed := self._lexer_failed(buf, start, end + 1)) is not None:
                            return lexed
                        item = ParseError(describe_error(bytes(buf[start : end + 1]))
                                          or item.desc)
                    elif (lexed := self._lexer_failed(buf, start, end)) is not None:
                        return lexed  # QEMU's lexer failed: it skips on from there
                    elif number_cut_short(bytes(buf[start:end])):
                        # The input ended it: named whole, as a byte that cut it
                        # short would be, not as Python's parser stops ("1e" of
                        # "1e+", "expecting value" of "-").
                        item = ParseError(stray(bytes(buf[start:end])))
                    # A bad top-level token: what follows up to a new request is too.
                    self._skip_to_top(end)
                return item
            elif mode == SKIP:
                m = RESYNC.search(buf, self._scan)
                if m is None:
                    self._scan = n
                    return NEED_DATA
                self._resync_at(buf, m.start())
            elif mode == SKIP_TOP:
                if not self._skip_garbage(buf, n):
                    return NEED_DATA
            elif mode == SKIP_REST:
                scan, self._skip_open, quote, stop = skip_broken(
                    buf, n, self._scan, self._skip_open, self._quote if self._in_string else 0)
                self._in_string = quote != 0
                self._quote = quote or self._quote
                failed = self._rest_lexed(buf, n if stop is None else scan)
                if failed >= 0:
                    # QEMU's streamer forgets the message at its lexer's error.
                    self._skip_to_top(failed)
                    self._recovering = True
                    continue
                self._scan = scan
                if stop is None:
                    return NEED_DATA
                if stop == MESSAGE_END:
                    self._mode = IDLE
                    self._start = self._scan
                elif buf[self._scan] == LF and self._in_string:
                    # QEMU's lexer fails at a line feed in a string, its streamer
                    # forgets the message, and what follows is read as after a
                    # line feed that broke a string at the top level: the rest of
                    # this line's quotes begin no string, as they did here, out of
                    # step with the request glued after them, which they swallowed.
                    self._mode = AFTER_RESET
                    self._recovering = True
                    self._in_string = False
                    self._start = self._scan = self._scan + 1
                elif buf[self._scan] == LF:
                    self._mode = SKIP_LINE
                    self._scan += 1
                else:
                    self._resync_at(buf, self._scan)
            elif mode == SKIP_LINE:
                if not self._next_line(buf, n):
                    return NEED_DATA
            else:  # AFTER_RESET (or a line feed that broke a string)
                # A run of reset bytes is one bad message, however it was split
                # across reads, so swallow the rest of the run.  What follows
                # on the same line is the rest of the message the reset broke
                # (one bad message, one error), unless a new request starts.
                run = match_end(RESET_RUN, buf, self._scan)
                end = match_end(BLANKS, buf, run)
                # QEMU's lexer fails at each reset byte, and its recovery ends at a
                # control character: a carriage return after them (which the
                # blanks take), whatever read it came in, and a quote after that
                # begins a string again.
                if run > self._scan:
                    self._recovering = True
                if 0x0D in buf[run:end]:
                    self._recovering = False
                self._start = self._scan = end
                if end == n:
                    return NEED_DATA
                c = buf[end]
                if c in GARBAGE_STOPS:  # a "{", a "[" or a line feed
                    self._mode = IDLE
                elif c not in RESET_BYTES:
                    # The rest of what the reset (or the line feed) broke: as
                    # QEMU's lexer skips it after its error, to a structural
                    # character, its quotes beginning no string (one would
                    # swallow a request glued after it), unless a carriage
                    # return ended the skipping.
                    self._mode = SKIP_TOP


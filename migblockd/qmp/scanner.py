"""The scan behind :class:`~migblockd.qmp.framing.StreamDecoder`: message boundaries.

:class:`Scanner` finds message boundaries with compiled regular expressions
(:mod:`migblockd.qmp.patterns`) that step over whole runs of ordinary bytes and
whole strings at C speed, stopping only at brackets, quotes and bytes that
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

from typing import Final

from migblockd.qmp.characters import RAW
from migblockd.qmp.lexer import (
    PARSE_ERROR_PREFIX,
    first_token_end,
    lexer_waits,
    lexical_error_before,
    stray,
)
from migblockd.qmp.limits import count_tokens
from migblockd.qmp.lines import SOUND, LineCheck
from migblockd.qmp.patterns import (
    APOSTROPHE,
    BACKSLASH,
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
    STRING_BODY,
    STRUCTURE,
    WHITESPACE,
    counted,
    match_end,
    open_brackets,
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
from migblockd.qmp.wording import (
    NESTING_EXCEEDED,
    SINGLE_QUOTE,
    TOKEN_COUNT_EXCEEDED,
    TOKEN_SIZE_EXCEEDED,
    ParseError,
    decode_message,
    describe_error,
)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`StreamDecoder.next_message` when no complete message is buffered.
NEED_DATA: Final = _NeedData()


class Scanner(LineCheck):
    """:class:`~migblockd.qmp.framing.StreamDecoder`'s scan, mode by mode.

    The state it works on is set by ``StreamDecoder.__init__``.
    """

    _buf: bytearray
    _eof: bool
    _string_start: int
    _tally: int
    max_message_size: int
    max_nesting: int
    max_tokens: int

    def _complete(self, end: int) -> object:
        """The message is ``buf[start:end]``; go idle after it and decode it."""
        data = self._buf[self._start : end]
        self._tentative = False
        self._mode = IDLE
        self._start = self._scan = end
        self._stack.clear()
        self._in_string = False
        value = decode_message(data, self.max_tokens)
        # Every token is at least one byte: only a longer message can have too many.
        if (
            len(data) > self.max_tokens
            and not isinstance(value, ParseError)
            and count_tokens(value, self.max_tokens) > self.max_tokens
        ):
            return ParseError(TOKEN_COUNT_EXCEEDED)
        return value

    def _finish(self, buf: bytearray, end: int) -> object:
        """A balanced message ends at ``end``: its value, or its first error (None:
        it was garbage, skipped; go on)."""
        if self._garbage_line(buf, end):
            return None
        start = self._start
        item = self._complete(end)
        if isinstance(item, ParseError) and buf.find(b"\n", start, end) >= 0:
            # As if the lines had been checked while the message trickled in.
            self._mode = STRUCT
            self._start = start
            error = self._check_lines(buf, end)
            if error is not None:
                return error
            self._mode = IDLE
            self._start = end
        if isinstance(item, ParseError) and (lexed := self._lexer_failed(buf, start, end)) \
                is not None and lexed.desc == item.desc:
            return lexed
        return item

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
                scan, self._skip_open, self._in_string, stop = skip_broken(
                    buf, n, self._scan, self._skip_open, self._in_string)
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

    def _too_many_tokens(self, buf: bytearray, p: int) -> object:
        """The message has more than ``max_tokens`` tokens by ``buf[p]``, an opening
        bracket or a string's closing quote: refused as QEMU's streamer refuses
        it, at the token past the limit, unless its lexer failed before that.
        The rest is skipped (in bulk), so a message of many brackets costs this
        loop at most ``max_tokens`` steps (``[],`` over 1 MiB took 2 s)."""
        if (verdict := self._lines_verdict(buf, p)) is not SOUND:
            return verdict
        text = bytes(buf[self._start : p + 1]).decode("utf-8", RAW)
        desc = lexical_error_before(text, self.max_tokens)
        self._skip_rest(p + 1, open_brackets(self._stack))
        return ParseError(desc or TOKEN_COUNT_EXCEEDED)

    def _scan_structure(self, buf: bytearray, n: int) -> object | None:
        """Scan on inside a structure or top-level string; None means "mode changed, go on"."""
        limit = self._start + self.max_message_size
        stop = min(n, limit)
        stack = self._stack
        while True:
            if self._in_string:
                p = match_end(STRING_BODY, buf, self._scan, stop)
                if p < stop:
                    c = buf[p]
                    if c == QUOTE:
                        self._in_string = False
                        self._scan = p + 1
                        if not stack:
                            return self._finish(buf, p + 1)
                        self._tally += 1
                        if self._tally > self.max_tokens:
                            return self._too_many_tokens(buf, p)
                        continue
                    if c != BACKSLASH:
                        return self._bad_byte(buf, p, self._string_start)
                    if p + 1 < stop:
                        # The body stopped at "\X" with X invalid in a string.
                        return self._bad_byte(buf, p + 1, self._string_start)
                    # else the escape is split at the end of the input: wait
                self._scan = p
            else:
                p = match_end(STRUCTURE, buf, self._scan, stop)
                self._scan = p
                if p < stop:
                    c = buf[p]
                    closer = OPENERS.get(c)
                    if closer is not None:
                        if len(stack) >= self.max_nesting:
                            if (verdict := self._lines_verdict(buf, p)) is not SOUND:
                                return verdict
                            # QEMU's lexer fails as the bytes arrive, before its
                            # streamer counts this bracket: its error comes first.
                            if (lexed := self._lexer_failed(buf, self._start, p + 1)) is not None:
                                return lexed
                            # Its streamer counts tokens before it checks the nesting,
                            # and openers alone are counted as they come here.
                            deepest = (TOKEN_COUNT_EXCEEDED if self._past_token_limit(
                                buf, p + 1) else NESTING_EXCEEDED)
                            self._skip_rest(p + 1, counted(open_brackets(stack), c))
                            return ParseError(deepest)
                        stack.append(closer)
                        self._scan = p + 1
                        # Openers and strings are tokens each: past the limit,
                        # no need to scan on (a step here per bracket).
                        self._tally += 1
                        if self._tally > self.max_tokens:
                            return self._too_many_tokens(buf, p)
                        continue
                    if c in CLOSERS:
                        if c != stack[-1]:
                            if (verdict := self._lines_verdict(buf, p)) is not SOUND:
                                return verdict
                            if (lexed := self._lexer_failed(buf, self._start, p + 1)) is not None:
                                return lexed
                            desc = describe_error(bytes(buf[self._start : p + 1]))
                            if self._past_token_limit(buf, p + 1):
                                desc = TOKEN_COUNT_EXCEEDED  # refused before it is parsed
                            # The bad closer still closes a level, as in QEMU's streamer.
                            self._skip_rest(p + 1, counted(open_brackets(stack), c), lex=True)
                            return ParseError(desc or PARSE_ERROR_PREFIX + "expecting value")
                        stack.pop()
                        if not stack:
                            return self._finish(buf, p + 1)
                        self._scan = p + 1
                        continue
                    if c == QUOTE:
                        self._in_string = True
                        self._string_start = p
                        self._scan = p + 1
                        continue
                    if c == APOSTROPHE:
                        if (verdict := self._lines_verdict(buf, p)) is not SOUND:
                            return verdict
                        # QEMU's lexer reads a single quote, so its error is one
                        # before it, if any (a number cut short by it included).
                        if (lexed := self._lexer_failed(buf, self._start, p + 1)) is not None:
                            return lexed
                        quoted = (TOKEN_COUNT_EXCEEDED if self._past_token_limit(buf, p)
                                  else SINGLE_QUOTE)
                        self._skip_rest(p + 1, open_brackets(stack))
                        return ParseError(quoted)
                    return self._bad_byte(buf, p)
            # Out of input (or out of allowance) in the middle of a message.
            if (verdict := self._lines_verdict(buf, self._scan)) is not SOUND:
                return verdict
            if (lexed := self._lexer_failed_so_far(buf, self._scan)) is not None:
                return lexed
            if limit <= n:
                # Numbers, commas and colons are counted only once a message is whole:
                # more than max-tokens of them within the size, QEMU's streamer refused
                # the message for its tokens first (1,2,... has 16,385 by 32 KiB).
                oversized = (TOKEN_COUNT_EXCEEDED if self._past_token_limit(buf, limit)
                             else TOKEN_SIZE_EXCEEDED)
                # From where the scan stopped: in a string that may be an escape's
                # backslash, whose escaped quote must not end the string.
                self._skip_rest(self._scan, open_brackets(stack), self._in_string)
                return ParseError(oversized)
            if self._eof:
                cut = (TOKEN_COUNT_EXCEEDED if self._past_token_limit(buf, n)
                       else PARSE_ERROR_PREFIX + "premature EOI")
                self._skip_from(n)
                return ParseError(cut)
            return NEED_DATA

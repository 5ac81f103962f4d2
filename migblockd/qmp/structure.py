"""The scan inside one message: its brackets and strings, within the limits, to its end.

Once the scan of :class:`~migblockd.qmp.scanner.Scanner` has found where a
message begins with a bracket (or a top-level string), :class:`Structure` steps
through it with compiled regular expressions (:mod:`migblockd.qmp.patterns`)
that take whole runs of ordinary bytes and whole strings at C speed, stopping
only at brackets, quotes and bytes that matter.  It counts the nesting, and the
brackets and strings among the tokens, as they come, and refuses the message as
soon as it passes a limit (size, nesting, tokens), with the error QEMU's
streamer gives first (``qobject/json-streamer.c``).  Once the message's last
bracket closes, it is parsed with ``json`` on its exact slice
(:mod:`migblockd.qmp.wording`).

It is apart from the scan between messages (where one begins, a top-level
scalar, the skipping of what is left of a bad one): inside a message, the scan
follows its brackets and strings and their limits; between messages, what
begins one and what is skipped.  An error found inside one is handed to the
recovery it builds on (:class:`~migblockd.qmp.lines.LineCheck` and its bases).
"""

from __future__ import annotations

from typing import Final

from migblockd.qmp.characters import RAW
from migblockd.qmp.lexer import PARSE_ERROR_PREFIX, lexical_error_before
from migblockd.qmp.limits import count_tokens
from migblockd.qmp.lines import SOUND, LineCheck
from migblockd.qmp.patterns import (
    APOSTROPHE,
    BACKSLASH,
    CLOSERS,
    OPENERS,
    QUOTE,
    STRING_BODY,
    STRUCTURE,
    counted,
    match_end,
    open_brackets,
)
from migblockd.qmp.resync import IDLE, STRUCT
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


class Structure(LineCheck):
    """The scan of a message begun with a bracket or a quote, and its decoding once whole.

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

    def _earlier_error(self, buf: bytearray, p: int) -> object:
        """The message is wrong at ``buf[p]`` (a bracket past the nesting, a closer
        that matches none, a single quote): what is answered before that, else
        :data:`SOUND`.  Its lines' verdict first (:meth:`_lines_verdict`; None: the
        message was garbage, skipped), then QEMU's lexer's error up to and with
        that byte: the lexer fails as the bytes arrive, before the streamer looks
        at the bracket or the parser at the quote."""
        if (verdict := self._lines_verdict(buf, p)) is not SOUND:
            return verdict
        lexed = self._lexer_failed(buf, self._start, p + 1)
        return SOUND if lexed is None else lexed

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
                            # QEMU's lexer fails as the bytes arrive, before its
                            # streamer counts this bracket: its error comes first.
                            if (earlier := self._earlier_error(buf, p)) is not SOUND:
                                return earlier
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
                            if (earlier := self._earlier_error(buf, p)) is not SOUND:
                                return earlier
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
                        # QEMU's lexer reads a single quote, so its error is one
                        # before it, if any (a number cut short by it included).
                        if (earlier := self._earlier_error(buf, p)) is not SOUND:
                            return earlier
                        quoted = (TOKEN_COUNT_EXCEEDED if self._past_token_limit(buf, p)
                                  else SINGLE_QUOTE)
                        # The rest begins in the string the quote opens (brackets
                        # in it count for nothing), as QEMU's lexer reads it.
                        self._skip_rest(p + 1, open_brackets(stack), True, quote=APOSTROPHE)
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

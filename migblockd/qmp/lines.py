"""The lines of an unfinished message, checked as they arrive.

A message whose brackets never balance would swallow every request after it
(QEMU's streamer waits for them, ``qobject/json-streamer.c``), so the first
4 KiB of an unfinished message are parsed at each line feed, with the ``{``
that begins the next line.  An error found there is reported at once, and
decoding resumes at that ``{`` when the error is there (the message cannot
go on with it: a line-based client's next request).  Else the rest of the
message is skipped as :class:`~migblockd.qmp.resync.Resync` skips a broken
one, its lines with it, unless the error is one of QEMU's lexer, after which
QEMU reads on as if a new message began: then decoding resumes after the
line feed.

Every error path of the scan asks :meth:`LineCheck._lines_verdict` first, so
that what a message's lines hold is answered before what comes after them,
and the outcome does not depend on how the input was split into reads.
"""

from __future__ import annotations

from typing import Final

from migblockd.qmp.characters import RAW
from migblockd.qmp.lexer import lexical_error, lexical_failure_bytes, more_tokens_than, stray
from migblockd.qmp.lexing import Lexing
from migblockd.qmp.patterns import CONTROL, LF, brackets_open
from migblockd.qmp.resync import AFTER_RESET, IDLE
from migblockd.qmp.unfinished import prefix_error
from migblockd.qmp.wording import TOKEN_COUNT_EXCEEDED, ParseError

_LINE_CHECK_WINDOW: Final = 4096
#: :meth:`LineCheck._lines_verdict`: nothing found, go on as planned.
SOUND: Final = object()


class LineCheck(Lexing):
    """The checks of an unfinished message's lines (see the module's docstring).

    The state it works on is set by ``StreamDecoder.__init__``.
    """

    def _lines_verdict(self, buf: bytearray, end: int) -> object:
        """Before reporting an error at ``end`` (or waiting for more input): None if
        the message was garbage and is skipped (go on), its lines' own error if
        they hold an earlier one, else :data:`SOUND`.  Every path runs this, so
        the outcome does not depend on how the input was split."""
        if self._garbage_line(buf, end):
            return None
        error = self._check_lines(buf, end)
        return SOUND if error is None else error

    def _garbage_line(self, buf: bytearray, end: int) -> bool:
        """Skip the message if a "{" found in garbage began it (see SKIP_TOP) and
        QEMU's lexer fails in it, or it runs on past a line feed, before ``end``:
        that "{" was garbage too (:meth:`_garbage_lexed`), and a line-based
        client's next request follows the line feed.  Without line
        feeds nothing changes.  Applied wherever the message's lines are checked,
        so that the outcome does not depend on how the input was split."""
        if not self._tentative:
            return False
        lf = buf.find(b"\n", self._start, end)
        stop = end if lf < 0 else lf
        if self._in_string:
            stop = min(stop, self._string_start)  # the scan checks the string's bytes
        if self._garbage_lexed(buf, stop):
            return True
        if lf < 0:
            return False
        self._skip_from(lf)
        return True

    def _check_lines(self, buf: bytearray, end: int) -> ParseError | None:
        """Catch a syntax error in the complete lines of a message.

        The regex scan only tracks brackets, so ``{"execute": "x" garbage``
        followed by a newline and the next request would otherwise wait for a
        closing brace that never comes, swallowing every request after it.
        So whenever a message spans a line feed, what it holds up to the last
        one is parsed: an error inside (not at the end, where input merely ran
        out) is reported at once, and the rest of the message is skipped from
        it (:meth:`_skip_rest`), or up to the line feed after it for an error
        of QEMU's lexer.  The same rule applies when the message turns out bad
        in other ways, so the outcome does not depend on how input was split.

        A "{" that begins the line after the last line feed is checked with
        them: where the message cannot go on with it, that "{" is a line-based
        client's next request, and decoding resumes there (``[1, 2`` then a
        request on the next line: one error, and the request runs, however the
        input was split).

        Only the first ``_LINE_CHECK_WINDOW`` bytes of a message are checked
        this way: requests are short, and a peer trickling a huge multi-line
        message cannot make the checks cost more than that per line.
        """
        start = self._start
        window = min(end, start + _LINE_CHECK_WINDOW)
        stop = lf = buf.rfind(b"\n", max(start, self._checked), window)
        if 0 <= lf < window - 1 and buf[lf + 1] == 0x7B:
            stop = lf + 2
        if stop <= self._checked:
            return None
        checked, self._checked = self._checked, stop
        found = prefix_error(buf, start, stop)
        if found is None:
            return None  # a valid beginning, to be continued
        if (lexed := self._lexed_before_lines(buf, checked, lf)) is not None:
            return lexed
        skip = found.skip
        # Past max_tokens tokens by the token in error, QEMU's streamer refused the
        # message for them first (json-streamer.c).
        desc = TOKEN_COUNT_EXCEEDED if self._past_token_limit(buf, skip + 1) else found.desc
        if skip < stop and buf[skip] == 0x7B and self._begins_line(buf, skip):
            self._skip_from(skip)
            self._mode = IDLE  # not skipping after all: a request begins here
        elif found.lexical:
            self._skip_from(min(skip, lf))  # QEMU reads on after its lexer's error
        else:
            # QEMU's parser would answer the message once, whole: its lines after
            # the error are skipped with it.
            skip = min(skip, lf)
            self._skip_rest(skip, brackets_open(bytes(buf[start:skip])))
        return ParseError(desc)

    def _lexed_before(self, buf: bytearray, end: int) -> ParseError | None:
        """The error of QEMU's lexer, as :meth:`_lexer_failed`, if it fails before
        ``end`` (not at a number ``end`` cuts short): the input up to there came
        before, and a message begun in garbage, whose lexing waits
        (:meth:`_lexer_failed_so_far`), excepted."""
        if self._tentative:
            return None
        found = lexical_failure_bytes(bytes(buf[self._start : end]))
        return None if found is None else self._lexer_failed(buf, self._start,
                                                             self._start + found[1])

    def _lexed_before_lines(self, buf: bytearray, checked: int, lf: int) -> ParseError | None:
        """The error of QEMU's lexer, as :meth:`_lexer_failed`, when it fails in the
        message's lines before the line feed at ``lf`` and no line before the byte
        it fails at holds an error (``checked``: where the lines were checked to
        before).  Input that came a byte at a time met that byte before the line
        feed, and the lexer's error was answered then, decoding going on after it
        as in QEMU: judging the lines first instead skipped a request glued after
        the error (``{`` and a byte that is not ASCII, then a request and a line
        feed) when the line came in one read."""
        start = self._start
        found = lexical_failure_bytes(bytes(buf[start:lf]))
        if found is None:
            return None
        fail = start + found[1] - 1  # the byte it fails at (that cut a number short)
        if fail >= lf:
            return None
        # A line feed that cuts a number short came before the lexer read it.
        before = buf.rfind(b"\n", max(start, checked), fail + 1)
        if before >= 0:
            stop = before + 2 if before + 1 < fail and buf[before + 1] == 0x7B else before
            if prefix_error(buf, start, stop) is not None:
                return None  # a line before it was answered first
        return self._lexer_failed(buf, start, fail + 1)

    def _past_token_limit(self, buf: bytearray, pos: int) -> bool:
        """More than ``max_tokens`` tokens before ``buf[pos]``, where QEMU's lexer
        fails: its streamer refused the message for them first (``json-streamer.c``)."""
        return pos - self._start > self.max_tokens and more_tokens_than(
            bytes(buf[self._start : pos]).decode("utf-8", RAW), self.max_tokens)

    def _begins_line(self, buf: bytearray, pos: int) -> bool:
        """``buf[pos]`` is the first byte of a line inside the message."""
        return pos > self._start and buf[pos - 1] == LF

    def _bad_byte(self, buf: bytearray, p: int, token: int = -1) -> object:
        """A control character (or 0xFE/0xFF) where JSON allows none: the message is
        lost.  ``token``: where the string it is in began; QEMU's lexer names the
        token so far (``stray '"tab\t'``).  None: it was garbage, skipped."""
        if (verdict := self._lines_verdict(buf, p)) is not SOUND:
            return verdict
        # QEMU's lexer fails at the first token it cannot read, which may come
        # before this one (its parser, which the scan stands in for, never ran).
        # Before the quote or the byte: it failed as that came, and reads on from
        # there, as when the input comes a byte at a time (``[+{...}`` then 0xFF:
        # the request in between runs).
        if (lexed := self._lexed_before(buf, token if token >= 0 else p)) is not None:
            return lexed
        # With the quote or the byte itself: a number before it is cut short there.
        earlier = lexical_error(bytes(buf[self._start : (token if token >= 0 else p) + 1]))
        # (None came before it: one here is at it, after the token past the limit.)
        if self._past_token_limit(buf, token if token >= 0 else p):
            earlier = TOKEN_COUNT_EXCEEDED
        if token < 0:
            # Skipping starts at the byte itself: a reset byte is its own
            # resynchronisation point.
            self._skip_from(p)
            return ParseError(earlier or stray(bytes(buf[p : p + 1])))
        # QEMU's lexer fails at the string's first control character: a \t or
        # \r, which the scan lets by, may come before the byte it stopped at.
        first = CONTROL.search(buf, token, p)
        end = first.start() if first else p
        error = ParseError(earlier or stray(bytes(buf[token : end + 1])))
        self._skip_from(p)
        if buf[p] == LF:
            # The line feed broke a string, not the message: unless a request
            # begins the next line, what follows is the rest of it (the string's
            # end, "}") up to where a request can begin, as QEMU's lexer skips it.
            # Read as a new string, it would swallow a request glued after it
            # (qemu.qmp sends no line feeds).  As after a reset byte.
            self._mode = AFTER_RESET
            self._recovering = True  # from QEMU's lexer's error at the line feed
            self._start = self._scan = p + 1
        return error  # else a reset byte: its own resynchronisation point

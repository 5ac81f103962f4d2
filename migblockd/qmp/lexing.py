"""Where QEMU's lexer fails in a message that arrives, or is skipped, a piece at a time.

QEMU's lexer reads the input as it arrives, and fails at the first byte no token
can take; its streamer then forgets the message, brackets still open or not, and
its lexer skips to the next structural character (``qobject/json-lexer.c``,
``qobject/json-streamer.c``).  So a message whose brackets never balance is still
answered, and the request after it runs.  :class:`Lexing` finds that byte for the
decoder: in a message still arriving (:meth:`~Lexing._lexer_failed_so_far`), in the
rest of a broken one being skipped (:meth:`~Lexing._rest_lexed`), in one begun in
garbage (:meth:`~Lexing._garbage_lexed`), and in any span the scan hands it
(:meth:`~Lexing._lexer_failed`), whose error is then the one answered.

It is apart from :class:`~migblockd.qmp.resync.Resync`, which it builds on, because
it is how QEMU's lexer is followed without lexing a message over and over (each
call goes on from where the last one stopped, ``_lexed``; a number still growing
is not lexed again), not a rule of where decoding goes on; it is that rule
(:meth:`~migblockd.qmp.resync.Resync._skip_to_top`) that it applies where the
lexer fails.
"""

from __future__ import annotations

from typing import Final

from migblockd.qmp.characters import RAW
from migblockd.qmp.lexer import (
    DIGIT_LOOP,
    DIGITS,
    lexical_failure_bytes,
    lexical_progress,
    more_tokens_than,
)
from migblockd.qmp.patterns import LF, RESET_BYTES
from migblockd.qmp.resync import Resync
from migblockd.qmp.wording import TOKEN_COUNT_EXCEEDED, ParseError

#: How much of a broken message's rest :meth:`Lexing._rest_lexed` lexes.
_LEX_WINDOW: Final = 1 << 16


class Lexing(Resync):
    """QEMU's lexer followed through the decoder's input (see the module's docstring).

    The state it works on is set by ``StreamDecoder.__init__``.
    """

    _digits_end: int
    _string_start: int
    max_tokens: int

    def _lexer_failed(self, buf: bytearray, start: int, end: int,
                      begun: int | None = None) -> ParseError | None:
        """The error of QEMU's lexer in ``buf[start:end]``, if it fails there; then
        decoding goes on as after garbage at the top level, from the byte after
        the one it failed at.  QEMU's streamer forgets the message at its lexer's
        error, brackets still open included (``qobject/json-streamer.c``), and its
        lexer skips to its next structural character (``IN_RECOVERY``,
        ``qobject/json-lexer.c``): a request after it runs, whether or not the
        broken message's brackets ever balance.  Counting on with them instead
        (``{"a": [+, "b": 1}`` leaves a ``[`` open) swallowed every later
        request up to a line feed.

        ``begun``: where the message began, if before ``start``.  Past
        ``max_tokens`` tokens before the byte it fails at, QEMU's streamer has
        refused the message for them first (``json-streamer.c``), whatever
        read brought that byte."""
        found = lexical_failure_bytes(bytes(buf[start:end]))
        if found is None:
            return None
        desc, after = found
        first = start if begun is None else begun
        fail = start + after - 1
        if fail - first > self.max_tokens and more_tokens_than(
                bytes(buf[first:fail]).decode("utf-8", RAW), self.max_tokens):
            desc = TOKEN_COUNT_EXCEEDED
        self._skip_to_top(start + after)
        self._recovering = True
        return ParseError(desc)

    def _lexer_failed_so_far(self, buf: bytearray, end: int) -> ParseError | None:
        """Out of input in the middle of a message: the error of QEMU's lexer in it
        so far, if any, as :meth:`_lexer_failed`.  QEMU's lexer fails as the
        bytes arrive, and its streamer answers then (``qobject/json-lexer.c``,
        ``json-streamer.c``), so the message's brackets need never balance:
        ``{"a": [{"b": 1.}`` then a request is an error, then the request.

        Lexing goes on from where it stopped at the last call (``_lexed``), and
        stops before a string still open (whose own bad bytes the scan finds),
        so a message trickling in is lexed about once, not once per read.

        Not while the message is tentative (begun by a "{" in garbage): until
        its brackets balance or a line feed shows it garbage, it may be either,
        and the outcome must not depend on how the input was split."""
        if self._tentative:
            return None
        start = max(self._lexed, self._start)
        if self._in_string:
            end = min(end, self._string_start)
        if self._lex_on(buf, start, end) is None:
            return None
        return self._lexer_failed(buf, start, end, self._start)

    def _rest_lexed(self, buf: bytearray, end: int) -> int:
        """Skipping the rest of a broken message up to ``end``: the byte after the
        one QEMU's lexer fails at before ``end``, if it does (a reset byte and a
        line feed aside: the skipping stops at them anyway); else -1.  There its
        streamer forgets the message, brackets still open included
        (``qobject/json-streamer.c``), and answers the next request: counting on
        (``{"a": [}`` then ``+`` and a request leaves a ``[`` open) swallowed
        every request after it.  Lexing goes on from where it stopped at the
        last call; past ``_LEX_WINDOW`` bytes of a broken message it stops (the
        brackets alone decide then), so a huge one costs no more than that."""
        start = self._lexed
        if start < 0 or end <= start:
            return -1
        if end - start > _LEX_WINDOW:
            self._lexed = -1
            return -1
        after = self._lex_on(buf, start, end)
        if after is None:
            return -1
        return -1 if buf[after - 1] in RESET_BYTES or buf[after - 1] == LF else after

    def _garbage_lexed(self, buf: bytearray, end: int) -> bool:
        """A message begun by a "{" or "[" found in garbage (tentative): whether
        QEMU's lexer fails in it before ``end``; then it was garbage too, and the
        skipping goes on after the byte the lexer failed at, as QEMU's lexer
        recovers (its streamer forgets the message there, brackets and all).
        No second error: the garbage has had its one.  Lexing goes on from where
        it stopped at the last call (``_lexed``).  Without this, a reset byte,
        then a quote and ``{`` (``\\x1b"{"``), began a message whose quotes were out
        of step with the requests after it, and swallowed them up to a line feed,
        where QEMU's lexer failed in them and answered the next."""
        after = self._lex_on(buf, max(self._lexed, self._start), end)
        if after is None:
            return False
        self._skip_to_top(after)
        self._recovering = True
        return True

    def _lex_on(self, buf: bytearray, start: int, end: int) -> int | None:
        """QEMU's lexer on ``buf[start:end]``, the tokens of a message from where
        it stopped at the last call: the index after the byte it fails at, if it
        does; else None, and ``_lexed`` is where to go on (after the last whole
        token, before a number at the end, which more bytes may make an error).

        Digits that only lengthen such a number (one past its first digit, or in
        its fraction or exponent, where the lexer takes any number of them) are
        not lexed again: a number of 1 MiB arriving 4 KiB at a time was, whole,
        at every read (9 s of the loop)."""
        if end <= start:
            return None
        if start == self._digits_from >= 0 and DIGITS.fullmatch(buf, self._digits_end, end):
            self._digits_end = end
            return None
        text = bytes(buf[start:end]).decode("utf-8", RAW)
        progress = lexical_progress(text)
        if isinstance(progress, int):
            self._lexed = start + len(text[:progress].encode("utf-8", RAW))
            growing = DIGIT_LOOP.fullmatch(text, progress) is not None
            self._digits_from = self._lexed if growing else -1
            self._digits_end = end
            return None
        self._digits_from = -1
        return start + len(text[: progress[1] - 1].encode("utf-8", RAW)) + 1

"""Where decoding goes on after a bad message: the QMP decoder's recovery.

:class:`~migblockd.qmp.scanner.Scanner` finds message boundaries; what happens
once a message turns out bad is here, in :class:`Resync`, the class it builds
on: how much of the input the bad message takes with it, where the next one
may begin, and the check of an unfinished message's complete lines that
catches an error before its brackets ever balance.  It is apart from the scan
because it is a policy (QEMU's, as its streamer and a line-based client see
it) that the scan consults only on its error paths.

Every bad message produces exactly one :class:`~migblockd.qmp.wording.ParseError`
in QEMU's wording.  Then the decoder resynchronises:

* When the bad message was still *balanced* (its closing bracket was found,
  only its content is wrong), its end is known, and decoding simply goes on
  after it, so ``{bad}{good}`` with no newline still runs ``good``.
* When a message's structure is lost (a mismatched closing bracket, a limit
  overrun, a single quote), the rest of that message is skipped, its brackets
  counted as QEMU's streamer counts them (``json-streamer.c``: braces and
  square brackets apart, see :func:`~migblockd.qmp.patterns.message_over`),
  and decoding goes on after its last one.
* Garbage at the top level (a stray closing bracket, a comma, a bad keyword or
  number) is skipped up to where a request can begin: the next ``{`` outside
  a string (QEMU's lexer reads a string there).  If the
  message that ``{`` begins runs on past a line feed, the ``{`` was garbage
  too, and decoding resumes after the line feed.
* Either way, a line feed or a *reset byte* ends the skipping: an ASCII
  control character other than ``\\t``, ``\\r``, ``\\n``, or one of the bytes
  ``0xFE``/``0xFF`` that cannot occur in UTF-8.  The QMP spec
  (``docs/interop/qmp-spec.rst``) documents sending such a byte as the way for
  a client to force the parser back into a known state.  A run of reset bytes
  counts as one bad message, and so does what follows it up to a new request:
  the rest of a message that a reset byte broke is not a second message.

* A message whose brackets never balance would swallow every request after
  it, so the first 4 KiB of an unfinished message are parsed at each line
  feed, with the ``{`` that begins the next line: an error found there is
  reported at once, and decoding resumes at that ``{`` when the error is
  there (a line-based client's next request), else after the line feed.

None of this waits for a line feed: ``qemu.qmp`` never sends one, and QEMU
answers its next request after any bad one.  Decoding resumes where QEMU's
parser would accept a new request.
"""

from __future__ import annotations

from typing import Final

from migblockd.qmp.characters import RAW
from migblockd.qmp.lexer import lexical_error, lexical_failure_bytes, lexical_progress, stray
from migblockd.qmp.patterns import (
    BACKSLASH,
    BLANKS,
    BLANKS_AND_RESETS,
    CONTROL,
    LF,
    QUOTE,
    RECOVERY_END,
    RESET_BYTES,
    RESYNC_TOP_QUOTE_OR_RESET,
    STRING_BODY,
    Open,
    match_end,
    message_over,
)
from migblockd.qmp.wording import ParseError, prefix_error

# The decoder's modes: scanning a message (or waiting for one), or skipping
# what is left of a bad one.  The scan and this module both switch between them.
IDLE, STRUCT, SCALAR_MODE, SKIP, AFTER_RESET, SKIP_TOP, SKIP_REST = range(7)
SKIPPING: Final = frozenset({SKIP, AFTER_RESET, SKIP_TOP, SKIP_REST})

_LINE_CHECK_WINDOW: Final = 4096
#: :meth:`Resync._lines_verdict`: nothing found, go on as planned.
SOUND: Final = object()


class Resync:
    """The decoder's recovery from bad messages (see the module's docstring).

    The state it works on is set by ``StreamDecoder.__init__``.
    """

    _mode: int
    _start: int
    _scan: int
    _stack: bytearray
    _in_string: bool
    _skip_open: Open
    _tentative: bool
    _checked: int
    _lexed: int
    _string_start: int
    _recovering: bool

    def _skip_to_top(self, pos: int) -> None:
        """Garbage at the top level: skip from ``pos`` to where a request can begin.
        QEMU's lexer is between tokens there, so a string in the garbage is one
        (a "{" in it begins nothing)."""
        self._skip_from(pos)
        self._mode = SKIP_TOP

    def _skip_rest(self, pos: int, counts: Open, in_string: bool = False) -> None:
        """A message broken with ``counts`` brackets open (in a string, if
        ``in_string``): skip from ``pos`` to its end, counting brackets as QEMU's
        streamer does, so that a client that sends no line feeds (``qemu.qmp``)
        is not cut off."""
        self._skip_from(pos)
        if message_over(counts) and not in_string:
            self._mode = IDLE  # its last bracket was the bad one: it is over
            self._start = pos
            return
        self._mode = SKIP_REST
        self._skip_open = counts
        self._in_string = in_string

    def _resync_at(self, buf: bytearray, i: int) -> None:
        """Decoding resumes at ``buf[i]``: after a line feed, at a reset byte (a run
        of them is one bad message), or at a "{" found in garbage (tentatively:
        see :meth:`_garbage_line`)."""
        c = buf[i]
        self._in_string = False
        self._recovering = False
        self._tentative = c == 0x7B
        self._mode = AFTER_RESET if c in RESET_BYTES else IDLE
        self._start = self._scan = i + 1 if c == LF else i

    def _skip_garbage(self, buf: bytearray, n: int) -> bool:
        """SKIP_TOP: skip to the next "{" or line feed; False if the input ends first.

        A reset byte on the way would end the skipping, and the garbage after
        it on its line start it again (it is the rest of the message the reset
        broke), so of all of them only one counts: the last, if nothing but
        blanks follows it.  A "{" right after a reset begins a request; after
        garbage, it may be garbage too (``_tentative``).  One search, not a
        step per reset byte: ``\\xffa`` over and over held the loop for 0.2 s
        a read.
        """
        start = self._scan
        found = self._garbage_end(buf, n)
        if found is None:
            return False  # in a string when the input ran out
        end = found
        skipped = buf[start:end]
        tail = skipped[len(skipped.rstrip(BLANKS_AND_RESETS)):]
        after_reset = bool(tail.translate(None, b" \t\r"))
        if end == n:
            self._scan = n
            if after_reset:
                self._mode = AFTER_RESET
                self._start = n
            return False
        self._resync_at(buf, end)
        if after_reset:
            self._tentative = False
        return True

    def _garbage_end(self, buf: bytearray, n: int) -> int | None:
        """Where garbage from ``_scan`` ends, strings read whole as QEMU's lexer
        reads them: at the next "{" or line feed outside a string, or ``n``;
        None if the input ran out in a string (``_scan`` is where to go on).
        Without this, the "{" of ``] "{x"}`` began a message that swallowed
        the request after it, which QEMU runs."""
        pos = self._garbage_string_end(buf, n, self._scan) if self._in_string else self._scan
        while pos is not None:
            if self._recovering:
                # After its error QEMU's lexer skips to a structural character
                # or a control one (IN_RECOVERY, qobject/json-lexer.c): a quote
                # before it begins no string.
                m = RECOVERY_END.search(buf, pos)
                if m is None:
                    return n
                self._recovering = False
                pos = m.start()
            m = RESYNC_TOP_QUOTE_OR_RESET.search(buf, pos)
            if m is None:
                return n
            c = buf[m.start()]
            if c in RESET_BYTES:
                self._recovering = True  # an error of QEMU's lexer too
                pos = m.start() + 1
            elif c == QUOTE:
                pos = self._garbage_string_end(buf, n, m.start() + 1)
            else:
                return m.start()
        return None

    def _garbage_string_end(self, buf: bytearray, n: int, pos: int) -> int | None:
        """Past the string whose body goes on at ``pos``: after its closing quote,
        or at the line feed or reset byte that breaks it (QEMU's lexer fails
        there and reads on); None when the input runs out first."""
        p = match_end(STRING_BODY, buf, pos)
        if p >= n or (buf[p] == BACKSLASH and p + 1 >= n):
            self._in_string = True
            self._scan = p
            return None
        self._in_string = False
        if buf[p] == QUOTE:
            return p + 1
        return p + (buf[p] == BACKSLASH)  # at the line feed or reset byte that broke it

    def _lexer_failed(self, buf: bytearray, start: int, end: int) -> ParseError | None:
        """The error of QEMU's lexer in ``buf[start:end]``, if it fails there; then
        decoding goes on as after garbage at the top level, from the byte after
        the one it failed at.  QEMU's streamer forgets the message at its lexer's
        error, brackets still open included (``qobject/json-streamer.c``), and its
        lexer skips to its next structural character (``IN_RECOVERY``,
        ``qobject/json-lexer.c``): a request after it runs, whether or not the
        broken message's brackets ever balance.  Counting on with them instead
        (``{"a": [+, "b": 1}`` leaves a ``[`` open) swallowed every later
        request up to a line feed."""
        found = lexical_failure_bytes(bytes(buf[start:end]))
        if found is None:
            return None
        desc, after = found
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
        if end <= start:
            return None
        text = bytes(buf[start:end]).decode("utf-8", RAW)
        progress = lexical_progress(text)
        if isinstance(progress, int):
            self._lexed = start + len(text[:progress].encode("utf-8", RAW))
            return None
        return self._lexer_failed(buf, start, end)

    def _skip_from(self, pos: int) -> None:
        self._tentative = False
        self._mode = SKIP
        self._scan = pos
        self._stack.clear()
        self._in_string = False
        self._recovering = False
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
        """Skip the message if a "{" found in garbage began it (see SKIP_TOP) and it
        runs on past a line feed before ``end``: that "{" was garbage too, and a
        line-based client's next request follows the line feed.  Without line
        feeds nothing changes.  Applied wherever the message's lines are checked,
        so that the outcome does not depend on how the input was split."""
        if not self._tentative:
            return False
        lf = buf.find(b"\n", self._start, end)
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
        out) is reported at once, and decoding resynchronises at the line feed
        after it.  The same rule applies when the message turns out bad in
        other ways, so the outcome does not depend on how input was split.

        A "{" that begins the line after the last line feed is checked with
        them: where the message cannot go on with it, that "{" is a line-based
        client's next request, and decoding resumes there rather than after
        its line (``[1, 2`` then a request on the next line: one error, and
        the request runs, however the input was split).

        Only the first ``_LINE_CHECK_WINDOW`` bytes of a message are checked
        this way: requests are short, and a peer trickling a huge multi-line
        message cannot make the checks cost more than that per line.
        """
        start = self._start
        window = min(end, start + _LINE_CHECK_WINDOW)
        stop = lf = buf.rfind(b"\n", max(start, self._checked), window)
        if lf >= 0:
            brace = match_end(BLANKS, buf, lf + 1, window)
            if brace < window and buf[brace] == 0x7B:
                stop = brace + 1
        if stop <= self._checked:
            return None
        checked, self._checked = self._checked, stop
        found = prefix_error(buf, start, stop)
        if found is None:
            return None  # a valid beginning, to be continued
        if (lexed := self._lexed_before_lines(buf, checked, lf)) is not None:
            return lexed
        desc, skip = found
        if skip < stop and buf[skip] == 0x7B and self._begins_line(buf, skip):
            self._skip_from(skip)
            self._mode = IDLE  # not skipping after all: a request begins here
        else:
            self._skip_from(min(skip, lf))
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
            stop = before
            if before < fail:
                brace = match_end(BLANKS, buf, before + 1, fail)
                stop = brace + 1 if brace < fail and buf[brace] == 0x7B else before
            if prefix_error(buf, start, stop) is not None:
                return None  # a line before it was answered first
        return self._lexer_failed(buf, start, fail + 1)

    def _begins_line(self, buf: bytearray, pos: int) -> bool:
        """``buf[pos]`` is the first byte but blanks of a line inside the message."""
        lf = buf.rfind(b"\n", self._start, pos)
        return lf >= 0 and match_end(BLANKS, buf, lf + 1, pos) == pos

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

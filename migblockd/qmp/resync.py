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
  overrun, a single quote), or its complete lines hold an error of QEMU's
  parser (below), the rest of that message is skipped, its brackets counted
  as QEMU's streamer counts them (``json-streamer.c``: braces and square
  brackets apart, see :func:`~migblockd.qmp.patterns.message_over`), and
  decoding goes on after its last one.  Its lines go with it: a
  pretty-printed request gets one error, as in QEMU, whose parser sees a
  message whole once its brackets balance.  Only a line that begins with a
  "{", no blank before it, ends the skipping sooner: a line-based client's
  next request begins there (a pretty-printed request indents its inner
  lines).
* Garbage at the top level (a stray closing bracket, a comma, a bad keyword or
  number) is skipped up to where a message can begin: the next ``{`` or ``[``
  that QEMU's lexer reads as a token (not in a string, nor in a number's
  error).  If the message that it begins runs on past a line feed, or QEMU's
  lexer fails in it, it was garbage too, and decoding resumes after the line
  feed, or as QEMU's lexer recovers.
* A token QEMU's lexer cannot read in the rest of a broken message ends it
  there, brackets still open or not, as QEMU's streamer forgets the message.
* A line feed ends the skipping of garbage, and a *reset byte* ends any: an ASCII
  control character other than ``\\t``, ``\\r``, ``\\n``, or one of the bytes
  ``0xFE``/``0xFF`` that cannot occur in UTF-8.  The QMP spec
  (``docs/interop/qmp-spec.rst``) documents sending such a byte as the way for
  a client to force the parser back into a known state.  A run of reset bytes
  counts as one bad message, and so does what follows it up to a new request:
  the rest of a message that a reset byte broke is not a second message.

* A message whose brackets never balance would swallow every request after
  it: :mod:`migblockd.qmp.lines` checks its lines as they arrive.

None of this waits for a line feed: ``qemu.qmp`` never sends one, and QEMU
answers its next request after any bad one.  Decoding resumes where QEMU's
parser would accept a new request.
"""

from __future__ import annotations

from typing import Final

from migblockd.qmp.lexer import number_token
from migblockd.qmp.patterns import (
    BACKSLASH,
    BLANKS_AND_RESETS,
    GARBAGE_SQ_STRING_BODY,
    GARBAGE_STOPS,
    GARBAGE_STRING_BODY,
    GARBAGE_TOKENS,
    LF,
    NUMBER_RUN,
    NUMBER_START,
    QUOTE,
    QUOTES,
    RECOVERY_END,
    RESET_BYTES,
    Open,
    match_end,
    message_over,
)

# The decoder's modes: scanning a message (or waiting for one), or skipping
# what is left of a bad one.  The scan and this module both switch between them.
IDLE, STRUCT, SCALAR_MODE, SKIP, AFTER_RESET, SKIP_TOP, SKIP_REST, SKIP_LINE = range(8)
SKIPPING: Final = frozenset({SKIP, AFTER_RESET, SKIP_TOP, SKIP_REST, SKIP_LINE})


class Resync:
    """The decoder's recovery from bad messages (see the module's docstring).

    The state it works on is set by ``StreamDecoder.__init__``.  Where QEMU's
    lexer fails in a message, which decides some of it, is its subclass's,
    :class:`~migblockd.qmp.lexing.Lexing`.
    """

    _mode: int
    _start: int
    _scan: int
    _stack: bytearray
    _in_string: bool
    _quote: int
    _number_run: int
    _skip_open: Open
    _tentative: bool
    _checked: int
    _lexed: int
    _digits_from: int
    _recovering: bool

    def _skip_to_top(self, pos: int) -> None:
        """Garbage at the top level: skip from ``pos`` to where a request can begin.
        QEMU's lexer is between tokens there, so a string in the garbage is one
        (a "{" in it begins nothing)."""
        self._skip_from(pos)
        self._mode = SKIP_TOP

    def _skip_rest(self, pos: int, counts: Open, in_string: bool = False, *,
                   lex: bool = False, quote: int = QUOTE) -> None:
        """A message broken with ``counts`` brackets open (in a string quoted with
        ``quote``, if ``in_string``): skip from ``pos`` to its end, counting brackets as QEMU's
        streamer does, so that a client that sends no line feeds (``qemu.qmp``)
        is not cut off, nor one that sends its requests pretty-printed
        (:meth:`_next_line`).  With ``lex`` (``pos`` is between two tokens),
        also up to where QEMU's lexer fails in it
        (:meth:`~migblockd.qmp.lexing.Lexing._rest_lexed`)."""
        self._skip_from(pos)
        self._lexed = pos if lex else -1
        self._digits_from = -1
        if message_over(counts) and not in_string:
            self._mode = IDLE  # its last bracket was the bad one: it is over
            self._start = pos
            return
        self._mode = SKIP_REST
        self._skip_open = counts
        self._in_string = in_string
        self._quote = quote

    def _next_line(self, buf: bytearray, n: int) -> bool:
        """SKIP_LINE: a line of a bad message skipped across lines ended; False if
        the input ends first.

        A "{" that begins the next line, blanks before it none, is where a
        line-based client's next request begins, and decoding resumes there;
        anything else is more of the bad message, up to its last bracket.  A
        pretty-printed request indents its inner lines, so its lines after an
        error are skipped with it, and it gets one error, as in QEMU, whose
        parser sees a message only once its brackets balance."""
        p = self._scan
        if p >= n:
            return False
        c = buf[p]
        if c == 0x7B:
            self._skip_from(p)
            self._mode = IDLE
        elif c == LF:
            self._scan = p + 1
        elif c in RESET_BYTES:
            self._resync_at(buf, p)
        else:
            self._mode = SKIP_REST
        return True

    def _resync_at(self, buf: bytearray, i: int) -> None:
        """Decoding resumes at ``buf[i]``: after a line feed, at a reset byte (a run
        of them is one bad message), or at a "{" found in garbage (tentatively:
        see :meth:`_garbage_line`)."""
        c = buf[i]
        self._in_string = False
        self._recovering = False
        self._number_run = -1

        self._tentative = c in b"{["
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
        """Where garbage from ``_scan`` ends, read token by token as QEMU's lexer
        reads it at the top level: at the next "{" or "[" it reads as a token
        (a message begins there), or line feed; ``n`` when the input ran out
        between tokens; None when it ran out in a token, a string or a number
        that may go on (``_scan`` is where to go on).  A "{" in a string begins
        nothing (``] "{x"}``), nor one the lexer's error takes (``1.{``, ``-{``),
        and after its error the lexer skips to a structural or control
        character (``IN_RECOVERY``, ``qobject/json-lexer.c``), a quote on the
        way beginning no string.  Skipping only to the next "{" ran a request
        that QEMU reads inside an array (``x[`` + request + ``]``)."""
        pos = self._garbage_string_end(buf, n, self._scan) if self._in_string else self._scan
        # A number still arriving: on with it, not its digits matched again.
        pending = self._number_run >= 0
        while pos is not None:
            if self._recovering:
                m = RECOVERY_END.search(buf, pos)
                if m is None:
                    return n
                self._recovering = False
                pos = m.start()
            if not pending:
                pos = match_end(GARBAGE_TOKENS, buf, pos)
            pending = False
            if pos >= n:
                return n
            c = buf[pos]
            if c in GARBAGE_STOPS:
                return pos
            if c in QUOTES:
                self._quote = c
                pos = self._garbage_string_end(buf, n, pos + 1)
            elif c in NUMBER_START:
                # Where the run of what may be the number ends: from where the last
                # read left it, so that a long one arriving in pieces is read once.
                run = match_end(NUMBER_RUN, buf, max(pos, self._number_run))
                if run >= n:
                    self._scan = pos
                    self._number_run = run
                    return None
                self._number_run = -1
                token = number_token(bytes(buf[pos : run + 1]))
                assert token is not None  # the byte after the run ends it
                pos += token[0]
                self._recovering = token[1]
            elif 0x61 <= c <= 0x7A:
                self._scan = pos  # a keyword that may go on
                return None
            else:
                # A byte no token begins with, or one a string may not hold: an
                # error of QEMU's lexer, a reset byte's included.
                self._recovering = True
                pos += 1
        return None

    def _garbage_string_end(self, buf: bytearray, n: int, pos: int) -> int | None:
        """Past the string (quoted with ``_quote``) whose body goes on at ``pos``:
        after its closing quote, or after the control character that breaks it,
        where QEMU's lexer fails and begins its recovery (``_recovering``), a line
        feed's included (as a line feed breaking a string in a message); None when
        the input runs out first.  A tab or a carriage return breaks it too: read
        as blanks after it, a quote further on began a string that swallowed the
        request glued after it."""
        body = GARBAGE_STRING_BODY if self._quote == QUOTE else GARBAGE_SQ_STRING_BODY
        p = match_end(body, buf, pos)
        if p >= n or (buf[p] == BACKSLASH and p + 1 >= n):
            self._in_string = True
            self._scan = p
            return None
        self._in_string = False
        if buf[p] == self._quote:
            return p + 1
        p += buf[p] == BACKSLASH  # the byte after it is the one that breaks it
        self._recovering = True
        return p + 1

    def _skip_from(self, pos: int) -> None:
        self._number_run = -1
        self._tentative = False
        self._mode = SKIP
        self._scan = pos
        self._stack.clear()
        self._in_string = False
        self._recovering = False


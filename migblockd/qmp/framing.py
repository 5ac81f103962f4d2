"""Streaming JSON framing for QMP: bytes in, messages (or parse errors) out.

QMP has no framing of its own.  QEMU runs a *streaming* JSON parser over the
byte stream (``qobject/json-streamer.c``): a message is complete the moment
its closing ``}`` (or ``]``, or closing quote, or the delimiter after a
top-level number or keyword) arrives.  Newlines are plain whitespace, so a
message may span lines, be split across writes, or be glued to the next one
(``{...}{...}``); the standard Python client (``qemu.qmp``) sends no trailing
newline at all, so a line-based reader would hang.

:class:`StreamDecoder` finds message boundaries with compiled regular
expressions that step over whole runs of ordinary bytes and whole strings at C
speed, stopping only at brackets, quotes and bytes that matter for error
recovery; each complete message is then parsed with ``json`` on its exact
slice (:mod:`migblockd.qmp.wording`).  No Python code runs per byte.

Errors and recovery
-------------------
Every bad message produces exactly one :class:`ParseError` in QEMU's wording.
Then the decoder resynchronises:

* When the bad message was still *balanced* (its closing bracket was found,
  only its content is wrong), its end is known, and decoding simply goes on
  after it, so ``{bad}{good}`` with no newline still runs ``good``.
* When a message's structure is lost (a mismatched closing bracket, a limit
  overrun, a single quote), the rest of that message is skipped, its brackets
  counted as QEMU's streamer counts them (``json-streamer.c``), and decoding
  goes on after its last one.
* Garbage at the top level (a stray closing bracket, a comma, a bad keyword or
  number) is skipped up to where a request can begin: the next ``{``.  If the
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

Limits are enforced while scanning, so a 2000-deep ``[[[[...`` or an endless
string is refused as soon as it passes the limit, and nothing ever recurses
deeper than ``max_nesting`` (never a ``RecursionError``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from migblockd.qmp.lexer import (
    PARSE_ERROR_PREFIX,
    first_token_end,
    lexer_waits,
    lexical_error,
    stray,
)
from migblockd.qmp.limits import Limits, count_tokens
from migblockd.qmp.patterns import (
    APOSTROPHE,
    BACKSLASH,
    BLANKS,
    CLOSERS,
    CONTROL,
    FAST_DEPTH,
    FAST_MESSAGE,
    LF,
    MESSAGE_END,
    OPENERS,
    QUOTE,
    RESET_BYTES,
    RESET_RUN,
    RESYNC,
    RESYNC_TOP,
    SCALAR,
    STRING_BODY,
    STRUCTURE,
    WHITESPACE,
    match_end,
    skip_broken,
)
from migblockd.qmp.wording import (
    NESTING_EXCEEDED,
    SINGLE_QUOTE,
    TOKEN_COUNT_EXCEEDED,
    TOKEN_SIZE_EXCEEDED,
    ParseError,
    decode_message,
    describe_error,
    prefix_error,
)

__all__ = ["NEED_DATA", "ParseError", "StreamDecoder"]

class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`StreamDecoder.next_message` when no complete message is buffered.
NEED_DATA: Final = _NeedData()

_IDLE, _STRUCT, _SCALAR_MODE, _SKIP, _AFTER_RESET, _SKIP_TOP, _SKIP_REST = range(7)
_SKIPPING: Final = frozenset({_SKIP, _AFTER_RESET, _SKIP_TOP, _SKIP_REST})

_LINE_CHECK_WINDOW: Final = 4096
#: :meth:`StreamDecoder._lines_verdict`: nothing found, go on as planned.
_SOUND: Final = object()

# Compaction threshold: consumed bytes are dropped from the buffer's front
# once there are this many (bytearray makes front deletion cheap).
_COMPACT_AT: Final = 1 << 16


class StreamDecoder:
    """Incremental QMP input decoder (sans-I/O).

    ``feed()`` bytes as they arrive, ``feed_eof()`` at end of input, and call
    ``next_message()`` until it returns :data:`NEED_DATA`.  Each call yields
    one parsed JSON value (any JSON type; the session checks it is an object)
    or one :class:`ParseError`.  Scanning is lazy: nothing is examined until
    someone asks for the next message, so a peer that floods input while the
    server is not reading costs nothing but buffer space.
    """

    def __init__(self, limits: Limits) -> None:
        self.configure(limits)
        self._buf = bytearray()
        self._mode = _IDLE
        self._start = 0  # first byte of the message being scanned
        self._scan = 0  # where scanning resumes
        self._stack = bytearray()  # expected closing brackets, innermost last
        self._in_string = False
        self._string_start = 0  # where the open string began (its quote)
        self._skip_depth = 0  # brackets still open in the broken message being skipped
        # The message being scanned began at a "{" found in garbage (see _SKIP_TOP).
        self._tentative = False
        self._checked = 0  # end of the prefix _check_lines() last parsed
        self._eof = False
        self._ready: object = NEED_DATA  # one message of lookahead for has_message()
        # Input (or EOF) came since the scanner last ran out: until some does,
        # scanning again would find nothing, and callers ask often.
        self._fresh = False

    def configure(self, limits: Limits) -> None:
        """Apply ``limits`` from the next message on (a reload)."""
        self.max_message_size = limits.max_message_size
        self.max_nesting = limits.max_nesting
        self.max_tokens = limits.max_tokens

    # -- input ---------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; nothing is parsed yet.  Input after EOF is ignored."""
        if self._eof or not data:
            return
        keep = self._scan if self._mode in _SKIPPING else self._start
        if keep >= _COMPACT_AT or (keep and keep == len(self._buf)):
            del self._buf[:keep]
            self._start -= keep
            self._scan -= keep
            self._string_start -= keep
            self._checked = max(0, self._checked - keep)
        self._buf += data
        self._fresh = True

    def feed_eof(self) -> None:
        """No more input: a complete trailing token is now a message, a truncated one an error."""
        self._eof = True
        self._fresh = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (for the server's input bounds)."""
        keep = self._scan if self._mode in _SKIPPING else self._start
        return len(self._buf) - keep

    # -- output --------------------------------------------------------------
    def has_message(self) -> bool:
        """True when ``next_message()`` would return a value or a ParseError."""
        if self._ready is NEED_DATA:
            self._ready = self._scan_on()
        return self._ready is not NEED_DATA

    def next_message(self) -> object:
        """The next JSON value or :class:`ParseError`, or :data:`NEED_DATA`."""
        item = self._ready
        if item is NEED_DATA:
            return self._scan_on()
        self._ready = NEED_DATA
        return item

    def __iter__(self) -> Iterator[object]:
        """All messages that are complete now (convenient in tests)."""
        while (item := self.next_message()) is not NEED_DATA:
            yield item

    # -- the scanner ---------------------------------------------------------
    def _scan_on(self) -> object:
        if not self._fresh:
            return NEED_DATA
        item = self._advance()
        if item is NEED_DATA:
            self._fresh = False
        return item

    def _skip_to_top(self, pos: int) -> None:
        """Garbage at the top level: skip from ``pos`` to where a request can begin."""
        self._skip_from(pos)
        self._mode = _SKIP_TOP

    def _skip_rest(self, pos: int, depth: int, in_string: bool = False) -> None:
        """A message broken ``depth`` brackets deep (in a string, if ``in_string``):
        skip from ``pos`` to its end, counting brackets as QEMU's streamer does,
        so that a client that sends no line feeds (``qemu.qmp``) is not cut off."""
        self._skip_from(pos)
        if depth <= 0 and not in_string:
            self._mode = _IDLE  # its last bracket was the bad one: it is over
            self._start = pos
            return
        self._mode = _SKIP_REST
        self._skip_depth = depth
        self._in_string = in_string

    def _resync_at(self, buf: bytearray, i: int) -> None:
        """Decoding resumes at ``buf[i]``: after a line feed, at a reset byte (a run
        of them is one bad message), or at a "{" found in garbage (tentatively:
        see :meth:`_garbage_line`)."""
        c = buf[i]
        self._in_string = False
        self._tentative = c == 0x7B
        self._mode = _AFTER_RESET if c in RESET_BYTES else _IDLE
        self._start = self._scan = i + 1 if c == LF else i

    def _skip_from(self, pos: int) -> None:
        self._tentative = False
        self._mode = _SKIP
        self._scan = pos
        self._stack.clear()
        self._in_string = False

    def _complete(self, end: int) -> object:
        """The message is ``buf[start:end]``; go idle after it and decode it."""
        data = self._buf[self._start : end]
        self._tentative = False
        self._mode = _IDLE
        self._start = self._scan = end
        self._stack.clear()
        self._in_string = False
        value = decode_message(data)
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
            self._mode = _STRUCT
            self._start = start
            error = self._check_lines(buf, end)
            if error is not None:
                return error
            self._mode = _IDLE
            self._start = end
        return item

    def _advance(self) -> object:
        buf = self._buf
        n = len(buf)
        while True:
            mode = self._mode
            if mode == _IDLE:
                i = match_end(WHITESPACE, buf, self._scan)
                self._start = self._scan = i
                if i >= n:
                    return NEED_DATA
                c = buf[i]
                self._checked = i
                if c == 0x7B and self.max_nesting >= FAST_DEPTH:
                    m = FAST_MESSAGE.match(buf, i, min(n, i + self.max_message_size))
                    if m is not None:
                        self._mode = _STRUCT
                        item = self._finish(buf, m.end())
                        if item is None:
                            continue
                        return item
                closer = OPENERS.get(c)
                if closer is not None:
                    self._stack.append(closer)
                    self._mode = _STRUCT
                    self._scan = i + 1
                elif c == QUOTE:
                    self._mode = _STRUCT  # a top-level string: empty stack
                    self._in_string = True
                    self._string_start = i
                    self._scan = i + 1
                elif c in RESET_BYTES:
                    end = match_end(RESET_RUN, buf, i)
                    self._mode = _AFTER_RESET
                    self._start = self._scan = end
                    # Name the first byte only: the run may continue in the next read.
                    return ParseError(stray(bytes(buf[i : i + 1])))
                elif c in CLOSERS or c in b",:":
                    self._skip_to_top(i + 1)
                    return ParseError(PARSE_ERROR_PREFIX + "expecting value")
                elif c == APOSTROPHE:
                    self._skip_to_top(i + 1)
                    return ParseError(SINGLE_QUOTE)
                else:
                    self._mode = _SCALAR_MODE
            elif mode == _STRUCT:
                item = self._scan_structure(buf, n)
                if item is not None:
                    return item
            elif mode == _SCALAR_MODE:
                limit = self._start + self.max_message_size
                end = match_end(SCALAR, buf, self._start, min(n, limit + 1))
                if end > limit:
                    self._skip_to_top(limit)
                    return ParseError(TOKEN_SIZE_EXCEEDED)
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
                        # could not take ("stray '1.}'", "stray '-\n'").
                        item = ParseError(describe_error(bytes(buf[start : end + 1]))
                                          or item.desc)
                    # A bad top-level token: what follows up to a new request is too.
                    self._skip_to_top(end)
                return item
            elif mode in (_SKIP, _SKIP_TOP):
                m = (RESYNC_TOP if mode == _SKIP_TOP else RESYNC).search(buf, self._scan)
                if m is None:
                    self._scan = n
                    return NEED_DATA
                self._resync_at(buf, m.start())
            elif mode == _SKIP_REST:
                self._scan, self._skip_depth, self._in_string, stop = skip_broken(
                    buf, n, self._scan, self._skip_depth, self._in_string)
                if stop is None:
                    return NEED_DATA
                if stop == MESSAGE_END:
                    self._mode = _IDLE
                    self._start = self._scan
                else:
                    self._resync_at(buf, self._scan)
            else:  # _AFTER_RESET (or a line feed that broke a string)
                # A run of reset bytes is one bad message, however it was split
                # across reads, so swallow the rest of the run.  What follows
                # on the same line is the rest of the message the reset broke
                # (one bad message, one error), unless a new request starts.
                end = match_end(BLANKS, buf, match_end(RESET_RUN, buf, self._scan))
                self._start = self._scan = end
                if end == n:
                    return NEED_DATA
                c = buf[end]
                if c in (0x7B, LF):
                    self._mode = _IDLE
                elif c not in RESET_BYTES:
                    self._mode = _SKIP_TOP

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
                            if (verdict := self._lines_verdict(buf, p)) is not _SOUND:
                                return verdict
                            self._skip_rest(p + 1, len(stack) + 1)
                            return ParseError(NESTING_EXCEEDED)
                        stack.append(closer)
                        self._scan = p + 1
                        continue
                    if c in CLOSERS:
                        if c != stack[-1]:
                            if (verdict := self._lines_verdict(buf, p)) is not _SOUND:
                                return verdict
                            desc = describe_error(bytes(buf[self._start : p + 1]))
                            # The bad closer still closes a level, as in QEMU's streamer.
                            self._skip_rest(p + 1, len(stack) - 1)
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
                        if (verdict := self._lines_verdict(buf, p)) is not _SOUND:
                            return verdict
                        # QEMU's lexer reads a single quote, so its error is one
                        # before it, if any (a number cut short by it included).
                        earlier = lexical_error(bytes(buf[self._start : p + 1]))
                        self._skip_rest(p + 1, len(stack))
                        return ParseError(earlier or SINGLE_QUOTE)
                    return self._bad_byte(buf, p)
            # Out of input (or out of allowance) in the middle of a message.
            if (verdict := self._lines_verdict(buf, self._scan)) is not _SOUND:
                return verdict
            if limit <= n:
                # From where the scan stopped: in a string that may be an escape's
                # backslash, whose escaped quote must not end the string.
                self._skip_rest(self._scan, len(stack), self._in_string)
                return ParseError(TOKEN_SIZE_EXCEEDED)
            if self._eof:
                self._skip_from(n)
                return ParseError(PARSE_ERROR_PREFIX + "premature EOI")
            return NEED_DATA

    def _lines_verdict(self, buf: bytearray, end: int) -> object:
        """Before reporting an error at ``end`` (or waiting for more input): None if
        the message was garbage and is skipped (go on), its lines' own error if
        they hold an earlier one, else :data:`_SOUND`.  Every path runs this, so
        the outcome does not depend on how the input was split."""
        if self._garbage_line(buf, end):
            return None
        error = self._check_lines(buf, end)
        return _SOUND if error is None else error

    def _garbage_line(self, buf: bytearray, end: int) -> bool:
        """Skip the message if a "{" found in garbage began it (see _SKIP_TOP) and it
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
        self._checked = stop
        found = prefix_error(buf, start, stop)
        if found is None:
            return None  # a valid beginning, to be continued
        desc, skip = found
        if skip < stop and buf[skip] == 0x7B and self._begins_line(buf, skip):
            self._skip_from(skip)
            self._mode = _IDLE  # not skipping after all: a request begins here
        else:
            self._skip_from(min(skip, lf))
        return ParseError(desc)

    def _begins_line(self, buf: bytearray, pos: int) -> bool:
        """``buf[pos]`` is the first byte but blanks of a line inside the message."""
        lf = buf.rfind(b"\n", self._start, pos)
        return lf >= 0 and match_end(BLANKS, buf, lf + 1, pos) == pos

    def _bad_byte(self, buf: bytearray, p: int, token: int = -1) -> object:
        """A control character (or 0xFE/0xFF) where JSON allows none: the message is
        lost.  ``token``: where the string it is in began; QEMU's lexer names the
        token so far (``stray '"tab\t'``).  None: it was garbage, skipped."""
        if (verdict := self._lines_verdict(buf, p)) is not _SOUND:
            return verdict
        # QEMU's lexer fails at the first token it cannot read, which may come
        # before this one (its parser, which the scan stands in for, never ran).
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
            self._mode = _AFTER_RESET
            self._start = self._scan = p + 1
        return error  # else a reset byte: its own resynchronisation point

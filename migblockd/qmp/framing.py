"""Streaming JSON framing for QMP: bytes in, messages (or parse errors) out.

QMP has no framing of its own.  QEMU runs a *streaming* JSON parser over the
byte stream (``qobject/json-streamer.c``): a message is complete the moment
its closing ``}`` (or ``]``, or closing quote, or the delimiter after a
top-level number or keyword) arrives.  Newlines are plain whitespace, so a
message may span lines, be split across writes, or be glued to the next one
(``{...}{...}``); the standard Python client (``qemu.qmp``) sends no trailing
newline at all, so a line-based reader would hang.

:class:`StreamDecoder` is what the session holds: input is buffered as it
arrives and scanned only when a message is asked for, one message at a time.
Where each message ends, within the limits, is :mod:`migblockd.qmp.scanner`'s
to find; where decoding goes on after a bad one is :mod:`migblockd.qmp.resync`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from migblockd.qmp.limits import Limits
from migblockd.qmp.patterns import Open
from migblockd.qmp.resync import IDLE, SKIP_LINE, SKIP_REST, SKIPPING
from migblockd.qmp.scanner import NEED_DATA, Scanner
from migblockd.qmp.wording import ParseError

__all__ = ["NEED_DATA", "ParseError", "StreamDecoder"]


# Compaction threshold: consumed bytes are dropped from the buffer's front
# once there are this many (bytearray makes front deletion cheap).
_COMPACT_AT: Final = 1 << 16


class StreamDecoder(Scanner):
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
        self._mode = IDLE
        self._start = 0  # first byte of the message being scanned
        self._scan = 0  # where scanning resumes
        self._stack = bytearray()  # expected closing brackets, innermost last
        self._in_string = False
        self._string_start = 0  # where the open string began (its quote)
        self._quote = 0x22  # what the string open in garbage is quoted with
        self._number_run = -1  # how far the number pending in garbage was read
        self._skip_open: Open = (0, 0)  # brackets open in the broken message being skipped
        self._tally = 0  # openers and strings of the message so far: tokens, at least
        # The message being scanned began at a "{" found in garbage (see _SKIP_TOP).
        self._tentative = False
        self._checked = 0  # end of the prefix _check_lines() last parsed
        self._lexed = 0  # where _lexer_failed_so_far() goes on lexing the message
        # Lexed from _digits_from to _digits_end: a number that more digits only lengthen.
        self._digits_from = self._digits_end = -1
        self._recovering = False  # SKIP_TOP as QEMU's lexer after an error (see Resync)
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
        keep = self._keep()
        if keep >= _COMPACT_AT or (keep and keep == len(self._buf)):
            del self._buf[:keep]
            self._start -= keep
            self._scan -= keep
            self._string_start -= keep
            self._number_run = self._number_run - keep if self._number_run >= keep else -1
            self._checked = max(0, self._checked - keep)
            self._lexed = self._lexed - keep if self._lexed >= 0 else -1
            if self._digits_from >= keep:
                self._digits_from -= keep
                self._digits_end -= keep
            else:
                self._digits_from = -1
        self._buf += data
        self._fresh = True

    def feed_eof(self) -> None:
        """No more input: a complete trailing token is now a message, a truncated one an error."""
        self._eof = True
        self._fresh = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (for the server's input bounds)."""
        return len(self._buf) - self._keep()

    def _keep(self) -> int:
        """The first byte still needed: the message's, or where skipping goes on;
        or, while skipping the rest of a broken message, where lexing it goes on
        (:meth:`~migblockd.qmp.lexing.Lexing._rest_lexed`), if that is before."""
        if self._mode not in SKIPPING:
            return self._start
        if self._mode in (SKIP_REST, SKIP_LINE) and 0 <= self._lexed < self._scan:
            return self._lexed
        return self._scan

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

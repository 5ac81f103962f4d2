"""How what is entered divides into commands: one per line, as bash and qmp-shell
read them, except that a raw JSON request runs on across lines to the line where
its outer brace closes (a request pretty-printed, pasted at the prompt or kept in
a file), and is one command there whether or not it parses (its error names it).

:class:`Entries` is fed lines as they come (a paste's, or a script's from stdin)
and hands back each command with the number of its first line.  A request whose
brace has not closed by the end of the input, nor within :data:`MAX_LINES` lines
or :data:`MAX_CHARS` characters, is its first line alone, for its error, and the
lines after it are read again as commands of their own: a missing brace costs
one command, not the rest of the script, and never holds more than that much.

A qmp-shell ``transaction(`` block is one command too, to the line that ends with
``)`` (or to those limits, or the end of the input): the shell refuses it whole,
since its actions, run one by one, would not be one transaction.
"""

from __future__ import annotations

import json

from migblockd.shell.literal import Brackets

# Bounds on what an open brace holds: a pretty-printed request takes a few dozen
# lines and a few KiB. They also bound the work when each of many lines opens a
# brace that never closes (each is read again after the one before it).
#: The most lines one request may span.
MAX_LINES = 256
#: The most characters one request may span (a request on one line has no limit).
MAX_CHARS = 1 << 18


class Entries:
    """Lines in, commands out, each as ``(number of its first line, text)``."""

    def __init__(self) -> None:
        self._count = 0
        self._ready: list[tuple[int, str]] = []
        #: The lines of a request whose brace is still open, and its scan.
        self._open: list[tuple[int, str]] = []
        self._chars = 0
        self._brackets = Brackets()
        #: Whether what is open is a qmp-shell ``transaction(`` block, not a brace.
        self._transaction = False

    def feed(self, line: str) -> list[tuple[int, str]]:
        """The commands that ``line`` (without its line feed) completes."""
        self._count += 1
        self._take(self._count, line)
        return self._handed()

    def end(self) -> list[tuple[int, str]]:
        """The commands left at the end of the input."""
        if self._transaction and self._open:
            self._hand_open()  # its actions must not run alone
        while self._open:
            self._give_up()
        return self._handed()

    def _handed(self) -> list[tuple[int, str]]:
        ready, self._ready = self._ready, []
        return ready

    def _take(self, number: int, line: str) -> None:
        if self._open:
            self._open.append((number, line))
            self._chars += len(line) + 1
            if self._closes(line):
                self._hand_open()
            elif len(self._open) > MAX_LINES or self._chars > MAX_CHARS:
                if self._transaction:
                    self._hand_open()
                else:
                    self._give_up()
        elif line.split()[:1] == ["transaction("]:
            # qmp-shell's transaction( ... ) block: refused whole (syntax.py), since
            # its actions, each run alone, would not be one transaction.
            if _closes_transaction(line.split()[1:]):
                self._ready.append((number, line))  # on one line
            else:
                self._transaction = True
                self._open = [(number, line)]
                self._chars = len(line)
        elif line.lstrip().startswith("{") and not _parses(line):
            self._transaction = False
            self._brackets = Brackets()
            if self._brackets.feed(line, line.index("{")) is None:
                self._open = [(number, line)]
                self._chars = len(line)
            else:
                self._ready.append((number, line))  # closed, and not JSON: its error
        else:
            self._ready.append((number, line))

    def _closes(self, line: str) -> bool:
        if self._transaction:
            return _closes_transaction(line.split())
        self._brackets.newline()
        return self._brackets.feed(line) is not None

    def _hand_open(self) -> None:
        self._ready.append((self._open[0][0], "\n".join(text for _, text in self._open)))
        self._open = []

    def _give_up(self) -> None:
        # Taken again, the lines after it are fewer than the limits: this
        # recurses once at most.
        (number, first), *rest = self._open
        self._open = []
        self._ready.append((number, first))
        for later, line in rest:
            self._take(later, line)


def entered_commands(text: str) -> list[str]:
    """The commands in what was entered at one prompt (a paste of several lines
    arrives as one entry: the terminal's bracketed paste)."""
    entries = Entries()
    found = [command for line in text.split("\n") for _, command in entries.feed(line)]
    return found + [command for _, command in entries.end()]


def _closes_transaction(words: list[str]) -> bool:
    """Whether a line of these words ends a transaction( block, as qmp-shell reads
    it: ``)`` alone, or after an action (``_build_cmd()`` in its qmp_shell.py)."""
    return bool(words) and ")" in (words[0], words[-1])


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True

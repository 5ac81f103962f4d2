"""Errors in schema source files, reported as ``FILE:LINE:COL: message``.

QEMU's generator prefixes every message with the location it concerns so that
editors can jump there; we keep that convention (without QEMU's "In file
included from" preamble, which our flat error format has no room for).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class SourceInfo:
    """A position in a schema file: 1-based line and column.

    Columns count a tab as reaching the next tab stop (every eight columns), so
    that the column matches what an editor with default tab stops shows.
    """

    fname: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.fname}:{self.line}:{self.col}"


class QAPIError(Exception):
    """A mistake in a schema file (syntax or meaning).

    ``str()`` is ``FILE:LINE:COL: message``, and below it the ``hint`` when
    there is one, on a line of its own as QEMU's generator prints it (``Valid
    keys are 'data', 'struct'.``); :meth:`line` is the same on one line, for a
    log or a status that must stay one.  The parts stay available as
    attributes for callers (tests, editors) that want them separately.
    """

    def __init__(self, info: SourceInfo, msg: str, hint: str | None = None) -> None:
        msg = _shown(msg)
        hint = None if hint is None else _shown(hint)
        super().__init__(f"{info}: {msg}")
        self.info = info
        self.msg = msg
        self.hint = hint

    def __str__(self) -> str:
        return self.line() if self.hint is None else f"{self.info}: {self.msg}\n{self.hint}"

    def line(self) -> str:
        """``FILE:LINE:COL: message``, the hint after it as a sentence of its own."""
        hint = "" if self.hint is None else f". {self.hint}"
        return f"{self.info}: {self.msg}{hint}"


#: The longest word (a name, a stray token, a path) a message quotes whole.
WORD_LIMIT: Final = 256
#: A quoted name may hold spaces: it is one word all the same.
_LONG_WORD: Final = re.compile(rf"'[^']{{{WORD_LIMIT + 1},}}'|\S{{{WORD_LIMIT + 1},}}")


def _cut(match: re.Match[str]) -> str:
    word = match[0]
    left = word[0] if word[0] in "'\"" else ""
    right = left if left and word.endswith(left) else ""
    inner = word[len(left):len(word) - len(right)]
    return f"{left}{inner[:WORD_LIMIT]}...{right} ({len(inner):,} characters)"


def _shown(msg: str) -> str:
    """``msg`` with control and format characters escaped (``\\x1b``, ``\\ufeff``),
    and each word longer than :data:`WORD_LIMIT` cut, saying so.

    A message quotes what the file holds: a stray token, a doc comment's symbol
    or member name, any of which may hold a NUL, an escape sequence a terminal
    would obey or a byte order mark nobody can see, or be a megabyte long.  The
    message goes to a terminal and to the daemon's log, as one line a reader can
    trust and read.
    """
    if len(msg) > WORD_LIMIT:
        msg = _LONG_WORD.sub(_cut, msg)
    if msg.isprintable():
        return msg
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in msg)

"""How migblock-shell splits a typed line into words.

Words are split like a POSIX shell does: ``'single'`` quotes are literal,
``"double"`` quotes honour ``\\"`` and ``\\\\``, a backslash outside quotes escapes the
next character.  The text before a word's first unquoted ``=`` is its key; an unquoted
value that starts with ``{`` or ``[`` runs to its matching bracket (it may contain
spaces, and strings in ``"`` or ``'``).  What a value then means is
:mod:`migblockd.shell.syntax`'s concern; completion reads the same words, of a line
still being typed (``partial``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migblockd.shell.literal import scan_brackets

#: What separates words: ASCII blanks, as a POSIX shell splits (a no-break space
#: inside a reason is part of it).
BLANKS = frozenset(" \t\n\r\f\v")


class ParseError(ValueError):
    """A line that cannot be turned into a request; ``str()`` is a one-line message."""


@dataclass
class Word:
    """One shell word, as the tokenizer saw it.

    ``key`` is the text before the first unquoted ``=`` (``None`` when there is no
    such ``=``), ``value`` the text after it (or the whole word).  ``quoted`` tells
    whether any part of the value was quoted or escaped, ``json`` whether the value
    is an unquoted JSON chunk (starting with ``{`` or ``[``).  ``start`` is the offset
    of the word in the line; ``raw_value_start`` the offset where the value begins.
    ``open`` names what is still open at the end of an incomplete line: ``"'"``,
    ``'"'``, ``"\\\\"`` or ``"json"`` (only in partial mode).
    """

    start: int
    key: str | None = None
    value: str = ""
    quoted: bool = False
    json: bool = False
    raw_value_start: int = 0
    open: str | None = None
    #: The offset in the line of the first space outside :data:`BLANKS` (a no-break
    #: space) the word holds unquoted, -1 if none; ``end``: where the word ends.
    loose: int = -1
    end: int = 0
    _pieces: list[str] = field(default_factory=list, repr=False)


def tokenize(line: str, *, partial: bool = False) -> list[Word]:
    """Split ``line`` into words.

    With ``partial`` (used for completion) an unterminated quote, escape or JSON chunk
    ends the last word, whose ``open`` says what was left open; otherwise it is a
    :class:`ParseError`.
    """
    words: list[Word] = []
    pos = 0
    n = len(line)
    while True:
        while pos < n and line[pos] in BLANKS:
            pos += 1
        if pos >= n:
            return words
        word = Word(start=pos, raw_value_start=pos)
        buf: list[str] = []
        while pos < n and line[pos] not in BLANKS:
            c = line[pos]
            if c == "'":
                end = line.find("'", pos + 1)
                if end < 0:
                    if not partial:
                        raise ParseError(f"unterminated ' quote at column {pos + 1}")
                    buf.append(line[pos + 1 :])
                    word.open = "'"
                    pos = n
                else:
                    buf.append(line[pos + 1 : end])
                    pos = end + 1
                word.quoted = True
            elif c == '"':
                i = pos + 1
                closed = False
                while i < n:
                    d = line[i]
                    if d == "\\" and i + 1 < n and line[i + 1] in '"\\':
                        buf.append(line[i + 1])
                        i += 2
                    elif d == '"':
                        closed = True
                        i += 1
                        break
                    else:
                        buf.append(d)
                        i += 1
                if not closed:
                    if not partial:
                        raise ParseError(f'unterminated " quote at column {pos + 1}')
                    word.open = '"'
                pos = i
                word.quoted = True
            elif c == "\\":
                if pos + 1 >= n:
                    if not partial:
                        raise ParseError("a backslash ends the line")
                    word.open = "\\"
                    pos = n
                else:
                    buf.append(line[pos + 1])
                    pos += 2
                word.quoted = True
            elif c in "{[" and word.key is not None and not buf and not word.quoted:
                end, closed = scan_brackets(line, pos)
                if not closed:
                    if not partial:
                        raise ParseError(
                            f"unterminated JSON value for '{word.key}' at column {pos + 1}"
                        )
                    word.open = "json"
                buf.append(line[pos:end])
                word.json = True
                pos = end
                if pos < n and line[pos] not in BLANKS and not partial:
                    raise ParseError(
                        f"unexpected text after the JSON value of '{word.key}' at column {pos + 1}"
                    )
            elif c == "=" and word.key is None:
                word.key = "".join(buf)
                buf = []
                word.quoted = False
                word.raw_value_start = pos + 1
                pos += 1
            else:
                if word.loose < 0 and c.isspace():
                    word.loose = pos  # not BLANKS: qmp-shell would split here
                buf.append(c)
                pos += 1
        word.value = "".join(buf)
        word.end = pos
        words.append(word)

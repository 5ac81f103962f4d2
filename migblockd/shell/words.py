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

import re
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


#: A run of a word's unquoted text: plain characters and backslash escapes, up to a
#: blank, a quote or a backslash that ends the line; before the key's ``=``
#: (``_KEY_RUN``) up to that ``=`` too.  Possessive, so that a run is found in one
#: pass at C speed: the tokenizer then costs Python steps per quote, bracket and
#: word, not per character (a 50 MB pasted line took 90 s, one step per character).
_KEY_RUN = re.compile(r"(?:[^ \t\n\r\f\v'\"\\=]++|\\.)++", re.S)
_VALUE_RUN = re.compile(r"(?:[^ \t\n\r\f\v'\"\\]++|\\.)++", re.S)
#: A whole word with nothing to read in it: no quote, backslash or space, and a
#: value, if any, that is not a JSON chunk.
_PLAIN_WORD = re.compile(
    r"([^\s'\"\\=]+|(?==))(?:=((?![{\[])[^\s'\"\\]*))?(?=[ \t\n\r\f\v]|\Z)")
_BLANK_RUN = re.compile(r"[ \t\n\r\f\v]*")
#: In a run: the first space that is not one of :data:`BLANKS` and not escaped.
_LOOSE = re.compile(r"(?:[^\\\s]++|\\.)*+(\s)", re.S)
#: A ``"..."`` string's inside, to its closing quote or the end of the line.
_DOUBLE = re.compile(r'(?:[^"\\]++|\\.)*+', re.S)


def _unescaped(text: str, only: str | None = None) -> str:
    """``text`` with its backslash escapes read: every one (a run's), or, in a
    ``"..."`` string (``only='"'``), ``\\"`` and ``\\\\`` alone, the backslash kept
    before any other character.  Pairs are read left to right, as :meth:`str.split`
    and :meth:`str.replace` find them: C passes, where ``re.sub`` took a second for
    half a million escapes."""
    if "\\" not in text:
        return text
    escape = "\\" if only is None else "\\" + only
    drop = "" if only is None else only
    return "\\".join([part.replace(escape, drop) for part in text.split("\\\\")])


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
        blanks = _BLANK_RUN.match(line, pos)
        assert blanks is not None  # it matches the empty string
        pos = blanks.end()
        if pos >= n:
            return words
        plain = _PLAIN_WORD.match(line, pos)
        if plain is not None:  # most words: one match makes them
            key, value = plain.group(1, 2)
            if value is None:
                word = Word(start=pos, value=key, raw_value_start=pos, end=plain.end())
            else:
                word = Word(start=pos, key=key, value=value, raw_value_start=plain.start(2),
                            end=plain.end())
            words.append(word)
            pos = plain.end()
            continue
        word = Word(start=pos, raw_value_start=pos)
        buf: list[str] = []
        while pos < n and line[pos] not in BLANKS:
            c = line[pos]
            if c in "{[" and word.key is not None and not buf and not word.quoted:
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
                continue
            run = (_KEY_RUN if word.key is None else _VALUE_RUN).match(line, pos)
            if run is not None:
                text = run.group()
                if word.loose < 0 and (loose := _LOOSE.match(text)) is not None:
                    word.loose = pos + loose.start(1)  # not BLANKS: qmp-shell would split here
                if "\\" in text:
                    text = _unescaped(text)
                    word.quoted = True
                buf.append(text)
                pos = run.end()
            elif c == "'":
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
                inside = _DOUBLE.match(line, pos + 1)
                assert inside is not None  # it matches the empty string
                i = inside.end()
                if i < n and line[i] == '"':
                    buf.append(_unescaped(inside.group(), '"'))
                    pos = i + 1
                else:  # to the end of the line (a backslash may end it)
                    if not partial:
                        raise ParseError(f'unterminated " quote at column {pos + 1}')
                    buf.append(_unescaped(line[pos + 1 :], '"'))
                    word.open = '"'
                    pos = n
                word.quoted = True
            elif c == "\\":  # the last character: a run takes any other backslash
                if not partial:
                    raise ParseError("a backslash ends the line")
                word.open = "\\"
                word.quoted = True
                pos = n
            else:  # the key's "="
                word.key = "".join(buf)
                buf = []
                word.quoted = False
                word.raw_value_start = pos + 1
                pos += 1
        word.value = "".join(buf)
        word.end = pos
        words.append(word)

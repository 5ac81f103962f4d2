"""Parsing of the lines an operator types into QMP requests.

The syntax is qmp-shell's, with its rough edges fixed::

    command key=value key.sub=value ...
    help [COMMAND]
    {"execute": "...", "arguments": {...}}      (a raw JSON request)

Words are split like a POSIX shell does (:mod:`migblockd.shell.words`).  A value is
converted like this:

* a quoted value (any part of it quoted or escaped) is always a string, so
  ``id="42"`` sends the string ``"42"``;
* an unquoted value that starts with ``{`` or ``[`` runs to its matching bracket (it
  may contain spaces, and strings in ``"`` or ``'``); it must be JSON, or else a
  Python literal of JSON's shapes, as qmp-shell takes it (``{'a': True}``, with
  ``true``, ``false`` and ``null`` as well as ``True``, ``False`` and ``None``);
* an unquoted value that parses as a JSON number, ``null``, ``true`` or ``false``
  (in any case: ``True``, ``FALSE``), or as an integer of ASCII digits Python's
  ``int()`` reads (``+5``, ``007``, ``1_000``) is taken as such, as qmp-shell does
  (which also takes other scripts' digits, ``\\uff15``, kept a string here);
  anything else is a string;
* when the schema is known (see :class:`Hints`), an unquoted value of a member whose
  type is a string or enum stays a string (``reason=1234`` sends ``"1234"``), and an
  unquoted value of a list-typed member is split at commas
  (``modes=normal,cpr-reboot`` sends ``["normal", "cpr-reboot"]``); a union's
  members are known when its tag is given on the line too (:data:`Given`).

Dotted keys build nested objects: ``a.b=1 a.c=2 d=3`` gives
``{"a": {"b": 1, "c": 2}, "d": 3}`` (qmp-shell puts ``d`` inside ``a``).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from migblockd.shell.literal import NotLiteral, python_literal
from migblockd.shell.strict_json import TooManyDigits, loads
from migblockd.shell.strict_json import shown as _shown
from migblockd.shell.words import BLANKS, ParseError, Word, tokenize

ValueHint = Literal["string", "list", "list-of-strings"] | None
"""What the schema says about a member: a string (or enum), a list (of strings), or
nothing useful (``None``)."""

Given = Mapping[str, Any]
"""What a line's keys are given, as typed (not a JSON chunk's), in the objects its
dotted keys build: where the schema finds the tag of a union, the value that says
what its other members are."""

Hints = Callable[[str, tuple[str, ...], Given], ValueHint]
"""``hints(command, path, given)`` -> what the schema says about that argument."""


@dataclass(frozen=True)
class Request:
    """A QMP request to send.  ``text``: the JSON the operator typed (a raw request),
    which is what is sent, byte for byte; ``message`` is what it parses to, for the
    reply's ``id``.  ``None`` for a request the shell built."""

    message: dict[str, Any]
    text: str | None = None

    @property
    def raw(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class Help:
    """``help`` (topic ``None``) or ``help COMMAND``."""

    topic: str | None = None


@dataclass(frozen=True)
class Nothing:
    """An empty line or a ``#`` comment."""


Parsed = Request | Help | Nothing


#: The longest line read as ``key=value`` words, in characters: the daemon's
#: default ``--max-message-size`` (bytes), past which a daemon so set refuses the
#: request (``JSON token size limit exceeded``, QEMU's words).  Reading words costs
#: Python steps for each (tokenizing, building, checking): a pasted 50 MB line held
#: the shell, deaf to Ctrl-C, for minutes.  A raw JSON request is read by ``json``'s
#: C scanner and sent as typed: its size is the daemon's to judge.
MAX_LINE = 1 << 20


def convert_value(word: Word, hint: ValueHint = None) -> Any:
    """The JSON value of ``word``'s value, following the rules in the module doc."""
    text = word.value
    if word.json:
        what = "invalid JSON value"
        try:
            return loads(text)
        except json.JSONDecodeError as err:  # not JSON's syntax: maybe Python's
            why = str(err)
        except ValueError as err:  # JSON, that cannot be sent as typed
            raise ParseError(f"'{_shown(str(word.key))}': {what} {_shown(text)}: {err}") from None
        try:
            return python_literal(text)
        except NotLiteral:
            pass
        except ValueError as err:
            # Python's syntax, so not meant as JSON: the reason is Python's.
            what, why = "invalid value", str(err)
        if hint == "list-of-strings" and text.startswith("["):
            # A list of names ([normal]): quoting the whole sends one string.
            how = (f' (write the list as {word.key}=a,b, or as JSON with its strings '
                   f'quoted, {word.key}=["a", "b"])')
        elif hint == "list":
            how = ""  # neither a string nor a list of names would do
        else:
            how = " (quote it to send a string)"
        raise ParseError(f"'{_shown(str(word.key))}': {what} {_shown(text)}: {why}{how}")
    if word.quoted or hint == "string":
        return text
    if hint in ("list", "list-of-strings"):
        if text == "":
            return []
        items = text.split(",")
        if hint == "list-of-strings":
            return items
        return [_scalar(item) for item in items]
    return _scalar(text)


def _scalar(text: str) -> Any:
    try:
        value = loads(text)
    except TooManyDigits as err:
        raise ParseError(str(err)) from None  # typed as a number: not sent as a string
    except ValueError:
        pass
    else:
        return text if isinstance(value, (dict, list)) else value
    # What qmp-shell takes for a number or a boolean and JSON does not.
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if text.isascii():
        try:
            return int(text)
        except ValueError:
            pass
    return text


class _Given:
    """The keys given so far, as a tree: a name maps to the path given a value
    there (a leaf), or to the :class:`_Given` of the names under it, which knows
    the first path that made it (for the message)."""

    __slots__ = ("first", "names")

    def __init__(self, first: tuple[str, ...]) -> None:
        self.first = first
        self.names: dict[str, _Given | tuple[str, ...]] = {}


def _insert(root: dict[str, Any], given: _Given, path: tuple[str, ...], value: Any) -> None:
    """Put ``value`` at the dotted key ``path`` in ``root``, refusing a key given
    twice, or given a value and also used as a prefix.  Linear in the key's
    length, whatever the number of keys before it or the parts in it (a pasted
    line may hold thousands of either)."""
    if any(part == "" for part in path):
        raise ParseError(f"bad key '{_shown('.'.join(path))}': empty name between dots")
    node = given
    for depth, part in enumerate(path[:-1]):
        below = node.names.get(part)
        if below is None:
            below = node.names[part] = _Given(path)
        elif not isinstance(below, _Given):  # a value given to this prefix
            _conflict(path[: depth + 1], path)
        node = below
    there = node.names.get(path[-1])
    if isinstance(there, _Given):
        _conflict(path, there.first)
    if there is not None:
        raise ParseError(f"'{_shown('.'.join(path))}' is given more than once")
    node.names[path[-1]] = path
    target = root
    for part in path[:-1]:
        child = target.setdefault(part, {})
        assert isinstance(child, dict)  # guaranteed by the checks above
        target = child
    target[path[-1]] = value


def _conflict(short: tuple[str, ...], long_: tuple[str, ...]) -> NoReturn:
    raise ParseError(f"'{_shown('.'.join(short))}' is given a value and also used for "
                     f"'{_shown('.'.join(long_))}'")


def _keyed(word: Word) -> Word:
    """``word``, or for ``'key=some value'`` quoted as a whole, as a POSIX shell user
    would, the word with that key."""
    if word.key is None and "=" in word.value and word.quoted:
        key, _, value = word.value.partition("=")
        return Word(word.start, key=key, value=value, quoted=True)
    return word


def _given(words: list[Word]) -> dict[str, Any]:
    """What the ``words`` give (:data:`Given`); a key given twice, or given a value
    and used as a prefix too, is refused later (its first value is kept here)."""
    tree: dict[str, Any] = {}
    for word in words:
        if not word.key or word.json:
            continue
        *parents, last = word.key.split(".")
        node: Any = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(last, word.value)
    return tree


def build_arguments(command: str, words: list[Word], hints: Hints | None = None) -> dict[str, Any]:
    """The ``arguments`` object for ``command`` from its ``key=value`` words."""
    arguments: dict[str, Any] = {}
    placed = _Given(())
    words = [_keyed(word) for word in words]
    given = _given(words)  # a union's tag may come after the members it types
    for word in words:
        if word.key is None:
            raise ParseError(f"expected key=value, got '{_shown(word.value)}'")
        if word.key == "":
            raise ParseError(f"missing key before '=' in '={_shown(word.value)}'")
        path = tuple(word.key.split("."))
        hint = hints(command, path, given) if hints is not None else None
        _insert(arguments, placed, path, convert_value(word, hint))
    return arguments


def _first_word(line: str, words: list[Word]) -> str:
    """The first word as typed, quoted, cut where the tokenizer cut it (its quotes
    kept), and what else it holds that looks like a blank: a no-break space pasted
    from a web page after the command's name would otherwise go unseen, or, were
    the word cut there as ``str.split`` cuts, show a command's name as no name."""
    end = words[1].start if len(words) > 1 else len(line)
    text = line[words[0].start : end].rstrip("".join(BLANKS))
    shown = f"'{_shown(text)}'"
    space = next((c for c in text if c.isspace() and c not in BLANKS), None)
    if space is None:
        return shown
    name = unicodedata.name(space, "a space")
    return f"{shown} (U+{ord(space):04X} {name} does not separate words: type a space)"


def _hidden_argument(line: str, word: Word) -> None:
    """Refuse ``word`` when a space this shell does not split at (a no-break space
    pasted from a web page) comes before what reads as another argument.

    qmp-shell splits its words at any Unicode space (``\\s`` in ``_build_cmd()``
    of QEMU's python/qemu/qmp/qmp_shell.py): ``reason=x<U+00A0>id=y`` is reason
    ``x`` and id ``y`` there, and one reason of the whole here.  Which was meant
    cannot be told, and either guess, taken in silence, adds a blocker other than
    the one meant: refused.  Without an ``=`` after it, qmp-shell could only refuse
    the line, and the space is part of the value (``reason=Migration<U+00A0>impossible``)."""
    if word.key is None or word.loose < 0 or "=" not in line[word.loose : word.end]:
        return
    space = line[word.loose]
    name = unicodedata.name(space, "a space")
    raise ParseError(f"'{_shown(line[word.start : word.end])}': U+{ord(space):04X} {name} "
                     "does not separate words, and what follows it reads as another "
                     "argument: type a space, or quote the value to keep it")


def parse_line(line: str, hints: Hints | None = None) -> Parsed:
    """Turn one input line into a :class:`Request`, :class:`Help` or :class:`Nothing`."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return Nothing()
    try:
        line.encode()
    except UnicodeEncodeError as err:  # bytes that were not UTF-8, kept by surrogateescape
        bad = line[err.start].encode("utf-8", "surrogateescape")
        # A request pretty-printed over several lines arrives joined: its line too.
        row = line.count("\n", 0, err.start)
        column = err.start - (line.rfind("\n", 0, err.start) + 1) + 1
        where = f"line {row + 1} column {column}" if row else f"column {column}"
        raise ParseError(f"not valid UTF-8 (byte 0x{bad.hex()} at {where})") from None
    if stripped.startswith("{"):
        # Parsed for its id, and to refuse what the shell cannot read (a key twice,
        # NaN), as after '=': the text itself is sent.  Written again, JSON that
        # Python reads and the daemon, like QEMU, does not (0e5) would reach it as
        # other JSON than the operator typed.
        try:
            raw = loads(stripped)
        except ValueError as err:
            raise ParseError(f"invalid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ParseError("a raw JSON request must be an object")
        return Request(raw, text=stripped)
    if len(stripped) > MAX_LINE:
        raise ParseError(f"a line of {len(stripped):,} characters is more than the {MAX_LINE:,} "
                         "this shell reads as key=value words (the daemon's default "
                         "max-message-size, in bytes, past which it refuses a request): write "
                         'it as a raw JSON request ({"execute": ...}), which is sent as typed')
    if line.split()[:1] == ["transaction("]:  # the whole block (entries.py)
        raise ParseError("qmp-shell's transaction( ... ) block is not read by this shell: "
                         "none of its lines was sent (write transaction actions=[...], or "
                         "a raw JSON request)")
    words = tokenize(line)
    head = words[0]
    if head.key is not None:
        raise ParseError(f"expected a command name first, got {_first_word(line, words)}")
    name = head.value
    if name == "help":
        if len(words) > 2 or any(w.key is not None for w in words[1:]):
            raise ParseError("usage: help [COMMAND | EVENT | TYPE]")
        return Help(words[1].value if len(words) == 2 else None)
    for word in words[1:]:
        _hidden_argument(line, word)
    arguments = build_arguments(name, words[1:], hints)
    message: dict[str, Any] = {"execute": name}
    if arguments:
        message["arguments"] = arguments
    return Request(message)

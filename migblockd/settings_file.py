"""The TOML configuration file (``--config``), read against the option table.

Each key is an option's name without ``--`` (``log-level``; an underscore
stands for a dash), checked by the same parse function as the command line's
argument (:mod:`migblockd.options`), so both accept the same things and say the
same about what they refuse.  A refused setting is named with the line that
gives it, ``FILE:LINE: key ...``, as QEMU's QAPI generator names a schema's
mistakes: tomllib keeps no positions, so :func:`line_of` finds the line in the
text.  Like sshd's StrictModes, a file that anyone but
root and the daemon's user could have written is refused
(:mod:`migblockd.trusted_file`): whoever writes it sets the log level, the
socket's mode and the limits.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from migblockd.kinds import KeyedError, describe
from migblockd.options import ConfigError, Option, Where, table
from migblockd.regular import NotRegularFile, TooLarge, read_regular
from migblockd.startup import passing
from migblockd.trusted_file import check_trusted

__all__ = ["MAX_SIZE", "TOO_DEEP", "FileSettings", "key_lines", "line_of", "read_file"]

#: The largest configuration file read: a policy naming tens of thousands of users
#: fits; more is a mistake (a log, an image), which would take the memory and,
#: on a reload, the event loop's time to read.
MAX_SIZE = 1 << 20

#: A file (or a value) that tomllib cannot read without running out of stack.
TOO_DEEP = "arrays or tables nested too deeply to read"
#: Where tomllib says a mistake on a last line that has no newline is.
_AT_END = "(at end of document)"


class FileSettings(dict[str, Any]):
    """What a configuration file sets (field name -> checked value), and where.

    A dict, as before, so that every caller that compares or copies the settings
    is unchanged; and the line of each, for what is found wrong with a value only
    after the file was read (a ``socket-group`` that names no group): named
    ``FILE:LINE: key`` as the mistakes found while reading are, since an operator
    with a long file should not have to search it for the setting.
    """

    def __init__(self, values: dict[str, Any], path: Path | None, lines: dict[str, int],
                 entries: dict[tuple[str, ...], int] | None = None) -> None:
        super().__init__(values)
        #: The file, as the command line named it (None: no file, which sets nothing).
        self.path = path
        #: The line that gives each setting (field name -> number).
        self.lines = lines
        #: The first line that gives each key path of a table (``access``, ``users``,
        #: ``alice``), or a key inside it (:func:`key_lines`).
        self.entries = {} if entries is None else entries


def read_file(path: Path, settings: type) -> FileSettings:
    """Read a TOML configuration file into field name -> checked value."""
    try:
        # Not open(): a FIFO would hold the daemon's event loop (a reload) until
        # someone wrote to it.
        text = read_regular(path, lambda fd, st: check_trusted(
            path, fd, st, "configuration file", "the daemon's settings"), MAX_SIZE).decode()
        raw = tomllib.loads(text)
    except TooLarge:
        raise ConfigError(f"{path} is larger than {MAX_SIZE // 1024} KiB, which no "
                          "configuration file needs; --config takes a TOML file") from None
    except NotRegularFile:
        raise ConfigError(f"{path} is not a regular file; --config takes a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}",
                          passing=passing(exc.errno)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are "
                          "UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {_explained(str(exc), text)}") from None
    except RecursionError:  # tomllib recurses once per level of [ and {
        raise ConfigError(f"{path}: {TOO_DEEP}") from None
    # Underscores are accepted for dashes (max_clients), as they always were.
    by_key = {o.key: o for o in table(settings)}
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in raw.items():
        # Found only when refused: the scan costs a pass over the text.
        def at(key: str = key, keys: tuple[str, ...] = ()) -> str:
            number = line_of(text, key, *keys)
            return f"{path}:{number}" if number is not None else str(path)

        o = by_key.get(key.replace("_", "-"))
        if o is None:
            near = difflib.get_close_matches(key.replace("_", "-"), list(by_key), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            # Cut as a value is: the key is the file's text, of any length.
            raise ConfigError(f"{at()}: unknown setting {describe(key)}{hint}")
        if Where.FILE not in o.where:
            raise ConfigError(f"{at()}: {key} can only be given on the command line")
        if o.name in given:
            raise ConfigError(f"{at()}: {key} is {given[o.name]} again (an underscore "
                              "stands for a dash); give it once")
        given[o.name] = key
        try:
            values[o.name] = o.parse(value)
        except ValueError as exc:
            # A key of a table ([access]'s users.alice) is named with its own line.
            keys = exc.keys if isinstance(exc, KeyedError) else ()
            raise ConfigError(f"{at(key, keys)}: {key} {exc}"
                              f"{_misplaced(key, value, by_key)}") from None
        except RecursionError:  # a string that a kind reads as TOML (access = "{...}")
            raise ConfigError(f"{at()}: {key} has {TOO_DEEP}") from None
        if isinstance(values[o.name], Path) and not values[o.name].is_absolute():
            # As a leading ~ (kinds.FilePath): the file names one path wherever the
            # daemon starts, but a relative one follows the working directory (systemd
            # starts it in /), and a state-dir found elsewhere restores no blocker.
            raise ConfigError(f"{at()}: {key} must be an absolute path in the configuration "
                              f"file (a relative one is taken from the daemon's working "
                              f"directory, which differs between starts), not {value!r}")
    # One pass over the text for every key.  Field names for the settings (a key
    # may be spelled with underscores); the entries of the tables (access's users
    # and groups), which a warning names with their own line, under the key with
    # dashes.
    found = key_lines(text)
    lines = {by_key[given[0].replace("_", "-")].name: number
             for given, number in found.items()
             if len(given) == 1 and given[0].replace("_", "-") in by_key}
    entries = {(given[0].replace("_", "-"), *given[1:]): number
               for given, number in found.items() if len(given) > 1}
    return FileSettings(values, path, lines, entries)


#: A key as TOML spells one: bare, "basic" or 'literal'.
_KEY = r"""[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+'"""
#: A dotted key (``a."b.c".d``), and the lines that give one: ``key = ...`` and a
#: table's header, ``[key]`` or ``[[key]]``.
_DOTTED = rf"(?:{_KEY})(?:\s*\.\s*(?:{_KEY}))*+"
_KEY_LINE = re.compile(rf"\s*({_DOTTED})\s*=")
_HEADER = re.compile(rf"\s*\[\[?\s*({_DOTTED})\s*\]")
_PART = re.compile(_KEY)


def line_of(text: str, key: str, *within: str) -> int | None:
    """The number of the line of ``text`` (a TOML document tomllib read) that gives
    the top-level ``key``, or the key ``within`` it (``access``, ``users``,
    ``alice``): the line ``alice = ...`` below ``[access.users]``, ``users.alice =
    ...`` below ``[access]``, ``access.users.alice = ...`` before any header.  When
    no line gives that key (it is in an inline table, or has no line of its own),
    the line that gives the deepest table holding it: ``users = { alice = ... }``,
    or the header ``[access]``; None if no line gives even ``key``.

    Lines inside a multi-line string or array are not the start of a key: the scan
    follows TOML's strings, comments and brackets from line to line.
    """
    wanted = (key, *within)
    best: tuple[int, int] | None = None  # (keys of wanted given, line) so far
    for number, given in _given(text):
        if given[:len(wanted)] == wanted:
            return number  # the key, or a table or key inside it
        if wanted[:len(given)] == given and (best is None or len(given) > best[0]):
            best = (len(given), number)
    return None if best is None else best[1]


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The first line of ``text`` that gives each key path, or a key inside it:
    ``line_of(text, *path)`` for every path at once, one pass over a text that
    may be 1 MiB."""
    found: dict[tuple[str, ...], int] = {}
    for number, given in _given(text):
        for end in range(1, len(given) + 1):
            found.setdefault(given[:end], number)
    return found


def _given(text: str) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Each line of ``text`` that gives a key or a table's header, with the keys
    (the whole path, from the top) that it gives."""
    table: tuple[str, ...] = ()  # the table the lines are in, after its header
    quote: str | None = None  # the delimiter of the multi-line string open
    depth = 0  # brackets and braces open
    # Not splitlines(): TOML ends a line at \n only, and a string may hold U+2028.
    for number, line in enumerate(text.split("\n"), 1):
        if quote is None and depth == 0:
            if (header := _HEADER.match(line)) is not None:
                table = _keys(header.group(1))
                yield number, table
            elif (found := _KEY_LINE.match(line)) is not None:
                yield number, table + _keys(found.group(1))
        quote, depth = _scan(line, quote, depth)


def _keys(dotted: str) -> tuple[str, ...]:
    return tuple(_unquoted_key(part.group()) for part in _PART.finditer(dotted))


def _unquoted_key(spelled: str) -> str:
    if spelled[0] not in "\"'":
        return spelled
    try:
        return next(iter(tomllib.loads(f"{spelled} = 0")))
    except (tomllib.TOMLDecodeError, StopIteration):
        return spelled


#: What may change the state of the scan: a string, a comment sign, or a run of
#: anything else (its brackets counted at once), and a quote left alone.  Regular
#: expressions, never backtracking, not a loop over characters: a line may be 1 MiB.
_TOKEN = re.compile(r'''"""|\'\'\'|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+'|["'#]|[^"'#]++''')
#: The rest of a multi-line string, through its closing delimiter (the last of up
#: to five quotes: two of them may be its text).
_REST = {
    '"""': re.compile(r'(?:[^"\\]|\\.|"(?!""))*+"""+'),
    "'''": re.compile(r"(?:[^']|'(?!''))*+'''+"),
}


def _scan(line: str, quote: str | None, depth: int) -> tuple[str | None, int]:
    """What is open at the end of ``line``: a multi-line string's delimiter, and
    brackets, given what was open at its start."""
    i = 0
    while True:
        if quote is not None:
            rest = _REST[quote].match(line, i)
            if rest is None:
                return quote, depth  # the string goes on on the next line
            i, quote = rest.end(), None
        for token in _TOKEN.finditer(line, i):
            text = token.group()
            if text in _REST:
                quote, i = text, token.end()
                break
            if text[0] not in "\"'#":
                # tomllib read the file: its brackets balance, and never close more.
                depth = max(depth + text.count("[") + text.count("{") - text.count("]")
                            - text.count("}"), 0)
            elif len(text) == 1:  # a comment, or a quote tomllib read as no string
                return None, depth
        else:
            return None, depth


def _explained(message: str, text: str) -> str:
    """A TOML error with the line it points at, and what tomllib's terse words mean.

    tomllib says where (``at line 21, column 20``) but not what is there, and
    says ``Cannot overwrite a value`` for a key given twice: what an operator
    who appends ``log-level = "debug"`` to the shipped file, which sets it
    already, gets.  A mistake on a last line without a newline is ``at end of
    document``, which is given the number of that line, the last that is not
    blank.
    """
    # Not splitlines(): tomllib counts lines as TOML ends them, at \n only, and a
    # comment or a string may hold U+2028 or U+0085.
    lines = text.split("\n")
    found = re.search(r"\(at line (\d+), column \d+\)$", message)
    if found:
        number = int(found.group(1))
    elif message.endswith(_AT_END):
        number = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
        if number:
            message = f"{message.removesuffix(_AT_END)}(at end of document, line {number})"
    else:
        return message
    if not 1 <= number <= len(lines):
        return message
    line = lines[number - 1].strip()
    shown = line if len(line) <= 80 else line[:77] + "..."
    where = f": {shown!r}" if shown else ""
    if message.startswith(("Cannot overwrite a value", "Cannot declare")):
        return f"{message}{where}: a key (or table) given twice; give each once"
    return f"{message}{where}{_unquoted(line)}"


def _unquoted(line: str) -> str:
    """A hint for a line whose value is a bare word that TOML cannot read: a string
    left unquoted (``log-level = debug``), or a mode (``socket-mode = 0660``, which
    TOML refuses for its leading zero)."""
    found = re.fullmatch(r"([\w.-]+)\s*=\s*([\w.:/@+-]+)\s*(?:#.*)?", line)
    if found is None:
        return ""
    try:
        tomllib.loads(f"v = {found.group(2)}")
    except tomllib.TOMLDecodeError:
        # Cut as the line shown before it is: a file may hold a line of 1 MiB.
        hint = f'{found.group(1)} = "{found.group(2)}"'
        return f"; a string goes in quotes: {hint if len(hint) <= 80 else hint[:77] + '...'}"
    return ""


def _misplaced(table: str, value: object, settings: dict[str, Option]) -> str:
    """A hint for a refused table that holds a setting's key.

    TOML puts every key after a ``[table]`` header into that table, so a
    setting written below ``[access]`` is read as part of it, and refused
    as what it is not (a user named log-level).
    """
    if not isinstance(value, dict):
        return ""
    for key, item in value.items():
        if key.replace("_", "-") in settings:
            return (f"; TOML read {key} as part of [{table}]: settings go before the "
                    "first [table] header")
        hint = _misplaced(f"{table}.{key}", item, settings)
        if hint:
            return hint
    return ""

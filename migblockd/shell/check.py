"""A typed command checked against the daemon's introspection before it is sent.

The shell already holds the daemon's ``query-qmp-schema`` answer, so it can catch
the typos that cost a round trip and read badly in the daemon's answer: an unknown
command, or an unknown argument name (``add-blocker reson=x`` would be answered
``Parameter 'reason' is missing``).  Names are checked at every level the schema
describes: dotted keys and JSON objects after ``=`` build the same nested objects,
so both are checked; an object whose members depend on a tag (a union) is not.  A
member given to what is not an object (``add-blocker reason.x=1``, where ``reason``
is a string) is a name the schema cannot have, so it is refused too: the daemon
would only say ``Invalid parameter type for 'reason'``, about a value the operator
never typed.

Missing arguments and wrong types are left to the daemon, which words them as QEMU
does; raw JSON requests are not checked at all (they go exactly as typed).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, NamedTuple

from migblockd.shell.schema import Schema

# difflib's default: below this ratio two names are not alike.
_CUTOFF = 0.6
# Names almost as alike as the best one are offered too, the rest would be noise
# ("add-bloker" is "add-blocker", not "del-blocker").
_MARGIN = 0.1


def suggestions(word: str, candidates: Sequence[str], limit: int = 5) -> list[str]:
    """The candidates ``word`` was probably meant to be: the closest matches
    (difflib's ratio) first, then those containing it (``help blocker``, ``add``).

    Compared regardless of case: QMP's names are matched exactly, but one typed with
    Caps Lock on (``QUERY-MIGRATE``, ``help blocker_added``) is still that name, and
    got no suggestion at all; it is then the only one offered."""
    typed = word.casefold()
    if same := [c for c in candidates if c.casefold() == typed]:
        return same[:limit]  # the name itself: the others would only hide it
    scored = sorted((-ratio, c) for c in candidates
                    if (ratio := _likeness(typed, c.casefold())) >= _CUTOFF)
    close = [c for score, c in scored if -score >= -scored[0][0] - _MARGIN][:3]
    if len(word) >= 3:
        close += [c for c in candidates if typed in c.casefold() and c not in close]
    return close[:limit]


#: The longest name a message quotes whole: a pasted megabyte is cut, not echoed.
_SHOWN = 64


def shown(name: str) -> str:
    """``name`` as a message quotes it: cut after ``_SHOWN`` characters, saying so."""
    if len(name) <= _SHOWN:
        return name
    return f"{name[:_SHOWN]}... ({len(name):,} characters)"


def _likeness(word: str, candidate: str) -> float:
    """difflib's ratio, or 0 when its cheap upper bounds are below the cutoff (as
    ``difflib.get_close_matches`` does): the full ratio of a pasted megabyte
    against each name would take seconds."""
    matcher = difflib.SequenceMatcher(None, word, candidate)
    if matcher.real_quick_ratio() < _CUTOFF or matcher.quick_ratio() < _CUTOFF:
        return 0.0
    return matcher.ratio()


def _phrase(choices: Sequence[str]) -> str:
    quoted = [f"'{c}'" for c in choices]
    if not quoted:
        return ""
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"; did you mean {listed}?"


#: What is typed to leave another shell (bash's exit, Python's quit, HMP's q): not
#: sent (no daemon of migblockd's has them) and answered with how this one ends.
LEAVING = frozenset({"exit", "quit", "q", "logout"})


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'a' or 'b'?"``, or "" when nothing is close."""
    return _phrase(suggestions(word, candidates))


class _Unknown(NamedTuple):
    """A name that is not in the schema: the path of the value holding it, the
    name, and the names that value may hold; ``scalar`` says what the value is
    instead when it is not an object at all ("a string")."""

    parent: str
    key: str
    names: list[str]
    scalar: str | None = None


# What a value of a type that cannot hold members is, for "'reason' is a string".
_SCALAR_WORDS = {
    "string": "a string",
    "int": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
    "array": "a list",
}


def _scalar(schema: Schema, type_name: str) -> str | None:
    """How to name a type whose values have no members; None when they may have
    some (objects, unions, alternates, 'any') or the type is not known."""
    if schema.meta_type(type_name) == "enum":
        return "an enum value"
    json_type = schema.json_type(type_name)
    return None if json_type is None else _SCALAR_WORDS.get(json_type)


def _unknown(schema: Schema, type_name: str, value: Any, path: str) -> _Unknown | None:
    """The first name in ``value`` that type ``type_name`` does not have."""
    if isinstance(value, dict):
        members = schema.known_members(type_name)
        if members is None:
            scalar = _scalar(schema, type_name) if value else None
            return None if scalar is None else _Unknown(path, next(iter(value)), [], scalar)
        types = {m.name: m.type for m in members}
        for key, item in value.items():
            if key not in types:
                return _Unknown(path, key, list(types))
            found = _unknown(schema, types[key], item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        element = schema.element_type(type_name)
        if element is not None:
            for index, item in enumerate(value):
                found = _unknown(schema, element, item, f"{path}[{index}]")
                if found is not None:
                    return found
    return None


#: QEMU's commands that take more arguments than their introspection lists, which
#: it cannot tell: device_add takes its device's properties too ('gen': false, "so
#: we can get the additional arguments", in QEMU's qapi/qdev.json).  Their names
#: are left to QEMU, as qmp-shell leaves them.
OPEN_ARGUMENTS = frozenset({"device_add"})


def check_request(schema: Schema, message: dict[str, Any]) -> str | None:
    """Why ``message`` (``{"execute": ..., "arguments": ...}`` as the shell built
    it) cannot be right for this daemon, or None.  Paths are written as the daemon
    writes them: ``a.b``, ``list[0].member``."""
    if not schema.commands:
        return None  # no introspection (the daemon did not answer it): nothing to go by
    name = str(message.get("execute"))
    if name in schema.forwarded:
        return None  # QEMU's own command: only QEMU knows its arguments
    info = schema.commands.get(name)
    if info is not None and name in OPEN_ARGUMENTS:
        return None
    if info is None:
        if name in LEAVING:
            return (f"unknown command '{name}': the shell ends at Ctrl-D, or at the end of "
                    "its input ('help' lists the commands)")
        hint = did_you_mean(name, schema.command_names()) or "; 'help' lists the commands"
        return f"unknown command '{shown(name)}'{hint}"
    found = _unknown(schema, info.arg_type, message.get("arguments", {}), "")
    if found is None:
        return None
    parent, key, names, scalar = found
    prefix = f"{parent}." if parent else ""
    key = shown(key)
    if scalar is not None:
        return f"unknown argument '{prefix}{key}' for {name}: '{parent}' is {scalar}, not an object"
    close = suggestions(key, names)
    if close:
        return f"unknown argument '{prefix}{key}' for {name}{_phrase([prefix + c for c in close])}"
    if not names:
        where = f"'{parent}' has no members" if parent else "it takes no arguments"
        return f"unknown argument '{prefix}{key}' for {name}: {where}"
    where = f"members of '{parent}'" if parent else "its arguments"
    return f"unknown argument '{prefix}{key}' for {name} ({where}: {', '.join(names)})"

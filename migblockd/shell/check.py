"""A typed command checked against the daemon's introspection before it is sent.

The shell already holds the daemon's ``query-qmp-schema`` answer, so it can catch
the typos that cost a round trip and read badly in the daemon's answer: an unknown
command, or an unknown argument name (``add-blocker reson=x`` would be answered
``Parameter 'reason' is missing``).  Names are checked at every level the schema
describes: dotted keys and JSON objects after ``=`` build the same nested objects,
so both are checked; an object whose members depend on a tag (a union) is not.

Missing arguments and wrong types are left to the daemon, which words them as QEMU
does; raw JSON requests are not checked at all (they go exactly as typed).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from migblockd.shell.schema import Schema

# difflib's default: below this ratio two names are not alike.
_CUTOFF = 0.6
# Names almost as alike as the best one are offered too, the rest would be noise
# ("add-bloker" is "add-blocker", not "del-blocker").
_MARGIN = 0.1


def suggestions(word: str, candidates: Sequence[str], limit: int = 5) -> list[str]:
    """The candidates ``word`` was probably meant to be: the closest matches
    (difflib's ratio) first, then those containing it (``help blocker``, ``add``)."""
    scored = sorted(
        (-ratio, c)
        for c in candidates
        if (ratio := difflib.SequenceMatcher(None, word, c).ratio()) >= _CUTOFF
    )
    close = [c for score, c in scored if -score >= -scored[0][0] - _MARGIN][:3]
    if len(word) >= 3:
        close += [c for c in candidates if word in c and c not in close]
    return close[:limit]


def _phrase(choices: Sequence[str]) -> str:
    quoted = [f"'{c}'" for c in choices]
    if not quoted:
        return ""
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"; did you mean {listed}?"


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """``"; did you mean 'a' or 'b'?"``, or "" when nothing is close."""
    return _phrase(suggestions(word, candidates))


def _unknown(
    schema: Schema, type_name: str, value: Any, path: str
) -> tuple[str, str, list[str]] | None:
    """The first name in ``value`` that type ``type_name`` does not have, as
    (the path of the object holding it, the name, the names it may hold)."""
    if isinstance(value, dict):
        members = schema.known_members(type_name)
        if members is None:
            return None
        types = {m.name: m.type for m in members}
        for key, item in value.items():
            if key not in types:
                return path, key, list(types)
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
    if info is None:
        hint = did_you_mean(name, schema.command_names()) or "; 'help' lists the commands"
        return f"unknown command '{name}'{hint}"
    found = _unknown(schema, info.arg_type, message.get("arguments", {}), "")
    if found is None:
        return None
    parent, key, names = found
    prefix = f"{parent}." if parent else ""
    close = suggestions(key, names)
    if close:
        return f"unknown argument '{prefix}{key}' for {name}{_phrase([prefix + c for c in close])}"
    if not names:
        where = f"'{parent}' has no members" if parent else "it takes no arguments"
        return f"unknown argument '{prefix}{key}' for {name}: {where}"
    where = f"members of '{parent}'" if parent else "its arguments"
    return f"unknown argument '{prefix}{key}' for {name} ({where}: {', '.join(names)})"

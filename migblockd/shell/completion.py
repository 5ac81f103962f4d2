"""Tab completion, computed from the daemon's ``query-qmp-schema`` answer.

* first word: command names (and ``help``);
* ``help ``: command and event names;
* later words: the argument names of the command being typed (``name=``, or
  ``name.`` for an object-typed argument whose members can be given as dotted keys),
  not the ones already given;
* after ``name=``: the values of an enum or boolean argument; for a list of enum
  values both forms are completed: ``modes=normal,cpr-`` (the comma convenience)
  and ``modes=["normal", "cpr-`` (JSON), offering only values not yet listed.

A completed word that cannot go on (a command name, a ``help`` topic, a scalar enum
or boolean value) is followed by a space, as readline (and so qmp-shell) does, so
that the next word can be typed at once; a list item is not (a comma may follow).

:func:`complete` is pure (text in, candidates out); :class:`ShellCompleter` adapts
it to prompt_toolkit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from migblockd.shell.schema import Schema
from migblockd.shell.words import Word, tokenize

BUILTINS = ("help",)


@dataclass(frozen=True)
class Candidate:
    """Replace ``text_before_cursor[start:]`` with ``text``."""

    text: str
    start: int
    meta: str = ""


def complete(schema: Schema, text: str) -> list[Candidate]:
    """The completions for ``text`` (the line up to the cursor)."""
    if text.lstrip().startswith("{"):
        return []
    words = tokenize(text, partial=True)
    # The last word is still being typed when it runs to the cursor: also after a
    # blank that is part of it (``reason=x\ ``, escaped, or in an open quote), where
    # an argument name offered would be glued to its value.
    if words and words[-1].end == len(text):
        current: Word | None = words[-1]
        done = words[:-1]
    else:
        current = None
        done = words
    start = current.start if current is not None else len(text)

    if not done:
        if current is not None and current.key is not None:
            return []
        prefix = current.value if current is not None else ""
        names = [*schema.command_names(), *BUILTINS]
        return [Candidate(n + " ", start) for n in names if n.startswith(prefix)]

    command = done[0].value
    if command == "help":
        if len(done) > 1 or (current is not None and current.key is not None):
            return []
        prefix = current.value if current is not None else ""
        topics = [*schema.command_names(), *sorted(schema.events)]
        return [Candidate(n + " ", start) for n in topics if n.startswith(prefix)]

    if command not in schema.commands:
        return []
    if current is None or current.key is None:
        given = {w.key for w in done[1:] if w.key is not None}
        return _argument_names(schema, command, current.value if current else "", start, given)
    return _values(schema, command, current, text)


def _argument_names(
    schema: Schema, command: str, prefix: str, start: int, given: set[str]
) -> list[Candidate]:
    parent, dot, _ = prefix.rpartition(".")
    path = parent.split(".") if dot else []
    type_name = schema.resolve(command, path)
    if type_name is None:
        return []
    result = []
    for member in schema.members(type_name):
        full = f"{parent}.{member.name}" if dot else member.name
        if not full.startswith(prefix):
            continue
        if full in given or any(g.startswith(full + ".") for g in given):
            continue
        suffix = "." if schema.meta_type(member.type) == "object" else "="
        meta = schema.describe(member.type) + (" (optional)" if member.optional else " (required)")
        result.append(Candidate(full + suffix, start, meta))
    return result


def _choices(schema: Schema, type_name: str) -> list[str] | None:
    values = schema.enum_values(type_name)
    if values is not None:
        return values
    if schema.json_type(type_name) == "boolean":
        return ["true", "false"]
    return None


def _values(schema: Schema, command: str, word: Word, text: str) -> list[Candidate]:
    assert word.key is not None
    type_name = schema.resolve(command, word.key.split("."))
    if type_name is None:
        return []
    raw = text[word.raw_value_start :]
    choices = _choices(schema, type_name)
    if choices is not None:
        if word.quoted:
            return []
        return [Candidate(c + " ", word.raw_value_start) for c in choices if c.startswith(raw)]
    element = schema.element_type(type_name)
    if element is None:
        return []
    choices = _choices(schema, element)
    if choices is None:
        return []
    is_string = schema.enum_values(element) is not None
    if raw.startswith("["):
        return _json_list_items(choices, raw, word.raw_value_start, is_string)
    if word.quoted:
        return []
    *chosen, prefix = raw.split(",")
    item_start = word.raw_value_start + len(raw) - len(prefix)
    return [Candidate(c, item_start) for c in choices if c.startswith(prefix) and c not in chosen]


def _json_list_items(
    choices: Iterable[str], raw: str, value_start: int, is_string: bool
) -> list[Candidate]:
    cut = max(raw.rfind(","), raw.rfind("["))
    item = raw[cut + 1 :]
    stripped = item.lstrip()
    item_start = value_start + cut + 1 + len(item) - len(stripped)
    chosen = {a or b for a, b in re.findall(
        r'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'', raw[:cut])}
    if not is_string:
        return [Candidate(c, item_start) for c in choices if c.startswith(stripped)]
    # In the quotes the item was begun with: a Python literal's '...' too (qmp-shell's).
    quote = "'" if stripped.startswith("'") else '"'
    prefix = stripped.removeprefix(quote)
    return [
        Candidate(f"{quote}{c}{quote}", item_start)
        for c in choices if c.startswith(prefix) and c not in chosen
    ]


class ShellCompleter(Completer):
    """prompt_toolkit adapter; ``schema()`` returns the current connection's schema."""

    def __init__(self, schema: Callable[[], Schema]) -> None:
        self._schema = schema

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        for candidate in complete(self._schema(), text):
            yield Completion(
                candidate.text,
                start_position=candidate.start - len(text),
                display_meta=candidate.meta or None,
            )

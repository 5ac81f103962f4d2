"""The shell's view of a ``query-qmp-schema`` answer (QEMU's SchemaInfo list).

Everything the shell knows about commands, their arguments and enum values comes from
here, i.e. from the daemon it is connected to.  Type names other than built-ins are
masked (``"0"``, ``"1"``, ...), so types are described by their structure
("list of one of: normal, cpr-reboot"), never by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from migblockd.qapi.doc import JSON_TYPE_WORDS
from migblockd.shell.syntax import Given, ValueHint

NOTHING: Given = {}


@dataclass(frozen=True)
class Member:
    """A member of an object type: an argument of a command, or a nested member."""

    name: str
    type: str
    optional: bool


@dataclass(frozen=True)
class CommandInfo:
    name: str
    arg_type: str
    ret_type: str
    allow_oob: bool


class SchemaError(ValueError):
    """A ``query-qmp-schema`` answer that is not a list of SchemaInfo objects;
    ``str()`` says where, in one line."""


Shape = tuple[str, Callable[[object], bool]]
"""What a member must be: in words, and the test."""

_STRING: Shape = ("a string", lambda value: isinstance(value, str))
_STRINGS: Shape = ("a list of strings",
                   lambda value: isinstance(value, list) and all(isinstance(v, str) for v in value))


def _objects_with(*keys: str) -> Shape:
    """A list of objects whose ``keys`` are strings."""
    return ("a list of objects with " + " and ".join(f"a string '{k}'" for k in keys),
            lambda value: isinstance(value, list) and all(
                isinstance(m, Mapping) and all(isinstance(m.get(k), str) for k in keys)
                for m in value))


#: The members of a SchemaInfo the shell reads, by meta-type.
_SHAPES: dict[str, dict[str, Shape]] = {
    "builtin": {"json-type": _STRING},
    "enum": {"members": _objects_with("name"), "values": _STRINGS},
    "array": {"element-type": _STRING},
    "object": {"members": _objects_with("name", "type"), "tag": _STRING,
               "variants": _objects_with("case", "type")},
    "alternate": {"members": _objects_with("type")},
    "command": {"arg-type": _STRING, "ret-type": _STRING},
    "event": {"arg-type": _STRING},
}


def _check(index: int, info: object) -> None:
    """Raise SchemaError unless ``info`` has SchemaInfo's shape where the shell reads it.

    Only a broken server answers otherwise (QEMU's introspection, and migblockd's,
    are generated from their schemas), and the shell would fail on it later, at
    the first Tab or ``help`` that reaches the bad entry."""
    if not isinstance(info, Mapping):
        raise SchemaError(f"entry {index} is not an object")
    name, meta = info.get("name"), info.get("meta-type")
    if not isinstance(name, str) or not isinstance(meta, str):
        raise SchemaError(f"entry {index} has no string 'name' and 'meta-type'")
    for key, (what, fits) in _SHAPES.get(meta, {}).items():
        if key in info and not fits(info[key]):  # a missing one reads as nothing
            raise SchemaError(f"entry {index} ({meta} {name!r}): '{key}' is not {what}")


class Schema:
    """An index over a list of SchemaInfo objects."""

    def __init__(self, infos: Sequence[Mapping[str, Any]], listed: Iterable[str] = ()) -> None:
        """``listed``: the names ``query-commands`` answered, which include the
        commands the daemon forwards to QEMU without describing them.  Raises
        :class:`SchemaError` for an entry that is not SchemaInfo's shape."""
        self._types: dict[str, Mapping[str, Any]] = {}
        self._field_cache: dict[str, Mapping[str, str]] = {}
        self._case_cache: dict[str, Mapping[str, str]] = {}
        self.commands: dict[str, CommandInfo] = {}
        self.events: dict[str, str] = {}
        """Event name -> the type of its data."""
        for index, info in enumerate(infos):
            _check(index, info)
            name = str(info.get("name", ""))
            meta = info.get("meta-type")
            if meta == "command":
                self.commands[name] = CommandInfo(
                    name,
                    str(info.get("arg-type", "")),
                    str(info.get("ret-type", "")),
                    bool(info.get("allow-oob", False)),
                )
            elif meta == "event":
                self.events[name] = str(info.get("arg-type", ""))
            else:
                self._types[name] = info
        self.forwarded = sorted(set(listed) - set(self.commands))
        """Commands the daemon runs but does not describe (qemu-passthrough):
        they go as typed, unchecked."""

    @classmethod
    def empty(cls) -> Schema:
        return cls([])

    def command_names(self) -> list[str]:
        """Command names, sorted: the described ones and the forwarded ones."""
        return sorted([*self.commands, *self.forwarded])

    def meta_type(self, type_name: str) -> str | None:
        info = self._types.get(type_name)
        return None if info is None else str(info.get("meta-type"))

    def members(self, type_name: str) -> list[Member]:
        """The members of an object type (empty for anything else)."""
        info = self._types.get(type_name)
        if info is None or info.get("meta-type") != "object":
            return []
        return [
            Member(str(m["name"]), str(m["type"]), "default" in m) for m in info.get("members", [])
        ]

    def known_members(self, type_name: str) -> list[Member] | None:
        """Every member an object of this type may have; ``None`` when that is not
        known: not an object type, or one whose members depend on a tag (QEMU's
        unions list those under ``variants``)."""
        info = self._types.get(type_name)
        if info is None or info.get("meta-type") != "object" or info.get("variants"):
            return None
        return self.members(type_name)

    def arguments(self, command: str) -> list[Member]:
        info = self.commands.get(command)
        return [] if info is None else self.members(info.arg_type)

    def enum_values(self, type_name: str) -> list[str] | None:
        """The values of an enum type, ``None`` for other types."""
        info = self._types.get(type_name)
        if info is None or info.get("meta-type") != "enum":
            return None
        if "members" in info:
            return [str(m["name"]) for m in info["members"]]
        return [str(v) for v in info.get("values", [])]

    def element_type(self, type_name: str) -> str | None:
        """The element type of an array type, ``None`` for other types."""
        info = self._types.get(type_name)
        if info is None or info.get("meta-type") != "array":
            return None
        return str(info.get("element-type"))

    def json_type(self, type_name: str) -> str | None:
        """``string``, ``int``, ``boolean``, ... for built-ins; enums are ``string``."""
        info = self._types.get(type_name)
        if info is None:
            return None
        meta = info.get("meta-type")
        if meta == "builtin":
            return str(info.get("json-type"))
        if meta == "enum":
            return "string"
        if meta == "array":
            return "array"
        if meta == "object":
            return "object"
        return None

    def resolve(self, command: str, path: Sequence[str], given: Given = NOTHING) -> str | None:
        """The type of the argument at ``path`` (dotted key split at dots); ``given``:
        what the line gives (:data:`~migblockd.shell.syntax.Given`), where a union's
        tag is looked up."""
        info = self.commands.get(command)
        if info is None:
            return None
        type_name: str | None = info.arg_type
        for part in path:
            type_name = self._member_type(str(type_name), part, given)
            if type_name is None:
                return None
            below = given.get(part)
            given = below if isinstance(below, Mapping) else NOTHING
        return type_name

    def _member_type(self, type_name: str, name: str, given: Given) -> str | None:
        """The type of member ``name`` of an object of ``type_name``: one of its own
        or, for a union (QEMU's ``blockdev-add``, ``object-add``), of the variant
        its tag's value in ``given`` names, and so on down a variant that is a
        union too.  Below an alternate (``blockdev-add``'s ``file``), a dotted key
        gives the value an object: its one object type's."""
        info = self._types.get(type_name)
        if info is not None and info.get("meta-type") == "alternate":
            objects = [str(m["type"]) for m in info.get("members", [])
                       if self.meta_type(str(m["type"])) == "object"]
            type_name = objects[0] if len(objects) == 1 else type_name
        seen: set[str] = set()
        while type_name not in seen:  # a variant of its own: only a broken server's
            seen.add(type_name)
            found = self._fields(type_name).get(name)
            if found is not None:
                return found
            tag = (self._types.get(type_name) or {}).get("tag")
            case = given.get(tag) if isinstance(tag, str) else None
            variant = self._cases(type_name).get(case) if isinstance(case, str) else None
            if variant is None:
                return None
            type_name = variant
        return None

    def _fields(self, type_name: str) -> Mapping[str, str]:
        """An object type's members' types by name (kept: a pasted line may ask
        for them thousands of times)."""
        fields = self._field_cache.get(type_name)
        if fields is None:
            fields = self._field_cache[type_name] = {
                m.name: m.type for m in reversed(self.members(type_name))}
        return fields

    def _cases(self, type_name: str) -> Mapping[str, str]:
        """A union's variant types by its tag's value (empty for other types)."""
        cases = self._case_cache.get(type_name)
        if cases is None:
            variants = (self._types.get(type_name) or {}).get("variants", [])
            cases = self._case_cache[type_name] = {
                str(v["case"]): str(v["type"]) for v in reversed(variants)}
        return cases

    def hint(self, command: str, path: tuple[str, ...], given: Given = NOTHING) -> ValueHint:
        """What :mod:`migblockd.shell.syntax` needs to convert an unquoted value."""
        type_name = self.resolve(command, path, given)
        if type_name is None:
            return None
        json_type = self.json_type(type_name)
        if json_type == "string":
            return "string"
        if json_type == "array":
            element = self.element_type(type_name)
            if element is not None and self.json_type(element) == "string":
                return "list-of-strings"
            return "list"
        if self.meta_type(type_name) == "alternate":
            # A bare value is no object: when a string is the only scalar branch
            # (blockdev-add's file: a node's name), it is one.
            info = self._types[type_name]
            scalars = [self.json_type(str(m["type"])) for m in info.get("members", [])
                       if self.json_type(str(m["type"])) != "object"]
            if scalars and all(t == "string" for t in scalars):
                return "string"
        return None

    def describe(self, type_name: str, depth: int = 0) -> str:
        """A short human description of a type, e.g. ``list of (one of: a, b)``."""
        info = self._types.get(type_name)
        if info is None:
            return "?"
        meta = info.get("meta-type")
        if meta == "builtin":
            return JSON_TYPE_WORDS.get(str(info.get("json-type")), str(info.get("json-type")))
        if meta == "enum":
            return "one of: " + ", ".join(self.enum_values(type_name) or [])
        if meta == "array":
            element = self.describe(str(info.get("element-type")), depth + 1)
            return f"list of ({element})" if " " in element else f"list of {element}"
        if meta == "object":
            if depth > 2:
                return "object"
            inner = ", ".join(
                f"{m.name}{'?' if m.optional else ''}: {self.describe(m.type, depth + 1)}"
                for m in self.members(type_name)
            )
            return "object {" + inner + "}"
        if meta == "alternate":
            alts = [str(m.get("type")) for m in info.get("members", [])]
            return " or ".join(self.describe(t, depth + 1) for t in alts)
        return str(meta)

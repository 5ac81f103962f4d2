"""Back end: a JSON Schema (draft 2020-12) for each command's arguments, each
command's return value and each event's data.

Conventions (other code, and clients in other languages, rely on them):

* every document is self-contained: ``$schema``, ``title``, then the schema
  proper, then ``$defs`` holding exactly the named enums and structs it
  reaches (always present, possibly empty), referenced as
  ``{"$ref": "#/$defs/Name"}``;
* an arguments or event-data document has its object inline at top level
  (``type``, ``properties`` and ``required`` in schema order, ``required``
  omitted when empty, ``additionalProperties: false``), even when the schema
  names a struct as ``data``; a command or event without data gets an object
  with no properties;
* a returns document puts the return type's schema at top level
  (``{"$ref": ...}`` for a struct, ``{"type": "array", "items": ...}`` for a
  list);
* built-ins: ``str`` -> string, ``number``, ``bool`` -> boolean, ``null``,
  ``any`` -> ``{}``; enums are ``{"type": "string", "enum": [...]}``; structs
  are objects as above;
* integers are ``{"type": "integer", "format": F, "minimum": ..., "maximum": ...}``
  with the range QEMU's input visitor accepts for the QAPI type, and ``format``
  naming that type (``int8`` ... ``int64``, ``uint8`` ... ``uint64``; ``int`` is
  ``int64`` and ``size`` is ``uint64``, as in QEMU's C types).  An unsigned type
  accepts negative numbers as QEMU does (``qobject_input_type_uint64()`` takes
  them "for backward compatibility" and wraps them), so ``uint64`` reaches down to
  -2^63; the smaller unsigned types wrap them past their maximum and refuse them.
"""

from __future__ import annotations

from typing import Any

from .schema import ArrayType, BuiltinType, EnumType, ObjectType, QAPIType, Schema

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_BUILTIN: dict[str, dict[str, Any]] = {
    "string": {"type": "string"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "value": {},
}


#: QAPI's integer types: (format, minimum, maximum) of what QEMU's visitor accepts.
INTEGER_TYPES: dict[str, tuple[str, int, int]] = {
    **{f"int{bits}": (f"int{bits}", -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
       for bits in (8, 16, 32, 64)},
    **{f"uint{bits}": (f"uint{bits}", 0, (1 << bits) - 1) for bits in (8, 16, 32)},
    "uint64": ("uint64", -(1 << 63), (1 << 64) - 1),
}
INTEGER_TYPES["int"] = INTEGER_TYPES["int64"]
INTEGER_TYPES["size"] = INTEGER_TYPES["uint64"]


def integer_schema(name: str) -> dict[str, Any]:
    """The schema of the QAPI integer type ``name``."""
    fmt, low, high = INTEGER_TYPES[name]
    return {"type": "integer", "format": fmt, "minimum": low, "maximum": high}


class _DocumentBuilder:
    """Builds one document, collecting the named types it reaches."""

    def __init__(self) -> None:
        self.defs: dict[str, dict[str, Any]] = {}
        # Structs reached but not yet described.  Describing one on the spot
        # would recurse once per struct of a chain (each holding the next),
        # and a few hundred of them ended in a RecursionError.
        self.pending: list[ObjectType] = []

    def type_schema(self, typ: QAPIType) -> dict[str, Any]:
        if isinstance(typ, BuiltinType):
            if typ.name in INTEGER_TYPES:
                return integer_schema(typ.name)
            return dict(_BUILTIN[typ.json_type()])
        if isinstance(typ, ArrayType):
            return {"type": "array", "items": self.type_schema(typ.element)}
        if typ.name not in self.defs:
            if isinstance(typ, EnumType):
                self.defs[typ.name] = {"type": "string", "enum": list(typ.value_names)}
            else:
                assert isinstance(typ, ObjectType)
                # The slot is taken now, so that a recursive struct is queued once.
                self.defs[typ.name] = {}
                self.pending.append(typ)
        return {"$ref": f"#/$defs/{typ.name}"}

    def object_schema(self, typ: ObjectType | None) -> dict[str, Any]:
        members = typ.members if typ is not None else []
        obj: dict[str, Any] = {
            "type": "object",
            "properties": {m.name: self.type_schema(m.type) for m in members},
        }
        required = [m.name for m in members if not m.optional]
        if required:
            obj["required"] = required
        obj["additionalProperties"] = False
        return obj

    def document(self, title: str, body: dict[str, Any]) -> dict[str, Any]:
        while self.pending:
            typ = self.pending.pop()
            self.defs[typ.name] = self.object_schema(typ)
        return {
            "$schema": DRAFT,
            "title": title,
            **body,
            "$defs": {name: self.defs[name] for name in sorted(self.defs)},
        }


def arguments_schema(arg_type: ObjectType | None, title: str) -> dict[str, Any]:
    """The document for an argument (or event data) object."""
    builder = _DocumentBuilder()
    return builder.document(title, builder.object_schema(arg_type))


def returns_schema(ret_type: QAPIType, title: str) -> dict[str, Any]:
    """The document for a command's return value."""
    builder = _DocumentBuilder()
    return builder.document(title, builder.type_schema(ret_type))


def command_documents(schema: Schema) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """``{command: (arguments document, returns document or None)}`` in schema order."""
    return {
        name: (
            arguments_schema(cmd.arg_type, f"{name} arguments"),
            returns_schema(cmd.ret_type, f"{name} returns") if cmd.ret_type else None,
        )
        for name, cmd in schema.commands.items()
    }


def event_documents(schema: Schema) -> dict[str, dict[str, Any]]:
    """``{event: data document}`` in schema order."""
    return {
        name: arguments_schema(ev.arg_type, f"{name} data") for name, ev in schema.events.items()
    }

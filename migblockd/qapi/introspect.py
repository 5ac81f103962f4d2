"""Back end: the ``query-qmp-schema`` answer, in QEMU's SchemaInfo format.

Follows QEMU's ``scripts/qapi/introspect.py``: commands and events first, in
visiting order, then every type they reach, in order of first use (a
worklist, so types reached from types come after).  Names of enums and objects
are masked as ``"0"``, ``"1"``..., in order of first use; built-ins keep their
names; arrays are named ``"[" + element + "]"``.  Sized integer types appear as
plain ``int`` (and arrays of them as ``[int]``).  Commands without arguments or
return value, and events without data, use the empty object type.  Optional
object members carry ``"default": null``; enums list their values both as
``members`` and as the older ``values``; ``allow-oob`` appears only when true.
"""

from __future__ import annotations

from typing import Any

from .schema import (
    ArrayType,
    BuiltinType,
    Command,
    EnumType,
    Member,
    ObjectType,
    QAPIType,
    Schema,
)


class _Introspector:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.used: list[QAPIType] = []
        self.used_names: set[str] = set()
        self.names: dict[str, str] = {}
        self.out: list[dict[str, Any]] = []

    def _name(self, name: str) -> str:
        if name not in self.names:
            self.names[name] = str(len(self.names))
        return self.names[name]

    def _canonical(self, typ: QAPIType) -> QAPIType:
        """Map sized ints to ``int`` and arrays of them to ``[int]``, as QEMU does."""
        int_type = self.schema.builtins["int"]
        if isinstance(typ, BuiltinType) and typ.json_type() == "int":
            return int_type
        if isinstance(typ, ArrayType) and typ.element.json_type() == "int":
            return ArrayType(int_type)
        return typ

    def use_type(self, typ: QAPIType) -> str:
        typ = self._canonical(typ)
        # Type names are unique (arrays are "<element>List", implicit
        # objects "q_obj_<name>-arg"), so they identify types here.
        if typ.name not in self.used_names:
            self.used_names.add(typ.name)
            self.used.append(typ)
        if isinstance(typ, BuiltinType):
            return typ.name
        if isinstance(typ, ArrayType):
            return "[" + self.use_type(typ.element) + "]"
        return self._name(typ.name)

    def _member(self, member: Member) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": member.name, "type": self.use_type(member.type)}
        if member.optional:
            obj["default"] = None
        return obj

    def _emit(self, name: str, meta: str, obj: dict[str, Any]) -> None:
        if meta not in ("command", "event", "builtin", "array"):
            name = self._name(name)
        self.out.append({"name": name, "meta-type": meta, **obj})

    def _visit_type(self, typ: QAPIType) -> None:
        if isinstance(typ, BuiltinType):
            self._emit(typ.name, "builtin", {"json-type": typ.json_type()})
        elif isinstance(typ, EnumType):
            self._emit(
                typ.name,
                "enum",
                {
                    "members": [{"name": v} for v in typ.value_names],
                    "values": list(typ.value_names),
                },
            )
        elif isinstance(typ, ArrayType):
            element = self.use_type(typ.element)
            self._emit("[" + element + "]", "array", {"element-type": element})
        else:
            assert isinstance(typ, ObjectType)
            self._emit(typ.name, "object", {"members": [self._member(m) for m in typ.members]})

    def run(self) -> list[dict[str, Any]]:
        empty = self.schema.the_empty_object_type
        for entity in self.schema.entities:
            if isinstance(entity, Command):
                obj: dict[str, Any] = {
                    "arg-type": self.use_type(entity.arg_type or empty),
                    "ret-type": self.use_type(entity.ret_type or empty),
                }
                if entity.allow_oob:
                    obj["allow-oob"] = True
                self._emit(entity.name, "command", obj)
            else:
                arg = self.use_type(entity.arg_type or empty)
                self._emit(entity.name, "event", {"arg-type": arg})
        # The list grows while we walk it: types reached from types.
        i = 0
        while i < len(self.used):
            self._visit_type(self.used[i])
            i += 1
        return self.out


def introspect(schema: Schema) -> list[dict[str, Any]]:
    """The ``query-qmp-schema`` answer for ``schema`` (a list of SchemaInfo)."""
    return _Introspector(schema).run()

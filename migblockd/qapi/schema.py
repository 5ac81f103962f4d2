"""The schema model: the checked, linked objects the back ends read.

Mirrors the entity classes of QEMU's ``scripts/qapi/schema.py`` that
migblockd's subset of the language needs: built-in types, enums, structs,
arrays, commands and events, and the ``Schema`` that holds them.  Unions,
alternates, conditionals and features are not part of the subset.

The model is apart from the checks that build it (:mod:`.builder`): the back
ends (``jsonschema``, ``introspect``, ``doc``) read a ``Schema`` and need
none of the checking; a ``Schema`` they are given has passed every check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .doccomment import Doc
from .error import SourceInfo

# QEMU's built-in types and the JSON type each appears as in introspection.
BUILTIN_JSON_TYPES: dict[str, str] = {
    "str": "string",
    "number": "number",
    "int": "int",
    "int8": "int",
    "int16": "int",
    "int32": "int",
    "int64": "int",
    "uint8": "int",
    "uint16": "int",
    "uint32": "int",
    "uint64": "int",
    "size": "int",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}

#: QEMU's other predefined types (_def_predefineds() in its scripts/qapi/schema.py),
#: as its describe() names them: the enum of JSON types that its alternates use and
#: the empty object of commands without arguments.  Neither is in migblockd's
#: subset, yet their names are taken: QEMU refuses to define them again and would
#: find them where a schema names them.
PREDEFINED_OUTSIDE_SUBSET: dict[str, str] = {
    "QType": "enum type 'QType'",
    "q_empty": "struct type 'q_empty'",
}


class QAPIType:
    """Base of every type; ``name`` is the QAPI name (``"strList"`` for arrays)."""

    name: str

    def json_type(self) -> str:
        """The JSON type of values of this type, in introspection's spelling."""
        raise NotImplementedError

    def spelling(self) -> str:
        """How the type is written in the schema, for docs: ``str``, ``[MigMode]``."""
        return self.name

    #: The metatype QEMU's describe() names (QAPISchemaType in its schema.py).
    meta = "struct"

    def describe(self) -> str:
        """QEMU's ``describe()`` of a type, for messages: ``built-in type 'str'``,
        ``enum type 'En'``, ``struct type 'Foo'``, ``array type ['str']``."""
        return f"{self.meta} type '{self.name}'"


@dataclass(eq=False)
class BuiltinType(QAPIType):
    """One of QEMU's built-in types (``str``, ``int``, sized ints, ``any``...)."""

    name: str
    meta = "built-in"

    def json_type(self) -> str:
        return BUILTIN_JSON_TYPES[self.name]


@dataclass(eq=False)
class EnumValue:
    """One enum member, with its doc text."""

    name: str
    doc: str
    info: SourceInfo


@dataclass(eq=False)
class EnumType(QAPIType):
    """An enumeration: a JSON string restricted to ``values``, in schema order."""

    name: str
    values: list[EnumValue]
    doc: Doc
    info: SourceInfo
    meta = "enum"

    def json_type(self) -> str:
        return "string"

    @property
    def value_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.values)


@dataclass(eq=False)
class ArrayType(QAPIType):
    """``[ 'T' ]``: a JSON array of T; named ``TList`` as in QEMU."""

    element: QAPIType
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.element.name + "List"

    def json_type(self) -> str:
        return "array"

    def spelling(self) -> str:
        return f"[{self.element.spelling()}]"

    def describe(self) -> str:
        return f"array type ['{self.element.name}']"


@dataclass(eq=False)
class Member:
    """A member of a struct, or an argument of a command or event."""

    name: str
    type: QAPIType
    optional: bool
    doc: str
    info: SourceInfo


@dataclass(eq=False)
class ObjectType(QAPIType):
    """A struct, or the implicit object type of a command's or event's inline
    ``data`` (``implicit`` is then true and the name is QEMU's
    ``q_obj_NAME-arg``), or the empty object type ``q_empty``."""

    name: str
    members: list[Member]
    doc: Doc | None
    info: SourceInfo | None
    implicit: bool = False

    def json_type(self) -> str:
        return "object"


@dataclass(eq=False)
class Command:
    """A command: argument object (None when it takes none), return type
    (None when it returns ``{}``) and whether it may run out-of-band."""

    name: str
    arg_type: ObjectType | None
    ret_type: QAPIType | None
    allow_oob: bool
    doc: Doc
    info: SourceInfo


@dataclass(eq=False)
class Event:
    """An event and the object type of its data (None when it has none)."""

    name: str
    arg_type: ObjectType | None
    doc: Doc
    info: SourceInfo


@dataclass
class Schema:
    """A checked schema.

    ``entities`` holds the commands and events in QEMU's visiting order
    (module by module, definitions in source order), which ``commands`` and
    ``events`` follow too; ``types`` holds the named enums and
    structs in source order.
    """

    commands: dict[str, Command] = field(default_factory=dict)
    entities: list[Command | Event] = field(default_factory=list)
    events: dict[str, Event] = field(default_factory=dict)
    types: dict[str, EnumType | ObjectType] = field(default_factory=dict)
    builtins: dict[str, BuiltinType] = field(default_factory=dict)
    the_empty_object_type: ObjectType = field(
        default_factory=lambda: ObjectType("q_empty", [], None, None, implicit=True)
    )

    @property
    def enums(self) -> dict[str, EnumType]:
        return {n: t for n, t in self.types.items() if isinstance(t, EnumType)}

    def lookup_type(self, name: str) -> QAPIType | None:
        """A named type (built-in, enum or struct), or None."""
        return self.builtins.get(name) or self.types.get(name)

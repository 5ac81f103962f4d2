"""Checking parsed definitions and linking them into a :class:`~.schema.Schema`.

Mirrors the part of QEMU's ``scripts/qapi/schema.py`` that migblockd's subset
of the language needs, after the first pass, which checks each definition
alone (:mod:`.expr`, QEMU's ``expr.py``).  Unions, alternates, conditionals and
features are not part of the subset.

Checks done here, each reported as ``FILE:LINE:COL: message`` at the offending
key or value: duplicate definitions (and a built-in type's name taken), enum
values and members that collide, references to unknown types (a command or
event is none), arrays of arrays, types a command may not take or return, doc
comments that leave a member undocumented or document one that does not exist.
The objects built are :mod:`.schema`'s, apart so that the back ends need no checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .doccomment import Doc
from .error import QAPIError, SourceInfo
from .expr import check_definition, enum_value
from .parser import Vet, parse_schema
from .schema import (
    BUILTIN_JSON_TYPES,
    PREDEFINED_OUTSIDE_SUBSET,
    ArrayType,
    BuiltinType,
    Command,
    EnumType,
    EnumValue,
    Event,
    Member,
    ObjectType,
    QAPIType,
    Schema,
)
from .tree import Definition, ParseResult, PosDict, PosList, Value


def load_schema(fname: str | Path, vet: Vet | None = None) -> Schema:
    """Parse and check a root schema file; raises ``QAPIError`` on mistakes.
    ``vet`` judges each file before it is read (``parse_schema``)."""
    return build_schema(parse_schema(fname, vet))


def build_schema(parsed: ParseResult) -> Schema:
    """Check parsed definitions and link them into a ``Schema``."""
    return _Builder(parsed).build()


@dataclass(eq=False)
class _Unchecked(QAPIType):
    """An array's element named before the array is checked; never in a Schema."""

    name: str


class _Builder:
    def __init__(self, parsed: ParseResult) -> None:
        self.parsed = parsed
        self.schema = Schema()
        self.schema.builtins = {n: BuiltinType(n) for n in BUILTIN_JSON_TYPES}
        self.arrays: dict[str, ArrayType] = {}
        # The T of every ``['T']`` written anywhere in the schema (pass 1), for
        # which the name ``TList`` means that array (see _lookup_array()).
        self.written_arrays: set[str] = set()
        # The T whose array QEMU has made, and so checked, by now in pass 2:
        # a built-in's before the schema is read, another where ['T'] is
        # first written (see _check_new_arrays()).
        self.made_arrays: set[str] = set(BUILTIN_JSON_TYPES)
        self.defined: dict[str, SourceInfo] = {}  # where each name is defined
        # QEMU's names of the implicit types of inline arguments, q_obj_NAME-arg.
        self.implicit_names: set[str] = set()

    def build(self) -> Schema:
        # Pass 1 checks each definition alone (.expr, QEMU's check_exprs()),
        # then the names are registered, so that pass 2 can resolve references
        # to definitions made later.  As in QEMU, every definition is checked
        # before a name defined twice is looked for (_def_definition() in
        # scripts/qapi/schema.py, as QAPISchema defines them).
        checked: list[tuple[str, str, Definition]] = []
        exceptions = self.parsed.pragmas.command_name_exceptions
        for defn in self.parsed.definitions:
            meta, name = check_definition(defn, exceptions)
            checked.append((meta, name, defn))
            self._note_written_arrays(defn.expr)
        for meta, name, defn in checked:
            self._define(meta, name, defn.expr)
        for meta, name, defn in checked:
            assert defn.doc is not None
            if meta == "enum":
                self.schema.types[name] = self._make_enum(name, defn)
            elif meta == "struct":
                # Members are filled in pass 2; the object must exist first
                # so that other definitions can refer to it.
                self.schema.types[name] = ObjectType(name, [], defn.doc, defn.info)
        # Pass 2 goes in source order, as QEMU's QAPISchema.check() does: each
        # definition's types and collisions (its check()), then its members'
        # docs (connect_doc()); the doc comments' own checks come once every
        # definition is made (QAPIDoc.check()).
        made: dict[str, Command | Event] = {}
        documentable: list[tuple[Doc, list[str]]] = []
        for meta, name, defn in checked:
            assert defn.doc is not None
            if meta == "enum":
                enum = self.schema.types[name]
                assert isinstance(enum, EnumType)
                self._check_enum(enum, defn.doc)
                documentable.append((defn.doc, list(enum.value_names)))
                continue
            if meta == "struct":
                struct = self.schema.types[name]
                assert isinstance(struct, ObjectType)
                data = defn.expr["data"]
                assert isinstance(data, PosDict)  # pass 1
                self._check_new_arrays(data.values(), meta, name)
                struct.members = self._make_members(data, "member", name)
                # The object whose members the doc comment documents.
                documented: ObjectType | None = struct
            else:
                made[name] = (self._make_command(name, defn) if meta == "command"
                              else self._make_event(name, defn))
                documented = made[name].arg_type
                if documented is not None and not documented.implicit:
                    # The struct documents its own members; the command's doc
                    # may not repeat them (QEMU's rule too).
                    documented = None
            members = documented.members if documented is not None else []
            self._connect_docs(members, defn.doc, "member" if meta == "struct" else "parameter",
                               name)
            documentable.append((defn.doc, [m.name for m in members]))
        for doc, names in documentable:
            doc.check_names(names)
            doc.check_features()
        order = {m: i for i, m in enumerate(self.parsed.modules)}
        # QEMU visits entities module by module (stable within a module).
        for _, name, _ in sorted(checked, key=lambda c: order[c[2].module]):
            entity = made.get(name)
            if isinstance(entity, Command):
                self.schema.commands[name] = entity
            elif isinstance(entity, Event):
                self.schema.events[name] = entity
            if entity is not None:
                self.schema.entities.append(entity)
        return self.schema

    def _define(self, meta: str, name: str, expr: PosDict) -> None:
        """Register a definition's name, once (QEMU's _def_definition()); a second
        is refused with QEMU's line pointing back at the first (its _def_entity())."""
        if name in BUILTIN_JSON_TYPES:
            raise QAPIError(expr.value_info[meta], f"built-in type '{name}' is already defined")
        if name in PREDEFINED_OUTSIDE_SUBSET:
            # Only 'QType' can get here: 'q_empty' is an invalid name (pass 1).
            raise QAPIError(expr.value_info[meta],
                            f"{PREDEFINED_OUTSIDE_SUBSET[name]} is already defined")
        if name in self.defined:
            raise QAPIError(expr.value_info[meta], f"'{name}' is already defined",
                            f"{self.defined[name]}: previous definition")
        self.defined[name] = expr.value_info[meta]
        data = expr.get("data")
        if meta in ("command", "event") and isinstance(data, PosDict) and data:
            # QEMU defines the type of inline arguments as an entity like any
            # other (_make_implicit_object_type() in scripts/qapi/schema.py),
            # and so finds its name where a schema writes it as a type.
            self.implicit_names.add(f"q_obj_{name}-arg")

    # --- pass 2 ----------------------------------------------------------

    @staticmethod
    def _make_enum(name: str, defn: Definition) -> EnumType:
        assert defn.doc is not None
        data = defn.expr["data"]
        assert isinstance(data, PosList)  # pass 1
        values: list[EnumValue] = []
        for item, item_info in zip(data, data.item_info, strict=True):
            value, info = enum_value(item, item_info, name)
            values.append(EnumValue(value, "", info))  # its doc: _check_enum()
        return EnumType(name, values, defn.doc, defn.info)

    @staticmethod
    def _check_enum(enum: EnumType, doc: Doc) -> None:
        """Values that collide (QEMU's QAPISchemaEnumType.check()), then each
        value's doc (its connect_doc())."""
        seen: set[str] = set()
        for value in enum.values:
            if value.name in seen:
                raise QAPIError(value.info, f"value '{value.name}' of enum '{enum.name}' "
                                            f"collides with value '{value.name}'")
            seen.add(value.name)
        for value in enum.values:
            arg = doc.args.get(value.name)
            if arg is None:
                raise QAPIError(value.info,
                                f"value '{value.name}' of enum '{enum.name}' lacks documentation")
            value.doc = arg.text

    def _make_members(self, data: PosDict, role: str, owner: str) -> list[Member]:
        """Each member's type, then whether it collides with one before it,
        member by member, as QEMU's QAPISchemaObjectType.check() goes."""
        members: list[Member] = []
        seen: set[str] = set()
        for key, value in data.items():
            info = data.key_info[key]
            optional = key.startswith("*")
            name = key[1:] if optional else key
            what = f"{role} '{name}' of '{owner}'"
            typ = self._resolve(value, data.value_info[key], what)
            if name in seen:
                raise QAPIError(info, f"{what} collides with {role} '{name}'")
            seen.add(name)
            members.append(Member(name, typ, optional, "", info))
        return members

    @staticmethod
    def _connect_docs(members: list[Member], doc: Doc, role: str, owner: str) -> None:
        """Each member's doc, once the definition is checked (QEMU's connect_doc())."""
        for member in members:
            arg = doc.args.get(member.name)
            if arg is None:
                raise QAPIError(member.info, f"{role} '{member.name}' of '{owner}' "
                                             "lacks documentation")
            member.doc = arg.text

    def _note_written_arrays(self, expr: PosDict) -> None:
        """Remember the element of each ``['T']`` of a definition's members and
        return type, where QEMU's _make_array_type() defines the array ``TList``."""
        data, returns = expr.get("data"), expr.get("returns")
        written = list(data.values()) if isinstance(data, PosDict) else []
        for value in [*written, returns]:
            if isinstance(value, PosList) and len(value) == 1 and isinstance(value[0], str):
                self.written_arrays.add(value[0])

    def _check_new_arrays(self, values: Iterable[Value], meta: str, name: str) -> None:
        """The element type of each ``['T']`` among ``values`` that no definition
        before has written, checked before the definition that writes it.

        QEMU makes the array type ``TList`` where ``['T']`` is first written, as
        an entity of its own put before the definition (_make_array_type() in
        ``scripts/qapi/schema.py``), and checks it there: so an unknown T is
        reported before any other mistake of that definition, in the words of
        QAPISchemaArrayType.check(), which names the definition, not the member
        (``struct uses unknown type 'T'``, in struct 'Foo').

        There too QEMU asserts that T is no array: ``['strList']`` (``['FooList']``,
        ``['Foo']`` written) ends its generator in an AssertionError.  Here it is
        a mistake, in QEMU's words for a type a place cannot take, where
        ``['TList']`` is written, which alone makes the name ``TListList``."""
        for value in values:
            if isinstance(value, PosList) and value[0] not in self.made_arrays:
                element = value[0]
                assert isinstance(element, str)  # pass 1
                self.made_arrays.add(element)
                what = f"{meta} '{name}'"
                typ = self._resolve(element, value.item_info[0], what)
                if isinstance(typ, ArrayType):
                    raise QAPIError(value.item_info[0], f"{what}: array type ['{element}'] "
                                                        f"cannot take {typ.describe()}")

    def _lookup_array(self, name: str, info: SourceInfo, what: str) -> ArrayType | None:
        """The array a type name ``TList`` means, as QEMU's lookup_type() finds it.

        QEMU names the array of T ``TList`` and defines it as an entity like any
        other (``scripts/qapi/schema.py``): for every built-in T before the
        schema is read (_def_builtin_type(): ``strList``, ``intList``...), for
        any other T where ``['T']`` is written, anywhere in the schema, since
        types are resolved only once every definition is in.  Where neither
        holds, ``TList`` is an unknown type there too.  (``['strList']`` makes
        ``strListList`` a name, and so on: the suffixes are taken off in a loop,
        not by recursion, which a long chain of them would exhaust.  Such an
        array of arrays is refused where ``['strList']`` is written, as QEMU
        fails there: see _check_new_arrays().)"""
        base, depth = name, 0
        while base.endswith("List"):
            element = base.removesuffix("List")
            if element not in self.schema.builtins and element not in self.written_arrays:
                break
            base, depth = element, depth + 1
        if depth == 0:
            return None
        try:
            typ = self._resolve(base, info, what)
        except QAPIError:
            # ['T'] is first written further on: QEMU finds TList here, and
            # reports T where it checks that array (see _check_new_arrays()).
            typ = _Unchecked(base)
        for _ in range(depth):
            typ = self._array_of(typ)
        assert isinstance(typ, ArrayType)
        return typ

    def _array_of(self, element: QAPIType) -> ArrayType:
        """The one array type of ``element``, however it was written."""
        array = self.arrays.get(element.name)
        if array is None:
            array = self.arrays[element.name] = ArrayType(element)
        return array

    def _resolve(self, value: Value, info: SourceInfo, what: str) -> QAPIType:
        """The type a member's (or return's) type expression denotes."""
        # Its shape is pass 1's (.expr): a name, or an array of one.
        if isinstance(value, PosList):
            return self._array_of(self._resolve(value[0], value.item_info[0], what))
        assert isinstance(value, str)
        typ = self.schema.lookup_type(value) or self._lookup_array(value, info, what)
        if typ is None:
            outside = PREDEFINED_OUTSIDE_SUBSET.get(value) or (
                f"struct type '{value}'" if value in self.implicit_names else None)
            if outside is not None:
                # QEMU would find it; "unknown type" would say QEMU does not know it.
                raise QAPIError(info, f"{what} uses {outside}, "
                                      "which migblockd's QAPI subset does not support")
            # A command's or event's name too: QEMU's lookup_type() finds types only.
            raise QAPIError(info, f"{what} uses unknown type '{value}'")
        return typ

    def _object_data(self, name: str, meta: str, defn: Definition,
                     then: tuple[Value, ...] = ()) -> ObjectType | None:
        """The argument object of a command or event: a named struct, or an
        implicit type for inline members (None when there are none).

        In QEMU's order: inline members come with their arrays before anything
        else of the definition, a named struct is resolved by the definition's
        own check, after the arrays among ``then`` (a command's return)."""
        expr = defn.expr
        data = expr.get("data")
        implicit: ObjectType | None = None
        if isinstance(data, PosDict):
            self._check_new_arrays(data.values(), meta, name)
            members = self._make_members(data, "parameter", name)
            if members:
                assert defn.doc is not None
                implicit = ObjectType(f"q_obj_{name}-arg", members, defn.doc, defn.info,
                                      implicit=True)
        self._check_new_arrays(then, meta, name)
        if not isinstance(data, str) or not data:
            # QEMU's check() of a command or event tests the name's truth:
            # 'data': '' is no arguments, as no 'data' is.
            return implicit
        info = expr.value_info["data"]
        what = f"'data' of {meta} '{name}'"
        typ = self._resolve(data, info, what)
        if not isinstance(typ, ObjectType):
            # QEMU's QAPISchemaCommand.check() and QAPISchemaEvent.check()
            # ("command's 'data' cannot take ..."), worded as 'returns' is.
            raise QAPIError(info, f"{what} cannot take {typ.describe()}")
        return typ

    def _make_command(self, name: str, defn: Definition) -> Command:
        assert defn.doc is not None
        expr = defn.expr
        returns = expr.get("returns")
        arg_type = self._object_data(name, "command", defn,
                                     () if returns is None else (returns,))
        ret_type: QAPIType | None = None
        if returns is not None and returns != "":  # '' is no return value, as in QEMU
            info = expr.value_info["returns"]
            what = f"'returns' of command '{name}'"
            ret_type = self._resolve(returns, info, what)
            elem = ret_type.element if isinstance(ret_type, ArrayType) else ret_type
            if not isinstance(elem, ObjectType):
                raise QAPIError(info, f"{what} cannot take {ret_type.describe()}")
        # 'allow-oob' is true when given (pass 1).
        return Command(name, arg_type, ret_type, "allow-oob" in expr, defn.doc, defn.info)

    def _make_event(self, name: str, defn: Definition) -> Event:
        assert defn.doc is not None
        return Event(name, self._object_data(name, "event", defn), defn.doc, defn.info)

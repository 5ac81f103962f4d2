"""Back end: the documentation model of commands, events and types, built from
the schema's doc comments.

This one model serves both readers of the docs: the generator (``Contract``'s doc
text) and ``migblock-shell``'s ``help``, which builds the same model from the live
daemon's introspection and takes the prose from here (see
:mod:`migblockd.shell.helptext`).  :mod:`.doctext` renders it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from .doccomment import Doc
from .doctext import render
from .schema import ArrayType, BuiltinType, EnumType, Member, ObjectType, QAPIType, Schema

#: How the docs name a built-in type: by its values' JSON type, as QEMU's QMP
#: reference does (``doc_type()`` in its scripts/qapi/schema.py), and as help
#: describes the types only introspection knows (``str`` is ``string``).
JSON_TYPE_WORDS = {
    "string": "string",
    "int": "integer",
    "number": "number",
    "boolean": "boolean",
    "null": "null",
    "object": "object",
    "array": "array",
    "value": "any JSON value",
}


def doc_spelling(typ: QAPIType) -> str:
    """``typ`` as the docs write it: ``string``, ``[MigMode]``, ``BlockerInfo``."""
    if isinstance(typ, BuiltinType):
        return JSON_TYPE_WORDS[typ.json_type()]
    if isinstance(typ, ArrayType):
        return f"[{doc_spelling(typ.element)}]"
    return typ.spelling()


@dataclass(frozen=True)
class ValueDoc:
    """An enum value and what it means."""

    name: str
    text: str


@dataclass(frozen=True)
class MemberDoc:
    """One argument of a command, member of event data or struct member, or
    one value of an enum (with ``type`` "").

    ``type`` is the schema's spelling, built-in types in QEMU's words
    (``string``, ``MigMode``, ``[MigMode]``: :func:`doc_spelling`), or,
    where only introspection knows the member, a description of its structure
    (``list of (one of: normal, cpr-reboot)``); ``values`` lists the allowed
    strings, with their docs, when the member is an enum or an array of an enum
    (empty otherwise); ``shape`` spells out the structure of an object or array
    type that ``type`` only names (empty when not known or not needed).
    """

    name: str
    type: str
    optional: bool
    text: str
    values: tuple[ValueDoc, ...] = ()
    shape: str = ""


@dataclass(frozen=True)
class DefinitionDoc:
    """The documentation of one command, event, enum or struct.

    ``description`` is the whole free text; ``members`` the arguments
    (command), data members (event), struct members or enum values;
    ``returns`` the return type's spelling (None: returns nothing worth
    naming) and ``returns_text`` the ``Returns:`` section; ``sections`` the
    other tagged sections (``Errors``, ``Since``...) in source order, untagged
    paragraphs with tag "".  ``summary`` and ``text`` are derived from those:
    the first sentence on one line, and the help screen.
    """

    name: str
    kind: str  # "command", "event", "enum" or "struct"
    description: str = ""
    members: tuple[MemberDoc, ...] = ()
    returns: str | None = None
    returns_text: str = ""
    allow_oob: bool = False
    sections: tuple[tuple[str, str], ...] = ()

    @property
    def summary(self) -> str:
        """The first sentence of the description, on one line (what a list of
        commands shows beside each name)."""
        paragraph = " ".join(self.description.split("\n\n", 1)[0].split())
        cut = paragraph.find(". ")
        return paragraph if cut < 0 else paragraph[: cut + 1]

    @cached_property
    def text(self) -> str:
        """The help screen: title, description, members, returns, sections."""
        return render(self)

    def member(self, name: str) -> MemberDoc | None:
        """The member called ``name``, if any."""
        for m in self.members:
            if m.name == name:
                return m
        return None


@dataclass(frozen=True)
class SchemaDocs:
    """Documentation of the whole schema (``Contract.load().docs``)::

        docs = Contract.load().docs
        for name, d in docs.commands.items():     # schema order
            print(name, "-", d.summary)           # command list with summaries
        print(docs.commands["add-blocker"].text)  # full help screen
        [m.name for m in docs.commands["add-blocker"].members]   # argument names
        docs.values("add-blocker", "modes")       # ('normal', 'cpr-reboot', ...)
        docs.help("MigMode")                      # help for any command/event/type

    ``values()`` returns the enum strings a member accepts (also for arrays of
    enums); it is empty for other members.  Every mapping is read-only.
    """

    commands: Mapping[str, DefinitionDoc]
    events: Mapping[str, DefinitionDoc]
    types: Mapping[str, DefinitionDoc]

    @classmethod
    def empty(cls) -> SchemaDocs:
        """No documentation at all (what the shell has when the local schema
        cannot be loaded)."""
        nothing: Mapping[str, DefinitionDoc] = MappingProxyType({})
        return cls(nothing, nothing, nothing)

    def values(self, command: str, member: str) -> tuple[str, ...]:
        """The enum values argument ``member`` of ``command`` accepts."""
        doc = self.commands.get(command)
        m = doc.member(member) if doc else None
        return tuple(v.name for v in m.values) if m else ()

    def definition(self, name: str) -> DefinitionDoc | None:
        """The command, event or type called ``name``, if documented."""
        for table in (self.commands, self.events, self.types):
            if name in table:
                return table[name]
        return None

    def help(self, name: str) -> str | None:
        """The rendered help text of a command, event or type, or None."""
        d = self.definition(name)
        return None if d is None else d.text


def _enum_values(typ: QAPIType) -> tuple[ValueDoc, ...]:
    elem = typ.element if isinstance(typ, ArrayType) else typ
    if isinstance(elem, EnumType):
        return tuple(ValueDoc(v.name, v.doc) for v in elem.values)
    return ()


def _member_doc(m: Member) -> MemberDoc:
    return MemberDoc(m.name, doc_spelling(m.type), m.optional, m.doc, _enum_values(m.type))


def _definition(
    name: str,
    kind: str,
    doc: Doc,
    members: tuple[MemberDoc, ...],
    *,
    returns: QAPIType | None = None,
    allow_oob: bool = False,
) -> DefinitionDoc:
    ret_sec = doc.section("Returns")
    return DefinitionDoc(
        name=name,
        kind=kind,
        description=doc.body,
        members=members,
        returns=doc_spelling(returns) if returns is not None else None,
        returns_text=ret_sec.text if ret_sec else "",
        allow_oob=allow_oob,
        sections=tuple((s.tag, s.text) for s in doc.sections if s.tag != "Returns"),
    )


def _object_members(typ: ObjectType | None) -> tuple[MemberDoc, ...]:
    return tuple(_member_doc(m) for m in typ.members) if typ else ()


def build_docs(schema: Schema) -> SchemaDocs:
    """Collect the docs of every command, event and named type."""
    commands = {
        name: _definition(
            name,
            "command",
            c.doc,
            _object_members(c.arg_type),
            returns=c.ret_type,
            allow_oob=c.allow_oob,
        )
        for name, c in schema.commands.items()
    }
    events = {
        name: _definition(name, "event", e.doc, _object_members(e.arg_type))
        for name, e in schema.events.items()
    }
    types: dict[str, DefinitionDoc] = {}
    for name, t in schema.types.items():
        if isinstance(t, EnumType):
            values = tuple(MemberDoc(v.name, "", False, v.doc) for v in t.values)
            types[name] = _definition(name, "enum", t.doc, values)
        else:
            assert t.doc is not None
            types[name] = _definition(name, "struct", t.doc, _object_members(t))
    return SchemaDocs(MappingProxyType(commands), MappingProxyType(events), MappingProxyType(types))

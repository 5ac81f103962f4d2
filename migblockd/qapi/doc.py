"""Back end: the documentation of commands, events, their members and enum
values, as plain data for the shell's help and completion."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from .parser import Doc
from .schema import ArrayType, EnumType, Member, ObjectType, QAPIType, Schema


@dataclass(frozen=True)
class ValueDoc:
    """An enum value and what it means."""

    name: str
    text: str


@dataclass(frozen=True)
class MemberDoc:
    """One argument of a command, member of event data or struct member.

    ``type`` is the schema spelling (``str``, ``MigMode``, ``[MigMode]``);
    ``values`` lists the allowed strings, with their docs, when the member is
    an enum or an array of an enum (empty otherwise): what a shell completes.
    """

    name: str
    type: str
    optional: bool
    text: str
    values: tuple[ValueDoc, ...] = ()


@dataclass(frozen=True)
class DefinitionDoc:
    """The documentation of one command, event, enum or struct.

    ``description`` is the whole free text; ``members`` the arguments
    (command), data members (event), struct members or enum values (with
    ``type`` ""); ``returns`` the return type's spelling and ``returns_text``
    the ``Returns:`` section; ``sections`` every tagged section (``Errors``,
    ``Since``...) in source order.  ``summary`` and ``text`` are derived from
    those: the first paragraph on one line, and everything rendered for a
    help screen.
    """

    name: str
    kind: str  # "command", "event", "enum" or "struct"
    description: str
    members: tuple[MemberDoc, ...]
    returns: str | None
    returns_text: str
    allow_oob: bool
    sections: tuple[tuple[str, str], ...]

    @property
    def summary(self) -> str:
        """The first paragraph of the description, on one line."""
        first = self.description.split("\n\n", 1)[0]
        return " ".join(first.split())

    @cached_property
    def text(self) -> str:
        """The help screen: title, description, members, returns, sections."""
        return _render(self)

    def member(self, name: str) -> MemberDoc | None:
        """The member called ``name``, if any."""
        for m in self.members:
            if m.name == name:
                return m
        return None


@dataclass(frozen=True)
class SchemaDocs:
    """Documentation of the whole schema, for ``migblock-shell``.

    Usage from the shell::

        docs = Contract.load().docs
        for name, d in docs.commands.items():     # schema order
            print(name, "-", d.summary)           # command list with summaries
        print(docs.commands["add-blocker"].text)  # full help screen
        [m.name for m in docs.commands["add-blocker"].members]   # argument names
        docs.values("add-blocker", "modes")       # ('normal', 'cpr-reboot', ...)
        docs.help("MigMode")                      # help for any command/event/type

    ``values()`` returns the enum strings a member accepts (also for arrays of
    enums), which is what argument completion needs; it is empty for other
    members.  Every mapping is read-only.
    """

    commands: Mapping[str, DefinitionDoc]
    events: Mapping[str, DefinitionDoc]
    types: Mapping[str, DefinitionDoc]

    def values(self, command: str, member: str) -> tuple[str, ...]:
        """The enum values argument ``member`` of ``command`` accepts."""
        doc = self.commands.get(command)
        m = doc.member(member) if doc else None
        return tuple(v.name for v in m.values) if m else ()

    def help(self, name: str) -> str | None:
        """The rendered help text of a command, event or type, or None."""
        for table in (self.commands, self.events, self.types):
            if name in table:
                return table[name].text
        return None


def _enum_values(typ: QAPIType) -> tuple[ValueDoc, ...]:
    elem = typ.element if isinstance(typ, ArrayType) else typ
    if isinstance(elem, EnumType):
        return tuple(ValueDoc(v.name, v.doc) for v in elem.values)
    return ()


def _member_doc(m: Member) -> MemberDoc:
    return MemberDoc(m.name, m.type.spelling(), m.optional, m.doc, _enum_values(m.type))


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else "" for line in text.splitlines())


# The heading of the member list, per kind of definition.
_HEADINGS: dict[str, str] = {"command": "Arguments", "event": "Data", "enum": "Values"}


def _render(d: DefinitionDoc) -> str:
    title = f"{d.name} ({d.kind}{', allow-oob' if d.allow_oob else ''})"
    parts = [title, _indent(d.description, "    ") if d.description else ""]
    if d.members:
        lines = [f"{_HEADINGS.get(d.kind, 'Members')}:"]
        for m in d.members:
            sig = m.name
            if m.type:
                sig += f": {m.type}" + (" (optional)" if m.optional else "")
            lines.append(f"    {sig}")
            lines.append(_indent(m.text, "        "))
            if m.values:
                lines.append("        Values: " + ", ".join(v.name for v in m.values))
        parts.append("\n".join(lines))
    if d.returns is not None:
        parts.append(f"Returns: {d.returns}\n" + _indent(d.returns_text, "    "))
    for tag, text in d.sections:
        if tag == "Returns":  # shown with the return type above
            continue
        if tag == "":
            parts.append(text)
        elif tag == "Since":  # a version number reads best on the tag's line
            parts.append(f"{tag}: {text}")
        else:
            parts.append(f"{tag}:\n" + _indent(text, "    "))
    return "\n\n".join(p for p in parts if p) + "\n"


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
        returns=returns.spelling() if returns is not None else None,
        returns_text=ret_sec.text if ret_sec else "",
        allow_oob=allow_oob,
        sections=tuple((s.tag, s.text) for s in doc.sections),
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

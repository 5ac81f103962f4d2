"""The text of ``help`` and ``help TOPIC``.

What exists (commands, events, their arguments and data, allow-oob) comes from the
live daemon's introspection; the prose and the unmasked type names come from the
doc comments of the schema installed with the package, since the shell runs on the
daemon's machine.  Both meet in one :class:`~migblockd.qapi.doc.DefinitionDoc`,
rendered by the same code as the generator's doc text.  When the local docs do
not know a command (a newer daemon), help still shows its arguments and types as
introspection describes them.
"""

from __future__ import annotations

import shutil
import textwrap

from migblockd.contract import Contract
from migblockd.qapi.doc import DefinitionDoc, MemberDoc, SchemaDocs, ValueDoc
from migblockd.shell.check import did_you_mean, shown
from migblockd.shell.schema import Member, Schema

SHELL_HELP = """\
Syntax:  COMMAND key=value ...   (dotted keys nest: a.b=1 a.c=2)
         {"execute": ...}         (a raw JSON request)
         help [COMMAND | EVENT | TYPE]
Values are JSON when they parse as JSON (42, true, null, [..], {..}), booleans and
integers as qmp-shell reads them too (True, FALSE, +5, 1_000), else strings; a
string argument's value is a string (reason=42 is "42") unless it begins with [ or
{, which must be JSON or a Python literal ({'a': True}, as qmp-shell takes it):
quote to force a string (reason='[WIP] disk0').
List arguments also take a,b,c.  Tab completes commands, argument names and enum
values.  Ctrl-C drops the line, Ctrl-D exits."""


#: What ``help help`` says: help is the shell's, whatever the daemon has (a line
#: that starts with help is never sent).
HELP_HELP = """\
help [COMMAND | EVENT | TYPE] (the shell's own command, not sent to the daemon)
    Without a name, lists the daemon's commands with a summary each, and the
    shell's syntax; with one, documents that command, event or type."""


#: What ``help`` says of a command the daemon forwards to QEMU (qemu-passthrough).
FORWARDED = "Forwarded to QEMU as it is; see QEMU's QMP reference for its arguments."


def load_docs() -> SchemaDocs:
    """The packaged schema's docs, or none if they cannot be loaded."""
    try:
        return Contract.load().docs
    except Exception:  # any failure just means: no prose in help
        return SchemaDocs.empty()


def overview(schema: Schema, docs: SchemaDocs, columns: int | None = None) -> str:
    """The command list; summaries longer than the terminal (``columns``, by default
    its width) are wrapped under themselves rather than at the left margin."""
    if columns is None:
        columns = shutil.get_terminal_size((100, 24)).columns
    names = schema.command_names()
    width = max((len(n) for n in names), default=0) + 2
    indent = " " * (2 + width)
    lines = ["Commands:"]
    for name in names:
        doc = docs.commands.get(name)
        summary = doc.summary if doc is not None else FORWARDED if name in schema.forwarded \
            else ""
        wrapped = textwrap.wrap(summary, max(columns - 1 - len(indent), 30)) or [""]
        lines.append(f"  {name:<{width}}{wrapped[0]}".rstrip())
        lines.extend(indent + more for more in wrapped[1:])
    lines.append("")
    lines.append(SHELL_HELP)
    return "\n".join(lines)


def _member(schema: Schema, live: Member, local: DefinitionDoc | None) -> MemberDoc:
    documented = local.member(live.name) if local is not None else None
    if documented is None:
        # Only introspection knows it: its masked type is described by structure.
        return MemberDoc(live.name, schema.describe(live.type), live.optional, "")
    values = schema.enum_values(live.type)
    element = schema.element_type(live.type)
    if values is None and element is not None:
        values = schema.enum_values(element)
    texts = {v.name: v.text for v in documented.values}
    shape = ""
    if values is None and schema.json_type(live.type) in ("array", "object"):
        shape = schema.describe(live.type)
    return MemberDoc(
        live.name,
        documented.type,
        live.optional,
        documented.text,
        tuple(ValueDoc(v, texts.get(v, "")) for v in values or ()),
        shape,
    )


def _live(
    schema: Schema,
    name: str,
    kind: str,
    arg_type: str,
    local: DefinitionDoc | None,
    ret_type: str | None = None,
    allow_oob: bool = False,
) -> DefinitionDoc:
    """``name`` as the daemon reports it, with the prose of ``local``."""
    members = tuple(_member(schema, m, local) for m in schema.members(arg_type))
    returns = local.returns if local is not None else None
    returns_text = local.returns_text if local is not None else ""
    if returns is None and ret_type is not None:
        described = schema.describe(ret_type)
        returns = None if described in ("object {}", "?") else described
    if local is None:
        return DefinitionDoc(name, kind, "", members, returns, "", allow_oob)
    return DefinitionDoc(
        name, kind, local.description, members, returns, returns_text, allow_oob, local.sections
    )


def definition(schema: Schema, docs: SchemaDocs, name: str) -> DefinitionDoc | None:
    """What ``help name`` shows: a command or event of the daemon, or a documented
    type (types are masked in introspection, so only the local docs name them)."""
    info = schema.commands.get(name)
    if info is not None:
        local = docs.commands.get(name)
        return _live(schema, name, "command", info.arg_type, local, info.ret_type, info.allow_oob)
    if name in schema.events:
        return _live(schema, name, "event", schema.events[name], docs.events.get(name))
    return docs.types.get(name)


def help_text(
    schema: Schema, docs: SchemaDocs, name: str, columns: int | None = None
) -> str | None:
    """The help screen of ``name``; ``None`` when there is nothing by that name.
    Lines longer than the terminal (``columns``, by default its width) are wrapped
    under themselves: a type only introspection describes is one line, however
    long (QEMU's query-block returns one of 900 characters)."""
    if name == "help":
        return HELP_HELP
    if name in schema.forwarded:
        return (f"{name} (command, forwarded to QEMU)\n    {FORWARDED}\n    migblockd's "
                "schema does not describe it, so the shell sends it unchecked.")
    doc = definition(schema, docs, name)
    if doc is None:
        return None
    if columns is None:
        columns = shutil.get_terminal_size((100, 24)).columns
    width = max(columns - 1, 40)
    lines: list[str] = []
    for line in doc.text.splitlines():
        if len(line) <= width:
            lines.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        lines += textwrap.wrap(line, width, subsequent_indent=indent,
                               break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines)


def unknown_command(schema: Schema, name: str) -> str:
    hint = did_you_mean(name, [*schema.command_names(), *sorted(schema.events)])
    return f"help: the daemon has no command, event or type '{shown(name)}'{hint}"

"""The text of ``help`` and ``help COMMAND``."""

from __future__ import annotations

import shutil
import textwrap

from migblockd.shell.docs import DocSource
from migblockd.shell.schema import Schema

SHELL_HELP = """\
Syntax:  COMMAND key=value ...   (dotted keys nest: a.b=1 a.c=2)
         {"execute": ...}         (a raw JSON request)
         help [COMMAND | EVENT | TYPE]
Values are JSON when they parse as JSON (42, true, null, [..], {..}), else strings;
quote to force a string.  List arguments also take a,b,c.  Tab completes commands,
argument names and enum values.  Ctrl-C drops the line, Ctrl-D exits."""


def overview(schema: Schema, docs: DocSource, columns: int | None = None) -> str:
    """The command list; summaries longer than the terminal (``columns``, by default
    its width) are wrapped under themselves rather than at the left margin."""
    if columns is None:
        columns = shutil.get_terminal_size((100, 24)).columns
    names = schema.command_names()
    width = max((len(n) for n in names), default=0) + 2
    indent = " " * (2 + width)
    lines = ["Commands:"]
    for name in names:
        doc = docs.command(name)
        summary = doc.summary if doc is not None and doc.summary else ""
        wrapped = textwrap.wrap(summary, max(columns - 1 - len(indent), 30)) or [""]
        lines.append(f"  {name:<{width}}{wrapped[0]}".rstrip())
        lines.extend(indent + more for more in wrapped[1:])
    lines.append("")
    lines.append(SHELL_HELP)
    return "\n".join(lines)


def _wrap(text: str, indent: str) -> list[str]:
    """Indent doc text, keeping its line breaks (lists stay lists)."""
    return [
        indent + line if line.strip() else "" for line in textwrap.dedent(text).strip().splitlines()
    ]


def _values_line(schema: Schema, type_name: str) -> str | None:
    values = schema.enum_values(type_name)
    element = schema.element_type(type_name)
    if values is None and element is not None:
        values = schema.enum_values(element)
    return None if values is None else "values: " + ", ".join(values)


def command_help(schema: Schema, docs: DocSource, name: str) -> str | None:
    """Help for command ``name`` (or, failing that, for a documented event or type);
    ``None`` when there is nothing by that name.

    What the command takes comes from the daemon's introspection; the prose and the
    unmasked type names from the local docs, when they document the command.
    """
    info = schema.commands.get(name)
    if info is None:
        return docs.other(name)
    doc = docs.command(name)
    lines = [name + (" (allow-oob)" if info.allow_oob else "")]
    if doc is not None and (doc.text or doc.summary):
        lines.extend(_wrap(doc.text or doc.summary, "    "))
    arguments = schema.arguments(name)
    lines.append("")
    if arguments:
        lines.append("Arguments:")
        for member in arguments:
            need = "optional" if member.optional else "required"
            documented = doc.members.get(member.name) if doc is not None else None
            if documented is not None and documented.type:
                lines.append(f"    {member.name}: {documented.type} ({need})")
                if documented.text:
                    lines.extend(_wrap(documented.text, "        "))
                values = _values_line(schema, member.type)
                if values:
                    lines.append(f"        {values}")
                elif schema.json_type(member.type) in ("array", "object"):
                    lines.append(f"        shape: {schema.describe(member.type)}")
            else:
                lines.append(f"    {member.name}: {schema.describe(member.type)} ({need})")
    else:
        lines.append("Arguments: none")
    ret = schema.describe(info.ret_type)
    if doc is not None and doc.returns:
        lines.append("")
        lines.append(f"Returns: {doc.returns}")
        lines.extend(_wrap(doc.returns_text, "    "))
    elif ret not in ("object {}", "?"):
        lines.append("")
        lines.append(f"Returns: {ret}")
    for tag, text in doc.sections if doc is not None else ():
        lines.append("")
        lines.append(f"{tag}:")
        lines.extend(_wrap(text, "    "))
    return "\n".join(lines)


def unknown_command(schema: Schema, name: str) -> str:
    close = [n for n in schema.command_names() if name in n]
    hint = f"; did you mean {', '.join(close[:5])}?" if close and name else ""
    return f"help: the daemon has no command '{name}'{hint}"

"""The help screen of a :class:`~migblockd.qapi.doc.DefinitionDoc`: the one
renderer of documentation, used for the generator's doc text and by
``migblock-shell``'s ``help``.

Layout::

    add-blocker (command)
        Description, indented, its line breaks kept.

    Arguments:
        reason: string (required)
            What the argument is for.
        modes: [MigMode] (optional)
            ...
            values: normal, cpr-reboot, cpr-transfer, cpr-exec

    Returns: BlockerInfo
        The new blocker.

    Errors:
        - GenericError when ...

    Since: 0.1
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # doc.py imports this module to render its model
    from .doc import DefinitionDoc, MemberDoc

# The heading of the member list, per kind of definition.
_HEADINGS: dict[str, str] = {"command": "Arguments", "event": "Data", "enum": "Values"}


def _indent(text: str, prefix: str) -> list[str]:
    """``text`` indented by ``prefix``, its line breaks kept (lists stay lists)."""
    return [
        prefix + line if line.strip() else ""
        for line in textwrap.dedent(text).strip("\n").splitlines()
    ]


def _member(kind: str, m: MemberDoc) -> list[str]:
    sig = m.name
    if m.type:
        sig += f": {m.type}"
        # A caller needs to know what it must pass; of what it receives, what
        # may be absent.
        if kind == "command":
            sig += " (optional)" if m.optional else " (required)"
        elif m.optional:
            sig += " (optional)"
    lines = ["    " + sig, *_indent(m.text, "        ")]
    if m.values:
        lines.append("        values: " + ", ".join(v.name for v in m.values))
    elif m.shape:
        lines.append("        shape: " + m.shape)
    return lines


def render(d: DefinitionDoc) -> str:
    """The help screen of ``d`` (no trailing newline)."""
    title = f"{d.name} ({d.kind}{', allow-oob' if d.allow_oob else ''})"
    blocks = [[title, *_indent(d.description, "    ")]]
    heading = _HEADINGS.get(d.kind, "Members")
    if d.members:
        blocks.append([f"{heading}:", *(line for m in d.members for line in _member(d.kind, m))])
    else:
        blocks.append([f"{heading}: none"])
    if d.returns is not None:
        blocks.append([f"Returns: {d.returns}", *_indent(d.returns_text, "    ")])
    for tag, text in d.sections:
        if tag == "":
            blocks.append(_indent(text, "    "))
        elif tag == "Since" and "\n" not in text.strip():
            blocks.append([f"{tag}: {text.strip()}"])  # a version reads best on the tag's line
        else:
            blocks.append([f"{tag}:", *_indent(text, "    ")])
    return "\n\n".join("\n".join(block) for block in blocks)

"""Documentation text for ``help``.

What exists (commands, arguments, types) always comes from the daemon's
introspection; the prose comes from the doc comments of the schema that is
installed with the package (``migblockd.contract``), since the shell runs on the
daemon's machine.  When that text is missing (say, a newer daemon has a command the
local package does not document) help still shows the arguments and types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class MemberText:
    type: str
    """The schema's spelling of the type (``str``, ``[MigMode]``), unmasked."""
    text: str


@dataclass(frozen=True)
class CommandDoc:
    summary: str = ""
    """One line."""
    text: str = ""
    """The free text of the doc comment (may be several paragraphs)."""
    members: Mapping[str, MemberText] = field(default_factory=dict)
    """Argument name -> its type spelling and description."""
    returns: str = ""
    """The schema's spelling of the return type ("" when it returns nothing)."""
    returns_text: str = ""
    sections: tuple[tuple[str, str], ...] = ()
    """Tagged sections other than the description and Returns: (tag, text)."""


class DocSource(Protocol):
    def command(self, name: str) -> CommandDoc | None: ...

    def other(self, name: str) -> str | None:
        """The help text of an event or a type, if documented."""


class NoDocs:
    def command(self, name: str) -> CommandDoc | None:
        return None

    def other(self, name: str) -> str | None:
        return None


def first_sentence(text: str) -> str:
    """The first sentence (or line) of ``text``, on one line."""
    paragraph = text.strip().split("\n\n", 1)[0]
    line = " ".join(paragraph.split())
    cut = line.find(". ")
    return line if cut < 0 else line[: cut + 1]


def load_docs() -> DocSource:
    """The packaged doc text, or :class:`NoDocs` if it cannot be loaded."""
    try:
        from migblockd.shell.contract_docs import ContractDocs  # noqa: PLC0415

        return ContractDocs.load()
    except Exception:  # any failure just means: no prose in help
        return NoDocs()

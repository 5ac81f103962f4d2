"""Adapter from the packaged schema docs (``Contract.load().docs``, see
:mod:`migblockd.qapi.doc`) to the shell's :class:`~migblockd.shell.docs.DocSource`."""

from __future__ import annotations

from migblockd.contract import Contract, SchemaDocs
from migblockd.shell.docs import CommandDoc, MemberText, first_sentence


class ContractDocs:
    def __init__(self, docs: SchemaDocs) -> None:
        self._docs = docs

    @classmethod
    def load(cls) -> ContractDocs:
        return cls(Contract.load().docs)

    def command(self, name: str) -> CommandDoc | None:
        doc = self._docs.commands.get(name)
        if doc is None:
            return None
        members = {m.name: MemberText(m.type, m.text) for m in doc.members}
        sections = tuple((tag, text) for tag, text in doc.sections if tag not in ("", "Returns"))
        summary = first_sentence(doc.summary or doc.description)
        return CommandDoc(
            summary, doc.description, members, doc.returns or "", doc.returns_text, sections
        )

    def other(self, name: str) -> str | None:
        for table in (self._docs.events, self._docs.types):
            if name in table:
                return str(table[name].text).rstrip()
        return None

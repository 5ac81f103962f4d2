"""The contract: everything the daemon and the shell derive from the schema.

``Contract.load()`` parses the QAPI source and runs the generator's back ends
in memory, so a running daemon never depends on the committed generated files
being fresh (a test keeps those in step with the source separately).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .qapi.builder import load_schema
from .qapi.doc import SchemaDocs, build_docs
from .qapi.error import SourceInfo
from .qapi.introspect import introspect
from .qapi.jsonschema import command_documents, event_documents
from .qapi.parser import Vet

__all__ = ["CommandSpec", "Contract", "EventSpec", "SchemaDocs", "schema_dir"]

SCHEMA_FILE = "migblockd.json"


def schema_dir() -> Path:
    """The directory holding ``migblockd.json``.

    An installed wheel carries the schema inside the package, at
    ``migblockd/_schema`` (pyproject force-includes ``schema/`` there); a
    source checkout (also an editable install) has it at ``<repo>/schema``.
    """
    packaged = Path(str(importlib.resources.files("migblockd") / "_schema"))
    if (packaged / SCHEMA_FILE).is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "schema"


@dataclass(frozen=True)
class CommandSpec:
    """One command as the daemon needs it.

    ``arguments`` is the self-contained JSON Schema of the arguments object
    (the document written to ``generated/commands/NAME.arguments.json``);
    ``returns`` that of the return value, or None when the command returns
    ``{}``; ``doc`` the full rendered doc text.
    """

    name: str
    allow_oob: bool
    arguments: dict[str, Any]
    returns: dict[str, Any] | None
    doc: str


@dataclass(frozen=True)
class EventSpec:
    """One event: the JSON Schema of its data, and its doc text."""

    name: str
    data: dict[str, Any]
    doc: str


@dataclass(frozen=True)
class Contract:
    """The schema's commands, events, enums, introspection answer and docs.

    ``commands`` and ``events`` are in schema order; ``enums`` maps every
    enum name to its values in schema order (``enums["MigMode"]``);
    ``introspection`` is the ``query-qmp-schema`` answer; ``docs`` is what the
    shell needs for help and completion (see ``SchemaDocs``).  ``root`` is the
    root schema file and ``sources`` where each enum, struct, command and event
    is defined, for messages about the schema that QAPI's rules alone do not
    make (``migblockd.served``).
    """

    commands: Mapping[str, CommandSpec]
    events: Mapping[str, EventSpec]
    enums: Mapping[str, tuple[str, ...]]
    introspection: list[dict[str, Any]]
    docs: SchemaDocs
    root: Path
    sources: Mapping[str, SourceInfo]

    @classmethod
    def load(cls, path: Path | None = None, vet: Vet | None = None) -> Contract:
        """Parse the schema and derive everything from it.

        ``path`` is the root schema file, or a directory holding
        ``migblockd.json``; default ``schema_dir() / "migblockd.json"``.
        ``vet`` is called with each file's name, its opened descriptor and that
        descriptor's status before the file is read, the root and every include, and may
        refuse it by raising (``migblockd.qapi.parser.Vet``).
        Raises ``migblockd.qapi.QAPIError`` when the schema has a mistake and
        ``OSError`` when the root file cannot be read.
        """
        if path is None:
            path = schema_dir()
        if path.is_dir():
            path = path / SCHEMA_FILE
        schema = load_schema(path, vet)
        docs = build_docs(schema)
        commands = {
            name: CommandSpec(
                name=name,
                allow_oob=schema.commands[name].allow_oob,
                arguments=args,
                returns=rets,
                doc=docs.commands[name].text,
            )
            for name, (args, rets) in command_documents(schema).items()
        }
        events = {
            name: EventSpec(name=name, data=data, doc=docs.events[name].text)
            for name, data in event_documents(schema).items()
        }
        enums = {name: enum.value_names for name, enum in schema.enums.items()}
        sources: dict[str, SourceInfo] = {}
        for named in (*schema.types.values(), *schema.commands.values(),
                      *schema.events.values()):
            assert named.info is not None  # only the implicit types have none
            sources[named.name] = named.info
        return cls(
            commands=MappingProxyType(commands),
            events=MappingProxyType(events),
            enums=MappingProxyType(enums),
            introspection=introspect(schema),
            docs=docs,
            root=path,
            sources=MappingProxyType(sources),
        )

"""The parse tree: what :mod:`.parser` reads a schema into and :mod:`.builder` checks.

Unlike QEMU's (``scripts/qapi/parser.py``, whose ``QAPIExpression`` keeps the
position of each top-level expression), every key, value and list item keeps
its own source position, so that a semantic error points at the exact member
that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .doccomment import Doc
from .error import QAPIError, SourceInfo

__all__ = ["Definition", "ParseResult", "PosDict", "PosList", "Pragmas", "Value"]

#: The pragmas QEMU's parser.py knows besides command-name-exceptions; of
#: doc-required, the subset takes only true, the rule it holds every schema to.
_UNSUPPORTED_PRAGMAS = ("doc-required", "command-returns-exceptions",
                        "documentation-exceptions", "member-name-exceptions")

#: A parsed value: the subset of JSON that QAPI allows (no numbers, no null).
Value = Union[str, bool, "PosList", "PosDict"]


class PosDict(dict[str, Value]):
    """A parsed object that remembers where it, its keys and its values are."""

    def __init__(self, info: SourceInfo) -> None:
        super().__init__()
        self.info = info
        self.key_info: dict[str, SourceInfo] = {}
        self.value_info: dict[str, SourceInfo] = {}


class PosList(list[Value]):
    """A parsed array that remembers where it and each of its items are."""

    def __init__(self, info: SourceInfo) -> None:
        super().__init__()
        self.info = info
        self.item_info: list[SourceInfo] = []


@dataclass
class Definition:
    """A top-level definition with its doc comment and its module (file)."""

    expr: PosDict
    doc: Doc | None
    module: str

    @property
    def info(self) -> SourceInfo:
        return self.expr.info


@dataclass
class Pragmas:
    """Parse-wide options set with ``{ 'pragma': {...} }``.

    ``command-name-exceptions`` lists command names allowed to break the
    lower-case-with-dashes rule (QEMU's legacy ``qmp_capabilities`` and
    ``migrate_cancel``), exactly as QEMU's pragma of the same name does: the
    last value given holds for the whole schema.
    """

    command_name_exceptions: list[str] = field(default_factory=list)

    def take(self, name: str, value: Value, info: SourceInfo) -> None:
        """Set pragma ``name`` (its key at ``info``), as QEMU's
        ``QAPISchemaParser._pragma()`` does, or refuse it."""
        if name == "doc-required":
            if not isinstance(value, bool):
                raise QAPIError(info, "pragma 'doc-required' must be boolean")
            if value:
                return  # what migblockd's generator requires anyway
        if name in _UNSUPPORTED_PRAGMAS:
            # QEMU's, so not "unknown": each lets a schema leave out a doc or
            # break a naming or return rule the back ends rely on.
            what = "'doc-required': false" if name == "doc-required" else f"'{name}'"
            raise QAPIError(info, f"pragma {what} is not supported by migblockd's QAPI subset")
        if name != "command-name-exceptions":
            raise QAPIError(info, f"unknown pragma '{name}'")
        if not isinstance(value, PosList) or not all(isinstance(v, str) for v in value):
            raise QAPIError(info, f"pragma {name} must be a list of strings")
        # Set, not added to: one value for the whole schema, the last one
        # given, as QEMU's parser.py assigns it (its docs: "Setting the same
        # pragma to different values in parts of the schema doesn't work").
        self.command_name_exceptions = [str(v) for v in value]


@dataclass
class ParseResult:
    """Everything read from a root schema file and the files it includes.

    ``definitions`` is in source order with includes expanded in place;
    ``modules`` lists the files in the order QEMU creates its modules (the
    root first, then each include as its directive is met).
    """

    definitions: list[Definition]
    modules: list[str]
    pragmas: Pragmas

"""QAPI doc comments: the ``##`` blocks of a schema file, read into a :class:`Doc`.

The parser (:mod:`.parser`) finds a block's lines; :func:`parse_doc` gives
them structure.  Layout and wording of the errors follow QEMU's
``scripts/qapi/parser.py`` (``QAPIDoc``) and ``docs/devel/qapi-code-gen.rst``:
``@Symbol:`` alone on the first line, then free text, then ``@member: text``
sections and tagged sections (``Returns:``, ``Since:``...) whose continuation
lines are indented by four spaces (QEMU's current style).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .error import QAPIError, SourceInfo

__all__ = ["SECTION_TAGS", "ArgDoc", "Doc", "SectionDoc", "parse_doc"]

# Section tags QEMU recognises in definition documentation; the text that
# follows the colon (and the indented lines after it) belong to the section.
SECTION_TAGS = ("Returns", "Errors", "Since", "Note", "Notes", "Example", "Examples", "TODO")
_TAG_RE = re.compile("(" + "|".join(SECTION_TAGS) + r"):(?:\s|$)")
_ARG_RE = re.compile(r"@([^\s:]*):(?:\s|$)")
# Continuation lines of a member or tagged section are indented by this much.
_INDENT = 4


@dataclass
class ArgDoc:
    """The doc text of one member (``@name: text``) inside a doc comment."""

    name: str
    text: str
    info: SourceInfo


@dataclass
class SectionDoc:
    """A tagged section (``Returns:``, ``Since:``...) or, with tag ``""``, an
    untagged paragraph that follows the member sections."""

    tag: str
    text: str
    info: SourceInfo


@dataclass
class Doc:
    """One doc comment block.

    ``symbol`` is the definition it documents, or None for a free-form block
    (section headings and prose, which document nothing in particular).
    """

    info: SourceInfo
    symbol: str | None = None
    body: str = ""
    args: dict[str, ArgDoc] = field(default_factory=dict)
    #: ``@name: text`` after a ``Features:`` line (QEMU's feature documentation).
    features: dict[str, ArgDoc] = field(default_factory=dict)
    sections: list[SectionDoc] = field(default_factory=list)

    def section(self, tag: str) -> SectionDoc | None:
        """The section with this tag, if the block has one."""
        for sec in self.sections:
            if sec.tag == tag:
                return sec
        return None

    # The checks of a doc against the definition it documents are the doc's,
    # as in QEMU (QAPIDoc.check_expr() and QAPIDoc.check()).

    def check_sections(self, meta: str, returns: bool) -> None:
        """QEMU's QAPIDoc.check_expr(): sections only some definitions may have
        (``returns``: whether the definition has a 'returns' key)."""
        returns_sec, errors = self.section("Returns"), self.section("Errors")
        if meta == "command":
            if returns_sec is not None and not returns:
                raise QAPIError(returns_sec.info,
                                "'Returns' section, but command doesn't return anything")
            return
        if returns_sec is not None:
            raise QAPIError(returns_sec.info, "'Returns' section is only valid for commands")
        if errors is not None:
            raise QAPIError(errors.info, "'Errors' section is only valid for commands")

    def check_names(self, names: list[str]) -> None:
        """Every ``@name:`` is one of ``names``.  QEMU's QAPIDoc.check() words it
        the same for enum values (which it calls members too), naming them all
        at the first."""
        known = set(names)  # a list would make an enum of n values cost n * n
        bogus = [a for a in self.args if a not in known]
        if bogus:
            listed = "', '".join(bogus)
            raise QAPIError(self.args[bogus[0]].info,
                            f"documented member '{listed}' does not exist" if len(bogus) == 1
                            else f"documented members '{listed}' do not exist")

    def check_features(self) -> None:
        """The features part of QEMU's QAPIDoc.check(): no definition has
        features in the subset, so every one documented is one that does not
        exist (QEMU words it so)."""
        if self.features:
            bogus = list(self.features)
            listed = "', '".join(bogus)
            raise QAPIError(self.features[bogus[0]].info,
                            f"documented feature '{listed}' does not exist" if len(bogus) == 1
                            else f"documented features '{listed}' do not exist")


def parse_doc(info: SourceInfo, lines: list[tuple[str, SourceInfo]],
              end: SourceInfo) -> Doc:
    """The doc comment opened at ``info`` and closed at ``end``, from its ``#``
    lines between the ``##`` lines."""
    return _DocBuilder(info).build(lines, end)


class _DocBuilder:
    """Turns the lines of one doc comment into a ``Doc`` (layout: see above).

    After a blank line, an unindented line that is neither a member nor a tag
    starts an untagged paragraph.
    """

    def __init__(self, info: SourceInfo) -> None:
        self.doc = Doc(info)
        self.body: list[str] = []
        # The section being filled: (kind, name, lines, info) with kind
        # "arg" or "section"; None while still in the body.
        self.cur: tuple[str, str, list[str], SourceInfo] | None = None
        self.seen_tagged = ""
        self.in_features = False

    def build(self, lines: list[tuple[str, SourceInfo]], end: SourceInfo) -> Doc:
        for raw, info in lines:
            text = raw[1:]
            if text and text[0] != " ":
                raise QAPIError(info, "missing space after #")
            self._line(text[1:], info)
        self._expect_features(end)
        self._close()
        self.doc.body = _dedent_join(self.body)
        return self.doc

    def _line(self, line: str, info: SourceInfo) -> None:
        doc = self.doc
        if doc.symbol is None and not self.body and self.cur is None and line.startswith("@"):
            if not line.endswith(":"):
                raise QAPIError(info, "line should end with ':'")
            doc.symbol = line[1:-1]
            if not doc.symbol:
                raise QAPIError(info, "name required after '@'")
            return
        if doc.symbol is None:
            # Free-form prose: keep it (headings etc.), but it documents nothing,
            # so a member's line here is a mistake, as QEMU's parser says.
            if at := _ARG_RE.match(line):
                raise QAPIError(
                    info, f"'@{at.group(1)}:' not allowed in free-form documentation")
            self.body.append(line)
            return
        if line.startswith("="):
            # A heading belongs to prose (a free-form block); in a definition's
            # documentation QEMU's parser.py refuses it, as markup its doc
            # generator cannot place.
            raise QAPIError(info, "unexpected '=' markup in definition documentation")
        arg = _ARG_RE.match(line)
        tag = _TAG_RE.match(line)
        if line.strip() and not arg:
            self._expect_features(info)
        if line == "Features:" and not self.seen_tagged and not self.in_features:
            # QEMU's line that starts the features' descriptions.
            self._close()
            self.in_features = True
        elif arg:
            if self.seen_tagged:
                raise QAPIError(
                    info, f"'@{arg.group(1)}:' can't follow '{self.seen_tagged}' section"
                )
            name = arg.group(1)
            if not name:
                raise QAPIError(info, "invalid parameter name")
            kind = "feature" if self.in_features else "arg"
            known = doc.features if self.in_features else doc.args
            if name in known or (self.cur is not None and self.cur[:2] == (kind, name)):
                raise QAPIError(info, f"'{name}' parameter name duplicated")
            self._close()
            self.cur = (kind, name, [line[arg.end() :].strip()], info)
        elif tag:
            name = tag.group(1)
            if name in ("Returns", "Since", "Errors") and (
                doc.section(name) is not None
                or (self.cur is not None and self.cur[:2] == ("section", name))
            ):
                raise QAPIError(info, f"duplicated '{name}' section")
            self._close()
            self.seen_tagged = name
            self.cur = ("section", name, [line[tag.end() :].strip()], info)
        elif self.cur is None:
            self.body.append(line)
        elif not line.strip():
            self.cur[2].append("")
        elif line.startswith(" " * _INDENT):
            self.cur[2].append(line[_INDENT:])
        elif self.cur[2][-1] == "":
            self._close()
            self.cur = ("section", "", [line], info)
        else:
            raise QAPIError(info, f"unexpected de-indent (expected at least {_INDENT} spaces)")

    def _expect_features(self, info: SourceInfo) -> None:
        """After ``Features:`` the next line that is not blank, or the block's
        end, must describe a feature (QEMU's parser.py since 9.0); else it was
        taken into the description, above the members."""
        if self.in_features and self.cur is None and not self.doc.features:
            raise QAPIError(info, "feature descriptions expected")

    def _close(self) -> None:
        if self.cur is None:
            return
        kind, name, lines, info = self.cur
        text = _dedent_join(lines)
        if not text:
            # QEMU's wording since 9.0 ("text required after '@foo:'"), at the
            # section's first line.
            label = name if kind == "section" else f"@{name}"
            raise QAPIError(info, f"text required after '{label}:'")
        if kind == "arg":
            self.doc.args[name] = ArgDoc(name, text, info)
        elif kind == "feature":
            self.doc.features[name] = ArgDoc(name, text, info)
        else:
            self.doc.sections.append(SectionDoc(name, text, info))
        self.cur = None

def _dedent_join(lines: list[str]) -> str:
    return "\n".join(line.rstrip() for line in lines).strip("\n").strip()

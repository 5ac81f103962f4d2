"""QAPI schema syntax: a reader for QEMU's JSON dialect and its doc comments.

The grammar is QEMU's (``scripts/qapi/parser.py``): a file is a sequence of
top-level objects; strings use single quotes; ``#`` starts a comment; a block
of comment lines opened and closed by a ``##`` line is a doc comment, which
documents the definition right after it (:mod:`.doccomment` reads its
lines). ``{ 'include': 'FILE' }`` pulls in a file relative to the including
one (each file at most once) and ``{ 'pragma': {...} }`` sets parse-wide
options.

Unlike QEMU it keeps the source position of every key and value (not only of
each top-level expression; see :mod:`.tree`), so that semantic errors in
``builder.py`` can point at the exact member that is wrong.  Error wording follows QEMU's where QEMU
has a message for the same mistake.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..regular import NotRegularFile, read_regular
from .doccomment import Doc, parse_doc
from .error import QAPIError, SourceInfo
from .tree import Definition, ParseResult, PosDict, PosList, Pragmas, Value

#: How deep values may nest and includes may chain.  A schema needs a few
#: levels of each; a limit turns a runaway file (thousands of "[", a chain of
#: includes) into an error at its position, where recursion would end in a
#: RecursionError traceback.
MAX_NESTING = 32
MAX_INCLUDE_DEPTH = 32

#: Called with a file's name, its opened descriptor and that descriptor's status
#: before the file is read (the root and each include), to refuse it by raising: the daemon holds
#: a schema it was given to the rule its configuration file obeys
#: (``migblockd.trusted_file``).
Vet = Callable[[str, int, os.stat_result], None]


@dataclass
class _Token:
    kind: str  # one of "{}:,[]", "'" (string), "b" (boolean), "#" (doc line), "" (EOF)
    value: str | bool | None
    info: SourceInfo


class _FileParser:
    """Reads one file; includes are read by nested instances."""

    def __init__(
        self,
        fname: str,
        result: ParseResult,
        included: set[str],
        chain: tuple[str, ...],
        vet: Vet | None = None,
    ) -> None:
        self.fname = fname
        self.result = result
        self.included = included
        self.chain = chain
        self.vet = vet
        # Not open(): a FIFO would hold the daemon's start (or reload) until
        # someone wrote to it, as it holds QEMU's generator.
        raw = read_regular(fname, None if vet is None else lambda fd, st: vet(fname, fd, st))
        try:
            # Newlines as Python's text mode reads them, as QEMU's parser does.
            self.src = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as err:
            # Doc comments may hold any UTF-8; anything else is a mistake to
            # point at, not a traceback.
            line_start = raw.rfind(b"\n", 0, err.start) + 1
            prefix = raw[line_start : err.start].decode("utf-8")
            info = SourceInfo(fname, raw.count(b"\n", 0, err.start) + 1, _column(prefix))
            raise QAPIError(info, f"invalid UTF-8 byte 0x{raw[err.start]:02x}") from None
        if not self.src.endswith("\n"):
            self.src += "\n"
        self.cursor = 0
        self.line = 1
        self.line_pos = 0
        self.tok = _Token("", None, SourceInfo(fname, 1, 1))
        self.depth = 0  # of the object or array being read
        self.col_at = (0, 0, 1)  # (line start, position, its column): see _info_at

    # --- lexer ---------------------------------------------------------

    def _info_at(self, pos: int) -> SourceInfo:
        # The tokens of a line come in order: each column continues from the
        # previous one, so that a line costs its length once, not once per
        # token (an enum of thousands of values on one line took minutes).
        if self.col_at[0] != self.line_pos or pos < self.col_at[1]:
            self.col_at = (self.line_pos, self.line_pos, 1)
        col = _column(self.src[self.col_at[1] : pos], self.col_at[2])
        self.col_at = (self.line_pos, pos, col)
        return SourceInfo(self.fname, self.line, col)

    def _error(self, pos: int, msg: str) -> QAPIError:
        return QAPIError(self._info_at(pos), msg)

    def accept(self, doc_mode: bool = False) -> None:
        """Read the next token into ``self.tok``.

        Plain comments are skipped.  A comment starting ``##`` opens a doc
        block: it and, while ``doc_mode`` is true, every further comment line
        are returned as ``#`` tokens so that ``_get_doc`` can read them.
        """
        src = self.src
        while True:
            if self.cursor >= len(src):
                self.tok = _Token("", None, self._info_at(self.cursor))
                return
            pos = self.cursor
            ch = src[pos]
            self.cursor += 1
            if ch == "#":
                end = src.find("\n", pos)
                self.cursor = end
                if doc_mode or src.startswith("##", pos):
                    self.tok = _Token("#", src[pos:end], self._info_at(pos))
                    return
            elif ch in "{}:,[]":
                self.tok = _Token(ch, None, self._info_at(pos))
                return
            elif ch == "'":
                self.tok = _Token("'", self._read_string(pos), self._info_at(pos))
                return
            elif src.startswith("true", pos):
                self.cursor = pos + 4
                self.tok = _Token("b", True, self._info_at(pos))
                return
            elif src.startswith("false", pos):
                self.cursor = pos + 5
                self.tok = _Token("b", False, self._info_at(pos))
                return
            elif ch == "\n":
                if self.cursor == len(src):
                    # The end of input is the last newline, on the last line, as
                    # in QEMU's parser.py: an error there names no line past it.
                    self.tok = _Token("", None, self._info_at(pos))
                    return
                self.line += 1
                self.line_pos = self.cursor
            elif not ch.isspace():
                # Up to the next structural character, space or single quote; a
                # double quote is part of the token (QEMU's parser.py since its
                # "Fix crash on stray double quote character"), so '"Foo"' shows whole.
                match = re.match(r"[^\[\]{}:,\s']+", src[pos:])
                stray = match.group(0) if match else ch
                raise self._error(pos, f"stray '{stray}'")

    def _read_string(self, start: int) -> str:
        src = self.src
        out: list[str] = []
        esc = False
        while True:
            ch = src[self.cursor]
            self.cursor += 1
            if ch == "\n":
                raise self._error(self.cursor - 1, 'missing terminating "\'"')
            if esc:
                # QEMU knows only \\ : the schema has no use for other escapes.
                if ch != "\\":
                    raise self._error(self.cursor - 1, f"unknown escape \\{ch}")
                esc = False
            elif ch == "\\":
                esc = True
                continue
            elif ch == "'":
                return "".join(out)
            if ord(ch) < 32 or ord(ch) >= 127:
                raise self._error(self.cursor - 1, "funny character in string")
            out.append(ch)

    # --- grammar -------------------------------------------------------

    def parse(self) -> None:
        self.accept()
        pending: Doc | None = None
        while self.tok.kind != "":
            if self.tok.kind == "#":
                self._reject_pending(pending)
                pending = self._get_doc()
                continue
            info = self.tok.info
            expr = self._get_expr()
            if not isinstance(expr, PosDict):
                raise QAPIError(info, "top-level expression must be an object")
            if "include" in expr:
                self._reject_pending(pending)
                self._include(expr)
            elif "pragma" in expr:
                self._reject_pending(pending)
                self._pragma(expr)
            elif pending is not None and pending.symbol is None:
                # Prose (a section heading, say) documents nothing, so the doc
                # comment right before a definition must name it; QEMU's parser.py
                # says so at the comment, whether or not docs are required.
                raise QAPIError(pending.info, "definition documentation required")
            else:
                self.result.definitions.append(Definition(expr, pending, self.fname))
            pending = None
        self._reject_pending(pending)

    @staticmethod
    def _reject_pending(doc: Doc | None) -> None:
        if doc is not None and doc.symbol is not None:
            raise QAPIError(
                doc.info, f"documentation for '{doc.symbol}' is not followed by the definition"
            )

    def _include(self, expr: PosDict) -> None:
        if len(expr) != 1:
            raise QAPIError(expr.info, "invalid 'include' directive")
        name = expr["include"]
        info = expr.value_info["include"]
        if not isinstance(name, str):
            raise QAPIError(info, "value of 'include' must be a string")
        incl = os.path.join(os.path.dirname(self.fname), name)
        absname = os.path.abspath(incl)
        if absname in self.chain:
            raise QAPIError(info, f"inclusion loop for {name}")
        if absname in self.included:
            return
        if len(self.chain) > MAX_INCLUDE_DEPTH:
            raise QAPIError(info, f"includes nested more than {MAX_INCLUDE_DEPTH} levels deep")
        self.included.add(absname)
        self.result.modules.append(incl)
        try:
            sub = _FileParser(incl, self.result, self.included, (*self.chain, absname),
                              self.vet)
        except NotRegularFile:
            if os.path.isdir(incl):
                # QEMU's open() fails on a directory, and says so: its words.
                raise QAPIError(info, f"can't read include file '{incl}': "
                                      f"{os.strerror(errno.EISDIR)}") from None
            raise QAPIError(info, f"include file '{incl}' is not a regular file") from None
        except OSError as err:
            raise QAPIError(info, f"can't read include file '{incl}': {err.strerror}") from err
        sub.parse()

    def _pragma(self, expr: PosDict) -> None:
        if len(expr) != 1:
            raise QAPIError(expr.info, "invalid 'pragma' directive")
        pragma = expr["pragma"]
        if not isinstance(pragma, PosDict):
            raise QAPIError(expr.value_info["pragma"], "value of 'pragma' must be an object")
        for name, value in pragma.items():
            self.result.pragmas.take(name, value, pragma.key_info[name])

    def _get_expr(self) -> Value:
        tok = self.tok
        if tok.kind in ("{", "["):
            if self.depth >= MAX_NESTING:
                raise QAPIError(tok.info, f"value nested more than {MAX_NESTING} levels deep")
            self.depth += 1
            self.accept()
            value = self._get_members(tok.info) if tok.kind == "{" else self._get_values(tok.info)
            self.depth -= 1
            return value
        if tok.kind in ("'", "b"):
            assert isinstance(tok.value, (str, bool))
            self.accept()
            return tok.value
        raise QAPIError(tok.info, "expected '{', '[', string, or boolean")

    def _get_members(self, info: SourceInfo) -> PosDict:
        expr = PosDict(info)
        if self.tok.kind == "}":
            self.accept()
            return expr
        if self.tok.kind != "'":
            raise QAPIError(self.tok.info, "expected string or '}'")
        while True:
            key = self.tok.value
            key_info = self.tok.info
            assert isinstance(key, str)
            self.accept()
            if self.tok.kind != ":":
                raise QAPIError(self.tok.info, "expected ':'")
            self.accept()
            if key in expr:
                raise QAPIError(key_info, f"duplicate key '{key}'")
            expr.key_info[key] = key_info
            expr.value_info[key] = self.tok.info
            expr[key] = self._get_expr()
            if self.tok.kind == "}":
                self.accept()
                return expr
            if self.tok.kind != ",":
                raise QAPIError(self.tok.info, "expected ',' or '}'")
            self.accept()
            if self.tok.kind != "'":
                raise QAPIError(self.tok.info, "expected string")

    def _get_values(self, info: SourceInfo) -> PosList:
        expr = PosList(info)
        if self.tok.kind == "]":
            self.accept()
            return expr
        if self.tok.kind not in ("{", "[", "'", "b"):
            raise QAPIError(self.tok.info, "expected '{', '[', ']', string, or boolean")
        while True:
            expr.item_info.append(self.tok.info)
            expr.append(self._get_expr())
            if self.tok.kind == "]":
                self.accept()
                return expr
            if self.tok.kind != ",":
                raise QAPIError(self.tok.info, "expected ',' or ']'")
            self.accept()

    # --- doc comments --------------------------------------------------

    def _get_doc(self) -> Doc:
        start = self.tok
        if start.value != "##":
            raise QAPIError(start.info, "junk after '##' at start of documentation comment")
        lines: list[tuple[str, SourceInfo]] = []
        self.accept(doc_mode=True)
        while self.tok.kind == "#":
            text = self.tok.value
            assert isinstance(text, str)
            if text.startswith("##"):
                if text != "##":
                    raise QAPIError(
                        self.tok.info, "junk after '##' at end of documentation comment"
                    )
                doc = parse_doc(start.info, lines, self.tok.info)
                self.accept()
                return doc
            lines.append((text, self.tok.info))
            self.accept(doc_mode=True)
        raise QAPIError(self.tok.info, "documentation comment must end with '##'")


def _column(line_prefix: str, col: int = 1) -> int:
    """The 1-based column after ``line_prefix`` (which starts at column ``col``),
    a tab reaching the next tab stop."""
    if "\t" not in line_prefix:
        return col + len(line_prefix)
    for ch in line_prefix:
        col = ((col - 1) // 8 + 1) * 8 + 1 if ch == "\t" else col + 1
    return col


def parse_schema(fname: str | os.PathLike[str], vet: Vet | None = None) -> ParseResult:
    """Read a root schema file and everything it includes.

    Raises ``QAPIError`` for mistakes in the source and ``OSError`` when the
    root file itself cannot be read (``NotRegularFile`` when it is a FIFO, a
    directory...; an unreadable include is a ``QAPIError`` at the include
    directive).  ``vet`` is called for each file, the root and every include,
    before it is read; what it raises goes to the caller as it is.
    """
    path = os.fspath(fname)
    result = ParseResult([], [path], Pragmas())
    absname = os.path.abspath(path)
    parser = _FileParser(path, result, {absname}, (absname,), vet)
    parser.parse()
    return result

"""Bracketed values as the shell reads them: where one ends, and, when it is not
JSON, the Python literal that QEMU's qmp-shell would take it for (its FuzzyJSON).

Nothing in a literal is evaluated: its syntax tree is read, and only the shapes
JSON has are taken.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

__all__ = ["Brackets", "NotLiteral", "python_literal", "scan_brackets"]


class NotLiteral(ValueError):
    """Python syntax, but no literal value."""


_FUZZY_NAMES: dict[str, Any] = {"true": True, "false": False, "null": None}


def _python_value(node: ast.expr, source: str) -> Any:
    """The JSON value of a Python literal's syntax tree, as qmp-shell reads a value
    that is not JSON (its FuzzyJSON: ``true``, ``false`` and ``null`` are names for
    ``True``, ``False`` and ``None``).  Raises :class:`NotLiteral` for what is no
    literal (a bare word: ``[normal]``), ValueError for a literal that JSON cannot
    say as typed (a key given twice, a set)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"number {_typed(node, source)} is out of range")
            return value
        raise ValueError(f"{_typed(node, source)} is not a JSON value")
    if isinstance(node, ast.Name) and node.id in _FUZZY_NAMES:
        return _FUZZY_NAMES[node.id]
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        number = _python_value(node.operand, source)
        return -number if isinstance(node.op, ast.USub) else number
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_python_value(item, source) for item in node.elts]
    if isinstance(node, ast.Dict):
        found: dict[str, Any] = {}
        for key_node, item in zip(node.keys, node.values, strict=True):
            if key_node is None:
                raise NotLiteral  # {**x}
            key = _python_value(key_node, source)
            if not isinstance(key, str):
                raise ValueError(f"key {_typed(key_node, source)} is not a string")
            if key in found:
                raise ValueError(f"duplicate key '{key}'")
            found[key] = _python_value(item, source)
        return found
    if isinstance(node, ast.Set):
        raise ValueError(f"{_typed(node, source)} is a set, not a JSON value")
    raise NotLiteral


def _typed(node: ast.expr, source: str) -> str:
    """``node`` as it was typed."""
    return ast.get_source_segment(source, node) or ast.unparse(node)


def python_literal(text: str) -> Any:
    """``text`` as a Python literal (:func:`_python_value`); raises NotLiteral
    when it is none, ValueError when JSON cannot say it."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise NotLiteral from None
    try:
        return _python_value(tree.body, text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# What can change a scan's state; everything between is skipped at C speed.
_SIGNIFICANT = re.compile(r"[\\\"'{}\[\]]")


class Brackets:
    """A scan for where a bracketed value closes, fed in pieces (a request
    pretty-printed over several lines): its depth, and the quote it is in.

    Brackets inside strings are skipped: JSON's, and the ``'...'`` of a Python
    literal (a ``'`` outside a string is no JSON either).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.quote: str | None = None
        self._escaped = False  # the last piece ended in a string's backslash

    def newline(self) -> None:
        """A line feed between two pieces: it is what a backslash before it escapes."""
        self._escaped = False

    def feed(self, text: str, pos: int = 0) -> int | None:
        """Scan ``text`` from ``pos``: the offset just after the bracket that
        closes the value, or None while it is still open."""
        i = pos + 1 if self._escaped else pos
        self._escaped = False
        while (found := _SIGNIFICANT.search(text, i)) is not None:
            c, i = found.group(), found.end()
            if self.quote is not None:
                if c == "\\":
                    if i == len(text):
                        self._escaped = True
                    i += 1
                elif c == self.quote:
                    self.quote = None
            elif c in "\"'":
                self.quote = c
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i
        return None


def scan_brackets(line: str, pos: int) -> tuple[int, bool]:
    """Scan a bracketed value starting at ``line[pos]`` (``{`` or ``[``): the
    offset just after the matching bracket and whether it was closed."""
    end = Brackets().feed(line, pos)
    return (len(line), False) if end is None else (end, True)

"""The naming rules of QEMU's QAPI (``scripts/qapi/expr.py``): what a definition,
a member and an enum value may be called.  None may start with ``q-`` or ``q_``.

Errors point at the name, worded as QEMU words them where it has the rule.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from .error import QAPIError, SourceInfo

__all__ = ["check_definition_name", "check_member_name", "check_value_name"]

_CAMEL_RE = re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")
_LOWER_RE = re.compile(r"[a-z][a-z0-9-]*$")
_UPPER_RE = re.compile(r"[A-Z][A-Z0-9_]*$")
# A command the command-name-exceptions pragma names may use "_" too.
_EXCEPTION_RE = re.compile(r"[a-z][a-z0-9_-]*$")
# QEMU's valid_name without its case rule (and without downstream prefixes):
# a name outside it "has an invalid name", whatever its case.
_VALID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*$")
# QEMU's valid_name splits off the prefix "x-" that marks any name experimental,
# in either case (it ignores case), and its case rules judge only the stem.
_PREFIXED_RE = re.compile(r"(?:x-)?([a-z][a-z0-9_-]*)$", re.IGNORECASE)


def _stem(name: str) -> str:
    """What QEMU's check_name_str() returns for a valid name: the name without
    an experimental ``x-`` (``X-``) prefix, for the case rules to judge."""
    match = _PREFIXED_RE.match(name)
    return match.group(1) if match else name


def _valid(name: str) -> bool:
    """QEMU's check_name_str(): a valid name whose C name (``-`` as ``_``) does
    not start with ``q_``, the prefix QEMU's generated C reserves for itself."""
    return bool(_VALID_RE.match(name)) and not name.replace("-", "_").startswith("q_")


def check_definition_name(meta: str, name: str, info: SourceInfo,
                          exceptions: Collection[str]) -> None:
    """An enum or struct in CamelCase, an event in upper case, a command in lower
    case (with ``_`` where the ``command-name-exceptions`` pragma allows it); never
    ending in ``List``, QEMU's name for an array of the type."""
    what = f"{meta} '{name}'"
    if not _valid(name):
        raise QAPIError(info, f"{what} has an invalid name")
    stem = _stem(name)
    if meta in ("enum", "struct"):
        if not _CAMEL_RE.match(stem):
            raise QAPIError(info, f"name of {what} must use CamelCase")
    elif meta == "event":
        if not _UPPER_RE.match(stem):
            raise QAPIError(info, f"name of {what} must not use lowercase or '-'")
    elif name in exceptions:
        if not _EXCEPTION_RE.match(stem):
            raise QAPIError(info, f"name of {what} must not use uppercase or '_'")
    elif not _LOWER_RE.match(stem):
        raise QAPIError(info, f"name of {what} must not use uppercase or '_'")
    if name.endswith("List"):
        raise QAPIError(info, f"{meta} name should not end in 'List'")


def check_member_name(name: str, what: str, info: SourceInfo) -> None:
    """A member in lower case, and not one of the names QEMU's C reserves
    (``has_NAME`` for an optional member, ``u`` for a union's variants)."""
    if not _valid(name):
        raise QAPIError(info, f"{what} has an invalid name")
    if not _LOWER_RE.match(_stem(name)):
        raise QAPIError(info, f"name of {what} must not use uppercase or '_'")
    if name.startswith("has-") or name == "u":
        raise QAPIError(info, f"{what} uses reserved name")


def check_value_name(value: str, enum: str, info: SourceInfo) -> None:
    """An enum value in lower case (digits first allowed, as QEMU allows)."""
    # QEMU hides a leading digit behind a letter for its name rules.
    probe = "d" + value if value[:1].isdigit() else value
    if not _valid(probe):
        raise QAPIError(info, f"value '{value}' of enum '{enum}' has an invalid name")
    if not _LOWER_RE.match(_stem(probe)):
        raise QAPIError(info, f"value '{value}' of enum '{enum}' must not use uppercase or '_'")

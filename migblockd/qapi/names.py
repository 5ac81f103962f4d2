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
_VALUE_RE = re.compile(r"[a-z0-9][a-z0-9-]*$")
# QEMU's valid_name, which even a pragma's exception must match.
_EXCEPTION_RE = re.compile(r"[a-z][a-z0-9_-]*$")
# QEMU's valid_name without its case rule (and without downstream prefixes):
# a name outside it "has an invalid name", whatever its case.
_VALID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*$")


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
    if meta in ("enum", "struct"):
        if not _CAMEL_RE.match(name):
            raise QAPIError(info, f"name of {what} must use CamelCase")
    elif meta == "event":
        if not _UPPER_RE.match(name):
            raise QAPIError(info, f"name of {what} must not use lowercase or '-'")
    elif name in exceptions:
        if not _EXCEPTION_RE.match(name):  # it is also a file name: no '/', no '..'
            raise QAPIError(info, f"name of {what} must not use uppercase or '_'"
                            if _EXCEPTION_RE.match(name.lower()) else
                            f"{what} has an invalid name")
    elif not _LOWER_RE.match(name):
        raise QAPIError(info, f"name of {what} must not use uppercase or '_'")
    if name.endswith("List"):
        raise QAPIError(info, f"{meta} name should not end in 'List'")


def check_member_name(name: str, what: str, info: SourceInfo) -> None:
    """A member in lower case, and not one of the names QEMU's C reserves
    (``has_NAME`` for an optional member, ``u`` for a union's variants)."""
    if not _valid(name):
        raise QAPIError(info, f"{what} has an invalid name")
    if not _LOWER_RE.match(name):
        raise QAPIError(info, f"name of {what} must not use uppercase or '_'")
    if name.startswith("has-") or name == "u":
        raise QAPIError(info, f"{what} uses reserved name")


def check_value_name(value: str, enum: str, info: SourceInfo) -> None:
    """An enum value in lower case (digits first allowed, as QEMU allows)."""
    if not _valid("d" + value if value[:1].isdigit() else value):
        raise QAPIError(info, f"value '{value}' of enum '{enum}' has an invalid name")
    if not _VALUE_RE.match(value):
        raise QAPIError(info, f"value '{value}' of enum '{enum}' must not use uppercase or '_'")

"""The first pass over a schema's definitions: each one checked alone.

QEMU checks every expression on its own first (check_exprs() in its
``scripts/qapi/expr.py``: the name, the doc comment and its sections, the
keys, then what each key holds: enum values, member names, the shapes of
member and return types, the flags) and only then defines them
(``QAPISchema._def_exprs()`` in ``schema.py``), where a name defined twice is
found; what needs other definitions (a type named, two members' names that
collide, a member's doc) is checked last.  So of a bad name and a name defined
twice, the bad name is reported, wherever it is: :mod:`.builder` calls
:func:`check_definition` for every definition before it defines any.

Nothing here resolves a type name; a value this pass took has the shape the
later passes expect.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final

from .error import QAPIError, SourceInfo
from .names import check_definition_name, check_member_name, check_value_name
from .tree import Definition, PosDict, PosList, Value

__all__ = ["KEYS_LISTED", "check_definition", "check_keys", "enum_value"]

_META_KEYS: dict[str, tuple[set[str], set[str]]] = {
    # meta-type: (required keys, optional keys)
    "enum": ({"enum", "data"}, set()),
    "struct": ({"struct", "data"}, set()),
    "command": ({"command"}, {"data", "returns", "allow-oob"}),
    "event": ({"event"}, {"data"}),
}
#: QAPI metatypes outside migblockd's subset: valid QAPI, so they are named as
#: unsupported rather than taken for an expression without a metatype.
_UNSUPPORTED_METAS = ("union", "alternate")
#: The most keys a message lists.  QEMU's lists them all; a file with thousands
#: would make a message nobody reads, and a megabyte line in the daemon's log.
KEYS_LISTED: Final = 16


def check_definition(defn: Definition, exceptions: Collection[str]) -> tuple[str, str]:
    """Check one definition as QEMU's check_exprs() does, in its order; return
    its metatype and name.  ``exceptions``: the command-name-exceptions pragma."""
    expr = defn.expr
    metas = [k for k in expr if k in _META_KEYS or k in _UNSUPPORTED_METAS]
    if len(metas) != 1:
        raise QAPIError(expr.info, "expression must have exactly one key 'enum', "
                        "'struct', 'union', 'alternate', 'command', 'event'")
    meta = metas[0]
    if meta in _UNSUPPORTED_METAS:
        raise QAPIError(expr.key_info[meta],
                        f"metatype '{meta}' is not supported by migblockd's QAPI subset")
    name = expr[meta]
    if not isinstance(name, str):
        raise QAPIError(expr.value_info[meta], f"'{meta}' requires a string name")
    check_definition_name(meta, name, expr.value_info[meta], exceptions)
    if defn.doc is None:
        raise QAPIError(defn.info, "documentation comment required")
    if defn.doc.symbol != name:
        raise QAPIError(defn.info, f"documentation comment is for '{defn.doc.symbol}'")
    defn.doc.check_sections(meta, "returns" in expr)
    check_keys(expr, f"{meta} '{name}'", *_META_KEYS[meta])
    if meta == "enum":
        _check_enum(name, expr)
    elif meta == "struct":
        data = expr["data"]
        if not isinstance(data, PosDict):
            raise QAPIError(expr.value_info["data"], f"'data' of struct '{name}' must be an object")
        _check_members(data, "member", name)
    else:
        _check_arguments(meta, name, expr)
    # QEMU's check_flags(), after what the keys hold.
    if "allow-oob" in expr and expr["allow-oob"] is not True:
        raise QAPIError(expr.value_info["allow-oob"], "flag 'allow-oob' may only use true value")
    return meta, name


def check_keys(obj: PosDict, what: str, required: set[str], optional: set[str]) -> None:
    """QEMU's check_keys(): the keys missing, else the keys unknown, all of them
    in one message, sorted and quoted, with QEMU's second line naming the keys
    the object may have (the subset's: QEMU's others are unknown to it).

    A missing key is reported at the object, where QEMU reports both; unknown
    keys at the first one written, where an editor should take its user."""
    missing = required - obj.keys()
    if missing:
        raise QAPIError(obj.info, f"{what} misses key{_plural(missing)} {_listed(missing)}")
    allowed = required | optional
    unknown = [key for key in obj if key not in allowed]
    if unknown:
        raise QAPIError(obj.key_info[unknown[0]],
                        f"{what} has unknown key{_plural(unknown)} {_listed(unknown)}",
                        f"Valid keys are {_listed(allowed)}.")


def _plural(keys: Collection[str]) -> str:
    return "s" if len(keys) > 1 else ""


def _listed(keys: Iterable[str]) -> str:
    """``'a', 'b'``: sorted, as QEMU's pprint() lists them, cut after
    :data:`KEYS_LISTED`, saying how many there are."""
    ordered = sorted(keys)
    listed = ", ".join(f"'{key}'" for key in ordered[:KEYS_LISTED])
    if len(ordered) > KEYS_LISTED:
        listed += f", ... ({len(ordered):,} keys)"
    return listed


def _check_enum(name: str, expr: PosDict) -> None:
    """QEMU's check_enum(): an array of values, each a valid name.  That two
    collide is found later, as QEMU's QAPISchemaEnumType.check() finds it."""
    data = expr["data"]
    if not isinstance(data, PosList):
        raise QAPIError(expr.value_info["data"], f"'data' of enum '{name}' must be an array")
    for item, item_info in zip(data, data.item_info, strict=True):
        value, info = enum_value(item, item_info, name)
        check_value_name(value, name, info)


def enum_value(item: Value, info: SourceInfo, enum: str) -> tuple[str, SourceInfo]:
    """The name of an enum value, written ``'a'`` or ``{ 'name': 'a' }``, and
    where it is.

    QEMU's check_enum() takes both forms, the object one for a value's ``if``
    and ``features``; neither is in the subset, so those keys are unknown ones,
    as on a definition."""
    if not isinstance(item, PosDict):
        if not isinstance(item, str):
            raise QAPIError(info, f"value of enum '{enum}' requires a string name")
        return item, info
    check_keys(item, f"value of enum '{enum}'", {"name"}, set())
    name = item["name"]
    if not isinstance(name, str):
        raise QAPIError(item.value_info["name"], f"value of enum '{enum}' requires a string name")
    return name, item.value_info["name"]


def _check_arguments(meta: str, name: str, expr: PosDict) -> None:
    """QEMU's check_command() and check_event(): ``data`` is inline members or
    a type's name, ``returns`` a type's name or an array of one."""
    if "data" in expr:
        data = expr["data"]
        if isinstance(data, PosDict):
            _check_members(data, "parameter", name)
        elif not isinstance(data, str):
            raise QAPIError(expr.value_info["data"],
                            f"'data' of {meta} '{name}' should be an object or type name")
    if "returns" in expr:
        _check_type(expr["returns"], expr.value_info["returns"], f"'returns' of {meta} '{name}'")


def _check_members(data: PosDict, role: str, owner: str) -> None:
    """Each member's name (QEMU's check_type() with a dict) and the shape of
    its type, member by member.  Messages quote the key as written, ``*``
    and all, as QEMU's do here (not where the member is made: see .builder)."""
    for key, value in data.items():
        what = f"{role} '{key}' of '{owner}'"
        check_member_name(key.removeprefix("*"), what, data.key_info[key])
        _check_type(value, data.value_info[key], what)


def _check_type(value: Value, info: SourceInfo, what: str) -> None:
    """A type's name or an array of one, ``['T']`` (QEMU's check_type() and,
    since 8.1, its wording check_type_name_or_array())."""
    if isinstance(value, PosList):
        if len(value) != 1 or not isinstance(value[0], str):
            raise QAPIError(info, f"{what}: array type must contain single type name")
    elif not isinstance(value, str):
        raise QAPIError(info, f"{what} should be a type name or array")

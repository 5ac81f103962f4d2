"""What of a value a schema can tell apart: the smaller value jsonschema judges instead.

``jsonschema`` spends tens of microseconds on each array element (most of it
resolving the element schema's ``$ref`` afresh), so one valid request of
16,000 tokens, within every limit, took a third of a second to judge: an
``add-blocker`` whose ``modes`` repeats ``"normal"`` 8,000 times, or a
``migrate`` with 1,600 ``channels`` (which any role may send: arguments are
validated before the role is checked, as QEMU validates before it runs).
Meanwhile no other client was served.

An array whose schema says only ``type`` and ``items`` is valid exactly when
each of its *distinct* elements is, so :func:`distinct` keeps one of each; a
member whose schema accepts anything (QAPI's ``any``, ``{}``) can be any value
without changing the verdict, so it becomes ``null`` first, and ``channels``
that differ only in their ``addr`` collapse too.  A schema with any other
keyword (``minItems``, ``uniqueItems``, ``contains``, a ``$ref`` with
siblings ...) keeps its value whole, so the verdict is jsonschema's on a value
that is, for the schema, the same.  What remains for jsonschema is bounded by
the schema (four ``MigMode`` values, two channel types), not by the request.

Only the verdict is taken from the smaller value: the error to report is
found on the client's own value, so its paths (``modes[8178]``) are the ones
QEMU would name.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Final

#: Keywords that never change a verdict (a document's own, and annotations).
_ANNOTATIONS: Final = frozenset({
    "$schema", "$defs", "title", "description", "$comment", "default",
    "examples", "deprecated", "readOnly", "writeOnly",
})
_ARRAY: Final = _ANNOTATIONS | {"type", "items"}
_OBJECT: Final = _ANNOTATIONS | {"type", "properties", "required", "additionalProperties"}
_REF_PREFIX: Final = "#/$defs/"


#: What a schema does with a value: accepts anything, merges an array's
#: elements, goes into an object's members, or keeps the value whole.
_ANY, _ITEMS, _MEMBERS, _WHOLE = range(4)


class Distinct:
    """:meth:`value` for one schema document (its ``$defs`` resolve local refs)."""

    def __init__(self, defs: Mapping[str, Any]) -> None:
        self._defs = defs
        # id(schema) -> (schema, what to do, the resolved schema); the schema
        # is kept so that its id is never reused while the entry lives.
        self._plans: dict[int, tuple[object, int, Any]] = {}

    def value(self, schema: object, value: object) -> object:
        """``value`` with what ``schema`` cannot tell apart merged (see the module doc)."""
        plan = self._plans.get(id(schema))
        if plan is None:
            plan = self._plans[id(schema)] = (schema, *self._plan(schema))
        _, action, resolved = plan
        if action == _ANY:
            return None
        kind = type(value)
        if action == _ITEMS and kind is list:
            items = resolved["items"]
            kept: dict[Hashable, object] = {}
            for element in value:  # type: ignore[attr-defined]
                merged = self.value(items, element)
                kept.setdefault(value_key(merged), merged)
            return list(kept.values())
        if action == _MEMBERS and kind is dict:
            properties: Mapping[str, Any] = resolved.get("properties", {})
            return {
                name: self.value(properties[name], member) if name in properties else member
                for name, member in value.items()  # type: ignore[attr-defined]
            }
        return value

    def _plan(self, schema: object) -> tuple[int, Any]:
        schema = self._resolve(schema)
        if schema is True or (isinstance(schema, Mapping) and schema.keys() <= _ANNOTATIONS):
            return _ANY, schema
        if not isinstance(schema, Mapping):
            return _WHOLE, schema
        if "items" in schema and schema.keys() <= _ARRAY:
            return _ITEMS, schema
        if schema.keys() <= _OBJECT:
            return _MEMBERS, schema
        return _WHOLE, schema

    def _resolve(self, schema: object) -> object:
        # Only a bare local reference is followed: siblings of "$ref" would
        # apply too, and a value under such a schema is kept whole.
        for _ in range(64):
            if not (isinstance(schema, Mapping) and schema.keys() == {"$ref"}):
                break
            ref = schema["$ref"]
            if not (isinstance(ref, str) and ref.startswith(_REF_PREFIX)):
                break
            target = self._defs.get(ref[len(_REF_PREFIX):])
            if target is None:
                break
            schema = target
        return schema


def value_key(value: object) -> Hashable:
    """``value`` as a dict key: equal only to the same JSON value."""
    # The type goes with each value: True == 1 == 1.0 in Python, not in a schema.
    kind = type(value)
    if kind is list:
        return (list, tuple(value_key(item) for item in value))  # type: ignore[attr-defined]
    if kind is dict:
        return (dict, tuple((k, value_key(v)) for k, v in value.items()))  # type: ignore[attr-defined]
    return (kind, value)

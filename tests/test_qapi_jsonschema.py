"""Every generated JSON Schema agrees with the QAPI type it was generated from.

Values are built from the schema model (not from the JSON Schemas): values the
QAPI type admits must validate; values of the wrong shape (a wrong JSON type at
some member, an unknown member, a missing required member, a string that is
not an enum member) must not.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migblockd.qapi.builder import load_schema
from migblockd.qapi.schema import (
    ArrayType,
    BuiltinType,
    EnumType,
    ObjectType,
    QAPIType,
    Schema,
)

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "schema" / "generated"
SCHEMA = load_schema(ROOT / "schema" / "migblockd.json")
EMPTY: ObjectType = SCHEMA.the_empty_object_type

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)  # fmt: skip


def documents(schema: Schema) -> list[tuple[str, QAPIType]]:
    """(generated file, QAPI type it describes) for every generated document."""
    docs: list[tuple[str, QAPIType]] = []
    for name, cmd in schema.commands.items():
        docs.append((f"commands/{name}.arguments.json", cmd.arg_type or EMPTY))
        if cmd.ret_type is not None:
            docs.append((f"commands/{name}.returns.json", cmd.ret_type))
    for name, ev in schema.events.items():
        docs.append((f"events/{name}.json", ev.arg_type or EMPTY))
    return docs


DOCUMENTS = documents(SCHEMA)


@cache
def validator(rel: str) -> jsonschema.Draft202012Validator:
    doc = json.loads((GENERATED / rel).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(doc)
    return jsonschema.Draft202012Validator(doc)


# What QEMU's input visitor accepts for each integer type (qobject_input_type_int64
# and _uint64, which takes negative numbers and wraps them, then visit_type_intN).
INT_RANGES = {
    "int": (-(2**63), 2**63 - 1), "int64": (-(2**63), 2**63 - 1),
    "int8": (-128, 127), "int16": (-32768, 32767), "int32": (-(2**31), 2**31 - 1),
    "uint8": (0, 255), "uint16": (0, 65535), "uint32": (0, 2**32 - 1),
    "uint64": (-(2**63), 2**64 - 1), "size": (-(2**63), 2**64 - 1),
}  # fmt: skip


def values_of(typ: QAPIType) -> st.SearchStrategy[Any]:
    """Every JSON value the QAPI type admits (within small sizes)."""
    if isinstance(typ, BuiltinType) and typ.name in INT_RANGES:
        low, high = INT_RANGES[typ.name]
        return st.integers(low, high) | st.sampled_from([low, high])
    if isinstance(typ, BuiltinType):
        return {
            "string": st.text(max_size=8),
            "int": st.integers(),
            "number": st.integers() | st.floats(allow_nan=False, allow_infinity=False),
            "boolean": st.booleans(),
            "null": st.none(),
            "value": JSON_VALUES,
        }[typ.json_type()]
    if isinstance(typ, EnumType):
        return st.sampled_from(typ.value_names)
    if isinstance(typ, ArrayType):
        return st.lists(values_of(typ.element), max_size=3)
    assert isinstance(typ, ObjectType)
    return st.fixed_dictionaries(
        {m.name: values_of(m.type) for m in typ.members if not m.optional},
        optional={m.name: values_of(m.type) for m in typ.members if m.optional},
    )


# A value of some other JSON type, per JSON type the member has.
WRONG = {"string": 42, "int": "42", "number": "4.2", "boolean": 1, "null": 0,
         "array": {"a": 1}, "object": [1]}  # fmt: skip


def wrong_shapes(typ: QAPIType, value: Any) -> list[tuple[str, Any]]:
    """Variants of ``value`` (valid for ``typ``) that ``typ`` does not admit:
    one change each, anywhere in the value, with a label saying what it is."""
    out: list[tuple[str, Any]] = []
    if typ.json_type() != "value":
        out.append(("wrong JSON type", WRONG[typ.json_type()]))
    if isinstance(typ, BuiltinType) and typ.name in INT_RANGES:
        low, high = INT_RANGES[typ.name]
        out += [("below its range", low - 1), ("above its range", high + 1)]
    if isinstance(typ, EnumType):
        out.append(("not an enum member", "-".join(typ.value_names) + "-no"))
    elif isinstance(typ, ArrayType):
        for i, item in enumerate(value):
            for label, bad in wrong_shapes(typ.element, item):
                out.append((f"[{i}]: {label}", [*value[:i], bad, *value[i + 1 :]]))
    elif isinstance(typ, ObjectType):
        out.append(("unknown member", {**value, "x-not-a-member": 1}))
        for m in typ.members:
            if not m.optional:
                out.append((f"missing {m.name}", {k: v for k, v in value.items() if k != m.name}))
            if m.name in value:
                for label, bad in wrong_shapes(m.type, value[m.name]):
                    out.append((f".{m.name}: {label}", {**value, m.name: bad}))
    return out


@pytest.mark.parametrize(("rel", "typ"), DOCUMENTS, ids=[rel for rel, _ in DOCUMENTS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_schema_matches_qapi_type(rel: str, typ: QAPIType, data: st.DataObject) -> None:
    check = validator(rel)
    value = data.draw(values_of(typ), label="admitted value")
    assert check.is_valid(value), list(check.iter_errors(value))
    for label, bad in wrong_shapes(typ, value):
        assert not check.is_valid(bad), f"{label}: {bad!r} accepted"


def test_every_generated_file_is_covered() -> None:
    on_disk = {p.relative_to(GENERATED).as_posix() for p in GENERATED.rglob("*.json")}
    assert on_disk == {rel for rel, _ in DOCUMENTS} | {"qmp-schema.json"}


def test_every_shape_of_mistake_is_exercised() -> None:
    # The negative side must not be vacuous: each kind of mistake occurs.
    blocker = SCHEMA.types["BlockerInfo"]
    value = {"id": "a", "reason": "r", "modes": ["normal"], "internal": False,
             "scope": "daemon", "owner": {"pid": 1, "uid": 0, "gid": 0},
             "added": {"seconds": 1, "microseconds": 2}, "source": "migblockd"}  # fmt: skip
    labels = [label for label, _ in wrong_shapes(blocker, value)]
    assert "unknown member" in labels
    assert "missing reason" in labels
    assert ".modes: [0]: not an enum member" in labels
    assert ".owner: missing pid" in labels
    assert ".added: .seconds: wrong JSON type" in labels
    check = validator("events/BLOCKER_ADDED.json")
    assert check.is_valid(value)
    for label, bad in wrong_shapes(blocker, value):
        assert not check.is_valid(bad), label

"""Argument validation: QEMU's wording, first error in schema order."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from migblockd.qapi.jsonschema import integer_schema
from migblockd.qmp.errors import QMPError
from migblockd.qmp.qdict import EXACT_MEMBERS, unvisited_order
from migblockd.qmp.validation import ArgumentValidator

GENERATED = Path(__file__).resolve().parent.parent / "schema" / "generated" / "commands"

MIG_MODE = {"type": "string", "enum": ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]}

# Hand-written in the generator's conventions, so these tests do not depend on it.
ADD_BLOCKER: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "add-blocker arguments",
    "type": "object",
    "properties": {
        "reason": {"type": "string"},
        "modes": {"type": "array", "items": {"$ref": "#/$defs/MigMode"}},
        "internal": {"type": "boolean"},
        "id": {"type": "string"},
        "scope": {"$ref": "#/$defs/BlockerScope"},
    },
    "required": ["reason"],
    "additionalProperties": False,
    "$defs": {
        "MigMode": MIG_MODE,
        "BlockerScope": {"type": "string", "enum": ["daemon", "connection"]},
    },
}

NESTED: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "nested arguments",
    "type": "object",
    "properties": {
        "count": integer_schema("int"),
        "ratio": {"type": "number"},
        "parent": {"$ref": "#/$defs/Parent"},
        "list": {"type": "array", "items": {"$ref": "#/$defs/Child"}},
        "nothing": {"type": "null"},
        "anything": {},
        "last": {"type": "string"},
    },
    "required": ["parent", "last"],
    "additionalProperties": False,
    "$defs": {
        "Parent": {
            "type": "object",
            "properties": {"child": {"type": "string"}, "mode": {"$ref": "#/$defs/MigMode"}},
            "required": ["child"],
            "additionalProperties": False,
        },
        "Child": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "on": {"type": "boolean"}},
            "required": ["name", "on"],
            "additionalProperties": False,
        },
        "MigMode": MIG_MODE,
    },
}


def error(schema: dict[str, Any], args: dict[str, Any]) -> str:
    with pytest.raises(QMPError) as info:
        ArgumentValidator(schema).check(args)
    assert info.value.error_class == "GenericError"
    return info.value.desc


@pytest.mark.parametrize(
    "args",
    [
        {"reason": "r"},
        {"reason": "r", "modes": [], "internal": False, "id": "x", "scope": "connection"},
        {"reason": "", "modes": ["normal", "cpr-exec"]},
    ],
)
def test_valid_arguments(args: dict[str, Any]) -> None:
    ArgumentValidator(ADD_BLOCKER).check(args)


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({}, "Parameter 'reason' is missing"),
        ({"reason": 1}, "Invalid parameter type for 'reason', expected: string"),
        ({"reason": None}, "Invalid parameter type for 'reason', expected: string"),
        ({"reason": "r", "modes": "normal"}, "Invalid parameter type for 'modes', expected: array"),
        (
            {"reason": "r", "modes": ["normal", 7]},
            "Invalid parameter type for 'modes[1]', expected: string",
        ),
        (
            {"reason": "r", "modes": ["normal", "warp"]},
            "Parameter 'modes[1]' does not accept value 'warp'",
        ),
        (
            {"reason": "r", "internal": 1},
            "Invalid parameter type for 'internal', expected: boolean",
        ),
        ({"reason": "r", "scope": "galaxy"}, "Parameter 'scope' does not accept value 'galaxy'"),
        ({"reason": "r", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ],
)
def test_argument_errors(args: dict[str, Any], desc: str) -> None:
    assert error(ADD_BLOCKER, args) == desc


def test_first_error_in_schema_order_not_input_order() -> None:
    # input order puts scope first; schema order reports reason first
    assert error(ADD_BLOCKER, {"scope": "x", "internal": 3}) == "Parameter 'reason' is missing"
    assert (
        error(ADD_BLOCKER, {"scope": "x", "internal": 3, "reason": "r"})
        == "Invalid parameter type for 'internal', expected: boolean"
    )


def test_unexpected_only_when_nothing_else_is_wrong() -> None:
    assert error(ADD_BLOCKER, {"zzz": 1, "aaa": 2}) == "Parameter 'reason' is missing"
    assert (
        error(ADD_BLOCKER, {"zzz": 1, "reason": "r", "aaa": 2}) == "Parameter 'zzz' is unexpected"
    )


def test_of_several_unexpected_members_the_one_qemu_names() -> None:
    # qobject_input_check_struct() (qapi/qobject-input-visitor.c) names the first
    # member left in a glib hash table, whatever order they were sent in.
    for args in ({"reason": "r", "foo": 1, "bar": 2}, {"reason": "r", "bar": 1, "foo": 2}):
        assert error(ADD_BLOCKER, args) == "Parameter 'bar' is unexpected"
    for names in ("abc", "cba", "bca"):
        args = {"reason": "r", **dict.fromkeys(names, 1)}
        assert error(ADD_BLOCKER, args) == "Parameter 'b' is unexpected"


def test_of_eight_members_and_more_the_one_qemu_names() -> None:
    # From eight names on, glib's hash table grows (and moves its names), and
    # taking the known members may shrink it again (moving them once more).
    # What QEMU 7.2 answered (tests/test_qemu_differential.py sends these too).
    query = json.loads((GENERATED / "query-migrate.arguments.json").read_text())
    assert error(query, dict.fromkeys("abcdefghi", 1)) == "Parameter 'b' is unexpected"
    migrate = json.loads((GENERATED / "migrate.arguments.json").read_text())
    known = {"uri": "unix:/x", "blk": False, "inc": False, "detach": True, "resume": False}
    assert error(migrate, {**known, "a": 1, "b": 2, "e": 3}) == "Parameter 'e' is unexpected"


@pytest.mark.parametrize(
    ("args", "desc"),
    [
        ({"last": "x"}, "Parameter 'parent' is missing"),
        ({"parent": {}, "last": "x"}, "Parameter 'parent.child' is missing"),
        ({"parent": [], "last": "x"}, "Invalid parameter type for 'parent', expected: object"),
        (
            {"parent": {"child": 1}, "last": "x"},
            "Invalid parameter type for 'parent.child', expected: string",
        ),
        (
            {"parent": {"child": "c", "mode": "x"}, "last": "x"},
            "Parameter 'parent.mode' does not accept value 'x'",
        ),
        # a nested object's unexpected member is reported when that object is
        # visited, before later top-level members (QEMU visits depth first)
        ({"parent": {"child": "c", "extra": 1}}, "Parameter 'parent.extra' is unexpected"),
        (
            {"parent": {"child": "c"}, "list": [{"name": "a", "on": True}, {"name": "b"}]},
            "Parameter 'list[1].on' is missing",
        ),
        (
            {"parent": {"child": "c"}, "list": [{"name": "a", "on": "yes"}]},
            "Invalid parameter type for 'list[0].on', expected: boolean",
        ),
        (
            {"parent": {"child": "c"}, "list": [{"name": "a", "on": True, "x": 0}], "last": "l"},
            "Parameter 'list[0].x' is unexpected",
        ),
        (
            {"parent": {"child": "c"}, "list": [3]},
            "Invalid parameter type for 'list[0]', expected: object",
        ),
        (
            {"parent": {"child": "c"}, "nothing": 0, "last": "l"},
            "Invalid parameter type for 'nothing', expected: null",
        ),
        ({"parent": {"child": "c"}}, "Parameter 'last' is missing"),
    ],
)
def test_nested_paths(args: dict[str, Any], desc: str) -> None:
    assert error(NESTED, args) == desc


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (1, True),
        (-(1 << 63), True),
        ((1 << 63) - 1, True),
        (1 << 63, False),  # QEMU: a QNum uint64 above INT64_MAX is no int64
        (-(1 << 63) - 1, False),  # QEMU keeps it only as a double
        (1.0, False),  # QEMU: a QNum double is not an int
        (True, False),
        ("1", False),
    ],
)
def test_integer_is_a_json_integer(value: object, ok: bool) -> None:
    args = {"parent": {"child": "c"}, "last": "l", "count": value}
    validator = ArgumentValidator(NESTED)
    if ok:
        validator.check(args)
    else:
        assert error(NESTED, args) == "Invalid parameter type for 'count', expected: integer"


def _integer_schema(qapi_type: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"n": integer_schema(qapi_type)},
            "additionalProperties": False}


INTEGER_CASES = [
    # (QAPI type, value, QEMU's desc or None), from qobject_input_type_int64(),
    # qobject_input_type_uint64() and visit_type_intN()/visit_type_uintN().
    ("int8", -128, None), ("int8", 127, None),
    ("int8", 128, "Parameter 'n' expects int8_t"),
    ("int8", -129, "Parameter 'n' expects int8_t"),
    ("int8", 1 << 63, "Invalid parameter type for 'n', expected: integer"),
    ("int8", "1", "Invalid parameter type for 'n', expected: integer"),
    ("int32", (1 << 31) - 1, None), ("int32", 1 << 31, "Parameter 'n' expects int32_t"),
    ("uint8", 255, None), ("uint8", 0, None),
    ("uint8", 256, "Parameter 'n' expects uint8_t"),
    ("uint8", -1, "Parameter 'n' expects uint8_t"),  # wraps to 2^64 - 1
    ("uint8", 1.0, "Parameter 'n' expects uint64"),
    ("uint8", "1", "Parameter 'n' expects uint64"),
    ("uint64", (1 << 64) - 1, None), ("uint64", -1, None), ("uint64", -(1 << 63), None),
    ("uint64", 1 << 64, "Parameter 'n' expects uint64"),
    ("uint64", -(1 << 63) - 1, "Parameter 'n' expects uint64"),
    ("uint64", True, "Parameter 'n' expects uint64"),
    ("size", (1 << 64) - 1, None), ("size", "1", "Parameter 'n' expects uint64"),
    ("int", 1 << 63, "Invalid parameter type for 'n', expected: integer"),
]  # fmt: skip


@pytest.mark.parametrize(("qapi_type", "value", "desc"), INTEGER_CASES)
def test_integer_types_follow_qemus_visitor(qapi_type: str, value: object,
                                            desc: str | None) -> None:
    schema = _integer_schema(qapi_type)
    validator = ArgumentValidator(schema)
    assert validator.judge({"n": value}) == desc
    # Cached or not, the verdict is the same.
    for _ in range(2):
        if desc is None:
            validator.check({"n": value})
        else:
            with pytest.raises(QMPError) as exc:
                validator.check({"n": value})
            assert exc.value.desc == desc


@pytest.mark.parametrize(("value", "ok"), [(1, True), (1.5, True), (True, False), ("1", False)])
def test_number_accepts_integers_and_floats(value: object, ok: bool) -> None:
    args = {"parent": {"child": "c"}, "last": "l", "ratio": value}
    if ok:
        ArgumentValidator(NESTED).check(args)
    else:
        assert error(NESTED, args) == "Invalid parameter type for 'ratio', expected: number"


def test_any_accepts_anything() -> None:
    for value in (None, 1, "s", [1, {}], {"a": None}):
        ArgumentValidator(NESTED).check({"parent": {"child": "c"}, "last": "l", "anything": value})


def test_valid_arguments_pass_and_invalid_ones_raise() -> None:
    validator = ArgumentValidator(ADD_BLOCKER)
    with pytest.raises(QMPError, match=r"^Invalid parameter type for 'reason', expected: string$"):
        validator.check({"reason": 1})
    validator.check({"reason": "r"})


# -- against the generated schemas ----------------------------------------------------


def generated(name: str) -> dict[str, Any]:
    path = GENERATED / f"{name}.arguments.json"
    if not path.exists():
        pytest.skip(f"{path} not generated yet")
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def test_generated_qmp_capabilities_enum_error() -> None:
    schema = generated("qmp_capabilities")
    assert error(schema, {"enable": ["foo"]}) == "Parameter 'enable[0]' does not accept value 'foo'"
    assert (
        error(schema, {"enable": "oob"}) == "Invalid parameter type for 'enable', expected: array"
    )
    ArgumentValidator(schema).check({"enable": ["oob"]})
    ArgumentValidator(schema).check({})


def test_generated_add_blocker_matches_hand_written() -> None:
    schema = generated("add-blocker")
    for args in (
        {},
        {"reason": 1},
        {"reason": "r", "modes": ["normal", "x"]},
        {"reason": "r", "z": 1},
    ):
        assert error(schema, args) == error(ADD_BLOCKER, args)
    ArgumentValidator(schema).check({"reason": "r", "modes": ["cpr-reboot"], "scope": "connection"})


def test_generated_migrate_set_capabilities_nested() -> None:
    schema = generated("migrate-set-capabilities")
    assert error(schema, {}) == "Parameter 'capabilities' is missing"
    assert (
        error(schema, {"capabilities": [{"capability": "events"}]})
        == "Parameter 'capabilities[0].state' is missing"
    )
    assert (
        error(schema, {"capabilities": [{"capability": "x", "state": True}]})
        == "Parameter 'capabilities[0].capability' does not accept value 'x'"
    )


def test_generated_migrate_set_parameters_checks_in_qemus_member_order() -> None:
    # QEMU's MigrateSetParameters (qapi/migration.json) has mode, added in 8.2,
    # after max-bandwidth and downtime-limit; its input visitor checks the
    # members in that order, so of two bad ones it names the limit.
    schema = generated("migrate-set-parameters")
    assert error(schema, {"mode": 5, "downtime-limit": "x"}) \
        == "Parameter 'downtime-limit' expects uint64"
    assert error(schema, {"mode": "x", "max-bandwidth": "y"}) \
        == "Parameter 'max-bandwidth' expects uint64"
    assert error(schema, {"mode": "x", "downtime-limit": 1}) \
        == "Parameter 'mode' does not accept value 'x'"


def test_every_generated_schema_compiles_and_reports_in_order() -> None:
    paths = sorted(GENERATED.glob("*.arguments.json"))
    if not paths:
        pytest.skip("schemas not generated yet")
    for path in paths:
        schema = json.loads(path.read_text())
        validator = ArgumentValidator(schema)
        required = schema.get("required", [])
        if required:
            assert error(schema, {}) == f"Parameter '{required[0]}' is missing", path.name
        else:
            validator.check({})
            assert (
                error(schema, {"no-such-member": 1}) == "Parameter 'no-such-member' is unexpected"
            )


# -- what jsonschema is given to judge ------------------------------------------------


def _judged(schema: dict[str, Any], args: dict[str, Any],
            monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What ``check(args)`` hands jsonschema's ``is_valid`` (once per call)."""
    validator = ArgumentValidator(schema)
    seen: list[object] = []
    real = validator._validator

    class Spy:
        def is_valid(self, instance: object) -> bool:
            seen.append(instance)
            return bool(real.is_valid(instance))

        def iter_errors(self, instance: object) -> Any:
            return real.iter_errors(instance)

    monkeypatch.setattr(validator, "_validator", Spy())
    with contextlib.suppress(QMPError):
        validator.check(args)
    return seen


def test_jsonschema_judges_each_distinct_array_element_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 8,000 valid elements cost jsonschema a third of a second, during which
    # no other client was served: it is given the distinct ones.
    args = {"reason": "r", "modes": ["normal", "cpr-exec"] * 4000}
    assert _judged(generated("add-blocker"), args, monkeypatch) == [
        {"reason": "r", "modes": ["normal", "cpr-exec"]}]


def test_members_that_accept_anything_do_not_keep_elements_apart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # migrate is validated before its role is checked, so any client may send
    # it; addr is QAPI's 'any'.
    channels = [{"channel-type": "main", "addr": {"n": [i]}} for i in range(2000)]
    assert _judged(generated("migrate"), {"channels": channels}, monkeypatch) == [
        {"channels": [{"channel-type": "main", "addr": None}]}]


@pytest.mark.parametrize(
    "keyword", [{"minItems": 3}, {"maxItems": 1}, {"uniqueItems": True}, {"contains": {}}])
def test_arrays_with_other_keywords_are_judged_whole(
        keyword: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    schema = {"type": "object",
              "properties": {"l": {"type": "array", "items": {"type": "integer"}, **keyword}}}
    assert _judged(schema, {"l": [1, 1]}, monkeypatch) == [{"l": [1, 1]}]


def test_merging_keeps_json_types_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    # True == 1 == 1.0 in Python; not for the schema.
    schema = {"type": "object",
              "properties": {"l": {"type": "array", "items": {"type": "integer"}}}}
    assert _judged(schema, {"l": [1, True, 1.0, 1]}, monkeypatch) == [{"l": [1, True, 1.0]}]
    assert error(schema, {"l": [1, 1, True]}) == (
        "Invalid parameter type for 'l[2]', expected: integer")


def test_verdicts_and_paths_are_the_whole_values() -> None:
    schema = generated("add-blocker")
    ArgumentValidator(schema).check({"reason": "r", "modes": ["normal"] * 8000})
    assert error(schema, {"reason": "r", "modes": ["normal"] * 8000 + ["zz"]}) == (
        "Parameter 'modes[8000]' does not accept value 'zz'")
    migrate = generated("migrate")
    bad = [{"channel-type": "main", "addr": i} for i in range(100)] + [{"channel-type": "x"}]
    assert error(migrate, {"channels": bad}) == (
        "Parameter 'channels[100].channel-type' does not accept value 'x'")


def test_past_exact_members_the_first_unexpected_member_sent_is_named() -> None:
    # Modelling QEMU's hash tables costs 10-40 µs a member: a hostile request
    # of thousands would hold the event loop.  Up to the bound the model holds.
    query = json.loads((GENERATED / "query-migrate.arguments.json").read_text())
    names = [f"k{i}" for i in range(EXACT_MEMBERS)]
    assert error(query, dict.fromkeys(names, 1)) == "Parameter 'k63' is unexpected"
    names.append("k64")
    assert error(query, dict.fromkeys(names, 1)) == "Parameter 'k0' is unexpected"
    assert unvisited_order(names) == names

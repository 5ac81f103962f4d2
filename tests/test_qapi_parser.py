"""Parser and semantic checks of the QAPI generator, on good and bad inputs.

Each ``tests/qapi_cases/bad-*.json`` has a ``.err`` file with the exact
message (QEMU's ``tests/qapi-schema`` layout); paths in messages are relative
because the tests run from that directory, as QEMU's do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from migblockd.qapi.builder import load_schema
from migblockd.qapi.error import QAPIError
from migblockd.qapi.introspect import introspect
from migblockd.qapi.jsonschema import arguments_schema, integer_schema
from migblockd.qapi.parser import MAX_INCLUDE_DEPTH, MAX_NESTING, parse_schema
from migblockd.qapi.schema import ArrayType, EnumType, ObjectType

CASES = Path(__file__).parent / "qapi_cases"
BAD = sorted(p.name for p in CASES.glob("bad-*.json"))


def test_every_bad_case_has_an_expected_message() -> None:
    assert len(BAD) > 40
    for name in BAD:
        assert (CASES / name).with_suffix(".err").is_file(), name


@pytest.mark.parametrize("name", BAD)
def test_bad_schema_reports_file_line_col(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES)
    expected = (CASES / name).with_suffix(".err").read_text().strip()
    with pytest.raises(QAPIError) as exc:
        load_schema(name)
    assert str(exc.value) == expected
    # The structured parts agree with the text.
    info = exc.value.info
    assert expected.startswith(f"{info.fname}:{info.line}:{info.col}: ")


# A few messages spelled out here too, so that the golden files above cannot
# drift unnoticed on the cases that matter most.
KEY_MESSAGES = {
    "bad-unknown-type.json": "10:48: member 'b' of 'Foo' uses unknown type 'Bogus'",
    "bad-duplicate-definition.json": ("16:11: 'En' is already defined\n"
                                      "bad-duplicate-definition.json:8:11: previous definition"),
    "bad-member-undocumented.json": "8:42: member 'b' of 'Foo' lacks documentation",
    "bad-documented-member-missing.json": "8:1: documented member 'b' does not exist",
    "bad-definition-undocumented.json": "1:1: documentation comment required",
    "bad-stray-after-tab.json": "1:17: stray 'Foo'",
    "bad-missing-comma.json": "2:3: expected ',' or '}'",
    "bad-doc-unterminated.json": "3:1: documentation comment must end with '##'",
}


@pytest.mark.parametrize(("name", "message"), KEY_MESSAGES.items())
def test_key_messages(name: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES)
    with pytest.raises(QAPIError) as exc:
        load_schema(name)
    assert str(exc.value) == f"{name}:{message}"


def test_error_in_included_file_names_that_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES)
    with pytest.raises(QAPIError) as exc:
        load_schema("bad-include-error.json")
    assert str(exc.value) == "sub/bad-sub.json:3:16: expected ',' or '}'"


def test_good_schema_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES)
    schema = load_schema("good-everything.json")
    # Included once although included twice; main module's definitions after it.
    assert list(schema.types) == ["En", "Colour", "Paint"]
    assert list(schema.commands) == ["paint-wall", "legacy_cmd", "repaint"]
    assert list(schema.events) == ["WALL_PAINTED", "NOTHING"]

    colour = schema.types["Colour"]
    assert isinstance(colour, EnumType)
    assert colour.value_names == ("red", "light-blue")
    assert colour.values[1].doc == "The colour of the sky,\non a clear day."

    paint = schema.types["Paint"]
    assert isinstance(paint, ObjectType)
    assert [(m.name, m.type.name, m.optional) for m in paint.members] == [
        ("colour", "Colour", False),
        ("litres", "uint32", True),
        ("tags", "strList", True),
        ("extra", "any", True),
    ]
    assert paint.doc is not None
    assert paint.doc.body == "A pot of paint.\n\nLonger description, second paragraph."

    wall = schema.commands["paint-wall"]
    assert wall.allow_oob
    assert wall.arg_type is not None and wall.arg_type.implicit
    assert isinstance(wall.ret_type, ArrayType) and wall.ret_type.element is paint
    errors = wall.doc.section("Errors")
    assert errors is not None and errors.text == "- GenericError when there is no wall."
    # 'data': {} means no arguments at all; a named struct is used as is.
    assert schema.commands["legacy_cmd"].arg_type is None
    assert schema.commands["repaint"].arg_type is paint
    assert schema.events["NOTHING"].arg_type is None


def test_parser_keeps_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES)
    parsed = parse_schema("good-everything.json")
    assert parsed.modules == ["good-everything.json", "sub/good-sub.json"]
    assert parsed.pragmas.command_name_exceptions == ["legacy_cmd"]
    colour = next(d for d in parsed.definitions if d.expr.get("enum") == "Colour")
    assert (colour.info.line, colour.info.col) == (27, 1)
    # The tab before 'data' advances to column 9.
    assert colour.expr.key_info["data"].line == 28
    assert colour.expr.key_info["data"].col == 9



@pytest.mark.parametrize("opening", ["[", "{'a': "])
def test_deep_nesting_is_an_error_at_its_position(opening: str, tmp_path: Path) -> None:
    # Reading is recursive: without a limit, a few thousand levels ended in a
    # RecursionError traceback instead of FILE:LINE:COL: message.
    closing = "]" if opening == "[" else "}"
    schema = tmp_path / "deep.json"
    for depth, error in ((MAX_NESTING, False), (MAX_NESTING + 1, True), (5000, True)):
        inner = opening * (depth - 1) + "'a'" + closing * (depth - 1)
        schema.write_text("{ 'x': " + inner + " }\n")
        if not error:
            parse_schema(schema)
            continue
        with pytest.raises(QAPIError) as exc:
            parse_schema(schema)
        col = 1 + len("{ 'x': ") + len(opening) * (MAX_NESTING - 1)
        assert str(exc.value) == (
            f"{schema}:1:{col}: value nested more than {MAX_NESTING} levels deep")


def test_deep_include_chain_is_an_error_at_the_include(tmp_path: Path) -> None:
    # Each include is read by a nested parser: a long enough chain of them
    # also ended in a RecursionError traceback.
    def chain(length: int) -> Path:
        for i in range(length):
            (tmp_path / f"f{i}.json").write_text(f"{{ 'include': 'f{i + 1}.json' }}\n")
        (tmp_path / f"f{length}.json").write_text("")
        return tmp_path / "f0.json"

    parse_schema(chain(MAX_INCLUDE_DEPTH))
    for length in (MAX_INCLUDE_DEPTH + 1, 1500):
        with pytest.raises(QAPIError) as exc:
            parse_schema(chain(length))
        assert str(exc.value) == (f"{tmp_path}/f{MAX_INCLUDE_DEPTH}.json:1:14: "
                                  f"includes nested more than {MAX_INCLUDE_DEPTH} levels deep")


def _one_definition(tmp_path: Path, meta: str, name: str, member: str = "a") -> Path:
    data = {"enum": f"[ '{member}' ]", "struct": f"{{ '{member}': 'str' }}",
            "command": f"{{ '{member}': 'str' }}", "event": f"{{ '{member}': 'str' }}"}[meta]
    schema = tmp_path / "x.json"
    schema.write_text(f"##\n# @{name}:\n#\n# Text.\n#\n# @{member}: m\n##\n"
                      f"{{ '{meta}': '{name}', 'data': {data} }}\n")
    return schema


@pytest.mark.parametrize(("meta", "name", "member"), [
    ("struct", "x-Paint", "a"), ("enum", "X-Colour", "x-red"), ("event", "x-WALL_PAINTED", "a"),
    ("event", "X-WALL_PAINTED", "a"), ("command", "X-paint", "X-litres"),
    ("struct", "Paint", "X-litres"), ("enum", "Colour", "X-red"),
])
def test_the_experimental_prefix_is_left_out_of_the_case_rules(
        meta: str, name: str, member: str, tmp_path: Path) -> None:
    # QEMU's check_name_str() (scripts/qapi/expr.py) takes an "x-" off the
    # name, in either case (its valid_name ignores case), and judges the case of
    # what remains: "x-" marks any name experimental (qapi-code-gen.rst).
    # migblockd's generator judged the whole name, and refused "x-Paint" as
    # not CamelCase and an event "X-WALL_PAINTED" for its "-".
    load_schema(_one_definition(tmp_path, meta, name, member))


@pytest.mark.parametrize(("meta", "name", "member", "message"), [
    ("struct", "x-paint", "a", "name of struct 'x-paint' must use CamelCase"),
    ("event", "x-Wall", "a", "name of event 'x-Wall' must not use lowercase or '-'"),
    ("command", "x-Paint", "a", "name of command 'x-Paint' must not use uppercase or '_'"),
    ("struct", "Paint", "x-Litres", "name of member 'x-Litres' of 'Paint' must not use "
                                    "uppercase or '_'"),
    ("enum", "Colour", "x-Red", "value 'x-Red' of enum 'Colour' must not use uppercase or '_'"),
])
def test_what_follows_the_experimental_prefix_keeps_the_case_rules(
        meta: str, name: str, member: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(QAPIError) as exc:
        load_schema(_one_definition(tmp_path, meta, name, member))
    assert exc.value.msg == message


def _doc(name: str, *members: str) -> str:
    lines = "".join(f"# @{m}: {m}\n" for m in members)
    return f"##\n# @{name}:\n#\n# Text.\n#\n{lines}##\n"


def test_a_list_name_is_the_array_qemu_defines_under_it(tmp_path: Path) -> None:
    # QEMU names the array of T "TList" and defines it as a type like any
    # other (scripts/qapi/schema.py): for each built-in type before the schema
    # is read (_def_builtin_type()), for any other T wherever ['T'] is written
    # (_make_array_type()), so 'strList' and 'PaintList' are names a member or
    # a return may use.  migblockd's generator refused them as unknown types.
    schema_file = tmp_path / "x.json"
    schema_file.write_text(
        _doc("Paint", "tags", "sizes", "more")
        + "{ 'struct': 'Paint', 'data': { 'tags': 'strList', 'sizes': [ 'uint8' ],"
          " 'more': [ 'str' ] } }\n"
        + _doc("Shelf", "paints") + "{ 'struct': 'Shelf', 'data': { 'paints': [ 'Paint' ] } }\n"
        + _doc("list-paints") + "{ 'command': 'list-paints', 'returns': 'PaintList' }\n"
        + _doc("list-sizes", "sizes")
        + "{ 'command': 'list-sizes', 'data': { 'sizes': 'uint8List' } }\n")
    schema = load_schema(schema_file)
    paint, shelf = schema.types["Paint"], schema.types["Shelf"]
    assert isinstance(paint, ObjectType) and isinstance(shelf, ObjectType)
    tags, sizes, more = (m.type for m in paint.members)
    assert isinstance(tags, ArrayType) and tags.element is schema.builtins["str"]
    # One array type, however it is written: the back ends see one type.
    assert more is tags
    ret = schema.commands["list-paints"].ret_type
    assert ret is shelf.members[0].type
    assert isinstance(ret, ArrayType) and ret.element is paint
    arg = schema.commands["list-sizes"].arg_type
    assert arg is not None and arg.members[0].type is sizes
    info = {e["name"]: e for e in introspect(schema)}
    assert info["[str]"] == {"name": "[str]", "meta-type": "array", "element-type": "str"}
    assert arguments_schema(arg, "t")["properties"]["sizes"] == {
        "type": "array", "items": integer_schema("uint8")}


def test_a_name_defined_twice_points_back_at_the_first(tmp_path: Path) -> None:
    # QEMU's QAPISchema._def_entity() (scripts/qapi/schema.py) adds a line
    # saying where the first definition is (its tests/qapi-schema/
    # redefined-type.err); migblockd's generator said only the second's place.
    sub, root = tmp_path / "sub.json", tmp_path / "root.json"
    sub.write_text(_doc("Paint", "a") + "{ 'struct': 'Paint', 'data': { 'a': 'str' } }\n")
    root.write_text("{ 'include': 'sub.json' }\n"
                    + _doc("Paint", "b") + "{ 'struct': 'Paint', 'data': { 'b': 'str' } }\n")
    with pytest.raises(QAPIError) as exc:
        load_schema(root)
    assert (exc.value.msg, exc.value.hint) == ("'Paint' is already defined",
                                               f"{sub}:8:13: previous definition")
    assert str(exc.value) == (f"{root}:9:13: 'Paint' is already defined\n"
                              f"{sub}:8:13: previous definition")
    # One line, where one line is all there is room for (the daemon's start).
    assert exc.value.line() == (f"{root}:9:13: 'Paint' is already defined. "
                                f"{sub}:8:13: previous definition")


def test_a_list_name_of_a_type_no_array_is_written_of_is_unknown(tmp_path: Path) -> None:
    # QEMU defines "PaintList" only when ['Paint'] is written somewhere; then
    # it is an unknown type, as any other undefined name.
    schema_file = tmp_path / "x.json"
    schema_file.write_text(
        _doc("Paint", "a") + "{ 'struct': 'Paint', 'data': { 'a': 'str' } }\n"
        + _doc("Shelf", "paints") + "{ 'struct': 'Shelf', 'data': { 'paints': 'PaintList' } }\n")
    with pytest.raises(QAPIError) as exc:
        load_schema(schema_file)
    assert exc.value.msg == "member 'paints' of 'Shelf' uses unknown type 'PaintList'"


@pytest.mark.parametrize("depth", [2, MAX_NESTING + 1, 1100])
def test_an_array_of_arrays_is_refused_where_qemu_fails_on_it(depth: int,
                                                              tmp_path: Path) -> None:
    # QEMU's QAPISchemaArrayType.check() (scripts/qapi/schema.py) asserts that
    # an array's element is no array: ['strList'] ends its generator in an
    # AssertionError, where the array of 'strList' is checked, as the definition
    # writing it first is.  migblockd's generator took arrays of arrays, nested by
    # list names up to 32 deep.  A long chain of names is still no recursion.
    members = ", ".join(f"'m{i}': [ 'str{'List' * i}' ]" for i in range(depth))
    schema_file = tmp_path / "x.json"
    schema_file.write_text(
        _doc("Paint", "deep", *(f"m{i}" for i in range(depth)))
        + f"{{ 'struct': 'Paint', 'data': {{ 'deep': 'str{'List' * depth}', {members} }} }}\n")
    with pytest.raises(QAPIError) as exc:
        load_schema(schema_file)
    line = schema_file.read_text().splitlines()[-1]
    assert (exc.value.info.line, exc.value.info.col) == (
        len(schema_file.read_text().splitlines()), line.index("'strList' ]") + 1)
    assert exc.value.msg == "struct 'Paint': array type ['strList'] cannot take array type ['str']"


def test_an_array_of_arrays_named_first_is_refused_where_written(tmp_path: Path) -> None:
    # bad-array-of-array-named-before.json with its unknown type fixed: QEMU
    # fails on the array of 'strList' where ['strList'] is written, not where
    # the name 'strListList' of that array is used, before it.
    source = (CASES / "bad-array-of-array-named-before.json").read_text()
    schema_file = tmp_path / "x.json"
    schema_file.write_text(source.replace("'Bogus'", "'str'"))
    with pytest.raises(QAPIError) as exc:
        load_schema(schema_file)
    where = source.splitlines().index("{ 'command': 'put', 'data': { 'b': [ 'strList' ] } }")
    assert (exc.value.info.line, exc.value.info.col) == (where + 1, 38)
    assert exc.value.msg == "command 'put': array type ['strList'] cannot take array type ['str']"


def test_an_empty_type_name_is_no_data_and_no_return_as_in_qemu(tmp_path: Path) -> None:
    # QEMU's QAPISchemaCommand.check() and QAPISchemaEvent.check()
    # (scripts/qapi/schema.py) resolve 'data' and 'returns' only when the name
    # is true: '' is none, as a missing key is.  migblockd's generator refused
    # "'data' of command 'foo' uses unknown type ''".
    schema_file = tmp_path / "x.json"
    schema_file.write_text(
        _doc("foo") + "{ 'command': 'foo', 'data': '', 'returns': '' }\n"
        + _doc("FOO") + "{ 'event': 'FOO', 'data': '' }\n")
    schema = load_schema(schema_file)
    foo, event = schema.commands["foo"], schema.events["FOO"]
    assert (foo.arg_type, foo.ret_type, event.arg_type) == (None, None, None)
    assert arguments_schema(foo.arg_type, "foo")["properties"] == {}
    info = {e["name"]: e for e in introspect(schema)}
    assert info[info["foo"]["arg-type"]] == {"name": info["foo"]["arg-type"],
                                            "meta-type": "object", "members": []}
    assert info[info["FOO"]["arg-type"]]["members"] == []


def test_an_empty_type_name_of_a_member_is_an_unknown_type(tmp_path: Path) -> None:
    # Where QEMU resolves the name whatever it is, '' is an unknown type there too.
    schema_file = tmp_path / "x.json"
    schema_file.write_text(_doc("Paint", "a") + "{ 'struct': 'Paint', 'data': { 'a': '' } }\n")
    with pytest.raises(QAPIError) as exc:
        load_schema(schema_file)
    assert exc.value.msg == "member 'a' of 'Paint' uses unknown type ''"

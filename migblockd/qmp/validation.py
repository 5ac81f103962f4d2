"""Command argument validation: JSON Schema in, QEMU-worded errors out.

QEMU checks a command's arguments with the generated QAPI visitor, which walks
the schema's members *in schema order* and stops at the first problem; only
after every member of an object was visited does it complain about members
the schema does not know.  So the error a client sees is the first one in
schema order, worded by ``qapi/qobject-input-visitor.c`` and
``qapi/qapi-visit-core.c``:

======================  ================================================
required member absent  ``Parameter 'NAME' is missing``
wrong JSON type         ``Invalid parameter type for 'NAME', expected: TYPE``
enum non-member         ``Parameter 'NAME' does not accept value 'VALUE'``
unknown member          ``Parameter 'NAME' is unexpected``
======================  ================================================

``NAME`` is a path: ``parent.child`` for nested members, ``list[3]`` for list
elements (QEMU itself names list elements ``null`` in the enum message;
migblockd names them properly, e.g. ``Parameter 'enable[0]' does not accept
value 'foo'``).  ``TYPE`` is ``string``, ``integer``, ``number``,
``boolean``, ``null``, ``object`` or ``array``.

Types follow QEMU, not JSON Schema's defaults: an ``integer`` must be a JSON
integer (``1.0`` is a number, and ``true`` is not an integer either), within
the 64-bit range QEMU's parser keeps as an integer; anything larger is a
floating-point number to QEMU and fails the same way.

:class:`ArgumentValidator` decides validity with ``jsonschema``'s
``Draft202012Validator`` (with the type rules above), built once per command.
Only when that says no does it find the error to report: a tree of small
checking functions, compiled once from the schema, walks the value in schema
order and stops at the first error, building its path only then.  It covers
exactly the keywords the QAPI generator emits (``type``, ``enum`` of strings,
``properties``, ``required``, ``additionalProperties``, ``items`` and local
``$ref``); for anything else a slower walk over the schema does the same.

``jsonschema`` spends tens of microseconds per array element (four to six
seconds on one valid 1 MiB request of 170,000 elements, during which no other
client would be served); the codec's token-count limit is what bounds that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from migblockd.qmp.errors import QMPError

_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1  # QEMU keeps uint64 values as integers too


def _is_integer(checker: object, instance: object) -> bool:
    return type(instance) is int and _INT_MIN <= instance <= _INT_MAX


def _is_number(checker: object, instance: object) -> bool:
    return type(instance) is float or _is_integer(checker, instance)


_TYPE_CHECKER = Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"integer": _is_integer, "number": _is_number}
)
QAPIValidator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, type_checker=_TYPE_CHECKER
)

# How each JSON Schema type is tested here, and QEMU's name for it in
# "Invalid parameter type ..., expected: TYPE".
_TYPE_TESTS: Final[dict[str, Callable[[object], bool]]] = {
    "string": lambda v: type(v) is str,
    "integer": lambda v: _is_integer(None, v),
    "number": lambda v: _is_number(None, v),
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
}


class ArgumentValidator:
    """Checks one command's ``arguments`` object against its JSON Schema.

    ``schema`` follows the generator's conventions: an object schema with
    ``properties`` in schema order, ``required``, ``additionalProperties:
    false`` and ``$defs`` reached by ``{"$ref": "#/$defs/Name"}``.
    Build it once (at start) and call :meth:`check` per request.
    """

    def __init__(self, schema: Mapping[str, Any]) -> None:
        QAPIValidator.check_schema(schema)
        self.schema = schema
        self._validator = QAPIValidator(schema)
        self._defs: Mapping[str, Any] = schema.get("$defs", {})
        # With nothing required, an empty arguments object (the common case
        # for queries) is valid without asking jsonschema.
        self._empty_ok = not schema.get("required") and set(schema) <= {
            "$schema", "$id", "title", "description", "type", "properties",
            "additionalProperties", "$defs",
        }
        #: The compiled check, or None when the schema uses a keyword it does not cover.
        self.compiled: _Check | None = _Compiler(schema).compile_root()

    def check(self, args: dict[str, Any]) -> None:
        """Return if ``args`` is valid, else raise :class:`QMPError` for the first error."""
        if not args and self._empty_ok:
            return
        # jsonschema decides what is valid; the compiled walk only words the
        # first error the way QEMU would.  (The codec's token limit bounds
        # jsonschema's cost per request.)
        if self._validator.is_valid(args):
            return
        if self.compiled is not None:
            failure = self.compiled(args)
            if failure is not None:
                raise QMPError(failure.desc())
        raise QMPError(self.first_error(args))

    def is_valid(self, args: dict[str, Any]) -> bool:
        if self.compiled is not None:
            return self.compiled(args) is None
        return bool(self._validator.is_valid(args))

    def first_error(self, args: object) -> str:
        """The desc of the first error in schema order (``args`` must be invalid)."""
        desc = self._walk(self.schema, args, "")
        if desc is not None:
            return desc
        # A keyword the walk does not cover (the generator emits none today).
        error = best_match(self._validator.iter_errors(args))
        path = _path(list(error.absolute_path)) if error is not None else ""
        reason = error.message if error is not None else "is invalid"
        if path:
            return f"Parameter '{path}' is invalid: {reason}"
        return f"Invalid arguments: {reason}"

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in schema and seen < 64:
            ref: str = schema["$ref"]
            prefix = "#/$defs/"
            if not ref.startswith(prefix):
                break
            schema = self._defs[ref[len(prefix) :]]
            seen += 1
        return schema

    def _walk(self, schema: Mapping[str, Any] | bool, value: object, path: str) -> str | None:
        if schema is True or schema is False:
            return None if schema else f"Parameter '{path}' is unexpected"
        schema = self._resolve(schema)
        expected = schema.get("type")
        if expected is not None:
            names = [expected] if isinstance(expected, str) else list(expected)
            if not any(_TYPE_TESTS[name](value) for name in names if name in _TYPE_TESTS):
                return f"Invalid parameter type for '{path or 'null'}', expected: {names[0]}"
        enum = schema.get("enum")
        if enum is not None and value not in enum:
            return f"Parameter '{path or 'null'}' does not accept value '{value}'"
        if type(value) is dict:
            properties: Mapping[str, Any] = schema.get("properties", {})
            required = schema.get("required", ())
            for name, member in properties.items():
                child = f"{path}.{name}" if path else name
                if name not in value:
                    if name in required:
                        return f"Parameter '{child}' is missing"
                    continue
                desc = self._walk(member, value[name], child)
                if desc is not None:
                    return desc
            extra = schema.get("additionalProperties", True)
            for name in value:
                if name not in properties:
                    child = f"{path}.{name}" if path else name
                    if extra is False:
                        return f"Parameter '{child}' is unexpected"
                    if extra is not True:
                        desc = self._walk(extra, value[name], child)
                        if desc is not None:
                            return desc
        elif type(value) is list:
            items = schema.get("items")
            if items is not None:
                for index, element in enumerate(value):
                    desc = self._walk(items, element, f"{path}[{index}]")
                    if desc is not None:
                        return desc
        return None


def _path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out


# --------------------------------------------------------------------------- compiled checks


class _Failure:
    """The first error found by a compiled check; its path is collected on the way out.

    ``parts`` holds the path innermost first (member names and list indexes),
    so a successful check never builds a path string.
    """

    __slots__ = ("detail", "kind", "parts")

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind  # "type", "enum", "missing" or "unexpected"
        self.detail = detail  # the expected type name, or the refused value
        self.parts: list[str | int] = []

    def at(self, part: str | int) -> _Failure:
        self.parts.append(part)
        return self

    def desc(self) -> str:
        path = _path(self.parts[::-1])
        if self.kind == "type":
            return f"Invalid parameter type for '{path or 'null'}', expected: {self.detail}"
        if self.kind == "enum":
            return f"Parameter '{path or 'null'}' does not accept value '{self.detail}'"
        if self.kind == "missing":
            return f"Parameter '{path}' is missing"
        return f"Parameter '{path}' is unexpected"


_Check = Callable[[object], "_Failure | None"]

# Keywords that only annotate: they never make a value invalid.
_ANNOTATIONS: Final = frozenset({"$schema", "$id", "title", "description", "$comment", "$defs"})
_COVERED: Final = _ANNOTATIONS | {
    "type", "enum", "properties", "required", "additionalProperties", "items", "$ref",
}
_DEFS_PREFIX: Final = "#/$defs/"


def _accept(value: object) -> _Failure | None:
    return None


class _Unsupported(Exception):
    """The schema uses something the compiled check does not cover."""


class _Compiler:
    """Turns a generator-style schema into nested closures equivalent to ``_walk``.

    Each closure checks one value against one subschema in ``_walk``'s order
    (type, enum, then members in schema order, then unexpected members; or
    list elements in order) and returns the first :class:`_Failure`, or None.
    A ``$ref`` is bound lazily through a table, so recursive definitions
    compile too.
    """

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.root = schema
        defs = schema.get("$defs", {})
        self.defs: Mapping[str, Any] = defs if isinstance(defs, Mapping) else {}
        self.compiled_defs: dict[str, _Check] = {}
        self.compiling: set[str] = set()

    def compile_root(self) -> _Check | None:
        try:
            if not isinstance(self.root.get("$defs", {}), Mapping):
                raise _Unsupported("$defs")
            check = self.compile(self.root)
            for name in list(self.defs):
                self.ref(name)
            return check
        except _Unsupported:
            return None

    def ref(self, name: str) -> None:
        """Compile definition ``name`` into the table, once (recursion-safe)."""
        if name in self.compiled_defs or name in self.compiling:
            return
        if name not in self.defs:
            raise _Unsupported(name)
        self.compiling.add(name)
        self.compiled_defs[name] = self.compile(self.defs[name])
        self.compiling.discard(name)

    def compile(self, schema: object) -> _Check:
        if schema is True:
            return _accept
        if schema is False:
            return lambda value: _Failure("unexpected")
        if not isinstance(schema, Mapping) or not set(schema) <= _COVERED:
            raise _Unsupported(repr(schema)[:80])
        if "$ref" in schema:
            ref = schema["$ref"]
            if set(schema) - _ANNOTATIONS != {"$ref"} or not isinstance(ref, str):
                raise _Unsupported("$ref with siblings")
            if not ref.startswith(_DEFS_PREFIX) or "/" in ref[len(_DEFS_PREFIX):] or "~" in ref:
                raise _Unsupported(ref)
            name = ref[len(_DEFS_PREFIX):]
            self.ref(name)
            table = self.compiled_defs

            def check_ref(value: object) -> _Failure | None:
                # Looked up at call time: the target may still be compiling.
                return table[name](value)

            return check_ref
        steps: list[_Check] = []
        if "type" in schema:
            steps.append(self._type(schema["type"]))
        if "enum" in schema:
            steps.append(self._enum(schema["enum"]))
        if {"properties", "required", "additionalProperties"} & set(schema):
            steps.append(self._object(schema))
        if "items" in schema:
            steps.append(self._items(schema["items"]))
        if not steps:
            return _accept
        if len(steps) == 1:
            return steps[0]
        checks = tuple(steps)

        def check_all(value: object) -> _Failure | None:
            for step in checks:
                failure = step(value)
                if failure is not None:
                    return failure
            return None

        return check_all

    @staticmethod
    def _type(expected: object) -> _Check:
        names = [expected] if isinstance(expected, str) else expected
        if not isinstance(names, list) or not names or not all(
            isinstance(name, str) and name in _TYPE_TESTS for name in names
        ):
            raise _Unsupported(f"type {expected!r}")
        tests = tuple(_TYPE_TESTS[name] for name in names)
        first: str = names[0]
        if len(tests) == 1:
            test = tests[0]
            return lambda value: None if test(value) else _Failure("type", first)
        return lambda value: (
            None if any(t(value) for t in tests) else _Failure("type", first)
        )

    @staticmethod
    def _enum(members: object) -> _Check:
        # Only string enums (all the generator emits): membership is then
        # plain string equality, exactly as in JSON Schema.
        if not isinstance(members, list) or not all(type(m) is str for m in members):
            raise _Unsupported("enum")
        allowed = frozenset(members)

        def check_enum(value: object) -> _Failure | None:
            if type(value) is str and value in allowed:
                return None
            return _Failure("enum", f"{value}")

        return check_enum

    def _object(self, schema: Mapping[str, Any]) -> _Check:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise _Unsupported("properties")
        if not all(isinstance(name, str) and name in properties for name in required):
            raise _Unsupported("required beyond properties")
        members = tuple(
            (name, self.compile(member), name in required) for name, member in properties.items()
        )
        known = frozenset(properties)
        check_extra: _Check | None = None if extra is True else self.compile(extra)

        def check_object(value: object) -> _Failure | None:
            if type(value) is not dict:
                return None
            for name, check, needed in members:
                if name not in value:
                    if needed:
                        return _Failure("missing").at(name)
                    continue
                failure = check(value[name])
                if failure is not None:
                    return failure.at(name)
            if check_extra is not None and not value.keys() <= known:
                for name in value:
                    if name not in known:
                        failure = check_extra(value[name])
                        if failure is not None:
                            return failure.at(name)
            return None

        return check_object

    def _items(self, items: object) -> _Check:
        if items is True:
            return _accept
        check = self.compile(items)

        def check_items(value: object) -> _Failure | None:
            if type(value) is not list:
                return None
            for index, element in enumerate(value):
                failure = check(element)
                if failure is not None:
                    return failure.at(index)
            return None

        return check_items

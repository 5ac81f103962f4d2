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

Types follow QEMU, not JSON Schema's defaults.  ``1.0`` is a number, not an
integer, and ``true`` is neither.  Integers follow the QAPI type that the
schema's ``format`` names (``qobject_input_type_int64()``,
``qobject_input_type_uint64()`` and ``visit_type_intN()``/``visit_type_uintN()``
in ``qapi/qapi-visit-core.c``):

==================  ===================================  =============================
QAPI type           accepted                             otherwise
==================  ===================================  =============================
``int``, ``int64``  -2^63 .. 2^63-1                      ``Invalid parameter type for
                                                         'NAME', expected: integer``
``int8`` ...        that, then the type's range          ``Parameter 'NAME' expects
``int32``                                                int8_t`` (``int16_t`` ...)
``uint64``,         -2^63 .. 2^64-1 (a negative number   ``Parameter 'NAME' expects
``size``            wraps, as in QEMU)                   uint64``
``uint8`` ...       that, wrapped, then the type's       ``Parameter 'NAME' expects
``uint32``          range                                uint8_t`` (``uint16_t`` ...)
``number``          any number                           ``... expected: number``
==================  ===================================  =============================

(QEMU's parser keeps a bigger integer as a floating-point number, which only
``number`` takes.)

:class:`ArgumentValidator` decides validity with ``jsonschema``'s
``Draft202012Validator`` (with the type rules above), built once per command.
Only when that says no does it find the error to report, by walking the value
along the schema in schema order and stopping at the first error.  The walk
covers the keywords the QAPI generator emits (``type``, ``enum``,
``properties``, ``required``, ``additionalProperties``, ``items`` and local
``$ref``); should jsonschema refuse for a reason the walk does not know, its
own best match is reported instead, so the judge is always jsonschema.

Verdicts are cached per argument *shape*: the arguments with the value of
every plain string member (a ``str`` without ``enum``, at the top level)
replaced by a marker, and every other value kept with its JSON type.  A plain
string's value cannot change the verdict (nor the wording of an error), so
``{"reason": "a", "id": "b1"}`` and ``{"reason": "x", "id": "b2"}`` share one
verdict, and jsonschema judges each shape once.  The cache is bounded: it
starts over when full.

``jsonschema`` spends tens of microseconds per array element (four to six
seconds on one valid 1 MiB request of 170,000 elements, during which no other
client would be served); the framing's token-count limit bounds the request,
and jsonschema judges only what the schema can tell apart of it
(:mod:`migblockd.qmp.distinct`: each distinct array element once).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Final

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from migblockd.qmp.distinct import Distinct, value_key
from migblockd.qmp.errors import QMPError
from migblockd.qmp.qdict import unvisited_order

#: Shapes kept per command before the cache starts over.
VERDICT_CACHE_SIZE: Final = 1024
#: Bigger arguments are judged afresh each time (their shapes are too costly
#: to build, and too varied to repeat).
SHAPE_LIMIT: Final = 64

_INT64: Final = range(-(1 << 63), 1 << 63)
_UINT64: Final = range(-(1 << 63), 1 << 64)  # negative numbers wrap, as in QEMU


def _is_integer(checker: object, instance: object) -> bool:
    # Any integer QEMU's parser keeps as one; the generated schemas narrow it
    # to the QAPI type's range with minimum and maximum.
    return type(instance) is int and instance in _UINT64


def _is_number(checker: object, instance: object) -> bool:
    return type(instance) is float or type(instance) is int


def _integer_error(schema: Mapping[str, Any], value: object, name: str) -> str | None:
    """QEMU's error for ``value`` as the QAPI integer type of ``schema``, if any."""
    fmt: str = schema["format"]
    if fmt.startswith("u"):
        if type(value) is not int or value not in _UINT64:
            return f"Parameter '{name}' expects uint64"
        value %= 1 << 64
    elif type(value) is not int or value not in _INT64:
        return f"Invalid parameter type for '{name}', expected: integer"
    if not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        return f"Parameter '{name}' expects {fmt}_t"
    return None


_INTEGER_FORMATS: Final = frozenset(
    f"{sign}int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64))


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
        self._distinct = Distinct(self._defs)
        # With nothing required, an empty arguments object (the common case
        # for queries) is valid without asking jsonschema.
        self._empty_ok = not schema.get("required") and set(schema) <= {
            "$schema", "$id", "title", "description", "type", "properties",
            "additionalProperties", "$defs",
        }
        self._plain = frozenset(
            name for name, member in schema.get("properties", {}).items()
            if self._resolve(member).get("type") == "string"
            and "enum" not in self._resolve(member))
        self._verdicts: dict[Hashable, str | None] = {}

    def check(self, args: dict[str, Any]) -> None:
        """Return if ``args`` is valid, else raise :class:`QMPError` for the first error."""
        if not args and self._empty_ok:
            return
        shape = _shape(args, self._plain)
        if shape is not None:
            verdict = self._verdicts.get(shape, _UNSEEN)
            if verdict is None:
                return
            if verdict is not _UNSEEN:
                raise QMPError(str(verdict))
        verdict = self.judge(args)
        if shape is not None:
            if len(self._verdicts) >= VERDICT_CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[shape] = verdict
        if verdict is not None:
            raise QMPError(verdict)

    def judge(self, args: dict[str, Any]) -> str | None:
        """jsonschema's verdict, uncached: None when valid, else the first error's desc."""
        # jsonschema decides what is valid, on the part of args the schema can
        # tell apart; the walk only words the first error the way QEMU would,
        # on args themselves.
        if self._validator.is_valid(self._distinct.value(self.schema, args)):
            return None
        return self.first_error(args)

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

    def error_at(self, value: object, path: str) -> str | None:
        """The desc of the first error in ``value`` as the schema's walk finds it, its
        members named under ``path`` (``channels[0].addr``), or None when the walk
        finds none: for a value nested in arguments that the schema took as ``any``,
        checked later by a schema of its own (:mod:`migblockd.qmp.addresses`)."""
        return self._walk(self.schema, value, path)

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
        if schema.get("format") in _INTEGER_FORMATS:
            return _integer_error(schema, value, path or "null")
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
            # Of several unexpected members, QEMU names the one its hash table
            # holds first once it took the others, in schema order
            # (migblockd.qmp.qdict.unvisited_order()).
            members: Iterable[str] = value
            if extra is False and sum(name not in properties for name in value) > 1:
                members = unvisited_order(value, (name for name in properties if name in value))
            for name in members:
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
                # An element equal to one found valid is valid too.
                valid: set[Hashable] = set()
                for index, element in enumerate(value):
                    key = value_key(element)
                    if key in valid:
                        continue
                    desc = self._walk(items, element, f"{path}[{index}]")
                    if desc is not None:
                        return desc
                    valid.add(key)
        return None


_UNSEEN: Final[Any] = object()
_STRING: Final = ("plain string",)


def _shape(args: dict[str, Any], plain: frozenset[str]) -> Hashable | None:
    """The cache key of ``args`` (see the module doc), or None when too big to cache."""
    budget = [SHAPE_LIMIT]
    parts: list[tuple[str, Hashable]] = []
    for name, value in args.items():
        if name in plain and type(value) is str:
            parts.append((name, _STRING))
            continue
        frozen = _freeze(value, budget)
        if frozen is None:
            return None
        parts.append((name, frozen))
    return tuple(parts)


def _freeze(value: object, budget: list[int]) -> Hashable | None:
    # The type goes with each value: True == 1 == 1.0 in Python, not in a schema.
    budget[0] -= 1
    if budget[0] < 0:
        return None
    kind = type(value)
    if kind is list:
        items = [_freeze(item, budget) for item in value]  # type: ignore[attr-defined]
        return None if None in items else (list, tuple(items))
    if kind is dict:
        members = [(k, _freeze(v, budget)) for k, v in value.items()]  # type: ignore[attr-defined]
        return None if any(m[1] is None for m in members) else (dict, tuple(members))
    return (kind, value)


def _path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else part
    return out

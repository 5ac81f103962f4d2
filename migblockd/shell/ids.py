"""A request's ``id`` as the key its reply is matched by.

A server may write an id back in a form of its own: QEMU parses ``1E2`` as a double
and writes it with ``%.17g``, as ``100``; migblockd writes ``100.0``.  So a number
is keyed by its value, not its text, and every writer of one id gives one key.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

__all__ = ["id_key"]

#: The integers QEMU keeps as integers (``int64_t``, or ``uint64_t`` when not
#: negative); any other it parses as a double, and writes back as one
#: (``parse_literal()`` in qobject/json-parser.c: ``1e+20`` for 100000000000000000001).
_QEMU_INTEGERS = range(-(1 << 63), 1 << 64)


def id_key(value: Any) -> str:
    """``value`` as the text every writer of it gives the same."""
    return json.dumps(_by_value(value), sort_keys=True, separators=(",", ":"))


def _by_value(value: Any) -> Any:
    if type(value) is int and value not in _QEMU_INTEGERS:
        with contextlib.suppress(OverflowError):  # past a double: QEMU writes inf
            value = float(value)
    if type(value) is float and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_by_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _by_value(item) for key, item in value.items()}
    return value

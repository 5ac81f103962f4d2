"""JSON held to what the daemon reads, for what the shell reads and sends.

Python's ``json`` takes more than the daemon, like QEMU, does: ``NaN`` and
``Infinity``, a number too large for a double (sent on as ``Infinity``), integers of
any length, and an object with a key twice (the last one kept).  :func:`loads`
refuses them, for the values typed after ``=`` and raw JSON requests
(:mod:`migblockd.shell.syntax`), and for what the daemon sends
(:mod:`migblockd.shell.opening`, :mod:`migblockd.shell.client`); :func:`shown` is how
much of a value an error quotes.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DIGITS", "TooManyDigits", "loads", "shown"]


#: How much of an invalid JSON value an error quotes: enough to recognise it,
#: not a pasted megabyte.
_SHOWN = 80


def shown(text: str) -> str:
    """``text``, cut to what an error quotes."""
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _strict_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {shown(text)} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"duplicate key '{key}'")
        found[key] = value
    return found


#: The most digits of an integer: the daemon's bound on what it reads (Python's
#: default), which also keeps the shell's conversions from taking seconds.
MAX_DIGITS = 4300


class TooManyDigits(ValueError):
    """An integer longer than :data:`MAX_DIGITS`: refused here, not sent as a string."""


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        raise TooManyDigits(f"an integer of {digits:,} digits, more than the daemon reads "
                            f"({MAX_DIGITS:,})")
    return int(text)


def loads(text: str) -> Any:
    """``json.loads`` that refuses what the daemon would: ``NaN`` and
    ``Infinity`` (not JSON), a number too large for a double (Python would
    send it on as ``Infinity``), an integer of more than :data:`MAX_DIGITS`
    digits, and an object with a key twice (Python would keep the last one).
    A value nested deeper than Python's decoder recurses (about a thousand
    levels) is refused as well, rather than ending the shell with a
    RecursionError."""
    try:
        return json.loads(text, parse_constant=_strict_constant, parse_float=_finite,
                          parse_int=_bounded_int, object_pairs_hook=_unique)
    except RecursionError:
        raise ValueError("nested too deeply") from None


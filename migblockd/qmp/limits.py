"""What one request may cost: its size, its nesting and its number of tokens.

QEMU bounds its JSON parser the same three ways (``qobject/json-streamer.c``:
64 MiB of tokens, a nesting depth of 1024, 2 Mi tokens); migblockd's defaults
are far lower and come from its option table (``migblockd.config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_NESTING_CEILING", "MIN_MESSAGE_SIZE", "Limits", "count_tokens"]

# Python's C JSON scanner and encoder recurse once per nesting level and count
# against the interpreter's recursion limit (1000 by default); keeping the
# configurable depth well below that is what guarantees no RecursionError.
MAX_NESTING_CEILING: Final = 256
# The smallest message is two bytes ("{}" or "[]").
MIN_MESSAGE_SIZE: Final = 2


@dataclass(frozen=True)
class Limits:
    """Per-connection input limits.

    ``max_message_size``: bytes one message may occupy, from its first byte
    to its last (QEMU's equivalent is 64 MiB of tokens).  ``max_nesting``:
    open ``{``/``[`` at once, the top-level object counting as one (QEMU: 1024).
    ``max_tokens``: JSON tokens in one message, counted as QEMU's streamer
    counts them (QEMU: 2 Mi).  It bounds the work one request can cost: the
    arguments are validated with jsonschema, which spends tens of
    microseconds per array element.

    No defaults here: the daemon's come from its option table
    (``migblockd.config.Config().limits``), the one place they are declared.
    The checks below guard the decoder's own invariants for any caller.
    """

    max_message_size: int
    max_nesting: int
    max_tokens: int

    def __post_init__(self) -> None:
        if self.max_message_size < MIN_MESSAGE_SIZE:
            raise ValueError(f"max_message_size must be at least {MIN_MESSAGE_SIZE} bytes")
        if not 1 <= self.max_nesting <= MAX_NESTING_CEILING:
            raise ValueError(f"max_nesting must be between 1 and {MAX_NESTING_CEILING}")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")


def count_tokens(value: object, limit: int) -> int:
    """The JSON tokens of ``value`` as QEMU's lexer counts them; stops past ``limit``.

    A scalar is one token; a container adds its two brackets, a comma between
    elements, and a colon and the key for each object member.
    """
    count = 0
    stack = [value]
    while stack and count <= limit:
        item = stack.pop()
        if type(item) is dict:
            n = len(item)
            count += 2 + 3 * n - (1 if n else 0)
            stack.extend(item.values())
        elif type(item) is list:
            n = len(item)
            count += 2 + n - (1 if n else 0)
            stack.extend(item)
        else:
            count += 1
    return count

"""How replies, events, requests and messages look on the screen.

Colour is used only when the output is a terminal that shows it (``TERM`` is not
``dumb``) and ``NO_COLOR`` is unset:
errors in bold red, events in cyan, echoed requests dimmed.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from typing import Any, TextIO

from prompt_toolkit.utils import is_dumb_terminal

RED = "\x1b[1;31m"
CYAN = "\x1b[36m"
DIM = "\x1b[2m"
RESET = "\x1b[0m"


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set or the
    terminal is dumb (prompt_toolkit's test: ``TERM`` is ``dumb`` or ``unknown``)."""
    if os.environ.get("NO_COLOR") or is_dumb_terminal():
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def use_ascii(stream: TextIO | None) -> bool:
    """Whether JSON written to ``stream`` must escape every non-ASCII character
    (``\\u00e9``): its encoding cannot write all of Unicode (an ISO-8859-1
    locale), and a reason another client chose must not make printing fail."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return True
    return not name.startswith(("utf-8", "utf-16", "utf-32"))


@dataclass(frozen=True)
class Renderer:
    pretty: bool = False
    colour: bool = False
    ascii: bool = False
    """Escape every non-ASCII character in JSON (see :func:`use_ascii`)."""

    @classmethod
    def for_stream(cls, stream: TextIO | None, pretty: bool = False) -> Renderer:
        """How to write to ``stream``: colour on a terminal, ASCII where it must."""
        if stream is None:
            return cls(pretty=pretty)
        return cls(pretty=pretty, colour=use_colour(stream), ascii=use_ascii(stream))

    def json(self, value: Any) -> str:
        # -p as qmp-shell's (python/qemu/qmp/qmp_shell.py): four spaces, keys sorted.
        text = json.dumps(value, indent=4 if self.pretty else None, sort_keys=self.pretty,
                          ensure_ascii=self.ascii)
        return text if text.isprintable() else _escape_unprintable(text)

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.colour else text

    def reply(self, message: dict[str, Any]) -> str:
        text = self.json(message)
        return self._paint(RED, text) if "error" in message else text

    def event(self, message: dict[str, Any]) -> str:
        return self._paint(CYAN, self.json(message))

    def request(self, message: dict[str, Any] | str) -> str:
        """A request as sent: one the shell built, or the text of a raw one, which
        is sent as typed and so shown (escaped as replies are)."""
        if isinstance(message, str):
            text = message if message.isprintable() else _escape_unprintable(message, "\n\t")
            return self._paint(DIM, text)
        return self._paint(DIM, self.json(message))

    def error(self, text: str) -> str:
        return self._paint(RED, visible(text))

    def notice(self, text: str) -> str:
        return self._paint(DIM, visible(text))


def visible(text: str) -> str:
    """A message with what Python's ``repr`` would escape so escaped (``\\x1b``).

    Messages quote what was typed or read (an unknown command, argument or help
    topic), and a line may carry control characters: pasted, typed after Esc
    while a command ran, or read from a script.  Written as they are, they would
    steer the terminal (an ESC [ A moves the cursor up and the message overwrites
    the line above) and hide what is wrong with the line.  Newlines stay.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _escape_unprintable(text: str, kept: str = "\n") -> str:
    """``text`` (JSON) with what Python's ``repr`` would escape shown as ``\\uXXXX``.

    What another client wrote (a blocker's reason) must neither steer the
    terminal nor hide from the operator: json.dumps leaves C1 controls (U+009B
    is CSI), bidirectional overrides, zero-width and other format characters,
    line separators and lone surrogates as they are.  Two ids that differ by a
    U+200B would otherwise look the same.  Indentation's newlines stay, and the
    characters of ``kept``.
    """
    out = []
    for char in text:
        if char.isprintable() or char in kept:
            out.append(char)
            continue
        code = ord(char)
        if code > 0xFFFF:  # JSON escapes only the BMP: a surrogate pair
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)

"""How replies, events, requests and messages look on the screen.

Colour is used only when the output is a terminal (and ``NO_COLOR`` is unset):
errors in bold red, events in cyan, echoed requests dimmed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, TextIO

RED = "\x1b[1;31m"
#: Characters json.dumps leaves as they are but a terminal acts on: C1 controls
#: (and DEL), bidirectional embeddings, overrides and isolates, line separators.
_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
CYAN = "\x1b[36m"
DIM = "\x1b[2m"
RESET = "\x1b[0m"


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass(frozen=True)
class Renderer:
    pretty: bool = False
    colour: bool = False

    def json(self, value: Any) -> str:
        text = json.dumps(value, indent=2 if self.pretty else None, ensure_ascii=False)
        # What another client wrote (a blocker's reason) must not steer the terminal:
        # C1 controls (U+009B is CSI) and bidirectional overrides are shown escaped.
        return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.colour else text

    def reply(self, message: dict[str, Any]) -> str:
        text = self.json(message)
        return self._paint(RED, text) if "error" in message else text

    def event(self, message: dict[str, Any]) -> str:
        return self._paint(CYAN, self.json(message))

    def request(self, message: dict[str, Any]) -> str:
        return self._paint(DIM, self.json(message))

    def error(self, text: str) -> str:
        return self._paint(RED, text)

    def notice(self, text: str) -> str:
        return self._paint(DIM, text)

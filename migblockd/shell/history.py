"""Where the interactive shell keeps its history."""

from __future__ import annotations

import os
from pathlib import Path


def history_path() -> Path:
    """``$XDG_STATE_HOME/migblockd/shell-history``, by default
    ``~/.local/state/migblockd/shell-history`` (the XDG base directory spec says a
    relative ``XDG_STATE_HOME`` is invalid and must be ignored)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "migblockd" / "shell-history"

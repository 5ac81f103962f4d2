"""Where the interactive shell keeps its history."""

from __future__ import annotations

import os
from pathlib import Path


def history_path() -> Path | None:
    """``$XDG_STATE_HOME/migblockd/shell-history``, by default
    ``~/.local/state/migblockd/shell-history`` (the XDG base directory spec says a
    relative ``XDG_STATE_HOME`` is invalid and must be ignored); None for a uid
    with neither, nor a home (no ``$HOME``, no account: a container's bare uid)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):
        return Path(state) / "migblockd" / "shell-history"
    try:
        home = Path.home()
    except RuntimeError:
        return None
    return home / ".local" / "state" / "migblockd" / "shell-history"

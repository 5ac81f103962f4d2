"""The one exception that stops the daemon's start with a line for its log."""

from __future__ import annotations

__all__ = ["StartupError"]


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one-line reason for the log."""

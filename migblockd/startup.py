"""The exceptions that end the daemon's start with a line for its log."""

from __future__ import annotations

__all__ = ["StartupError", "StoppedStarting"]


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one-line reason for the log."""


class StoppedStarting(Exception):
    """A SIGTERM or SIGINT came while a step of the start waited (a look-up that
    does not answer): the start ends there, serving nobody, and the exit is a
    clean one.  ``str()`` is the signal's name."""

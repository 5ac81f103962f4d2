"""The exceptions that end the daemon's start with a line for its log, and the line
of a stop that ends it."""

from __future__ import annotations

__all__ = ["STOPPED_STARTING", "StartupError", "StoppedStarting"]

#: Logged for a SIGTERM or SIGINT that came before the daemon served anyone.
STOPPED_STARTING = "received %s while starting: stopping before serving"


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one-line reason for the log."""


class StoppedStarting(Exception):
    """A SIGTERM or SIGINT came while a step of the start waited (a look-up that
    does not answer): the start ends there, serving nobody, and the exit is a
    clean one.  ``str()`` is the signal's name."""

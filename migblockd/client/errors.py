"""The errors :mod:`migblockd.client` raises: one hierarchy, under :class:`ClientError`."""

from __future__ import annotations

__all__ = ["ClientError", "CommandError", "DisconnectedError", "EventsLostError"]


class ClientError(Exception):
    """Base of every error :mod:`migblockd.client` raises."""


class CommandError(ClientError):
    """The daemon answered a command with an error.  ``str()`` is its ``desc``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(desc)
        #: The command that failed (``"add-blocker"``).
        self.command = command
        #: The QMP error class (``"GenericError"``).
        self.error_class = error_class
        #: The daemon's description of the error, verbatim.
        self.desc = desc


class DisconnectedError(ClientError):
    """Not connected: connecting failed, or the connection is closed or was lost."""


class EventsLostError(ClientError):
    """An event stream was ended because its reader fell behind: it had more than
    its ``max_unread`` events unread.  The events it kept were read first; those
    that came after were not kept.  The connection is unaffected."""

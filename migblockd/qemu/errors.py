"""The errors :meth:`QemuLink.execute` raises: one per outcome a caller must tell apart.

A command sent to QEMU either was not sent (:class:`QemuNotConnected`), was answered
with QEMU's error (:class:`QemuCommandError`), or was sent with no answer to come
(:class:`QemuInterrupted`: the connection was lost) or none yet (:class:`QemuTimedOut`):
in the last two, whether it took effect is unknown, which the gate must not guess.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "QemuCommandError",
    "QemuInterrupted",
    "QemuLinkError",
    "QemuNotConnected",
    "QemuTimedOut",
]


class QemuLinkError(Exception):
    """Base of the errors :meth:`QemuLink.execute` raises."""


class QemuNotConnected(QemuLinkError):
    """The command was not sent: there is no connection to QEMU."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Not connected to QEMU's monitor at '{path}': {reason}")
        self.path = path
        self.reason = reason


class QemuInterrupted(QemuLinkError):
    """The connection was lost after the command was sent and before QEMU replied.

    Whether the command took effect is unknown.
    """


class QemuTimedOut(QemuLinkError):
    """QEMU did not reply within the link's timeout.

    The link stays connected: QEMU may be stopped, or busy with a long command.  Whether
    the command takes effect is unknown (QEMU may still run it); its late reply is dropped.
    """

    def __init__(self, path: Path, command: str, timeout: float) -> None:
        super().__init__(f"QEMU's monitor at '{path}' did not answer '{command}' within "
                         f"{timeout:g} s; it may still run it")
        self.path = path
        self.command = command
        self.timeout = timeout


class QemuCommandError(QemuLinkError):
    """QEMU answered with an error; ``error_class`` and ``desc`` are QEMU's, verbatim."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


"""Talking to a real QEMU: the QMP link to its monitor and what it learns about that QEMU."""

from migblockd.qemu.errors import (
    QemuCommandError,
    QemuInterrupted,
    QemuLinkError,
    QemuNotConnected,
)
from migblockd.qemu.info import QemuInfo
from migblockd.qemu.link import EventHandler, QemuLink
from migblockd.qemu.reconnect import LinkState, StateHandler

__all__ = [
    "EventHandler",
    "LinkState",
    "QemuCommandError",
    "QemuInfo",
    "QemuInterrupted",
    "QemuLink",
    "QemuLinkError",
    "QemuNotConnected",
    "StateHandler",
]

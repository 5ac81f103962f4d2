"""Why a command failed, in QMP's words: where domain errors meet the wire.

A handler fails by raising.  What it raises is one of four kinds, each
worded by the layer that knows the facts, and this module is the one place
that turns them into the :class:`~migblockd.qmp.errors.QMPError` the client
gets:

``QMPError``
    Already worded for the wire (an access refusal, an argument error).
``BlockerError``
    The registry's refusal; its ``desc`` is QEMU's exact text
    (``migration/migration.c``).
``QemuError``
    The gated QEMU's own error reply, relayed verbatim: class and desc.
``QemuUnavailable``
    The gated QEMU is not connected; the text names its monitor.

Anything else is a bug: the client gets QEMU's generic wording for a command
that failed inside (``qapi/qmp-dispatch.c`` has none better) and the traceback
goes to the log only.
"""

from __future__ import annotations

from migblockd.qemu_facts import QemuError, QemuUnavailable
from migblockd.qmp.errors import QMPError
from migblockd.registry import BlockerError

__all__ = ["internal_error", "qmp_error"]


def qmp_error(exc: Exception) -> QMPError | None:
    """The QMP error for ``exc``, or ``None`` when ``exc`` is a bug."""
    if isinstance(exc, QMPError):
        return exc
    if isinstance(exc, BlockerError):
        return QMPError(exc.desc)
    if isinstance(exc, QemuError):
        return QMPError(exc.desc, exc.error_class)
    if isinstance(exc, QemuUnavailable):
        return QMPError(str(exc))
    return None


def internal_error(command: str) -> QMPError:
    """What a client hears when ``command`` failed on a bug of ours."""
    return QMPError(f"Internal error while executing command {command}")

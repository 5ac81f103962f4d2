"""QMP errors: the one place that knows the wire's error classes.

A QMP error response carries an error *class* and a human-readable *desc*::

    {"id": 7, "error": {"class": "GenericError", "desc": "Parameter 'reason' is missing"}}

QEMU has kept only a handful of classes for backward compatibility
(``qapi/error.json``); nearly every error is ``GenericError`` and clients are
told to rely on the desc only for display.  migblockd uses two:

``GenericError``
    Everything: envelope errors, argument errors, JSON parse errors and the
    registry's refusals (``migblockd.registry.BlockerError``, whose ``str()`` is
    already QEMU's exact desc).
``CommandNotFound``
    An unknown command, a command sent before capabilities negotiation, and a
    second ``qmp_capabilities``.

Code below the session raises :class:`QMPError` (or a domain error); the session
turns it into the reply object with :func:`error_reply`.  Nothing else builds
error objects, so class names live only here.
"""

from __future__ import annotations

from typing import Any, Final

GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"


class _NoId:
    """Marker for "the request had no ``id`` member" (``None`` is a valid id: JSON null)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_ID"


#: Pass as ``id`` when the request carried none: the reply then has no ``id`` member.
NO_ID: Final = _NoId()


class QMPError(Exception):
    """An error to report to the client as a QMP error response.

    ``desc`` is sent verbatim; ``error_class`` is the QMP error class
    (``GenericError`` unless a subclass says otherwise).  Raising one from a
    command's ``validate`` or ``run`` aborts the command and answers the request
    with ``{"id": ..., "error": {"class": error_class, "desc": desc}}``.
    """

    error_class: str = GENERIC_ERROR

    def __init__(self, desc: str, error_class: str | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        if error_class is not None:
            # Relayed verbatim from QEMU, whose classes go beyond migblockd's two.
            self.error_class = error_class

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.desc!r})"


class CommandNotFound(QMPError):
    """QMP class ``CommandNotFound``: the command is not available in this state.

    QEMU uses it for an unknown command (``The command NAME has not been
    found``), rewrites every such error to ``Expecting capabilities negotiation
    with 'qmp_capabilities'`` before negotiation, and reuses it for a second
    ``qmp_capabilities``.
    """

    error_class: str = COMMAND_NOT_FOUND


def error_reply(err: QMPError, id: object = NO_ID) -> dict[str, Any]:
    """The whole error response for ``err``.

    QEMU emits ``id`` before ``error`` (and after ``return`` on success);
    clients must not rely on member order, but matching it costs nothing.
    With ``id=NO_ID`` the response has no ``id`` member at all, as for parse
    errors and non-object input.
    """
    body = {"class": err.error_class, "desc": err.desc}
    if id is NO_ID:
        return {"error": body}
    return {"id": id, "error": body}

"""Info records logged per request, without ``logging``'s per-record machinery.

Every blocker change, connection and disconnection is logged at info level, so
the cost of such a record is paid for every request.  ``Logger.info`` spends
most of it on what migblockd never uses: ``LogRecord.__init__`` fills some
twenty attributes (the source file's name split two ways, thread and process
fields, ...), and the logger then walks the hierarchy, its filters and its
handlers to reach the one handler there is.  Measured under `add+del` load
(``benchmarks.ab``), that was about 5 µs of CPU per request of the 12 µs a
record costs in all.

:func:`info` makes a :class:`QuickRecord` in a few attribute stores and hands
it straight to the log writer, but only when that is exactly where ``logging``
would have sent it, and in the same form: the root logger's only handler is
migblockd's (installed by :func:`migblockd.logs.setup`), nothing on the way has
a filter or a handler of its own, and neither the record factory, the logger
class nor the name of INFO was changed.  Otherwise (a test capturing records,
a program that embeds the daemon) it is plain ``logger.info``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["QuickRecord", "info", "install", "uninstall"]


class QuickRecord(logging.LogRecord):
    """An info record made of what the daemon's formats show.

    ``LogRecord.__init__`` is not called: what it would compute is the same for
    every record made here (:data:`_FIXED`, copied in one ``dict.update``);
    what differs is set as it sets it.  It is a ``LogRecord`` for every purpose
    (``getMessage()``, any formatter's ``%(name)s`` fields), so that the writer
    and the formats need not know how a record was made.
    """

    def __init__(self, name: str, msg: str, args: tuple[object, ...],
                 fields: dict[str, Any]) -> None:  # no super().__init__(): see above
        self.__dict__.update(_FIXED)
        self.name = name
        self.msg = msg
        # LogRecord's rule: a lone non-empty mapping is the %(key)s arguments.
        one = args[0] if len(args) == 1 else None
        self.args = one if isinstance(one, Mapping) and one else args
        self.created, self.msecs, self.relativeCreated = _times()
        self.fields = fields


_started: Final[Any] = getattr(logging, "_startTime", None)

if sys.version_info >= (3, 13):
    def _times() -> tuple[float, float, float]:
        """``created``, ``msecs`` and ``relativeCreated``, as LogRecord sets them."""
        ct = time.time_ns()
        created = ct / 1e9
        msecs = (ct % 1_000_000_000) // 1_000_000 + 0.0
        if msecs == 999.0 and int(created) != ct // 1_000_000_000:
            msecs = 0.0
        return created, msecs, (ct - (_started or 0)) / 1e6
else:
    def _times() -> tuple[float, float, float]:
        """``created``, ``msecs`` and ``relativeCreated``, as LogRecord sets them."""
        ct = time.time()
        return ct, int((ct - int(ct)) * 1000) + 0.0, (ct - (_started or 0.0)) * 1000


#: What ``LogRecord.__init__`` sets alike for every info record when, as in the
#: daemon, ``logging`` is told not to look up the caller, thread or process
#: (see :func:`migblockd.logs.setup`).
_FIXED: Final[dict[str, object]] = {
    "levelno": logging.INFO, "levelname": "INFO",
    "pathname": "(unknown file)", "filename": "(unknown file)", "module": "(unknown file)",
    "lineno": 0, "funcName": "(unknown function)",
    "exc_info": None, "exc_text": None, "stack_info": None,
    "thread": None, "threadName": None, "processName": None, "process": None,
    **({"taskName": None} if sys.version_info >= (3, 12) else {}),
}


Put = Callable[[logging.LogRecord], None]


class _Installed:
    #: migblockd's handler, and what its ``handle`` does with a record that passes.
    route: tuple[logging.Handler, Put] | None = None


def install(handler: logging.Handler, put: Put) -> None:
    """``handler`` is now the root logger's, and hands each record to ``put``."""
    _Installed.route = (handler, put)


def uninstall() -> None:
    """Send every record through ``logging`` again."""
    _Installed.route = None


def info(logger: logging.Logger, msg: str, *args: object, extra: dict[str, Any]) -> None:
    """``logger.info(msg, *args, extra=extra)``, where ``extra`` is ``about(...)``."""
    route = _Installed.route
    if route is None or not _straight(logger, route[0]):
        logger.info(msg, *args, extra=extra)
    elif logger.isEnabledFor(logging.INFO):
        route[1](QuickRecord(logger.name, msg, args, extra["fields"]))


def _straight(logger: logging.Logger, handler: logging.Handler) -> bool:
    """``logging`` would hand ``logger``'s info records to ``handler`` alone, as
    they are, and make them as :class:`QuickRecord` does."""
    root = logging.root
    return (len(root.handlers) == 1 and root.handlers[0] is handler
            and not handler.filters and handler.level <= logging.INFO and not root.filters
            and logger.parent is root and not logger.handlers and not logger.filters
            and logger.propagate and type(logger) is logging.Logger
            and logging.getLogRecordFactory() is logging.LogRecord
            and logging.getLevelName(logging.INFO) == "INFO")

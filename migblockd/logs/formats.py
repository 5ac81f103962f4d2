"""How a record becomes a line: text for people, ``<N>``-prefixed text for journald, JSON.

Formatting runs in the log writer's thread, never on the event loop (see
:mod:`migblockd.logs.writer`), so it may take its time; each function here is
pure and turns one :class:`logging.LogRecord` into one ``str``.

* ``text`` on a terminal or in a file: ``TIME migblockd[PID] LEVEL: message``.
* ``text`` when stderr is the journal: ``<N>LEVEL: message``.  journald adds
  the time and the unit itself, and reads the sd-daemon(3) prefix ``<N>`` as
  the entry's priority, so ``journalctl -p warning`` works.  Every line of a
  multi-line record (a traceback) gets the prefix, since journald makes each
  line an entry of its own.
* ``json``: one object per line, for log shippers: ``time`` (UTC, ISO 8601),
  ``level``, ``priority``, ``logger``, ``pid``, ``message``, the record's
  structured fields as keys, and ``traceback`` when there is one.  Under the
  journal the object is prefixed with ``<N>`` too (journald strips it).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

__all__ = ["JsonFormat", "TextFormat", "message", "priority", "record_fields"]

#: syslog(3) priorities of Python's levels (sd-daemon(3)'s ``SD_ERR`` and friends).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
DEBUG_PRIORITY = 7


def priority(levelno: int) -> int:
    """The syslog priority of a level: ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return DEBUG_PRIORITY


def record_fields(record: logging.LogRecord) -> dict[str, int | str | list[str]]:
    """The structured fields a record carries (``extra=about(...)``), else ``{}``."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


_plain = logging.Formatter()
#: ``logging.Formatter``'s default time format (``default_time_format``); it
#: appends ``,MSECS``.
_DATE_TIME = "%Y-%m-%d %H:%M:%S"


def message(record: logging.LogRecord) -> str:
    """The record's message with its traceback (if any) below it."""
    text = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = _plain.formatException(record.exc_info)
    if record.exc_text:
        text = f"{text}\n{record.exc_text}"
    if record.stack_info:
        text = f"{text}\n{_plain.formatStack(record.stack_info)}"
    return text


class TextFormat:
    """``TIME migblockd[PID] LEVEL: message``, or ``<N>LEVEL: message`` for the journal."""

    def __init__(self, *, journal: bool, pid: int) -> None:
        self.journal = journal
        # The pid is known once: looking it up per record is a getpid(2) each.
        self._ident = f" migblockd[{pid}] "
        # logging.Formatter's default time, with the date and time of day made
        # once per second rather than once per record.
        self._second: int | None = None
        self._stamp = ""

    def _time(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(_DATE_TIME, _plain.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"

    def line(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname}: {message(record)}"
        if self.journal:
            prefix = f"<{priority(record.levelno)}>"
            return prefix + text.replace("\n", "\n" + prefix)
        return self._time(record) + self._ident + text


class JsonFormat:
    """One JSON object per record (``ensure_ascii``: any string is safe in it)."""

    def __init__(self, *, journal: bool, pid: int) -> None:
        self.journal = journal
        self.pid = pid

    def line(self, record: logging.LogRecord) -> str:
        prio = priority(record.levelno)
        obj: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "priority": prio,
            "logger": record.name,
            "pid": self.pid,
            "message": record.getMessage(),
        }
        # The structured fields cannot replace the keys above.
        for key, value in record_fields(record).items():
            obj.setdefault(key, value)
        if record.exc_info or record.exc_text or record.stack_info:
            obj["traceback"] = message(record).partition("\n")[2]
        text = json.dumps(obj, default=str, separators=(",", ":"))
        return f"<{prio}>{text}" if self.journal else text
